"""The registry in etcd: writes become etcd transactions, reads come from the local copy.

A write (PUT or PATCH on any instance) is computed by the core from this
instance's copy at etcd revision R (the registry, with the mod_revision of the
``revision`` key), turned into one transaction (layout.plan_write) and committed
only if nothing was written since (compare on the revision key) and every VIP it
hands out is unclaimed (``create_revision == 0`` on its claim key). A failed
compare means another instance wrote first: wait until the watch has applied
that write, compute again, retry (bounded). The 200 goes out once the
transaction committed and the watch has applied it here, so this instance's DNS
already answers from it. etcd unreachable: 503, nothing acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import RegistryConfig
from ..core.registry import Registry, RegistryError, RegistryPolicy
from ..metrics import sync_age_families
from ..store import RegistryStore
from .client import EtcdClient, EtcdError, EtcdUnavailable, b64, num, ssl_context
from .layout import Plan, plan_write
from .sync import EtcdMirror

log = logging.getLogger("meshdns.etcd")

# Failed compares in one write before giving up (503). Each one is another writer's
# commit, so the fleet always progresses; this bounds how long one write may lose.
MAX_CONFLICTS = 100


class EtcdRegistry:
    """The etcd backend: an :class:`EtcdMirror` keeping the store current, plus writes.

    Satisfies the API's FollowStatus (``leader``, ``connected``, ``started_at``,
    ``last_success``: /readyz) and RegistryWriter (``write``) protocols.
    """

    def __init__(self, store: RegistryStore, policy: RegistryPolicy,
                 cfg: RegistryConfig) -> None:
        etcd = cfg.etcd
        tls = etcd.ca_file is not None or any(e.startswith("https://") for e in etcd.endpoints)
        self.client = EtcdClient(
            etcd.endpoints, dial_timeout=etcd.dial_timeout, request_timeout=etcd.request_timeout,
            ssl_ctx=ssl_context(etcd.ca_file, etcd.cert_file, etcd.key_file) if tls else None,
            username=etcd.username, password=etcd.password)
        self.store = store
        self.prefix = etcd.prefix
        self.mirror = EtcdMirror(store, policy, self.client, etcd.prefix)
        self.hold_ttl = max(1, math.ceil(policy.hold_seconds))
        # How long one write may keep trying (unreachable members, an election, conflicts).
        self.write_timeout = max(1.0, etcd.request_timeout)
        self.commits = 0
        self.conflicts = 0
        self.unavailable = 0
        self._lock: asyncio.Lock | None = None

    # FollowStatus -------------------------------------------------------------

    @property
    def leader(self) -> str:
        return self.mirror.leader

    @property
    def connected(self) -> bool:
        return self.mirror.connected

    @property
    def started_at(self) -> float:
        return self.mirror.started_at

    @property
    def last_success(self) -> float | None:
        return self.mirror.last_success

    # lifecycle ----------------------------------------------------------------

    def start(self, restored_from: str = "") -> None:
        if self.store.loaded:
            log.info("etcd: serving revision %d (%d services) from %s until %s answers",
                     self.store.revision, len(self.store.registry), restored_from,
                     self.mirror.leader)
        self.mirror.start()

    async def stop(self) -> None:
        await self.mirror.stop()
        await self.client.close()

    # writes -------------------------------------------------------------------

    async def write(self, compute: Callable[[Registry], Registry], *,
                    check: Callable[[Registry], None] | None = None,
                    quick: Callable[[Registry], Registry | None] | None = None
                    ) -> Registry:
        """Compute ``compute(copy)``, commit it to etcd, return it once served here.

        RegistryError carries the status: the core's 400/409/507, 503 when etcd
        cannot be reached (nothing acknowledged), 413 when etcd refuses the size.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # this instance's writes in turn: they would only conflict
            return await self._write(compute, check)

    async def _write(self, compute: Callable[[Registry], Registry],
                     check: Callable[[Registry], None] | None) -> Registry:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.write_timeout
        give_up = loop.time() + 10 * self.write_timeout  # whatever happens
        conflicts = 0
        caught_up = False
        while True:
            state = self.mirror.state
            if state is None:
                if not await self.mirror.wait_until(lambda: self.mirror.state is not None,
                                                    deadline - loop.time()):
                    self.unavailable += 1
                    raise RegistryError(503, "no copy of the registry from etcd yet (etcd "
                                        f"unreachable: {self.mirror.leader}); nothing written")
                continue
            base, write_rev, claims = state
            try:
                # A refusal (If-Match 412, the core's 409/507) is only answered from a copy
                # as new as etcd: the copy may lag a write made through another instance
                # (an ETag read there, a service deleted there). Catch up once, then judge.
                if check is not None:
                    check(base)
                new = await asyncio.to_thread(self.store._compute, compute, base)
            except Exception:
                if caught_up or not await self._catch_up(state, write_rev, deadline):
                    raise
                caught_up = True
                continue
            plan = await asyncio.to_thread(plan_write, self.prefix, base, new, claims)
            try:
                # On a prefix never written, even a write of nothing commits (the revision
                # key alone): it makes the registry exist, empty, and every instance ready.
                if not plan and self.mirror.written:
                    # Nothing to change in this copy, if it is as new as etcd (a delete of
                    # a service just created through another instance must not be lost).
                    latest = await self._latest_write_revision()
                    if latest <= write_rev:
                        return base
                    if loop.time() > give_up:
                        raise EtcdUnavailable("this instance's copy stays behind etcd")
                    await self.mirror.wait_newer(state, latest, self.write_timeout)
                    continue
                answer = await self._commit(plan, write_rev)
            except EtcdUnavailable as exc:
                if loop.time() < deadline:
                    await asyncio.sleep(0.2)  # an election, a member restarting: try again
                    continue
                self.unavailable += 1
                raise RegistryError(503, f"etcd unreachable ({exc}); nothing written") \
                    from None
            except EtcdError as exc:
                if "too many operations" in exc.message or "too large" in exc.message:
                    raise RegistryError(413, f"etcd refused the write as too large "
                                        f"({exc.message}): raise etcd's --max-txn-ops / "
                                        "--max-request-bytes, or write in smaller PATCHes") \
                        from None
                self.unavailable += 1
                raise RegistryError(503, f"etcd refused the write: {exc.message}") from None
            revision = num(answer.get("header", {}).get("revision"))
            if answer.get("succeeded"):
                self.commits += 1
                # Committed: worth a whole request_timeout for the watch to bring it.
                if not await self.mirror.wait_applied(revision, self.write_timeout):
                    self.unavailable += 1
                    raise RegistryError(503, f"committed to etcd at revision {revision}, but "
                                        "this instance has not applied it yet; retry "
                                        "(the write is idempotent)")
                return self.store.registry
            self.conflicts += 1
            conflicts += 1
            if conflicts >= MAX_CONFLICTS or loop.time() > give_up:
                self.unavailable += 1
                raise RegistryError(503, f"gave up after {conflicts} conflicting concurrent "
                                    "writes; retry")
            # Another instance wrote first (progress, and etcd answers): compute again
            # once the watch brought that write here, with a fresh time budget.
            deadline = min(loop.time() + self.write_timeout, give_up)
            seen = _failure_revision(answer)
            await self.mirror.wait_newer(state, seen, self.write_timeout)

    async def _latest_write_revision(self) -> int:
        """The revision key's mod_revision in etcd now (a linearizable read)."""
        doc = await self.client.range(self.mirror.revision_key.encode())
        kvs = doc.get("kvs") or []
        return num(kvs[0].get("mod_revision")) if kvs else 0

    async def _catch_up(self, state: object, write_rev: int, deadline: float) -> bool:
        """Whether etcd holds a newer write than ``write_rev`` and the copy now has it."""
        try:
            latest = await self._latest_write_revision()
        except (EtcdUnavailable, EtcdError):
            return False
        if latest <= write_rev:
            return False
        timeout = max(deadline - asyncio.get_running_loop().time(), 1.0)
        return await self.mirror.wait_newer(state, latest, timeout)

    async def _commit(self, plan: Plan, write_rev: int) -> dict[str, Any]:
        lease = await self.client.lease_grant(self.hold_ttl) if plan.held else 0
        revision_key = b64(self.mirror.revision_key)
        compare: list[dict[str, Any]] = [
            {"key": revision_key, "target": "MOD", "result": "EQUAL",
             "mod_revision": str(write_rev)}]
        compare += [{"key": b64(k), "target": "CREATE", "result": "EQUAL",
                     "create_revision": "0"} for k in plan.must_not_exist]
        compare += [{"key": b64(k), "target": "MOD", "result": "EQUAL",
                     "mod_revision": str(rev)} for k, rev in plan.must_be]
        success: list[dict[str, Any]] = [
            {"request_delete_range": {"key": b64(k)}} for k in plan.deletes]
        success += [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in plan.puts]
        success += [{"request_put": {"key": b64(k), "value": b64(v), "lease": str(lease)}}
                    for k, v in plan.held]
        success.append({"request_put": {"key": revision_key, "value": ""}})
        failure = [{"request_range": {"key": revision_key}}]
        return await self.client.txn(compare, success, failure)


