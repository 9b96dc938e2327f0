"""Forwarding per zone (dns.forward, stub domains), against two real unbound instances.

The "cluster DNS" unbound answers over TCP only (``do-udp: no``), so every answer
from it proves the ``protocol: tcp`` path; the "." unbound answers UDP. Both serve
the same names with different data, so each answer says which one it came from:
names under each zone must reach that zone's upstream, the longest zone first,
matched label by label and case-insensitively.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from meshdns.config import ConfigError, ForwardZone, HostPort, parse_config
from meshdns.dns.forwardplan import effective_forward

from ..apiclient import call
from ..fake_upstream import UNBOUND_CONF, Unbound
from ..support import ServerThread, make_config, query, running_server

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")

CLUSTER_DATA = [
    "cluster.local. 3600 IN SOA ns.cluster.local. host.cluster.local. 1 3600 600 86400 5",
    "web.default.svc.cluster.local. 5 IN A 10.96.0.10",
    "who.cluster.local. 60 IN TXT cluster-dns",
    "a.special.cluster.local. 60 IN A 10.96.0.99",
    "www.example.test. 300 IN A 198.51.100.10",  # never asked: not in its zone
]
ROOT_DATA = [
    "example.test. 3600 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 30",
    "www.example.test. 300 IN A 192.0.2.10",
    "who.cluster.local. 60 IN TXT root-dns",  # shadowed by the cluster.local zone
    "a.special.cluster.local. 60 IN A 192.0.2.99",  # special.cluster.local: back to "."
    "who.xcluster.local. 60 IN TXT root-dns",  # not under cluster.local, label-wise
]


class TcpOnlyUnbound(Unbound):
    """An unbound that answers over TCP only."""

    def write_conf(self, data: list[str]) -> None:
        lines = "\n".join(f'    local-data: "{rr}"' for rr in data)
        conf = UNBOUND_CONF.format(host=self.host, port=self.port, dir=self.dir, data=lines)
        self.conf.write_text(conf.replace("    do-ip6: no\n",
                                          "    do-ip6: no\n    do-udp: no\n"))

    def ready(self) -> bool:
        dns.query.tcp(dns.message.make_query("who.cluster.local", "TXT"), self.host,
                      port=self.port, timeout=0.2)
        return True


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[tuple[Unbound, Unbound]]:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "root").mkdir()
    with TcpOnlyUnbound(tmp_path / "cluster", data=CLUSTER_DATA) as cluster, \
            Unbound(tmp_path / "root", data=ROOT_DATA) as root:
        yield cluster, root


def forward_config(cluster: Unbound, root: Unbound) -> list[dict[str, Any]]:
    return [
        {"zone": ".", "upstreams": [root.address]},
        {"zone": "Cluster.Local.", "upstreams": [cluster.address], "protocol": "tcp"},
        {"zone": "special.cluster.local", "upstreams": [root.address]},
    ]


@pytest.fixture
def server(tmp_path: Path, upstreams: tuple[Unbound, Unbound]) -> Iterator[ServerThread]:
    cluster, root = upstreams
    raw = make_config(tmp_path, {"dns": {"forward": forward_config(cluster, root),
                                         "upstream_timeout": 2.0}})
    with running_server(raw) as s:
        yield s


def txt(reply: dns.message.Message) -> str:
    return b"".join(reply.answer[0][0].strings).decode()


def test_each_zone_goes_to_its_own_upstream(server: ServerThread,
                                            upstreams: tuple[Unbound, Unbound]) -> None:
    cluster, root = upstreams
    assert txt(query(server, "who.cluster.local", "TXT")) == "cluster-dns"  # over TCP
    assert txt(query(server, "WHO.Cluster.LOCAL", "TXT")) == "cluster-dns"  # any case
    web = query(server, "web.default.svc.cluster.local")
    assert [r.address for r in web.answer[0]] == ["10.96.0.10"]
    assert [r.address for r in query(server, "www.example.test").answer[0]] == ["192.0.2.10"]
    # The longest zone wins; a string suffix that is not a label suffix is not the zone.
    special = query(server, "a.special.cluster.local")
    assert [r.address for r in special.answer[0]] == ["192.0.2.99"]
    assert txt(query(server, "who.xcluster.local", "TXT")) == "root-dns"
    # Each answer came from the upstream of its zone, and only from it.
    stats = server.mesh.forwarder.upstream_stats()
    assert stats[cluster.address].requests == {"ok": 2}  # who (then cached), web
    assert stats[root.address].requests == {"ok": 3}


def test_resolve_says_which_zone_and_upstream(server: ServerThread,
                                              upstreams: tuple[Unbound, Unbound]) -> None:
    cluster, root = upstreams
    doc = json.loads(call(server.api_url, "GET",
                          "/v1/resolve?name=web.default.svc.cluster.local").body)
    assert doc["rule"] == "forward" and doc["rcode"] == "NOERROR"
    assert doc["forward"] == {"zone": "cluster.local", "protocol": "tcp",
                              "upstreams": [cluster.address], "answered_by": cluster.address}
    assert doc["upstreams"] == [cluster.address]
    assert [a["data"] for a in doc["answer"]] == ["10.96.0.10"]
    doc = json.loads(call(server.api_url, "GET", "/v1/resolve?name=www.example.test").body)
    assert doc["forward"] == {"zone": ".", "protocol": "udp", "upstreams": [root.address],
                              "answered_by": root.address}
    assert [a["data"] for a in doc["answer"]] == ["192.0.2.10"]


def test_stub_zones_without_a_root_refuse_other_names(
        tmp_path: Path, upstreams: tuple[Unbound, Unbound]) -> None:
    cluster, _ = upstreams
    raw = make_config(tmp_path, {"dns": {
        "forward": [{"zone": "cluster.local", "upstreams": [cluster.address],
                     "protocol": "tcp"}],
        "resolv_conf": str(tmp_path / "empty-resolv.conf")}})
    (tmp_path / "empty-resolv.conf").write_text("# no nameservers\n")
    with running_server(raw) as s:
        assert txt(query(s, "who.cluster.local", "TXT")) == "cluster-dns"
        assert query(s, "www.example.test").rcode() == dns.rcode.REFUSED


def test_sighup_reload_moves_a_zone(tmp_path: Path, upstreams: tuple[Unbound, Unbound]
                                    ) -> None:
    cluster, root = upstreams
    raw = make_config(tmp_path, {"dns": {"upstreams": [root.address]}})
    with running_server(raw) as s:
        assert txt(query(s, "who.cluster.local", "TXT")) == "root-dns"
        new = parse_config({**raw, "dns": {**raw["dns"], "upstreams": [], "forward": [
            {"zone": ".", "upstreams": [root.address]},
            {"zone": "cluster.local", "upstreams": [cluster.address], "protocol": "tcp"}]}})
        applied = s.call(s.mesh.reload, new)
        assert any(a.startswith("upstreams ") for a in applied), applied
        # Cached answers stay (they are answers); a new name goes to the new zone.
        web = query(s, "web.default.svc.cluster.local", tcp=True)
        assert [r.address for r in web.answer[0]] == ["10.96.0.10"]
        assert txt(query(s, "who.xcluster.local", "TXT")) == "root-dns"


# ---------------------------------------------------------------- config


def errors_of(dns_section: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"dns": dns_section})
    return info.value.errors


def test_forward_config_is_checked_with_the_key_path() -> None:
    cfg = parse_config({"dns": {"forward": [
        {"zone": "Cluster.Local.", "upstreams": ["10.96.0.10"], "protocol": "tcp"}]}})
    assert cfg.dns.forward == (ForwardZone("cluster.local", (HostPort("10.96.0.10", 53),),
                                           "tcp"),)
    assert errors_of({"forward": {"zone": "."}}) == [
        'dns.forward: must be a list of {zone, upstreams, protocol}, got {"zone": "."}']
    assert errors_of({"forward": [{"zone": "a..b", "upstreams": ["1.1.1.1"]},
                                  {"zone": "c", "upstreams": [], "protocol": "quic"},
                                  {"zone": "d", "upstreams": ["1.1.1.1"], "tls": True},
                                  {"zone": "e", "upstreams": ["1.1.1.1"], "protocol": "quic"},
                                  {"zone": "D.", "upstreams": ["1.1.1.1"]},
                                  {"zone": "d", "upstreams": ["1.1.1.1"]},
                                  {"upstreams": ["1.1.1.1"]}]}) == [
        'dns.forward[0].zone: must be a domain name like "cluster.local" or ".", got "a..b"',
        'dns.forward[1].upstreams: must not be empty, got []',
        'dns.forward[1].protocol: must be one of udp, tcp, got "quic"',  # every error
        'dns.forward[2].tls: unknown key (known: zone, upstreams, protocol)',
        'dns.forward[3].protocol: must be one of udp, tcp, got "quic"',
        'dns.forward[5].zone: repeats the zone of dns.forward[4], got "d"',
        'dns.forward[6]: must be a mapping with zone and upstreams (protocol: udp or tcp, '
        'optional), got {"upstreams": ["1.1.1.1"]}',
    ]
    assert errors_of({"upstreams": ["1.1.1.1"],
                      "forward": [{"zone": ".", "upstreams": ["8.8.8.8"]}]}) == [
        'dns.forward[0].zone: "." cannot be set with dns.upstreams (they are the same '
        'zone): keep one of them']


def test_zones_are_ordered_longest_first_and_dns_upstreams_is_the_root(tmp_path: Path
                                                                      ) -> None:
    (tmp_path / "resolv.conf").write_text("nameserver 10.0.0.10\n")
    cfg = parse_config({"dns": {"resolv_conf": str(tmp_path / "resolv.conf"), "forward": [
        {"zone": "local", "upstreams": ["10.0.0.1"]},
        {"zone": "svc.cluster.local", "upstreams": ["10.0.0.3"]},
        {"zone": "cluster.local", "upstreams": ["10.0.0.2"]}]}})
    routes, refused = effective_forward(cfg)
    assert [(r.zone, [str(u) for u in r.upstreams]) for r in routes] == [
        ("svc.cluster.local", ["10.0.0.3:53"]), ("cluster.local", ["10.0.0.2:53"]),
        ("local", ["10.0.0.1:53"]), (".", ["10.0.0.10:53"])]  # "." from resolv.conf
    assert refused == []


def test_a_zone_upstream_looping_to_meshdns_is_refused_by_serve_and_check_config(
        tmp_path: Path) -> None:
    own = "127.0.0.1:15053"
    raw = {"dns": {"listen": [own], "resolv_conf": str(tmp_path / "resolv.conf"),
                   "forward": [{"zone": "cluster.local", "upstreams": [own, "10.0.0.2"]}]}}
    (tmp_path / "resolv.conf").write_text("")
    routes, refused = effective_forward(parse_config(raw))
    line = (f"upstream {own} (dns.forward[0].upstreams) is meshdns's own listen address "
            f"{own}: forwarding to it would loop back to meshdns, refused")
    assert refused == [line]
    assert [[str(u) for u in r.upstreams] for r in routes] == [["10.0.0.2:53"]]
    (tmp_path / "meshdns.yaml").write_text(yaml.safe_dump(raw))
    from .test_check_config_parity import errors, meshdns

    proc = meshdns("check-config", str(tmp_path / "meshdns.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and errors(proc) == [line]

