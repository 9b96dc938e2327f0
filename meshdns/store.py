"""The live registry: applies writes, persists them, and swaps what DNS answers from.

Order of a write: compute the new snapshot (pure core; may reject), make it
durable (state file: temp, fsync, rename, fsync dir), then publish it (new
Zone into the resolver, waiters woken). The caller acknowledges only after
``put``/``patch`` returned, so an acknowledged write is both durable and what
DNS already answers from (read-your-writes).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
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
        return self._commit(reg, force=True)

    def _commit(self, new: Registry, force: bool = False) -> Registry:
        if new.revision == self.registry.revision and not force and self.loaded:
            # Nothing changed: keep the revision, but the hold-down table may have moved.
            self.registry = new
            return new
        if self.state_file is not None:
            write_state(self.state_file, new)
        self.publish(new)
        return new

    def publish(self, reg: Registry) -> None:
        self.registry = reg
        self.resolver.set_zone(Zone(reg, self.settings))
        self.loaded = True
        self.last_update = time.time()
        for listener in list(self.listeners):
            listener(reg)

    # ------------------------------------------------------------ start-up

    def load_initial(self, seed_file: str | None) -> str:
        """State file if present, else the seed file, else empty. Says which."""
        if self.state_file is not None and self.state_file.exists():
            reg = read_state(self.state_file, self.policy, self.clock())
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


def state_document(reg: Registry) -> dict[str, Any]:
    services = []
    for svc in reg.services.values():
        item = svc.to_json()
        item["vip_given"] = svc.vip_given
        item["vip6_given"] = svc.vip6_given
        services.append(item)

    def held(table: Any, version: int) -> list[list[Any]]:
        return [[format_ip(v, version), t, list(k)] for v, (t, k) in table.items()]

    return {"format": STATE_FORMAT, "revision": reg.revision, "services": services,
            "held": {"ipv4": held(reg.held4, 4), "ipv6": held(reg.held6, 6)}}


def write_state(path: Path, reg: Registry) -> None:
    """Durably replace ``path``: a crash leaves either the old or the new file, whole."""
    data = json.dumps(state_document(reg), separators=(",", ":")).encode()
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
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
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: Path, policy: RegistryPolicy, now: float) -> Registry:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {path} is unreadable or corrupt ({exc}); refusing to "
                         "start with an empty registry: fix or remove it") from None
    try:
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError("unknown format")
        revision = doc["revision"]
        if not isinstance(revision, int) or revision < 0:
            raise ValueError("bad revision")
        raw = doc["services"]
        specs: list[ServiceSpec] = []
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
        return restore(revision, specs, allocated, policy,
                       held(held_doc.get("ipv4", []), 4), held(held_doc.get("ipv6", []), 6), now)
    except RegistryError as exc:
        raise StateError(f"state file {path} does not fit the current config: "
                         f"{exc.field}: {exc.message}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StateError(f"state file {path} is corrupt ({exc!r}); refusing to start with an "
                         "empty registry: fix or remove it") from None
