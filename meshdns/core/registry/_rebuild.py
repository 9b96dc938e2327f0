"""The service registry: validated writes in, immutable snapshots out.

A write (a full PUT or a PATCH) is computed against the current snapshot into a
brand-new snapshot, or rejected whole with a :class:`RegistryError`. Nothing is
ever mutated in place, so whoever holds a snapshot (the DNS hot path, an HTTP
reader) sees one consistent registry, and swapping the current snapshot is a
single reference assignment.

A PATCH costs in the size of the patch, not of the registry: it starts from
the current snapshot's tables (shared when it leaves them alone; the services
and VIP tables evolved as layered maps over the old dicts, layered.py; the
others copied once) and touches only the services it names, with exactly the
meaning of a full rebuild (see "writes" below).

The core reads no clock: every call that deals with hold-downs takes ``now``.
"""


from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from itertools import islice
from typing import Any, cast

from ._allocate import BULK_STEP, assign_vips
from ._nametable import (
    DEFAULT_NAMES,
    MeshPorts,
    NameTable,
    build_names,
    builtin_owner,
    mesh_builtin_ports,
)
from ._parse import parse_deletes, parse_service, parse_services, wildcard_over_domain
from ._service import (
    MAX_HOSTNAMES_PER_SERVICE,
    NS_PORT_OF,
    PORT_OF,
    Entry,
    EntryKey,
    EntrySpec,
    MeshKey,
    MeshService,
    MeshServiceSpec,
    RegistryError,
    Service,
    ServiceKey,
    ServiceSpec,
    bad_request,
    describe,
    make_service,
)
from ._snapshot import BuildIndex, Delta, EntryHeld, FamilyIndex, Held, Registry, RegistryPolicy
from ._templates import canonical_name

__all__ = [
    "MAX_HOSTNAMES_PER_SERVICE", "Held", "Registry", "RegistryError", "RegistryPolicy",
    "Service", "ServiceKey", "ServiceSpec", "apply_put", "describe",
    "parse_deletes", "parse_service", "parse_services", "restore",
]

# ---------------------------------------------------------------- writes
#
# Both writes mean the same thing: the registry that the full list of services
# (for a PATCH: the current ones with the upserts and deletes applied) yields.
# ``build`` computes that from scratch; a PATCH goes through
# ``_patch_incremental``, which starts from the current indexes (layered or copied) and
# touches only the services the patch names, and falls back to ``build`` when
# the patch is rejected (so the error is found and named exactly as ``build``
# would) or when the policy changed since the snapshot was built.
#
# VIPs, per family: 1. explicit (given, must be unique); 2. kept (an identity
# keeps its address while it is in range); 3. re-used from hold (a deleted
# identity coming back); 4. new, the first free address after the highest one
# in use, skipping taken and held ones. Addresses no longer used are held for
# ``hold_seconds``.


