"""Extended DNS Errors (RFC 8914) and NSID (RFC 5001) on forwarded answers (issue 26):

- 3 Stale Answer on a serve-stale answer (19 Stale NXDOMAIN Answer for a stale NXDOMAIN);
- 22 No Reachable Authority on SERVFAIL when every upstream timed out;
- 23 Network Error on SERVFAIL when the upstream could not be talked to (port closed);
- NSID on forwarded answers, cached or not, only when asked;

with a real unbound, dig and dnspython over UDP and TCP.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from ..fake_upstream import closed_port
from ..support import ServerThread, make_config, run_tool, running_server, tool
from .test_serve_stale import forwarding_to

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")


def ask(srv: ServerThread, name: str, tcp: bool, nsid: bool = False) -> dns.message.Message:
    host, port = srv.dns_addr(4)
    options = [dns.edns.GenericOption(dns.edns.NSID, b"")] if nsid else []
    q = dns.message.make_query(name, "A", use_edns=0, options=options)
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=10)
    return dns.query.udp(q, host, port=port, timeout=10, ignore_unexpected=True)


def edes(reply: dns.message.Message) -> list[tuple[int, str | None]]:
    return [(o.code, o.text) for o in reply.options if o.otype == dns.edns.EDE]


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # bound, never read: every query times out
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.mark.parametrize("tcp", [False, True])
def test_timeouts_are_no_reachable_authority(tmp_path: Path, silent_upstream: str,
                                             tcp: bool) -> None:
    raw = make_config(tmp_path, {"dns": {"upstreams": [silent_upstream],
                                         "upstream_timeout": 0.3}})
    with running_server(raw) as srv:
        reply = ask(srv, "www.example.test", tcp)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert edes(reply) == [(22, "no upstream answered")]
        # The remembered failure (1 s) carries it too.
        assert edes(ask(srv, "www.example.test", tcp)) == [(22, "no upstream answered")]


@pytest.mark.parametrize("tcp", [False, True])
def test_a_closed_upstream_port_is_a_network_error(tmp_path: Path, tcp: bool) -> None:
    raw = make_config(tmp_path, {"dns": {"upstreams": [f"127.0.0.1:{closed_port()}"],
                                         "upstream_timeout": 1.0}})
    with running_server(raw) as srv:
        reply = ask(srv, "www.example.test", tcp)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert edes(reply) == [(23, "network error reaching the upstreams")]
        dig = tool("dig")
        assert dig is not None
        host, port = srv.dns_addr(4)
        out = run_tool(dig, f"@{host}", "-p", str(port), "+tries=1", "other.example.test").stdout
        assert "EDE: 23 (Network Error)" in out, out


@pytest.mark.parametrize("tcp", [False, True])
def test_a_stale_answer_says_so_and_a_fresh_one_does_not(tmp_path: Path, tcp: bool) -> None:
    with forwarding_to(tmp_path, "192.0.2.60", serve_stale=600) as (srv, upstream, clock):
        fresh = ask(srv, "web.example.test", tcp)
        assert fresh.rcode() == dns.rcode.NOERROR and edes(fresh) == []
        upstream.stop()
        clock.now += 10  # past the 5 s TTL, every upstream down
        stale = ask(srv, "web.example.test", tcp)
        assert stale.rcode() == dns.rcode.NOERROR and stale.answer
        assert edes(stale) == [(3, "stale answer: every upstream failed")]
        # A client without EDNS gets the stale answer, without the option.
        host, port = srv.dns_addr(4)
        plain = dns.message.make_query("web.example.test", "A", use_edns=False)
        reply = dns.query.tcp(plain, host, port=port, timeout=10) if tcp else \
            dns.query.udp(plain, host, port=port, timeout=10, ignore_unexpected=True)
        assert reply.answer and reply.opt is None


@pytest.mark.parametrize("tcp", [False, True])
def test_forwarded_answers_carry_nsid_only_when_asked(tmp_path: Path, tcp: bool) -> None:
    with forwarding_to(tmp_path, "192.0.2.61", serve_stale=0) as (srv, _, _clock):
        for _ in range(2):  # from upstream, then from the cache (and its memo)
            asked = ask(srv, "web.example.test", tcp, nsid=True)
            assert asked.rcode() == dns.rcode.NOERROR and asked.answer
            options = [o for o in asked.options if o.otype == dns.edns.NSID]
            assert len(options) == 1 and options[0].to_wire() == socket.gethostname().encode()
            plain = ask(srv, "web.example.test", tcp)
            assert plain.answer and not [o for o in plain.options if o.otype == dns.edns.NSID]
