"""The wire fast path answers exactly as the dnslib path it shortcuts.

``FastPath`` (meshdns/core/answer/_fastpath.py) writes replies straight to wire for the
common questions; the reference is what every miss did before it: the strict
parser, ``Zone.decide`` and dnslib's encoder (``handler.encode``). For random
registries and settings, every answer row of SPEC section 4 is asked in random
letter case, with and without EDNS (sizes, DO bit, an option), over UDP and
TCP. The replies must be the same bytes; they are also parsed with dnspython
to check the fields a client reads. Rows the fast path is meant to take must
be taken by it (else the comparison would prove nothing).

What a registry change keeps of the caches: tests/unit/test_core_cache_changes.py.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.rdatatype
from dnslib import EDNS0, DNSRecord, EDNSOption
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshdns.core.answer import (
    QTYPE_AXFR,
    QTYPE_IXFR,
    FastPath,
    FormatError,
    MessageHandler,
    Zone,
    ZoneSettings,
    encode,
    parse_query,
    udp_limit,
)
from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    VipRange,
    apply_put,
    canonical_name,
    kuma_name,
)

RANGE4 = VipRange.from_cidr("240.0.0.0/4")
RANGE6 = VipRange.from_cidr("fd00:fd00::/64")
NAMES = ("web", "api", "db", "front-end", "x1", "svc", "a")
NAMESPACES = ("kong", "default", "ns-2", "b")
PORTS = (80, 443, 8080, 53, 65535)
OUTSIDE = ("httpbin.org", "api.example.com", "_x.tags.example.net", "deep.a.b.example")
SEARCH = ("corp.example", "svc.cluster.local")
TYPES: tuple[str | int, ...] = ("A", "AAAA", "SRV", "ANY", "TXT", "PTR", "CNAME", "MX",
                                 "SOA", "NS", 0, 41, 99, 65535)


# ---------------------------------------------------------------- the reference


def reference(zone: Zone, data: bytes, udp: bool) -> bytes | str | None:
    """What a miss answered before the fast path: strict parse, decide, dnslib encode."""
    try:
        query = parse_query(data)
    except FormatError:
        return "formerr"
    ra = zone.settings.forwarding
    if query.opcode or (query.edns is not None and query.edns.version > 0) \
            or query.qtype in (QTYPE_AXFR, QTYPE_IXFR):
        return "error"
    decision = zone.decide(query.labels, query.qtype, query.qclass)
    if decision.forward:
        return "forward"
    return encode(query, decision, udp_limit(query) if udp else None, ra)


# ---------------------------------------------------------------- random registries


@dataclass(frozen=True)
class World:
    zone: Zone
    policy: RegistryPolicy
    questions: list[tuple[str, str | int, bool]]  # (name, type, the fast path must take it)


def service_items(draw: Any) -> list[dict[str, Any]]:
    keys = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMESPACES),
                                   st.sampled_from(PORTS)), min_size=1, max_size=8, unique=True))
    taken_hosts: set[str] = set()
    items = []
    for i, (name, ns, port) in enumerate(keys):
        item: dict[str, Any] = {"name": name, "namespace": ns, "port": port}
        if draw(st.booleans()):
            # Distinct modulo 16, so never two alike.
            item["vip"] = str(ipaddress.IPv4Address(int(RANGE4.network.network_address) + 1
                                                    + i + 16 * draw(st.integers(0, 70000))))
        if draw(st.booleans()):
            item["vip6"] = f"fd00:fd00::{i + 1:x}"
        hosts = [h for h in draw(st.lists(st.sampled_from(
            (*OUTSIDE, "frontend.mesh", "deep.x.y.mesh", "alias.mesh.local",
             f"{name}.{ns}.svc.{port}.mesh")), max_size=2, unique=True))
            if h not in taken_hosts]
        taken_hosts.update(hosts)
        item["hostnames"] = hosts
        items.append(item)
    return items


@st.composite
def worlds(draw: Any) -> World:
    domains = draw(st.sampled_from((("mesh",), ("mesh", "mesh.local"), ("mesh.local", "mesh"))))
    # Without an IPv6 range, only services given a vip6 have one.
    policy = RegistryPolicy(domains=domains, range4=RANGE4,
                            range6=draw(st.sampled_from((RANGE6, None))))
    items = service_items(draw)
    from meshdns.core.registry import parse_services

    reg = apply_put(Registry.empty(), parse_services(items), policy, 0.0)
    if draw(st.booleans()):  # a later revision: the SOA serial is not always 1
        reg = apply_put(reg, parse_services(items[:-1]), policy, 1.0)
    zs = ZoneSettings(domains=domains, ttl=draw(st.sampled_from((0, 30, 86400))),
                      negative_ttl=draw(st.sampled_from((0, 5, 3600))),
                      search=draw(st.sampled_from(((), SEARCH))),
                      range4=RANGE4, range6=RANGE6, forwarding=draw(st.booleans()))
    zone = Zone(reg, zs)
    return World(zone, policy, questions_for(zone))


def reverse(vip: int, family: int) -> str:
    addr = ipaddress.IPv4Address(vip) if family == 4 else ipaddress.IPv6Address(vip)
    return addr.reverse_pointer


def questions_for(zone: Zone) -> list[tuple[str, str | int, bool]]:
    """Every row of SPEC section 4, for this registry: (name, type, fast path expected)."""
    out: list[tuple[str, str | int, bool]] = []
    reg, domains = zone.registry, zone.settings.domains
    for svc in reg.services.values():
        names = list(svc.hostnames)
        for d in domains:
            names.append(canonical_name(svc.name, svc.namespace, svc.port, d))
            kuma = kuma_name(svc.name, svc.namespace, svc.port, d)
            if kuma is not None:
                names.append(kuma)
        for name in names:
            for t in TYPES:
                served = any(name == d or name.endswith("." + d) for d in domains)
                where = zone.locate(name) if served else None
                owner = where[1] if where is not None else None
                # Service names answer on the fast path, apart from apex-like cases and
                # a question of type OPT, which the strict path answers FORMERR.
                out.append((name, t, (owner is not None or not served) and t != 41))
            for suffix in zone.settings.search:
                out.append((f"{name}.{suffix}", "A", False))  # search list: dnslib path
        out.append((reverse(svc.vip, 4), "PTR", True))
        out.append((reverse(svc.vip, 4), "ANY", True))
        out.append((reverse(svc.vip, 4), "A", False))  # NODATA of a reverse name
        if svc.vip6 is not None:
            out.append((reverse(svc.vip6, 6), "PTR", True))
        out.append((f"{svc.namespace}.svc.{svc.port}.{domains[0]}", "A", True))  # ENT
        out.append((f"svc.{svc.port}.{domains[-1]}", "AAAA", True))  # ENT
        out.append((f"{svc.port}.{domains[0]}", "TXT", True))  # ENT
        out.append((f"nope.{svc.namespace}.svc.{svc.port}.{domains[0]}", "A", True))  # NX
    for d in domains:
        for t in ("SOA", "NS", "A", "ANY"):
            out.append((d, t, False))  # apex: dnslib path
        out.append((f"missing.{d}", "A", True))
        out.append((f"missing.{d}", "SRV", True))
        out.append((f"a.b.c.d.e.{d}", "AAAA", True))
        out.append((f"web.kong.svc.080.{d}", "A", True))  # not a port label: NXDOMAIN
    out += [("250.1.2.3.in-addr.arpa", "PTR", False), ("240.in-addr.arpa", "SOA", False),
            ("1.0.0.240.in-addr.arpa", "PTR", False), ("example.org", "A", False),
            ("d.f.ip6.arpa", "PTR", False), ("x.httpbin.org", "A", False)]
    return out


def random_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def packet(name: str, rdtype: str | int, rng: random.Random, edns: int) -> bytes:
    q = DNSRecord.question(name, rdtype if isinstance(rdtype, str) else "A")
    if isinstance(rdtype, int):
        q.q.qtype = rdtype
    q.header.id = rng.randrange(65536)
    q.header.rd = rng.random() < 0.8
    q.header.cd = rng.random() < 0.2
    if edns == 1:
        q.add_ar(EDNS0(udp_len=rng.choice((0, 512, 1232, 4096))))
    elif edns == 2:
        q.add_ar(EDNS0(udp_len=rng.choice((1232, 1400)), flags="do",
                       opts=[EDNSOption(10, bytes(rng.randrange(256) for _ in range(8)))]))
    data = bytearray(q.pack())
    if rng.random() < 0.3:  # flag bits a query should not carry (AA, TC; RA, Z, AD)
        data[2] |= rng.choice((0x04, 0x02, 0x06))
        data[3] |= rng.choice((0x80, 0x40, 0x20, 0xE0))
    return bytes(data)


def check_same(world: World, seed: int, edns: int, as_given: bool = False) -> int:
    """Ask every question (in random letter case, or ``as_given``: in the case the
    name was written, which is the case of the SRV target and PTR name the reply
    carries); return how many the fast path took."""
    rng = random.Random(seed)
    zone = world.zone
    fast = FastPath(zone)
    taken = 0
    for name, rdtype, expected in world.questions:
        asked = name if as_given else random_case(name, rng)
        data = packet(asked, rdtype, rng, edns)
        for udp in (True, False):
            want = reference(zone, data, udp)
            got = fast.answer(data, udp)
            if got is None:
                # Not for the fast path: the reference must be a case it leaves to dnslib
                # (or a reply over the UDP limit, which dnslib truncates).
                assert not (expected and isinstance(want, bytes) and not want[2] & 0x02), \
                    (name, rdtype, edns, udp)
                continue
            taken += 1
            assert isinstance(want, bytes), (name, rdtype, want)
            assert got[0] == want, (name, rdtype, edns, udp, got[0].hex(), want.hex())
            assert got[1] == (rdtype if isinstance(rdtype, int)
                              else dns.rdatatype.from_text(rdtype))
            assert got[2] == want[3] & 0x0F
            parsed_got = dns.message.from_wire(got[0])
            parsed_want = dns.message.from_wire(want)
            assert parsed_got == parsed_want
            assert parsed_got.question[0].name.to_text() == asked + "."  # case echoed
            # Through the resolver (a miss, then a hit): the same bytes again.
            resolver = MessageHandler(zone)
            handle = resolver.handle_udp if udp else resolver.handle_tcp
            assert handle(data) == want
            assert handle(data) == want
    return taken


# ---------------------------------------------------------------- the tests


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(0, 2**32), st.sampled_from((0, 1, 2)))
def test_fast_path_replies_are_the_dnslib_replies(world: World, seed: int, edns: int) -> None:
    taken = check_same(world, seed, edns)
    assert taken > 0


def demo_world(domains: tuple[str, ...] = ("mesh", "mesh.local")) -> World:
    policy = RegistryPolicy(domains=domains, range4=RANGE4, range6=None)
    from meshdns.core.registry import parse_services

    items = [{"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
              "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org"]},
             {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"}]
    reg = apply_put(Registry.empty(), parse_services(items), policy, 0.0)
    zone = Zone(reg, ZoneSettings(domains=domains, ttl=30, negative_ttl=5, search=SEARCH,
                                  range4=RANGE4, range6=RANGE6, forwarding=True))
    return World(zone, policy, questions_for(zone))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(0, 2**32), st.sampled_from((0, 1, 2)))
def test_questions_in_the_names_own_case_match_too(world: World, seed: int, edns: int) -> None:
    # An SRV question for the target's own name in its own case takes a pre-built
    # reply body (per service and TTL); asked twice, so the second one reuses it.
    assert check_same(world, seed, edns, as_given=True) > 0
    assert check_same(world, seed + 1, edns, as_given=True) > 0


def test_every_fast_row_is_taken_in_every_case_and_edns_shape() -> None:
    world = demo_world()
    for edns in (0, 1, 2):
        for seed in range(5):
            assert check_same(world, seed, edns) > 100


def test_rows_keep_their_contract_answers() -> None:
    """Values, not just sameness: what the fast path says for the main rows."""
    fast = FastPath(demo_world().zone)
    rng = random.Random(1)

    def ask(name: str, rdtype: str) -> dns.message.Message:
        out = fast.answer(packet(name, rdtype, rng, 0), True)
        assert out is not None, (name, rdtype)
        return dns.message.from_wire(out[0])

    a = ask("FrontEnd.Kong.svc.80.MESH", "A")
    assert [r.to_text() for r in a.answer[0]] == ["240.0.0.7"]
    assert a.answer[0].name.to_text() == "FrontEnd.Kong.svc.80.MESH."
    assert a.answer[0].ttl == 30 and a.flags & 0x0400  # AA
    aaaa = ask("backend_kong_svc_8080.mesh", "AAAA")
    assert aaaa.rcode() == 0 and not aaaa.answer
    assert aaaa.authority[0].to_text().split()[4:7] == ["mesh.", "nobody.invalid.", "1"]
    srv = ask("frontend.kong.svc.80.Mesh.Local", "SRV")
    assert srv.answer[0][0].to_text() == "0 100 80 frontend.kong.svc.80.mesh.local."
    assert sorted(r.to_text().split()[-1] for r in srv.additional) == ["240.0.0.7",
                                                                       "fd00:fd00::7"]
    nx = ask("nope.MESH", "A")
    assert nx.rcode() == 3 and nx.authority[0].name.to_text() == "mesh."
    ent = ask("kong.svc.80.mesh", "A")
    assert ent.rcode() == 0 and ent.authority[0].ttl == 5
    ptr = ask("7.0.0.240.IN-ADDR.arpa", "PTR")
    assert ptr.answer[0][0].to_text() == "frontend.kong.svc.80.mesh."
    host = ask("HttpBin.org", "TXT")
    assert host.authority[0].name.to_text() == "httpbin.org."


def test_odd_messages_are_left_to_the_strict_path() -> None:
    fast = FastPath(demo_world().zone)
    good = packet("frontend.kong.svc.80.mesh", "A", random.Random(0), 1)
    assert fast.answer(good, True) is not None
    for bad in (good[:-1], good + b"\x00", good[:2] + b"\x08" + good[3:],  # opcode
                good[:4] + b"\x00\x02" + good[6:],  # two questions
                good[:-5] + b"\x01" + good[-4:],  # EDNS version 1
                packet("frontend.kong.svc.80.mesh", "AXFR", random.Random(0), 0),
                packet("mesh", "SOA", random.Random(0), 0),
                packet("frontend.kong.svc.80.mesh.corp.example", "A", random.Random(0), 0),
                good[:-13] + b"\x00\x03" + good[-11:]):  # class CH
        assert fast.answer(bad, True) is None


def test_reverse_name_reading_matches_the_zone() -> None:
    """Zone.locate's reading of a full reverse name (ipv4_/ipv6_of_reverse_name) accepts
    exactly the octets and nibbles the zone's label readers accept."""
    from meshdns.core.answer import _zone

    labels = [str(i) for i in range(300)] + ["00", "01", "007", "-1", "+1", " 1", "1 ", "²",
                                              "٣", "1e2", "0x1", ""]
    for label in labels:
        key = f"{label}.0.0.240.in-addr.arpa"
        want = _zone.octet_label(label)
        got = _zone.ipv4_of_reverse_name(key)
        assert got == (None if want is None else (240 << 24) | want), label
    six = ipaddress.IPv6Address("fd00:fd00::7").reverse_pointer
    assert _zone.ipv6_of_reverse_name(six) == int(ipaddress.IPv6Address("fd00:fd00::7"))
    for bad in ("A", "g", "_", "77", "٣"):
        assert _zone._nibble(bad) is None
        assert _zone.ipv6_of_reverse_name(bad + six[1:]) is None


