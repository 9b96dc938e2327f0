"""Serve-stale (RFC 8767) with a real unbound upstream that is stopped and started again.

The forwarder's cache clock is moved by hand (``Clock``) so expiry and the 30 s
refresh period pass without sleeping; unbound, the sockets and dig are real.
"""

from __future__ import annotations

import contextlib
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..fake_upstream import Clock, Unbound, wait_until
from ..support import ServerThread, make_config, query, run_tool, running_server

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")

ZONE = [
    "example.test. 3600 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 30",
    "example.test. 3600 IN NS ns.example.test.",
]


def unbound_serving(directory: Path, port: int | None, address: str) -> Unbound:
    directory.mkdir()
    return Unbound(directory, port=port, data=[*ZONE, f"web.example.test. 5 IN A {address}"])


@contextlib.contextmanager
def forwarding_to(tmp_path: Path, address: str, serve_stale: int
                  ) -> Iterator[tuple[ServerThread, Unbound, Clock]]:
    """meshdns forwarding to an unbound that serves web.example.test = ``address``
    (TTL 5), with ``dns.serve_stale`` and the forwarder's clock moved by hand."""
    clock = Clock()
    upstream = unbound_serving(tmp_path / "u", None, address).start()
    try:
        raw = make_config(tmp_path, {"dns": {"upstreams": [upstream.address],
                                             "upstream_timeout": 0.5,
                                             "serve_stale": serve_stale}})
        with running_server(raw) as server:
            fwd = server.mesh.forwarder
            assert fwd is not None
            fwd.clock = clock
            yield server, upstream, clock
    finally:
        upstream.stop()


def answer(server: ServerThread, name: str = "web.example.test") -> tuple[int, list[str], int]:
    reply = query(server, name, timeout=10.0)
    if not reply.answer:
        return reply.rcode(), [], -1
    return reply.rcode(), [r.address for r in reply.answer[0]], reply.answer[0].ttl


def stale_total(server: ServerThread) -> float:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "meshdns_stale_answers":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("meshdns_stale_answers_total is not exported")


def test_stale_answers_with_ttl_30_while_unbound_is_down_then_fresh(tmp_path: Path) -> None:
    clock = Clock()
    first = unbound_serving(tmp_path / "u1", None, "192.0.2.50").start()
    try:
        raw = make_config(tmp_path, {"dns": {"upstreams": [first.address],
                                             "upstream_timeout": 0.5, "serve_stale": 600}})
        with running_server(raw) as server:
            fwd = server.mesh.forwarder
            assert fwd is not None
            fwd.clock = clock
            assert answer(server) == (dns.rcode.NOERROR, ["192.0.2.50"], 5)
            first.stop()
            clock.now += 6  # expired; the only upstream is gone

            # Asked once, every upstream fails: the expired answer, TTL 30.
            assert answer(server) == (dns.rcode.NOERROR, ["192.0.2.50"], 30)
            asked = sum(s.requests.get("timeout", 0) + s.requests.get("error", 0)
                        for s in fwd.upstream_stats().values())
            assert asked >= 1
            # dig sees the same: the stale answer with TTL 30.
            host, port = server.dns_addr()
            out = run_tool("dig", f"@{host}", "-p", str(port), "+noall", "+answer",
                           "+tries=1", "+time=5", "web.example.test", "A")
            assert out.stdout.split() == ["web.example.test.", "30", "IN", "A", "192.0.2.50"]
            assert stale_total(server) == 2

            # unbound is back, with a new address: within the 30 s refresh period the
            # stale answer stands and the upstream is not asked.
            second = unbound_serving(tmp_path / "u2", first.port, "192.0.2.51").start()
            try:
                before = {k: dict(s.requests) for k, s in fwd.upstream_stats().items()}
                clock.now += 10
                assert answer(server) == (dns.rcode.NOERROR, ["192.0.2.50"], 30)
                assert {k: dict(s.requests) for k, s in fwd.upstream_stats().items()} == before

                # Past it: answered stale at once, unbound asked in the background...
                clock.now += 25
                assert answer(server) == (dns.rcode.NOERROR, ["192.0.2.50"], 30)
                # ...and its fresh answer replaces the stale one (until it lands, the
                # stale answer stands: each one the polling sees is counted).
                seen: list[tuple[int, list[str], int]] = []

                def fresh() -> bool:
                    seen.append(answer(server))
                    return seen[-1][1] == ["192.0.2.51"]

                wait_until(fresh, "the fresh answer")
                stale = (dns.rcode.NOERROR, ["192.0.2.50"], 30)
                assert all(a == stale for a in seen[:-1]), seen
                rcode, addresses, ttl = answer(server)
                assert (rcode, addresses) == (dns.rcode.NOERROR, ["192.0.2.51"])
                assert 0 < ttl <= 5
                assert stale_total(server) == 4 + len(seen) - 1
            finally:
                second.stop()
    finally:
        first.stop()


def test_servfail_once_nothing_stale_is_left(tmp_path: Path) -> None:
    with forwarding_to(tmp_path, "192.0.2.60", serve_stale=100) as (server, upstream, clock):
        assert answer(server)[1] == ["192.0.2.60"]
        upstream.stop()
        clock.now += 50  # 45 s past expiry: inside serve_stale
        assert answer(server) == (dns.rcode.NOERROR, ["192.0.2.60"], 30)
        clock.now += 60  # 105 s past expiry: nothing stale is left
        assert answer(server) == (dns.rcode.SERVFAIL, [], -1)
        # A name never answered has nothing stale either.
        assert answer(server, "other.example.test")[0] == dns.rcode.SERVFAIL


def test_serve_stale_0_disables_it(tmp_path: Path) -> None:
    with forwarding_to(tmp_path, "192.0.2.70", serve_stale=0) as (server, upstream, clock):
        assert answer(server)[1] == ["192.0.2.70"]
        upstream.stop()
        clock.now += 6
        assert answer(server)[0] == dns.rcode.SERVFAIL
        assert stale_total(server) == 0
