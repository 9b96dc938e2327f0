"""Where upstreams come from (dns.upstreams, resolv.conf) and how loops are refused."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from meshdns.config import parse_config
from meshdns.dns.forwardplan import effective_upstreams
from meshdns.resolvconf import parse_resolv_conf, read_resolv_conf

from ..fake_upstream import FakeUpstream, wait_until
from ..support import ServerThread, make_config, query, running_on_free_ports


def upstreams_of(tmp: Path, dns_section: dict[str, Any], resolv: str = "") -> tuple[
        list[str], list[str]]:
    (tmp / "resolv.conf").write_text(resolv)
    cfg = parse_config({"dns": {"resolv_conf": str(tmp / "resolv.conf"), **dns_section}})
    kept, refused = effective_upstreams(cfg)
    return [str(hp) for hp in kept], refused


# ---------------------------------------------------------------- resolv.conf


def test_resolv_conf_rules() -> None:
    conf = parse_resolv_conf(
        "# comment\n"
        "domain first.example\n"
        "nameserver 10.0.0.1 ; trailing comment\n"
        "nameserver not-an-ip\n"
        "nameserver fe80::1%eth0\n"
        "nameserver 10.0.0.1\n"
        "nameserver 2001:db8:0::53\n"
        "nameserver 10.0.0.3\n"
        "nameserver 10.0.0.4\n"
        "search Default.svc.cluster.local. svc.cluster.local cluster.local\n"
        "options ndots:5\n")
    assert conf.nameservers == ("10.0.0.1", "2001:db8::53", "10.0.0.3")  # glibc: first 3
    assert conf.search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert read_resolv_conf("/nonexistent/resolv.conf").nameservers == ()


def test_resolv_conf_nameservers_become_upstreams(tmp_path: Path) -> None:
    kept, refused = upstreams_of(tmp_path, {}, "nameserver 10.0.0.10\nnameserver ::1\n")
    assert kept == ["10.0.0.10:53", "[::1]:53"] and refused == []
    kept, _ = upstreams_of(tmp_path, {"upstreams": ["10.9.9.9:5353"]}, "nameserver 10.0.0.10\n")
    assert kept == ["10.9.9.9:5353"]


# ---------------------------------------------------------------- loop refusal


def test_own_listen_address_is_refused(tmp_path: Path) -> None:
    kept, refused = upstreams_of(tmp_path, {"listen": ["127.0.0.1:15053"],
                                            "upstreams": ["127.0.0.1:15053", "127.0.0.1:53",
                                                          "10.0.0.10"]})
    assert kept == ["127.0.0.1:53", "10.0.0.10:53"]
    assert len(refused) == 1 and "127.0.0.1:15053" in refused[0] and "loop" in refused[0]


def test_resolv_conf_pointing_at_ourselves_on_port_53_is_refused(tmp_path: Path) -> None:
    kept, refused = upstreams_of(tmp_path, {"listen": ["127.0.0.1:53"]},
                                 "nameserver 127.0.0.1\nnameserver 10.0.0.10\n")
    assert kept == ["10.0.0.10:53"]
    assert len(refused) == 1 and "resolv.conf" in refused[0]
    kept, refused = upstreams_of(tmp_path, {"listen": ["127.0.0.1:53"]}, "nameserver 127.0.0.1\n")
    assert kept == [] and len(refused) == 1


def test_wildcard_listener_covers_every_local_address(tmp_path: Path) -> None:
    kept, refused = upstreams_of(tmp_path, {"listen": ["0.0.0.0:53"],
                                            "upstreams": ["127.0.0.1", "127.0.0.53", "0.0.0.0",
                                                          "127.0.0.1:5353", "[::1]:53"]})
    # The IPv4 wildcard receives 127.x:53; IPv6 listeners are V6ONLY so ::1 is someone else.
    assert kept == ["127.0.0.1:5353", "[::1]:53"] and len(refused) == 3
    kept, refused = upstreams_of(tmp_path, {"listen": ["[::]:53"], "upstreams": ["::1", "127.0.0.1"]})
    assert kept == ["127.0.0.1:53"] and len(refused) == 1
    kept, refused = upstreams_of(tmp_path, {"listen": ["127.0.0.1:53"], "upstreams": ["0.0.0.0"]})
    assert kept == [] and len(refused) == 1  # 0.0.0.0 as a destination is this host


def test_wildcard_listener_covers_the_hosts_own_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect: picks a source address, sends nothing
        except OSError:
            pytest.skip("no IPv4 route: no non-loopback local address to test with")
        own = s.getsockname()[0]
    if own.startswith("127."):
        pytest.skip("only loopback addresses here")
    kept, refused = upstreams_of(tmp_path, {"listen": ["0.0.0.0:53"],
                                            "upstreams": [own, "192.0.2.1"]})
    assert kept == ["192.0.2.1:53"] and len(refused) == 1 and own in refused[0]


def test_loop_is_refused_with_a_log_line_and_no_storm(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def looped(ports: list[int]) -> list[Mapping[str, Any]]:
        return [make_config(tmp_path, {"dns": {"listen": [f"127.0.0.1:{ports[0]}"],
                                               "upstreams": [f"127.0.0.1:{ports[0]}"]}})]

    with caplog.at_level(logging.ERROR, logger="meshdns"), \
            running_on_free_ports(1, looped) as (server,):
        port = server.dns_addr()[1]
        assert server.mesh.forwarder is None
        reply = query(server, "www.example.test", timeout=3.0)
        assert reply.rcode() == dns.rcode.REFUSED  # no upstream left: SPEC §4
        assert server.mesh.handler.snapshot_counts().requests.get(("udp", 1)) == 1  # one query, no echo
    assert any(f"127.0.0.1:{port}" in r.getMessage() and "loop" in r.getMessage()
               for r in caplog.records)


def test_loop_refused_but_other_upstreams_kept(tmp_path: Path) -> None:
    with FakeUpstream() as fake:
        def looped(ports: list[int]) -> list[Mapping[str, Any]]:
            return [make_config(tmp_path, {"dns": {
                "listen": [f"127.0.0.1:{ports[0]}"],
                "upstreams": [f"127.0.0.1:{ports[0]}", fake.address]}})]

        with running_on_free_ports(1, looped) as (server,):
            assert [str(u.address) for u in server.mesh.forwarder.upstreams] == [fake.address]
            assert query(server, "www.example.test", timeout=3.0).rcode() == dns.rcode.NOERROR
            assert fake.count() == 1


def test_undetectable_loop_between_two_servers_is_bounded(tmp_path: Path) -> None:
    """A forwards to B, B forwards to A: the looped query joins its own lookup."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def crossed(ports: list[int]) -> list[Mapping[str, Any]]:
        port_a, port_b = ports
        return [make_config(tmp_path / "a", {"dns": {"listen": [f"127.0.0.1:{port_a}"],
                                                     "upstreams": [f"127.0.0.1:{port_b}"],
                                                     "upstream_timeout": 0.5}}),
                make_config(tmp_path / "b", {"dns": {"listen": [f"127.0.0.1:{port_b}"],
                                                     "upstreams": [f"127.0.0.1:{port_a}"],
                                                     "upstream_timeout": 0.5}})]

    with running_on_free_ports(2, crossed) as (a, b):
        reply = query(a, "loop.example.test", timeout=5.0)
        assert reply.rcode() == dns.rcode.SERVFAIL

        def attempts(server: ServerThread) -> int:
            stats = server.mesh.forwarder.upstream_stats().values()
            return sum(sum(s.requests.values()) for s in stats)

        # B hears A's SERVFAIL as the client does: let it record its one attempt.
        wait_until(lambda: attempts(b) == 1, "B's attempt to finish")
        assert attempts(a) == 1
        # The client's query at A, A's at B, B's back at A (which joined the first): 3.
        assert a.mesh.handler.snapshot_counts().requests.get(("udp", 1), 0) == 2
        assert b.mesh.handler.snapshot_counts().requests.get(("udp", 1), 0) == 1
