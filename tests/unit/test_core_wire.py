"""Wire protocol in the pure core: the strict query parser and MessageHandler.handle_udp/tcp.

No sockets: queries are built with dnspython (or by hand where dnspython would
refuse to build them), fed as bytes, and the replies decoded with
``dns.message.from_wire``.
"""

from __future__ import annotations

import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from meshdns.core.answer import (
    HEADER_LEN,
    RCODE_FORMERR,
    BadEDNS,
    BadName,
    BadQuestionCount,
    FormatError,
    ForwardRequest,
    MessageHandler,
    ShortHeader,
    TrailingJunk,
    Truncated,
    WireError,
    Zone,
    ZoneSettings,
    error_reply,
    parse_query,
)
from meshdns.core.registry import Registry, RegistryPolicy, apply_put, parse_services

POLICY = RegistryPolicy()
DEMO: list[dict[str, Any]] = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"},
]
LONG_DOMAIN = "a-rather-long-served-domain-name-used-for-truncation.example"
BIG = {"name": "n" * 63, "namespace": "s" * 63, "port": 65535, "vip": "240.0.0.9",
       "vip6": "fd00:fd00::9"}
# Upper case, so the lower-case SRV target cannot be compressed against the question.
BIG_NAME = f"{'n' * 63}.{'s' * 63}.svc.65535.{LONG_DOMAIN}".upper()


def registry(items: list[dict[str, Any]] = DEMO) -> Registry:
    return apply_put(Registry.empty(), parse_services(items), POLICY, 0.0)


def settings(**kw: Any) -> ZoneSettings:
    base: dict[str, Any] = {"domains": ("mesh", LONG_DOMAIN), "range4": POLICY.range4,
                            "range6": POLICY.range6}
    base.update(kw)
    return ZoneSettings(**base)


def resolver(items: list[dict[str, Any]] = DEMO, cache: int = 100_000, **kw: Any) -> MessageHandler:
    return MessageHandler(Zone(registry([*items, BIG]), settings(**kw)), cache)


def wire(name: str, rdtype: str | int = "A", *, qid: int = 0x1234, edns: int = -1,
         payload: int = 1232, dnssec: bool = False, rdclass: str | int = "IN",
         options: list[Any] | None = None) -> bytes:
    msg = dns.message.make_query(name, rdtype, rdclass, use_edns=edns, payload=payload,
                                 want_dnssec=dnssec, options=options)
    msg.id = qid
    return msg.to_wire()


def decode(reply: Any) -> dns.message.Message:
    assert isinstance(reply, bytes), reply
    return dns.message.from_wire(reply)