def test_a_reply_over_the_udp_limit_is_truncated_by_the_dnslib_path() -> None:
    """Long names: the fast path declines over UDP, so TC=1 comes out as before; over TCP
    (no limit) it answers in full, the same bytes as dnslib."""
    from meshdns.core.registry import parse_services

    long_host = ".".join(["h" * 60, "i" * 60, "j" * 60, "k" * 60, "example"])  # 253 chars
    name, ns = "n" * 63, "s" * 63
    policy = RegistryPolicy(domains=("mesh",), range4=RANGE4, range6=RANGE6)
    reg = apply_put(Registry.empty(), parse_services(
        [{"name": name, "namespace": ns, "port": 8080, "hostnames": [long_host]}]), policy, 0.0)
    zone = Zone(reg, ZoneSettings(domains=("mesh",), range4=RANGE4, range6=RANGE6))
    fast = FastPath(zone)
    rng = random.Random(5)
    for edns in (0, 1):
        data = packet(random_case(long_host, rng), "SRV", rng, edns)
        want_udp, want_tcp = reference(zone, data, True), reference(zone, data, False)
        assert isinstance(want_udp, bytes) and isinstance(want_tcp, bytes)
        assert len(want_tcp) > 512
        got_tcp = fast.answer(data, False)
        assert got_tcp is not None and got_tcp[0] == want_tcp
        if len(want_tcp) > udp_limit(parse_query(data)):
            assert want_udp[2] & 0x02  # TC=1, question (and OPT) only
            assert fast.answer(data, True) is None
            assert MessageHandler(zone).handle_udp(data) == want_udp
        else:
            assert fast.answer(data, True) == got_tcp


