"""The forwarder's wire pieces without sockets: reply checks, TTL walking, cache, health."""

from __future__ import annotations

import asyncio
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from dnslib import EDNS0, NS, QTYPE, RR, SOA, A, DNSRecord

from meshdns.config import DnsConfig, HostPort
from meshdns.core.answer import ForwardRequest, Tally
from meshdns.dns.cache import CachedReply, ReplyCache
from meshdns.dns.forwarder import Forwarder
from meshdns.dns.lookup import Timeouts
from meshdns.dns.reply import (
    MALFORMED,
    WRONG_ID,
    WRONG_QUESTION,
    ReplyRejected,
    build_query,
    check_reply,
    parse_reply,
    question_wire,
)
from meshdns.dns.upstream import BACKOFF_FIRST, Upstream, try_order

from ..dnswire import request
from ..fake_upstream import FakeUpstream


def upstream_reply(sent: bytes, *, ttl: int = 300, opt: bool = True, rcode: int = 0,
                   ad: bool = False, soa: tuple[int, int] | None = None,
                   count: int = 1) -> bytes:
    record = DNSRecord.parse(sent)
    reply = record.reply()
    reply.header.rcode = rcode
    reply.header.ad = int(ad)
    for i in range(count if rcode == 0 and soa is None else 0):
        reply.add_answer(RR(record.q.qname, QTYPE.A, ttl=ttl, rdata=A(f"192.0.2.{i + 1}")))
    if soa is not None:
        reply.add_auth(RR("example.test", QTYPE.SOA, ttl=soa[0], rdata=SOA(
            "ns.example.test", "host.example.test", (1, 2, 3, 4, soa[1]))))
    if opt:
        reply.add_ar(EDNS0(udp_len=4096))
    return bytes(reply.pack())


def sent_for(req: ForwardRequest, qid: int = 0xBEEF) -> tuple[bytes, bytes]:
    question = question_wire(req.query)
    return build_query(question, qid, False, False), question


# ---------------------------------------------------------------- RFC 5452 checks


def test_check_reply_matches_id_and_question_case_insensitively() -> None:
    sent, question = sent_for(request("Www.Example.Test"))
    good = upstream_reply(sent)
    check_reply(good, sent, question)
    upper = bytearray(good)
    upper[12:12 + len(question)] = question.upper()
    check_reply(bytes(upper), sent, question)
    with pytest.raises(ReplyRejected) as exc:
        check_reply(bytes((good[0] ^ 0xFF, good[1])) + good[2:], sent, question)
    assert exc.value.reason == WRONG_ID
    other, _ = sent_for(request("other.example.test"))
    with pytest.raises(ReplyRejected) as exc:
        check_reply(upstream_reply(other), sent, question)
    assert exc.value.reason == WRONG_QUESTION
    for junk in (b"", b"\xbe\xef\x81", sent):  # too short; a query, not a response
        with pytest.raises(ReplyRejected) as exc:
            check_reply(junk, sent, question)
        assert exc.value.reason in (MALFORMED, WRONG_ID)


def test_error_reply_without_question_is_accepted_as_a_failure() -> None:
    sent, question = sent_for(request("x.example.test"))
    refused = sent[:2] + bytes((0x81, 0x05)) + b"\x00" * 8
    check_reply(refused, sent, question)
    assert parse_reply(refused, len(question)).rcode == dns.rcode.REFUSED
    nodata = sent[:2] + bytes((0x81, 0x00)) + b"\x00" * 8
    with pytest.raises(ReplyRejected):
        check_reply(nodata, sent, question)


def test_build_query_sends_rd_cd_and_opt_1232() -> None:
    question = question_wire(request("q.example.test").query)
    msg = dns.message.from_wire(build_query(question, 77, True, True))
    assert msg.id == 77 and msg.flags & dns.flags.RD and msg.flags & dns.flags.CD
    assert msg.edns == 0 and msg.payload == 1232 and msg.ednsflags & dns.flags.DO


# ---------------------------------------------------------------- walking replies


def test_parse_strips_opt_and_finds_ttls() -> None:
    req = request("w.example.test")
    sent, question = sent_for(req)
    parsed = parse_reply(upstream_reply(sent, ttl=120, count=3), len(question))
    assert parsed.rcode == 0 and parsed.lifetime == 120 and parsed.ttls == (120,) * 3
    for offset in parsed.ttl_offsets:
        assert struct.unpack_from("!I", parsed.wire, offset)[0] == 120
    msg = dns.message.from_wire(parsed.wire)
    assert msg.edns == -1 and len(msg.answer[0]) == 3