def header(qid: int = 0xBEEF, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x01a\x04mesh\x00" + struct.pack("!HH", 1, 1)


def opt(udp: int = 1232, version: int = 0, do: bool = False, rdata: bytes = b"",
        owner: bytes = b"\x00") -> bytes:
    ttl = (version << 16) | (0x8000 if do else 0)
    return owner + struct.pack("!HHIH", 41, udp, ttl, len(rdata)) + rdata


A_RECORD = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes((10, 0, 0, 1))


# ---------------------------------------------------------------- parser: good input


def test_parse_keeps_question_case_and_fields() -> None:
    q = parse_query(wire("FrOnTeNd.KONG.svc.80.mesh", "AAAA", qid=0xABCD))
    assert q.id == 0xABCD
    assert q.labels == (b"FrOnTeNd", b"KONG", b"svc", b"80", b"mesh")
    assert q.qtype == 28 and q.qclass == 1
    assert q.edns is None
    assert q.opcode == 0 and q.rd and not q.cd


def test_parse_edns_fields() -> None:
    q = parse_query(wire("a.mesh", edns=0, payload=4096, dnssec=True,
                         options=[dns.edns.GenericOption(10, b"12345678")]))
    assert q.edns is not None
    assert (q.edns.udp_size, q.edns.version, q.edns.dnssec_ok) == (4096, 0, True)
    q = parse_query(wire("a.mesh", edns=1, payload=100))
    assert q.edns is not None
    assert (q.edns.udp_size, q.edns.version, q.edns.dnssec_ok) == (512, 1, False)


def test_parse_root_name_and_records_with_pointers_outside_the_question() -> None:
    q = parse_query(header() + b"\x00" + struct.pack("!HH", 2, 1))
    assert q.labels == ()
    # Answer and authority records may use compression pointers: only framing is checked.
    q = parse_query(header(an=1, ns=1) + QUESTION + A_RECORD + A_RECORD)
    assert q.labels == (b"a", b"mesh")


def test_parse_accepts_a_name_of_exactly_255_bytes() -> None:
    labels = [b"a" * 63] * 3 + [b"b" * 61]
    name = b"".join(bytes((len(x),)) + x for x in labels) + b"\x00"
    assert len(name) == 255
    q = parse_query(header() + name + struct.pack("!HH", 1, 1))
    assert len(q.labels) == 4


# ---------------------------------------------------------------- parser: typed errors


@pytest.mark.parametrize("size", range(HEADER_LEN))
def test_short_header(size: int) -> None:
    with pytest.raises(ShortHeader):
        parse_query(wire("a.mesh")[:size])


@pytest.mark.parametrize("count", [0, 2, 3, 0xFFFF])
def test_bad_question_count(count: int) -> None:
    with pytest.raises(BadQuestionCount):
        parse_query(header(qd=count) + QUESTION * min(max(count, 1), 3))


@pytest.mark.parametrize("question", [
    b"\xc0\x0c" + struct.pack("!HH", 1, 1),  # compression pointer in the question
    b"\x01a\xc0\x0c" + struct.pack("!HH", 1, 1),  # ... after a label
    b"\x41" + b"a" * 1 + b"\x00" + struct.pack("!HH", 1, 1),  # label type 0x40 (EDNS0 bitlabel)
    b"\x80\x00" + struct.pack("!HH", 1, 1),  # label type 0x80 (reserved)
    b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63
    + b"\x00" + struct.pack("!HH", 1, 1),  # 257 bytes: longer than 255
], ids=["pointer", "label-then-pointer", "label-type-0x40", "label-type-0x80", "too-long"])
def test_bad_name(question: bytes) -> None:
    with pytest.raises(BadName):
        parse_query(header() + question)


def test_bad_label_type_in_a_record_owner() -> None:
    with pytest.raises(BadName):
        parse_query(header(an=1) + QUESTION + b"\x40" + A_RECORD[2:])


def test_every_cut_of_a_valid_query_is_truncated() -> None:
    full = wire("frontend.kong.svc.80.mesh", edns=0,
                options=[dns.edns.GenericOption(10, b"12345678")])
    parse_query(full)
    for size in range(HEADER_LEN, len(full)):
        with pytest.raises(Truncated):
            parse_query(full[:size])


@pytest.mark.parametrize("tail", [
    b"\x01a\x04me",  # question name runs past the end
    b"\x01a\x04mesh\x00\x00\x01\x00",  # type/class cut short
])
def test_truncated_question(tail: bytes) -> None:
    with pytest.raises(Truncated):
        parse_query(header() + tail)


@pytest.mark.parametrize("records", [
    (1, b""),  # announced record missing
    (1, b"\xc0"),  # pointer cut short
    (1, b"\xc0\x0c" + b"\x00" * 9),  # record header cut short
    (1, b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + b"\x0a\x00"),  # rdata cut short
    (2, A_RECORD),  # two announced, one present
])
def test_truncated_records(records: tuple[int, bytes]) -> None:
    count, body = records
    with pytest.raises(Truncated):
        parse_query(header(an=count) + QUESTION + body)


@pytest.mark.parametrize("junk", [b"\x00", b"\xff" * 7, A_RECORD])
def test_trailing_junk(junk: bytes) -> None:
    with pytest.raises(TrailingJunk):
        parse_query(header() + QUESTION + junk)
    with pytest.raises(TrailingJunk):
        parse_query(wire("a.mesh", edns=0) + junk)


@pytest.mark.parametrize("packet", [
    header(ar=2) + QUESTION + opt() + opt(),  # two OPT records
    header(an=1, ar=0) + QUESTION + opt(),  # OPT in the answer section
    header(ns=1, ar=0) + QUESTION + opt(),  # OPT in the authority section
    header(ar=1) + QUESTION + opt(owner=b"\x01a\x00"),  # OPT owned by a non-root name
    header(ar=1) + QUESTION + opt(owner=b"\xc0\x0c"),  # ... by a pointer to the question
    header(ar=1) + QUESTION + opt(rdata=b"\x00\x0a"),  # option header cut short
    header(ar=1) + QUESTION + opt(rdata=b"\x00\x0a\x00\x08" + b"1234"),  # option too long
    header(ar=1) + QUESTION + opt(rdata=b"\x00\x0a\x00\x00" + b"\x00"),  # 1 stray byte
], ids=["two-opt", "opt-in-answer", "opt-in-authority", "opt-owner-a", "opt-owner-pointer",
        "option-header-short", "option-too-long", "option-stray-byte"])
def test_bad_edns(packet: bytes) -> None:
    with pytest.raises(BadEDNS):
        parse_query(packet)


def test_error_hierarchy() -> None:
    for cls in (BadQuestionCount, BadName, Truncated, TrailingJunk, BadEDNS):
        assert issubclass(cls, FormatError) and issubclass(cls, WireError)
    assert issubclass(ShortHeader, WireError)
    assert not issubclass(ShortHeader, FormatError)


def test_error_reply_echoes_id_opcode_rd_cd() -> None:
    data = header(qid=0x4242, flags=0x0100 | 0x0010 | (2 << 11)) + QUESTION
    reply = error_reply(data, RCODE_FORMERR, echo_question=False)
    assert reply[:2] == b"\x42\x42"
    msg = dns.message.from_wire(reply)
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.RD and msg.flags & dns.flags.CD
    assert msg.opcode() == 2
    assert msg.rcode() == dns.rcode.FORMERR
    assert len(reply) == HEADER_LEN


# ---------------------------------------------------------------- resolver: drop / errors


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_short_packets_and_responses_are_dropped(proto: str) -> None:
    r = resolver()
    handle = r.handle_udp if proto == "udp" else r.handle_tcp
    for size in range(HEADER_LEN):
        assert handle(wire("frontend.kong.svc.80.mesh")[:size]) is None
    response = bytearray(wire("frontend.kong.svc.80.mesh"))
    response[2] |= 0x80  # QR=1
    assert handle(bytes(response)) is None
    assert handle(bytes(response)) is None
    real = decode(handle(wire("frontend.kong.svc.80.mesh")))
    response = bytearray(real.to_wire())
    assert handle(bytes(response)) is None  # a real reply, reflected back
    assert r.tally.dropped == HEADER_LEN + 3


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("packet", [
    header(qid=0xD00D, qd=0),
    header(qid=0xD00D, qd=0) + QUESTION,
    header(qid=0xD00D, qd=2) + QUESTION + QUESTION,
    header(qid=0xD00D) + b"\xc0\x0c\x00\x01\x00\x01",
    header(qid=0xD00D) + b"\x01a",
    header(qid=0xD00D) + QUESTION + b"junk",
    header(qid=0xD00D, ar=2) + QUESTION + opt() + opt(),
    header(qid=0xD00D, an=1) + QUESTION + opt(),
    header(qid=0xD00D, ar=1) + QUESTION + opt(owner=b"\x01a\x00"),
    header(qid=0xD00D, ar=1) + QUESTION + opt(rdata=b"\x00\x0a\x00\x08"),
    header(qid=0xD00D, ar=1) + QUESTION,
    header(qid=0xD00D),
], ids=["qd0", "qd0-with-question", "qd2", "pointer-in-question", "name-cut", "trailing-junk",
        "two-opt", "opt-in-answer", "opt-owner", "option-too-long", "missing-opt", "no-question"])
def test_malformed_after_the_header_is_formerr_echoing_the_id(proto: str, packet: bytes) -> None:
    r = resolver()
    handle = r.handle_udp if proto == "udp" else r.handle_tcp
    reply = handle(packet)
    assert isinstance(reply, bytes)
    assert reply[:2] == b"\xd0\x0d"
    msg = decode(reply)
    assert msg.id == 0xD00D
    assert msg.flags & dns.flags.QR
    assert msg.rcode() == dns.rcode.FORMERR
    assert decode(handle(packet)).rcode() == dns.rcode.FORMERR  # and again: same answer


@pytest.mark.parametrize("opcode", [1, 2, 3, 4, 5, 6, 15])
def test_opcode_other_than_query_is_notimp(opcode: int) -> None:
    r = resolver()
    packet = bytearray(wire("mesh", "SOA", qid=0x0F0F))  # SOA: an UPDATE zone section
    packet[2] = (packet[2] & 0x87) | (opcode << 3)
    msg = decode(r.handle_udp(bytes(packet)))
    assert msg.id == 0x0F0F
    assert msg.rcode() == dns.rcode.NOTIMP
    assert msg.opcode() == opcode
    assert not msg.answer
    packet = bytearray(wire("mesh", "SOA", qid=0x0F10, edns=0, dnssec=True))
    packet[2] = (packet[2] & 0x87) | (opcode << 3)
    msg = decode(r.handle_udp(bytes(packet)))
    assert msg.id == 0x0F10 and msg.rcode() == dns.rcode.NOTIMP
    assert msg.edns == 0  # RFC 6891 §7: a query with OPT gets OPT back, errors included


@pytest.mark.parametrize("name", ["frontend.kong.svc.80.mesh", "mesh", "example.com",
                                  "240.in-addr.arpa"])
@pytest.mark.parametrize("rdtype", ["AXFR", "IXFR"])
def test_zone_transfers_are_refused(name: str, rdtype: str) -> None:
    for r in (resolver(), resolver(forwarding=True)):
        for handle in (r.handle_udp, r.handle_tcp):
            msg = decode(handle(wire(name, rdtype)))
            assert msg.rcode() == dns.rcode.REFUSED
            assert not msg.answer


@pytest.mark.parametrize("rdclass", ["CH", "HS", "NONE", "ANY", 1234])
@pytest.mark.parametrize("name", ["frontend.kong.svc.80.mesh", "nope.mesh", "mesh",
                                  "kong.svc.80.mesh", "frontend_kong_svc_80.mesh",
                                  "7.0.0.240.in-addr.arpa", "240.in-addr.arpa", "httpbin.org"])
def test_class_other_than_in_is_refused_for_mesh_names(rdclass: str | int, name: str) -> None:
    for r in (resolver(), resolver(forwarding=True)):
        reply = r.handle_udp(wire(name, "A", rdclass=rdclass))
        msg = decode(reply)
        assert msg.rcode() == dns.rcode.REFUSED
        assert not msg.answer


def test_edns_version_above_zero_is_badvers() -> None:
    r = resolver()
    for version in (1, 2, 255):
        msg = decode(r.handle_udp(wire("frontend.kong.svc.80.mesh", edns=version, qid=7)))
        assert msg.id == 7
        assert msg.rcode() == dns.rcode.BADVERS
        assert msg.edns == 0  # the reply speaks version 0
        assert not msg.answer


# ---------------------------------------------------------------- resolver: EDNS and size


def test_edns_query_gets_opt_back_with_1232_and_the_do_bit_copied() -> None:
    r = resolver()
    for payload in (512, 1232, 4096, 65535):
        for do in (False, True):
            msg = decode(r.handle_udp(wire("frontend.kong.svc.80.mesh", edns=0, payload=payload,
                                           dnssec=do)))
            assert msg.edns == 0
            assert msg.payload == 1232
            assert bool(msg.ednsflags & dns.flags.DO) == do
            assert msg.rcode() == dns.rcode.NOERROR
    msg = decode(r.handle_udp(wire("frontend.kong.svc.80.mesh")))
    assert msg.edns == -1  # no OPT in, no OPT out
    opts = [dns.edns.GenericOption(10, b"clientck"), dns.edns.GenericOption(65001, b"")]
    msg = decode(r.handle_udp(wire("nope.mesh", edns=0, options=opts)))
    assert msg.edns == 0 and msg.rcode() == dns.rcode.NXDOMAIN


def test_edns_rides_along_on_error_replies() -> None:
    r = resolver()
    msg = decode(r.handle_udp(wire("mesh", "AXFR", edns=0, dnssec=True)))
    assert msg.rcode() == dns.rcode.REFUSED
    assert msg.edns == 0 and msg.ednsflags & dns.flags.DO


def test_over_512_without_edns_is_truncated_and_whole_over_tcp_or_with_edns() -> None:
    r = resolver()
    whole_tcp = r.handle_tcp(wire(BIG_NAME, "SRV"))
    assert isinstance(whole_tcp, bytes)
    assert len(whole_tcp) > 512  # precondition: this answer does not fit a plain UDP reply
    full = decode(whole_tcp)
    assert not full.flags & dns.flags.TC
    assert full.answer and full.additional
    for _ in range(2):  # the cached reply is the truncated one as well
        udp = r.handle_udp(wire(BIG_NAME, "SRV"))
        assert isinstance(udp, bytes)
        assert len(udp) <= 512
        msg = decode(udp)
        assert msg.flags & dns.flags.TC
        assert msg.question[0].name == full.question[0].name
        assert not msg.answer
    edns = r.handle_udp(wire(BIG_NAME, "SRV", edns=0, payload=1232))
    assert isinstance(edns, bytes) and 512 < len(edns) <= 1232
    assert not decode(edns).flags & dns.flags.TC
    small = decode(r.handle_udp(wire(BIG_NAME, "SRV", edns=0, payload=512)))
    assert small.flags & dns.flags.TC and small.edns == 0
    assert r.tally.truncated >= 2


# ---------------------------------------------------------------- resolver: cache and case


def test_cache_hit_returns_identical_bytes_except_the_id() -> None:
    r = resolver()
    first = r.handle_udp(wire("frontend.kong.svc.80.mesh", "AAAA", qid=1, edns=0))
    cached = r.cached_answers()
    second = r.handle_udp(wire("frontend.kong.svc.80.mesh", "AAAA", qid=0xFFFE, edns=0))
    assert isinstance(first, bytes) and isinstance(second, bytes)
    assert r.cached_answers() == cached  # a hit adds nothing
    assert first[:2] == b"\x00\x01" and second[:2] == b"\xff\xfe"
    assert first[2:] == second[2:]
    for proto in (r.handle_tcp, r.handle_tcp):
        reply = proto(wire("frontend.kong.svc.80.mesh", "AAAA", qid=77, edns=0))
        assert isinstance(reply, bytes) and reply[:2] == b"\x00\x4d" and reply[2:] == first[2:]


def test_answer_echoes_the_question_case() -> None:
    r = resolver()
    for name in ("FrOnTeNd.KoNg.SvC.80.MeSh", "frontend.kong.svc.80.mesh",
                 "FRONTEND.KONG.SVC.80.MESH", "FrOnTeNd.KoNg.SvC.80.MeSh"):
        reply = r.handle_udp(wire(name))
        msg = decode(reply)
        assert msg.question[0].name.to_text(omit_final_dot=True) == name
        assert msg.answer[0].name.to_text(omit_final_dot=True) == name
        assert [x.address for x in msg.answer[0]] == ["240.0.0.7"]
    msg = decode(r.handle_udp(wire("NoPe.MeSh")))
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.question[0].name.to_text() == "NoPe.MeSh."


def test_set_zone_invalidates_the_cache() -> None:
    r = resolver()
    assert [x.address for x in decode(r.handle_udp(wire("backend.kong.svc.8080.mesh"))).answer[0]
            ] == ["240.0.0.8"]
    assert r.cached_answers() == 1
    moved = [DEMO[0], {**DEMO[1], "vip": "240.0.0.99"}, BIG]
    r.set_zone(Zone(registry(moved), settings()))
    assert r.cached_answers() == 0
    for handle in (r.handle_udp, r.handle_tcp):
        msg = decode(handle(wire("backend.kong.svc.8080.mesh")))
        assert [x.address for x in msg.answer[0]] == ["240.0.0.99"]
    r.set_zone(Zone(registry([BIG]), settings()))
    assert decode(r.handle_udp(wire("backend.kong.svc.8080.mesh"))).rcode() == dns.rcode.NXDOMAIN


def test_cache_stays_bounded_under_a_flood_of_distinct_names() -> None:
    r = resolver(cache=16)
    for i in range(2000):
        r.handle_udp(wire(f"n{i}.mesh", qid=i))
        r.handle_tcp(wire(f"n{i}.kong.svc.80.mesh", qid=i))
        assert r.cached_answers() <= 32
    # Still answering, and still correct, after all the flushes.
    msg = decode(r.handle_udp(wire("frontend.kong.svc.80.mesh")))
    assert [x.address for x in msg.answer[0]] == ["240.0.0.7"]


def test_tally_counts_requests_and_responses_including_folded_hits() -> None:
    r = resolver()
    for i in range(3):
        r.handle_udp(wire("frontend.kong.svc.80.mesh", qid=i))  # 1 miss, 2 hits
    for i in range(2):
        r.handle_udp(wire("nope.mesh", "AAAA", qid=i))  # NXDOMAIN: 1 miss, 1 hit
    r.handle_tcp(wire("frontend.kong.svc.80.mesh"))
    r.handle_udp(header(qd=0))  # FORMERR
    r.handle_udp(b"\x00\x01")  # dropped
    r.handle_udp(wire("mesh", "AXFR"))  # REFUSED
    want_requests = {("udp", 1): 3, ("udp", 28): 2, ("tcp", 1): 1, ("udp", -1): 2,
                     ("udp", 252): 1}
    want_responses = {(0, "local"): 4, (3, "local"): 2, (1, "local"): 1, (5, "local"): 1}
    snap = r.snapshot_counts()
    assert snap.requests == want_requests
    assert snap.responses == want_responses
    assert snap.dropped == 1
    # Hits (and a fast-path miss, counted as its entry's first hit) live on the cache
    # entries until the cache is dropped...
    assert r.tally.requests.get(("udp", 1), 0) < 3
    r.set_zone(Zone(registry(), settings()))
    # ...and set_zone folds them into the totals: nothing is lost.
    assert r.tally.requests == want_requests
    assert r.tally.responses == want_responses
    r.handle_udp(wire("frontend.kong.svc.80.mesh"))
    r.handle_udp(wire("frontend.kong.svc.80.mesh"))
    snap = r.snapshot_counts()
    assert snap.requests[("udp", 1)] == 5
    assert snap.responses[(0, "local")] == 6


def test_tally_is_exact_when_the_bounded_cache_flushes() -> None:
    r = resolver(cache=16)
    sent = 0
    for i in range(500):
        for _ in range(3):
            r.handle_udp(wire(f"x{i % 40}.mesh", qid=i))
            sent += 1
    snap = r.snapshot_counts()
    assert snap.requests == {("udp", 1): sent}
    assert snap.responses == {(3, "local"): sent}


def test_forwardable_query_becomes_a_forward_request() -> None:
    r = resolver(forwarding=True)
    data = wire("example.com", edns=0, payload=4096)
    out = r.handle_udp(data)
    assert isinstance(out, ForwardRequest)
    assert out.data == data
    assert out.udp_limit == 1232
    assert out.query.labels == (b"example", b"com")
    out = r.handle_udp(wire("example.com"))
    assert isinstance(out, ForwardRequest) and out.udp_limit == 512
    assert isinstance(r.handle_tcp(wire("example.com")), ForwardRequest)
    assert r.cached_answers() == 0  # forwarded answers are not the core's to cache
