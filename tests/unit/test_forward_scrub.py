"""The reply scrubber's rules on the wire, without sockets (reply.parse_reply, scrub.py).

test_forward_hygiene.py attacks a running meshdns with a lying upstream; this
module pins the rules it has no room for: DNSSEC records, DNAME, ANY, MX glue,
what a parse refuses, and the cut at a name that is ours.
"""

from __future__ import annotations

import itertools

import dns.message
import dns.rdatatype
import pytest
from dnslib import CNAME, DNAME, EDNS0, MX, NS, QTYPE, RR, SOA, A, DNSRecord
from dnslib.dns import RD

from meshdns.dns.reply import MALFORMED, ReplyRejected, parse_reply, question_wire
from meshdns.dns.scrub import MAX_CHAIN, within

from ..dnswire import T_A, T_CNAME, a, request, rr, wire_name

QNAME = "www.example.test"


def reply_to(qtype: str = "A") -> DNSRecord:
    return DNSRecord.question(QNAME, qtype).reply()


def parsed(record: DNSRecord, qtype: str = "A", owned: object = None
           ) -> tuple[list[str], dict[str, int] | None]:
    """Kept records as "section owner TYPE", and what was dropped."""
    qlen = len(question_wire(request(QNAME).query))
    out = parse_reply(bytes(record.pack()), qlen, owned)  # type: ignore[arg-type]
    msg = dns.message.from_wire(out.wire)
    kept = [f"{section} {rrset.name.to_text(omit_final_dot=True)} "
            f"{dns.rdatatype.to_text(rrset.rdtype)}"
            for section, part in (("an", msg.answer), ("ns", msg.authority),
                                  ("ar", msg.additional)) for rrset in part]
    return kept, out.dropped


def rrsig(owner: str, covered: int) -> RR:
    # type covered, algorithm 13, labels, original TTL, expiry, inception, tag, signer, sig
    data = covered.to_bytes(2, "big") + bytes([13, 3]) + (300).to_bytes(4, "big") + \
        b"\x00" * 10 + wire_name("example.test") + b"\x01" * 8
    return RR(owner, QTYPE.RRSIG, ttl=300, rdata=RD(data))


def test_within_is_label_aligned() -> None:
    assert within(wire_name("a.b.test"), wire_name("b.test"))
    assert within(wire_name("b.test"), wire_name("b.test"))
    assert within(wire_name("b.test"), b"\x00")
    assert not within(wire_name("ab.test"), wire_name("b.test"))
    assert not within(wire_name("test"), wire_name("b.test"))


def test_signatures_over_the_answer_stay_others_go() -> None:
    r = reply_to()
    r.add_answer(RR(QNAME, QTYPE.A, ttl=300, rdata=A("192.0.2.1")))
    r.add_answer(rrsig(QNAME, T_A))
    r.add_answer(rrsig(QNAME, QTYPE.TXT))
    r.add_auth(RR("example.test", QTYPE.SOA, ttl=300, rdata=SOA(
        "ns.example.test", "h.example.test", (1, 2, 3, 4, 5))))
    r.add_auth(rrsig("example.test", QTYPE.SOA))  # a proof record inside a kept zone
    r.add_auth(rrsig("other.test", QTYPE.SOA))
    kept, dropped = parsed(r)
    assert kept == ["an www.example.test A", "an www.example.test RRSIG",
                    "ns example.test SOA", "ns example.test RRSIG"]
    assert dropped == {"wrong_type": 1, "authority": 1}


def test_dname_above_the_chain_and_any_stay() -> None:
    r = reply_to()
    r.add_answer(RR("example.test", QTYPE.DNAME, ttl=300, rdata=DNAME("example.net")))
    r.add_answer(RR(QNAME, QTYPE.CNAME, ttl=300, rdata=CNAME("www.example.net")))
    r.add_answer(RR("www.example.net", QTYPE.A, ttl=300, rdata=A("192.0.2.2")))
    r.add_answer(RR("elsewhere.test", QTYPE.DNAME, ttl=300, rdata=DNAME("example.net")))
    kept, dropped = parsed(r)
    assert kept == ["an example.test DNAME", "an www.example.test CNAME",
                    "an www.example.net A"]
    assert dropped == {"other_name": 1}
    anything = reply_to("ANY")
    anything.add_answer(RR(QNAME, QTYPE.A, ttl=300, rdata=A("192.0.2.3")))
    anything.add_answer(RR(QNAME, QTYPE.MX, ttl=300, rdata=MX("mail.example.test")))
    anything.add_ar(RR("mail.example.test", QTYPE.A, ttl=300, rdata=A("192.0.2.25")))
    anything.add_ar(RR("other.example.test", QTYPE.A, ttl=300, rdata=A("6.6.6.6")))
    kept, dropped = parsed(anything, "ANY")
    assert kept == ["an www.example.test A", "an www.example.test MX",
                    "ar mail.example.test A"]
    assert dropped == {"additional": 1}


def test_one_cname_per_name_and_a_bounded_chain() -> None:
    r = reply_to()
    r.add_answer(RR(QNAME, QTYPE.CNAME, ttl=300, rdata=CNAME("one.example.test")))
    r.add_answer(RR(QNAME, QTYPE.CNAME, ttl=300, rdata=CNAME("two.example.test")))
    r.add_answer(RR("one.example.test", QTYPE.A, ttl=300, rdata=A("192.0.2.4")))
    r.add_answer(RR("two.example.test", QTYPE.A, ttl=300, rdata=A("6.6.6.6")))
    kept, dropped = parsed(r)
    assert kept == ["an www.example.test CNAME", "an one.example.test A"]
    assert dropped == {"wrong_type": 1, "other_name": 1}
    long = reply_to()
    names = [QNAME] + [f"n{i}.example.test" for i in range(MAX_CHAIN + 2)]
    for owner, target in itertools.pairwise(names):
        long.add_answer(RR(owner, QTYPE.CNAME, ttl=300, rdata=CNAME(target)))
    kept, dropped = parsed(long)
    assert len(kept) == MAX_CHAIN  # the CNAMEs of the first MAX_CHAIN names
    assert dropped == {"other_name": 2}