def apply_put(reg: Registry, specs: Sequence[EntrySpec], policy: RegistryPolicy,
              now: float, path: str = "services") -> Registry:
    """The registry that replaces ``reg`` wholesale with ``specs``."""
    keys = [spec.key for spec in specs]
    old = reg.entry_map
    if old:
        # A service already present is keyed by its stored strings, not by the equal
        # ones just decoded from the request: those then die with the request
        # instead of doubling the names a re-PUT of 1M services keeps alive.
        keys = [k if (p := old.get(k)) is None else p.key for k in keys]
    by_key: dict[EntryKey, EntrySpec] = {}
    for lo in range(0, len(keys), BULK_STEP):  # see BULK_STEP
        by_key.update(zip(keys[lo:lo + BULK_STEP], specs[lo:lo + BULK_STEP], strict=True))
    if len(by_key) != len(keys):
        seen: dict[EntryKey, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise bad_request(f"duplicate service {describe(key)} (also {path}[{seen[key]}])",
                           f"{path}[{i}]")
            seen[key] = i
    return build(reg, by_key, _Positions(keys), policy, now, path)


class _Positions(Mapping[EntryKey, int]):
    """Each key's index in the write, as a mapping built only when first asked.

    Only error messages and services with extra host names ask, so a plain PUT
    of 100k services does not build a 100k-entry dict for them.
    """

    def __init__(self, keys: list[EntryKey]) -> None:
        self._keys = keys
        self._map: dict[EntryKey, int] | None = None

    def _index(self) -> dict[EntryKey, int]:
        if self._map is None:
            self._map = dict(zip(self._keys, range(len(self._keys)), strict=True))
        return self._map

    def __getitem__(self, key: EntryKey) -> int:
        return self._index()[key]

    def __iter__(self) -> Iterator[EntryKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index()


# ---------------------------------------------------------------- full rebuild


def build(reg: Registry, specs: dict[EntryKey, EntrySpec], where: Mapping[EntryKey, int],
           policy: RegistryPolicy, now: float, path: str) -> Registry:
    """The registry holding exactly ``specs`` (in that order).

    ``where`` gives the index in the write of the entries the client wrote; the
    others are the registry's own (a PATCH leaves them as they are). Those are
    checked first, so a conflict is found on the entry the client wrote and
    reported with that entry's field path.
    """
    stored_first: Iterable[tuple[EntryKey, EntrySpec]]
    if len(where) == len(specs):
        stored_first = specs.items()
    else:
        stored_first = ([item for item in specs.items() if item[0] not in where]
                        + [item for item in specs.items() if item[0] in where])
    mesh = [(k, spec) for k, spec in stored_first if spec.__class__ is not ServiceSpec
            and spec.__class__ is not Service] if reg.mesh_keys or _any_mesh(specs) else []
    mesh_ports = _mesh_ports(mesh, specs, where, policy, path)
    hostnames = _check_hostnames(specs, stored_first, where, policy, path, mesh_ports)
    names = build_names(specs, stored_first, where, hostnames, policy.templates,
                        policy.select, policy.domains, path, mesh_ports)
    mesh_keys: dict[MeshKey, None] = dict.fromkeys(k for k, _ in mesh)  # type: ignore[misc]
    vip4, by_vip4, held4, fam4 = assign_vips(4, reg, specs, stored_first, where, policy.range4,
                                         policy.hold_seconds, now, path, bool(mesh))
    vip6, by_vip6, held6, fam6 = assign_vips(6, reg, specs, stored_first, where, policy.range6,
                                         policy.hold_seconds, now, path, bool(mesh))
    old_services = reg.services
    services: dict[EntryKey, Entry]
    if mesh:
        return _build_mixed(reg, specs, policy, vip4, vip6, by_vip4, by_vip6, hostnames, held4,
                            held6, fam4, fam6, names, mesh_keys, mesh_ports)
    legacy = cast("dict[ServiceKey, ServiceSpec]", specs)  # no mesh service among them
    old_legacy = old_services
    if not old_services:  # a first load, a restore: every service is new
        # A spec parsed with both VIPs given is a Service already, with exactly the
        # VIPs assign_vips gave it (given ones are kept as they are).
        services = {key: spec if spec.__class__ is Service else make_service(
                        spec.name, spec.namespace, spec.port,
                        vip4[key] if spec.vip is None else spec.vip,
                        vip6.get(key) if spec.vip6 is None else spec.vip6,
                        spec.hostnames, spec.vip is not None, spec.vip6 is not None,
                        spec.labels, spec.mesh, spec.zone)
                    for key, spec in legacy.items()}
        return make_registry(reg.revision + 1 if services else reg.revision, services, by_vip4,
                         by_vip6, hostnames, held4, held6, policy, fam4, fam6, names=names)
    services = {}
    kept = 0
    for key, spec in legacy.items():
        if isinstance(spec, Service):  # both VIPs given: exactly the ones assigned
            prev = old_legacy.get(key)
            if (prev is not None and prev.vip == spec.vip and prev.vip6 == spec.vip6
                    and prev.hostnames == spec.hostnames and prev.vip_given
                    and prev.vip6_given and prev.labels == spec.labels
                    and prev.mesh == spec.mesh and prev.zone == spec.zone):
                services[key] = prev
                kept += 1
            else:
                services[key] = spec
            continue
        prev = old_legacy.get(key)
        if prev is None or (spec.vip is None and spec.vip6 is None):
            given4, given6 = spec.vip is not None, spec.vip6 is not None
        else:
            given4, given6 = vips_given(spec, prev, policy)
        v4 = spec.vip if spec.vip is not None else vip4[key]
        v6 = spec.vip6 if spec.vip6 is not None else vip6.get(key)
        if (prev is not None and prev.vip == v4 and prev.vip6 == v6
                and prev.hostnames == spec.hostnames and prev.vip_given == given4
                and prev.vip6_given == given6 and prev.labels == spec.labels
                and prev.mesh == spec.mesh and prev.zone == spec.zone):
            services[key] = prev  # equal as it is: no new object, and a cheap comparison
            kept += 1
        else:
            services[key] = make_service(spec.name, spec.namespace, spec.port, v4, v6,
                                          spec.hostnames, given4, given6, spec.labels,
                                          spec.mesh, spec.zone)
    changed = not kept == len(services) == len(old_services)
    return make_registry(reg.revision + 1 if changed else reg.revision, services, by_vip4, by_vip6,
                     hostnames, held4, held6, policy, fam4, fam6,
                     None if changed else (reg.ns_ports, reg.ports), names=names)




def _any_mesh(specs: Mapping[EntryKey, EntrySpec]) -> bool:
    return any(spec.__class__ is MeshServiceSpec for spec in specs.values())


def _mesh_ports(mesh: Sequence[tuple[EntryKey, EntrySpec]], specs: Mapping[EntryKey, EntrySpec],
                where: Mapping[EntryKey, int], policy: RegistryPolicy,
                path: str) -> dict[tuple[str, str, str, int], MeshKey]:
    """The built-in per-port names the mesh services own; 409 when a service or another
    mesh service has one of them (``(name, namespace, port)`` is unique across both
    forms wherever a built-in template applies)."""
    out: dict[tuple[str, str, str, int], MeshKey] = {}
    index = {t.builtin: i for i, t in enumerate(policy.templates) if t.builtin is not None}
    domain = policy.domains[0]
    for key, spec in mesh:
        assert isinstance(spec, MeshServiceSpec)
        mkey = spec.key
        for entry in mesh_builtin_ports(spec, policy.templates):
            builtin, name, namespace, port = entry
            other: EntryKey | None = (name, namespace, port)
            if other not in specs:
                other = out.setdefault(entry, mkey)
                if other == mkey:
                    continue
            assert other is not None
            shown = canonical_name(name, namespace, port, domain) if builtin == "canonical" \
                else f"{name}_{namespace}_svc_{port}.{domain}"
            at = where.get(key, -1)
            if at < 0:
                at = where.get(other, -1)
            raise RegistryError(409, f"{shown} is owned by both {describe(other)} and "
                                f"{describe(mkey)} (template {index[builtin]})",
                                f"{path}[{at}]" if at >= 0 else None)
    return out


def _build_mixed(reg: Registry, specs: Mapping[EntryKey, EntrySpec], policy: RegistryPolicy,
                 vip4: Mapping[EntryKey, int], vip6: Mapping[EntryKey, int],
                 by_vip4: Mapping[int, EntryKey], by_vip6: Mapping[int, EntryKey],
                 hostnames: Mapping[str, EntryKey], held4: EntryHeld, held6: EntryHeld,
                 fam4: FamilyIndex, fam6: FamilyIndex, names: NameTable,
                 mesh_keys: Mapping[MeshKey, None], mesh_ports: MeshPorts) -> Registry:
    """``build``'s last step for a registry holding mesh services: each entry made from
    its spec and the VIPs assigned, kept as the very object it was when equal."""
    old = reg.entry_map
    services: dict[EntryKey, Entry] = {}
    kept = 0
    for key, spec in specs.items():
        prev = old.get(key)
        new: Entry
        if isinstance(spec, Service):
            new = spec
        else:
            if prev is None or (spec.vip is None and spec.vip6 is None):
                given4, given6 = spec.vip is not None, spec.vip6 is not None
            else:
                given4, given6 = vips_given(spec, prev, policy)
            v4 = spec.vip if spec.vip is not None else vip4.get(key)
            v6 = spec.vip6 if spec.vip6 is not None else vip6.get(key)
            if isinstance(spec, MeshServiceSpec):
                new = MeshService(spec.kind, spec.mesh, spec.zone, spec.namespace, spec.name,
                                  spec.ports, v4, v6, spec.hostnames, spec.labels,
                                  spec.endpoints, vip_given=given4, vip6_given=given6)
            else:
                assert v4 is not None
                new = make_service(spec.name, spec.namespace, spec.port, v4, v6,
                                   spec.hostnames, given4, given6, spec.labels, spec.mesh,
                                   spec.zone)
        if prev is not None and prev == new:
            new = prev
            kept += 1
        services[key] = new
    changed = not kept == len(services) == len(old)
    return make_registry(reg.revision + 1 if changed else reg.revision, services, by_vip4,
                         by_vip6, hostnames, held4, held6, policy, fam4, fam6, names=names,
                         mesh_keys={} if mesh_keys is None else mesh_keys, mesh_ports=mesh_ports)


def vips_given(spec: EntrySpec, prev: Entry | None,
               policy: RegistryPolicy) -> tuple[bool, bool]:
    """Whether the VIP and the vip6 ``spec`` writes count as given by the control plane
    (kept as they are, even outside a changed CIDR) or stay allocated here.

    A VIP written is given, except the very address the service has now when that one
    was allocated and is inside the policy's range: writing back what
    ``GET /v1/services`` lists (an export applied again) leaves the service exactly as
    it is, so the write changes nothing. Outside the range (the CIDR changed since it
    was allocated) it is given: an allocated VIP always lies in the range, which the
    incremental PATCH relies on.
    """
    if prev is None:
        return spec.vip is not None, spec.vip6 is not None
    rng4, rng6 = policy.range4, policy.range6
    return (spec.vip is not None and (prev.vip_given or spec.vip != prev.vip
                                      or spec.vip not in rng4),
            spec.vip6 is not None and (prev.vip6_given or spec.vip6 != prev.vip6
                                       or rng6 is None or spec.vip6 not in rng6))


def make_registry(revision: int, services: Mapping[Any, Entry],
              by_vip4: Mapping[int, Any], by_vip6: Mapping[int, Any],
              hostnames: Mapping[str, Any], held4: Mapping[int, Any],
              held6: Mapping[int, Any],
              policy: RegistryPolicy, fam4: FamilyIndex, fam6: FamilyIndex,
              counts: tuple[Mapping[tuple[str, int], int], Mapping[int, int]] | None = None,
              delta: Delta | None = None, names: NameTable = DEFAULT_NAMES, *,
              mesh_keys: Mapping[MeshKey, None] | None = None,
              mesh_ports: MeshPorts | None = None) -> Registry:
    """A snapshot; ``counts`` are its (ns, port) and port counts when already known (the
    previous snapshot's for a re-PUT of what is there, updated ones for a PATCH), else
    they are counted; ``delta``: what a PATCH changed (see Registry._delta)."""
    if counts is None:
        ns_ports: Counter[tuple[str, int]] = Counter()
        ports: Counter[int] = Counter()
        keys = iter(services)
        while step := list(islice(keys, BULK_STEP)):  # see BULK_STEP
            if mesh_keys:
                step = [k for k in step if len(k) == 3]
            ns_ports.update(map(NS_PORT_OF, step))
            ports.update(map(PORT_OF, step))
        # The <ns>.svc.<port> nodes above mesh services' canonical per-port names.
        for builtin, _, ns, port in mesh_ports or ():
            if builtin == "canonical":
                ns_ports[ns, port] += 1
                ports[port] += 1
        counts = dict(ns_ports), dict(ports)
    return Registry(
        revision=revision,
        services=cast("Mapping[ServiceKey, Service]", services),
        by_vip4=cast("Mapping[int, ServiceKey]", by_vip4),
        by_vip6=cast("Mapping[int, ServiceKey]", by_vip6),
        hostnames=cast("Mapping[str, ServiceKey]", hostnames),
        held4=cast(Held, held4),
        held6=cast(Held, held6),
        ns_ports=counts[0],
        ports=counts[1],
        _index=BuildIndex(policy.domains, policy.range4, policy.range6, fam4, fam6),
        _delta=delta,
        names=names,
        mesh_keys={} if mesh_keys is None else mesh_keys,
        mesh_ports={} if mesh_ports is None else mesh_ports,
    )


def _check_hostnames(specs: Mapping[EntryKey, EntrySpec],
                     stored_first: Iterable[tuple[EntryKey, EntrySpec]],
                     where: Mapping[EntryKey, int], policy: RegistryPolicy,
                     path: str, mesh_ports: MeshPorts) -> dict[str, EntryKey]:
    owners: dict[str, EntryKey] = {}
    domains = policy.domains
    builtins = frozenset(t.builtin for t in policy.templates if t.builtin is not None)
    for key, spec in stored_first:
        if not spec.hostnames:
            continue
        i = where.get(key, -1)
        for j, host in enumerate(spec.hostnames):
            if host in domains:
                raise bad_request(f"{host!r} is a served domain apex, not a service name",
                           _host_field(path, i, j) or path)
            covered = wildcard_over_domain(host, domains)
            if covered is not None:
                raise bad_request(f"wildcard {host!r} would cover the served domain "
                                  f"{covered!r}: its parent must lie below it",
                                  _host_field(path, i, j) or path)
            owner = owners.get(host) or builtin_owner(host, specs, domains, builtins,
                                                      mesh_ports)
            if owner is not None and owner != key:
                raise RegistryError(409, f"host name {host!r} of {describe(key)} is already "
                                    f"owned by {describe(owner)}", _host_field(path, i, j))
            owners[host] = key
    return owners


def _host_field(path: str, i: int, j: int) -> str | None:
    return f"{path}[{i}].hostnames[{j}]" if i >= 0 else None


# ---------------------------------------------------------------- restore


def restore(revision: int, specs: Sequence[EntrySpec],
            allocated: Mapping[Any, tuple[int | None, int | None]],
            policy: RegistryPolicy, held4: Held | None = None, held6: Held | None = None,
            now: float = 0.0) -> Registry:
    """Rebuild a saved snapshot under the current policy, keeping its revision.

    ``specs`` carry only the VIPs the control plane gave; ``allocated`` holds the
    addresses this server had allocated, which are kept while they are inside
    the (possibly changed) CIDR and re-allocated otherwise.
    """
    by_vip4 = {v4: key for key, (v4, _) in allocated.items() if v4 is not None}
    by_vip6 = {v6: key for key, (_, v6) in allocated.items() if v6 is not None}
    base = Registry(revision, {}, cast("dict[int, ServiceKey]", by_vip4),
                    cast("dict[int, ServiceKey]", by_vip6), {}, held4 or {}, held6 or {}, {}, {})
    reg = apply_put(base, specs, policy, now)
    return replace(reg, revision=revision, _delta=None)
