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
import contextlib
import logging
import math
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import RegistryConfig
from ..core.registry import Registry, RegistryError, RegistryPolicy
from ..metrics import sync_age_families
from ..store import RegistryStore
from .client import (
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    b64,
    num,
    prefix_end,
    ssl_context,
    unb64,
)
from .layout import (
    GENERATIONS,
    MESHSERVICES,
    SERVICES,
    STAGING,
    VIPS,
    Plan,
    generation_root,
    plan_generation,
    plan_write,
)
from .sync import EtcdMirror

log = logging.getLogger("meshdns.etcd")

# Failed compares in one write before giving up (503). Each one is another writer's
# commit, so the fleet always progresses; this bounds how long one write may lose.
MAX_CONFLICTS = 100
ATTEMPT_FIRST = 0.5  # s: one attempt's deadline on one member, doubling per failed pass
RETRY_PAUSE = 0.05  # s: between passes over the members (an election is under way)
STAGE_TTL = 10  # s: the lease of a generation being written, kept alive by its writer
STAGE_PARALLEL = 8  # staging transactions in flight
# s: for this instance to list a new generation it committed (100,000 services: ~30 s
# on 2 idle CPUs, minutes on a loaded machine) before it answers 503 instead of 200
STAGED_APPLY_WAIT = 300.0
GC_EVERY = 60.0  # s: between garbage collections (also after every new generation)
GC_PAGE = 5000  # keys deleted per transaction
GC_MAX = 1000  # generations looked at per collection
_RESOURCE_EXHAUSTED = 8  # gRPC status of "mvcc: database space exceeded" (NOSPACE)

