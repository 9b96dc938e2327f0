"""The etcd key layout without etcd: writes planned into keys, keys applied back as deltas.

A tiny in-memory key-value store with etcd's revision rules stands in for etcd
here (the real one runs in test_etcd.py); what is checked is the pure code: a
writer's snapshot turned into operations (plan_write), those operations seen as
watch events by another copy (decode_events + apply_delta, O(change)), and a full
listing (build_snapshot). After every random write, the copy that applied the
deltas, a fresh listing, and the writer's own snapshot must be the same registry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from meshdns.core.registry import (
    EntryKey,
    EntrySpec,
    MeshPort,
    MeshService,
    MeshServiceSpec,
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceSpec,
    VipRange,
    apply_patch,
)
from meshdns.etcd.client import prefix_end
from meshdns.etcd.layout import (
    HELD_UNTIL_DELETED,
    REVISION,
    SERVICES,
    VIPS,
    Claim,
    LayoutError,
    Listing,
    apply_delta,
    apply_delta_quick,
    build_snapshot,
    claim_key,
    decode_claim,
    decode_events,
    decode_listing,
    decode_mesh,
    decode_service,
    encode_claim,
    encode_service,
    entry_key,
    parse_mesh_path,
    plan_write,
    service_key,
)

P = "/m/"
POLICY = RegistryPolicy(domains=("mesh",), range4=VipRange.from_cidr("10.0.0.0/27"),
                        range6=VipRange.from_cidr("fd00::/123"), hold_seconds=300)


@dataclass
class Kv:
    """etcd's rules that matter here: one revision per transaction, mod/create revisions."""

    data: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)  # value, mod, create
    revision: int = 1
    leased: set[str] = field(default_factory=set)

    def txn(self, plan: object, write_rev: int) -> list[tuple[str, bytes | None, int]] | None:
        from meshdns.etcd.layout import Plan
        assert isinstance(plan, Plan)
        rk = P + REVISION
        if self.data.get(rk, (b"", 0, 0))[1] != write_rev:
            return None
        if any(k in self.data for k in plan.must_not_exist):
            return None
        if any(self.data.get(k, (b"", 0, 0))[1] != rev for k, rev in plan.must_be):
            return None
        self.revision += 1
        rev = self.revision
        events: list[tuple[str, bytes | None, int]] = []
        for k in plan.deletes:
            if self.data.pop(k, None) is not None:
                events.append((k, None, rev))
        for k, v in plan.puts + plan.held + [(rk, b"")]:
            create = self.data[k][2] if k in self.data else rev
            self.data[k] = (v, rev, create)
            events.append((k, v, rev))
            if (k, v) in plan.held:
                self.leased.add(k)
            else:
                self.leased.discard(k)
        return events

    def expire(self, key: str) -> list[tuple[str, bytes | None, int]]:
        self.revision += 1
        del self.data[key]
        self.leased.discard(key)
        return [(key, None, self.revision)]

    def listing(self) -> tuple[Listing, dict[str, int], int]:
        return decode_listing(P, ((k, v, mod) for k, (v, mod, _) in sorted(self.data.items())))


def same(a: Registry, b: Registry) -> None:
    assert a.revision == b.revision
    assert dict(a.services) == dict(b.services)
    assert list(a.services) == list(b.services) or set(a.services) == set(b.services)
    assert dict(a.by_vip4) == dict(b.by_vip4) and dict(a.by_vip6) == dict(b.by_vip6)
    assert dict(a.hostnames) == dict(b.hostnames)
    assert {v: o for v, (_, o) in a.held4.items()} == {v: o for v, (_, o) in b.held4.items()}
    assert {v: o for v, (_, o) in a.held6.items()} == {v: o for v, (_, o) in b.held6.items()}


def random_patch(rng: random.Random) -> tuple[list[ServiceSpec], list[tuple[str, str, int]]]:
    names = [(f"s{i}", "ns", 80) for i in range(24)]
    upserts, deletes = [], []
    for key in rng.sample(names, rng.randint(1, 5)):
        if rng.random() < 0.35:
            deletes.append(key)
        else:
            hosts = (f"h{rng.randint(0, 6)}.example.com",) if rng.random() < 0.2 else ()
            vip = 167772160 + rng.randint(1, 30) if rng.random() < 0.1 else None
            upserts.append(ServiceSpec(key[0], key[1], key[2], vip, None, hosts))
    return upserts, deletes


