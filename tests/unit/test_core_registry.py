"""The registry core: validated writes in, immutable snapshots out, VIP allocation.

No sockets, no clock: every hold-down is driven through the ``now`` argument.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from meshdns.core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceKey,
    VipRange,
    apply_patch,
    apply_put,
    format_ip,
    parse_deletes,
    parse_services,
    restore,
)

POLICY = RegistryPolicy()
SMALL = RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/29"), range6=None)  # .1 .. .6


def svc(name: str, ns: str = "default", port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": ns, "port": port, **extra}


def put(reg: Registry, items: list[dict[str, Any]], policy: RegistryPolicy = POLICY,
        now: float = 0.0) -> Registry:
    return apply_put(reg, parse_services(items), policy, now)


def patch(reg: Registry, upserts: list[dict[str, Any]], deletes: list[dict[str, Any]] | None = None,
          policy: RegistryPolicy = POLICY, now: float = 0.0) -> Registry:
    return apply_patch(reg, parse_services(upserts, "upsert"), parse_deletes(deletes or []),
                       policy, now)


def vip(reg: Registry, key: ServiceKey) -> str:
    return format_ip(reg.services[key].vip, 4)


def vip6(reg: Registry, key: ServiceKey) -> str | None:
    v = reg.services[key].vip6
    return None if v is None else format_ip(v, 6)


def vips(reg: Registry) -> dict[ServiceKey, tuple[str, str | None]]:
    return {k: (vip(reg, k), vip6(reg, k)) for k in reg.services}


def rejected(fn: Any, *args: Any, **kwargs: Any) -> RegistryError:
    with pytest.raises(RegistryError) as info:
        fn(*args, **kwargs)
    return info.value


A: ServiceKey = ("a", "default", 80)
B: ServiceKey = ("b", "default", 80)
C: ServiceKey = ("c", "default", 80)


# ---------------------------------------------------------------- identity and snapshots


def test_services_are_keyed_by_name_namespace_and_port() -> None:
    reg = put(Registry.empty(), [svc("web", "a", 80), svc("web", "a", 8080), svc("web", "b", 80)])
    assert set(reg.services) == {("web", "a", 80), ("web", "a", 8080), ("web", "b", 80)}
    assert len(reg) == 3
    assert len({s.vip for s in reg.services.values()}) == 3
    assert len({s.vip6 for s in reg.services.values()}) == 3


def test_empty_registry_has_revision_zero() -> None:
    reg = Registry.empty()
    assert reg.revision == 0
    assert len(reg) == 0
    assert reg.to_json() == {"revision": 0, "services": []}


def test_snapshots_are_frozen_and_writes_never_touch_the_old_one() -> None:
    first = put(Registry.empty(), [svc("a"), svc("b")])
    before = first.to_json()
    second = patch(first, [svc("c")], [{"name": "a", "namespace": "default", "port": 80}])
    assert second is not first
    assert first.to_json() == before
    assert set(first.services) == {A, B}
    assert set(second.services) == {B, C}
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.revision = 99  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.services[A].vip = 1  # type: ignore[misc]


def test_revision_counts_changes_and_a_noop_write_keeps_it() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b")])
    assert r1.revision == 1
    assert put(r1, [svc("a"), svc("b")], now=5).revision == 1  # same content
    assert put(r1, [svc("b"), svc("a")], now=5).revision == 1  # order does not matter
    assert patch(r1, [svc("a")]).revision == 1  # upsert of an identical service
    # Deleting a missing service is idempotent: nothing changed, so no new revision.
    assert patch(r1, [], [{"name": "zz", "namespace": "default", "port": 80}]).revision == 1
    r2 = patch(r1, [svc("a", hostnames=["a.mesh"])])
    assert r2.revision == 2
    r3 = put(r2, [svc("a", hostnames=["a.mesh"])])
    assert r3.revision == 3
    assert put(r3, []).revision == 4
    assert put(put(r3, []), []).revision == 4


def test_to_json_shows_allocated_vips() -> None:
    reg = put(Registry.empty(), [svc("a", hostnames=["A.Mesh."])])
    (item,) = reg.to_json()["services"]
    assert item["name"] == "a" and item["namespace"] == "default" and item["port"] == 80
    assert ipaddress.ip_address(item["vip"]) in ipaddress.ip_network("240.0.0.0/4")
    assert ipaddress.ip_address(item["vip6"]) in ipaddress.ip_network("fd00:fd00::/64")
    assert item["hostnames"] == ["a.mesh"]  # normalized: lower case, no trailing dot


# ---------------------------------------------------------------- VIP allocation


def test_vips_are_allocated_from_the_default_cidrs_and_skip_the_network_address() -> None:
    reg = put(Registry.empty(), [svc(f"s{i}") for i in range(50)])
    net4, net6 = ipaddress.ip_network("240.0.0.0/4"), ipaddress.ip_network("fd00:fd00::/64")
    for key in reg.services:
        v4, v6 = vips(reg)[key]
        assert ipaddress.ip_address(v4) in net4
        assert v4 != "240.0.0.0"
        assert v6 is not None and ipaddress.ip_address(v6) in net6
        assert v6 != "fd00:fd00::"
    assert len({v for v, _ in vips(reg).values()}) == 50
    assert len({v for _, v in vips(reg).values()}) == 50


def test_vips_come_from_a_configured_cidr() -> None:
    policy = RegistryPolicy(range4=VipRange.from_cidr("10.96.0.0/24"),
                            range6=VipRange.from_cidr("fd12:3456::/120"))
    reg = put(Registry.empty(), [svc("a"), svc("b")], policy)
    for v4, v6 in vips(reg).values():
        assert ipaddress.ip_address(v4) in ipaddress.ip_network("10.96.0.0/24")
        assert v4 not in ("10.96.0.0", "10.96.0.255")
        assert v6 is not None and ipaddress.ip_address(v6) in ipaddress.ip_network("fd12:3456::/120")


def test_no_cidr6_means_no_ipv6_vips_but_given_ones_are_kept() -> None:
    policy = RegistryPolicy(range6=None)
    reg = put(Registry.empty(), [svc("a"), svc("b", vip6="fd00::b")], policy)
    assert vip6(reg, A) is None
    assert vip6(reg, B) == "fd00::b"


def test_vip_is_stable_across_re_puts_and_patches() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b"), svc("c")])
    original = vips(r1)
    # Re-pushed in another order, with an extra service and new host names.
    r2 = put(r1, [svc("d"), svc("c"), svc("b", hostnames=["b.mesh"]), svc("a")], now=10)
    for key in (A, B, C):
        assert vips(r2)[key] == original[key]
    # A patch that touches other services, then one that updates b itself.
    r3 = patch(r2, [svc("e")], [{"name": "d", "namespace": "default", "port": 80}], now=20)
    r4 = patch(r3, [svc("b", hostnames=["bee.mesh"])], now=30)
    for key in (A, B, C):
        assert vips(r4)[key] == original[key]
    # Dropping a service does not move the others.
    r5 = put(r4, [svc("c"), svc("a")], now=40)
    assert vips(r5)[A] == original[A] and vips(r5)[C] == original[C]


def test_explicit_vips_are_used_as_given_even_outside_the_cidr() -> None:
    reg = put(Registry.empty(), [
        svc("a", vip="10.1.2.3", vip6="2001:db8::1"),
        svc("b", vip="240.0.0.9", vip6="fd00:fd00::9"),
        svc("c"),
    ])
    assert vips(reg)[A] == ("10.1.2.3", "2001:db8::1")
    assert vips(reg)[B] == ("240.0.0.9", "fd00:fd00::9")
    assert reg.services[A].vip_given and reg.services[A].vip6_given
    assert not reg.services[C].vip_given
    assert vip(reg, C) not in ("10.1.2.3", "240.0.0.9")
    # The allocator never hands out an address that a given VIP already uses.
    many = put(reg, [svc("a", vip="10.1.2.3"), svc("b", vip="240.0.0.9")]
               + [svc(f"n{i}") for i in range(20)], now=1)
    allocated = [vip(many, k) for k in many.services if k[0].startswith("n")]
    assert "240.0.0.9" not in allocated and len(set(allocated)) == 20


def test_explicit_vip_of_an_existing_service_is_changed_in_place() -> None:
    r1 = put(Registry.empty(), [svc("a", vip="10.0.0.1")])
    r2 = put(r1, [svc("a", vip="10.0.0.2")], now=1)
    assert vip(r2, A) == "10.0.0.2"
    assert r2.revision == 2


@pytest.mark.parametrize(("attr", "a", "b"), [
    ("vip", "240.0.0.9", "240.0.0.9"),
    ("vip", "10.0.0.1", "10.0.0.1"),
    ("vip6", "fd00:fd00::9", "fd00:fd00::9"),
    ("vip6", "2001:db8::1", "2001:db8:0:0::1"),  # same address, other spelling
])
def test_duplicate_explicit_vip_is_a_409_naming_the_field(attr: str, a: str, b: str) -> None:
    reg = put(Registry.empty(), [svc("x")])
    before = reg.to_json()
    err = rejected(put, reg, [svc("x"), svc("a", **{attr: a}), svc("b", **{attr: b})])
    assert err.status == 409
    assert err.field == f"services[2].{attr}"
    assert reg.to_json() == before


def test_explicit_vip_equal_to_another_services_allocated_vip_is_a_409() -> None:
    r1 = put(Registry.empty(), [svc("a")])
    taken = vip(r1, A)
    err = rejected(put, r1, [svc("a"), svc("b", vip=taken)])
    assert err.status == 409
    assert err.field == "services[1].vip"
    err = rejected(patch, r1, [svc("b", vip=taken)])
    assert err.status == 409
    assert err.field == "upsert[0].vip"


def test_patch_giving_an_existing_service_a_vip_already_given_to_another_is_a_409_naming_it(
) -> None:
    # SPEC §6: conflicts are answered 4xx "with the field named". The service being
    # updated sits before the current owner of the address in the registry.
    r1 = put(Registry.empty(), [svc("y"), svc("x", vip="10.0.0.1")])
    err = rejected(patch, r1, [svc("y", vip="10.0.0.1")])
    assert err.status == 409
    assert err.field == "upsert[0].vip"


def test_hostname_owned_by_two_services_is_a_409_and_nothing_changes() -> None:
    r1 = put(Registry.empty(), [svc("a", hostnames=["shared.mesh"]), svc("b")])
    before = r1.to_json()
    err = rejected(put, r1, [svc("a", hostnames=["shared.mesh"]),
                             svc("b", hostnames=["other.mesh", "Shared.Mesh."])])
    assert err.status == 409
    assert err.field == "services[1].hostnames[1]"
    assert "shared.mesh" in err.message
    # PATCH: a new service claiming a host name an existing one owns.
    err = rejected(patch, r1, [svc("c"), svc("d", hostnames=["shared.mesh"])])
    assert err.status == 409
    assert err.field == "upsert[1].hostnames[0]"
    assert r1.to_json() == before


def test_patch_giving_an_existing_service_a_hostname_another_owns_is_a_409_naming_it() -> None:
    r1 = put(Registry.empty(), [svc("y"), svc("x", hostnames=["h.mesh"])])
    err = rejected(patch, r1, [svc("y", hostnames=["h.mesh"])])
    assert err.status == 409
    assert err.field == "upsert[0].hostnames[0]"


@pytest.mark.parametrize("host", ["a.default.svc.80.mesh", "a_default_svc_80.mesh"])
def test_hostname_that_is_another_services_generated_name_is_a_409(host: str) -> None:
    err = rejected(put, Registry.empty(), [svc("a"), svc("b", hostnames=[host])])
    assert err.status == 409
    assert err.field == "services[1].hostnames[0]"
    # A service may list its own generated names.
    reg = put(Registry.empty(), [svc("a", hostnames=[host])])
    assert reg.hostnames[host] == A


def test_hostname_outside_the_served_domains_is_accepted() -> None:
    reg = put(Registry.empty(), [svc("a", hostnames=["httpbin.org", "x.y.example.com."])])
    assert reg.hostnames == {"httpbin.org": A, "x.y.example.com": A}


def test_hostname_that_is_a_served_apex_is_rejected() -> None:
    err = rejected(put, Registry.empty(), [svc("a", hostnames=["ok.mesh", "mesh"])])
    assert err.status == 400
    assert err.field == "services[0].hostnames[1]"


# ---------------------------------------------------------------- hold-down


def test_freed_vip_is_held_from_new_services_but_returned_to_its_identity() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b")], SMALL, now=0)
    a_vip = vip(r1, A)
    r2 = put(r1, [svc("b")], SMALL, now=100)  # a deleted: its VIP held until 400
    assert r2.held4 and a_vip in {format_ip(v, 4) for v in r2.held4}
    r3 = put(r2, [svc("b")] + [svc(f"n{i}") for i in range(4)], SMALL, now=200)
    assert a_vip not in {vip(r3, k) for k in r3.services}
    assert r3.free_vips(SMALL) == {"ipv4": 0}  # 5 taken + 1 held
    r4 = put(r3, [svc("b")] + [svc(f"n{i}") for i in range(4)] + [svc("a")], SMALL, now=250)
    assert vip(r4, A) == a_vip


def test_hold_is_honoured_until_it_expires() -> None:
    full = put(Registry.empty(), [svc(f"s{i}") for i in range(6)], SMALL, now=0)
    freed = vip(full, ("s5", "default", 80))
    five = [svc(f"s{i}") for i in range(5)]
    held = put(full, five, SMALL, now=10)  # s5 deleted at t=10: held until t=310
    before = held.to_json()
    for t in (11, 200, 309.9):
        err = rejected(put, held, [*five, svc("new")], SMALL, now=t)
        assert err.status == 507
    assert held.to_json() == before
    later = put(held, [*five, svc("new")], SMALL, now=310.5)
    assert vip(later, ("new", "default", 80)) == freed


def test_held_vip_goes_back_to_the_same_identity_through_a_patch() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b")], now=0)
    old = vip(r1, A), vip6(r1, A)
    r2 = patch(r1, [], [{"name": "a", "namespace": "default", "port": 80}], now=1)
    r3 = patch(r2, [svc(f"n{i}") for i in range(10)], now=2)
    assert old[0] not in {vip(r3, k) for k in r3.services}
    assert old[1] not in {vip6(r3, k) for k in r3.services}
    r4 = patch(r3, [svc("a")], now=3)
    assert (vip(r4, A), vip6(r4, A)) == old


def test_hold_uses_the_policy_hold_seconds() -> None:
    policy = dataclasses.replace(SMALL, hold_seconds=60)
    full = put(Registry.empty(), [svc(f"s{i}") for i in range(6)], policy, now=0)
    five = [svc(f"s{i}") for i in range(5)]
    held = put(full, five, policy, now=0)
    assert rejected(put, held, [*five, svc("new")], policy, now=59).status == 507
    assert len(put(held, [*five, svc("new")], policy, now=61)) == 6


# ---------------------------------------------------------------- exhaustion


def test_exhausted_small_cidr_is_a_507_and_nothing_changes() -> None:
    reg = put(Registry.empty(), [svc(f"s{i}") for i in range(6)], SMALL)
    assert reg.free_vips(SMALL) == {"ipv4": 0}
    before = reg.to_json()
    err = rejected(put, reg, [svc(f"s{i}") for i in range(7)], SMALL, now=1)
    assert err.status == 507
    assert "exhausted" in err.message and "240.0.0.0/29" in err.message
    err = rejected(patch, reg, [svc("extra")], policy=SMALL, now=1)
    assert err.status == 507
    assert reg.to_json() == before
    assert reg.revision == 1


def test_exhaustion_rejects_the_whole_write_not_a_prefix_of_it() -> None:
    err = rejected(put, Registry.empty(), [svc(f"s{i}") for i in range(7)], SMALL)
    assert err.status == 507
    # Exactly the range size fits.
    assert len(put(Registry.empty(), [svc(f"s{i}") for i in range(6)], SMALL)) == 6


def test_exhausted_ipv6_range_is_a_507() -> None:
    policy = RegistryPolicy(range6=VipRange.from_cidr("fd00::/126"))  # ::1 .. ::3
    put(Registry.empty(), [svc(f"s{i}") for i in range(3)], policy)
    err = rejected(put, Registry.empty(), [svc(f"s{i}") for i in range(4)], policy)
    assert err.status == 507
    assert "IPv6" in err.message


def test_given_vips_outside_the_cidr_do_not_use_up_the_range() -> None:
    items = [svc(f"s{i}") for i in range(6)] + [svc("out", vip="10.0.0.1")]
    reg = put(Registry.empty(), items, SMALL)
    assert len(reg) == 7
    assert reg.free_vips(SMALL) == {"ipv4": 0}


# ---------------------------------------------------------------- restore and CIDR change


def allocated_of(reg: Registry) -> dict[ServiceKey, tuple[int | None, int | None]]:
    """What a state file keeps: the addresses this server allocated (not the given ones)."""
    return {k: (None if s.vip_given else s.vip, None if s.vip6_given else s.vip6)
            for k, s in reg.services.items()}


def specs_of(reg: Registry) -> list[Any]:
    return [s.to_spec() for s in reg.services.values()]


def test_restore_keeps_revision_vips_and_holds() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b", vip="10.0.0.2"), svc("c")], now=0)
    r2 = put(r1, [svc("a"), svc("b", vip="10.0.0.2")], now=5)  # c held
    r3 = patch(r2, [svc("a", hostnames=["a.mesh"])], now=6)
    assert r3.revision == 3
    back = restore(r3.revision, specs_of(r3), allocated_of(r3), POLICY, r3.held4, r3.held6,
                   now=7)
    assert back.revision == 3
    assert back.to_json() == r3.to_json()
    assert back.held4 == r3.held4 and back.held6 == r3.held6
    # The held address of c is still not handed to a newcomer after the restore.
    c_vip = vip(r1, C)
    more = patch(back, [svc(f"n{i}") for i in range(5)], now=8)
    assert c_vip not in {vip(more, k) for k in more.services}


def test_cidr_change_keeps_vips_inside_it_and_reallocates_the_others() -> None:
    wide = RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/24"),
                          range6=VipRange.from_cidr("fd00:fd00::/64"))
    r1 = put(Registry.empty(), [svc(f"s{i}") for i in range(12)]
             + [svc("given", vip="240.0.0.200", vip6="fd00:fd00::200")], wide)
    narrow = RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/28"),  # .1 .. .14
                            range6=VipRange.from_cidr("fd00:aaaa::/64"))
    back = restore(r1.revision, specs_of(r1), allocated_of(r1), narrow)
    assert back.revision == r1.revision
    net4 = ipaddress.ip_network("240.0.0.0/28")
    for key, s in r1.services.items():
        old4 = ipaddress.ip_address(format_ip(s.vip, 4))
        new4 = ipaddress.ip_address(vip(back, key))
        if key[0] == "given":
            assert str(new4) == "240.0.0.200"  # given: kept as given, even outside
            assert vip6(back, key) == "fd00:fd00::200"
            continue
        if old4 in net4:
            assert new4 == old4
        assert new4 in net4
        # Every allocated IPv6 VIP was outside the new cidr6: all re-allocated.
        v6 = vip6(back, key)
        assert v6 is not None and ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:aaaa::/64")
    assert len({s.vip for s in back.services.values()}) == len(back)


def test_cidr_change_moves_a_vip_out_of_range_into_it() -> None:
    allocated = {A: (int(ipaddress.ip_address("240.0.0.1")), None),
                 B: (int(ipaddress.ip_address("240.9.9.9")), None)}
    specs = parse_services([svc("a"), svc("b"), svc("c", vip="10.0.0.3")])
    back = restore(41, specs, allocated,
                   RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/29"), range6=None))
    assert back.revision == 41
    assert vip(back, A) == "240.0.0.1"
    assert vip(back, B) != "240.9.9.9"
    assert ipaddress.ip_address(vip(back, B)) in ipaddress.ip_network("240.0.0.0/29")
    assert vip(back, C) == "10.0.0.3"
    assert vip6(back, A) is None


def test_restore_with_the_cidr6_disabled_drops_allocated_ipv6_vips() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b", vip6="2001:db8::b")])
    back = restore(r1.revision, specs_of(r1), allocated_of(r1), RegistryPolicy(range6=None))
    assert vip6(back, A) is None
    assert vip6(back, B) == "2001:db8::b"
    assert vip(back, A) == vip(r1, A)


# ---------------------------------------------------------------- bad input


GOOD = svc("ok")


@pytest.mark.parametrize(("item", "field"), [
    (svc("Frontend"), "services[1].name"),  # upper case
    (svc("-bad"), "services[1].name"),
    (svc("bad-"), "services[1].name"),
    (svc("a" * 64), "services[1].name"),
    (svc("a.b"), "services[1].name"),
    (svc("a_b"), "services[1].name"),
    (svc(""), "services[1].name"),
    (svc("héllo"), "services[1].name"),
    ({"namespace": "default", "port": 80}, "services[1].name"),
    (svc(7), "services[1].name"),  # type: ignore[arg-type]
    (svc("a", "Kong"), "services[1].namespace"),
    (svc("a", ""), "services[1].namespace"),
    ({"name": "a", "port": 80}, "services[1].namespace"),
    (svc("a", port=0), "services[1].port"),
    (svc("a", port=65536), "services[1].port"),
    (svc("a", port=-1), "services[1].port"),
    (svc("a", port=True), "services[1].port"),
    (svc("a", port=False), "services[1].port"),
    (svc("a", port="http"), "services[1].port"),  # type: ignore[arg-type]
    (svc("a", port=""), "services[1].port"),  # type: ignore[arg-type]
    (svc("a", port="²"), "services[1].port"),  # a str.isdigit() that int() rejects
    (svc("a", port=80.5), "services[1].port"),  # type: ignore[arg-type]
    (svc("a", port=None), "services[1].port"),  # type: ignore[arg-type]
    ({"name": "a", "namespace": "b"}, "services[1].port"),
    (svc("a", vip="fd00::1"), "services[1].vip"),  # IPv6 in vip
    (svc("a", vip="240.0.0.256"), "services[1].vip"),
    (svc("a", vip="frontend"), "services[1].vip"),
    (svc("a", vip=4026531847), "services[1].vip"),
    (svc("a", vip=""), "services[1].vip"),
    (svc("a", vip6="240.0.0.1"), "services[1].vip6"),  # IPv4 in vip6
    (svc("a", vip6="fd00::g"), "services[1].vip6"),
    (svc("a", hostnames="a.mesh"), "services[1].hostnames"),
    (svc("a", hostnames={"a.mesh": 1}), "services[1].hostnames"),
    (svc("a", hostnames=["ok.mesh", "bad host!"]), "services[1].hostnames[1]"),
    (svc("a", hostnames=[""]), "services[1].hostnames[0]"),
    (svc("a", hostnames=["."]), "services[1].hostnames[0]"),
    (svc("a", hostnames=["a..mesh"]), "services[1].hostnames[0]"),
    (svc("a", hostnames=["a/b.mesh"]), "services[1].hostnames[0]"),
    (svc("a", hostnames=["x" * 64 + ".mesh"]), "services[1].hostnames[0]"),
    (svc("a", hostnames=[("a" * 60 + ".") * 5 + "mesh"]), "services[1].hostnames[0]"),
    (svc("a", hostnames=[12]), "services[1].hostnames[0]"),
    (svc("a", hostnames=[None]), "services[1].hostnames[0]"),
    (svc("a", hostnames=["ünï.mesh"]), "services[1].hostnames[0]"),
    (svc("a", hostnames=[f"h{i}.mesh" for i in range(257)]), "services[1].hostnames"),
    (svc("a", bogus=1), "services[1].bogus"),
    (svc("a", VIP="240.0.0.1"), "services[1].VIP"),
    ("a.default:80", "services[1]"),
    (None, "services[1]"),
    (["a", "default", 80], "services[1]"),
])
def test_bad_service_is_a_400_naming_the_field(item: Any, field: str) -> None:
    reg = put(Registry.empty(), [GOOD])
    before = reg.to_json()
    with pytest.raises(RegistryError) as info:
        apply_put(reg, parse_services([GOOD, item]), POLICY, 1.0)
    assert info.value.status == 400
    assert info.value.field == field
    assert (info.value.message, info.value.field) == (info.value.args[0], field)
    assert reg.to_json() == before


@pytest.mark.parametrize("body", [None, {}, "services", {"services": []}, 3])
def test_services_must_be_a_list(body: Any) -> None:
    with pytest.raises(RegistryError) as info:
        parse_services(body)
    assert info.value.status == 400
    assert info.value.field == "services"


def test_duplicate_in_one_put_is_a_400_and_nothing_changes() -> None:
    reg = put(Registry.empty(), [svc("a")])
    before = reg.to_json()
    err = rejected(put, reg, [svc("a"), svc("b"), svc("a", vip="10.0.0.1")])
    assert err.status == 400
    assert err.field == "services[2]"
    assert "services[0]" in err.message
    assert reg.to_json() == before


def test_duplicate_in_one_patch_is_a_400() -> None:
    reg = put(Registry.empty(), [svc("a")])
    err = rejected(patch, reg, [svc("b"), svc("b", hostnames=["b.mesh"])])
    assert err.status == 400
    assert err.field == "upsert[1]"


def test_patch_upserts_and_deletes_together() -> None:
    r1 = put(Registry.empty(), [svc("a"), svc("b")])
    r2 = patch(r1, [svc("c"), svc("a", hostnames=["a.mesh"])],
               [{"name": "b", "namespace": "default", "port": 80}], now=1)
    assert set(r2.services) == {A, C}
    assert r2.services[A].hostnames == ("a.mesh",)
    assert vip(r2, A) == vip(r1, A)
    assert r2.revision == 2
    # Delete and re-upsert the same identity in one patch: it keeps its address.
    r3 = patch(r2, [svc("a")], [{"name": "a", "namespace": "default", "port": 80}], now=2)
    assert vip(r3, A) == vip(r1, A)


def test_patch_rejected_whole_when_one_upsert_conflicts() -> None:
    r1 = put(Registry.empty(), [svc("a", hostnames=["taken.mesh"])])
    before = r1.to_json()
    # a is deleted in the same patch, so taken.mesh is free again: this one succeeds.
    ok = patch(r1, [svc("ok1"), svc("bad", hostnames=["taken.mesh"])],
               [{"name": "a", "namespace": "default", "port": 80}])
    assert ok.hostnames["taken.mesh"] == ("bad", "default", 80)
    err = rejected(patch, r1, [svc("ok1"), svc("bad", hostnames=["taken.mesh"])])
    assert err.status == 409
    assert r1.to_json() == before


@pytest.mark.parametrize(("item", "field"), [
    ({"name": "a", "namespace": "b", "port": 0}, "delete[0].port"),
    ({"name": "A", "namespace": "b", "port": 80}, "delete[0].name"),
    ({"name": "a", "port": 80}, "delete[0].namespace"),
    ({"name": "a", "namespace": "b", "port": 80, "vip": "240.0.0.1"}, "delete[0].vip"),
    ("a.b:80", "delete[0]"),
])
def test_bad_delete_is_a_400_naming_the_field(item: Any, field: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_deletes([item])
    assert info.value.status == 400
    assert info.value.field == field


def test_ports_at_the_edges_are_accepted() -> None:
    reg = put(Registry.empty(), [svc("a", port=1), svc("a", port=65535)])
    assert set(reg.services) == {("a", "default", 1), ("a", "default", 65535)}


def test_longest_labels_are_accepted() -> None:
    name, ns = "n" * 63, "s" * 63
    reg = put(Registry.empty(), [svc(name, ns, 65535)])
    assert (name, ns, 65535) in reg.services


@pytest.mark.parametrize("item, field", [
    ({"name": "web\n", "namespace": "ns", "port": 80}, "services[0].name"),
    ({"name": "web", "namespace": "ns\n", "port": 80}, "services[0].namespace"),
    ({"name": "web", "namespace": "ns", "port": 80, "hostnames": ["a.mesh\n"]},
     "services[0].hostnames[0]"),
])
def test_a_trailing_newline_is_not_a_valid_name(item: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_services([item])
    assert (info.value.status, info.value.field) == (400, field)


def test_deleting_most_of_a_big_registry_rebuilds_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_patch rebuilds when a PATCH deletes most of a big registry (so the old
    snapshot's tables are not kept alive by layered maps): same result as the
    incremental path, which it would otherwise take."""
    import meshdns.core.registry._patch as patch
    from meshdns.core.registry import ServiceSpec

    policy = RegistryPolicy(hold_seconds=60)
    specs = [ServiceSpec(f"s{i}", f"ns{i % 7}", 80, None, None, ()) for i in range(12_000)]
    reg = apply_put(Registry.empty(), specs, policy, 1.0)
    deletes = [s.key for s in specs[:11_000]]
    upserts = [ServiceSpec("new", "ns0", 80, None, None, ())]
    rebuilt = patch.apply_patch(reg, upserts, deletes, policy, 2.0)
    assert rebuilt._delta is None  # the rebuild, not layered tables over the old ones
    monkeypatch.setattr(patch, "SHRINK_REBUILD_MIN", 10**9)
    incremental = patch.apply_patch(reg, upserts, deletes, policy, 2.0)
    assert incremental._delta is not None
    for table in ("services", "by_vip4", "by_vip6", "held4", "held6", "ns_ports", "ports"):
        assert dict(getattr(rebuilt, table)) == dict(getattr(incremental, table)), table
    assert list(rebuilt.services) == list(incremental.services)
    assert rebuilt.revision == incremental.revision