T = TypeVar("T")


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
        # etcd's limits on one transaction (--max-txn-ops, --max-request-bytes): a
        # write within them is one transaction, a larger one a new generation.
        self.max_ops = etcd.max_txn_ops
        self.max_bytes = etcd.max_txn_bytes
        self.commits = 0
        self.conflicts = 0
        self.unavailable = 0
        self.nospace = 0
        self.collected = 0
        self._lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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
        self._background(self._collect_every())

    async def _collect_every(self) -> None:
        while True:
            await asyncio.sleep(GC_EVERY * random.uniform(0.5, 1.0))
            await self.collect_garbage()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
            return await self._write(compute, check, quick)

    async def _write(self, compute: Callable[[Registry], Registry],
                     check: Callable[[Registry], None] | None,
                     quick: Callable[[Registry], Registry | None] | None) -> Registry:
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
            root = self.mirror.root
            try:
                # A refusal (If-Match 412, the core's 409/507) is only answered from a copy
                # as new as etcd: the copy may lag a write made through another instance
                # (an ETag read there, a service deleted there). Catch up once, then judge.
                if check is not None:
                    check(base)
                # A small PATCH is computed and planned on the loop, in O(change): the
                # thread hops would cost more than the work.
                new = None if quick is None else self.store._compute(quick, base)
                small = new is not None
                if new is None:
                    new = await asyncio.to_thread(self.store._compute, compute, base)
            except Exception:
                if caught_up or not await self._catch_up(state, write_rev, deadline):
                    raise
                caught_up = True
                continue
            plan = plan_write(self.prefix + root, base, new, claims) if small else \
                await asyncio.to_thread(plan_write, self.prefix + root, base, new, claims)
            staged = False
            try:
                # On a prefix never written, even a write of nothing commits (the revision
                # key alone): it makes the registry exist, empty, and every instance ready.
                if not plan and self.mirror.written:
                    # Nothing to change in this copy, if it is as new as etcd (a delete of
                    # a service just created through another instance must not be lost).
                    latest = await self._latest_write_revision(loop.time() + self.write_timeout)
                    if latest <= write_rev:
                        return base
                    if loop.time() > give_up:
                        raise EtcdUnavailable("this instance's copy stays behind etcd")
                    await self.mirror.wait_newer(state, latest, self.write_timeout)
                    continue
                if self._fits(plan):
                    answer = await self._commit(plan, write_rev, root)
                else:
                    staged = True
                    answer = await self._commit_generation(new, write_rev, root)
            except EtcdUnavailable as exc:
                self.unavailable += 1
                raise RegistryError(503, f"etcd unreachable ({exc}); nothing written") \
                    from None
            except EtcdError as exc:
                raise self._refused(exc) from None
            revision = num(answer.get("header", {}).get("revision"))
            if answer.get("succeeded"):
                self.commits += 1
                # Committed: worth a whole request_timeout for the watch to bring it (a
                # new generation: every instance lists it whole, so longer).
                wait = max(self.write_timeout, STAGED_APPLY_WAIT) if staged else \
                    self.write_timeout
                if not await self.mirror.wait_applied(revision, wait):
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
            if staged and seen <= write_rev:
                continue  # no other write: the staging outlived a lease; stage again
            # That write did commit: worth waiting for (a new generation is listed whole).
            await self.mirror.wait_newer(state, seen, max(self.write_timeout, min(
                STAGED_APPLY_WAIT, give_up - loop.time())))

    def _refused(self, exc: EtcdError) -> RegistryError:
        """What an error etcd answered deliberately means for the client."""
        if exc.code == _RESOURCE_EXHAUSTED and "space" in exc.message:
            self.nospace += 1
            return RegistryError(507, f"etcd is out of space ({exc.message}: its NOSPACE "
                                 "alarm is raised, the database reached "
                                 "--quota-backend-bytes); nothing written. DNS and reads go "
                                 "on from each instance's copy. Writes resume once the "
                                 "operator compacts, defragments and disarms the alarm "
                                 "(docs/etcd-operations.md)")
        if "too many operations" in exc.message or "too large" in exc.message:
            return RegistryError(413, f"etcd refused the write as too large "
                                 f"({exc.message}): registry.etcd.max_txn_ops / "
                                 "max_txn_bytes must not exceed etcd's --max-txn-ops / "
                                 "--max-request-bytes")
        self.unavailable += 1
        return RegistryError(503, f"etcd refused the write: {exc.message}")

    def _fits(self, plan: Plan) -> bool:
        """Whether ``plan`` is one transaction etcd takes (operations and bytes)."""
        ops = len(plan.deletes) + len(plan.puts) + len(plan.held) + 1
        compares = 1 + len(plan.must_not_exist) + len(plan.must_be)
        if ops > self.max_ops or compares > self.max_ops:
            return False
        size = sum(len(k) + len(v) + 16 for k, v in plan.puts) + \
            sum(len(k) + len(v) + 24 for k, v in plan.held) + \
            sum(len(k) + 8 for k in plan.deletes) + \
            sum(len(k) + 24 for k in plan.must_not_exist) + \
            sum(len(k) + 24 for k, _ in plan.must_be) + 256
        return size <= self.max_bytes

    async def _retrying(self, call: Callable[[float], Awaitable[T]], until: float,
                        first: float = ATTEMPT_FIRST) -> T:
        """``call(attempt_timeout)`` until it gets an answer: each pass over the members
        with a short deadline per attempt (doubling, up to request_timeout), so a write
        that met a dead leader or an election goes to the others at once."""
        loop = asyncio.get_running_loop()
        attempt = min(first, self.client.request_timeout)
        while True:
            try:
                return await call(attempt)
            except EtcdUnavailable:
                if loop.time() + RETRY_PAUSE >= until:
                    raise
                attempt = min(attempt * 2, self.client.request_timeout)
                await asyncio.sleep(RETRY_PAUSE)

    async def _latest_write_revision(self, until: float) -> int:
        """The revision key's mod_revision in etcd now (a linearizable read)."""
        key = self.mirror.revision_key.encode()
        doc = await self._retrying(lambda t: self.client.range(key, attempt_timeout=t), until)
        kvs = doc.get("kvs") or []
        return num(kvs[0].get("mod_revision")) if kvs else 0

    async def _catch_up(self, state: object, write_rev: int, deadline: float) -> bool:
        """Whether etcd holds a newer write than ``write_rev`` and the copy now has it."""
        loop = asyncio.get_running_loop()
        try:
            latest = await self._latest_write_revision(max(deadline, loop.time() + 1.0))
        except (EtcdUnavailable, EtcdError):
            return False
        if latest <= write_rev:
            return False
        timeout = max(deadline - loop.time(), 1.0)
        return await self.mirror.wait_newer(state, latest, timeout)

    def _guard(self, write_rev: int) -> dict[str, Any]:
        return {"key": b64(self.mirror.revision_key), "target": "MOD", "result": "EQUAL",
                "mod_revision": str(write_rev)}

    async def _commit(self, plan: Plan, write_rev: int, root: str) -> dict[str, Any]:
        until = asyncio.get_running_loop().time() + self.write_timeout
        lease = await self._retrying(
            lambda t: self.client.lease_grant(self.hold_ttl, attempt_timeout=t), until) \
            if plan.held else 0
        revision_key = b64(self.mirror.revision_key)
        compare: list[dict[str, Any]] = [self._guard(write_rev)]
        compare += [{"key": b64(k), "target": "CREATE", "result": "EQUAL",
                     "create_revision": "0"} for k in plan.must_not_exist]
        compare += [{"key": b64(k), "target": "MOD", "result": "EQUAL",
                     "mod_revision": str(rev)} for k, rev in plan.must_be]
        success: list[dict[str, Any]] = [
            {"request_delete_range": {"key": b64(k)}} for k in plan.deletes]
        success += [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in plan.puts]
        success += [{"request_put": {"key": b64(k), "value": b64(v), "lease": str(lease)}}
                    for k, v in plan.held]
        success.append({"request_put": {"key": revision_key, "value": b64(root)}})
        failure = [{"request_range": {"key": revision_key}}]
        # Retried on another member when one fails: the compare makes a second commit of
        # a write that did commit (an answer lost) fail, and the loop sees it is done.
        return await self._retrying(
            lambda t: self.client.txn(compare, success, failure, attempt_timeout=t), until)

    # writes larger than one transaction (docs/scaling.md) -----------------------

    async def _commit_generation(self, new: Registry, write_rev: int, old_root: str
                                 ) -> dict[str, Any]:
        """Stage ``new`` whole as a new generation, then point the revision key at it in
        one small transaction (if nothing was written since ``write_rev``)."""
        loop = asyncio.get_running_loop()
        gen_id = secrets.token_hex(8)
        root = generation_root(gen_id)
        marker = self.prefix + STAGING + gen_id
        plan = await asyncio.to_thread(plan_generation, self.prefix + root, new)
        started = loop.time()
        until = started + self.write_timeout
        lease = await self._retrying(
            lambda t: self.client.lease_grant(STAGE_TTL, attempt_timeout=t), until)
        # The held VIPs' claims are on a hold lease kept alive with the staging one until
        # the commit (staging may take longer than the hold): they are held for the
        # whole hold from the commit on, and run out with the writer should it die.
        hold = 0
        keepalive = loop.create_task(self._keep_alive([lease], STAGE_TTL / 4),
                                     name="meshdns-etcd-stage")
        committed = False
        try:
            # The marker first: a generation without one is garbage to every instance.
            await self._retrying(lambda t: self.client.txn([], [{"request_put": {
                "key": b64(marker), "value": b64(str(len(new))), "lease": str(lease)}}],
                attempt_timeout=t), until)
            if plan.held:
                hold = await self._retrying(
                    lambda t: self.client.lease_grant(self.hold_ttl, attempt_timeout=t), until)
                keepalive.cancel()
                keepalive = loop.create_task(self._keep_alive(
                    [lease, hold], min(STAGE_TTL, self.hold_ttl) / 4), name="meshdns-etcd-stage")
            ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in plan.puts]
            ops += [{"request_put": {"key": b64(k), "value": b64(v), "lease": str(hold)}}
                    for k, v in plan.held]
            sizes = [len(k) + len(v) + 24 for k, v in plan.puts + plan.held]
            await self._stage(ops, sizes)
            compare = [self._guard(write_rev),
                       {"key": b64(marker), "target": "CREATE", "result": "GREATER",
                        "create_revision": "0"}]
            if plan.held:
                # A whole hold from the commit on; and the hold lease still there (its
                # claims go together: one of them standing means all of them do).
                with contextlib.suppress(EtcdUnavailable, EtcdError):
                    await self.client.lease_keepalive(hold)
                compare.append({"key": b64(plan.held[0][0]), "target": "CREATE",
                                "result": "GREATER", "create_revision": "0"})
            revision_key = b64(self.mirror.revision_key)
            success = [{"request_put": {"key": revision_key, "value": b64(root)}}]
            failure = [{"request_range": {"key": revision_key}}]
            answer = await self._retrying(
                lambda t: self.client.txn(compare, success, failure, attempt_timeout=t),
                loop.time() + self.write_timeout)
            committed = bool(answer.get("succeeded"))
            took = loop.time() - started
            if committed:
                log.info("etcd: committed generation %s: %d services, %d keys staged in "
                         "%.1f s", gen_id, len(new), len(ops), took)
            else:
                seen = _failure_revision(answer)
                log.info("etcd: generation %s not committed after %.1f s: %s", gen_id, took,
                         f"another write committed first (revision {seen})" if seen >
                         write_rev else "its staging or hold lease ran out")
            return answer
        finally:
            keepalive.cancel()
            # Whatever happened, the lease goes (the marker with it): committed, the old
            # generation is garbage; not, this one is (deleted only once its marker is gone).
            self._background(self._after_staging(lease, old_root if committed else None))

    async def _stage(self, ops: list[dict[str, Any]], sizes: list[int]) -> None:
        """Put ``ops`` in transactions of at most max_ops operations and max_bytes,
        STAGE_PARALLEL at a time; each one retried on the others when a member fails."""
        chunks: list[list[dict[str, Any]]] = []
        current: list[dict[str, Any]] = []
        size = 0
        for op, n in zip(ops, sizes, strict=True):
            if current and (len(current) >= self.max_ops or size + n > self.max_bytes - 256):
                chunks.append(current)
                current, size = [], 0
            current.append(op)
            size += n
        if current:
            chunks.append(current)
        loop = asyncio.get_running_loop()
        pending = iter(chunks)

        async def worker() -> None:
            for chunk in pending:
                await self._retrying(
                    lambda t, c=chunk: self.client.txn([], c, attempt_timeout=t),  # type: ignore[misc]
                    loop.time() + self.write_timeout, first=self.client.request_timeout)

        workers = [loop.create_task(worker()) for _ in range(STAGE_PARALLEL)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _keep_alive(self, leases: list[int], every: float) -> None:
        while True:
            await asyncio.sleep(every)
            for lease in leases:
                with contextlib.suppress(EtcdUnavailable, EtcdError, aiohttp.ClientError,
                                         TimeoutError, OSError, ValueError):
                    await self.client.lease_keepalive(lease)

    async def _after_staging(self, lease: int, moved_from: str | None) -> None:
        with contextlib.suppress(EtcdUnavailable, EtcdError):
            await self.client.lease_revoke(lease)
        if moved_from is not None:  # the old generation is garbage once listed away from
            await self.mirror.wait_until(lambda: self.mirror.root != moved_from,
                                         STAGED_APPLY_WAIT)
        await self.collect_garbage()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name="meshdns-etcd-gc")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def collect_garbage(self) -> int:
        """Delete every generation that is neither the registry nor being written (its
        writer's marker gone), and the keys right under the prefix once the registry
        moved to a generation. Returns how many generations were deleted. Any instance
        may run it at any time: each delete compares that its generation is not current."""
        if self.mirror.state is None or not self.mirror.written:
            return 0
        current = self.mirror.root
        base = self.prefix + GENERATIONS
        start, end = base.encode(), prefix_end(base.encode())
        ids: list[str] = []
        try:
            while len(ids) < GC_MAX:  # one request per generation present (usually 0-1)
                doc = await self.client.range(start, end, limit=1, keys_only=True)
                kvs = doc.get("kvs") or []
                if not kvs:
                    break
                gen_id = unb64(kvs[0].get("key")).decode("utf-8", "replace")[len(base):]
                gen_id = gen_id.split("/", 1)[0]
                ids.append(gen_id)
                start = (base + gen_id + "0").encode()  # "0" sorts right after "/"
            deleted = 0
            for gen_id in ids:
                root = generation_root(gen_id)
                marker = self.prefix + STAGING + gen_id
                if root == current or (await self.client.range(marker.encode())).get("kvs"):
                    continue  # the registry, or being written
                if await self._delete_root(root, marker):
                    deleted += 1
                    self.collected += 1
            if current:
                await self._delete_root("", None)
            return deleted
        except (EtcdUnavailable, EtcdError) as exc:
            log.info("etcd: garbage collection stopped: %s", exc)
            return 0

    async def _delete_root(self, root: str, marker: str | None) -> bool:
        """Delete a generation's keys, a page at a time, each page only if the revision
        key names another generation (and its marker is gone)."""
        guard: list[dict[str, Any]] = [
            {"key": b64(self.mirror.revision_key), "target": "VALUE", "result": "NOT_EQUAL",
             "value": b64(root)}]
        if marker is not None:
            guard.append({"key": b64(marker), "target": "CREATE", "result": "EQUAL",
                          "create_revision": "0"})
        firsts = [self.prefix + root] if root else [
            self.prefix + SERVICES, self.prefix + MESHSERVICES, self.prefix + VIPS]
        for first in firsts:
            start = first.encode()
            end = prefix_end(start)
            while True:
                doc = await self.client.range(start, end, limit=GC_PAGE, keys_only=True)
                kvs = doc.get("kvs") or []
                if not kvs:
                    break
                last = unb64(kvs[-1].get("key")) + b"\0"
                answer = await self.client.txn(guard, [{"request_delete_range": {
                    "key": b64(start), "range_end": b64(last)}}])
                if not answer.get("succeeded"):
                    return False
        return True


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
        yield CounterMetricFamily("meshdns_etcd_write_nospace", "Writes answered 507: etcd "
                                  "raised its NOSPACE alarm (quota reached).",
                                  value=self.backend.nospace)
        yield CounterMetricFamily("meshdns_etcd_generations_collected", "Generations "
                                  "deleted as garbage (a large write that lost or died).",
                                  value=self.backend.collected)
        yield CounterMetricFamily("meshdns_etcd_bad_keys",
                                  "Keys under the prefix skipped as unreadable.",
                                  value=mirror.bad_keys)
