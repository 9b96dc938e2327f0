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
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceKey,
    ServiceSpec,
    apply_patch,
    apply_put,
    parse_services,
    restore,
)
from .core.resolver import Resolver
from .core.vip import format_ip, parse_ip
from .core.zone import Zone, ZoneSettings

log = logging.getLogger("meshdns.registry")

STATE_FORMAT = 1


class StateError(RuntimeError):
    """The state file exists but cannot be trusted: start-up stops."""


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
        self.last_update = 0.0  # wall time of the last published change
        self.listeners: list[Callable[[Registry], None]] = []
        # A mirror holds a registry pulled from a leader (follower mode): every VIP
        # was given by the leader, none is allocated here, not even a missing vip6.
        self.mirror = False
        self._lock: asyncio.Lock | None = None

    @property
    def revision(self) -> int:
        return self.registry.revision

    # ------------------------------------------------------------ writes

    def put(self, specs: Sequence[ServiceSpec]) -> Registry:
        return self._commit(apply_put(self.registry, specs, self.policy, self.clock()))

    def patch(self, upserts: Sequence[ServiceSpec], deletes: Iterable[ServiceKey]) -> Registry:
        return self._commit(apply_patch(self.registry, upserts, deletes, self.policy,
                                        self.clock()))

    def replace_snapshot(self, reg: Registry) -> Registry:
        """Adopt a snapshot computed elsewhere (a follower's pull), persisting it first."""
        return self._commit(reg, mirror=True)

    def _commit(self, new: Registry, mirror: bool = False) -> Registry:
        if not self._changes(self.registry, new, mirror):
            # Nothing changed: keep the revision, but the hold-down table may have moved.
            self.registry = new
            return new
        self.persist(new, mirror)
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
                new = await asyncio.to_thread(compute, base)
                if self.registry is not base:
                    continue
                if not self._changes(base, new, mirror):
                    self.registry = new
                    return new
                await asyncio.to_thread(self.persist, new, mirror)
                if self.registry is not base:
                    continue  # pragma: no cover - a synchronous writer raced the fsync
                self.mirror = mirror
                self.publish(new)
                return new

    def persist(self, reg: Registry, mirror: bool = False) -> None:
        if self.state_file is not None:
            write_state(self.state_file, reg, mirror)

    def publish(self, reg: Registry) -> None:
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

    def load_initial(self, seed_file: str | None) -> str:
        """State file if present, else the seed file, else empty. Says which."""
        if self.state_file is not None:
            remove_stale_temp_files(self.state_file)
        if self.state_file is not None and self.state_file.exists():
            reg, self.mirror = read_state_file(self.state_file, self.policy, self.clock())
            self.publish(reg)
            return f"state file {self.state_file} (revision {reg.revision})"
        if seed_file:
            specs = load_seed(seed_file)
            try:
                reg = apply_put(Registry.empty(), specs, self.policy, self.clock())
            except RegistryError as exc:
                raise StateError(f"seed file {seed_file}: {exc.field or ''}: {exc.message}") \
                    from None
            if self.state_file is not None:
                write_state(self.state_file, reg)
            self.publish(reg)
            return f"seed file {seed_file}"
        return "empty registry"


def load_seed(path: str) -> list[ServiceSpec]:
    from .config import load_document  # the one YAML reader lives in config.py

    try:
        doc = load_document(path)
    except (OSError, ValueError) as exc:
        raise StateError(f"seed file {path}: cannot be read: {exc}") from None
    if isinstance(doc, dict):
        doc = doc.get("services", [])
    try:
        return parse_services(doc)
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
    services = [
        {"name": s.name, "namespace": s.namespace, "port": s.port, "vip": fast_ip4(s.vip),
         "vip6": None if s.vip6 is None else fast_ip6(s.vip6), "hostnames": list(s.hostnames),
         "vip_given": s.vip_given, "vip6_given": s.vip6_given}
        for s in reg.services.values()
    ]

    def held(table: Any, fmt: Callable[[int], str]) -> list[list[Any]]:
        return [[fmt(v), t, list(k)] for v, (t, k) in table.items()]

    doc: dict[str, Any] = {"format": STATE_FORMAT, "revision": reg.revision,
                           "services": services,
                           "held": {"ipv4": held(reg.held4, fast_ip4), "ipv6": held(reg.held6, fast_ip6)}}
    if mirror:
        doc["mirror"] = True
    return doc


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def write_state(path: Path, reg: Registry, mirror: bool = False) -> None:
    """Durably replace ``path``: a crash leaves either the old or the new file, whole.

    Temp file in the same directory, fsync it, rename over the old one (atomic
    on POSIX), then fsync the directory so the rename itself survives a power cut.
    """
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(path: Path) -> None:
    """Temp files a crash left behind mid-write: never read, so just litter."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        for stale in directory.glob(_temp_prefix(path) + "*.tmp"):
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted state write", stale)
    except OSError:
        pass  # an unreadable directory shows up, clearly, when the state file is read


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
        raw = doc["services"]
        if not isinstance(raw, list):
            raise ValueError("services is not a list")
        allocated: dict[ServiceKey, tuple[int | None, int | None]] = {}
        plain = []
        for item in raw:
            entry = {k: item.get(k) for k in ("name", "namespace", "port", "hostnames")}
            entry["vip"] = item["vip"] if item.get("vip_given") else None
            entry["vip6"] = item.get("vip6") if item.get("vip6_given") else None
            plain.append(entry)
            v4 = None if item.get("vip_given") else parse_ip(item["vip"], 4)
            v6 = None if item.get("vip6_given") or not item.get("vip6") \
                else parse_ip(item["vip6"], 6)
            allocated[(item["name"], item["namespace"], item["port"])] = (v4, v6)
        specs = parse_services(plain)

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
