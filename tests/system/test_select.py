"""dns.select (issue 16): the services an instance answers for; the rest as if absent.

The core check compares every answer, byte for byte, with a registry that does
not hold the hidden services at all. The end-to-end one runs a leader holding
two meshes and a follower that receives everything but answers for one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dns.message
import pytest

from meshdns.config import ConfigError, parse_config
from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    DEFAULT_TEMPLATES,
    Registry,
    RegistryPolicy,
    VipRange,
    apply_put,
    parse_services,
    parse_templates,
)

from ..apiclient import call, wait_for
from ..support import ServerThread, make_config, run_tool, running_server

RANGE4 = VipRange.from_cidr("240.0.0.0/4")
RANGE6 = VipRange.from_cidr("fd00:fd00::/64")
DOMAINS = ("mesh", "mesh.local")
TEMPLATES = [*DEFAULT_TEMPLATES, "{name}.svc.{mesh}.mesh.local"]
MESH_A: list[dict[str, Any]] = [
    {"name": "web", "namespace": "shop", "port": 80, "vip": "240.0.0.10",
     "vip6": "fd00:fd00::10", "mesh": "a", "hostnames": ["web.example.com", "www.mesh"]},
    {"name": "api", "namespace": "shop", "port": 8080, "vip": "240.0.0.11", "mesh": "a",
     "labels": {"tier": "back"}},
]
MESH_B: list[dict[str, Any]] = [
    {"name": "pay", "namespace": "bank", "port": 443, "vip": "240.0.0.20",
     "vip6": "fd00:fd00::20", "mesh": "b", "hostnames": ["pay.example.com", "deep.x.mesh"]},
    {"name": "web", "namespace": "shop", "port": 81, "vip": "240.1.0.21", "mesh": "b"},
    {"name": "nomesh", "namespace": "ops", "port": 53, "vip": "240.0.0.22"},
]
QUESTIONS = [
    (name, rdtype)
    for name in ("web.shop.svc.80.mesh", "pay.bank.svc.443.mesh", "pay_bank_svc_443.mesh.local",
                 "web.shop.svc.81.mesh", "nomesh.ops.svc.53.mesh", "bank.svc.443.mesh",
                 "svc.443.mesh", "443.mesh", "shop.svc.81.mesh", "x.mesh", "deep.x.mesh",
                 "pay.svc.b.mesh.local", "svc.b.mesh.local", "b.mesh.local",
                 "web.svc.a.mesh.local", "www.mesh", "web.example.com", "pay.example.com",
                 "20.0.0.240.in-addr.arpa", "21.0.1.240.in-addr.arpa", "1.240.in-addr.arpa",
                 "0.1.240.in-addr.arpa", "10.0.0.240.in-addr.arpa",
                 "0.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa",
                 "pay.bank.svc.443.mesh.corp.example")
    for rdtype in ("A", "AAAA", "PTR", "SRV", "ANY")
]


def resolver(items: list[dict[str, Any]], select: tuple[tuple[str, str], ...]) -> MessageHandler:
    policy = RegistryPolicy(domains=DOMAINS, range4=RANGE4, range6=RANGE6,
                            templates=parse_templates(TEMPLATES), select=select)
    reg = apply_put(Registry.empty(), parse_services(items), policy, 0.0)
    return MessageHandler(Zone(reg, ZoneSettings(domains=DOMAINS, ttl=30, negative_ttl=5,
                                           search=("corp.example",), range4=RANGE4,
                                           range6=RANGE6)))


def test_hidden_services_answer_exactly_as_if_absent() -> None:
    selected = resolver(MESH_A + MESH_B, (("mesh", "a"),))
    absent = resolver(MESH_A, ())
    everything = resolver(MESH_A + MESH_B, ())
    differs = 0
    for name, rdtype in QUESTIONS:
        q = dns.message.make_query(name, rdtype)
        q.id = 99
        wire = q.to_wire()
        got = selected.handle_udp(wire)
        assert got == absent.handle_udp(wire), (name, rdtype)
        differs += got != everything.handle_udp(wire)
    assert differs > 30  # the selector did hide something: the comparison means something
    out = selected.handle_udp(dns.message.make_query("pay.bank.svc.443.mesh", "A").to_wire())
    assert isinstance(out, bytes) and dns.message.from_wire(out).rcode() == 3  # NXDOMAIN


def test_select_matches_labels_and_zone_too() -> None:
    r = resolver(MESH_A + MESH_B, (("mesh", "a"), ("tier", "back")))
    msg = dns.message.from_wire(r.handle_udp(
        dns.message.make_query("api.shop.svc.8080.mesh", "A").to_wire()))  # type: ignore[arg-type]
    assert [rr.to_text() for rr in msg.answer[0]] == ["240.0.0.11"]
    msg = dns.message.from_wire(r.handle_udp(
        dns.message.make_query("web.shop.svc.80.mesh", "A").to_wire()))  # type: ignore[arg-type]
    assert msg.rcode() == 3


def test_select_config_errors_name_the_key() -> None:
    assert parse_config({"dns": {"select": {"matchLabels": {"mesh": "a", "app": "x"}}}}) \
        .dns.select == (("app", "x"), ("mesh", "a"))
    assert parse_config({"dns": {"select": {}}}).dns.select == ()
    cases = {
        "dns.select: must be a mapping with one key, matchLabels": {"matchExpressions": []},
        "dns.select.matchLabels: must be a mapping": {"matchLabels": ["a"]},
        "dns.select.matchLabels.bad key: must be a Kubernetes label key": {
            "matchLabels": {"bad key": "x"}},
        "dns.select.matchLabels.mesh: must be a string": {"matchLabels": {"mesh": 5}},
    }
    for message, value in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config({"dns": {"select": value}})
        assert str(err.value).startswith(message), str(err.value)


# ---------------------------------------------------------------- a follower that filters


def dig_status(server: ServerThread, name: str) -> tuple[str, list[str]]:
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", name, "A")
    assert out.returncode == 0, out.stderr
    status = out.stdout.split("status: ", 1)[1].split(",", 1)[0]
    answers = [line.split()[-1] for line in out.stdout.splitlines()
               if line and not line.startswith(";") and "\tA\t" in line]
    return status, answers


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
def test_follower_receives_everything_and_answers_only_its_mesh(tmp_path: Path) -> None:
    (tmp_path / "leader").mkdir()
    (tmp_path / "follower").mkdir()
    dns_conf = {"domains": list(DOMAINS), "hostname_templates": TEMPLATES}
    leader_raw = make_config(tmp_path / "leader", {"dns": dns_conf},
                             services=MESH_A + MESH_B)
    with running_server(leader_raw) as leader:
        follower_raw = make_config(tmp_path / "follower", {
            "dns": {**dns_conf, "select": {"matchLabels": {"mesh": "a"}}},
            "registry": {"follow": leader.api_url}}, services=[])
        with running_server(follower_raw) as follower:
            wait_for(lambda: follower.mesh.store.loaded
                     and follower.mesh.store.registry.revision
                     == leader.mesh.store.registry.revision, 15, "first sync")
            # It holds everything, labels included...
            mine = call(follower.api_url, "GET", "/v1/services").json()["services"]
            theirs = call(leader.api_url, "GET", "/v1/services").json()["services"]
            assert mine == theirs and any(s.get("mesh") == "b" for s in mine)
            # ...but answers for mesh a only.
            assert dig_status(follower, "web.shop.svc.80.mesh") == ("NOERROR", ["240.0.0.10"])
            assert dig_status(follower, "web.svc.a.mesh.local") == ("NOERROR", ["240.0.0.10"])
            assert dig_status(follower, "pay.bank.svc.443.mesh") == ("NXDOMAIN", [])
            assert dig_status(follower, "pay.svc.b.mesh.local") == ("NXDOMAIN", [])
            assert dig_status(leader, "pay.bank.svc.443.mesh") == ("NOERROR", ["240.0.0.20"])
            explained = call(follower.api_url, "GET",
                             "/v1/resolve?name=pay.svc.b.mesh.local").json()
            assert explained["rcode"] == "NXDOMAIN"
            assert explained["hidden"]["by"] == "dns.select"
            assert explained["hidden"]["select"] == {"matchLabels": {"mesh": "a"}}
            assert explained["hidden"]["mismatch"] == ["mesh"]
            assert explained["hidden"]["service"]["name"] == "pay"
            assert explained["hidden"]["template"]["text"] == "{name}.svc.{mesh}.mesh.local"

            # The leader moves pay into mesh a: the follower's delta carries it.
            moved = dict(MESH_B[0], mesh="a")
            reply = call(leader.api_url, "PATCH", "/v1/services", {"upsert": [moved]})
            assert reply.status == 200, reply.body
            wait_for(lambda: dig_status(follower, "pay.svc.a.mesh.local")[0] == "NOERROR",
                     15, "the moved service answered")
            assert dig_status(follower, "pay.bank.svc.443.mesh") == ("NOERROR", ["240.0.0.20"])
            assert dig_status(follower, "pay.svc.b.mesh.local") == ("NXDOMAIN", [])
