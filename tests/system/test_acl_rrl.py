"""Access control and response rate limiting (issue 26), from several client addresses.

Clients send from distinct loopback addresses (127.0.0.0/8 is all loopback on Linux,
so each is a different client to the server): allowed, refused with EDE 18 (not in
dns.allow, or in dns.deny), mesh names only (outside dns.allow_recursion), and one
over dns.rate_limit whose replies are dropped or slipped (TC=1) and counted, while it
still gets its answer over TCP, as a real client does after TC=1.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from ..fake_upstream import Unbound
from ..support import ServerThread, make_config, run_tool, running_server, tool

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")

ALLOWED, NOT_LISTED, DENIED, NO_RECURSION, FLOODER = (
    "127.0.0.5", "127.0.1.5", "127.0.0.200", "127.0.0.20", "127.0.2.7")
RATE = 5


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    (tmp_path / "unbound").mkdir()
    with Unbound(tmp_path / "unbound") as unbound:
        raw = make_config(tmp_path, {"dns": {
            "upstreams": [unbound.address],
            "allow": ["127.0.0.0/24", "127.0.2.0/24"], "deny": ["127.0.0.128/25"],
            "allow_recursion": ["127.0.0.0/28", "127.0.2.0/24"],
            "rate_limit": RATE, "rate_limit_slip": 2, "rate_limit_loopback": True}})
        with running_server(raw) as srv:
            yield srv


def ask(srv: ServerThread, source: str, name: str, tcp: bool = False
        ) -> dns.message.Message:
    host, port = srv.dns_addr(4)
    q = dns.message.make_query(name, "A", use_edns=0)
    if tcp:
        return dns.query.tcp(q, host, port=port, timeout=3, source=source)
    return dns.query.udp(q, host, port=port, timeout=3, source=source)


def ede(reply: dns.message.Message) -> list[int]:
    return [o.code for o in reply.options if o.otype == dns.edns.EDE]


def scrape(srv: ServerThread) -> str:
    with urllib.request.urlopen(srv.api_url + "/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def counter(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("tcp", [False, True])
def test_allowed_refused_and_mesh_only_clients(server: ServerThread, tcp: bool) -> None:
    ok = ask(server, ALLOWED, "frontend.kong.svc.80.mesh", tcp)
    assert ok.rcode() == dns.rcode.NOERROR and ok.answer
    assert ask(server, ALLOWED, "www.example.test", tcp).rcode() == dns.rcode.NOERROR
    for source in (NOT_LISTED, DENIED):
        refused = ask(server, source, "frontend.kong.svc.80.mesh", tcp)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer, source
        assert ede(refused) == [18], source
    mesh = ask(server, NO_RECURSION, "frontend.kong.svc.80.mesh", tcp)
    assert mesh.rcode() == dns.rcode.NOERROR and mesh.answer
    outside = ask(server, NO_RECURSION, "www.example.test", tcp)
    assert outside.rcode() == dns.rcode.REFUSED and ede(outside) == [18]
    text = scrape(server)
    assert counter(text, "meshdns_dns_acl_refused_total") >= 2
    assert counter(text, "meshdns_dns_recursion_refused_total") >= 1


def test_dig_shows_the_prohibited_error(server: ServerThread) -> None:
    dig = tool("dig")
    assert dig is not None, "dig is installed by .ci/run"
    host, port = server.dns_addr(4)
    out = run_tool(dig, f"@{host}", "-p", str(port), "-b", NOT_LISTED, "+tries=1",
                   "frontend.kong.svc.80.mesh").stdout
    assert "status: REFUSED" in out and "EDE: 18 (Prohibited): (client not allowed)" in out


def test_a_flood_is_rate_limited_with_slip_and_tcp_still_answers(server: ServerThread) -> None:
    host, port = server.dns_addr(4)
    before = scrape(server)
    sent, full, slipped = 40, 0, 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((FLOODER, 0))
        for i in range(sent):
            q = dns.message.make_query("frontend.kong.svc.80.mesh", "A", use_edns=0)
            q.id = i
            sock.sendto(q.to_wire(), (host, port))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                break
            if peer != (host, port):
                continue
            reply = dns.message.from_wire(data)
            if reply.flags & dns.flags.TC:
                assert not reply.answer
                slipped += 1
            else:
                assert reply.answer
                full += 1
    dropped = sent - full - slipped
    # RATE a second: the burst may straddle one second boundary, so at most two windows.
    assert RATE <= full <= 2 * RATE
    assert slipped >= (sent - 2 * RATE) // 2 - 1 and dropped >= (sent - 2 * RATE) // 2 - 1
    after = scrape(server)
    name = "meshdns_dns_rate_limited_total"
    assert counter(after, name, '{action="slipped"}') - \
        counter(before, name, '{action="slipped"}') == slipped
    assert counter(after, name, '{action="dropped"}') - \
        counter(before, name, '{action="dropped"}') == dropped
    # A real client that gets TC=1 retries over TCP, which is never rate limited.
    used_tcp = False
    for _ in range(40):
        try:
            reply, used_tcp = dns.query.udp_with_fallback(
                dns.message.make_query("frontend.kong.svc.80.mesh", "A"), host, port=port,
                timeout=0.3, source=FLOODER)
        except dns.exception.Timeout:
            continue  # dropped: a real client asks again
        if used_tcp:
            break
    assert used_tcp and reply.rcode() == dns.rcode.NOERROR and reply.answer
    # Other clients are not affected by the flooder's limit.
    assert ask(server, ALLOWED, "frontend.kong.svc.80.mesh").answer
