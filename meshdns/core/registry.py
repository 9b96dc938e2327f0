"""The service registry: validated writes in, immutable snapshots out.

A write (a full PUT or a PATCH) is computed against the current snapshot into a
brand-new snapshot, or rejected whole with a :class:`RegistryError`. Nothing is
ever mutated in place, so whoever holds a snapshot (the DNS hot path, an HTTP
reader) sees one consistent registry, and swapping the current snapshot is a
single reference assignment.

The core reads no clock: every call that deals with hold-downs takes ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .names import (
    canonical_name,
    is_rfc1123_label,
    is_subdomain,
    kuma_name,
    normalize_hostname,
)
from .vip import VipRange, format_ip, parse_ip

ServiceKey = tuple[str, str, int]  # (name, namespace, port)

MAX_HOSTNAMES_PER_SERVICE = 256
_SERVICE_FIELDS = frozenset({"name", "namespace", "port", "vip", "vip6", "hostnames"})
_KEY_FIELDS = ("name", "namespace", "port")


class RegistryError(Exception):
    """A write rejected whole. ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


def _bad(message: str, field: str) -> RegistryError:
    return RegistryError(400, message, field)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service as written by a client: VIPs may still be missing."""

    name: str
    namespace: str
    port: int
    vip: int | None = None
    vip6: int | None = None
    hostnames: tuple[str, ...] = ()

    @property
    def key(self) -> ServiceKey:
        return (self.name, self.namespace, self.port)


@dataclass(frozen=True, slots=True)
class Service:
    """A service as served: its IPv4 VIP is always known."""

    name: str
    namespace: str
    port: int
    vip: int
    vip6: int | None
    hostnames: tuple[str, ...]
    # Whether the VIPs were given by the control plane (kept as they are, even
    # outside the CIDR) or allocated here (re-allocated when the CIDR moves away).
    vip_given: bool = False
    vip6_given: bool = False

    @property
    def key(self) -> ServiceKey:
        return (self.name, self.namespace, self.port)

    def to_spec(self) -> ServiceSpec:
        """The write that would reproduce this service, allocated VIPs left open."""
        return ServiceSpec(self.name, self.namespace, self.port,
                           self.vip if self.vip_given else None,
                           self.vip6 if self.vip6_given else None, self.hostnames)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "port": self.port,
            "vip": format_ip(self.vip, 4),
            "vip6": None if self.vip6 is None else format_ip(self.vip6, 6),
            "hostnames": list(self.hostnames),
        }


def describe(key: ServiceKey) -> str:
    return f"{key[0]}.{key[1]}:{key[2]}"


# ---------------------------------------------------------------- input parsing


def _parse_key_fields(item: Mapping[str, Any], path: str) -> ServiceKey:
    name = item.get("name")
    namespace = item.get("namespace")
    port = item.get("port")
    for fname, value in (("name", name), ("namespace", namespace)):
        if not isinstance(value, str):
            raise _bad(f"{fname} is required and must be a string", f"{path}.{fname}")
        if not is_rfc1123_label(value):
            raise _bad(
                f"{fname} must be a lower-case RFC 1123 label (a-z, 0-9, '-', 1..63 chars), "
                f"got {value!r}",
                f"{path}.{fname}",
            )
    if isinstance(port, str) and port.isascii() and port.isdigit() and port[:1] != "0":
        port = int(port)  # "80" as a string is accepted; "080", "²" are not
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise _bad(f"port must be an integer 1..65535, got {port!r}", f"{path}.port")
    assert isinstance(name, str) and isinstance(namespace, str)
    return (name, namespace, port)


def _parse_vip(value: Any, version: int, path: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"must be an IPv{version} address string", path)
    vip = parse_ip(value, version)
    if vip is None:
        raise _bad(f"must be an IPv{version} address, got {value!r}", path)
    return vip


def parse_service(item: Any, path: str) -> ServiceSpec:
    if not isinstance(item, Mapping):
        raise _bad("must be an object with name, namespace and port", path)
    unknown = sorted(str(k) for k in item if k not in _SERVICE_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}", f"{path}.{unknown[0]}")
    name, namespace, port = _parse_key_fields(item, path)
    vip = _parse_vip(item.get("vip"), 4, f"{path}.vip")
    vip6 = _parse_vip(item.get("vip6"), 6, f"{path}.vip6")
    raw_hosts = item.get("hostnames")
    hostnames: list[str] = []
    if raw_hosts is not None:
        if not isinstance(raw_hosts, list):
            raise _bad("must be a list of host names", f"{path}.hostnames")
        if len(raw_hosts) > MAX_HOSTNAMES_PER_SERVICE:
            raise _bad(
                f"at most {MAX_HOSTNAMES_PER_SERVICE} host names per service",
                f"{path}.hostnames",
            )
        for j, raw in enumerate(raw_hosts):
            host = normalize_hostname(raw) if isinstance(raw, str) else None
            if host is None:
                raise _bad(f"must be a fully qualified domain name, got {raw!r}",
                           f"{path}.hostnames[{j}]")
            if host not in hostnames:
                hostnames.append(host)
    return ServiceSpec(name, namespace, port, vip, vip6, tuple(hostnames))


def parse_services(value: Any, path: str = "services") -> list[ServiceSpec]:
    if not isinstance(value, list):
        raise _bad("must be a list of services", path)
    return [parse_service(item, f"{path}[{i}]") for i, item in enumerate(value)]


def parse_deletes(value: Any, path: str = "delete") -> list[ServiceKey]:
    if not isinstance(value, list):
        raise _bad("must be a list of {name, namespace, port}", path)
    keys = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise _bad("must be an object with name, namespace and port", f"{path}[{i}]")
        unknown = sorted(str(k) for k in item if k not in _KEY_FIELDS)
        if unknown:
            raise _bad(f"unknown field {unknown[0]!r}", f"{path}[{i}].{unknown[0]}")
        keys.append(_parse_key_fields(item, f"{path}[{i}]"))
    return keys


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class RegistryPolicy:
    """What a write is checked against: served domains, VIP ranges, hold-down."""

    domains: tuple[str, ...] = ("mesh",)
    range4: VipRange = field(default_factory=lambda: VipRange.from_cidr("240.0.0.0/4"))
    range6: VipRange | None = field(
        default_factory=lambda: VipRange.from_cidr("fd00:fd00::/64"))
    hold_seconds: float = 300.0


Held = Mapping[int, tuple[float, ServiceKey]]  # vip -> (release time, last owner)


@dataclass(frozen=True, eq=False)
class Registry:
    """One immutable registry snapshot plus the indexes DNS answers from."""

    revision: int
    services: Mapping[ServiceKey, Service]
    by_vip4: Mapping[int, ServiceKey]
    by_vip6: Mapping[int, ServiceKey]
    hostnames: Mapping[str, ServiceKey]
    held4: Held
    held6: Held
    # Empty non-terminals below each domain: "<ns>.svc.<port>" and "<port>".
    ns_ports: frozenset[tuple[str, int]]
    ports: frozenset[int]

    @classmethod
    def empty(cls) -> Registry:
        return cls(0, {}, {}, {}, {}, {}, {}, frozenset(), frozenset())

    def __len__(self) -> int:
        return len(self.services)

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "services": [s.to_json() for s in self.services.values()],
        }

    def free_vips(self, policy: RegistryPolicy) -> dict[str, int]:
        """Addresses still allocatable per family (``ipv4``/``ipv6``)."""
        out = {"ipv4": _free(policy.range4, self.by_vip4, self.held4)}
        if policy.range6 is not None:
            out["ipv6"] = _free(policy.range6, self.by_vip6, self.held6)
        return out


def _free(rng: VipRange, taken: Mapping[int, Any], held: Held) -> int:
    used = sum(1 for v in taken if v in rng) + sum(1 for v in held if v in rng and v not in taken)
    return rng.size - used


# ---------------------------------------------------------------- writes


def apply_put(reg: Registry, specs: Sequence[ServiceSpec], policy: RegistryPolicy,
              now: float, path: str = "services") -> Registry:
    """The registry that replaces ``reg`` wholesale with ``specs``."""
    indexed: dict[ServiceKey, tuple[int, ServiceSpec]] = {}
    for i, spec in enumerate(specs):
        if spec.key in indexed:
            first = indexed[spec.key][0]
            raise _bad(f"duplicate service {describe(spec.key)} (also {path}[{first}])",
                       f"{path}[{i}]")
        indexed[spec.key] = (i, spec)
    return _build(reg, indexed, policy, now, path)


def apply_patch(reg: Registry, upserts: Sequence[ServiceSpec], deletes: Iterable[ServiceKey],
                policy: RegistryPolicy, now: float) -> Registry:
    """The registry after upserting and deleting, applied together or not at all."""
    indexed = {key: (-1, s.to_spec()) for key, s in reg.services.items()}
    for key in deletes:
        indexed.pop(key, None)  # deleting a missing service is a no-op: deletes are idempotent
    seen: dict[ServiceKey, int] = {}
    for i, spec in enumerate(upserts):
        if spec.key in seen:
            raise _bad(f"duplicate service {describe(spec.key)} (also upsert[{seen[spec.key]}])",
                       f"upsert[{i}]")
        seen[spec.key] = i
        indexed[spec.key] = (i, spec)
    return _build(reg, indexed, policy, now, "upsert")


def _field(path: str, index: int, name: str) -> str | None:
    return f"{path}[{index}].{name}" if index >= 0 else None


def _assign(family: int, reg: Registry, indexed: Mapping[ServiceKey, tuple[int, ServiceSpec]],
            rng: VipRange | None, now: float, path: str) -> tuple[dict[ServiceKey, int], dict[int, ServiceKey]]:
    """VIPs for every service of one family: explicit, kept, re-used from hold, or new."""
    old_by_vip = reg.by_vip4 if family == 4 else reg.by_vip6
    old_held = reg.held4 if family == 4 else reg.held6
    old_vip = {key: vip for vip, key in old_by_vip.items()}
    attr = "vip" if family == 4 else "vip6"

    by_vip: dict[int, ServiceKey] = {}
    assigned: dict[ServiceKey, int] = {}
    pending: list[ServiceKey] = []
    # 1. Explicit VIPs: the control plane is authoritative, but they must be unique.
    for key, (i, spec) in _stored_first(indexed):
        vip = getattr(spec, attr)
        if vip is None:
            continue
        other = by_vip.get(vip)
        if other is not None:
            raise RegistryError(409, f"{attr} {format_ip(vip, family)} is given to both "
                                f"{describe(other)} and {describe(key)}", _field(path, i, attr))
        by_vip[vip] = key
        assigned[key] = vip
    # 2. Kept VIPs: an identity keeps its address while it exists and it is in range.
    for key, (i, _spec) in indexed.items():
        if key in assigned:
            continue
        vip = old_vip.get(key)
        if vip is not None and rng is not None and vip in rng:
            other = by_vip.get(vip)
            if other is not None:
                oi = indexed[other][0]
                raise RegistryError(409, f"{attr} {format_ip(vip, family)} belongs to "
                                    f"{describe(key)}", _field(path, oi, attr) or _field(path, i, attr))
            by_vip[vip] = key
            assigned[key] = vip
        elif rng is not None:
            pending.append(key)
    if not pending:
        return assigned, by_vip
    assert rng is not None
    # 3. A recently deleted identity coming back gets its held address again.
    held = {v: h for v, h in old_held.items() if h[0] > now and v not in by_vip}
    held_by_key = {owner: v for v, (_, owner) in held.items()}
    fresh: list[ServiceKey] = []
    for key in pending:
        vip = held_by_key.get(key)
        if vip is not None and vip in rng:
            by_vip[vip] = key
            assigned[key] = vip
            del held[vip]
        else:
            fresh.append(key)
    # 4. New addresses, skipping taken and held ones, continuing after the last allocated.
    unavailable = _Unavailable(by_vip, held)
    busy = sum(1 for v in by_vip if v in rng) + sum(1 for v in held if v in rng)
    if rng.size - busy < len(fresh):
        raise RegistryError(
            507, f"IPv{family} VIP range {rng.network} is exhausted: {len(fresh)} new "
            f"services need an address, {max(rng.size - busy, 0)} free", None)
    cursor = max((v for v in old_by_vip if v in rng), default=rng.first - 1) + 1
    for key in fresh:
        vip = rng.allocate(cursor, unavailable, busy + 1)
        if vip is None:  # pragma: no cover - guarded by the count above
            raise RegistryError(507, f"IPv{family} VIP range {rng.network} is exhausted")
        by_vip[vip] = key
        assigned[key] = vip
        busy += 1
        cursor = vip + 1
    return assigned, by_vip


def _stored_first(indexed: Mapping[ServiceKey, tuple[int, ServiceSpec]]
                  ) -> Iterable[tuple[ServiceKey, tuple[int, ServiceSpec]]]:
    """Entries already in the registry (index -1) first, then the written ones.

    A conflict is found on the second claimant, so this order reports it on the
    entry the client wrote, with that entry's field path.
    """
    written = [item for item in indexed.items() if item[1][0] >= 0]
    if len(written) == len(indexed):
        return written
    return [item for item in indexed.items() if item[1][0] < 0] + written


class _Unavailable:
    __slots__ = ("held", "taken")

    def __init__(self, taken: Mapping[int, Any], held: Mapping[int, Any]) -> None:
        self.taken, self.held = taken, held

    def __contains__(self, vip: object) -> bool:
        return vip in self.taken or vip in self.held


def _next_held(old: Held, old_by_vip: Mapping[int, ServiceKey], new_by_vip: Mapping[int, ServiceKey],
               policy: RegistryPolicy, now: float) -> dict[int, tuple[float, ServiceKey]]:
    held = {v: h for v, h in old.items() if h[0] > now and v not in new_by_vip}
    release = now + policy.hold_seconds
    for vip, key in old_by_vip.items():
        if vip not in new_by_vip:
            held[vip] = (release, key)
    return held


def _check_hostnames(indexed: Mapping[ServiceKey, tuple[int, ServiceSpec]],
                     policy: RegistryPolicy, path: str) -> dict[str, ServiceKey]:
    owners: dict[str, ServiceKey] = {}
    for key, (i, spec) in _stored_first(indexed):
        for j, host in enumerate(spec.hostnames):
            where = f"{path}[{i}].hostnames[{j}]" if i >= 0 else None
            if host in policy.domains:
                raise _bad(f"{host!r} is a served domain apex, not a service name",
                           where or f"{path}")
            owner = owners.get(host) or _generated_owner(host, indexed, policy.domains)
            if owner is not None and owner != key:
                raise RegistryError(409, f"host name {host!r} of {describe(key)} is already "
                                    f"owned by {describe(owner)}", where)
            owners[host] = key
    return owners


def _generated_owner(host: str, indexed: Mapping[ServiceKey, Any],
                     domains: Sequence[str]) -> ServiceKey | None:
    """The service whose canonical or Kuma name ``host`` is, if it exists."""
    for domain in domains:
        if not is_subdomain(host, domain) or host == domain:
            continue
        rest = host[: -len(domain) - 1].split(".")
        key: ServiceKey | None = None
        if len(rest) == 4 and rest[2] == "svc" and rest[3].isdigit():
            key = (rest[0], rest[1], int(rest[3]))
        elif len(rest) == 1 and rest[0].count("_") == 3:
            n, ns, svc, port = rest[0].split("_")
            if svc == "svc" and port.isdigit():
                key = (n, ns, int(port))
        if key is not None and key in indexed and (
            canonical_name(*key, domain) == host or kuma_name(*key, domain) == host
        ):
            return key
    return None


def _build(reg: Registry, indexed: Mapping[ServiceKey, tuple[int, ServiceSpec]],
           policy: RegistryPolicy, now: float, path: str) -> Registry:
    hostnames = _check_hostnames(indexed, policy, path)
    vip4, by_vip4 = _assign(4, reg, indexed, policy.range4, now, path)
    vip6, by_vip6 = _assign(6, reg, indexed, policy.range6, now, path)
    services: dict[ServiceKey, Service] = {}
    for key, (_, spec) in indexed.items():
        services[key] = Service(spec.name, spec.namespace, spec.port, vip4[key],
                                vip6.get(key), spec.hostnames,
                                spec.vip is not None, spec.vip6 is not None)
    held4 = _next_held(reg.held4, reg.by_vip4, by_vip4, policy, now)
    held6 = _next_held(reg.held6, reg.by_vip6, by_vip6, policy, now)
    changed = services != reg.services
    return Registry(
        revision=reg.revision + 1 if changed else reg.revision,
        services=services,
        by_vip4=by_vip4,
        by_vip6=by_vip6,
        hostnames=hostnames,
        held4=held4,
        held6=held6,
        ns_ports=frozenset((k[1], k[2]) for k in services),
        ports=frozenset(k[2] for k in services),
    )


def restore(revision: int, specs: Sequence[ServiceSpec],
            allocated: Mapping[ServiceKey, tuple[int | None, int | None]],
            policy: RegistryPolicy, held4: Held | None = None, held6: Held | None = None,
            now: float = 0.0) -> Registry:
    """Rebuild a saved snapshot under the current policy, keeping its revision.

    ``specs`` carry only the VIPs the control plane gave; ``allocated`` holds the
    addresses this server had allocated, which are kept while they are inside
    the (possibly changed) CIDR and re-allocated otherwise.
    """
    by_vip4 = {v4: key for key, (v4, _) in allocated.items() if v4 is not None}
    by_vip6 = {v6: key for key, (_, v6) in allocated.items() if v6 is not None}
    base = Registry(revision, {}, by_vip4, by_vip6, {}, held4 or {}, held6 or {},
                    frozenset(), frozenset())
    reg = apply_put(base, specs, policy, now)
    return Registry(revision, reg.services, reg.by_vip4, reg.by_vip6, reg.hostnames,
                    reg.held4, reg.held6, reg.ns_ports, reg.ports)
