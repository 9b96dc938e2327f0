"""The service registry: validated writes in, immutable snapshots out.

A write (a full PUT or a PATCH) is computed against the current snapshot into a
brand-new snapshot, or rejected whole with a :class:`RegistryError`. Nothing is
ever mutated in place, so whoever holds a snapshot (the DNS hot path, an HTTP
reader) sees one consistent registry, and swapping the current snapshot is a
single reference assignment.

A PATCH costs in the size of the patch, not of the registry: it starts from
the current snapshot's tables (shared when it leaves them alone, else copied
once) and touches only the services it names, with exactly the meaning of a
full rebuild (see "writes" below).

The core reads no clock: every call that deals with hold-downs takes ``now``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar

from .names import (
    canonical_name,
    is_rfc1123_label,
    is_subdomain,
    kuma_name,
    normalize_hostname,
)
from .vip import VipRange, format_ip, parse_ip, parse_ip4, parse_ip6

ServiceKey = tuple[str, str, int]  # (name, namespace, port)
_K = TypeVar("_K")
_V = TypeVar("_V")

MAX_HOSTNAMES_PER_SERVICE = 256
_SERVICE_FIELDS = frozenset({"name", "namespace", "port", "vip", "vip6", "hostnames"})
_KEY_FIELDS = ("name", "namespace", "port")
_NS_PORT = itemgetter(1, 2)  # key -> (namespace, port)
_PORT = itemgetter(2)


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


# Building a frozen dataclass runs object.__setattr__ once per field; filling the
# slots straight through their descriptors makes the same object 2-3x faster,
# which counts when a write builds 100k of them. Only for the hot paths below.
_new_object = object.__new__
_SPEC_SLOTS = tuple(ServiceSpec.__dict__[f].__set__ for f in (
    "name", "namespace", "port", "vip", "vip6", "hostnames"))
_SERVICE_SLOTS = tuple(Service.__dict__[f].__set__ for f in (
    "name", "namespace", "port", "vip", "vip6", "hostnames", "vip_given", "vip6_given"))


def _make_spec(name: str, namespace: str, port: int, vip: int | None, vip6: int | None,
               hostnames: tuple[str, ...]) -> ServiceSpec:
    """``ServiceSpec(...)``, faster."""
    spec: ServiceSpec = _new_object(ServiceSpec)
    s_name, s_namespace, s_port, s_vip, s_vip6, s_hostnames = _SPEC_SLOTS
    s_name(spec, name)
    s_namespace(spec, namespace)
    s_port(spec, port)
    s_vip(spec, vip)
    s_vip6(spec, vip6)
    s_hostnames(spec, hostnames)
    return spec


def _make_service(name: str, namespace: str, port: int, vip: int, vip6: int | None,
                  hostnames: tuple[str, ...], vip_given: bool, vip6_given: bool) -> Service:
    """``Service(...)``, faster."""
    svc: Service = _new_object(Service)
    (s_name, s_namespace, s_port, s_vip, s_vip6, s_hostnames, s_given,
     s_given6) = _SERVICE_SLOTS
    s_name(svc, name)
    s_namespace(svc, namespace)
    s_port(svc, port)
    s_vip(svc, vip)
    s_vip6(svc, vip6)
    s_hostnames(svc, hostnames)
    s_given(svc, vip_given)
    s_given6(svc, vip6_given)
    return svc


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


def _parse_hostnames(raw_hosts: Any, path: str) -> tuple[str, ...]:
    if not isinstance(raw_hosts, list):
        raise _bad("must be a list of host names", f"{path}.hostnames")
    if len(raw_hosts) > MAX_HOSTNAMES_PER_SERVICE:
        raise _bad(
            f"at most {MAX_HOSTNAMES_PER_SERVICE} host names per service",
            f"{path}.hostnames",
        )
    hostnames: list[str] = []
    for j, raw in enumerate(raw_hosts):
        host = normalize_hostname(raw) if isinstance(raw, str) else None
        if host is None:
            raise _bad(f"must be a fully qualified domain name, got {raw!r}",
                       f"{path}.hostnames[{j}]")
        if host not in hostnames:
            hostnames.append(host)
    return tuple(hostnames)


def parse_service(item: Any, path: str) -> ServiceSpec:
    return _parse_service(item, path, set())


def _parse_service(item: Any, path: str, namespaces: set[str]) -> ServiceSpec:
    """``parse_service``; ``namespaces`` holds namespaces already found valid (they repeat)."""
    if type(item) is not dict and not isinstance(item, Mapping):
        raise _bad("must be an object with name, namespace and port", path)
    if not item.keys() <= _SERVICE_FIELDS:
        unknown = sorted(str(k) for k in item if k not in _SERVICE_FIELDS)
        raise _bad(f"unknown field {unknown[0]!r}", f"{path}.{unknown[0]}")
    get = item.get
    name = get("name")
    namespace = get("namespace")
    port = get("port")
    # The common shape in one test; anything else (a port given as a string, or
    # a field to reject with its path) takes the long way.
    if not (type(port) is int and 0 < port < 65536 and type(name) is str
            and is_rfc1123_label(name) and type(namespace) is str
            and (namespace in namespaces or is_rfc1123_label(namespace))):
        name, namespace, port = _parse_key_fields(item, path)
    namespaces.add(namespace)
    vip = get("vip")
    if vip is not None:
        vip = parse_ip4(vip) if type(vip) is str else None
        if vip is None:
            vip = _parse_vip(get("vip"), 4, f"{path}.vip")
    vip6 = get("vip6")
    if vip6 is not None:
        vip6 = parse_ip6(vip6) if type(vip6) is str else None
        if vip6 is None:
            vip6 = _parse_vip(get("vip6"), 6, f"{path}.vip6")
    raw_hosts = get("hostnames")
    hostnames = () if raw_hosts is None else _parse_hostnames(raw_hosts, path)
    return _make_spec(name, namespace, port, vip, vip6, hostnames)


def parse_services(value: Any, path: str = "services") -> list[ServiceSpec]:
    if not isinstance(value, list):
        raise _bad("must be a list of services", path)
    namespaces: set[str] = set()
    return [_parse_service(item, f"{path}[{i}]", namespaces) for i, item in enumerate(value)]


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


@dataclass(slots=True)
class _FamilyIndex:
    """Counts over one address family of a snapshot, so a PATCH need not scan it."""

    in_range: int  # VIPs in use inside the policy range
    held_in_range: int  # held VIPs inside the policy range
    held_sorted: bool  # held table in release-time order: expiry pops a prefix
    # Highest VIP in use inside the range (first - 1: none); None: not known yet.
    top: int | None = None


@dataclass(slots=True)
class _Index:
    """What a snapshot was built under, and its per-family counts."""

    domains: tuple[str, ...]
    range4: VipRange
    range6: VipRange | None
    fam4: _FamilyIndex
    fam6: _FamilyIndex

    def fits(self, policy: RegistryPolicy) -> bool:
        return (self.domains == policy.domains and self.range4 == policy.range4
                and self.range6 == policy.range6)


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
    # Empty non-terminals below each domain, "<ns>.svc.<port>" and "<port>", each
    # with how many services lie below it (so a PATCH can update them in place).
    ns_ports: Mapping[tuple[str, int], int]
    ports: Mapping[int, int]
    # Bookkeeping that lets a PATCH touch only what it names (None: rebuild whole).
    _index: _Index | None = field(default=None, repr=False)

    @classmethod
    def empty(cls) -> Registry:
        return cls(0, {}, {}, {}, {}, {}, {}, {}, {})

    def __len__(self) -> int:
        return len(self.services)

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "services": [s.to_json() for s in self.services.values()],
        }

    def free_vips(self, policy: RegistryPolicy) -> dict[str, int]:
        """Addresses still allocatable per family (``ipv4``/``ipv6``)."""
        idx = self._index
        if idx is not None and idx.range4 == policy.range4:
            out = {"ipv4": policy.range4.size - idx.fam4.in_range - idx.fam4.held_in_range}
        else:
            out = {"ipv4": _free(policy.range4, self.by_vip4, self.held4)}
        if policy.range6 is not None:
            if idx is not None and idx.range6 == policy.range6:
                out["ipv6"] = (policy.range6.size - idx.fam6.in_range
                               - idx.fam6.held_in_range)
            else:
                out["ipv6"] = _free(policy.range6, self.by_vip6, self.held6)
        return out


def _free(rng: VipRange, taken: Mapping[int, Any], held: Held) -> int:
    used = sum(1 for v in taken if v in rng) + sum(1 for v in held if v in rng and v not in taken)
    return rng.size - used


# ---------------------------------------------------------------- writes
#
# Both writes mean the same thing: the registry that the full list of services
# (for a PATCH: the current ones with the upserts and deletes applied) yields.
# ``_build`` computes that from scratch; a PATCH goes through
# ``_patch_incremental``, which starts from copies of the current indexes and
# touches only the services the patch names, and falls back to ``_build`` when
# the patch is rejected (so the error is found and named exactly as ``_build``
# would) or when the policy changed since the snapshot was built.
#
# VIPs, per family: 1. explicit (given, must be unique); 2. kept (an identity
# keeps its address while it is in range); 3. re-used from hold (a deleted
# identity coming back); 4. new, the first free address after the highest one
# in use, skipping taken and held ones. Addresses no longer used are held for
# ``hold_seconds``.


def apply_put(reg: Registry, specs: Sequence[ServiceSpec], policy: RegistryPolicy,
              now: float, path: str = "services") -> Registry:
    """The registry that replaces ``reg`` wholesale with ``specs``."""
    keys = [spec.key for spec in specs]
    where = dict(zip(keys, range(len(keys)), strict=True))
    if len(where) != len(keys):
        seen: dict[ServiceKey, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise _bad(f"duplicate service {describe(key)} (also {path}[{seen[key]}])",
                           f"{path}[{i}]")
            seen[key] = i
    return _build(reg, dict(zip(keys, specs, strict=True)), where, policy, now, path)


def apply_patch(reg: Registry, upserts: Sequence[ServiceSpec], deletes: Iterable[ServiceKey],
                policy: RegistryPolicy, now: float) -> Registry:
    """The registry after upserting and deleting, applied together or not at all.

    Deleting a missing service is a no-op: deletes are idempotent.
    """
    deletes = tuple(deletes)
    seen: dict[ServiceKey, int] = {}
    for i, spec in enumerate(upserts):
        key = spec.key
        if key in seen:
            raise _bad(f"duplicate service {describe(key)} (also upsert[{seen[key]}])",
                       f"upsert[{i}]")
        seen[key] = i
    index = reg._index
    if index is not None and index.fits(policy):
        new = _patch_incremental(reg, index, upserts, deletes, seen, policy, now)
        if new is not None:
            return new
    return _patch_rebuild(reg, upserts, deletes, seen, policy, now)


def _patch_rebuild(reg: Registry, upserts: Sequence[ServiceSpec], deletes: Sequence[ServiceKey],
                   seen: Mapping[ServiceKey, int], policy: RegistryPolicy,
                   now: float) -> Registry:
    """``apply_patch`` from scratch: every service rewritten, the patched ones in place."""
    specs = {key: s.to_spec() for key, s in reg.services.items()}
    for key in deletes:
        specs.pop(key, None)
    for spec in upserts:
        specs[spec.key] = spec
    return _build(reg, specs, seen, policy, now, "upsert")


# ---------------------------------------------------------------- full rebuild


def _field(path: str, index: int, name: str) -> str | None:
    return f"{path}[{index}].{name}" if index >= 0 else None


def _build(reg: Registry, specs: dict[ServiceKey, ServiceSpec], where: Mapping[ServiceKey, int],
           policy: RegistryPolicy, now: float, path: str) -> Registry:
    """The registry holding exactly ``specs`` (in that order).

    ``where`` gives the index in the write of the entries the client wrote; the
    others are the registry's own (a PATCH leaves them as they are). Those are
    checked first, so a conflict is found on the entry the client wrote and
    reported with that entry's field path.
    """
    stored_first: Iterable[tuple[ServiceKey, ServiceSpec]]
    if len(where) == len(specs):
        stored_first = specs.items()
    else:
        stored_first = ([item for item in specs.items() if item[0] not in where]
                        + [item for item in specs.items() if item[0] in where])
    hostnames = _check_hostnames(specs, stored_first, where, policy, path)
    vip4, by_vip4, held4, fam4 = _assign(4, reg, specs, stored_first, where, policy.range4,
                                         policy.hold_seconds, now, path)
    vip6, by_vip6, held6, fam6 = _assign(6, reg, specs, stored_first, where, policy.range6,
                                         policy.hold_seconds, now, path)
    old_services = reg.services
    services: dict[ServiceKey, Service]
    if not old_services:  # a first load, a restore: every service is new
        services = {key: _make_service(spec.name, spec.namespace, spec.port, vip4[key],
                                       vip6.get(key), spec.hostnames, spec.vip is not None,
                                       spec.vip6 is not None)
                    for key, spec in specs.items()}
        return _registry(reg.revision + 1 if services else reg.revision, services, by_vip4,
                         by_vip6, hostnames, held4, held6, policy, fam4, fam6)
    services = {}
    kept = 0
    for key, spec in specs.items():
        v4 = vip4[key]
        v6 = vip6.get(key)
        given4 = spec.vip is not None
        given6 = spec.vip6 is not None
        prev = old_services.get(key)
        if (prev is not None and prev.vip == v4 and prev.vip6 == v6
                and prev.hostnames == spec.hostnames and prev.vip_given == given4
                and prev.vip6_given == given6):
            services[key] = prev  # equal as it is: no new object, and a cheap comparison
            kept += 1
        else:
            services[key] = _make_service(spec.name, spec.namespace, spec.port, v4, v6,
                                          spec.hostnames, given4, given6)
    changed = not kept == len(services) == len(old_services)
    return _registry(reg.revision + 1 if changed else reg.revision, services, by_vip4, by_vip6,
                     hostnames, held4, held6, policy, fam4, fam6)


def _registry(revision: int, services: dict[ServiceKey, Service], by_vip4: dict[int, ServiceKey],
              by_vip6: dict[int, ServiceKey], hostnames: dict[str, ServiceKey], held4: Held,
              held6: Held, policy: RegistryPolicy, fam4: _FamilyIndex,
              fam6: _FamilyIndex) -> Registry:
    return Registry(
        revision=revision,
        services=services,
        by_vip4=by_vip4,
        by_vip6=by_vip6,
        hostnames=hostnames,
        held4=held4,
        held6=held6,
        ns_ports=dict(Counter(map(_NS_PORT, services))),
        ports=dict(Counter(map(_PORT, services))),
        _index=_Index(policy.domains, policy.range4, policy.range6, fam4, fam6),
    )


def _check_hostnames(specs: Mapping[ServiceKey, ServiceSpec],
                     stored_first: Iterable[tuple[ServiceKey, ServiceSpec]],
                     where: Mapping[ServiceKey, int], policy: RegistryPolicy,
                     path: str) -> dict[str, ServiceKey]:
    owners: dict[str, ServiceKey] = {}
    domains = policy.domains
    for key, spec in stored_first:
        if not spec.hostnames:
            continue
        i = where.get(key, -1)
        for j, host in enumerate(spec.hostnames):
            if host in domains:
                raise _bad(f"{host!r} is a served domain apex, not a service name",
                           _host_field(path, i, j) or path)
            owner = owners.get(host) or _generated_owner(host, specs, domains)
            if owner is not None and owner != key:
                raise RegistryError(409, f"host name {host!r} of {describe(key)} is already "
                                    f"owned by {describe(owner)}", _host_field(path, i, j))
            owners[host] = key
    return owners


def _host_field(path: str, i: int, j: int) -> str | None:
    return f"{path}[{i}].hostnames[{j}]" if i >= 0 else None


def _generated_owner(host: str, keys: Container[ServiceKey],
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
        if key is not None and key in keys and (
            canonical_name(*key, domain) == host or kuma_name(*key, domain) == host
        ):
            return key
    return None


_AssignResult = tuple[dict[ServiceKey, int], dict[int, ServiceKey],
                      dict[int, tuple[float, ServiceKey]], _FamilyIndex]


def _assign(family: int, reg: Registry, specs: Mapping[ServiceKey, ServiceSpec],
            stored_first: Iterable[tuple[ServiceKey, ServiceSpec]],
            where: Mapping[ServiceKey, int], rng: VipRange | None, hold_seconds: float,
            now: float, path: str) -> _AssignResult:
    """VIPs of one family for every service, and what is held afterwards."""
    v4 = family == 4
    attr = "vip" if v4 else "vip6"
    old_by_vip = reg.by_vip4 if v4 else reg.by_vip6
    old_held = reg.held4 if v4 else reg.held6
    first, last = (rng.first, rng.last) if rng is not None else (1, 0)

    # 1. Explicit VIPs: the control plane is authoritative, but they must be unique.
    # (Two parallel lists rather than pairs: 100k fewer objects for the collector.)
    if v4:
        given_keys = [key for key, spec in stored_first if spec.vip is not None]
        given = [vip for _, spec in stored_first if (vip := spec.vip) is not None]
    else:
        given_keys = [key for key, spec in stored_first if spec.vip6 is not None]
        given = [vip for _, spec in stored_first if (vip := spec.vip6) is not None]
    by_vip: dict[int, ServiceKey] = dict(zip(given, given_keys, strict=True))
    if len(by_vip) < len(given):  # an address given twice: name the second claimant
        by_vip = {}
        for key, vip in zip(given_keys, given, strict=True):
            other = by_vip.setdefault(vip, key)
            if other is not key:
                raise RegistryError(409, f"{attr} {format_ip(vip, family)} is given to both "
                                    f"{describe(other)} and {describe(key)}",
                                    _field(path, where.get(key, -1), attr))
    assigned: dict[ServiceKey, int] = dict(zip(given_keys, given, strict=True))
    in_range = sum(1 for vip in by_vip if first <= vip <= last)
    # 2. Kept VIPs: an identity keeps its address while it exists and it is in range.
    pending: list[ServiceKey] = []
    if rng is not None and len(assigned) < len(specs):
        unassigned = [key for key in specs if key not in assigned] if assigned else list(specs)
        if not old_by_vip:  # a first load: nothing to keep
            pending = unassigned
        else:
            old_vip = {key: vip for vip, key in old_by_vip.items()}
            for key in unassigned:
                kept = old_vip.get(key)
                if kept is not None and first <= kept <= last:
                    other = by_vip.setdefault(kept, key)
                    if other is not key:
                        raise RegistryError(409, f"{attr} {format_ip(kept, family)} belongs "
                                            f"to {describe(key)}",
                                            _field(path, where.get(other, -1), attr)
                                            or _field(path, where.get(key, -1), attr))
                    assigned[key] = kept
                    in_range += 1
                else:
                    pending.append(key)
    held = {v: h for v, h in old_held.items() if h[0] > now and v not in by_vip}
    if pending:
        assert rng is not None
        # 3. A recently deleted identity coming back gets its held address again.
        held_by_key = {owner: v for v, (_, owner) in held.items()}
        fresh: list[ServiceKey] = [] if held_by_key else pending
        for key in pending if held_by_key else ():
            back = held_by_key.get(key)
            if back is not None and first <= back <= last:
                by_vip[back] = key
                assigned[key] = back
                del held[back]
                in_range += 1
            else:
                fresh.append(key)
        # 4. New addresses, skipping taken and held ones, continuing after the last allocated.
        # An address this write frees is held from newcomers already, in this very write
        # (SPEC §3), so it counts as unavailable too.
        if fresh:
            freed = {v: (0.0, k) for v, k in old_by_vip.items() if v not in by_vip}
            blocked = {**held, **freed} if freed else held
            busy = in_range + sum(1 for v in blocked if first <= v <= last)
            if rng.size - busy < len(fresh):
                raise _exhausted(family, rng, len(fresh), busy)
            cursor = _top_of(old_by_vip, first, last) + 1
            start = cursor if first <= cursor <= last else first
            end = start + len(fresh) - 1
            vips: Sequence[int] | None
            if end <= last and not any(start <= v <= end for v in by_vip) \
                    and not any(start <= v <= end for v in blocked):
                vips = range(start, end + 1)  # a free run after the last one: the usual case
            else:
                vips = rng.allocate_many(cursor, len(fresh), by_vip, blocked)
            if vips is None:  # pragma: no cover - guarded by the count above
                raise RegistryError(507, f"IPv{family} VIP range {rng.network} is exhausted")
            by_vip.update(zip(vips, fresh, strict=True))
            assigned.update(zip(fresh, vips, strict=True))
            in_range += len(fresh)
    # Addresses no longer in use are held from newcomers.
    release = now + hold_seconds
    for vip, key in old_by_vip.items():
        if vip not in by_vip:
            held[vip] = (release, key)
    held_in_range = sum(1 for v in held if first <= v <= last)
    return assigned, by_vip, held, _FamilyIndex(in_range, held_in_range, _in_release_order(held))


def _exhausted(family: int, rng: VipRange, wanted: int, busy: int) -> RegistryError:
    return RegistryError(
        507, f"IPv{family} VIP range {rng.network} is exhausted: {wanted} new "
        f"services need an address, {max(rng.size - busy, 0)} free", None)


def _top_of(by_vip: Collection[int], first: int, last: int) -> int:
    """The highest address in use inside ``first..last``; ``first - 1`` if none."""
    top = max(by_vip, default=None)
    if top is None:
        return first - 1
    if first <= top <= last:
        return top
    return max((v for v in by_vip if first <= v <= last), default=first - 1)


def _in_release_order(held: Held) -> bool:
    prev = -math.inf
    for release, _ in held.values():
        if release < prev:
            return False
        prev = release
    return True


# ---------------------------------------------------------------- incremental PATCH
#
# Each index of the new snapshot is the old one plus a delta: what the patch
# frees (the deleted and the rewritten services) and what it claims (the
# upserts). An index the patch leaves as it was is shared with the old
# snapshot (snapshots are never mutated), any other one is copied once and
# the delta applied to the copy.


def _patch_incremental(reg: Registry, index: _Index, upserts: Sequence[ServiceSpec],
                       deletes: Sequence[ServiceKey], seen: Mapping[ServiceKey, int],
                       policy: RegistryPolicy, now: float) -> Registry | None:
    """``apply_patch`` touching only the services the patch names, or None when
    the patch is rejected (the full rebuild then names the error).

    Relies on what every snapshot ``_build`` makes holds under the policy it was
    built with: its indexes agree with its services, every allocated VIP lies
    in the range, no VIP is both in use and held, and no host name conflicts.
    """
    old_services = reg.services
    deleted: dict[ServiceKey, Service] = {}
    for key in deletes:
        gone = old_services.get(key)
        if gone is not None:
            deleted[key] = gone
    removed = list(deleted.values())  # deleted or rewritten: addresses and names freed
    for spec in upserts:
        prev = old_services.get(spec.key)
        if prev is not None and spec.key not in deleted:
            removed.append(prev)
    release = now + policy.hold_seconds
    fam4 = _patch_family(4, reg, index.fam4, policy.range4, removed, upserts, deleted,
                         now, release)
    if fam4 is None:
        return None
    fam6 = _patch_family(6, reg, index.fam6, policy.range6, removed, upserts, deleted,
                         now, release)
    if fam6 is None:
        return None
    vip4, by_vip4, held4, idx4 = fam4
    vip6, by_vip6, held6, idx6 = fam6

    written: list[Service] = []
    changed = readded = False
    for spec in upserts:
        key = spec.key
        svc = Service(spec.name, spec.namespace, spec.port, vip4[key], vip6.get(key),
                      spec.hostnames, spec.vip is not None, spec.vip6 is not None)
        prev = old_services.get(key)
        if prev is not None and prev == svc:
            svc = prev
        else:
            changed = True
        readded = readded or key in deleted
        written.append(svc)
    dropped = [key for key in deleted if key not in seen]  # deleted for good
    services: Mapping[ServiceKey, Service]
    if changed or dropped or readded:
        changed = changed or bool(dropped)
        services = _copy(old_services)
        for key in deleted:
            del services[key]
        for svc in written:
            services[svc.key] = svc  # in place if it stays, else appended, as the rebuild orders
    else:
        services = old_services

    hostnames = _patch_hostnames(reg, removed, upserts, services, policy.domains)
    if hostnames is None:
        return None

    ns_ports, ports = reg.ns_ports, reg.ports
    added = [spec for spec in upserts if spec.key not in old_services]
    if dropped or added:
        ns_counts, port_counts = _copy(ns_ports), _copy(ports)
        for key in dropped:
            _uncount(ns_counts, (key[1], key[2]))
            _uncount(port_counts, key[2])
        for spec in added:
            ns_port = (spec.namespace, spec.port)
            ns_counts[ns_port] = ns_counts.get(ns_port, 0) + 1
            port_counts[spec.port] = port_counts.get(spec.port, 0) + 1
        ns_ports, ports = ns_counts, port_counts

    return Registry(
        revision=reg.revision + 1 if changed else reg.revision,
        services=services,
        by_vip4=by_vip4,
        by_vip6=by_vip6,
        hostnames=hostnames,
        held4=held4,
        held6=held6,
        ns_ports=ns_ports,
        ports=ports,
        _index=_Index(index.domains, index.range4, index.range6, idx4, idx6),
    )


def _copy(table: Mapping[_K, _V]) -> dict[_K, _V]:
    # dict.copy() clones the table as it is, holes left by deletes included;
    # dict(table) re-inserts every entry when there is a hole (3x slower).
    return table.copy() if isinstance(table, dict) else dict(table)


def _uncount(counts: dict[_K, int], item: _K) -> None:
    n = counts[item]
    if n > 1:
        counts[item] = n - 1
    else:
        del counts[item]


class _InUse:
    """A family's VIP table as the patch leaves it, without copying it."""

    __slots__ = ("gone", "old", "taken")

    def __init__(self, old: Mapping[int, ServiceKey], gone: Mapping[int, ServiceKey],
                 taken: Mapping[int, ServiceKey]) -> None:
        self.old, self.gone, self.taken = old, gone, taken

    def __contains__(self, vip: object) -> bool:
        return vip in self.taken or (vip in self.old and vip not in self.gone)


