"""Issue 11 item 6, the DNS defects, over real sockets with a fault-injecting upstream.

- an upstream reply whose question has another type (97 for 65: the bytes differ
  only by ASCII case) is no answer: dropped, and the client gets SERVFAIL;
- a question of type OPT (41) gets FORMERR, for mesh and for forwarded names;
- everything that holds forwarded queries or replies stays within dns.cache_size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import DNSRecord

from ..fake_upstream import FakeUpstream, Rule
from ..support import ServerThread, make_config, run_tool, running_server, tool, udp_query

F = "frontend.kong.svc.80.mesh."
TIMEOUT = 5.0  # client timeout, far above the 1 s upstream budget used here


def question_end(wire: bytes) -> int:
    pos = 12
    while wire[pos]:
        pos += 1 + wire[pos]
    return pos + 1  # just past the name: type and class follow


class RewritingUpstream(FakeUpstream):
    """FakeUpstream whose replies' question is rewritten for two names:
    ``type97.*``: type 65 becomes 97 (what ASCII case-folding of the type byte gives);
    ``upper.*``: the name comes back upper-cased (0x20: must still be accepted)."""

    def answer(self, query: DNSRecord, rule: Rule, proto: str, action: str) -> bytes:
        wire = bytearray(super().answer(query, rule, proto, action))
        end = question_end(bytes(wire))
        name = bytes(wire[12:end]).lower()
        if b"type97" in name and wire[end:end + 2] == b"\x00\x41":
            wire[end:end + 2] = struct.pack("!H", 97)
        if b"upper" in name:
            wire[12:end] = bytes(wire[12:end]).upper()
        return bytes(wire)


@pytest.fixture
def upstream() -> Iterator[RewritingUpstream]:
    up = RewritingUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


def forwarding_server(tmp: Path, up: FakeUpstream, **dns_extra: Any) -> Any:
    return running_server(make_config(tmp, {"dns": {
        "listen": ["127.0.0.1:0"], "upstreams": [up.address], "upstream_timeout": 1.0,
        **dns_extra}}))


def ask(server: ServerThread, name: str, rdtype: str, tcp: bool = False
        ) -> dns.message.Message:
    host, port = server.dns_addr()
    msg = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(msg, host, port=port, timeout=TIMEOUT)
    return udp_query(msg, host, port, timeout=TIMEOUT)


# ---------------------------------------------------------------- reply check


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_reply_with_type_97_is_no_answer_to_a_type_65_question(
        tmp_path: Path, upstream: RewritingUpstream, tcp: bool) -> None:
    with forwarding_server(tmp_path, upstream) as server:
        bad = ask(server, "type97.example.test", "HTTPS", tcp)
        assert bad.rcode() == dns.rcode.SERVFAIL
        assert upstream.count("type97.example.test") >= 1  # it was asked, and answered
        assert server.mesh.forwarder.rejected.get("wrong_question", 0) >= 1
        # Control: the same question with the type echoed right is accepted (NODATA),
        # and a name echoed in another case (0x20) still matches.
        good = ask(server, "https-ok.example.test", "HTTPS", tcp)
        assert good.rcode() == dns.rcode.NOERROR and not good.answer
        upper = ask(server, "upper.example.test", "A", tcp)
        assert upper.rcode() == dns.rcode.NOERROR
        assert [r.address for rrset in upper.answer for r in rrset] == ["192.0.2.1"]


# ---------------------------------------------------------------- OPT as a question


def dig(server: ServerThread, *args: str) -> str:
    path = tool("dig")
    assert path, "dig is installed on this machine"
    host, port = server.dns_addr()
    out = run_tool(path, "+time=5", "+tries=1", "-p", str(port), f"@{host}", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
@pytest.mark.parametrize("name", [F, "frontend.mesh.", "www.example.test."],
                         ids=["mesh", "mesh-hostname", "forwarded"])
def test_question_of_type_opt_gets_formerr(tmp_path: Path, upstream: RewritingUpstream,
                                           name: str, transport: str) -> None:
    with forwarding_server(tmp_path, upstream) as server:
        out = dig(server, transport, "-t", "TYPE41", name)
        assert "status: FORMERR" in out, out
        assert upstream.count() == 0  # never forwarded
        # The same names with a real type are still answered as before.
        out = dig(server, transport, "-t", "A", name)
        assert "status: NOERROR" in out, out


def test_opt_question_formerr_with_dnspython_echoes_id_and_question(
        tmp_path: Path, upstream: RewritingUpstream) -> None:
    with forwarding_server(tmp_path, upstream) as server:
        host, port = server.dns_addr()
        for name in (F, "www.example.test."):
            query = dns.message.make_query(name, dns.rdatatype.OPT)
            reply = udp_query(query, host, port, timeout=TIMEOUT)
            assert reply.id == query.id
            assert reply.rcode() == dns.rcode.FORMERR
            assert [(q.name.to_text(), q.rdtype) for q in reply.question] == [(name, 41)]
        assert upstream.count() == 0


# ---------------------------------------------------------------- bounded forward memory


CACHE_SIZE = 40


def forward_sizes(server: ServerThread) -> dict[str, int]:
    def read() -> dict[str, int]:
        mesh = server.mesh
        state = mesh.handler._state
        fwd = mesh.forwarder
        return {"resolver.fwd_udp": len(state.fwd_udp), "resolver.fwd_tcp": len(state.fwd_tcp),
                "forwarder.cache": len(fwd.cache), "forwarder.served_udp": len(fwd._served_udp),
                "forwarder.served_tcp": len(fwd._served_tcp)}
    result: dict[str, int] = server.call(read)
    return result


def test_forwarded_memory_is_bounded_by_cache_size(tmp_path: Path,
                                                   upstream: RewritingUpstream) -> None:
    """Many distinct forwarded names (each asked twice, so the cache-hit memos fill
    too) never hold more than dns.cache_size entries in any structure."""
    peak: dict[str, int] = {}
    with forwarding_server(tmp_path, upstream, cache_size=CACHE_SIZE) as server:
        for i in range(6 * CACHE_SIZE):
            name = f"n{i}.example.test"
            for _ in range(2):
                assert ask(server, name, "A").rcode() == dns.rcode.NOERROR
            if i % 3 == 0:
                for _ in range(2):
                    assert ask(server, name, "A", tcp=True).rcode() == dns.rcode.NOERROR
            if i % 7 == 0:
                for key, size in forward_sizes(server).items():
                    peak[key] = max(peak.get(key, 0), size)
        for key, size in forward_sizes(server).items():
            peak[key] = max(peak.get(key, 0), size)
        assert upstream.count() >= 6 * CACHE_SIZE  # every name really went upstream
    assert all(size <= CACHE_SIZE for size in peak.values()), peak
    # Every structure was in use (so the bound above was really exercised).
    assert peak["resolver.fwd_udp"] >= CACHE_SIZE // 2, peak
    assert peak["forwarder.cache"] == CACHE_SIZE, peak
    assert peak["forwarder.served_udp"] >= CACHE_SIZE // 2, peak


def test_cache_size_zero_keeps_no_forwarded_entries(tmp_path: Path,
                                                    upstream: RewritingUpstream) -> None:
    with forwarding_server(tmp_path, upstream, cache_size=0) as server:
        for i in range(30):
            assert ask(server, f"z{i}.example.test", "A").rcode() == dns.rcode.NOERROR
        sizes = forward_sizes(server)
    assert sizes == dict.fromkeys(sizes, 0)
