"""The forward shortcut (_owned.py) forwards exactly what the full path forwards.

A reply-cache miss for a name nothing of the zone can own goes to the forwarder after
one read of the question (``OwnedNames.forwarded``), without the fast path's attempt,
the strict parse and ``Zone.decide``. The reference is that full path: ``parse_query``
then ``Zone.decide`` saying FORWARD. Whatever the shortcut takes must be a query the
reference forwards, handed along as the very ``Query`` the strict parser builds (with
its lookup key and UDP limit), and counted the same; names an entry could own (host
names, rendered names, wildcard host names, search-list names, reverse names, served
domains) must be left to the full path.
"""

from __future__ import annotations

import dataclasses
import random

from dnslib import EDNS0, DNSRecord, EDNSOption
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshdns.core.answer import (
    ForwardRequest,
    MessageHandler,
    Zone,
    parse_query,
    udp_limit,
)
from meshdns.core.answer._owned import OwnedNames
from meshdns.core.answer._wire import wire_to_key

from .test_core_fastpath_equivalence import (
    OUTSIDE,
    SEARCH,
    World,
    demo_world,
    packet,
    random_case,
    reference,
    worlds,
)

NEW_NAMES = ("n1.new.example.com", "x.corp.example", "deep.a.b.c.d.example.net", "com",
             "w-1.svc.cluster.local", "UPPER.Example.ORG", "a" * 63 + ".example.com",
             "x.y.httpbin.org", "mesh.example", "meshx", "xmesh.local.example")


def questions(world: World) -> list[tuple[str, str | int]]:
    out = [(name, t) for name, t, _ in world.questions]
    for name in (*OUTSIDE, *NEW_NAMES):
        for t in ("A", "AAAA", "TXT", "MX", "SRV", "PTR", "ANY", 0, 41, 252, 65535):
            out.append((name, t))
    return out


def check(zone: Zone, data: bytes) -> bool:
    """The shortcut's reading of ``data`` against the full path's; True if it took it."""
    owned = OwnedNames(zone)
    if not owned.forwarding:  # the handler asks only a zone that forwards
        return False
    got = owned.forwarded(data)
    if got is None:
        return False
    assert reference(zone, data, True) == "forward", data.hex()
    query = parse_query(data)
    assert got == (query, wire_to_key(query.labels), udp_limit(query)), data.hex()
    return True


def through_handler(zone: Zone, data: bytes) -> None:
    """The handler's outcome and counts for ``data`` are the full path's."""
    want = reference(zone, data, True)
    if want == "forward" and parse_query(data).qtype == 41:
        want = "formerr"  # a question of type OPT: the handler's FORMERR (RFC 6891)
    handler = MessageHandler(zone)
    for _ in range(2):  # a miss, then the forward memo
        for handle in (handler.handle_udp, handler.handle_tcp):
            out = handle(data)
            if want == "forward":
                query = parse_query(data)
                assert isinstance(out, ForwardRequest), data.hex()
                assert (out.query, out.data, out.udp_limit) == (query, data, udp_limit(query))
            else:
                assert not isinstance(out, ForwardRequest)
    if want == "forward":  # each of the four asked once as its qtype, no reply counted
        qtype = parse_query(data).qtype
        counts = handler.snapshot_counts()
        assert counts.requests == {("udp", qtype): 2, ("tcp", qtype): 2}, data.hex()
        assert counts.responses == {}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.integers(0, 2**32), st.sampled_from((0, 1, 2)))
def test_the_shortcut_forwards_only_what_decide_forwards(world: World, seed: int,
                                                          edns: int) -> None:
    rng = random.Random(seed)
    taken = 0
    for name, rdtype in questions(world):
        data = packet(random_case(name, rng), rdtype, rng, edns)
        taken += check(world.zone, data)
        through_handler(world.zone, data)
    if world.zone.settings.forwarding:
        assert taken > 0  # else the comparison would prove nothing
    else:
        assert taken == 0  # no upstream: REFUSED by Zone.decide, never the shortcut


def test_new_names_are_taken_and_owned_names_are_not() -> None:
    zone = demo_world().zone  # host names frontend.mesh, httpbin.org; search SEARCH
    rng = random.Random(3)
    for name in ("n1.new.example.com", "x.corp.example", "WWW.Example.Com", "x.httpbin.org",
                 "svc.cluster.local.example"):
        for edns in (0, 1, 2):
            assert check(zone, packet(name, "A", rng, edns)), name
    for name in ("httpbin.org", "HTTPBIN.org", "frontend.kong.svc.80.mesh.corp.example",
                 "nope.mesh.svc.cluster.local", "mesh", "x.mesh.local", "7.0.0.240.in-addr.arpa",
                 "1.2.3.4.in-addr.arpa", "b.a.ip6.arpa"):
        assert not check(zone, packet(name, "A", rng, 1)), name
        assert OwnedNames(zone).may_own(name.lower()), name


