"""The live registry: applies writes, persists them, and swaps what DNS answers from.

Order of a write: compute the new snapshot (pure core; may reject), make it
durable (state file: temp, fsync, rename, fsync dir), then publish it (new
Zone into the resolver, listeners called). The caller acknowledges only after
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
import errno
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .core.patch import apply_patch
from .core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceKey,
    ServiceSpec,
    apply_put,
    parse_services,
    restore,
)
from .core.resolver import Resolver
from .core.service import add_meta
from .core.vip import format_ip, parse_ip
from .core.zone import Zone, ZoneSettings
from .gcpause import gc_paused
from .history import ChangeHistory

log = logging.getLogger("meshdns.registry")

STATE_FORMAT = 1


class StateError(RuntimeError):
    """The state file exists but cannot be trusted: start-up stops."""


# The storage itself failed (full, over quota, file too large, I/O error): 507, a
# condition the operator fixes on the volume, unlike a wrong path or mode (500).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class StateWriteError(OSError):
    """A write could not be made durable. Nothing changed: what was half-written was
    rolled back, the write is not acknowledged and DNS keeps the previous registry."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code or errno.EIO, message)
        self.message = message

    @property
    def status(self) -> int:
        return 507 if self.errno in STORAGE_ERRNOS else 500


class RegistryStore:
    def __init__(self, policy: RegistryPolicy, settings: ZoneSettings, resolver: Resolver,
                 state_file: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.settings = settings
        self.resolver = resolver
        self.state_file = Path(state_file) if state_file else None
        self.clock = clock
        self.registry = resolver.zone.registry
        self.loaded = False
        # Until a registry is loaded DNS must not deny mesh names (SERVFAIL, not NXDOMAIN).
        resolver.set_zone(Zone(self.registry, settings, loaded=False))
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

    def _compute(self, compute: Callable[[Registry], Registry], base: Registry) -> Registry:
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
                    check: Callable[[Registry], None] | None = None) -> Registry:
        """Compute, persist and publish one write without blocking the event loop.

        ``compute(base)`` is pure (it may raise RegistryError, nothing changes
        then) and runs in a worker thread, as does the state file write. Writes
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
                new = await asyncio.to_thread(self._compute, compute, base)
                if self.registry is not base:
                    continue
                if not self._changes(base, new, mirror):
                    self.registry = new
                    return new
                await asyncio.to_thread(self.persist, new, mirror, base)
                if self.registry is not base:
                    continue  # pragma: no cover - a synchronous writer raced the fsync
                self.mirror = mirror
                self.publish(new)
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
                journal.append(entry)
                return
        try:
            write_state(state_file, reg, mirror)
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
        self.resolver.set_zone(Zone(self.registry, settings, loaded=self.loaded))

    def publish(self, reg: Registry) -> None:
        previous = self.registry if self.loaded else None
        self.history.record(previous, reg)  # before the listeners wake long-polls
        self.registry = reg
        self.resolver.set_zone(Zone(reg, self.settings))
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
            try:
                reg, self.mirror = read_state_file(self.state_file, self.policy, self.clock())
            except StateError as exc:
                if not replica:
                    raise
                return self._set_aside(self.state_file, exc)
            if self.journal is not None:
                self.journal.refresh()  # marks it damaged if a torn tail could not be cut
            self.publish(reg)
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


def load_seed(path: str) -> list[ServiceSpec]:
    from .config import load_document  # the one YAML reader lives in config.py

    try:
        doc = load_document(path)
    except (OSError, ValueError) as exc:
        raise StateError(f"seed file {path}: cannot be read: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("services", [])
    try:
        return parse_services(doc, consume=True)
    except RegistryError as exc:
        raise StateError(f"seed file {path}: {exc.field}: {exc.message}") from None


# ---------------------------------------------------------------- state file

# Addresses go through socket rather than ipaddress: ~10x faster, which matters
# when a 100k-service registry is serialised on every write and every GET.


def fast_ip4(vip: int) -> str:
    return socket.inet_ntoa(vip.to_bytes(4, "big"))


def fast_ip6(vip: int) -> str:
    if vip >> 48 == 0:  # ::/80 (IPv4-mapped, -compatible): glibc prints a dotted tail
        return format_ip(vip, 6)
    return socket.inet_ntop(socket.AF_INET6, vip.to_bytes(16, "big"))


def state_document(reg: Registry, mirror: bool = False) -> dict[str, Any]:
    services = [_record(s) for s in reg.services.values()]

    def held(table: Any, fmt: Callable[[int], str]) -> list[list[Any]]:
        return [[fmt(v), t, list(k)] for v, (t, k) in table.items()]

    doc: dict[str, Any] = {"format": STATE_FORMAT, "revision": reg.revision,
                           "services": services,
                           "held": {"ipv4": held(reg.held4, fast_ip4), "ipv6": held(reg.held6, fast_ip6)}}
    if mirror:
        doc["mirror"] = True
    return doc


class SnapshotNotDurable(OSError):
    """The new snapshot was renamed into place but its directory could not be fsynced."""


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_state(path: Path, reg: Registry, mirror: bool = False) -> None:
    """Durably replace ``path``: a crash leaves either the old or the new file, whole.

    Temp file in the same directory, fsync it, rename over the old one (atomic
    on POSIX), then fsync the directory so the rename itself survives a power cut.
    """
    with gc_paused():  # 100k short-lived dicts: nothing for the collector to find
        data = json.dumps(state_document(reg, mirror), separators=(",", ":")).encode()
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:  # start-up removes it; the write's own error matters more
            log.warning("could not remove %s after a failed state write (%s)", tmp, exc)
        raise
    try:
        _fsync_dir(path)
    except OSError as exc:
        raise SnapshotNotDurable(exc.errno, exc.strerror) from exc


def remove_stale_temp_files(path: Path) -> None:
    """Temp files a crash left behind mid-write: never read, so just litter."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        for stale in directory.glob(_temp_prefix(path) + "*.tmp"):
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted state write", stale)
    except OSError:
        pass  # an unreadable directory shows up, clearly, when the state file is read


