"""The live registry: applies writes, persists them, and swaps what DNS answers from.

Order of a write: compute the new snapshot (pure core; may reject), make it
durable (state file: temp, fsync, rename, fsync dir), then publish it (new
Zone into the handler, listeners called). The caller acknowledges only after
``put``/``patch`` (or ``write``) returned, so an acknowledged write is both
durable and what DNS already answers from (read-your-writes).

``put``/``patch``/``replace_snapshot`` do all of it synchronously. ``write`` is
the event-loop form the HTTP API and the follower use: the expensive steps
(computing a 100k-service snapshot, serialising and fsyncing it) run in a worker
thread so DNS keeps answering meanwhile, and writes are serialised by a lock.
"""


from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..core.answer import MessageHandler, Zone, ZoneSettings
from ..core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceKey,
    ServiceSpec,
    apply_patch,
    apply_put,
)
from ..gcpause import gc_paused, paused
from ..history import ChangeHistory, changed_keys
from .journal import Journal, journal_entry, journal_path
from .records import StateError, StateWriteError
from .statefile import (
    SnapshotNotDurable,
    load_seed,
    read_state_file,
    remove_stale_temp_files,
    write_state,
)

log = logging.getLogger("meshdns.registry")
R = TypeVar("R", Registry, Registry | None)
THREAD_KEYS = 1000  # a write touching more services finds its changed keys off the loop


