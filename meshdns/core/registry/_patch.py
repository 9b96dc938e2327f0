"""The incremental PATCH: a new snapshot from the old one plus the patch's delta."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any, cast

from ._allocate import in_release_order, top_of
from ._layered import evolve
from ._nametable import MeshPorts, builtin_owner, mesh_builtin_ports, patch_names
from ._parse import wildcard_over_domain
from ._rebuild import build, make_registry, vips_given
from ._service import (
    EntryKey,
    EntrySpec,
    K,
    MeshService,
    MeshServiceSpec,
    Service,
    ServiceKey,
    ServiceSpec,
    V,
    bad_request,
    describe,
)
from ._snapshot import BuildIndex, FamilyIndex, Held, Registry, RegistryPolicy
from ._templates import (
    canonical_name,
    kuma_name,
)
from ._vip import VipRange, count_in

SHRINK_REBUILD_MIN = 10_000  # services; see patch_incremental


def apply_patch(reg: Registry, upserts: Sequence[EntrySpec], deletes: Iterable[EntryKey],
                policy: RegistryPolicy, now: float) -> Registry:
    """The registry after upserting and deleting, applied together or not at all.

    Deleting a missing service is a no-op: deletes are idempotent.
    """
    deletes = tuple(deletes)
    new = patch_incremental(reg, upserts, deletes, policy, now)
    if new is not None:
        return new
    return _patch_rebuild(reg, upserts, deletes, _positions(upserts), policy, now)


def patch_incremental(reg: Registry, upserts: Sequence[EntrySpec],
                      deletes: Sequence[EntryKey], policy: RegistryPolicy,
                      now: float) -> Registry | None:
    """``apply_patch`` when it can touch only the services it names (O(change)); None
    when it takes a full rebuild instead (a rejected patch, whose error the rebuild
    names, a snapshot built under another policy, or a patch that writes or deletes a
    mesh service: those are rebuilt whole for now)."""
    seen = _positions(upserts)
    mesh = any(len(key) == 5 for key in deletes) or any(
        spec.__class__ is MeshServiceSpec for spec in upserts)
    legacy_upserts = cast("Sequence[ServiceSpec]", upserts)
    legacy_deletes = cast("Sequence[ServiceKey]", deletes)
    index = reg._index
    if len(reg.services) >= SHRINK_REBUILD_MIN and 2 * len(deletes) > len(reg.services):
        # Deleting most of a big registry: the layered tables of an incremental PATCH
        # would keep the old snapshot's dicts (and so its services) alive until they
        # fold. Measured at 300k -> 3 services (in-process, hold 0 as on a follower):
        # RSS 256 MiB after the incremental PATCH, 73 MiB after the next one; with the
        # rebuild 184 MiB (then the VIP hold tables too, which hold 0 no longer keeps)
        # and then 44 MiB. The rebuild costs the size of the registry that remains.
        return None
    if index is not None and index.fits(policy) and reg.names.templates == policy.templates \
            and reg.names.select == policy.select:
        if mesh:
            # Mesh services in O(change) under the default names (their names are then
            # host names and built-in per-port names, no rendered table); with other
            # templates or dns.select, rebuilt whole.
            if not reg.names.is_default:
                return None
            return _patch_mesh(reg, index, upserts, deletes, seen, policy, now)
        return _patch_incremental(reg, index, legacy_upserts, legacy_deletes,
                                  cast("dict[ServiceKey, int]", seen), policy, now)
    return None


def _positions(upserts: Sequence[EntrySpec]) -> dict[EntryKey, int]:
    """Each upsert's index; RegistryError (400) for a service upserted twice."""
    seen: dict[EntryKey, int] = {}
    for i, spec in enumerate(upserts):
        key = spec.key
        if key in seen:
            raise bad_request(f"duplicate service {describe(key)} (also upsert[{seen[key]}])",
                       f"upsert[{i}]")
        seen[key] = i
    return seen


def _patch_rebuild(reg: Registry, upserts: Sequence[EntrySpec], deletes: Sequence[EntryKey],
                   seen: Mapping[EntryKey, int], policy: RegistryPolicy,
                   now: float) -> Registry:
    """``apply_patch`` from scratch: every service rewritten, the patched ones in place."""
    specs: dict[EntryKey, EntrySpec] = {key: s.to_spec() for key, s in reg.services.items()}
    for key in deletes:
        specs.pop(key, None)
    for spec in upserts:
        specs[spec.key] = spec
    return build(reg, specs, seen, policy, now, "upsert")