def test_parse_opt_in_the_middle_is_reencoded_without_it() -> None:
    req = request("mid.example.test")
    sent, question = sent_for(req)
    record = DNSRecord.parse(upstream_reply(sent, opt=False))
    record.add_auth(RR("example.test", QTYPE.NS, ttl=50, rdata=NS("ns.example.test")))
    record.add_ar(EDNS0(udp_len=4096))
    record.add_ar(RR("ns.example.test", QTYPE.A, ttl=50, rdata=A("192.0.2.53")))  # glue
    parsed = parse_reply(bytes(record.pack()), len(question))
    msg = dns.message.from_wire(parsed.wire)
    assert msg.edns == -1 and len(msg.additional) == 1
    assert sorted(parsed.ttls) == [50, 50, 300]


def test_parse_ttl_rules() -> None:
    sent, question = sent_for(request("t.example.test"))
    assert parse_reply(upstream_reply(sent, ttl=0x80000001), len(question)).lifetime == 0
    assert parse_reply(upstream_reply(sent, ttl=10**9), len(question)).lifetime == 86400
    negative = parse_reply(upstream_reply(sent, rcode=3, soa=(3600, 45)), len(question))
    assert negative.lifetime == 45 and negative.ttls == (45,)
    assert parse_reply(upstream_reply(sent, rcode=3), len(question)).lifetime == 0
    assert parse_reply(upstream_reply(sent, rcode=2), len(question)).lifetime == 0


def test_extended_rcode_is_kept() -> None:
    sent, question = sent_for(request("e.example.test"))
    record = DNSRecord.parse(upstream_reply(sent, opt=False))
    record.add_ar(EDNS0(udp_len=1232, ext_rcode=1))  # BADVERS = 16
    parsed = parse_reply(bytes(record.pack()), len(question))
    assert parsed.rcode == 16 and parsed.lifetime == 0


@pytest.mark.parametrize("cut", [13, 20, 40, -3, -1])
def test_malformed_replies_are_rejected(cut: int) -> None:
    sent, question = sent_for(request("m.example.test"))
    good = upstream_reply(sent)
    with pytest.raises(ReplyRejected) as exc:
        parse_reply(good[:cut], len(question))
    assert exc.value.reason == MALFORMED
    with pytest.raises(ReplyRejected):
        parse_reply(good + b"\x00", len(question))


# ---------------------------------------------------------------- serving cached replies


def test_reply_for_patches_id_case_flags_and_edns() -> None:
    req = request("c.example.test")
    sent, question = sent_for(req)
    entry = CachedReply(parse_reply(upstream_reply(sent, ad=True), len(question)), 100.0, 300)
    client = request("C.EXAMPLE.test", edns=-1, qid=0x4242,
                     flags=dns.flags.RD | dns.flags.CD)
    out, truncated = entry.reply_for(client.data, False, False, 512, 100.0)
    msg = dns.message.from_wire(out)
    assert not truncated and msg.id == 0x4242 and msg.edns == -1
    assert msg.question[0].name.to_text() == "C.EXAMPLE.test."
    assert msg.flags & dns.flags.CD and msg.flags & dns.flags.RA and msg.flags & dns.flags.RD
    assert not msg.flags & dns.flags.AD  # the client asked for neither DO nor AD
    assert not msg.flags & dns.flags.AA
    dnssec = request("c.example.test", dnssec=True)
    out, _ = entry.reply_for(dnssec.data, True, True, 1232, 150.9)
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.AD and msg.ednsflags & dns.flags.DO and msg.payload == 1232
    assert msg.answer[0].ttl == 250


def test_reply_for_truncates_to_the_client_limit() -> None:
    req = request("big.example.test")
    sent, question = sent_for(req)
    entry = CachedReply(parse_reply(upstream_reply(sent, count=40), len(question)), 0.0, 300)
    out, truncated = entry.reply_for(request("big.example.test", edns=-1).data, False, False,
                                     512, 0.0)
    msg = dns.message.from_wire(out)
    assert truncated and msg.flags & dns.flags.TC and not msg.answer and msg.edns == -1
    assert len(out) <= 512
    out, truncated = entry.reply_for(req.data, False, True, None, 0.0)
    assert not truncated and len(dns.message.from_wire(out).answer[0]) == 40


