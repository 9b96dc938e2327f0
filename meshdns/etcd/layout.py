"""How the registry is laid out in etcd, and turning keys into snapshots and back (no IO).

Under the prefix (default ``/meshdns/``):

``services/<namespace>/<name>/<port>``
    one key per service, a JSON object: name, namespace, port, vip, vip6,
    hostnames, and whether each VIP was given by the control plane (``vip_given``,
    ``vip6_given``: a given VIP is kept as it is, an allocated one moves when the
    CIDR does; what the state file keeps too).
``meshservices/<kind>/<mesh>/<zone>/<namespace>/<name>``
    one key per mesh service (docs/meshservice.md section 7), ``_`` for an absent
    mesh, zone or namespace (never an RFC 1123 label: no clash), its JSON record with
    ``vip_given``/``vip6_given`` as a service's. A registry of services only has none.
``vips/<ip>``
    the claim on one VIP, ``{"owner": [name, namespace, port]}`` (a mesh service's:
    ``{"owner": {"kind", "mesh", "zone", "namespace", "name"}}``, an object so that
    today's decoder never reads it as a service's key). It is created
    (``create_revision == 0`` compare) in the transaction that gives the VIP out,
    so two writers can never hold one VIP. A freed VIP's claim becomes
    ``{"owner": ..., "held": true}`` on a lease of ``registry.vip_hold_seconds``:
    while it exists, the VIP is held from newcomers on every instance; etcd
    deletes it when the lease runs out.
``revision``
    touched by every meshdns write. Its mod_revision is what a write is computed
    against: the transaction compares it, so any write that committed in between
    fails the compare, and the writer re-syncs and computes again. Its value names
    the current *generation*: empty, the registry is the ``services/`` and ``vips/``
    keys right under the prefix; ``g/<id>/``, it is ``g/<id>/services/...`` and
    ``g/<id>/vips/...`` instead (the *root* of the registry's keys).
``g/<id>/...``
    a generation written by a write too large for one etcd transaction (a PUT of
    thousands: docs/scaling.md, "Writes larger than one transaction"). It is staged
    in many transactions, invisible to every reader (nothing reads keys outside the
    current root), and becomes the registry in one small transaction that points the
    ``revision`` key at it. A generation that is neither current nor being written
    is garbage, deleted by whichever instance finds it.
``gens/<id>``
    the marker of a generation being written, on its writer's lease: while it
    exists the writer is alive and the generation is not garbage. The commit
    compares that it still exists; the garbage collector deletes a generation only
    once its marker is gone (and it is not the current one).

The prefix is *written* once it holds the ``revision`` key, any ``services/`` or
any ``meshservices/`` key: a first write made it (a PUT of no services included, which commits the
``revision`` key alone). Until then there is no registry, which is not the same
as an empty one: a fresh install before the control plane's first write, or a
mistyped prefix. Mesh names get SERVFAIL meanwhile, never an authoritative NXDOMAIN.

The registry revision (ETag, If-Match, SOA serial) is the etcd revision of the
newest write: the same number on every instance that applied it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from ..core.registry import (
    Entry,
    EntryKey,
    Held,
    MeshKey,
    MeshService,
    MeshServiceSpec,
    Registry,
    RegistryError,
    RegistryPolicy,
    Service,
    ServiceKey,
    ServiceSpec,
    apply_patch,
    count_in,
    evolve,
    parse_entry,
    parse_ip,
    parse_service,
    patch_incremental,
    restore,
)
from ..core.registry import (
    in_release_order as _in_release_order,  # the index a held table is kept with
)
from ..store import fast_ip4, fast_ip6, service_record

SERVICES = "services/"
MESHSERVICES = "meshservices/"
ABSENT = "_"  # an absent mesh, zone or namespace in a mesh service's key
VIPS = "vips/"
REVISION = "revision"
GENERATIONS = "g/"
STAGING = "gens/"
# A held VIP stays held on every instance until etcd deletes its claim (lease expiry),
# not until a local clock says so: local clocks and etcd's lease timing differ.
HELD_UNTIL_DELETED = 1e12


class LayoutError(ValueError):
    """A key or value under the prefix that meshdns did not write (or cannot read)."""


def root_of(value: bytes) -> str:
    """The root of the registry's keys the ``revision`` key's value names (see above)."""
    text = value.decode("utf-8", "replace")
    if text and not (text.startswith(GENERATIONS) and text.endswith("/")
                     and text.count("/") == 2 and len(text) > len(GENERATIONS) + 1):
        raise LayoutError(f"{REVISION}: names no generation ({text[:60]!r})")
    return text


def generation_root(gen_id: str) -> str:
    return f"{GENERATIONS}{gen_id}/"


def relative(prefix: str, root: str, key: str) -> str | None:
    """``key`` relative to the registry's root (``revision`` as it is); None for a key
    of another generation or a marker (not the registry, not foreign either); "" for
    a key outside the prefix."""
    rel = key[len(prefix):] if key.startswith(prefix) else ""
    if rel == REVISION:
        return rel
    if root:
        return rel[len(root):] if rel.startswith(root) else None
    return None if rel.startswith((GENERATIONS, STAGING)) else rel


def service_key(prefix: str, key: ServiceKey) -> str:
    name, namespace, port = key
    return f"{prefix}{SERVICES}{namespace}/{name}/{port}"


def mesh_path(key: MeshKey) -> str:
    """``<kind>/<mesh>/<zone>/<namespace>/<name>`` (under ``meshservices/``)."""
    kind, mesh, zone, namespace, name = key
    return f"{kind}/{mesh or ABSENT}/{zone or ABSENT}/{namespace or ABSENT}/{name}"


def entry_key(prefix: str, key: EntryKey) -> str:
    """The key of an entry of either form (a 3-tuple: a service, a 5-tuple: a mesh
    service)."""
    if len(key) == 5:
        return f"{prefix}{MESHSERVICES}{mesh_path(key)}"
    return service_key(prefix, key)


def claim_key(prefix: str, family: int, vip: int) -> str:
    return f"{prefix}{VIPS}{fast_ip4(vip) if family == 4 else fast_ip6(vip)}"


def encode_service(s: Entry) -> bytes:
    return json.dumps(service_record(s), separators=(",", ":")).encode()


def decode_service(rel: str, data: bytes) -> Service:
    """The service stored under ``services/<rel>``; LayoutError if it is not one."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        given = bool(doc.pop("vip_given", False)), bool(doc.pop("vip6_given", False))
        spec = parse_service(doc, "value")
    except (ValueError, RegistryError) as exc:
        raise LayoutError(f"services/{rel}: {exc}") from None
    if spec.vip is None:
        raise LayoutError(f"services/{rel}: no vip")
    if f"{spec.namespace}/{spec.name}/{spec.port}" != rel:
        raise LayoutError(f"services/{rel}: holds {spec.namespace}/{spec.name}/{spec.port}")
    return Service(spec.name, spec.namespace, spec.port, spec.vip, spec.vip6, spec.hostnames,
                   given[0], given[1], labels=spec.labels, mesh=spec.mesh, zone=spec.zone)