@pytest.mark.parametrize("seed", range(8))
def test_deltas_listing_and_writer_agree_through_random_writes(seed: int) -> None:
    rng = random.Random(seed)
    kv = Kv()
    now = 1000.0
    listing, claims, write_rev = kv.listing()
    copy = build_snapshot(listing, POLICY, now)
    # Another instance whose watch delivers several transactions in one batch.
    lagging, pending = copy, []
    applied = rejected = expired = quicks = 0
    for _ in range(300):
        now += 1
        if kv.leased and rng.random() < 0.15:  # a hold lease runs out
            events = kv.expire(rng.choice(sorted(kv.leased)))
            expired += 1
        else:
            upserts, deletes = random_patch(rng)
            try:
                new = apply_patch(copy, upserts, deletes, POLICY, now)
            except RegistryError:
                rejected += 1
                continue
            plan = plan_write(P, copy, new, claims)
            if not plan:
                continue
            result = kv.txn(plan, write_rev)
            assert result is not None, "a write from a current copy never fails its compare"
            events = result
            applied += 1
        changes = decode_events(P, events)
        assert not changes.bad
        # The mirror applies a small watch response on the loop (apply_delta_quick) when
        # the core's incremental PATCH takes it: the same registry as the full one.
        full = apply_delta(copy, changes.delta, POLICY, now)
        quick = apply_delta_quick(copy, changes.delta, POLICY, now)
        if quick is not None:
            same(quick, full)
            quicks += 1
        copy = full
        pending += events
        if rng.random() < 0.3:
            lagging = apply_delta(lagging, decode_events(P, pending).delta, POLICY, now)
            pending = []
            same(lagging, copy)
        for key, mod in changes.claims.items():
            if mod is None:
                claims.pop(key, None)
            else:
                claims[key] = mod
        if changes.write_revision is not None:
            write_rev = changes.write_revision
        # A fresh listing of the same keys is the same registry ...
        listing, listed_claims, listed_rev = kv.listing()
        same(copy, build_snapshot(listing, POLICY, now))
        assert (listed_claims, listed_rev) == (claims, write_rev)
        # ... every VIP in use has exactly one claim, owned by its service, and every
        # held VIP is held until etcd deletes its claim.
        for family, table in ((4, copy.by_vip4), (6, copy.by_vip6)):
            for vip, owner in table.items():
                claim = decode_claim(*_claim_of(kv, family, vip))
                assert (claim.owner, claim.held) == (owner, False)
        assert all(t == HELD_UNTIL_DELETED for t, _ in copy.held4.values())
    lagging = apply_delta(lagging, decode_events(P, pending).delta, POLICY, now)
    same(lagging, copy)
    assert applied > 100 and rejected > 0 and expired > 5 and quicks > applied // 2


def test_a_one_service_delta_leaves_the_held_tables_as_they_are() -> None:
    """O(change): a change whose claims hold nothing new keeps the held tables (the same
    objects, not copies), however many VIPs are held."""
    kv = Kv()
    listing, claims, write_rev = kv.listing()
    copy = build_snapshot(listing, POLICY, 1000.0)

    def write(upserts: list[ServiceSpec], deletes: list[tuple[str, str, int]]) -> None:
        nonlocal copy, write_rev
        new = apply_patch(copy, upserts, deletes, POLICY, 1000.0)
        events = kv.txn(plan_write(P, copy, new, claims), write_rev)
        assert events is not None
        changes = decode_events(P, events)
        for key, mod in changes.claims.items():
            if mod is None:
                claims.pop(key, None)
            else:
                claims[key] = mod
        write_rev = changes.write_revision or write_rev
        quick = apply_delta_quick(copy, changes.delta, POLICY, 1000.0)
        assert quick is not None
        copy = quick

    write([ServiceSpec(f"s{i}", "ns", 80, None, None, ()) for i in range(4)], [])
    write([], [(f"s{i}", "ns", 80) for i in range(3)])  # 3 VIPs (each family) held
    assert len(copy.held4) == 3 and len(copy.held6) == 3
    held4, held6 = copy.held4, copy.held6
    write([ServiceSpec("new", "ns", 80, None, None, ())], [])
    assert ("new", "ns", 80) in copy.services
    assert copy.held4 is held4 and copy.held6 is held6