def test_cache_is_lru_and_bounded() -> None:
    sent, question = sent_for(request("l.example.test"))
    parsed = parse_reply(upstream_reply(sent), len(question))
    cache = ReplyCache(2)
    for name in (b"a", b"b"):
        cache.put((name, 1, 1, False, False), CachedReply(parsed, 0.0, 300))
    assert cache.get((b"a", 1, 1, False, False), 1.0) is not None  # a is now the newest
    cache.put((b"c", 1, 1, False, False), CachedReply(parsed, 0.0, 300))
    assert len(cache) == 2 and cache.evicted == 1
    assert cache.get((b"b", 1, 1, False, False), 1.0) is None
    assert cache.get((b"a", 1, 1, False, False), 300.0) is None  # expired
    off = ReplyCache(0)
    off.put((b"a", 1, 1, False, False), CachedReply(parsed, 0.0, 300))
    assert len(off) == 0


# ---------------------------------------------------------------- health


def test_failed_upstream_rests_at_the_back_then_is_probed_once() -> None:
    a, b = Upstream(HostPort("127.0.0.1", 1)), Upstream(HostPort("127.0.0.1", 2))
    assert try_order([a, b], 0.0, 2.0) == [a, b]
    a.record("timeout", 0.5, 10.0)
    assert try_order([a, b], 11.0, 2.0) == [b, a]
    later = 10.0 + BACKOFF_FIRST
    assert try_order([a, b], later, 2.0) == [a, b]  # this query probes it...
    assert try_order([a, b], later, 2.0) == [b, a]  # ...the others do not
    a.record("ok", 0.01, later + 0.01)
    assert try_order([a, b], later + 0.02, 2.0) == [a, b]
    b.record("servfail", 0.01, 0.0)  # an upstream that answers is alive
    assert b.failures == 0


# ---------------------------------------------------------------- lifecycle


def test_close_cancels_lookups_in_flight() -> None:
    async def main() -> None:
        with FakeUpstream() as fake:
            fake.default.action = "hold"
            fwd = Forwarder([HostPort("127.0.0.1", fake.port)],
                            DnsConfig(upstream_timeout=10.0), Tally())
            replies: list[tuple[str, bytes | None]] = []

            def done(ctx: str, reply: bytes | None) -> None:
                replies.append((ctx, reply))

            fwd.submit(request("h.example.test"), "udp", done, "first")
            for _ in range(1000):
                if fake.count():
                    break
                await asyncio.sleep(0.01)
            assert fwd.inflight == 1 and replies == []
            await fwd.close()
            assert replies == [("first", None)] and fwd.inflight == 0  # no reply to send
            fwd.submit(request("later.example.test"), "udp", done, "later")
            assert replies[1:] == [("later", None)]
            fake.release()

    asyncio.run(main())


def test_timeouts_fire_each_deadline_once_never_early_and_not_after_discard() -> None:
    """The lookups' deadline wheel: one loop timer for all, each lookup timed out once,
    never before its deadline, and not at all once its reply came (discard)."""

    class Probe:
        def __init__(self, name: str, fired: list[tuple[str, float]], deadline: float,
                     loop: asyncio.AbstractEventLoop) -> None:
            self.name, self.fired, self.deadline, self.loop = name, fired, deadline, loop

        def timed_out(self) -> None:
            self.fired.append((self.name, self.loop.time() - self.deadline))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = Timeouts(loop)
        fired: list[tuple[str, float]] = []
        now = loop.time()
        probes = {name: Probe(name, fired, now + delay, loop)
                  for name, delay in (("late", 0.25), ("early", 0.05), ("answered", 0.1),
                                      ("same", 0.05))}
        ticks = {name: wheel.add(p, p.deadline) for name, p in probes.items()}  # type: ignore[arg-type]
        wheel.discard(probes["answered"], ticks["answered"])  # type: ignore[arg-type]
        while len(fired) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert sorted(name for name, _ in fired[:2]) == ["early", "same"]
        assert [name for name, _ in fired][2:] == ["late"]  # "answered" never fires
        assert all(late >= 0 for _, late in fired)  # never before the deadline
        assert not wheel.buckets and wheel.timer is None  # nothing left armed
        wheel.close()

    asyncio.run(main())
