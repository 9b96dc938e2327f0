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
    LayoutError,
    Listing,
    apply_delta,
    apply_delta_quick,
    build_snapshot,
    decode_claim,
    decode_events,
    decode_listing,
    decode_service,
    encode_service,
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
