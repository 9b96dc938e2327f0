"""Sidecar mode end to end: meshdns on loopback forwarding to fault-injecting upstreams.

Every upstream here is a FakeUpstream on 127.0.0.1 (tests/fake_upstream.py).
No test asserts a duration: clients use timeouts well above the upstream
budget, "slow" upstreams are held until the test releases them, and TTL
arithmetic runs on the forwarder's injectable clock.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from meshdns.dns.forwarder import SERVFAIL_TTL

from ..fake_upstream import Clock, FakeUpstream, closed_port, wait_until
from ..support import (
    ServerThread,
    connected_udp,
    make_config,
    query,
    running_server,
    udp_query,
)

CLIENT_TIMEOUT = 5.0  # far above every upstream budget used here


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def fake2() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def forwarding(tmp: Path, upstreams: list[str], **dns_extra: Any) -> dict[str, Any]:
    return make_config(tmp, {"dns": {"upstreams": upstreams, "upstream_timeout": 1.0,
                                     **dns_extra}})


def ask(server: ServerThread, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    kw.setdefault("timeout", CLIENT_TIMEOUT)
    return query(server, name, rdtype, **kw)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(r.address for rrset in reply.answer for r in rrset
                  if rrset.rdtype == dns.rdatatype.A)


# ---------------------------------------------------------------- basics


def test_forwards_and_serves_from_cache_with_client_case(tmp_path: Path,
                                                         fake: FakeUpstream) -> None:
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        first = ask(server, "www.example.test")
        assert first.rcode() == dns.rcode.NOERROR
        assert addresses(first) == ["192.0.2.1"]
        assert first.flags & dns.flags.RA and not first.flags & dns.flags.AA
        again = ask(server, "WwW.ExAmPlE.TeSt")
        assert addresses(again) == ["192.0.2.1"]
        assert again.question[0].name.to_text() == "WwW.ExAmPlE.TeSt."  # 0x20 echoed
        assert again.answer[0].name.to_text() == "WwW.ExAmPlE.TeSt."
        assert fake.count("www.example.test") == 1
        tally = server.mesh.handler.tally.responses
        assert tally.get((0, "upstream")) == 1 and tally.get((0, "cache")) == 1
        stats = server.mesh.forwarder.upstream_stats()[fake.address]
        assert stats.requests == {"ok": 1} and stats.duration.count == 1
        assert sum(stats.duration.counts) == 1


def test_upstream_query_shape(tmp_path: Path, fake: FakeUpstream) -> None:
    """EDNS 1232 upstream whatever the client sent; DO passed on; random IDs and ports."""
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        ask(server, "plain.example.test", edns=False)
        sent = fake.last()
        assert sent.payload == 1232 and not sent.dnssec_ok and sent.proto == "udp"
        host, port = server.dns_addr()
        msg = dns.message.make_query("signed.example.test", "A", want_dnssec=True)
        udp_query(msg, host, port, timeout=CLIENT_TIMEOUT)
        assert fake.last().dnssec_ok
        ids, ports = set(), set()
        for i in range(8):
            ask(server, f"id{i}.example.test")
            ids.add(fake.last().id)
            ports.add(fake.last().source_port)
        assert len(ids) > 1 and len(ports) > 1  # a fresh ID and source port per query


def test_mesh_names_and_search_suffix_are_never_forwarded(tmp_path: Path,
                                                          fake: FakeUpstream) -> None:
    raw = forwarding(tmp_path, [fake.address], search=["default.svc.cluster.local"])
    with running_server(raw) as server:
        local = ask(server, "frontend.kong.svc.80.mesh")
        assert addresses(local) == ["240.0.0.7"]
        searched = ask(server, "frontend.kong.svc.80.mesh.default.svc.cluster.local")
        assert searched.rcode() == dns.rcode.NOERROR
        assert searched.answer[0].rdtype == dns.rdatatype.CNAME
        assert addresses(searched) == ["240.0.0.7"]
        unknown = ask(server, "nope.kong.svc.80.mesh.default.svc.cluster.local")
        assert unknown.rcode() == dns.rcode.NXDOMAIN
        assert fake.count() == 0
        other = ask(server, "web.default.svc.cluster.local")  # not a mesh name: forwarded
        assert addresses(other) == ["192.0.2.1"] and fake.count() == 1


# ---------------------------------------------------------------- failover and failure


def test_failover_to_second_upstream_and_health_memory(tmp_path: Path, fake: FakeUpstream,
                                                       fake2: FakeUpstream) -> None:
    fake.default.action = "timeout"  # a black hole: never answers
    with running_server(forwarding(tmp_path, [fake.address, fake2.address])) as server:
        reply = ask(server, "a.example.test")
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.1"]
        assert fake.count() == 1 and fake2.count() == 1
        # The dead first upstream now rests at the back: the next queries go straight
        # to the second one instead of paying its timeout again.
        for name in ("b.example.test", "c.example.test"):
            assert addresses(ask(server, name)) == ["192.0.2.1"]
        assert fake.count() == 1 and fake2.count() == 3
        stats = server.mesh.forwarder.upstream_stats()
        assert stats[fake.address].requests == {"timeout": 1}
        assert stats[fake2.address].requests == {"ok": 3}


def test_failover_on_closed_port_and_refused(tmp_path: Path, fake: FakeUpstream,
                                             fake2: FakeUpstream) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    fake.default.action = "refused"
    with running_server(forwarding(tmp_path, [dead, fake.address, fake2.address],
                                   upstream_timeout=3.0)) as server:
        reply = ask(server, "x.example.test")
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.1"]
        stats = server.mesh.forwarder.upstream_stats()
        assert stats[dead].requests == {"error": 1}
        assert stats[fake.address].requests == {"refused": 1}
        assert fake2.count() == 1


@pytest.mark.parametrize("action", ["timeout", "refused", "servfail", "garbage", "wrong_id",
                                    "wrong_question", "other_port"])
def test_servfail_never_nxdomain_when_every_upstream_fails(tmp_path: Path, fake: FakeUpstream,
                                                           fake2: FakeUpstream,
                                                           action: str) -> None:
    fake.default.action = fake2.default.action = action
    with running_server(forwarding(tmp_path, [fake.address, fake2.address],
                                   upstream_timeout=0.5)) as server:
        reply = ask(server, "down.example.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert reply.rcode() != dns.rcode.NXDOMAIN
        assert fake.count() >= 1 and fake2.count() >= 1  # every upstream got its try
        assert server.mesh.handler.tally.responses.get((2, "upstream")) == 1


def test_servfail_is_remembered_briefly(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.default.action = "servfail"
    clock = Clock()
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        server.mesh.forwarder.clock = clock
        assert ask(server, "sf.example.test").rcode() == dns.rcode.SERVFAIL
        assert ask(server, "sf.example.test").rcode() == dns.rcode.SERVFAIL
        assert fake.count() == 1
        clock.now += SERVFAIL_TTL
        fake.default.action = "answer"
        assert addresses(ask(server, "sf.example.test")) == ["192.0.2.1"]
        assert fake.count() == 2


# ---------------------------------------------------------------- RFC 5452 and TC


@pytest.mark.parametrize(("action", "reason"), [("wrong_id", "wrong_id"),
                                                ("wrong_question", "wrong_question"),
                                                ("garbage", "malformed")])
def test_spoofed_replies_are_dropped_and_counted(tmp_path: Path, fake: FakeUpstream,
                                                 action: str, reason: str) -> None:
    fake.rule("spoof.example.test", action, then_answer=True, addresses=["192.0.2.77"])
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        reply = ask(server, "spoof.example.test")
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.77"]
        assert reply.id != 0
        assert server.mesh.forwarder.rejected == {reason: 1}


def test_truncated_udp_answer_is_retried_over_tcp(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.rule("tc.example.test", "tc", addresses=["192.0.2.5", "192.0.2.6", "192.0.2.7"])
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        reply = ask(server, "tc.example.test")
        assert addresses(reply) == ["192.0.2.5", "192.0.2.6", "192.0.2.7"]
        assert not reply.flags & dns.flags.TC
        assert fake.count(proto="udp") == 1 and fake.count(proto="tcp") == 1
        assert server.mesh.forwarder.upstream_stats()[fake.address].requests == {
            "truncated": 1, "ok": 1}


# ---------------------------------------------------------------- cache


def test_cached_answers_survive_every_upstream_going_down(tmp_path: Path) -> None:
    clock = Clock()
    upstream = FakeUpstream().start()
    upstream.rule("kept.example.test", ttl=60)
    try:
        # serve_stale 0: an expired answer is not served stale (test_serve_stale.py).
        with running_server(forwarding(tmp_path, [upstream.address], upstream_timeout=0.5,
                                       serve_stale=0)) as server:
            server.mesh.forwarder.clock = clock
            assert addresses(ask(server, "kept.example.test")) == ["192.0.2.1"]
            upstream.stop()
            clock.now += 59
            reply = ask(server, "kept.example.test")
            assert addresses(reply) == ["192.0.2.1"] and reply.answer[0].ttl == 1
            clock.now += 1  # expired, and nobody upstream to ask
            assert ask(server, "kept.example.test").rcode() == dns.rcode.SERVFAIL
    finally:
        upstream.stop()


def test_ttl_counts_down_and_expiry_refetches(tmp_path: Path, fake: FakeUpstream) -> None:
    clock = Clock()
    fake.rule("ttl.example.test", ttl=300)
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        server.mesh.forwarder.clock = clock
        assert ask(server, "ttl.example.test").answer[0].ttl == 300
        clock.now += 100.5
        assert ask(server, "ttl.example.test").answer[0].ttl == 200
        assert ask(server, "ttl.example.test", tcp=True).answer[0].ttl == 200
        clock.now += 150
        assert ask(server, "ttl.example.test").answer[0].ttl == 50
        assert fake.count() == 1
        clock.now += 50
        assert ask(server, "ttl.example.test").answer[0].ttl == 300
        assert fake.count() == 2


@pytest.mark.parametrize("action", ["nxdomain", "nodata"])
def test_negative_answers_cached_for_soa_minimum(tmp_path: Path, fake: FakeUpstream,
                                                 action: str) -> None:
    clock = Clock()
    fake.rule("neg.example.test", action, soa_ttl=3600, soa_minimum=60)
    rcode = dns.rcode.NXDOMAIN if action == "nxdomain" else dns.rcode.NOERROR
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        server.mesh.forwarder.clock = clock
        first = ask(server, "neg.example.test")
        assert first.rcode() == rcode and not first.answer
        assert first.authority[0].rdtype == dns.rdatatype.SOA
        assert first.authority[0].ttl == 60  # RFC 2308: min(SOA TTL, MINIMUM)
        clock.now += 30
        again = ask(server, "neg.example.test")
        assert again.rcode() == rcode and again.authority[0].ttl == 30
        assert fake.count() == 1
        assert server.mesh.handler.tally.responses.get((rcode, "cache")) == 1
        clock.now += 30
        assert ask(server, "neg.example.test").rcode() == rcode
        assert fake.count() == 2


def test_negative_answer_without_soa_is_not_cached(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.rule("bare.example.test", "nxdomain", soa=False)
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        for _ in range(2):
            assert ask(server, "bare.example.test").rcode() == dns.rcode.NXDOMAIN
        assert fake.count() == 2


def test_client_edns_size_respected(tmp_path: Path, fake: FakeUpstream) -> None:
    many = [f"192.0.2.{i}" for i in range(1, 41)]  # ~700 bytes: over 512, under 1232
    fake.rule("big.example.test", addresses=many)
    with running_server(forwarding(tmp_path, [fake.address])) as server:
        full = ask(server, "big.example.test")  # EDNS 1232
        assert len(addresses(full)) == 40 and not full.flags & dns.flags.TC
        assert full.edns == 0 and full.payload == 1232
        no_edns = ask(server, "big.example.test", edns=False)
        assert no_edns.flags & dns.flags.TC and not no_edns.answer and no_edns.edns == -1
        small = ask(server, "big.example.test", payload=512)
        assert small.flags & dns.flags.TC and small.edns == 0
        over_tcp = ask(server, "big.example.test", edns=False, tcp=True)
        assert len(addresses(over_tcp)) == 40 and over_tcp.edns == -1
        assert fake.count() == 1  # one upstream fetch served every shape
        assert server.mesh.handler.tally.truncated == 2


# ---------------------------------------------------------------- concurrency and bounds


def _raw_query(name: str, qid: int) -> bytes:
    msg = dns.message.make_query(name, "A", use_edns=0)
    msg.id = qid
    return msg.to_wire()


def test_identical_queries_in_flight_are_coalesced(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.rule("hot.example.test", "hold")
    with running_server(forwarding(tmp_path, [fake.address], upstream_timeout=10.0)) as server:
        addr = server.dns_addr()
        socks = []
        try:
            for i in range(100):
                s = connected_udp(*addr)  # the server's replies only
                s.settimeout(CLIENT_TIMEOUT)
                socks.append(s)
                s.send(_raw_query("hot.example.test", 1000 + i))
            forwarder = server.mesh.forwarder
            wait_until(lambda: forwarder.coalesced == 99, "99 queries joining the first")
            fake.release()
            for i, s in enumerate(socks):
                reply = dns.message.from_wire(s.recv(4096))
                assert reply.id == 1000 + i and addresses(reply) == ["192.0.2.1"]
        finally:
            for s in socks:
                s.close()
        assert fake.count() == 1


def test_inflight_cap_answers_servfail(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.default.action = "hold"
    raw = forwarding(tmp_path, [fake.address], upstream_timeout=10.0, max_inflight=2)
    with running_server(raw) as server:
        addr = server.dns_addr()
        socks = [connected_udp(*addr) for _ in range(2)]  # the server's replies only
        try:
            for i, s in enumerate(socks):
                s.settimeout(CLIENT_TIMEOUT)
                s.send(_raw_query(f"held{i}.example.test", i + 1))
            wait_until(lambda: fake.count() == 2, "two lookups in flight")
            extra = ask(server, "one-too-many.example.test")
            assert extra.rcode() == dns.rcode.SERVFAIL
            assert server.mesh.forwarder.overloaded == 1
            fake.release()
            for s in socks:
                assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.NOERROR
        finally:
            for s in socks:
                s.close()
        assert fake.count() == 2  # the refused one never went upstream
        # The overload SERVFAIL was not cached: the name resolves once there is room.
        assert addresses(ask(server, "one-too-many.example.test")) == ["192.0.2.1"]


def test_shutdown_with_queries_in_flight(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.default.action = "hold"
    with running_server(forwarding(tmp_path, [fake.address], upstream_timeout=10.0)) as server:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(_raw_query("pending.example.test", 7), server.dns_addr())
            wait_until(lambda: fake.count() == 1, "the lookup in flight")
            forwarder = server.mesh.forwarder
            assert forwarder.inflight == 1
            server.call(forwarder.close)
            assert forwarder.inflight == 0
        finally:
            s.close()
    fake.release()