class RegistryStore:
    def __init__(self, policy: RegistryPolicy, settings: ZoneSettings, handler: MessageHandler,
                 state_file: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.settings = settings
        self.handler = handler
        self.state_file = Path(state_file) if state_file else None
        self.clock = clock
        self.registry = handler.zone.registry
        self.loaded = False
        # Until a registry is loaded DNS must not deny mesh names (SERVFAIL, not NXDOMAIN).
        handler.set_zone(Zone(self.registry, settings, loaded=False))
        self.last_update = 0.0  # wall time of the last published change
        self.exhausted = 0  # writes rejected because a VIP range was exhausted
        self.state_write_failures = 0  # writes the state file could not take (rolled back)
        # A snapshot was renamed into place but not made durable: what the state file
        # holds is uncertain, so the next write replaces it whole.
        self._snapshot_next = False
        self.listeners: list[Callable[[Registry], None]] = []
        # A mirror holds a registry pulled from a leader (follower mode): every VIP
        # was given by the leader, none is allocated here, not even a missing vip6.
        self.mirror = False
        self._lock: asyncio.Lock | None = None
        self.journal = Journal(journal_path(self.state_file)) if self.state_file else None
        # What each published write changed, for followers that sync by deltas.
        self.history = ChangeHistory()

    @property
    def revision(self) -> int:
        return self.registry.revision

    # ------------------------------------------------------------ writes

    def put(self, specs: Sequence[ServiceSpec]) -> Registry:
        return self._commit(self._compute(
            lambda base: apply_put(base, specs, self.policy, self.clock()), self.registry))

    def patch(self, upserts: Sequence[ServiceSpec], deletes: Iterable[ServiceKey]) -> Registry:
        return self._commit(self._compute(
            lambda base: apply_patch(base, upserts, deletes, self.policy, self.clock()),
            self.registry))

    def _compute(self, compute: Callable[[Registry], R], base: Registry) -> R:
        """Every write's computation goes through here, so rejections can be counted."""
        try:
            with gc_paused():
                return compute(base)
        except RegistryError as exc:
            if exc.status == 507:
                self.exhausted += 1  # meshdns_vip_pool_exhausted_total
            raise

    def replace_snapshot(self, reg: Registry) -> Registry:
        """Adopt a snapshot computed elsewhere (a follower's pull), persisting it first."""
        return self._commit(reg, mirror=True)

    def _commit(self, new: Registry, mirror: bool = False) -> Registry:
        if not self._changes(self.registry, new, mirror):
            # Nothing changed: keep the revision, but the hold-down table may have moved.
            self.registry = new
            return new
        self.persist(new, mirror, self.registry)
        self.mirror = mirror
        self.publish(new)
        return new

    def _changes(self, base: Registry, new: Registry, force: bool) -> bool:
        """Whether ``new`` must be persisted and published. A follower's pull (force)
        compares contents too: a restarted leader may reuse a revision number."""
        if not self.loaded:
            return True
        if force:
            return new.revision != base.revision or new.services != base.services
        return new.revision != base.revision

    async def write(self, compute: Callable[[Registry], Registry], *, mirror: bool = False,
                    check: Callable[[Registry], None] | None = None,
                    quick: Callable[[Registry], Registry | None] | None = None) -> Registry:
        """Compute, persist and publish one write without blocking the event loop.

        ``compute(base)`` is pure (it may raise RegistryError, nothing changes
        then) and runs in a worker thread, as does the state file write;
        ``quick(base)``, when given, is tried first on the loop (O(change) work, or
        None to take the thread). Writes
        through here are serialised; ``check(base)`` runs under the lock first
        (the API's If-Match). Should a synchronous ``put``/``patch`` slip in
        meanwhile, the write is recomputed on top of it, so none is lost.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                base = self.registry
                if check is not None:
                    check(base)
                # A quick computation (a small incremental PATCH) runs on the loop: a
                # thread hop would cost more there behind a busy DNS load. When it
                # cannot be quick (None), the full one goes to a thread as usual.
                new = None if quick is None else self._compute(quick, base)
                if new is None:
                    new = await asyncio.to_thread(self._compute, compute, base)
                if self.registry is not base:
                    continue
                if not self._changes(base, new, mirror):
                    self.registry = new
                    return new
                keys, zone = None, None
                touched = new.touched_since(base)
                if touched is None or len(touched[0]) + len(touched[1]) > THREAD_KEYS:
                    # A whole-registry (or a large) write: what it changed (for the
                    # history) and the zone's name indexes are O(registry) to find, so
                    # not on the DNS loop.
                    keys, zone = await asyncio.to_thread(paused(self._prepare), base, new)
                if self.state_file is not None:  # disk IO stays off the loop
                    await asyncio.to_thread(self.persist, new, mirror, base)
                if self.registry is not base:
                    continue  # pragma: no cover - a synchronous writer raced the fsync
                self.mirror = mirror
                self.publish(new, keys, zone)
                return new

    def persist(self, reg: Registry, mirror: bool = False, base: Registry | None = None) -> None:
        """Make ``reg`` durable: one journal line with what changed since ``base`` when
        that is small, else (and for a follower's whole-registry pulls) a new snapshot.

        On failure (a full disk, EIO) the files are rolled back to what they held
        before and StateWriteError is raised: the caller must not publish ``reg``.
        """
        if self.state_file is None:
            return
        try:
            self._persist(self.state_file, reg, mirror, base)
        except OSError as exc:
            self.state_write_failures += 1  # meshdns_state_write_failures_total
            if isinstance(exc, StateWriteError):
                raise
            if isinstance(exc, SnapshotNotDurable):
                raise StateWriteError(exc.errno, f"the state file {self.state_file} could not "
                                      f"be made durable ({exc.strerror or exc}); the write was "
                                      "not applied and the next one rewrites the file") from exc
            raise StateWriteError(exc.errno, f"the state file {self.state_file} could not be "
                                  f"written ({exc.strerror or exc}); the write was rolled back "
                                  "and nothing changed") from exc

    def _persist(self, state_file: Path, reg: Registry, mirror: bool,
                 base: Registry | None) -> None:
        journal = self.journal
        if journal is not None:
            journal.repair()  # never append onto what an earlier failure left
        # The journal only ever extends a snapshot that exists: without one, replay
        # would have nothing to start from.
        # A follower's copy journals its deltas too, once its snapshot is a mirror's.
        if journal is not None and base is not None and mirror == self.mirror \
                and not self._snapshot_next and journal.has_room(len(reg)) \
                and state_file.exists():
            entry = journal_entry(base, reg)
            if entry is not None:
                if not mirror:
                    entry["lineage"] = self.history.lineage  # as a snapshot names it
                journal.append(entry)
                return
        try:
            # A leader's snapshot names its lineage (a follower's copy is the leader's).
            write_state(state_file, reg, mirror, None if mirror else self.history.lineage)
        except SnapshotNotDurable:
            # The file may hold this unacknowledged revision: a journal line of the
            # next write would carry the same revision and be skipped by replay.
            self._snapshot_next = True
            raise
        self._snapshot_next = False
        if journal is not None:
            try:
                journal.reset()  # the snapshot holds everything the journal did
            except OSError as exc:
                # The write is durable: its snapshot is in place and replay skips
                # journal lines it already holds, so the lines may stay until next time.
                log.warning("state journal %s could not be emptied after a snapshot (%s)",
                            journal.path, exc.strerror or exc)

    def reconfigure(self, settings: ZoneSettings) -> None:
        """Serve the same registry under new zone settings (search list, forwarding)."""
        self.settings = settings
        self.handler.set_zone(Zone(self.registry, settings, loaded=self.loaded))

    def _prepare(self, base: Registry, new: Registry
                 ) -> tuple[tuple[ServiceKey, ...] | None, Zone]:
        """What ``new`` changed since ``base`` (None before the first load), and its zone."""
        keys = changed_keys(base, new) if self.loaded else None
        return keys, Zone(new, self.settings)

    def publish(self, reg: Registry, keys: tuple[ServiceKey, ...] | None = None,
                zone: Zone | None = None) -> None:
        """DNS answers from ``reg`` from now on; ``keys``: what it changed, and ``zone``:
        its zone, when they were prepared off the loop."""
        previous = self.registry if self.loaded else None
        self.history.record(previous, reg, keys)  # before the listeners wake long-polls
        self.registry = reg
        if zone is None or zone.registry is not reg or zone.settings is not self.settings:
            zone = Zone(reg, self.settings)  # (settings reloaded meanwhile: rebuilt here)
        self.handler.set_zone(zone)
        self.loaded = True
        self.last_update = time.time()
        for listener in list(self.listeners):
            try:
                listener(reg)
            except Exception:  # a listener must never undo a published write
                log.exception("registry listener failed")

    # ------------------------------------------------------------ start-up

    def load_initial(self, seed_file: str | None, *, replica: bool = False) -> str:
        """State file if present, else the seed file, else empty. Says which.

        ``replica``: this is a follower, whose state file only copies its leader's
        registry. One that cannot be used is moved aside and the follower starts with
        no registry, to pull it again, rather than refusing to start: a sidecar stuck
        in a restart loop would keep its pod's app from starting.
        """
        if self.state_file is not None:
            remove_stale_temp_files(self.state_file)
        if self.state_file is not None and self.state_file.exists():
            meta: dict[str, Any] = {}
            try:
                reg, self.mirror = read_state_file(self.state_file, self.policy, self.clock(),
                                                   meta)
            except StateError as exc:
                if not replica:
                    raise
                return self._set_aside(self.state_file, exc)
            if self.journal is not None:
                self.journal.refresh()  # marks it damaged if a torn tail could not be cut
            self.publish(reg)
            if not replica and not self.mirror and meta.get("lineage"):
                # The file's last revision (snapshot or journal line) was made in that
                # lineage's last write; this process's (new: two started from one copy
                # must not pass for one) continues it at the revision the file gave back
                # (history.py, ``parent``). Its own writes name its own (_persist).
                self.history.parent = (meta["lineage"], reg.revision)
            return f"state file {self.state_file} (revision {reg.revision})"
        if self.journal is not None:
            self.journal.reset()  # a journal without its snapshot extends nothing
        if seed_file:
            specs = load_seed(seed_file)
            try:
                reg = apply_put(Registry.empty(), specs, self.policy, self.clock())
            except RegistryError as exc:
                raise StateError(f"seed file {seed_file}: {exc.field or ''}: {exc.message}") \
                    from None
            self.persist(reg)
            self.publish(reg)
            return f"seed file {seed_file}"
        return "empty registry"


    def _set_aside(self, path: Path, exc: StateError) -> str:
        for part in (path, journal_path(path)):
            with contextlib.suppress(FileNotFoundError):
                os.replace(part, part.with_name(part.name + ".bad"))
        if self.journal is not None:
            self.journal.reset()
        log.error("%s; it is a follower's copy of the leader's registry: moved aside to "
                  "%s.bad, starting with no registry until the leader answers", exc, path.name)
        return f"no registry (state file {path} was unusable, moved aside)"
