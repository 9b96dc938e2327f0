"""Mesh services in the registry core (docs/meshservice.md sections 1-3, 7): parsing,
one VIP per entry, the all-given-or-all-allocated rule, hold-down, 409s, names, SRV and
the canonical name. Pure: snapshots in, decisions out."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from meshdns.core.answer import Zone, ZoneSettings
from meshdns.core.registry import (
    MeshService,
    Registry,
    RegistryError,
    RegistryPolicy,
    VipRange,
    apply_patch,
    apply_put,
    check_template_items,
    format_ip,
    parse_deletes,
    parse_entries,
    parse_services,
    parse_templates,
    patch_incremental,
)

POLICY = RegistryPolicy()
WEB: dict[str, Any] = {
    "name": "web", "namespace": "shop", "mesh": "default",
    "ports": [{"port": 8080, "name": "http", "appProtocol": "http"},
              {"port": 9090, "name": "grpc"}, {"port": 5353, "name": "dns",
                                               "appProtocol": "udp"}]}
KEY = ("MeshService", "default", "", "shop", "web")


def put(items: list[dict[str, Any]], reg: Registry | None = None,
        policy: RegistryPolicy = POLICY, now: float = 0.0) -> Registry:
    return apply_put(reg or Registry.empty(), parse_entries(items), policy, now)


def labels(name: str) -> tuple[bytes, ...]:
    return tuple(part.encode() for part in name.split("."))


def answer(reg: Registry, name: str, qtype: int) -> tuple[int, str, list[str], list[str]]:
    decision = Zone(reg, ZoneSettings(domains=POLICY.domains)).decide(labels(name), qtype, 1)
    return (decision.rcode, decision.rule,
            [" ".join(str(r).split()[3:]) for r in decision.answer],
            [" ".join(str(r).split()[3:]) for r in decision.additional])


# ---------------------------------------------------------------- parsing


def test_ports_makes_a_mesh_service_port_a_service() -> None:
    specs = parse_entries([WEB, {"name": "web", "namespace": "shop", "port": 80}])
    assert specs[0].key == KEY and [p.port for p in specs[0].ports] == [8080, 9090, 5353]
    assert specs[1].key == ("web", "shop", 80)
    assert [p.srv_name for p in specs[0].ports] == ["_http._tcp", "_grpc._tcp", "_dns._udp"]


@pytest.mark.parametrize(("item", "field"), [
    (dict(WEB, port=80), "services[0].port"),
    (dict(WEB, kind="MeshTimeout"), "services[0].kind"),
    (dict(WEB, ports=[{"port": 0}]), "services[0].ports[0].port"),
    (dict(WEB, ports=[{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]),
     "services[0].ports[1].name"),
    (dict(WEB, ports=[{"port": 80}, {"port": 80}]), "services[0].ports[1].port"),
    (dict(WEB, ports=[{"port": 80, "targetPort": 8080}]), "services[0].ports[0].targetPort"),
    (dict(WEB, zone="East"), "services[0].zone"),
    (dict(WEB, vip6="240.0.0.1"), "services[0].vip6"),
    (dict(WEB, extra=1), "services[0].extra"),
])
def test_a_bad_mesh_service_is_400_at_its_field(item: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_entries([item])
    assert (exc.value.status, exc.value.field) == (400, field)


def test_the_legacy_reader_still_refuses_ports() -> None:
    with pytest.raises(RegistryError) as exc:
        parse_services([WEB])
    assert exc.value.field == "services[0].mesh" or exc.value.field.startswith("services[0]")


def test_delete_keys_of_both_forms() -> None:
    keys = parse_deletes([{"name": "a", "namespace": "b", "port": 80},
                          {"kind": "MeshService", "mesh": "default", "namespace": "shop",
                           "name": "web"}, {"zone": "east", "name": "redis"}])
    assert keys == [("a", "b", 80), KEY, ("MeshService", "", "east", "", "redis")]


# ---------------------------------------------------------------- VIPs


def test_one_vip_per_entry_and_the_hold_down() -> None:
    reg = put([WEB, {"name": "a", "namespace": "b", "port": 80}])
    web = reg.entry_map[KEY]
    assert isinstance(web, MeshService)
    assert (format_ip(web.vip or 0, 4), format_ip(web.vip6 or 0, 6)) == \
        ("240.0.0.1", "fd00:fd00::1")
    assert reg.by_vip4[web.vip or 0] == KEY  # type: ignore[comparison-overlap]
    gone = apply_patch(reg, [], parse_deletes([{"kind": "MeshService", "mesh": "default",
                                                "namespace": "shop", "name": "web"}]),
                       POLICY, 1.0)
    assert gone.held4[web.vip or 0] == (301.0, KEY)  # type: ignore[comparison-overlap]
    newcomer = apply_patch(gone, parse_entries([{"name": "c", "namespace": "b", "port": 1}]),
                           [], POLICY, 2.0)
    assert newcomer.services[("c", "b", 1)].vip != web.vip  # held from others
    back = apply_patch(newcomer, parse_entries([WEB]), [], POLICY, 3.0)
    assert back.entry_map[KEY].vip == web.vip  # a re-created entry gets it back


def test_vips_are_all_given_or_all_allocated() -> None:
    only6 = put([dict(WEB, vip6="fd00:1::5")])
    assert only6.entry_map[KEY].vip is None and only6.entry_map[KEY].vip6 is not None
    assert answer(only6, "web.shop.svc.8080.mesh", 1)[:2] == (0, "canonical")
    assert answer(only6, "web.shop.svc.8080.mesh", 1)[2] == []  # NODATA
    only4 = put([dict(WEB, vip="10.96.0.10")])
    assert only4.entry_map[KEY].vip6 is None
    # A legacy service still allocates the missing family beside a given one.
    legacy = put([{"name": "a", "namespace": "b", "port": 80, "vip": "10.96.0.11"}])
    assert legacy.services[("a", "b", 80)].vip6 is not None


def test_a_vip_has_one_owner_across_both_forms() -> None:
    with pytest.raises(RegistryError) as exc:
        put([{"name": "a", "namespace": "b", "port": 80, "vip": "240.0.0.9"},
             dict(WEB, vip="240.0.0.9")])
    assert exc.value.status == 409 and "a.b:80" in exc.value.message
    assert "MeshService web" in exc.value.message


def test_reapplying_the_same_entries_changes_nothing() -> None:
    reg = put([WEB, dict(WEB, name="api", vip="241.0.0.1", hostnames=["api.example.com"])])
    again = apply_patch(reg, parse_entries([WEB]), [], POLICY, 5.0)
    assert again.revision == reg.revision and again.entry_map[KEY] is reg.entry_map[KEY]
    # The export (allocated VIPs written back) keeps them allocated.
    exported = [s.to_json() for s in reg.entries()]
    back = apply_put(reg, parse_entries(exported), POLICY, 6.0)
    assert back.revision == reg.revision
    assert back.entry_map[KEY].vip_given is False  # type: ignore[union-attr]


# ---------------------------------------------------------------- names


def test_per_port_names_are_unique_across_both_forms() -> None:
    with pytest.raises(RegistryError) as exc:
        put([{"name": "web", "namespace": "shop", "port": 9090}, WEB])
    assert exc.value.status == 409
    assert exc.value.message == ("web.shop.svc.9090.mesh is owned by both web.shop:9090 and "
                                 "MeshService web (default/shop) (template 0)")
    reg = put([WEB])
    with pytest.raises(RegistryError) as exc:
        apply_patch(reg, parse_entries([{"name": "web", "namespace": "shop", "port": 80},
                                        {"name": "web", "namespace": "shop", "port": 8080}]),
                    [], POLICY, 1.0)
    assert exc.value.status == 409 and exc.value.field == "upsert[1]"
    # Without a namespace a mesh service has no built-in per-port names.
    bare = put([dict(WEB, namespace=None), {"name": "web", "namespace": "shop", "port": 80}])
    assert len(bare) == 2


def test_srv_at_the_name_and_at_named_ports() -> None:
    reg = put([dict(WEB, vip="241.0.0.2", vip6="fd00::2", hostnames=["web.mesh"])])
    assert answer(reg, "web.mesh", 33) == (0, "hostname", [
        "SRV 0 100 8080 web.mesh.", "SRV 0 100 9090 web.mesh.", "SRV 0 100 5353 web.mesh."],
        ["A 241.0.0.2", "AAAA fd00::2"])
    assert answer(reg, "_grpc._tcp.web.mesh", 33)[:3] == (0, "srv-port",
                                                           ["SRV 0 100 9090 web.mesh."])
    assert answer(reg, "_dns._udp.web.mesh", 33)[2] == ["SRV 0 100 5353 web.mesh."]
    assert answer(reg, "_dns._tcp.web.mesh", 33)[0] == 3  # NXDOMAIN: a UDP port
    assert answer(reg, "_grpc._tcp.web.mesh", 1)[:3] == (0, "srv-port", [])  # NODATA
    assert answer(reg, "_udp.web.mesh", 1)[:3] == (0, "empty-non-terminal", [])
    assert answer(reg, "web.mesh", 1)[2] == ["A 241.0.0.2"]
    assert answer(reg, "web.shop.svc.9090.mesh", 33)[2] == ["SRV 0 100 9090 web.mesh."]


def test_names_outside_the_served_domains_and_their_srv() -> None:
    reg = put([dict(WEB, vip="241.0.0.3", hostnames=["web.example.com"])])
    assert answer(reg, "web.example.com", 1)[2] == ["A 241.0.0.3"]
    assert answer(reg, "_http._tcp.web.example.com", 33)[2] == [
        "SRV 0 100 8080 web.example.com."]
    tcp = Zone(reg, ZoneSettings()).decide(labels("_tcp.web.example.com"), 1, 1)
    assert tcp.rcode == 0 and str(tcp.authority[0].rname) == "web.example.com."  # its zone


def test_selected_templates_render_per_port_and_once() -> None:
    items = check_template_items([
        {"template": "{name}.{namespace}.svc.{port}.{domain}", "kinds": ["Service"]},
        {"template": "{display_name}.svc.{zone}.mesh.local", "kinds": ["MeshService"],
         "matchLabels": {"kuma.io/origin": "global"}},
        {"template": "{name}-{port}.ports.mesh", "kinds": ["MeshService"]},
    ])
    policy = RegistryPolicy(domains=("mesh", "mesh.local"), templates=parse_templates(items))
    global_ = dict(WEB, zone="east", labels={"kuma.io/origin": "global",
                                             "kuma.io/display-name": "webby"})
    reg = put([global_, {"name": "web", "namespace": "shop", "port": 8080}], policy=policy)
    zone = Zone(reg, ZoneSettings(domains=policy.domains))
    portless = zone.decide(labels("webby.svc.east.mesh.local"), 33, 1)
    # The first template without {port} is the canonical name (SRV targets, PTR).
    assert [str(r).split()[-1] for r in portless.answer] == ["webby.svc.east.mesh.local."] * 3
    per_port = zone.decide(labels("web-9090.ports.mesh"), 33, 1)
    assert [str(r).split()[-2] for r in per_port.answer] == ["9090"]
    # The built-in canonical form selects services only: web.shop:8080 is no clash.
    assert zone.decide(labels("web.shop.svc.8080.mesh"), 1, 1).service.__class__.__name__ \
        == "Service"
    # A mesh service with explicit host names gets no rendered ones.
    explicit = put([dict(global_, hostnames=["w.example.com"])], policy=policy)
    assert dict(explicit.names.generated) == {}


def test_canonical_name_rules_and_ptr() -> None:
    reg = put([dict(WEB, vip="241.0.0.4")])  # no host names: the first per-port name
    ptr = answer(reg, "4.0.0.241.in-addr.arpa", 12)
    assert ptr[2] == ["PTR web.shop.svc.8080.mesh."]
    no_ns = put([dict(WEB, namespace=None, vip="241.0.0.5")])
    assert answer(no_ns, "5.0.0.241.in-addr.arpa", 12)[2] == []  # no canonical: no PTR


def test_template_items_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\[0\]\.kinds"):
        check_template_items([{"template": "{name}.x", "kinds": ["Pod"]}])
    with pytest.raises(ValueError, match=r"\[1\]: must be a string or an object"):
        check_template_items(["{name}.x", 5])
    assert check_template_items(["{display_name}.x"]) == ("{display_name}.x",)


def test_a_registry_of_services_only_is_unchanged() -> None:
    reg = put([{"name": "a", "namespace": "b", "port": 80}])
    assert dict(reg.mesh_keys) == {} and dict(reg.mesh_ports) == {}
    assert reg.to_json()["services"] == [{"name": "a", "namespace": "b", "port": 80,
                                          "vip": "240.0.0.1", "vip6": "fd00:fd00::1",
                                          "hostnames": []}]
    other = RegistryPolicy(range4=VipRange.from_cidr("10.1.0.0/24"))
    assert put([{"name": "a", "namespace": "b", "port": 80}], policy=other).revision == 1


# ---------------------------------------------------------------- O(change) patches


def _random_item(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(["a", "b", "c", "web"])
    if rng.random() < 0.5:
        item: dict[str, Any] = {"name": name, "namespace": rng.choice(["shop", "kong"]),
                                "port": rng.choice([80, 8080, 9090])}
    else:
        item = {"name": name, "namespace": rng.choice(["shop", "kong", None]),
                "zone": rng.choice([None, "east"]),
                "ports": [{"port": p, "name": f"p{p}"}
                          for p in rng.sample([80, 8080, 9090, 5353], rng.randrange(0, 3))]}
        if item["namespace"] is None:
            del item["namespace"]
        if item["zone"] is None:
            del item["zone"]
    if rng.random() < 0.3:
        item["vip"] = f"241.0.0.{rng.randrange(1, 6)}"
    if rng.random() < 0.2:
        item["vip6"] = f"fd00:1::{rng.randrange(1, 6)}"
    if rng.random() < 0.3:
        item["hostnames"] = [f"h{rng.randrange(4)}.example.com"]
    return item


def _tables(reg: Registry) -> tuple[Any, ...]:
    return (reg.revision, dict(reg.entry_map), dict(reg.by_vip4), dict(reg.by_vip6),
            dict(reg.hostnames), dict(reg.held4), dict(reg.held6), dict(reg.mesh_ports),
            sorted(reg.mesh_keys), dict(reg.ns_ports), dict(reg.ports))


def test_incremental_patches_of_mesh_services_equal_the_rebuild() -> None:
    rng = random.Random(25)
    reg = Registry.empty()
    incremental = 0
    for step in range(400):
        upserts = {}
        for item in (_random_item(rng) for _ in range(rng.randrange(0, 3))):
            spec = parse_entries([item])[0]
            upserts[spec.key] = spec
        deletes = [k for k in (parse_entries([_random_item(rng)])[0].key
                               for _ in range(rng.randrange(0, 2))) if k not in upserts]
        now = float(step)
        fast = patch_incremental(reg, list(upserts.values()), deletes, POLICY, now)
        try:
            full = apply_patch(replace(reg, _index=None), list(upserts.values()), deletes,
                               POLICY, now)
        except RegistryError:
            assert fast is None  # a rejected patch is the rebuild's to name
            continue
        if fast is not None:
            incremental += 1
            assert _tables(fast) == _tables(full), step
            reg = fast
        else:
            reg = full
    assert incremental > 150  # most patches, mesh services included, stay O(change)


# ---------------------------------------------------------------- the wire fast path


def test_the_fast_path_answers_mesh_names_as_the_dnslib_path() -> None:
    from meshdns.core.answer import FastPath

    from .test_core_fastpath_equivalence import packet, random_case, reference

    reg = put([{"name": "front", "namespace": "kong", "port": 80},
               dict(WEB, vip="241.0.0.2", vip6="fd00::2", hostnames=["web.mesh",
                                                                   "web.example.com"]),
               dict(WEB, name="v4", hostnames=["v4.mesh"], vip="241.0.0.3"),
               dict(WEB, name="v6", hostnames=["v6.mesh"], vip6="fd00::3")])
    zone = Zone(reg, ZoneSettings(range4=VipRange.from_cidr("240.0.0.0/4")))
    fast = FastPath(zone)
    rng = random.Random(7)
    taken = 0
    names = ["web.mesh", "web.example.com", "web.shop.svc.8080.mesh", "web_shop_svc_9090.mesh",
             "_http._tcp.web.mesh", "_tcp.web.mesh", "_udp.web.example.com", "v4.mesh",
             "v6.mesh", "v4.shop.svc.9090.mesh", "front.kong.svc.80.mesh",
             "2.0.0.241.in-addr.arpa", "_nope._tcp.web.mesh"]
    for name in names:
        for rdtype in ("A", "AAAA", "ANY", "TXT", "SRV", "PTR"):
            for edns in (0, 1, 2):
                data = packet(random_case(name, rng), rdtype, rng, edns)
                for udp in (True, False):
                    got = fast.answer(data, udp)
                    if got is None:
                        continue
                    taken += 1
                    assert got[0] == reference(zone, data, udp), (name, rdtype, edns, udp)
    assert taken > 200


def test_a_mesh_service_patch_outdates_exactly_its_cached_replies() -> None:
    from dnslib import DNSRecord

    from meshdns.core.answer import MessageHandler

    reg = put([{"name": "front", "namespace": "kong", "port": 80},
               dict(WEB, vip="241.0.0.2", hostnames=["web.mesh"])])
    settings = ZoneSettings(range4=VipRange.from_cidr("240.0.0.0/4"))
    handler = MessageHandler(Zone(reg, settings))
    names = {"web.mesh": "A", "web.shop.svc.9090.mesh": "A", "_http._tcp.web.mesh": "SRV",
             "2.0.0.241.in-addr.arpa": "PTR", "front.kong.svc.80.mesh": "A"}
    packets = {n: bytes(DNSRecord.question(n, t).pack()) for n, t in names.items()}
    before = {n: handler.handle_udp(p) for n, p in packets.items()}
    moved = apply_patch(reg, parse_entries([dict(WEB, vip="241.0.0.9", hostnames=["web.mesh"],
                                                 ports=WEB["ports"][:1])]), [], POLICY, 1.0)
    assert moved.touched_since(reg) is not None  # incremental: the cache keeps the rest
    handler.set_zone(Zone(moved, settings))
    after = {n: handler.handle_udp(p) for n, p in packets.items()}
    reference = MessageHandler(Zone(moved, settings))
    for name, data in packets.items():
        assert after[name] == reference.handle_udp(data), name
    assert after["front.kong.svc.80.mesh"] == before["front.kong.svc.80.mesh"]
    assert b"\xf1\x00\x00\x09" in after["web.mesh"]  # 241.0.0.9
    assert DNSRecord.parse(after["web.shop.svc.9090.mesh"]).header.rcode == 3  # port gone


def test_object_templates_in_the_config_round_trip_and_name_their_field() -> None:
    from meshdns.config import ConfigError, config_to_raw, parse_config

    items = ["{name}.{namespace}.svc.{port}.{domain}",
             {"template": "{display_name}.svc.{zone}.mesh.local", "kinds": ["MeshService"],
              "matchLabels": {"kuma.io/origin": "global"}}]
    config = parse_config({"dns": {"hostname_templates": items}}, {})
    assert config_to_raw(config)["dns"]["hostname_templates"] == items
    assert parse_config(config_to_raw(config), {}) == config
    with pytest.raises(ConfigError, match=r"dns\.hostname_templates\[1\]\.kinds: must be"):
        parse_config({"dns": {"hostname_templates": [items[0], dict(items[1], kinds=["X"])]}},
                     {})