def test_ns_glue_must_be_in_the_zone_and_ours_is_never_glue() -> None:
    r = reply_to()
    r.add_answer(RR(QNAME, QTYPE.A, ttl=300, rdata=A("192.0.2.5")))
    for target in ("ns1.example.test", "ns.other.test", "ns.mesh"):
        r.add_auth(RR("example.test", QTYPE.NS, ttl=300, rdata=NS(target)))
    r.add_ar(RR("ns1.example.test", QTYPE.A, ttl=300, rdata=A("192.0.2.53")))
    r.add_ar(RR("ns.other.test", QTYPE.A, ttl=300, rdata=A("6.6.6.6")))
    r.add_auth(RR("example.test", QTYPE.NS, ttl=300, rdata=NS("ns2.example.test")))
    r.add_ar(RR("ns2.example.test", QTYPE.A, ttl=300, rdata=A("6.6.6.7")))
    r.add_ar(EDNS0(udp_len=1232))
    kept, dropped = parsed(r, owned=lambda name: name == wire_name("ns2.example.test"))
    assert kept == ["an www.example.test A", "ns example.test NS",
                    "ar ns1.example.test A"]
    assert dropped == {"additional": 1, "own_name": 1}


def test_the_chain_is_cut_at_our_name() -> None:
    r = reply_to()
    r.add_answer(RR(QNAME, QTYPE.CNAME, ttl=300, rdata=CNAME("svc.mesh")))
    r.add_answer(RR("svc.mesh", QTYPE.A, ttl=300, rdata=A("6.6.6.6")))
    kept, dropped = parsed(r, owned=lambda name: name.endswith(b"\x04mesh\x00"))
    assert kept == ["an www.example.test CNAME"] and dropped == {"own_name": 1}


def raw(*answers: bytes) -> bytes:
    q = question_wire(request(QNAME).query)
    return bytes.fromhex("beef81800001") + len(answers).to_bytes(2, "big") + b"\x00" * 4 \
        + q + b"".join(answers)


@pytest.mark.parametrize("answer", [
    rr(b"\xc0\x40", T_A, a("6.6.6.6")),  # a pointer forwards
    rr(b"\x01a\xc0\x22", T_A, a("6.6.6.6")),  # a loop: \x01a then back to itself
    rr(b"\x80abc\x00", T_A, a("6.6.6.6")),  # an unknown label type
    rr(QNAME, T_CNAME, b"\xc0\x0c\x00"),  # CNAME rdata longer than its name
    rr(QNAME, T_CNAME, b"\x05ab"),  # a name running out of its rdata and the reply
    rr(b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63
       + b"\x00", T_A, a("6.6.6.6")),  # 257 bytes: longer than a name can be
])
def test_what_does_not_parse_is_malformed(answer: bytes) -> None:
    data = raw(answer)
    with pytest.raises(ReplyRejected) as exc:
        parse_reply(data, len(question_wire(request(QNAME).query)))
    assert exc.value.reason == MALFORMED


def _plain_cases() -> list[tuple[str, bytes]]:
    def plain(ttls: tuple[int, ...], edns: bool, qtype: str = "A") -> bytes:
        r = reply_to(qtype)
        for i, ttl in enumerate(ttls):
            r.add_answer(RR(QNAME, QTYPE.A, ttl=ttl, rdata=A(f"192.0.2.{i + 1}")))
        if edns:
            r.add_ar(EDNS0(udp_len=1232))
        return bytes(r.pack())

    one = plain((300,), True)
    qend = 12 + len(question_wire(request(QNAME).query))
    ext_rcode = bytearray(one)
    ext_rcode[-6] = 1  # the OPT's extended rcode: BADVERS, not NOERROR
    return [
        ("one A, OPT", one),
        ("three A, no OPT", plain((300, 5, 60), False)),
        ("TTLs capped, high bit", plain((100000, 2**31 + 5), True)),
        ("A for an AAAA question", plain((300,), True, "AAAA")),
        ("extended rcode", bytes(ext_rcode)),
        ("a byte after the OPT", one + b"\x00"),
        ("rdata past the end", one[:qend + 10] + b"\x00\x40" + one[qend + 12:]),
        ("cut in the OPT", one[:-3]),
    ]


@pytest.mark.parametrize(("case", "reply"), _plain_cases(), ids=[c for c, _ in _plain_cases()])
def test_the_one_pass_plain_answer_is_the_full_walk(case: str, reply: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The common reply is read in one pass (reply._plain); whatever it takes it must
    take exactly as the full walk and scrub do, and what it leaves the walk decides."""
    import meshdns.dns.reply as reply_module

    qlen = len(question_wire(request(QNAME).query))

    def outcome() -> object:
        try:
            p = parse_reply(reply, qlen)
        except ReplyRejected as exc:
            return exc.reason
        return (p.wire, p.rcode, p.qend, p.ttl_offsets, p.ttls, p.lifetime, p.negative,
                p.dropped)

    fast = outcome()
    monkeypatch.setattr(reply_module, "_plain", lambda *_: None)
    assert fast == outcome()
    if case == "TTLs capped, high bit":
        assert isinstance(fast, tuple) and fast[4] == (86400, 0)
    if case in ("a byte after the OPT", "rdata past the end", "cut in the OPT"):
        assert fast == MALFORMED