def _claim_of(kv: Kv, family: int, vip: int) -> tuple[str, bytes]:
    from meshdns.etcd.layout import claim_key
    key = claim_key(P, family, vip)
    return key[len(P + VIPS):], kv.data[key][0]


def test_a_stale_writer_fails_its_compare_and_a_held_vip_is_not_given_out() -> None:
    kv = Kv()
    base = build_snapshot(Listing(), POLICY, 0.0)
    one = apply_patch(base, [ServiceSpec("a", "ns", 80)], [], POLICY, 1.0)
    events = kv.txn(plan_write(P, base, one, {}), 0)
    assert events is not None
    # A second writer still at the empty registry: its compare on the revision key fails.
    two = apply_patch(base, [ServiceSpec("b", "ns", 80)], [], POLICY, 1.0)
    assert kv.txn(plan_write(P, base, two, {}), 0) is None
    # Even ignoring the revision key, its VIP claim guard would fail: same first VIP.
    assert one.services[("a", "ns", 80)].vip == two.services[("b", "ns", 80)].vip
    assert any(k in kv.data for k in plan_write(P, base, two, {}).must_not_exist)


def test_keys_meshdns_did_not_write_are_reported_not_applied() -> None:
    changes = decode_events(P, [
        (P + SERVICES + "ns/a/80", b"{not json", 5),
        (P + SERVICES + "ns/a", b"{}", 5),
        (P + SERVICES + "other/a/80",  # a service stored under another's key
         b'{"name":"a","namespace":"ns","port":80,"vip":"10.0.0.1"}', 5),
        (P + VIPS + "not-an-ip", b'{"owner":["a","ns",80]}', 5),
        (P + "unrelated", b"x", 5),
    ])
    assert len(changes.bad) == 4
    listing, claims, write_rev = decode_listing(P, [
        (P + SERVICES + "ns/a/80", b"{not json", 5),
        (P + SERVICES + "ns/b/80", b'{"name":"b","namespace":"ns","port":80,"vip":"10.0.0.2",'
         b'"vip_given":true}', 6),
        (P + VIPS + "10.0.0.2", b'{"owner":["b","ns",80]}', 6),
        (P + REVISION, b"", 6),
    ])
    assert [s.key for s in listing.services] == [("b", "ns", 80)]
    assert listing.services[0].vip_given and not listing.services[0].vip6_given
    assert (len(listing.bad), claims, write_rev, listing.revision) == (
        1, {P + VIPS + "10.0.0.2": 6}, 6, 6)
    assert not changes.delta.upserts and not changes.delta.deletes
    assert changes.top == 5
    with pytest.raises(LayoutError, match="holds ns/a/80"):
        decode_service("other/a/80", b'{"name":"a","namespace":"ns","port":80,"vip":"10.0.0.1"}')
    assert service_key(P, ("a", "ns", 80)) == "/m/services/ns/a/80"
    svc = build_snapshot(Listing(), POLICY, 0.0)
    reg = apply_patch(svc, [ServiceSpec("a", "ns", 80, hostnames=("x.example.com",))], [],
                      POLICY, 0.0)
    stored = reg.services[("a", "ns", 80)]
    assert decode_service("ns/a/80", encode_service(stored)) == stored


def test_prefix_end_covers_exactly_the_prefix() -> None:
    assert prefix_end(b"/meshdns/") == b"/meshdns0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


# ---------------------------------------------------------------- mesh services


def mesh_spec(name: str, ports: tuple[int, ...] = (80, 443), *, namespace: str | None = "ns",
              mesh: str | None = "default", zone: str | None = None, vip: int | None = None,
              vip6: int | None = None, kind: str = "MeshService") -> MeshServiceSpec:
    return MeshServiceSpec(kind, mesh, zone, namespace, name,
                           tuple(MeshPort(p, f"p{p}") for p in ports), vip, vip6)