def _allocated(path: Path, item: dict[str, Any], field: str, version: int) -> int:
    """An address this server allocated and saved: it must read back as one. Were it
    re-allocated instead, the service would silently move to a new VIP."""
    value = item.get(field)
    vip = parse_ip(value, version) if isinstance(value, str) else None
    if vip is None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise StateError(
            f"state file {path} is corrupt: service {item.get('name')!r} namespace "
            f"{item.get('namespace')!r} port {item.get('port')!r}: field {field} must be an "
            f"IPv{version} address, got {shown}; refusing to start with an empty registry: "
            "fix or remove it")
    return vip


def read_state(path: Path, policy: RegistryPolicy, now: float) -> Registry:
    return read_state_file(path, policy, now)[0]


def read_state_file(path: Path, policy: RegistryPolicy, now: float) -> tuple[Registry, bool]:
    """The saved registry and whether it is a follower's mirror, or StateError.

    Anything unexpected stops start-up: serving an empty (or partial) registry
    after a restart would silently take every mesh name away, and overwriting
    the file would destroy the operator's chance to recover it.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StateError(f"state file {path} cannot be read ({exc.strerror}); refusing to "
                         "start with an empty registry: fix or remove it") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        what = "is empty" if not data.strip() else f"is truncated or corrupt ({exc})"
        raise StateError(f"state file {path} {what}; refusing to start with an empty "
                         "registry: fix or remove it") from None
    try:
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown format, expected {{\"format\": {STATE_FORMAT}, ...}}")
        revision = doc["revision"]
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise ValueError("bad revision")
        mirror = doc.get("mirror", False) is True
        if mirror:
            # A follower's copy: every VIP is the leader's, nothing is allocated here.
            policy = replace(policy, range6=None)
        if not isinstance(doc["services"], list):
            raise ValueError("services is not a list")
        revision = replay_journal(doc, journal_path(path))
        raw = doc["services"]
        allocated: dict[ServiceKey, tuple[int | None, int | None]] = {}
        plain = []
        for item in raw:
            entry = {k: item.get(k) for k in ("name", "namespace", "port", "hostnames")}
            for k in ("labels", "mesh", "zone"):  # only in the records that have them
                if k in item:
                    entry[k] = item[k]
            entry["vip"] = item["vip"] if item.get("vip_given") else None
            entry["vip6"] = item.get("vip6") if item.get("vip6_given") else None
            plain.append(entry)
            v4 = None if item.get("vip_given") else _allocated(path, item, "vip", 4)
            v6 = None if item.get("vip6_given") or item.get("vip6") is None \
                else _allocated(path, item, "vip6", 6)
            allocated[(item["name"], item["namespace"], item["port"])] = (v4, v6)
        raw.clear()  # the decoded rows: the peak of a 1M-service start-up is lower without
        specs = parse_services(plain, consume=True)

        def held(rows: list[list[Any]], version: int) -> dict[int, tuple[float, ServiceKey]]:
            out = {}
            for ip, t, k in rows:
                vip = parse_ip(ip, version)
                if vip is None:
                    raise ValueError(f"bad held address {ip!r}")
                out[vip] = (float(t), (str(k[0]), str(k[1]), int(k[2])))
            return out

        held_doc = doc.get("held", {})
        reg = restore(revision, specs, allocated, policy,
                      held(held_doc.get("ipv4", []), 4), held(held_doc.get("ipv6", []), 6), now)
        return reg, mirror
    except RegistryError as exc:
        raise StateError(f"state file {path} does not fit the current config: "
                         f"{exc.field}: {exc.message}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise StateError(f"state file {path} is corrupt ({exc!r}); refusing to start with an "
                         "empty registry: fix or remove it") from None


# ---------------------------------------------------------------- journal
#
# A PATCH of one service in a 100k-service registry must not rewrite a 10 MB
# state file. Each write appends one line to ``<state_file>.journal`` holding
# what changed (services upserted and deleted, hold-down entries set and
# cleared), fsynced before the write is acknowledged. Start-up replays the
# lines newer than the snapshot; a torn last line was never acknowledged and is
# cut off. When the journal grows past JOURNAL_MAX_ENTRIES or half the
# snapshot's size, the next write is a snapshot and the journal starts empty.
#
# An append that fails (ENOSPC, EIO) may have written part of its line: the file
# is cut back to its length before the append and fsynced, so the next append
# starts on a line boundary. If even that fails, the journal is marked damaged
# and every write is refused until the cut succeeds: an append onto a torn line
# would turn an acknowledged write into a corrupt middle line.

JOURNAL_MAX_ENTRIES = 1000


def journal_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".journal")


def _record(s: Any) -> dict[str, Any]:
    out = {"name": s.name, "namespace": s.namespace, "port": s.port, "vip": fast_ip4(s.vip),
            "vip6": None if s.vip6 is None else fast_ip6(s.vip6),
            "hostnames": list(s.hostnames), "vip_given": s.vip_given,
            "vip6_given": s.vip6_given}
    return add_meta(out, s)  # labels, mesh, zone: only when set


def _held_diff(old: Any, new: Any, fmt: Callable[[int], str]) -> dict[str, Any]:
    return {"set": [[fmt(v), t, list(k)] for v, (t, k) in new.items() if old.get(v) != (t, k)],
            "clear": [fmt(v) for v in old if v not in new]}


def journal_entry(base: Registry, new: Registry) -> dict[str, Any] | None:
    """What ``new`` changes relative to ``base`` (unchanged services cost a compare);
    None when that is a large part of the registry: a snapshot is the better write."""
    old_services, services = base.services, new.services
    delta = new._delta
    written: Collection[ServiceKey]
    deleted: Collection[ServiceKey]
    if delta is not None and delta[:2] == (base.revision, len(old_services)):
        # An incremental PATCH of this very snapshot says which keys it touched.
        written, deleted = delta[2], delta[3]
    else:
        written, deleted = services.keys(), old_services.keys()
    changed = [s for k in written if (s := services.get(k)) is not None
               and (o := old_services.get(k)) is not s and o != s]
    delete = [list(k) for k in deleted if k not in services and k in old_services]
    if len(changed) + len(delete) > max(1000, len(services) // 10):
        return None
    upsert = [_record(s) for s in changed]
    return {"revision": new.revision, "upsert": upsert, "delete": delete,
            "held4": _held_diff(base.held4, new.held4, fast_ip4),
            "held6": _held_diff(base.held6, new.held6, fast_ip6)}


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = 0
        self.size = 0
        self.snapshot_size = 0
        # The length to cut the file back to, while a failed append's rollback is
        # still owed; None when the file ends on a whole line.
        self.damaged_at: int | None = None
        self.dir_pending = False  # created, but its directory entry not yet fsynced

    def refresh(self) -> None:
        """Count what the journal holds (after start-up replayed it)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.entries, self.size = data.count(b"\n"), len(data)
        if data and not data.endswith(b"\n"):  # replay could not cut its torn tail
            self.damaged_at = self.size = data.rfind(b"\n") + 1

    def has_room(self, services: int) -> bool:
        # Half the snapshot, estimated at ~150 bytes a service, and at least 1 MiB.
        limit = max(1 << 20, services * 75)
        return self.entries < JOURNAL_MAX_ENTRIES and self.size < limit

    def append(self, entry: dict[str, Any]) -> None:
        """One fsynced line, or OSError with the file as it was before."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        self.repair()
        new_entry = self.dir_pending or not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            good = os.fstat(fd).st_size  # whole lines only: repair() saw to that
            try:
                view = memoryview(line)
                while view:  # a nearly full disk takes part of a write, then says ENOSPC
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if new_entry:
                    _fsync_dir(self.path)
            except OSError as exc:
                self.dir_pending = new_entry
                self._roll_back(fd, good, exc)
                raise
        finally:
            os.close(fd)
        self.dir_pending = False
        self.entries += 1
        self.size = good + len(line)

    def _roll_back(self, fd: int, good: int, cause: OSError) -> None:
        try:
            os.ftruncate(fd, good)
            os.fsync(fd)
        except OSError as exc:
            self.damaged_at = good
            log.error("state journal %s: a failed append (%s) could not be rolled back (%s); "
                      "refusing writes until it can be cut back to %d bytes", self.path,
                      cause.strerror or cause, exc.strerror or exc, good)
        else:
            log.warning("state journal %s: a failed append (%s) was rolled back to %d bytes",
                        self.path, cause.strerror or cause, good)

    def repair(self) -> None:
        """Cut off what a failed append left, or StateWriteError: no write may go on."""
        good = self.damaged_at
        if good is None:
            return
        try:
            _truncate(self.path, good)
        except FileNotFoundError:
            pass  # removed by hand: nothing left to cut
        except OSError as exc:
            raise StateWriteError(exc.errno, f"the state journal {self.path} still holds part "
                                  f"of a failed write and cannot be cut back ({exc.strerror or exc}); "
                                  "refusing writes until it can, nothing changed") from exc
        log.info("state journal %s: cut back to %d bytes; writes resume", self.path, good)
        self.damaged_at = None
        self.size = good

    def reset(self) -> None:
        if self.path.exists():
            with open(self.path, "wb") as f:
                f.flush()
                os.fsync(f.fileno())
        self.entries = self.size = 0
        self.damaged_at = None


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _cut_torn_tail(path: Path, good: int, torn: int) -> None:
    log.warning("dropping a torn last line of %s (%d bytes without a newline: a write that "
                "was never acknowledged)", path, torn)
    try:
        _truncate(path, good)
    except OSError as exc:
        # Start-up goes on without the line; the store refuses writes until the cut
        # succeeds (Journal.refresh sees the tail), so nothing is appended onto it.
        log.error("could not cut the torn last line off %s (%s)", path, exc.strerror or exc)


def replay_journal(doc: dict[str, Any], path: Path) -> int:
    """Apply the journal's lines newer than the snapshot to ``doc``; the final revision.

    A last line without its newline is a write that was cut short before it was
    acknowledged (even if what it holds parses): it is dropped and cut off the
    file so later appends start clean. A bad line anywhere else, including a last
    one with its newline, is corruption: ValueError.
    """
    revision = int(doc["revision"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return revision
    lines = data.split(b"\n")
    good = 0  # bytes of the journal that are whole, parsed lines
    entries: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last:
            if line:
                _cut_torn_tail(path, good, len(line))
            break
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
                raise ValueError("not a journal entry")
        except ValueError as exc:
            raise ValueError(f"journal {path} line {i + 1} is corrupt: {exc}") from None
        entries.append(entry)
        good += len(line) + 1
    if not entries:
        return revision
    services = {(r["name"], r["namespace"], r["port"]): r for r in doc["services"]}
    held = doc.setdefault("held", {})
    tables = {fam: {row[0]: row for row in held.get(fam, [])} for fam in ("ipv4", "ipv6")}
    for entry in entries:
        if entry["revision"] <= revision:
            continue  # already in the snapshot (a crash between snapshot and journal reset)
        for key in entry["delete"]:
            services.pop(tuple(key), None)
        for record in entry["upsert"]:
            services[(record["name"], record["namespace"], record["port"])] = record
        for fam, diff in (("ipv4", entry["held4"]), ("ipv6", entry["held6"])):
            for ip in diff["clear"]:
                tables[fam].pop(ip, None)
            for row in diff["set"]:
                tables[fam][row[0]] = row
        revision = entry["revision"]
    doc["services"] = list(services.values())
    doc["held"] = {fam: list(rows.values()) for fam, rows in tables.items()}
    doc["revision"] = revision
    return revision
