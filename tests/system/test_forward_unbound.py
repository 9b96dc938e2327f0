"""Forwarding to a real unbound, started by the test on loopback with local data only.

unbound's config (tests/fake_upstream.py) serves ``example.test`` from
local-data and answers every other name NXDOMAIN from a static "." zone, so
it never iterates and never contacts anything beyond 127.0.0.1.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.rcode
import dns.rdatatype
import pytest

from ..fake_upstream import Clock, FakeUpstream, Unbound
from ..support import ServerThread, make_config, query, run_tool, running_server

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[Unbound]:
    (tmp_path / "unbound").mkdir()
    with Unbound(tmp_path / "unbound") as server:
        yield server


@pytest.fixture
def server(tmp_path: Path, unbound: Unbound) -> Iterator[ServerThread]:
    raw = make_config(tmp_path, {"dns": {"upstreams": [unbound.address],
                                         "upstream_timeout": 2.0}})
    with running_server(raw) as s:
        yield s


def test_answers_and_cname_chains_come_from_unbound(server: ServerThread) -> None:
    reply = query(server, "www.example.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.address for r in reply.answer[0]] == ["192.0.2.10"]
    aaaa = query(server, "www.example.test", "AAAA")
    assert [r.address for r in aaaa.answer[0]] == ["2001:db8::10"]
    alias = query(server, "Alias.Example.Test")
    assert alias.answer[0].rdtype == dns.rdatatype.CNAME
    assert alias.question[0].name.to_text() == "Alias.Example.Test."
    txt = query(server, "txt.example.test", "TXT", tcp=True)
    assert b"served-by-the-test-unbound" in txt.answer[0][0].strings[0]


def test_second_answer_is_from_cache_with_ttl_counted_down(server: ServerThread) -> None:
    clock = Clock()
    server.mesh.forwarder.clock = clock
    assert query(server, "api.example.test").answer[0].ttl == 300
    clock.now += 42
    assert query(server, "api.example.test").answer[0].ttl == 258
    tally = server.mesh.handler.tally.responses
    assert tally.get((0, "upstream")) == 1 and tally.get((0, "cache")) == 1


def test_nxdomain_and_nodata_are_negative_cached(server: ServerThread) -> None:
    for _ in range(3):
        nx = query(server, "missing.example.test")
        assert nx.rcode() == dns.rcode.NXDOMAIN
        assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].ttl <= 30
        nodata = query(server, "www.example.test", "MX")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    stats = server.mesh.forwarder.upstream_stats()
    assert sum(sum(s.requests.values()) for s in stats.values()) == 2
    tally = server.mesh.handler.tally.responses
    assert tally.get((3, "cache")) == 2 and tally.get((0, "cache")) == 2


def test_big_answer_truncated_by_unbound_is_fetched_over_tcp(server: ServerThread) -> None:
    over_tcp = query(server, "big.example.test", tcp=True)
    assert len(over_tcp.answer[0]) == 100
    stats = next(iter(server.mesh.forwarder.upstream_stats().values()))
    assert stats.requests == {"truncated": 1, "ok": 1}
    over_udp = query(server, "big.example.test")  # > 1232 bytes: TC=1 to the client
    assert over_udp.flags & dns.flags.TC and not over_udp.answer


def test_failover_from_a_dead_upstream_to_unbound(tmp_path: Path, unbound: Unbound) -> None:
    with FakeUpstream() as dead:
        dead.default.action = "timeout"
        raw = make_config(tmp_path, {"dns": {"upstreams": [dead.address, unbound.address],
                                             "upstream_timeout": 1.0}})
        with running_server(raw) as s:
            assert query(s, "www.example.test", timeout=5.0).rcode() == dns.rcode.NOERROR
            assert query(s, "api.example.test", timeout=5.0).rcode() == dns.rcode.NOERROR
            assert dead.count() == 1  # the dead one was skipped the second time


def test_every_upstream_down_is_servfail_not_nxdomain(tmp_path: Path) -> None:
    (tmp_path / "unbound").mkdir()
    stopped = Unbound(tmp_path / "unbound").start()
    stopped.stop()
    raw = make_config(tmp_path, {"dns": {"upstreams": [stopped.address],
                                         "upstream_timeout": 0.5}})
    with running_server(raw) as s:
        assert query(s, "www.example.test", timeout=5.0).rcode() == dns.rcode.SERVFAIL


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
def test_dig_through_meshdns(server: ServerThread) -> None:
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5",
                   "www.example.test", "A")
    assert "status: NOERROR" in out.stdout and "192.0.2.10" in out.stdout
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", "+noedns",
                   "+ignore", "big.example.test", "A")
    assert "tc" in out.stdout.split("flags:")[1].split(";")[0]