def _failure_revision(answer: dict[str, Any]) -> int:
    """The revision key's mod_revision as the failed transaction found it."""
    for response in answer.get("responses", []):
        kvs = response.get("response_range", {}).get("kvs") or []
        if kvs:
            return num(kvs[0].get("mod_revision"))
    return 0


class EtcdCollector:
    """meshdns_etcd_*: how current this instance's copy of the registry in etcd is."""

    def __init__(self, backend: EtcdRegistry) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        mirror = self.backend.mirror
        yield GaugeMetricFamily("meshdns_etcd_connected",
                                "1 while the watch on etcd is up and current.",
                                value=1.0 if mirror.connected else 0.0)
        yield from sync_age_families("meshdns_etcd", mirror.last_success,
                                     "the local copy was last known current")
        yield GaugeMetricFamily("meshdns_etcd_applied_revision",
                                "etcd revision up to which changes are applied locally.",
                                value=mirror.applied)
        yield CounterMetricFamily("meshdns_etcd_relists", "Full reads of the prefix "
                                  "(start-up, compaction, an unappliable change).",
                                  value=mirror.relists)
        yield CounterMetricFamily("meshdns_etcd_write_commits", "Transactions committed.",
                                  value=self.backend.commits)
        yield CounterMetricFamily("meshdns_etcd_write_conflicts", "Transactions that failed "
                                  "their compare (another writer first) and were retried.",
                                  value=self.backend.conflicts)
        yield CounterMetricFamily("meshdns_etcd_write_unavailable",
                                  "Writes answered 503 (etcd unreachable or too busy).",
                                  value=self.backend.unavailable)
        yield CounterMetricFamily("meshdns_etcd_bad_keys",
                                  "Keys under the prefix skipped as unreadable.",
                                  value=mirror.bad_keys)