def decode_mesh(rel: str, data: bytes) -> MeshService:
    """The mesh service stored under ``meshservices/<rel>``; LayoutError if it is not one."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or "ports" not in doc:
            raise ValueError("not a mesh service record")
        given = bool(doc.pop("vip_given", False)), bool(doc.pop("vip6_given", False))
        spec = parse_entry(doc, "value")
    except (ValueError, RegistryError) as exc:
        raise LayoutError(f"{MESHSERVICES}{rel}: {exc}") from None
    assert isinstance(spec, MeshServiceSpec)
    if spec.vip is None and spec.vip6 is None:
        raise LayoutError(f"{MESHSERVICES}{rel}: no vip")
    if mesh_path(spec.key) != rel:
        raise LayoutError(f"{MESHSERVICES}{rel}: holds {mesh_path(spec.key)}")
    return MeshService(spec.kind, spec.mesh, spec.zone, spec.namespace, spec.name,
                       spec.ports, spec.vip, spec.vip6, spec.hostnames, spec.labels,
                       vip_given=given[0], vip6_given=given[1])


def parse_mesh_path(rel: str) -> MeshKey:
    parts = rel.split("/")
    if len(parts) != 5 or not all(parts):
        raise LayoutError(f"{MESHSERVICES}{rel}: not <kind>/<mesh>/<zone>/<namespace>/<name>")
    kind, mesh, zone, namespace, name = parts
    return (kind, "" if mesh == ABSENT else mesh, "" if zone == ABSENT else zone,
            "" if namespace == ABSENT else namespace, name)


def parse_service_path(rel: str) -> ServiceKey:
    parts = rel.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise LayoutError(f"services/{rel}: not <namespace>/<name>/<port>")
    return (parts[1], parts[0], int(parts[2]))


_OWNER_FIELDS = ("kind", "mesh", "zone", "namespace", "name")


def encode_claim(owner: EntryKey, held: bool) -> bytes:
    doc: dict[str, Any] = {"owner": dict(zip(_OWNER_FIELDS, owner, strict=True))
                           if len(owner) == 5 else list(owner)}
    if held:
        doc["held"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Claim:
    family: int
    vip: int
    owner: EntryKey
    held: bool


def decode_claim(rel: str, data: bytes) -> Claim:
    family = 6 if ":" in rel else 4
    vip = parse_ip(rel, family)
    try:
        doc = json.loads(data)
        owner = doc["owner"]
        key: EntryKey
        if isinstance(owner, dict):  # a mesh service's
            key = (str(owner["kind"]), str(owner.get("mesh") or ""),
                   str(owner.get("zone") or ""), str(owner.get("namespace") or ""),
                   str(owner["name"]))
        else:
            key = (str(owner[0]), str(owner[1]), int(owner[2]))
        held = doc.get("held") is True
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise LayoutError(f"vips/{rel}: {exc!r}") from None
    if vip is None:
        raise LayoutError(f"vips/{rel}: not an IP address")
    return Claim(family, vip, key, held)


# ---------------------------------------------------------------- etcd -> snapshot


@dataclass
class Listing:
    """What one full read of the prefix found."""

    services: list[Entry] = field(default_factory=list)  # of both forms
    claims: list[Claim] = field(default_factory=list)
    revision: int = 0  # of the newest service or revision-key write
    bad: list[str] = field(default_factory=list)  # keys skipped, with why
    written: bool = False  # the revision key, a services/ or meshservices/ key (see above)
    root: str = ""  # the generation the revision key names
    foreign: int = 0  # keys under the prefix outside meshdns's layout (another prefix's?)
    foreign_example: str = ""


# How encode_claim's value of a claim in use starts (a service's, a mesh service's).
_LIVE_CLAIM = (b'{"owner":[', b'{"owner":{')
_HELD = b'"held"'


def decode_listing(prefix: str, entries: Iterable[tuple[str, bytes, int]], root: str = ""
                   ) -> tuple[Listing, dict[str, int], int]:
    """``(key, value, mod_revision)`` of a full read of the registry (the revision key
    and the keys under ``root``): the listing, every claim's mod_revision, and the
    revision key's (0: none). Bad keys are listed; other generations' are skipped."""
    listing = Listing(root=root)
    claims: dict[str, int] = {}
    write_rev = 0
    for key, value, mod in entries:
        rel = relative(prefix, root, key)
        if rel is None:
            continue
        try:
            if rel.startswith(SERVICES):
                listing.written = True
                listing.services.append(decode_service(rel[len(SERVICES):], value))
                listing.revision = max(listing.revision, mod)
            elif rel.startswith(MESHSERVICES):
                listing.written = True
                listing.services.append(decode_mesh(rel[len(MESHSERVICES):], value))
                listing.revision = max(listing.revision, mod)
            elif rel.startswith(VIPS):
                if not value.startswith(_LIVE_CLAIM) or _HELD in value:
                    # Held (or not as meshdns writes a live one): read it. A live claim is
                    # not decoded, its owner is the service of that VIP: two of them per
                    # service are most of a listing (a third of its decoding at 100,000).
                    listing.claims.append(decode_claim(rel[len(VIPS):], value))
                claims[key] = mod
            elif rel == REVISION:
                listing.written = True
                listing.root = root_of(value)
                write_rev = mod
                listing.revision = max(listing.revision, mod)
            else:
                listing.foreign += 1
                listing.foreign_example = listing.foreign_example or key
        except LayoutError as exc:
            listing.bad.append(str(exc))
    return listing, claims, write_rev


def build_snapshot(listing: Listing, policy: RegistryPolicy, now: float) -> Registry:
    """The registry a listing holds, VIPs as stored (O(n): start-up and re-lists)."""
    specs: list[ServiceSpec | MeshServiceSpec] = []
    allocated: dict[EntryKey, tuple[int | None, int | None]] = {}
    partial: list[MeshService] = []
    for s in listing.services:
        if s.__class__ is MeshService and s.vip_given is s.vip6_given is False and (
                s.vip is None or s.vip6 is None):
            # A mesh service allocated one family only (the other range exhausted, or
            # none configured when it was written): restored as allocated, the core would
            # allocate the other family now, which no other copy has. Named exactly
            # (the flags put back after), as a delta applies it.
            partial.append(s)
            specs.append(MeshServiceSpec(s.kind, s.mesh, s.zone, s.namespace, s.name,
                                         s.ports, s.vip, s.vip6, s.hostnames, s.labels))
            continue
        specs.append(s.to_spec())
        allocated[s.key] = (None if s.vip_given else s.vip,
                            None if s.vip6_given else s.vip6)
    # (Held is typed with the legacy key; the core keeps mesh services' keys in it too.)
    held4 = {c.vip: (HELD_UNTIL_DELETED, cast("ServiceKey", c.owner))
             for c in listing.claims if c.held and c.family == 4}
    held6 = {c.vip: (HELD_UNTIL_DELETED, cast("ServiceKey", c.owner))
             for c in listing.claims if c.held and c.family == 6}
    reg = restore(listing.revision, specs, allocated, policy, held4, held6, now)
    return _as_stored(reg, [(s.key, s) for s in partial]) if partial else reg


@dataclass
class Delta:
    """Events of one watch response, collapsed to the last one per key."""

    upserts: dict[EntryKey, Entry] = field(default_factory=dict)
    deletes: set[EntryKey] = field(default_factory=set)
    held: dict[tuple[int, int], EntryKey | None] = field(default_factory=dict)  # None: unheld
    revision: int = 0  # newest service or revision-key write in it (0: none)

    def service(self, svc: Entry) -> None:
        self.deletes.discard(svc.key)
        self.upserts[svc.key] = svc

    def delete(self, key: EntryKey) -> None:
        self.upserts.pop(key, None)
        self.deletes.add(key)


@dataclass
class Changes:
    """One watch response decoded: the registry delta plus the bookkeeping writes need."""

    delta: Delta = field(default_factory=Delta)
    claims: dict[str, int | None] = field(default_factory=dict)  # key -> mod_revision/None
    write_revision: int | None = None  # the revision key's new mod_revision (0: deleted)
    top: int = 0  # highest mod_revision in the response
    bad: list[str] = field(default_factory=list)
    written: bool = False  # the revision key, a services/ or meshservices/ key was put
    root: str | None = None  # the generation the revision key now names (None: not put)
    relevant: bool = False  # any event of the registry (not another generation's keys)


def decode_events(prefix: str, events: Iterable[tuple[str, bytes | None, int]],
                  root: str = "") -> Changes:
    """``(key, value or None for a delete, mod_revision)`` in etcd's order, collapsed;
    keys of generations other than ``root`` (being staged, or garbage) are skipped."""
    out = Changes()
    delta = out.delta
    for key, value, mod in events:
        out.top = max(out.top, mod)
        rel = relative(prefix, root, key)
        if rel is None:
            continue
        out.relevant = True
        try:
            if rel.startswith(SERVICES):
                path = rel[len(SERVICES):]
                if value is None:
                    delta.delete(parse_service_path(path))
                else:
                    out.written = True
                    delta.service(decode_service(path, value))
                delta.revision = max(delta.revision, mod)
            elif rel.startswith(MESHSERVICES):
                path = rel[len(MESHSERVICES):]
                if value is None:
                    delta.delete(parse_mesh_path(path))
                else:
                    out.written = True
                    delta.service(decode_mesh(path, value))
                delta.revision = max(delta.revision, mod)
            elif rel.startswith(VIPS):
                text = rel[len(VIPS):]
                out.claims[key] = None if value is None else mod
                if value is None:
                    family = 6 if ":" in text else 4
                    vip = parse_ip(text, family)
                    if vip is not None:
                        delta.held[(family, vip)] = None
                else:
                    claim = decode_claim(text, value)
                    delta.held[(claim.family, claim.vip)] = claim.owner if claim.held else None
            elif rel == REVISION:
                if value is not None:
                    out.root = root_of(value)
                out.write_revision = 0 if value is None else mod
                out.written = out.written or value is not None
                delta.revision = max(delta.revision, mod)
        except LayoutError as exc:
            out.bad.append(str(exc))
    return out


def apply_delta(base: Registry, delta: Delta, policy: RegistryPolicy, now: float) -> Registry:
    """``base`` plus a watch response, in O(change) (the core's incremental PATCH; the
    services come with their VIPs, so nothing is allocated here)."""
    new = base
    if delta.upserts or delta.deletes:
        new = _as_stored(apply_patch(base, _upserts(delta), _sorted(delta.deletes), policy,
                                     now), delta.upserts.items())
    return _with_claims(base, new, delta, policy)


def apply_delta_quick(base: Registry, delta: Delta, policy: RegistryPolicy, now: float
                      ) -> Registry | None:
    """``apply_delta`` when the core's incremental PATCH takes it (the store's ``quick``
    form, run on the event loop); None when it takes a full rebuild (off the loop)."""
    new: Registry | None = base
    if delta.upserts or delta.deletes:
        new = patch_incremental(base, _upserts(delta), _sorted(delta.deletes), policy, now)
        if new is not None:
            new = _as_stored(new, delta.upserts.items())
    return None if new is None else _with_claims(base, new, delta, policy)


def _sorted(keys: set[EntryKey]) -> list[EntryKey]:
    """Deletes in a stable order: services by key, then mesh services by key."""
    if all(len(k) == 3 for k in keys):
        return sorted(keys)
    return sorted(keys, key=lambda k: (len(k), k))


def _upserts(delta: Delta) -> list[ServiceSpec | MeshServiceSpec]:
    """The delta's entries as the core's PATCH takes them with their VIPs as stored. A
    service goes as it is (a Service: its VIPs and flags kept); a mesh service as the
    spec naming exactly its VIPs (a mesh service's VIPs are all given or none: none is
    allocated for a family it lacks). Whether each counts as given, _as_stored keeps
    as stored."""
    out: list[ServiceSpec | MeshServiceSpec] = []
    for s in delta.upserts.values():
        if s.__class__ is MeshService:
            out.append(MeshServiceSpec(s.kind, s.mesh, s.zone, s.namespace, s.name,
                                       s.ports, s.vip, s.vip6, s.hostnames, s.labels))
        else:
            out.append(s)
    return out


def _as_stored(new: Registry, stored: Iterable[tuple[EntryKey, Entry]]) -> Registry:
    """``new`` with the ``stored`` mesh services exactly as stored: the core's PATCH
    decides anew whether each VIP counts as given; the writer already did. A VIP
    that differs cannot be fixed here: RegistryError (the prefix is listed again)."""
    fixes: list[tuple[EntryKey, Entry]] = []
    entries = new.entry_map
    for key, svc in stored:
        if len(key) != 5:
            continue
        got = entries.get(key)
        if got is svc or got == svc:
            continue
        if got is None or got.vip != svc.vip or got.vip6 != svc.vip6:
            raise RegistryError(409, f"{mesh_path(key)} came out with "
                                "other VIPs than stored", MESHSERVICES)
        fixes.append((key, svc))
    if not fixes:
        return new
    services = evolve(entries, (), fixes)
    return replace(new, services=services)  # type: ignore[arg-type]


def _with_claims(base: Registry, new: Registry, delta: Delta, policy: RegistryPolicy
                 ) -> Registry:
    """``new`` (``base`` with the delta's services) with the held tables its claims say
    and the delta's revision."""
    held4 = _held(new.held4, new.by_vip4, delta, 4, base.held4)
    held6 = _held(new.held6, new.by_vip6, delta, 6, base.held6)
    if held4 is not None or held6 is not None:
        new = with_held(new, policy, held4, held6)
    revision = max(base.revision, delta.revision)
    return new if new.revision == revision else replace(new, revision=revision)


def _held(core: Held, in_use: Mapping[int, ServiceKey], delta: Delta, family: int,
          before: Held) -> dict[int, tuple[float, ServiceKey]] | None:
    """The held table etcd's claims say (the core's guess replaced); None: the core's
    table as it is. O(change) unless a claim changes it (then a copy of the table)."""
    # The core's own entries (a VIP this delta freed, at now + hold) stand until the
    # claim's event says otherwise; it comes in the same transaction.
    table: dict[int, tuple[float, ServiceKey]] | None = None
    for (fam, vip), owner in delta.held.items():
        if fam != family:
            continue
        current = core if table is None else table
        if owner is None or vip in in_use:
            if vip not in current:
                continue  # a claim taken (not held), a VIP not held: nothing to change
            if table is None:
                table = dict(core)
            del table[vip]
        elif current.get(vip) != (HELD_UNTIL_DELETED, owner):
            if table is None:
                table = dict(core)
            table[vip] = (HELD_UNTIL_DELETED, cast("ServiceKey", owner))
    return table


def with_held(reg: Registry, policy: RegistryPolicy,
              held4: dict[int, tuple[float, ServiceKey]] | None,
              held6: dict[int, tuple[float, ServiceKey]] | None) -> Registry:
    """``reg`` with other held tables, its per-family counts kept right."""
    idx = reg._index
    if idx is None:
        return replace(reg, held4=reg.held4 if held4 is None else held4,
                       held6=reg.held6 if held6 is None else held6)
    fam4, fam6 = idx.fam4, idx.fam6
    if held4 is not None:
        fam4 = replace(fam4, held_in_range=count_in(held4, policy.range4.first,
                                                    policy.range4.last),
                       held_sorted=_in_release_order(held4))
    if held6 is not None:
        r6 = policy.range6
        fam6 = replace(fam6, held_in_range=0 if r6 is None else count_in(held6, r6.first,
                                                                         r6.last),
                       held_sorted=_in_release_order(held6))
    return replace(reg, held4=reg.held4 if held4 is None else held4,
                   held6=reg.held6 if held6 is None else held6,
                   _index=replace(idx, fam4=fam4, fam6=fam6))


# ---------------------------------------------------------------- snapshot -> txn


@dataclass
class Plan:
    """One write as etcd operations: puts, deletes, claims to create or re-take."""

    puts: list[tuple[str, bytes]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    held: list[tuple[str, bytes]] = field(default_factory=list)  # on a hold lease
    must_not_exist: list[str] = field(default_factory=list)
    must_be: list[tuple[str, int]] = field(default_factory=list)  # (key, mod_revision)

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes or self.held)


def plan_write(prefix: str, base: Registry, new: Registry, claim_revisions: Mapping[str, int],
               ) -> Plan:
    """The etcd operations that turn ``base`` into ``new`` (O(change) for a PATCH)."""
    plan = Plan()
    patched = new.touched_since(base)
    touched: Iterable[ServiceKey]
    if patched is not None:
        touched = set(patched[0]) | set(patched[1])
    else:
        touched = set(base.services) | set(new.services)
    old_services, services = base.services, new.services
    vips: set[tuple[int, int]] = set()
    for key in touched:
        old, svc = old_services.get(key), services.get(key)
        if old == svc:
            continue
        for s in (old, svc):
            if s is not None:
                if s.vip is not None:  # (a mesh service may have only a vip6)
                    vips.add((4, s.vip))
                if s.vip6 is not None:
                    vips.add((6, s.vip6))
        if svc is None:
            plan.deletes.append(entry_key(prefix, key))
        else:
            plan.puts.append((entry_key(prefix, key), encode_service(svc)))
    for family, vip in vips:
        before = (base.by_vip4 if family == 4 else base.by_vip6).get(vip)
        after = (new.by_vip4 if family == 4 else new.by_vip6).get(vip)
        if before == after:
            continue
        ckey = claim_key(prefix, family, vip)
        if before is not None and after is None:
            plan.held.append((ckey, encode_claim(before, held=True)))
        if after is not None:
            plan.puts.append((ckey, encode_claim(after, held=False)))
        known = claim_revisions.get(ckey)
        if known is None:
            plan.must_not_exist.append(ckey)  # a VIP nobody holds: create its claim
        else:
            plan.must_be.append((ckey, known))  # held (or moved): exactly as we saw it
    return plan


def plan_generation(prefix: str, reg: Registry) -> Plan:
    """Every key of ``reg`` under ``prefix`` (a generation's root, layout above): each
    service, the claim on each of its VIPs, and each held VIP's claim (``held``: on a
    hold lease). O(n): a write too large for one transaction rewrites the registry."""
    plan = Plan()
    for key, s in reg.entry_map.items():
        plan.puts.append((entry_key(prefix, key), encode_service(s)))
        if s.vip is not None:  # (a mesh service may have only a vip6)
            plan.puts.append((claim_key(prefix, 4, s.vip), encode_claim(key, held=False)))
        if s.vip6 is not None:
            plan.puts.append((claim_key(prefix, 6, s.vip6), encode_claim(key, held=False)))
    for family, held, in_use in ((4, reg.held4, reg.by_vip4), (6, reg.held6, reg.by_vip6)):
        for vip, (_, owner) in held.items():
            if vip not in in_use:
                plan.held.append((claim_key(prefix, family, vip), encode_claim(owner, held=True)))
    return plan