def random_mixed_patch(rng: random.Random) -> tuple[list[EntrySpec], list[EntryKey]]:
    """Services and mesh services (some with one family given, some in no namespace or
    zone), their upserts and deletes in one PATCH."""
    upserts: list[EntrySpec] = []
    deletes: list[EntryKey] = []
    legacy, mesh = random_patch(rng)
    upserts += legacy
    deletes += mesh
    for i in rng.sample(range(12), rng.randint(0, 3)):
        spec = mesh_spec(f"m{i}", tuple(sorted(rng.sample([80, 81, 443, 9090], 2))),
                         namespace=None if i % 4 == 0 else "ms",
                         zone="east" if i % 3 == 0 else None,
                         vip=167772160 + rng.randint(1, 30) if rng.random() < 0.15 else None)
        if rng.random() < 0.3:
            deletes.append(spec.key)
        else:
            upserts.append(spec)
    return upserts, deletes


@pytest.mark.parametrize("seed", range(6))
def test_mesh_services_deltas_listing_and_writer_agree(seed: int) -> None:
    """The random writes of the test above with mesh services among them: the copy that
    applies the watch's deltas (on the loop when the core takes them incrementally), a
    fresh listing and the writer are one registry, every VIP claimed once by its
    entry (a mesh service's claim owner an object)."""
    rng = random.Random(1000 + seed)
    kv = Kv()
    now = 1000.0
    listing, claims, write_rev = kv.listing()
    copy = build_snapshot(listing, POLICY, now)
    applied = meshes = quicks = 0
    for _ in range(200):
        now += 1
        if kv.leased and rng.random() < 0.1:
            events = kv.expire(rng.choice(sorted(kv.leased)))
        else:
            upserts, deletes = random_mixed_patch(rng)
            try:
                new = apply_patch(copy, upserts, deletes, POLICY, now)
            except RegistryError:
                continue
            plan = plan_write(P, copy, new, claims)
            if not plan:
                continue
            result = kv.txn(plan, write_rev)
            assert result is not None
            events = result
            applied += 1
        changes = decode_events(P, events)
        assert not changes.bad
        full = apply_delta(copy, changes.delta, POLICY, now)
        quick = apply_delta_quick(copy, changes.delta, POLICY, now)
        if quick is not None:
            same(quick, full)
            quicks += 1
        copy = full
        meshes += any(len(k) == 5 for k in changes.delta.upserts)
        for key, mod in changes.claims.items():
            if mod is None:
                claims.pop(key, None)
            else:
                claims[key] = mod
        if changes.write_revision is not None:
            write_rev = changes.write_revision
        if events and not events[0][0].startswith(P + VIPS):
            # What the writer computed is what every copy applied (its own revision
            # numbering aside: a copy's is etcd's).
            assert dict(copy.services) == dict(new.services)
            assert dict(copy.by_vip4) == dict(new.by_vip4)
            assert dict(copy.by_vip6) == dict(new.by_vip6)
        listing, listed_claims, listed_rev = kv.listing()
        same(copy, build_snapshot(listing, POLICY, now))
        assert (listed_claims, listed_rev) == (claims, write_rev)
        for family, table in ((4, copy.by_vip4), (6, copy.by_vip6)):
            for vip, owner in table.items():
                claim = decode_claim(*_claim_of(kv, family, vip))
                assert (claim.owner, claim.held) == (owner, False)
    assert applied > 50 and meshes > 15 and quicks > applied // 2, (applied, meshes, quicks)