class _Either:
    """In use before this write or claimed by it: never handed to a newcomer."""

    __slots__ = ("a", "b")

    def __init__(self, a: Container[int], b: Container[int]) -> None:
        self.a, self.b = a, b

    def __contains__(self, vip: object) -> bool:
        return vip in self.a or vip in self.b


_PatchResult = tuple[dict[ServiceKey, int], Mapping[int, ServiceKey], Held, _FamilyIndex]


def _patch_family(family: int, reg: Registry, fam: _FamilyIndex, rng: VipRange | None,
                  removed: Sequence[Service], upserts: Sequence[ServiceSpec],
                  deleted: Mapping[ServiceKey, Service], now: float,
                  release: float) -> _PatchResult | None:
    """``_assign`` for a patch: the VIPs of the upserts and the new tables, None if rejected."""
    v4 = family == 4
    old_by_vip = reg.by_vip4 if v4 else reg.by_vip6
    old_held = reg.held4 if v4 else reg.held6
    first, last = (rng.first, rng.last) if rng is not None else (1, 0)
    unexpired, held_in_range, held_sorted = _unexpired(old_held, fam, first, last, now)
    held: Held = old_held if unexpired is None else unexpired
    gone: dict[int, ServiceKey] = {}  # addresses the patch frees
    for svc in removed:
        vip = svc.vip if v4 else svc.vip6
        if vip is not None:
            gone[vip] = svc.key
    taken: dict[int, ServiceKey] = {}  # addresses the patch claims
    in_use = _InUse(old_by_vip, gone, taken)
    assigned: dict[ServiceKey, int] = {}
    unheld: list[int] = []  # held addresses claimed again

    # 1. Explicit VIPs.
    open_keys: list[ServiceKey] = []
    for spec in upserts:
        vip = spec.vip if v4 else spec.vip6
        if vip is None:
            open_keys.append(spec.key)
        elif vip in in_use:
            return None  # used by another service: 409
        else:
            taken[vip] = spec.key
            assigned[spec.key] = vip
            if vip in held:
                unheld.append(vip)
                if first <= vip <= last:
                    held_in_range -= 1
    if rng is not None and open_keys:
        # 2. Kept VIPs.
        old_services = reg.services
        pending: list[ServiceKey] = []
        for key in open_keys:
            prev = old_services.get(key)
            vip = None if prev is None else prev.vip if v4 else prev.vip6
            if vip is not None and first <= vip <= last:
                if vip in in_use:
                    return None  # given to another service in this patch: 409
                taken[vip] = key
                assigned[key] = vip
            else:
                pending.append(key)
        # 3. Held VIPs back to their identity (the last one held for it).
        fresh = pending
        if pending and held:
            wanted = set(pending)
            owned = {owner: vip for vip, (_, owner) in held.items()
                     if owner in wanted and vip not in taken}
            if owned:
                fresh = []
                for key in pending:
                    vip = owned.get(key)
                    if vip is not None and first <= vip <= last:
                        taken[vip] = key
                        assigned[key] = vip
                        unheld.append(vip)
                        held_in_range -= 1
                    else:
                        fresh.append(key)
        # 4. New addresses after the highest one in use before this write. Addresses
        # the write frees stay unavailable: they are held from newcomers (SPEC §3).
        if fresh:
            claimed = sum(1 for v in taken if first <= v <= last and v not in old_by_vip)
            if rng.size - fam.in_range - claimed - held_in_range < len(fresh):
                return None  # exhausted: 507
            fresh = _rebuild_order(fresh, reg.services, deleted)
            cursor = _top(fam, old_by_vip, first, last) + 1
            vips = rng.allocate_many(cursor, len(fresh), _Either(old_by_vip, taken), held)
            if vips is None:  # pragma: no cover - guarded by the count above
                return None
            for key, vip in zip(fresh, vips, strict=True):
                taken[vip] = key
                assigned[key] = vip

    # The new tables: shared with the old snapshot when the patch leaves them as they are.
    by_vip: Mapping[int, ServiceKey] = old_by_vip
    if len(gone) != len(taken) or any(taken.get(v) != k for v, k in gone.items()):
        by_vip_new = _copy(old_by_vip)
        for vip in gone:
            del by_vip_new[vip]
        by_vip_new.update(taken)
        by_vip = by_vip_new
    released = [(vip, key) for vip, key in gone.items() if vip not in taken]
    if unheld or released:
        held_new = _copy(held) if unexpired is None else unexpired
        for vip in unheld:
            del held_new[vip]
        if released:
            if not held_new:
                held_sorted = True
            elif next(reversed(held_new.values()))[0] > release:
                held_sorted = False
            for vip, key in released:
                held_new[vip] = (release, key)
            held_in_range += sum(1 for vip, _ in released if first <= vip <= last)
        held = held_new
    in_range = fam.in_range + _count_in(taken, first, last) - _count_in(gone, first, last)
    top = _next_top(fam.top, assigned, in_use, first, last)
    return assigned, by_vip, held, _FamilyIndex(in_range, held_in_range, held_sorted, top)


