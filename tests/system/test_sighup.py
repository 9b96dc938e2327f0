"""SIGHUP, as an operator sends it to a running `meshdns serve`: reload what is safe."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import yaml

from ..apiclient import ServerProcess
from ..fake_upstream import FakeUpstream, Rule
from ..support import udp_query


def ask(server: ServerProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = server.dns_addr
    return udp_query(dns.message.make_query(name, rdtype), host, port, timeout=3)


def address(reply: dns.message.Message) -> list[str]:
    return sorted(rr.address for rrset in reply.answer for rr in rrset if hasattr(rr, "address"))


def rewrite(server: ServerProcess, **changes: dict[str, Any]) -> None:
    raw = yaml.safe_load(server.config_path.read_text())
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    server.config_path.write_text(yaml.safe_dump(raw))


def hup_and_wait(server: ServerProcess, marker: str) -> str:
    seen = server.log().count(marker)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while server.log().count(marker) <= seen:
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return server.log()


def test_sighup_applies_upstreams_search_log_level_and_seed_and_keeps_serving(
        tmp_path: Path) -> None:
    seed_a, seed_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    seed_a.write_text(yaml.safe_dump({"services": [
        {"name": "web", "namespace": "shop", "port": 80, "vip": "240.0.0.1"}]}))
    seed_b.write_text(yaml.safe_dump({"services": [
        {"name": "web", "namespace": "shop", "port": 80, "vip": "240.0.0.2"},
        {"name": "db", "namespace": "shop", "port": 5432, "vip": "240.0.0.3"}]}))
    with FakeUpstream(Rule(addresses=["192.0.2.1"], ttl=0)) as up_a, \
            FakeUpstream(Rule(addresses=["192.0.2.2"], ttl=0)) as up_b:
        server = ServerProcess(tmp_path / "s", {
            "dns": {"upstreams": [up_a.address]}, "registry": {"seed_file": str(seed_a)},
            "log": {"level": "info"}}).start()
        try:
            assert address(ask(server, "www.example.test")) == ["192.0.2.1"]
            assert address(ask(server, "web.shop.svc.80.mesh")) == ["240.0.0.1"]
            # No search list: a name with a search suffix appended is forwarded.
            searched = "web.shop.svc.80.mesh.shop.example"
            assert address(ask(server, searched)) == ["192.0.2.1"]
            rewrite(server, dns={"upstreams": [up_b.address], "search": ["shop.example"],
                                 "ttl": 60},
                    registry={"seed_file": str(seed_b)}, log={"level": "debug"})
            log = hup_and_wait(server, "needs a restart")
            assert f"SIGHUP: upstreams {up_a.address} -> {up_b.address}" in log
            assert "SIGHUP: search list (none) -> shop.example" in log
            assert "SIGHUP: log info/text -> debug/text" in log
            assert f"SIGHUP: seed file {seed_a} -> {seed_b} (revision 2, 2 services)" in log
            assert "not applied, needs a restart: dns.ttl" in log
            before = up_b.count("fresh.example.test")
            assert address(ask(server, "fresh.example.test")) == ["192.0.2.2"]
            assert up_b.count("fresh.example.test") == before + 1
            assert address(ask(server, "web.shop.svc.80.mesh")) == ["240.0.0.2"]
            assert address(ask(server, "db.shop.svc.5432.mesh")) == ["240.0.0.3"]
            assert "240.0.0.2" in address(ask(server, searched))  # now answered here
            # dns.ttl needs a restart: the running TTL is still the default 30.
            assert ask(server, "db.shop.svc.5432.mesh").answer[0].ttl == 30

            # A broken file is logged and changes nothing.
            server.config_path.write_text("dns: [unclosed\n")
            log = hup_and_wait(server, "config not reloaded")
            assert "the running one is kept" in log
            assert address(ask(server, "fresh2.example.test")) == ["192.0.2.2"]
            assert server.proc is not None and server.proc.poll() is None
        finally:
            server.stop()
        assert server.proc is not None and server.proc.returncode == 0