def check_disjoint(upserts: Sequence[EntrySpec], deletes: Sequence[EntryKey]) -> None:
    """RegistryError (400, naming the delete entry) when a PATCH both upserts and
    deletes one service: which of the two was meant is a guess, so neither is applied."""
    if not upserts or not deletes:
        return
    where = {spec.key: i for i, spec in enumerate(upserts)}
    for j, key in enumerate(deletes):
        i = where.get(key)
        if i is not None:
            raise bad_request(f"service {describe(key)} is both upserted (upsert[{i}]) and deleted: "
                       "a PATCH may do one or the other", f"delete[{j}]")


# ---------------------------------------------------------------- incremental PATCH
#
# Each index of the new snapshot is the old one plus a delta: what the patch
# frees (the deleted and the rewritten services) and what it claims (the
# upserts). An index the patch leaves as it was is shared with the old
# snapshot (snapshots are never mutated); the big ones (services, the VIP
# tables) evolve as layered maps sharing the old snapshot's dict (layered.py:
# O(change), not O(registry)), the others are copied once and the delta
# applied to the copy.


def _patch_incremental(reg: Registry, index: BuildIndex, upserts: Sequence[ServiceSpec],
                       deletes: Sequence[ServiceKey], seen: Mapping[ServiceKey, int],
                       policy: RegistryPolicy, now: float) -> Registry | None:
    """``apply_patch`` touching only the services the patch names, or None when
    the patch is rejected (the full rebuild then names the error).

    Relies on what every snapshot ``build`` makes holds under the policy it was
    built with: its indexes agree with its services, every allocated VIP lies
    in the range, no VIP is both in use and held, and no host name conflicts.
    """
    old_services = reg.services  # the keys it names are services'
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
        prev = old_services.get(key)
        if isinstance(spec, Service):
            svc = spec
        else:
            given4, given6 = vips_given(spec, prev, policy)
            svc = Service(spec.name, spec.namespace, spec.port, vip4[key], vip6.get(key),
                          spec.hostnames, given4, given6, labels=spec.labels, mesh=spec.mesh,
                          zone=spec.zone)
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
        # In place if it stays, else appended, as the rebuild orders.
        services = evolve(old_services, deleted, [(svc.key, svc) for svc in written])
    else:
        services = old_services

    builtins = reg.names.builtins
    hostnames = _patch_hostnames(reg, removed, upserts, services, policy.domains, builtins)
    if hostnames is None:
        return None
    names = patch_names(reg.names, removed, upserts, services, hostnames, policy.domains,
                        reg.mesh_ports)
    if names is None:
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

    return make_registry(reg.revision + 1 if changed else reg.revision, services, by_vip4, by_vip6,
                     hostnames, held4, held6, policy, idx4, idx6, (ns_ports, ports),
                     (reg.revision, len(old_services), tuple(svc.key for svc in written),
                      tuple(deleted)), names, mesh_keys=reg.mesh_keys,
                     mesh_ports=reg.mesh_ports)