def test_wildcard_and_rendered_names_are_left_to_the_zone() -> None:
    """A wildcard host name ``*.<parent>`` (kept in Registry.hostnames) owns every name
    below its parent, a rendered template name its own: never the shortcut's."""
    zone = demo_world().zone
    reg = zone.registry
    owner = next(iter(reg.services))
    hosts = {**reg.hostnames, "*.wild.example.com": owner}
    wild = Zone(dataclasses.replace(reg, hostnames=hosts), zone.settings)
    owned = OwnedNames(wild)
    for name in ("a.wild.example.com", "b.a.wild.example.com", "*.wild.example.com"):
        assert owned.may_own(name), name
    for name in ("wild.example.com", "example.com", "a.wildx.example.com"):
        assert not owned.may_own(name), name


def test_odd_messages_are_left_to_the_strict_path() -> None:
    zone = demo_world().zone
    owned = OwnedNames(zone)
    good = packet("n1.new.example.com", "A", random.Random(0), 1)
    assert owned.forwarded(good) is not None
    q = DNSRecord.question("n1.new.example.com", "A")
    q.add_ar(EDNS0(udp_len=4096, opts=[EDNSOption(3, b"")]))  # NSID: forwarded, flagged
    nsid = owned.forwarded(q.pack())
    assert nsid is not None and nsid[0].edns is not None and nsid[0].edns.nsid
    for bad in (good[:-1], good + b"\x00", good[:2] + b"\x08" + good[3:],  # opcode
                good[:4] + b"\x00\x02" + good[6:],  # two questions
                good[:-5] + b"\x01" + good[-4:],  # EDNS version 1
                packet("n1.new.example.com", "AXFR", random.Random(0), 0),
                packet("n1.new.example.com", "IXFR", random.Random(0), 0),
                packet("n1.new.example.com", 41, random.Random(0), 0)):
        assert owned.forwarded(bad) is None


def test_cut_and_mutated_queries_never_raise_and_never_differ() -> None:
    world = demo_world()
    zone = world.zone
    rng = random.Random(7)
    seeds = [packet(n, t, rng, edns) for n, t in (("n1.new.example.com", "A"),
                                                   ("Api.Example.com", "AAAA"),
                                                   ("x.corp.example", "TXT"))
             for edns in (0, 1, 2)]
    cases = [data[:cut] for data in seeds for cut in range(12, len(data) + 1)]
    for data in seeds:
        for _ in range(400):
            b = bytearray(data)
            at = rng.randrange(2, len(b))
            b[at] = rng.choice((0, 1, 0x29, 0x2E, 0x3F, 0x40, 0x5C, 0xC0, 0xFF,
                                rng.randrange(256)))
            if not b[2] & 0x80:  # a response is dropped before any of this
                cases.append(bytes(b))
    taken = sum(check(zone, data) for data in cases)
    assert taken > 100
    for data in cases[::7]:
        through_handler(zone, data)


def test_refused_by_policy_and_counted_the_same() -> None:
    """dns.allow_recursion: a client that may not have names forwarded gets REFUSED with
    EDE 18 for a shortcut name, counted as before (request, REFUSED, refusal)."""
    zone = demo_world().zone
    plain = Zone(zone.registry, dataclasses.replace(zone.settings, search=SEARCH))
    rng = random.Random(5)
    data = packet("n9.new.example.com", "A", rng, 1)
    handler = MessageHandler(plain)
    out = handler.handle_local(data, "udp")
    assert isinstance(out, bytes) and out[3] & 0x0F == 5
    assert handler.tally.recursion_refused == 1
    assert isinstance(handler.handle_udp(data), ForwardRequest)  # the memo, then
    assert isinstance(handler.handle_local(data, "udp"), bytes)
    assert handler.tally.recursion_refused == 2


def test_no_upstream_refuses_as_before() -> None:
    zone = demo_world().zone
    off = Zone(zone.registry, dataclasses.replace(zone.settings, forwarding=False))
    assert not OwnedNames(off).forwarding
    assert not check(off, packet("n1.new.example.com", "A", random.Random(1), 1))
    data = packet("n1.new.example.com", "A", random.Random(1), 1)
    handler = MessageHandler(off)
    assert handler.handle_udp(data) == reference(off, data, True)