def _count_in(vips: Iterable[int], first: int, last: int) -> int:
    return sum(1 for v in vips if first <= v <= last)


def _unexpired(old: Held, fam: _FamilyIndex, first: int, last: int, now: float
               ) -> tuple[dict[int, tuple[float, ServiceKey]] | None, int, bool]:
    """The held table without its expired entries (None: none expired, use it as
    it is), how many of those are in range, and whether it is in release order."""
    if not old:
        return None, 0, True
    if fam.held_sorted:
        expired: list[int] = []
        for vip, (until, _) in old.items():
            if until > now:
                break
            expired.append(vip)
        if not expired:
            return None, fam.held_in_range, True
        held = _copy(old)
        for vip in expired:
            del held[vip]
        return held, fam.held_in_range - _count_in(expired, first, last), True
    held = {v: h for v, h in old.items() if h[0] > now}
    return held, _count_in(held, first, last), _in_release_order(held)


def _rebuild_order(fresh: list[ServiceKey], old_services: Mapping[ServiceKey, Service],
                   deleted: Container[ServiceKey]) -> list[ServiceKey]:
    """``fresh`` in the order the full rebuild meets them (it allocates in that order):
    services rewritten in place first, in registry order, then the others in patch order."""
    staying = [key for key in fresh if key in old_services and key not in deleted]
    if not staying:
        return fresh
    if len(staying) > 1:
        wanted = set(staying)
        staying = [key for key in old_services if key in wanted]
    return staying + [key for key in fresh if key not in old_services or key in deleted]