def _patch_mesh(reg: Registry, index: BuildIndex, upserts: Sequence[EntrySpec],
                deletes: Sequence[EntryKey], seen: Mapping[EntryKey, int],
                policy: RegistryPolicy, now: float) -> Registry | None:
    """``_patch_incremental`` for a patch that writes or deletes mesh services (under the
    default names): the same VIP and host-name deltas, plus the built-in per-port names
    the mesh services own. None when rejected (the rebuild names the error)."""
    old: Mapping[Any, Any] = reg.entry_map
    deleted: dict[Any, Any] = {}
    for key in deletes:
        gone = old.get(key)
        if gone is not None:
            deleted[key] = gone
    removed = list(deleted.values())
    for spec in upserts:
        prev = old.get(spec.key)
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
    written: list[Any] = []
    changed = readded = False
    for spec in upserts:
        key = spec.key
        prev = old.get(key)
        svc: Any
        if isinstance(spec, Service):
            svc = spec
        else:
            given4, given6 = vips_given(spec, prev, policy)
            if isinstance(spec, MeshServiceSpec):
                svc = MeshService(spec.kind, spec.mesh, spec.zone, spec.namespace, spec.name,
                                  spec.ports, vip4.get(key), vip6.get(key), spec.hostnames,
                                  spec.labels, spec.endpoints, vip_given=given4,
                                  vip6_given=given6)
            else:
                svc = Service(spec.name, spec.namespace, spec.port, vip4[key], vip6.get(key),
                              spec.hostnames, given4, given6, labels=spec.labels,
                              mesh=spec.mesh, zone=spec.zone)
        if prev is not None and prev == svc:
            svc = prev
        else:
            changed = True
        readded = readded or key in deleted
        written.append(svc)
    dropped = [key for key in deleted if key not in seen]
    services: Mapping[Any, Any] = old
    if changed or dropped or readded:
        changed = changed or bool(dropped)
        services = evolve(old, deleted, [(svc.key, svc) for svc in written])
    # The built-in per-port names: the removed mesh services' freed, the upserted ones'
    # claimed; none may be a service's own key or another mesh service's.
    templates = policy.templates
    old_ports = reg.mesh_ports
    freed: set[tuple[str, str, str, int]] = set()
    for svc in removed:
        if isinstance(svc, MeshService):
            freed.update(entry for entry in mesh_builtin_ports(svc, templates)
                         if old_ports.get(entry) == svc.key)
    claimed: dict[tuple[str, str, str, int], Any] = {}

    def port_owner(entry: tuple[str, str, str, int]) -> Any:
        owner = claimed.get(entry)
        return owner if owner is not None or entry in freed else old_ports.get(entry)

    for spec in upserts:
        if isinstance(spec, MeshServiceSpec):
            for entry in mesh_builtin_ports(spec, templates):
                owner = port_owner(entry)
                if entry[1:] in services or owner not in (None, spec.key):
                    return None  # 409
                claimed[entry] = spec.key
        elif port_owner(("canonical", *spec.key)) is not None or \
                port_owner(("kuma", *spec.key)) is not None:
            return None  # a mesh service's per-port name: 409
    # O(change): the table evolves as a layered map (_layered.py).
    mesh_ports = evolve(old_ports, [e for e in freed if e not in claimed], claimed.items())
    builtins = reg.names.builtins
    hostnames = _patch_hostnames(reg, removed, upserts, services, policy.domains, builtins,
                                 mesh_ports)
    if hostnames is None:
        return None
    ns_ports, ports = _copy(reg.ns_ports), _copy(reg.ports)
    for key in dropped:
        if len(key) == 3:
            _uncount(ns_ports, (key[1], key[2]))
            _uncount(ports, key[2])
    for spec in upserts:
        if spec.key not in old and isinstance(spec, ServiceSpec):
            ns_ports[spec.namespace, spec.port] = ns_ports.get((spec.namespace, spec.port),
                                                               0) + 1
            ports[spec.port] = ports.get(spec.port, 0) + 1
    for entry in freed:  # the <ns>.svc.<port> nodes above canonical per-port names
        if entry[0] == "canonical" and entry not in claimed:
            _uncount(ns_ports, (entry[2], entry[3]))
            _uncount(ports, entry[3])
    for entry in claimed:
        if entry[0] == "canonical" and entry not in old_ports:
            ns_ports[entry[2], entry[3]] = ns_ports.get((entry[2], entry[3]), 0) + 1
            ports[entry[3]] = ports.get(entry[3], 0) + 1
    mesh_keys = evolve(reg.mesh_keys, [k for k in dropped if len(k) == 5 and k in reg.mesh_keys],
                       [(spec.key, None) for spec in upserts
                        if isinstance(spec, MeshServiceSpec) and spec.key not in reg.mesh_keys])
    return make_registry(reg.revision + 1 if changed else reg.revision, services, by_vip4,
                         by_vip6, hostnames, held4, held6, policy, idx4, idx6,
                         (ns_ports, ports),
                         (reg.revision, len(old), tuple(svc.key for svc in written),
                          tuple(deleted)), reg.names, mesh_keys=mesh_keys,
                         mesh_ports=mesh_ports)


def _copy(table: Mapping[K, V]) -> dict[K, V]:
    # dict.copy() clones the table as it is, holes left by deletes included;
    # dict(table) re-inserts every entry when there is a hole (3x slower).
    return table.copy() if isinstance(table, dict) else dict(table)


def _uncount(counts: dict[K, int], item: K) -> None:
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


_PatchResult = tuple[dict[Any, int], Mapping[int, Any], Held, FamilyIndex]