def test_cut_and_mutated_queries_never_raise_and_never_differ() -> None:
    """Every prefix of a query, and single-byte changes: the fast path declines or answers
    exactly what the strict path would (never an exception: the server must not crash)."""
    world = demo_world()
    fast = FastPath(world.zone)
    rng = random.Random(11)
    seeds = [packet(n, t, rng, edns) for n, t in (("frontend.kong.svc.80.mesh", "A"),
                                                   ("nope.mesh", "AAAA"),
                                                   ("7.0.0.240.in-addr.arpa", "PTR"),
                                                   ("frontend.kong.svc.80.mesh", "SRV"))
             for edns in (0, 1, 2)]
    cases = [data[:cut] for data in seeds for cut in range(12, len(data) + 1)]
    for data in seeds:
        for _ in range(300):
            b = bytearray(data)
            at = rng.randrange(2, len(b))
            b[at] = rng.choice((0, 1, 0x29, 0x3F, 0x40, 0xC0, 0xFF, rng.randrange(256)))
            if not b[2] & 0x80:  # a response is dropped before the fast path
                cases.append(bytes(b))
    taken = 0
    for data in cases:
        for udp in (True, False):
            got = fast.answer(data, udp)
            if got is not None:
                taken += 1
                assert got[0] == reference(world.zone, data, udp), data.hex()
    assert taken > 100
