"""The local copy of the registry in etcd: list the prefix at revision R, watch from R+1.

Every instance answers DNS and GET /v1/services from its own copy (the store),
never from etcd per query. A watch response is applied in O(change) with the
core's incremental PATCH, VIPs as stored (nothing is allocated here). When the
watch reports that etcd compacted the revisions it still needed, the prefix is
listed again and the copy replaced: nothing is lost, only re-read.

Fail static: while etcd is unreachable the copy stays as it is and keeps being
served; ``last_success`` (a heartbeat that found etcd answering and the watch
caught up) tells /readyz and the metrics how old it is, and the log says so.

A prefix never written (layout.py: no ``revision`` key, no service) holds no
registry: the store stays unloaded (mesh names SERVFAIL, /readyz 503; a copy from
the state file, if any, is served as it is), and a WARNING asks whether the prefix
is right, again every UNWRITTEN_LOG_EVERY while it stays so. The watch event of
the first write is not applied onto nothing: the prefix is listed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..core.registry import Registry, RegistryError, RegistryPolicy
from ..store import RegistryStore
from .client import EtcdClient, EtcdError, EtcdUnavailable, num, prefix_end, unb64
from .layout import (
    MESHSERVICES,
    REVISION,
    SERVICES,
    VIPS,
    Changes,
    LayoutError,
    Listing,
    apply_delta,
    apply_delta_quick,
    build_snapshot,
    decode_events,
    decode_listing,
    root_of,
)

log = logging.getLogger("meshdns.etcd")

# Events in one watch response decoded and applied on the event loop (O(change) work,
# cheaper than the thread hops); a larger response goes to a worker thread.
QUICK_EVENTS = 64


class SyncError(Exception):
    """The watch ended or etcd sent something that cannot be applied: list again."""


class EtcdMirror:
    PAGE = 2000  # keys per range request while listing
    HEARTBEAT = 2.0  # seconds between checks that etcd answers and the copy is current
    BACKOFF_FIRST = 0.1
    BACKOFF_MAX = 5.0
    OUTAGE_LOG_EVERY = 60.0
    UNWRITTEN_LOG_EVERY = 300.0  # seconds between reminders that the prefix is unwritten

    def __init__(self, store: RegistryStore, policy: RegistryPolicy, client: EtcdClient,
                 prefix: str) -> None:
        self.store = store
        self.policy = policy
        self.client = client
        self.prefix = prefix
        self.revision_key = prefix + REVISION
        self.leader = "etcd " + ",".join(client.endpoints)  # FollowStatus, for /readyz
        self.started_at = time.time()
        self.last_success: float | None = None
        self.connected = False
        # What writes are computed against, set together once a listing was applied:
        # the registry, the revision key's mod_revision, and every claim's mod_revision
        # (that dict is updated in place by each change, _apply says why).
        self.state: tuple[Registry, int, dict[str, int]] | None = None
        # The generation the registry's keys are under (layout.py), set with ``state``
        # (only a listing changes it: a watch event that moves it makes one due).
        self.root = ""
        self.applied = 0  # every event under the prefix up to this etcd revision is applied
        self.relists = 0
        self.apply_errors = 0
        self.bad_keys = 0
        # The prefix holds a registry (layout.py: written); until then the store is left
        # unloaded. Known once a listing was applied (``state`` is set).
        self.written = False
        self._unwritten_logged = 0.0  # wall time of the last "is the prefix right?" line
        self._foreign = ""  # what else the last listing found under the prefix, if anything
        self._watching = False
        self._need_list = True
        self._behind: int | None = None  # revision key seen by the last heartbeat, unapplied
        self._outage_since: float | None = None  # wall time the watch last broke
        self._applying = False  # a watch response is being applied (maybe a big one)
        self._event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def write_revision(self) -> int:
        return self.state[1] if self.state is not None else 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="meshdns-etcd-watch"),
                       loop.create_task(self._heartbeat(), name="meshdns-etcd-heartbeat")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------ waiting

    def _notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()`` (checked after every applied change); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)
        return True

    async def wait_applied(self, revision: int, timeout: float) -> bool:
        """Until the watch applied every change up to ``revision`` (read-your-writes)."""
        return await self.wait_until(lambda: self.applied >= revision, timeout)

    async def wait_newer(self, state: object, write_revision: int, timeout: float) -> bool:
        """Until the copy moved on from ``state`` to at least ``write_revision``."""
        return await self.wait_until(
            lambda: self.state is not state and self.write_revision >= write_revision, timeout)

    # ------------------------------------------------------------ loop

    async def _run(self) -> None:
        attempt = 0
        error: str | None = None
        last_log = 0.0
        while True:
            try:
                if self._need_list:
                    await self.relist()
                attempt = 0
                await self._watch()
                continue  # compacted: list again at once
            except asyncio.CancelledError:
                raise
            except (EtcdUnavailable, EtcdError, SyncError, aiohttp.ClientError, TimeoutError,
                    OSError, ValueError) as exc:
                reason = str(exc) or type(exc).__name__
            self._watching = self.connected = False
            now = time.time()
            if self._outage_since is None:
                self._outage_since = now
            if reason != error or now - last_log > self.OUTAGE_LOG_EVERY:
                last_log = now
                age = f"{now - self.last_success:.0f} s old" if self.last_success \
                    else "not synced with etcd since start"
                serving = f"still serving revision {self.store.revision} " \
                    f"({len(self.store.registry)} services, copy {age})" if self.store.loaded \
                    else "no registry yet, mesh names get SERVFAIL"
                log.warning("etcd: %s; %s; retrying", reason, serving)
            error = reason
            step = min(self.BACKOFF_MAX, self.BACKOFF_FIRST * 2.0 ** min(attempt, 20))
            await asyncio.sleep(step / 2 + random.uniform(0, step / 2))
            attempt += 1

    async def relist(self) -> None:
        """Read the whole registry at one revision and replace the copy with it: the
        revision key (which names the generation), then the keys under its root (the
        whole prefix while there is no revision key: services, and what else is there)."""
        prefix = self.prefix
        doc = await self.client.range(self.revision_key.encode())
        revision = num(doc.get("header", {}).get("revision"))
        head = doc.get("kvs") or []
        try:
            root = root_of(unb64(head[0].get("value"))) if head else ""
        except LayoutError as exc:
            raise SyncError(str(exc)) from None
        ranges = [prefix + root + SERVICES, prefix + root + VIPS] if head else [prefix]
        if head:  # mesh services (docs/meshservice.md section 7), before the services
            ranges.insert(0, prefix + root + MESHSERVICES)
        pages: list[list[dict[str, Any]]] = [head]
        for first in ranges:
            start = first.encode()
            end = prefix_end(start)
            while True:
                doc = await self.client.range(start, end, revision=revision, limit=self.PAGE)
                kvs = doc.get("kvs", [])
                pages.append(kvs)
                if not doc.get("more") or not kvs:
                    break
                start = unb64(kvs[-1]["key"]) + b"\0"
        prefix, policy, now = self.prefix, self.policy, self.store.clock()

        def build() -> tuple[Registry, Listing, dict[str, int], int]:
            # Decoding and building run in a thread: 100k services must not stop DNS.
            entries = ((unb64(kv.get("key")).decode("utf-8", "replace"),
                        unb64(kv.get("value")), num(kv.get("mod_revision")))
                       for kvs in pages for kv in kvs)
            listing, claims, write_rev = decode_listing(prefix, entries, root)
            return build_snapshot(listing, policy, now), listing, claims, write_rev

        try:
            reg, listing, claims, write_rev = await asyncio.to_thread(build)
        except RegistryError as exc:
            self.apply_errors += 1
            raise SyncError(f"the registry in etcd does not fit this instance's config: "
                            f"{exc.field}: {exc.message}") from None
        for bad in listing.bad[:10]:
            log.warning("etcd: skipping %s%s", self.prefix, bad)
        self.bad_keys += len(listing.bad)
        store = self.store
        self.written = listing.written
        if listing.written:
            self._unwritten_logged = 0.0  # should it ever be unwritten again: say so at once
        if not listing.written:
            # No registry in etcd (not even an empty one): nothing to publish. DNS keeps
            # what it had, which before any registry is SERVFAIL for mesh names.
            self._foreign = "" if not listing.foreign else (
                f"; {listing.foreign} other keys are under it (e.g. "
                f"{listing.foreign_example}): is the registry under a longer prefix?")
            self._warn_unwritten()
        elif not store.loaded or reg.revision != store.revision or \
                reg.services != store.registry.services:
            # A new snapshot on disk, never a journal line: etcd may have been rebuilt
            # with lower revisions, and the journal replays only newer ones.
            await asyncio.to_thread(store.persist, reg)
            store.publish(reg)
            # A whole registry just listed, long-lived and acyclic: keep the collector's
            # full passes from rescanning it on every later change (as the follower does).
            gc.freeze()
        else:
            store.registry = reg  # the same registry; the claims (held VIPs) may differ
        self.state = (reg, write_rev, claims)
        self.root = root
        self.applied = revision
        self._need_list = False
        self.relists += 1
        self._synced()
        log.info("etcd: listed %s at revision %d: %d services (registry revision %d%s)",
                 self.prefix, revision, len(reg), reg.revision,
                 f", generation {root}" if root else "")

    def _warn_unwritten(self) -> None:
        """The WARNING that the prefix holds no registry: once per listing, then at most
        every UNWRITTEN_LOG_EVERY while it stays unwritten."""
        now = time.time()
        if self._unwritten_logged and now - self._unwritten_logged < self.UNWRITTEN_LOG_EVERY:
            return
        self._unwritten_logged = now
        store = self.store
        serving = (f"this instance keeps serving the copy it had as it is (revision "
                   f"{store.revision}, {len(store.registry)} services)" if store.loaded else
                   "mesh names get SERVFAIL and /readyz says 503")
        log.warning("etcd: nothing was ever written under registry.etcd.prefix %r on %s (no "
                    "%s key, no services): is the prefix right? Until a first write through "
                    "any instance (a PUT, even of no services), %s%s", self.prefix,
                    ",".join(self.client.endpoints), self.revision_key, serving, self._foreign)

    async def _watch(self) -> None:
        """Read the watch stream in one task, apply in this one: whatever arrived while
        a change was being applied is applied next as one change (one state-file
        write), so a copy that fell behind a burst of writes catches up in a few steps."""
        queue: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue(maxsize=1024)
        start = self.applied + 1

        async def read() -> None:
            try:
                end = prefix_end(self.prefix.encode())
                async for result in self.client.watch(self.prefix.encode(), end, start):
                    await queue.put(result)
                await queue.put(SyncError("the watch stream ended"))
            except Exception as exc:  # handed to the applier, which decides
                await queue.put(exc)

        reader = asyncio.get_running_loop().create_task(read(), name="meshdns-etcd-read")
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if await self._apply_batch(batch):
                    return
        finally:
            # Not watching while the prefix is listed again (the heartbeat must not take
            # a long listing, of a new generation say, for a watch that stays behind).
            self._watching = False
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _apply_batch(self, batch: list[dict[str, Any] | Exception]) -> bool:
        """Apply the events of ``batch`` as one change; True when a re-list is due."""
        events: list[dict[str, Any]] = []
        progress = 0
        stop: Exception | None = None
        relist = False
        for result in batch:
            if isinstance(result, Exception):
                stop = result
                break
            compacted = num(result.get("compact_revision"))
            if compacted:
                log.warning("etcd: revision %d was compacted away (the watch needed %d on); "
                            "listing %s again", compacted, self.applied + 1, self.prefix)
                self._need_list = relist = True
                break
            if result.get("canceled"):
                stop = SyncError(f"watch canceled: {result.get('cancel_reason', '')}")
                break
            if result.get("created"):
                self._watching = self.connected = True
                after = "" if self._outage_since is None else \
                    f" ({time.time() - self._outage_since:.0f} s after it broke)"
                log.info("etcd: watching %s %sfrom revision %d on %s%s", self.prefix,
                         "again " if after else "", self.applied + 1, self.client.watching,
                         after)
                self._outage_since = None
            elif result.get("events"):
                events += result["events"]
            else:  # a progress notification: nothing up to this revision is missing
                progress = max(progress, num(result.get("header", {}).get("revision")))
        if events:
            await self._apply(events)
            relist = relist or self._need_list  # the first write to an unwritten prefix
        if not relist:
            self.applied = max(self.applied, progress)
        self._notify()
        if stop is not None:
            raise stop
        return relist

    async def _apply(self, events: list[dict[str, Any]]) -> None:
        assert self.state is not None
        _, write_rev, claims = self.state
        prefix, root = self.prefix, self.root

        def decode() -> Changes:
            return decode_events(prefix, (
                (unb64(kv.get("key")).decode("utf-8", "replace"),
                 None if event.get("type") == "DELETE" else unb64(kv.get("value")),
                 num(kv.get("mod_revision")))
                for event in events if (kv := event.get("kv", {})) is not None), root)

        # A big transaction (a PUT of thousands) is decoded off the event loop.
        changes = decode() if len(events) <= QUICK_EVENTS else await asyncio.to_thread(decode)
        if not changes.relevant:
            # Another generation's keys (a big write being staged, garbage collected):
            # not the registry; nothing to publish or persist.
            self.applied = max(self.applied, changes.top)
            return
        if changes.root is not None and changes.root != root:
            # A write larger than one transaction committed: the registry is another
            # generation now, read whole (its keys were never applied one by one).
            log.info("etcd: the registry moved to generation %s (revision %d); listing it",
                     changes.root or "(root)", changes.top)
            self._need_list = True
            return
        if not self.written and changes.written:
            # The first write: a registry now exists. Listed whole rather than applied
            # onto nothing (or onto a copy from the state file that etcd never had).
            log.info("etcd: %s was written (revision %d); listing it", self.prefix,
                     changes.top)
            self._need_list = True
            return
        for bad in changes.bad:
            log.warning("etcd: skipping %s%s", self.prefix, bad)
        self.bad_keys += len(changes.bad)
        if not self.written:
            # Keys that are no registry (claims, other prefixes' keys): bookkeeping only;
            # publishing would load the store with a registry that does not exist.
            claims = {k: m for k, m in {**claims, **changes.claims}.items() if m is not None}
            self.state = (self.state[0], write_rev, claims)
            self.applied = max(self.applied, changes.top)
            return
        delta, policy, clock = changes.delta, self.policy, self.store.clock
        self._applying = True
        try:
            # Shielded: a restarted watch must not leave the state file ahead of DNS. A
            # small change is applied on the loop (O(change): a thread hop costs more).
            reg = await asyncio.shield(self.store.write(
                lambda base: apply_delta(base, delta, policy, clock()),
                quick=(lambda base: apply_delta_quick(base, delta, policy, clock()))
                if len(events) <= QUICK_EVENTS else None))
        except RegistryError as exc:
            self.apply_errors += 1
            self._need_list = True
            raise SyncError(f"a change in etcd does not apply to the local copy ({exc.field}: "
                            f"{exc.message})") from None
        finally:
            self._applying = False
        # The claims are updated in place, in O(change) (a copy would be O(registry) per
        # change): a write computing meanwhile may read a claim newer than its base,
        # which only makes its compare match etcd better; the compare decides anyway.
        for key, mod in changes.claims.items():
            if mod is None:
                claims.pop(key, None)
            else:
                claims[key] = mod
        if changes.write_revision is not None:
            write_rev = changes.write_revision
        self.state = (reg, write_rev, claims)
        self.applied = max(self.applied, changes.top)

    def _synced(self) -> None:
        self.connected = True
        self.last_success = time.time()
        self._notify()

    async def _heartbeat(self) -> None:
        """Every HEARTBEAT: a linearizable read of the revision key (from whichever member
        answers). The copy counts as current when the watch is up and has applied what
        etcd had one heartbeat earlier. A watch that stays behind (its member cut off
        from the others keeps the stream open but sends nothing) is restarted, on the
        member that answered the heartbeat."""
        lagging = 0
        while True:
            await asyncio.sleep(self.HEARTBEAT)
            try:
                doc = await self.client.range(self.revision_key.encode())
            except (EtcdUnavailable, EtcdError, aiohttp.ClientError, TimeoutError, OSError,
                    ValueError):
                self.connected = False
                continue
            kvs = doc.get("kvs") or []
            latest = num(kvs[0].get("mod_revision")) if kvs else 0
            if self.state is not None and not self.written:
                self._warn_unwritten()  # a reminder, at most every UNWRITTEN_LOG_EVERY
            if not self._watching or self.state is None or self._applying:
                self._behind = None
                continue
            if self._behind is not None and self.write_revision < self._behind:
                self.connected = False  # the watch has not delivered a whole heartbeat's worth
                lagging += 1
                if lagging >= 2:
                    log.warning("etcd: the watch is behind (revision %d applied, etcd had "
                                "%d); restarting it", self.write_revision, self._behind)
                    self._restart_watch()
                    lagging = 0
            else:
                lagging = 0
                self._synced()
            self._behind = latest if latest > self.write_revision else None

    def _restart_watch(self) -> None:
        if not self._tasks:
            return
        self._tasks[0].cancel()
        self._watching = False
        self._tasks[0] = asyncio.get_running_loop().create_task(self._run(),
                                                                name="meshdns-etcd-watch")