def _patch_family(family: int, reg: Registry, fam: FamilyIndex, rng: VipRange | None,
                  removed: Sequence[Any], upserts: Sequence[EntrySpec],
                  deleted: Mapping[Any, Any], now: float,
                  release: float) -> _PatchResult | None:
    """``assign_vips`` for a patch: the VIPs of the upserts and the new tables, None if rejected."""
    v4 = family == 4
    old_by_vip = reg.by_vip4 if v4 else reg.by_vip6
    old_held = reg.held4 if v4 else reg.held6
    first, last = (rng.first, rng.last) if rng is not None else (1, 0)
    unexpired, held_in_range, held_sorted = _unexpired(old_held, fam, first, last, now)
    held: Held = old_held if unexpired is None else unexpired
    gone: dict[int, Any] = {}  # addresses the patch frees
    for svc in removed:
        vip = svc.vip if v4 else svc.vip6
        if vip is not None:
            gone[vip] = svc.key
    taken: dict[int, Any] = {}  # addresses the patch claims
    in_use = _InUse(old_by_vip, gone, taken)
    assigned: dict[Any, int] = {}
    unheld: list[int] = []  # held addresses claimed again

    # 1. Explicit VIPs.
    open_keys: list[Any] = []
    for spec in upserts:
        vip = spec.vip if v4 else spec.vip6
        if vip is None:
            if spec.__class__ is not MeshServiceSpec or spec.allocates:
                open_keys.append(spec.key)  # (a mesh service's VIPs: all given or none)
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
        by_vip = evolve(old_by_vip, gone, taken.items())
    # Not held at all when the hold is over already (hold 0): as assign_vips.
    released = [(vip, key) for vip, key in gone.items() if vip not in taken] \
        if release > now else []
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
    return assigned, by_vip, held, FamilyIndex(in_range, held_in_range, held_sorted, top)


_count_in = count_in


def _unexpired(old: Held, fam: FamilyIndex, first: int, last: int, now: float
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
    return held, _count_in(held, first, last), in_release_order(held)


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


def _top(fam: FamilyIndex, by_vip: Mapping[int, ServiceKey], first: int, last: int) -> int:
    if fam.top is None:
        fam.top = top_of(by_vip, first, last)  # a cache: the snapshot itself does not change
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


def _patch_hostnames(reg: Registry, removed: Sequence[Any], upserts: Sequence[EntrySpec],
                     services: Mapping[Any, Any], domains: tuple[str, ...],
                     builtins: frozenset[str], mesh_ports: MeshPorts | None = None
                     ) -> Mapping[str, Any] | None:
    """``_check_hostnames`` for a patch: the host name table, None if rejected."""
    old = reg.hostnames
    freed = {host: svc.key for svc in removed for host in svc.hostnames}
    claimed: dict[str, Any] = {}

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
                if host in domains or wildcard_over_domain(host, domains) is not None:
                    return None  # an apex, or a wildcard over a served domain: 400
                other = builtin_owner(host, services, domains, builtins,
                                      reg.mesh_ports if mesh_ports is None else mesh_ports)
                if other is not None and other != key:
                    return None  # another service's own name: 409
                claimed[host] = key
            elif owner != key:
                return None  # another service's host name: 409
    old_services = reg.services
    for spec in upserts:
        key = spec.key
        if key in old_services:
            continue  # its own names were never anybody's host name
        if isinstance(spec, MeshServiceSpec):
            own = [canonical_name(n, ns, p, domain) if b == "canonical" else
                   kuma_name(n, ns, p, domain)
                   for b, n, ns, p in mesh_builtin_ports(spec, reg.names.templates)
                   for domain in domains]
            if any(name is not None and owner_of(name) not in (None, key) for name in own):
                return None  # a new mesh service whose per-port name another one lists
            continue
        if reg.mesh_ports and (("canonical", *key) in reg.mesh_ports
                               or ("kuma", *key) in reg.mesh_ports):
            return None  # a mesh service owns its per-port names: 409
        n, ns, p = cast(ServiceKey, key)
        for domain in domains:
            for name in (canonical_name(n, ns, p, domain) if "canonical" in builtins else None,
                         kuma_name(n, ns, p, domain) if "kuma" in builtins else None):
                owner = None if name is None else owner_of(name)
                if owner is not None and owner != key:
                    return None  # a new service whose name another one lists: 409
    if len(freed) == len(claimed) and all(claimed.get(h) == k for h, k in freed.items()):
        return old
    # A plain dict, copied: Zone() iterates every host name of each new snapshot,
    # which is several times slower over a layered map than the copy it saves.
    hostnames = _copy(old)
    for host in freed:
        del hostnames[host]
    hostnames.update(claimed)
    return hostnames