def _top(fam: _FamilyIndex, by_vip: Mapping[int, ServiceKey], first: int, last: int) -> int:
    if fam.top is None:
        fam.top = _top_of(by_vip, first, last)  # a cache: the snapshot itself does not change
    return fam.top


def _next_top(old_top: int | None, assigned: Mapping[ServiceKey, int], in_use: Container[int],
              first: int, last: int) -> int | None:
    """The highest VIP in use in range after a patch, if it is known without a scan."""
    if old_top is None:
        return None
    added = max((v for v in assigned.values() if first <= v <= last), default=None)
    if old_top < first or old_top in in_use:  # none in range before, or the top stays
        return old_top if added is None or added < old_top else added
    if added is not None and added > old_top:
        return added
    return None


def _patch_hostnames(reg: Registry, removed: Sequence[Service], upserts: Sequence[ServiceSpec],
                     services: Mapping[ServiceKey, Service],
                     domains: tuple[str, ...]) -> Mapping[str, ServiceKey] | None:
    """``_check_hostnames`` for a patch: the host name table, None if rejected."""
    old = reg.hostnames
    freed = {host: svc.key for svc in removed for host in svc.hostnames}
    claimed: dict[str, ServiceKey] = {}

    def owner_of(host: str) -> ServiceKey | None:
        owner = claimed.get(host)
        if owner is None and host not in freed:
            owner = old.get(host)
        return owner

    for spec in upserts:
        key = spec.key
        for host in spec.hostnames:
            owner = owner_of(host)
            if owner is None:
                if host in domains:
                    return None  # an apex: 400
                owner = _generated_owner(host, services, domains)
                if owner is not None and owner != key:
                    return None  # another service's own name: 409
                claimed[host] = key
            elif owner != key:
                return None  # another service's host name: 409
    old_services = reg.services
    for spec in upserts:
        key = spec.key
        if key in old_services:
            continue  # its own names were never anybody's host name
        for domain in domains:
            for name in (canonical_name(*key, domain), kuma_name(*key, domain)):
                owner = None if name is None else owner_of(name)
                if owner is not None and owner != key:
                    return None  # a new service whose name another one lists: 409
    if len(freed) == len(claimed) and all(claimed.get(h) == k for h, k in freed.items()):
        return old
    hostnames = _copy(old)
    for host in freed:
        del hostnames[host]
    hostnames.update(claimed)
    return hostnames


# ---------------------------------------------------------------- restore


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
    base = Registry(revision, {}, by_vip4, by_vip6, {}, held4 or {}, held6 or {}, {}, {})
    reg = apply_put(base, specs, policy, now)
    return Registry(revision, reg.services, reg.by_vip4, reg.by_vip6, reg.hostnames,
                    reg.held4, reg.held6, reg.ns_ports, reg.ports, reg._index)
