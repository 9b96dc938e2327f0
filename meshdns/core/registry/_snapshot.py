"""A registry snapshot: the services, their VIP indexes, the policy writes follow.

Snapshots are immutable: a write makes a new one (_rebuild.py: full rebuilds;
_patch.py: incremental PATCH), so whoever holds one sees one consistent registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ._nametable import DEFAULT_NAMES, MeshPorts, NameTable
from ._service import (
    Entry,
    EntryKey,
    MeshKey,
    Service,
    ServiceKey,
)
from ._templates import DEFAULT_HOSTNAME_TEMPLATES, HostnameTemplate, Selector
from ._vip import VipRange


@dataclass(frozen=True)
class RegistryPolicy:
    """What a write is checked against: served domains, VIP ranges, hold-down."""

    domains: tuple[str, ...] = ("mesh",)
    range4: VipRange = field(default_factory=lambda: VipRange.from_cidr("240.0.0.0/4"))
    range6: VipRange | None = field(
        default_factory=lambda: VipRange.from_cidr("fd00:fd00::/64"))
    hold_seconds: float = 300.0
    templates: tuple[HostnameTemplate, ...] = DEFAULT_HOSTNAME_TEMPLATES
    select: Selector = ()  # dns.select matchLabels: the services this instance answers for


Held = Mapping[int, tuple[float, ServiceKey]]  # vip -> (release time, last owner)
# The same, as the core fills it: the last owner may be a mesh service.
EntryHeld = Mapping[int, tuple[float, EntryKey]]


@dataclass(slots=True)
class FamilyIndex:
    """Counts over one address family of a snapshot, so a PATCH need not scan it."""

    in_range: int  # VIPs in use inside the policy range
    held_in_range: int  # held VIPs inside the policy range
    held_sorted: bool  # held table in release-time order: expiry pops a prefix
    # Highest VIP in use inside the range (first - 1: none); None: not known yet.
    top: int | None = None


@dataclass(slots=True)
class BuildIndex:
    """What a snapshot was built under, and its per-family counts."""

    domains: tuple[str, ...]
    range4: VipRange
    range6: VipRange | None
    fam4: FamilyIndex
    fam6: FamilyIndex

    def fits(self, policy: RegistryPolicy) -> bool:
        return (self.domains == policy.domains and self.range4 == policy.range4
                and self.range6 == policy.range6)


Delta = tuple[int, int, tuple[ServiceKey, ...], tuple[ServiceKey, ...]]


@dataclass(frozen=True, eq=False)
class Registry:
    """One immutable registry snapshot plus the indexes DNS answers from."""

    revision: int
    # Entries of both forms (docs/meshservice.md section 1): services keyed by
    # (name, namespace, port), mesh services by (kind, mesh, zone, namespace, name).
    # Typed as the legacy form for the callers that only ever meet services (the etcd
    # layout refuses mesh services before they reach it); code that may meet a mesh
    # service reads ``entry_map`` / ``entries()`` or checks the key's length.
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
    _index: BuildIndex | None = field(default=None, repr=False)
    # What an incremental PATCH changed relative to the snapshot it was applied to:
    # (that snapshot's revision and size, keys written, keys deleted); None when not
    # known. Lets the state journal record a PATCH without comparing every service.
    _delta: Delta | None = field(default=None, repr=False)
    # Template-rendered names and what dns.select hides (see _nametable.py).
    names: NameTable = field(default=DEFAULT_NAMES, repr=False)
    # Mesh services: their keys (GET lists them after the services, sorted), and the
    # built-in per-port names they own ((builtin, name, namespace, port) -> key).
    mesh_keys: Mapping[MeshKey, None] = field(default_factory=dict, repr=False)
    mesh_ports: MeshPorts = field(default_factory=dict, repr=False)

    def touched_since(self, base: Registry
                      ) -> tuple[tuple[ServiceKey, ...], tuple[ServiceKey, ...]] | None:
        """(keys written, keys deleted) when this snapshot is one incremental PATCH
        applied to ``base``; None when that is not known (a full rebuild, another base)."""
        delta = self._delta
        if delta is None or delta[:2] != (base.revision, len(base.services)):
            return None
        return delta[2], delta[3]

    @classmethod
    def empty(cls) -> Registry:
        return cls(0, {}, {}, {}, {}, {}, {}, {}, {})

    def __len__(self) -> int:
        return len(self.services)

    @property
    def entry_map(self) -> Mapping[EntryKey, Entry]:
        """``services`` as what it holds: entries of both forms."""
        return cast("Mapping[EntryKey, Entry]", self.services)

    def entries(self) -> list[Entry]:
        """Every entry in listing order: services in registry order, then mesh services
        by key."""
        if not self.mesh_keys:
            return list(self.services.values())
        services = self.entry_map
        return [s for s in services.values() if s.__class__ is Service] + \
            [services[k] for k in sorted(self.mesh_keys)]

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "services": [s.to_json() for s in self.entries()],
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


# free_vips_after compares held tables entry by entry up to this size (VIPs released by
# deletes are held for a while); larger ones are counted in full instead.
HELD_DIFF_LIMIT = 4096


def free_vips_after(base: Registry, base_free: Mapping[str, int], reg: Registry,
                    policy: RegistryPolicy) -> dict[str, int] | None:
    """``reg.free_vips(policy)`` from ``base``'s, in O(change) when ``reg`` is one PATCH
    on ``base`` (a follower's delta, say); None when it cannot tell that cheaply.

    ``free_vips`` itself is O(1) when a snapshot's index was built under ``policy``;
    a follower's is built without an IPv6 range (it allocates nothing), so without
    this every scrape after a change would count the whole IPv6 table again. Only
    addresses the patch touched can change state: the VIPs of the services it wrote
    or deleted, and the held ones it added or dropped.
    """
    touched_keys = reg.touched_since(base)
    if touched_keys is None:
        return None
    out = dict(base_free)
    families = [("ipv4", policy.range4, base.by_vip4, base.held4, reg.by_vip4, reg.held4)]
    if policy.range6 is not None:
        families.append(("ipv6", policy.range6, base.by_vip6, base.held6, reg.by_vip6,
                         reg.held6))
    keys = {*touched_keys[0], *touched_keys[1]}
    for i, (family, rng, used0, held0, used1, held1) in enumerate(families):
        if family not in out:
            return None
        touched: set[int] = set()
        for key in keys:
            for svc in (base.services.get(key), reg.services.get(key)):
                vip = None if svc is None else svc.vip6 if i else svc.vip
                if vip is not None:
                    touched.add(vip)
        if held0 is not held1:
            if len(held0) + len(held1) > HELD_DIFF_LIMIT:
                return None
            touched.update(v for v in held0 if v not in held1)
            touched.update(v for v in held1 if v not in held0)
        for vip in touched:
            if vip in rng:
                out[family] += (vip in used0 or vip in held0) - (vip in used1 or vip in held1)
    return out


def _free(rng: VipRange, taken: Mapping[int, Any], held: Held) -> int:
    used = sum(1 for v in taken if v in rng) + sum(1 for v in held if v in rng and v not in taken)
    return rng.size - used