def test_mesh_service_keys_and_values() -> None:
    key = ("MeshService", "default", "", "", "redis")
    assert entry_key(P, key) == "/m/meshservices/MeshService/default/_/_/redis"
    assert entry_key(P, ("a", "ns", 80)) == service_key(P, ("a", "ns", 80))
    assert parse_mesh_path("MeshService/default/_/_/redis") == key
    assert parse_mesh_path("MeshExternalService/m/east/shop/db") == (
        "MeshExternalService", "m", "east", "shop", "db")
    with pytest.raises(LayoutError):
        parse_mesh_path("MeshService/default/redis")
    base = build_snapshot(Listing(), POLICY, 0.0)
    reg = apply_patch(base, [mesh_spec("redis", (6379,), namespace=None),
                             mesh_spec("db", (5432,), zone="east", vip=167772170)], [],
                      POLICY, 0.0)
    redis = reg.entry_map[key]
    assert isinstance(redis, MeshService) and redis.vip6 is not None
    data = encode_service(redis)
    assert b'"vip_given":false' in data and b'"ports":[' in data
    assert decode_mesh("MeshService/default/_/_/redis", data) == redis
    db = reg.entry_map[("MeshService", "default", "east", "ns", "db")]
    assert (db.vip, db.vip6, db.vip_given) == (167772170, None, True)  # all given: no vip6
    assert decode_mesh("MeshService/default/east/ns/db", encode_service(db)) == db
    with pytest.raises(LayoutError, match="holds MeshService/default/_/_/redis"):
        decode_mesh("MeshService/other/_/_/redis", data)
    with pytest.raises(LayoutError, match="not a mesh service"):
        decode_mesh("MeshService/default/_/_/redis",
                    b'{"name":"a","namespace":"ns","port":80,"vip":"10.0.0.1"}')
    # The claim's owner: an object for a mesh service, the 3-list for a service.
    claim = encode_claim(key, held=False)
    assert claim == (b'{"owner":{"kind":"MeshService","mesh":"default","zone":"",'
                     b'"namespace":"","name":"redis"}}')
    assert decode_claim("10.0.0.1", claim).owner == key
    assert decode_claim("10.0.0.1", encode_claim(("a", "ns", 80), True)) == Claim(
        4, 167772161, ("a", "ns", 80), True)
    assert encode_claim(("a", "ns", 80), False) == b'{"owner":["a","ns",80]}'
    # A listing reads both forms; a meshservices/ key alone makes the prefix written.
    listing, _, _ = decode_listing(P, [
        (entry_key(P, key), data, 7), (P + VIPS + "10.0.0.9", claim, 7)])
    assert listing.written and listing.services == [redis] and not listing.bad
    # A plan of a registry of services only has no mesh service key (nor one for a
    # mesh service's absent vip).
    plan = plan_write(P, base, reg, {})
    keys = sorted(k for k, _ in plan.puts)
    assert keys == sorted([entry_key(P, key), entry_key(P, db.key),
                           claim_key(P, 4, redis.vip), claim_key(P, 6, redis.vip6),
                           claim_key(P, 4, 167772170)])


def test_a_mesh_service_delta_is_o_change_and_keeps_given_vips() -> None:
    """A PATCH of one mesh service is one entry key (plus claims) in etcd and applies on
    the loop (apply_delta_quick); a mesh service with only an IPv4 VIP given gets no
    IPv6 on the copies that apply it; deleting it holds its VIP with its object owner."""
    kv = Kv()
    listing, claims, write_rev = kv.listing()
    copy = build_snapshot(listing, POLICY, 1000.0)

    def write(upserts: list[EntrySpec], deletes: list[EntryKey]) -> list[str]:
        nonlocal copy, write_rev
        new = apply_patch(copy, upserts, deletes, POLICY, 1000.0)
        events = kv.txn(plan_write(P, copy, new, claims), write_rev)
        assert events is not None
        changes = decode_events(P, events)
        for k, mod in changes.claims.items():
            if mod is None:
                claims.pop(k, None)
            else:
                claims[k] = mod
        write_rev = changes.write_revision or write_rev
        quick = apply_delta_quick(copy, changes.delta, POLICY, 1000.0)
        assert quick is not None
        assert dict(quick.services) == dict(new.services)
        copy = quick
        return [k for k, _, _ in events]

    write([ServiceSpec(f"s{i}", "ns", 80) for i in range(10)]
          + [mesh_spec(f"m{i}") for i in range(5)], [])
    keys = write([mesh_spec("m2", (80, 443, 8080))], [])
    m2 = ("MeshService", "default", "", "ns", "m2")
    assert sorted(keys) == [P + "meshservices/MeshService/default/_/ns/m2", P + REVISION]
    assert [p.port for p in copy.entry_map[m2].ports] == [80, 443, 8080]  # type: ignore[union-attr]
    keys = write([mesh_spec("given", vip=167772180)], [])
    given = copy.entry_map[("MeshService", "default", "", "ns", "given")]
    assert (given.vip, given.vip6, given.vip_given) == (167772180, None, True)
    assert len(keys) == 3  # the entry, its one claim, the revision key
    vip = copy.entry_map[m2].vip
    keys = write([], [m2])
    assert m2 not in copy.entry_map and copy.held4[vip][1] == m2
    assert decode_claim(*_claim_of(kv, 4, vip)) == Claim(4, vip, m2, True)
