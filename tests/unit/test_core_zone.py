"""Answer policy (SPEC §4), through ``Zone.decide`` and ``MessageHandler.handle_udp``.

No sockets: replies are decoded with dnspython.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from meshdns.core.answer import (
    Decision,
    ForwardRequest,
    MessageHandler,
    Zone,
    ZoneSettings,
    key_to_labels,
    qtype_name,
    reverse_zones,
)
from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    VipRange,
    apply_put,
    parse_services,
)

RANGE4 = VipRange.from_cidr("240.0.0.0/4")
RANGE6 = VipRange.from_cidr("fd00:fd00::/64")
POLICY = RegistryPolicy(domains=("mesh", "mesh.local"), range4=RANGE4, range6=None)
SERVICES: list[dict[str, Any]] = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org", "deep.a.b.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8",
     "hostnames": ["api.example.com"]},
    {"name": "far", "namespace": "edge", "port": 443, "vip": "250.1.2.3"},
    {"name": "outside", "namespace": "edge", "port": 53, "vip": "10.9.8.7"},
]
IP6_APEX = "0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa"
TTL, NEG = 42, 7


def registry(items: list[dict[str, Any]] = SERVICES, revisions: int = 1) -> Registry:
    reg = Registry.empty()
    for i in range(revisions):  # each write a change, so the revision is ``revisions``
        reg = apply_put(reg, parse_services(items[: len(items) - (revisions - 1 - i)]),
                        POLICY, float(i))
    return reg


def make_zone(reg: Registry | None = None, **kw: Any) -> Zone:
    base: dict[str, Any] = {"domains": ("mesh", "mesh.local"), "ttl": TTL, "negative_ttl": NEG,
                            "range4": RANGE4, "range6": RANGE6}
    base.update(kw)
    return Zone(registry() if reg is None else reg, ZoneSettings(**base))


def ask(z: Zone | MessageHandler, name: str, rdtype: str = "A", *, edns: int = -1
        ) -> dns.message.Message:
    r = z if isinstance(z, MessageHandler) else MessageHandler(z)
    q = dns.message.make_query(name, rdtype, use_edns=edns)
    out = r.handle_udp(q.to_wire())
    assert isinstance(out, bytes), out
    reply = dns.message.from_wire(out)
    assert reply.id == q.id
    return reply


def decide(z: Zone, name: str, rdtype: str = "A", rdclass: int = 1) -> Decision:
    labels = key_to_labels(name.rstrip("."))
    return z.decide(labels, dns.rdatatype.from_text(rdtype), rdclass)


def addresses(msg: dns.message.Message, rdtype: str = "A") -> list[str]:
    out = []
    for rrset in msg.answer:
        if rrset.rdtype == dns.rdatatype.from_text(rdtype):
            out += [r.address for r in rrset]
    return out


def assert_nodata(msg: dns.message.Message, apex: str) -> None:
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    (soa,) = msg.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(apex)
    assert soa.ttl == NEG


def assert_nxdomain(msg: dns.message.Message, apex: str) -> None:
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    (soa,) = msg.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(apex)
    assert soa[0].minimum == NEG


@pytest.fixture(scope="module")
def z() -> Zone:
    return make_zone()


# ---------------------------------------------------------------- service names


@pytest.mark.parametrize(("name", "rule", "vip"), [
    ("frontend.kong.svc.80.mesh", "canonical", "240.0.0.7"),
    ("frontend_kong_svc_80.mesh", "kuma", "240.0.0.7"),
    ("frontend.mesh", "hostname", "240.0.0.7"),
    ("deep.a.b.mesh", "hostname", "240.0.0.7"),
    ("httpbin.org", "hostname", "240.0.0.7"),
    ("backend.kong.svc.8080.mesh", "canonical", "240.0.0.8"),
    ("backend.kong.svc.8080.mesh.local", "canonical", "240.0.0.8"),
    ("backend_kong_svc_8080.mesh.local", "kuma", "240.0.0.8"),
    ("api.example.com", "hostname", "240.0.0.8"),
    ("outside.edge.svc.53.mesh", "canonical", "10.9.8.7"),
])
def test_a_of_a_service_name_is_its_vip(z: Zone, name: str, rule: str, vip: str) -> None:
    msg = ask(z, name)
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA
    assert addresses(msg) == [vip]
    assert msg.answer[0].ttl == TTL
    assert msg.answer[0].name == dns.name.from_text(name)
    assert decide(z, name).rule == rule


def test_aaaa_of_a_service_name_is_its_vip6(z: Zone) -> None:
    for name in ("frontend.kong.svc.80.mesh", "frontend_kong_svc_80.mesh", "httpbin.org"):
        msg = ask(z, name, "AAAA")
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert addresses(msg, "AAAA") == ["fd00:fd00::7"]


@pytest.mark.parametrize(("name", "apex"), [
    ("backend.kong.svc.8080.mesh", "mesh"),
    ("backend_kong_svc_8080.mesh", "mesh"),
    ("backend.kong.svc.8080.mesh.local", "mesh.local"),
    ("api.example.com", "api.example.com"),  # a host name outside the domains: its own zone
])
def test_aaaa_without_vip6_is_nodata_with_soa_never_nxdomain(z: Zone, name: str,
                                                               apex: str) -> None:
    assert_nodata(ask(z, name, "AAAA"), apex)


def test_any_of_a_service_name_has_both_addresses(z: Zone) -> None:
    msg = ask(z, "frontend.kong.svc.80.mesh", "ANY")
    assert addresses(msg, "A") == ["240.0.0.7"]
    assert addresses(msg, "AAAA") == ["fd00:fd00::7"]


@pytest.mark.parametrize(("name", "target"), [
    ("frontend.kong.svc.80.mesh", "frontend.kong.svc.80.mesh."),
    ("frontend_kong_svc_80.mesh", "frontend.kong.svc.80.mesh."),
    ("frontend.mesh", "frontend.kong.svc.80.mesh."),
    ("frontend.kong.svc.80.mesh.local", "frontend.kong.svc.80.mesh.local."),
    ("httpbin.org", "frontend.kong.svc.80.mesh."),
])
def test_srv_of_a_service_name(z: Zone, name: str, target: str) -> None:
    msg = ask(z, name, "SRV")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    (rrset,) = msg.answer
    (srv,) = rrset
    assert (srv.priority, srv.weight, srv.port) == (0, 100, 80)
    assert srv.target.to_text() == target
    extra = {(r.name.to_text(), r.rdtype): [x.address for x in r] for r in msg.additional}
    assert extra == {(target, dns.rdatatype.A): ["240.0.0.7"],
                     (target, dns.rdatatype.AAAA): ["fd00:fd00::7"]}


def test_srv_without_vip6_has_only_a_in_additional(z: Zone) -> None:
    msg = ask(z, "backend.kong.svc.8080.mesh", "SRV")
    assert msg.answer[0][0].port == 8080
    assert [r.rdtype for r in msg.additional] == [dns.rdatatype.A]


@pytest.mark.parametrize("rdtype", ["TXT", "MX", "CNAME", "NS", "SOA", "PTR", "CAA", "HTTPS"])
@pytest.mark.parametrize(("name", "apex"), [
    ("frontend.kong.svc.80.mesh", "mesh"),
    ("frontend_kong_svc_80.mesh", "mesh"),
    ("frontend.mesh", "mesh"),
    ("frontend.kong.svc.80.mesh.local", "mesh.local"),
])
def test_other_type_of_an_existing_name_is_nodata(z: Zone, rdtype: str, name: str,
                                                  apex: str) -> None:
    assert_nodata(ask(z, name, rdtype), apex)


def test_lookup_is_case_insensitive_and_echoes_the_case(z: Zone) -> None:
    for name in ("FRONTEND.KONG.SVC.80.MESH", "Frontend_Kong_Svc_80.Mesh", "HttpBin.ORG",
                 "7.0.0.240.IN-ADDR.ARPA"):
        rdtype = "PTR" if "ARPA" in name else "A"
        msg = ask(z, name, rdtype)
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.answer[0].name.to_text() == name + "."
        assert msg.question[0].name.to_text() == name + "."


# ---------------------------------------------------------------- apex, ENT, NXDOMAIN


@pytest.mark.parametrize("apex", ["mesh", "mesh.local"])
def test_soa_and_ns_at_each_apex(apex: str) -> None:
    reg = registry(revisions=3)
    assert reg.revision == 3
    z = make_zone(reg)
    msg = ask(z, apex, "SOA")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    (rrset,) = msg.answer
    (soa,) = rrset
    assert rrset.name.to_text() == apex + "."
    assert soa.mname.to_text() == apex + "."
    assert soa.serial == 3  # = registry revision
    assert soa.minimum == NEG  # = dns.negative_ttl
    msg = ask(z, apex, "NS")
    assert [r.target.to_text() for r in msg.answer[0]] == [apex + "."]
    assert_nodata(ask(z, apex, "A"), apex)
    # The serial follows the registry: a new snapshot, a new serial.
    assert ask(make_zone(registry(revisions=4)), apex, "SOA").answer[0][0].serial == 4


def test_negative_answers_carry_the_current_serial() -> None:
    z = make_zone(registry(revisions=2))
    assert ask(z, "nope.mesh").authority[0][0].serial == 2
    assert ask(z, "kong.svc.80.mesh").authority[0][0].serial == 2


@pytest.mark.parametrize(("name", "apex"), [
    ("kong.svc.80.mesh", "mesh"),
    ("svc.80.mesh", "mesh"),
    ("80.mesh", "mesh"),
    ("kong.svc.8080.mesh", "mesh"),
    ("edge.svc.443.mesh.local", "mesh.local"),
    ("a.b.mesh", "mesh"),  # below deep.a.b.mesh, a host name
    ("b.mesh", "mesh"),
    ("KONG.svc.80.MESH", "mesh"),
])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "SRV", "TXT"])
def test_empty_non_terminal_is_nodata(z: Zone, name: str, apex: str, rdtype: str) -> None:
    assert_nodata(ask(z, name, rdtype), apex)
    assert decide(z, name, rdtype).rule == "empty-non-terminal"


@pytest.mark.parametrize(("name", "apex"), [
    ("nope.mesh", "mesh"),
    ("kong.mesh", "mesh"),
    ("svc.mesh", "mesh"),
    ("kong.svc.81.mesh", "mesh"),
    ("cache.svc.80.mesh", "mesh"),
    ("svc.81.mesh", "mesh"),
    ("81.mesh", "mesh"),
    ("080.mesh", "mesh"),
    ("frontend.kong.svc.81.mesh", "mesh"),
    ("frontend.kong.svc.080.mesh", "mesh"),
    ("frontend.kong.svc.99999.mesh", "mesh"),
    ("frontend.kong.svc.0.mesh", "mesh"),
    ("frontend.kong.svx.80.mesh", "mesh"),
    ("frontend.other.svc.80.mesh", "mesh"),
    ("x.frontend.kong.svc.80.mesh", "mesh"),
    ("frontend_kong_svc_81.mesh", "mesh"),
    ("frontend_kong_svc.mesh", "mesh"),
    ("x.deep.a.b.mesh", "mesh"),
    ("c.b.mesh", "mesh"),
    ("nope.mesh.local", "mesh.local"),
    ("frontend.kong.svc.80.mesh.mesh", "mesh"),
])
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "TXT"])
def test_any_other_name_under_a_served_domain_is_nxdomain(z: Zone, name: str, apex: str,
                                                          rdtype: str) -> None:
    assert_nxdomain(ask(z, name, rdtype), apex)
    assert decide(z, name, rdtype).rule == "nxdomain"


def test_served_domain_names_are_never_forwarded() -> None:
    z = make_zone(forwarding=True)
    r = MessageHandler(z)
    for name in ("nope.mesh", "kong.svc.80.mesh", "mesh", "frontend.kong.svc.80.mesh"):
        assert isinstance(r.handle_udp(dns.message.make_query(name, "A").to_wire()), bytes)


# ---------------------------------------------------------------- reverse zones


def test_reverse_zones_cover_the_whole_default_ipv4_range() -> None:
    apexes = sorted(zn.apex for zn in reverse_zones(RANGE4))
    assert apexes == sorted(f"{o}.in-addr.arpa" for o in range(240, 256))
    assert [zn.apex for zn in reverse_zones(VipRange.from_cidr("10.96.0.0/12"))] == [
        f"{o}.10.in-addr.arpa" for o in range(96, 112)]
    assert [zn.apex for zn in reverse_zones(VipRange.from_cidr("10.1.2.0/24"))] == [
        "2.1.10.in-addr.arpa"]
    assert [zn.apex for zn in reverse_zones(VipRange.from_cidr("fd00:fd00::/62"))] == [
        f"{n}.{IP6_APEX[2:]}" for n in "0123"]
    assert [zn.apex for zn in reverse_zones(RANGE6)] == [IP6_APEX]
    assert reverse_zones(None) == []


@pytest.mark.parametrize("octet", range(240, 256))
def test_soa_and_ns_at_every_reverse_apex_of_240_slash_4(z: Zone, octet: int) -> None:
    apex = f"{octet}.in-addr.arpa"
    msg = ask(z, apex, "SOA")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert msg.answer[0].name.to_text() == apex + "."
    assert msg.answer[0][0].mname.to_text() == apex + "."
    assert msg.answer[0][0].serial == z.registry.revision
    msg = ask(z, apex, "NS")
    assert msg.rcode() == dns.rcode.NOERROR and msg.answer
    assert_nodata(ask(z, apex, "A"), apex)
    # Names in the zone with no VIP below them do not exist.
    assert_nxdomain(ask(z, f"77.{apex}", "PTR"), apex)
    assert_nxdomain(ask(z, f"1.2.3.{apex}", "PTR"), apex)
    assert_nxdomain(ask(z, f"x.{apex}", "PTR"), apex)


@pytest.mark.parametrize(("name", "kind", "apex"), [
    ("0.240.in-addr.arpa", "ent", "240.in-addr.arpa"),
    ("0.0.240.in-addr.arpa", "ent", "240.in-addr.arpa"),
    ("7.0.0.240.in-addr.arpa", "ptr", "240.in-addr.arpa"),
    ("8.0.0.240.in-addr.arpa", "ptr", "240.in-addr.arpa"),
    ("9.0.0.240.in-addr.arpa", "nx", "240.in-addr.arpa"),
    ("1.0.240.in-addr.arpa", "nx", "240.in-addr.arpa"),
    ("1.240.in-addr.arpa", "nx", "240.in-addr.arpa"),
    ("1.250.in-addr.arpa", "ent", "250.in-addr.arpa"),
    ("2.1.250.in-addr.arpa", "ent", "250.in-addr.arpa"),
    ("3.2.1.250.in-addr.arpa", "ptr", "250.in-addr.arpa"),
    ("4.2.1.250.in-addr.arpa", "nx", "250.in-addr.arpa"),
    ("2.250.in-addr.arpa", "nx", "250.in-addr.arpa"),
    ("0.0.0.0.240.in-addr.arpa", "nx", "240.in-addr.arpa"),
    ("7.0.0.240.0.in-addr.arpa", "nx", None),
    ("07.0.0.240.in-addr.arpa", "nx", "240.in-addr.arpa"),
])
def test_names_inside_the_reverse_zones(z: Zone, name: str, kind: str, apex: str | None) -> None:
    if apex is None:
        msg = ask(z, name, "PTR")
        assert msg.rcode() == dns.rcode.REFUSED  # not one of ours, no upstream
        return
    if kind == "ent":
        assert_nodata(ask(z, name, "PTR"), apex)
        assert decide(z, name, "PTR").rule == "empty-non-terminal"
    elif kind == "nx":
        assert_nxdomain(ask(z, name, "PTR"), apex)
    else:
        msg = ask(z, name, "PTR")
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert msg.answer[0].ttl == TTL
        assert len(msg.answer[0]) == 1
        assert_nodata(ask(z, name, "A"), apex)


@pytest.mark.parametrize(("address", "target"), [
    ("240.0.0.7", "frontend.kong.svc.80.mesh."),
    ("240.0.0.8", "backend.kong.svc.8080.mesh."),
    ("250.1.2.3", "far.edge.svc.443.mesh."),
    ("10.9.8.7", "outside.edge.svc.53.mesh."),  # a given VIP outside the CIDR
    ("fd00:fd00::7", "frontend.kong.svc.80.mesh."),
])
def test_ptr_of_a_vip_is_the_canonical_name(z: Zone, address: str, target: str) -> None:
    name = dns.reversename.from_address(address).to_text()
    msg = ask(z, name, "PTR")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert [r.target.to_text() for r in msg.answer[0]] == [target]


def test_ip6_arpa_zone_of_the_default_cidr6(z: Zone) -> None:
    msg = ask(z, IP6_APEX, "SOA")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert msg.answer[0][0].mname.to_text() == IP6_APEX + "."
    ptr = dns.reversename.from_address("fd00:fd00::7").to_text(omit_final_dot=True)
    below = ptr.split(".")
    # Every name between the apex and the VIP's name is an empty non-terminal.
    for cut in range(1, 16):
        assert_nodata(ask(z, ".".join(below[cut:]), "PTR"), IP6_APEX)
    other = dns.reversename.from_address("fd00:fd00::8").to_text()
    assert_nxdomain(ask(z, other, "PTR"), IP6_APEX)
    assert_nxdomain(ask(z, "1." + IP6_APEX, "PTR"), IP6_APEX)
    assert_nxdomain(ask(z, "g." + IP6_APEX, "PTR"), IP6_APEX)
    # Above the apex: not ours.
    assert ask(z, "0.0.d.f.ip6.arpa", "SOA").rcode() == dns.rcode.REFUSED


def test_reverse_zones_follow_the_configured_ranges() -> None:
    reg = apply_put(Registry.empty(), parse_services([
        {"name": "a", "namespace": "b", "port": 1, "vip": "10.96.3.4"}]),
        RegistryPolicy(range6=None), 0)
    z = make_zone(reg, range4=VipRange.from_cidr("10.96.0.0/16"), range6=None)
    assert ask(z, "96.10.in-addr.arpa", "SOA").rcode() == dns.rcode.NOERROR
    assert_nodata(ask(z, "3.96.10.in-addr.arpa", "PTR"), "96.10.in-addr.arpa")
    assert ask(z, "4.3.96.10.in-addr.arpa", "PTR").answer
    assert ask(z, "240.in-addr.arpa", "SOA").rcode() == dns.rcode.REFUSED
    assert ask(z, IP6_APEX, "SOA").rcode() == dns.rcode.REFUSED


# ---------------------------------------------------------------- search suffixes


@pytest.mark.parametrize("suffix", ["corp.example", "svc.cluster.local"])
def test_search_suffix_answers_cname_plus_address_locally(suffix: str) -> None:
    z = make_zone(search=("corp.example", "svc.cluster.local"), forwarding=True)
    r = MessageHandler(z)
    for name, rdtype, target, addr in [
        ("frontend.kong.svc.80.mesh", "A", "frontend.kong.svc.80.mesh.", "240.0.0.7"),
        ("frontend.kong.svc.80.mesh", "AAAA", "frontend.kong.svc.80.mesh.", "fd00:fd00::7"),
        ("Frontend_Kong_Svc_80.mesh", "A", "Frontend_Kong_Svc_80.mesh.", "240.0.0.7"),
        ("backend.kong.svc.8080.mesh.local", "A", "backend.kong.svc.8080.mesh.local.",
         "240.0.0.8"),
    ]:
        msg = ask(r, f"{name}.{suffix}", rdtype)
        assert msg.rcode() == dns.rcode.NOERROR
        cname, answer = msg.answer
        assert cname.rdtype == dns.rdatatype.CNAME
        assert cname.name.to_text() == f"{name}.{suffix}."
        assert cname[0].target.to_text() == target
        assert answer.name.to_text() == target
        assert [x.address for x in answer] == [addr]
        assert decide(z, f"{name}.{suffix}", rdtype).rule == "search"


def test_search_suffix_nodata_and_nxdomain() -> None:
    z = make_zone(search=("corp.example",), forwarding=True)
    r = MessageHandler(z)
    # A known service with no vip6: the CNAME, and the mesh zone's SOA for the NODATA.
    msg = ask(r, "backend.kong.svc.8080.mesh.corp.example", "AAAA")
    assert msg.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in msg.answer] == [dns.rdatatype.CNAME]
    assert msg.authority[0].rdtype == dns.rdatatype.SOA
    # An unknown mesh name with the suffix: NXDOMAIN, answered here, never forwarded.
    for name in ("nope.kong.svc.80.mesh.corp.example", "nope.mesh.corp.example",
                 "x.frontend.kong.svc.80.mesh.corp.example"):
        msg = ask(r, name)
        assert msg.rcode() == dns.rcode.NXDOMAIN
        assert msg.authority[0].rdtype == dns.rdatatype.SOA
        assert msg.authority[0].name.to_text() == "mesh."
    # An empty non-terminal with the suffix: NODATA, as for the mesh name (RFC 8020).
    for name in ("kong.svc.80.mesh.corp.example", "80.mesh.corp.example"):
        msg = ask(r, name)
        assert msg.rcode() == dns.rcode.NOERROR
        assert not msg.answer
        assert msg.authority[0].rdtype == dns.rdatatype.SOA


def test_search_suffix_for_non_mesh_names_is_forwarded_or_refused() -> None:
    for forwarding in (True, False):
        z = make_zone(search=("corp.example",), forwarding=forwarding)
        r = MessageHandler(z)
        for name in ("www.corp.example", "corp.example", "mesh.corp.example",
                     "example.com.corp.example"):
            out = r.handle_udp(dns.message.make_query(name, "A").to_wire())
            if forwarding:
                assert isinstance(out, ForwardRequest), name
            else:
                assert isinstance(out, bytes)
                assert dns.message.from_wire(out).rcode() == dns.rcode.REFUSED


def test_without_search_suffixes_the_long_name_is_not_ours() -> None:
    z = make_zone()
    msg = ask(z, "frontend.kong.svc.80.mesh.corp.example")
    assert msg.rcode() == dns.rcode.REFUSED


# ---------------------------------------------------------------- anything else


@pytest.mark.parametrize("name", ["example.com", "www.google.com", "com", ".", "arpa",
                                  "in-addr.arpa", "10.in-addr.arpa", "1.0.0.10.in-addr.arpa",
                                  "239.in-addr.arpa", "ip6.arpa", "local", "mesh.example.com",
                                  "meshx", "xmesh"])
def test_anything_else_is_forwarded_or_refused(name: str) -> None:
    on = MessageHandler(make_zone(forwarding=True))
    q = dns.message.make_query(name, "A")
    out = on.handle_udp(q.to_wire())
    assert isinstance(out, ForwardRequest)
    assert decide(make_zone(forwarding=True), name).forward
    off = make_zone(forwarding=False)
    msg = ask(off, name)
    assert msg.rcode() == dns.rcode.REFUSED
    assert not msg.flags & dns.flags.AA
    assert not msg.flags & dns.flags.RA
    assert decide(off, name).rule == "refused"


def test_a_hostname_shadows_the_upstream_answer() -> None:
    z = make_zone(forwarding=True)
    r = MessageHandler(z)
    msg = ask(r, "httpbin.org")
    assert addresses(msg) == ["240.0.0.7"]
    assert msg.flags & dns.flags.RA  # an upstream exists
    # ...but only the exact name: others below it go upstream.
    out = r.handle_udp(dns.message.make_query("www.httpbin.org", "A").to_wire())
    assert isinstance(out, ForwardRequest)


def test_ra_says_whether_recursion_is_available() -> None:
    assert not ask(make_zone(forwarding=False), "frontend.mesh").flags & dns.flags.RA
    assert ask(make_zone(forwarding=True), "frontend.mesh").flags & dns.flags.RA


def test_empty_registry_answers_nxdomain_and_soa() -> None:
    z = make_zone(Registry.empty())
    assert_nxdomain(ask(z, "frontend.kong.svc.80.mesh"), "mesh")
    assert_nxdomain(ask(z, "kong.svc.80.mesh"), "mesh")
    assert ask(z, "mesh", "SOA").answer[0][0].serial == 0
    assert_nxdomain(ask(z, "0.240.in-addr.arpa", "PTR"), "240.in-addr.arpa")


def test_decision_records_service_and_zone(z: Zone) -> None:
    d = decide(z, "frontend_kong_svc_80.mesh")
    assert d.service is not None and d.service.key == ("frontend", "kong", 80)
    assert d.zone == "mesh" and d.aa and not d.forward
    d = decide(z, "3.2.1.250.in-addr.arpa", "PTR")
    assert d.rule == "ptr" and d.zone == "250.in-addr.arpa"
    assert d.service is not None and d.service.name == "far"


def test_qtype_name() -> None:
    assert qtype_name(1) == "A"
    assert qtype_name(33) == "SRV"
    assert qtype_name(255) == "ANY"


def test_qtype_name_of_an_unknown_type_is_the_rfc3597_form() -> None:
    # SPEC is silent; qtype_name's own fallback (and dig, and the metrics qtype label an
    # operator greps for) use RFC 3597's TYPEnnn.
    assert qtype_name(65280) == "TYPE65280"
    assert qtype_name(999) == "TYPE999"


def test_every_vip_in_the_registry_has_a_ptr(z: Zone) -> None:
    for svc in z.registry.services.values():
        for value, version in ((svc.vip, 4), (svc.vip6, 6)):
            if value is None:
                continue
            addr = str(ipaddress.ip_address(value)) if version == 4 else str(
                ipaddress.IPv6Address(value))
            msg = ask(z, dns.reversename.from_address(addr).to_text(), "PTR")
            assert msg.answer, addr


def test_locate_is_the_one_lookup_both_encoders_start_from() -> None:
    """Zone.locate: what a name is and whose, in Zone.decide's order (the wire fast path
    makes the very same call)."""
    from meshdns.core.answer import _zone

    z = make_zone(search=("corp.example",), forwarding=True)
    reg = z.registry
    front = reg.services[("frontend", "kong", 80)]
    kinds = {
        "frontend.kong.svc.80.mesh": (_zone.SERVICE_NAME, front, "canonical", "mesh", "mesh"),
        "frontend_kong_svc_80.mesh.local":
            (_zone.SERVICE_NAME, front, "kuma", "mesh.local", "mesh.local"),
        "deep.a.b.mesh": (_zone.SERVICE_NAME, front, "hostname", "mesh", "mesh"),
        "httpbin.org": (_zone.HOST_NAME, front, "hostname", "httpbin.org", "mesh"),
        "7.0.0.240.in-addr.arpa": (_zone.VIP_NAME, front, "ptr", None, "mesh"),
        "a.b.mesh": (_zone.EMPTY_NAME, None, "empty-non-terminal", "mesh", "mesh"),
        "kong.svc.80.mesh": (_zone.EMPTY_NAME, None, "empty-non-terminal", "mesh", "mesh"),
        "nope.kong.svc.80.mesh": (_zone.NO_NAME, None, "nxdomain", "mesh", "mesh"),
        "mesh.local": (_zone.APEX_NAME, None, "apex", "mesh.local", "mesh.local"),
        # Not located: decide's own (a reverse zone's names, the search list, forwarded).
        "0.240.in-addr.arpa": None,
        "9.0.0.240.in-addr.arpa": None,
        "frontend.kong.svc.80.mesh.corp.example": None,
        "example.org": None,
    }
    for name, want in kinds.items():
        assert z.locate(name) == want, name
    # The longest served domain that matches wins, as Zone.served_domain says.
    assert z.locate("frontend.kong.svc.80.mesh.local")[3] == "mesh.local"
    # A zone with no registry yet denies nothing it would answer itself.
    unloaded = Zone(reg, z.settings, loaded=False)
    assert unloaded.locate("frontend.kong.svc.80.mesh")[0] == _zone.UNLOADED_NAME
    assert unloaded.locate("mesh")[0] == _zone.UNLOADED_NAME


def test_locate_leaves_out_what_dns_select_hides_unless_asked() -> None:
    from meshdns.core.answer import _zone

    policy = RegistryPolicy(domains=("mesh", "mesh.local"), range4=RANGE4, range6=None,
                            select=(("team", "blue"),))
    items = [dict(s, labels={"team": "blue" if s["name"] == "backend" else "red"})
             for s in SERVICES]
    z = make_zone(apply_put(Registry.empty(), parse_services(items), policy, 0.0))
    front = z.registry.services[("frontend", "kong", 80)]
    assert z.locate("frontend.kong.svc.80.mesh")[0] == _zone.NO_NAME
    assert z.locate("httpbin.org") is None
    assert z.locate("7.0.0.240.in-addr.arpa") is None
    assert z.locate("frontend.kong.svc.80.mesh", include_hidden=True) == \
        (_zone.SERVICE_NAME, front, "canonical", "mesh", "mesh")
    backend = z.registry.services[("backend", "kong", 8080)]
    assert z.locate("api.example.com") == \
        (_zone.HOST_NAME, backend, "hostname", "api.example.com", "mesh")


def test_the_answer_rule_by_question_type() -> None:
    from meshdns.core.answer import _zone

    reg = registry()
    both, v4 = reg.services[("frontend", "kong", 80)], reg.services[("far", "edge", 443)]
    rule = {t: (_zone.service_answer(both, t), _zone.service_answer(v4, t))
            for t in (1, 28, 255, 33, 16, 12)}
    assert rule == {1: (_zone.ANSWER_A, _zone.ANSWER_A),
                    28: (_zone.ANSWER_AAAA, _zone.NODATA),
                    255: (_zone.ANSWER_A_AAAA, _zone.ANSWER_A),
                    33: (_zone.ANSWER_SRV, _zone.ANSWER_SRV),
                    16: (_zone.NODATA, _zone.NODATA), 12: (_zone.NODATA, _zone.NODATA)}
    assert [_zone.vip_answer(t) for t in (12, 255, 1)] == \
        [_zone.ANSWER_PTR, _zone.ANSWER_PTR, _zone.NODATA]
