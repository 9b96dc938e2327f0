"""Multi-port mesh services beside services (issue 25; design: docs/meshservice.md).

Real servers on loopback, real clients: dig for the answers (one VIP for every port at
the port-less name, ``_http._tcp`` SRV, SRV at the name), glibc's getent in private
namespaces (tests/netns.py), the ``meshdns apply -f`` CLI with Kuma's documents
(tests/data/kuma/), the API's 409s, and a follower that receives a multi-port service
by delta. The seed scenario (ExternalName ``front`` -> ``frontend.kong.svc.80.mesh``)
runs against a registry holding both forms.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
import yaml

from ..apiclient import ServerProcess, call, wait_for
from ..netns import HOSTS, NSSWITCH, require_namespaces, run_in_namespaces
from ..support import ServerThread, make_config, query, run_tool, running_server
from .test_cli import clean_env, meshdns_cmd
from .test_cname_chase import ClusterDns, cluster, records  # noqa: F401 (cluster: a fixture)
from .test_follow_delta import (  # noqa: F401 (procs: a fixture)
    leader_process,
    listing,
    metric,
    procs,
    start,
)
from .test_glibc import DRIVER, PROBE, lines

REPO = Path(__file__).resolve().parents[2]
KUMA = REPO / "tests" / "data" / "kuma"

# Two ports, one VIP: a port-less host name, named ports (one UDP).
WEB = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "web",
       "ports": [{"port": 8080, "name": "http", "appProtocol": "http"},
                 {"port": 9090, "name": "grpc", "appProtocol": "grpc"},
                 {"port": 5353, "name": "dns", "appProtocol": "udp"}],
       "vip": "241.0.0.10", "vip6": "fd00:fd00::a", "hostnames": ["web.shop.mesh"]}
WEB_KEY = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "web"}


def dig(server: ServerThread, *args: str) -> list[list[str]]:
    """dig +noall +answer +additional: each record's fields."""
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", "+noall",
                   "+answer", "+additional", "+comments", *args)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()
            if line.strip() and not line.startswith(";")]


def status(server: ServerThread, *args: str) -> str:
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", *args)
    return out.stdout.split("status: ")[1].split(",")[0]


def patch(server: ServerThread, body: dict[str, Any]) -> Any:
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == 200, reply.body
    return reply.json()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path)) as s:  # DEMO_SERVICES: legacy services
        patch(s, {"upsert": [WEB]})
        yield s


def test_a_two_port_service_answers_its_portless_name_with_one_vip(server: ServerThread
                                                                   ) -> None:
    assert dig(server, "web.shop.mesh", "A") == [["web.shop.mesh.", "30", "IN", "A",
                                                 "241.0.0.10"]]
    assert dig(server, "WEB.shop.MESH", "AAAA") == [["WEB.shop.MESH.", "30", "IN", "AAAA",
                                                    "fd00:fd00::a"]]
    # The built-in per-port names of every port answer the same one VIP.
    for port in (8080, 9090):
        assert dig(server, f"web.shop.svc.{port}.mesh", "A")[0][4] == "241.0.0.10"
        assert dig(server, f"web_shop_svc_{port}.mesh", "A")[0][4] == "241.0.0.10"
    assert status(server, "web.shop.svc.1234.mesh", "A") == "NXDOMAIN"
    assert status(server, "shop.svc.9090.mesh", "A") == "NOERROR"  # an empty non-terminal
    # PTR of the one VIP: the canonical name is the first explicit host name.
    assert dig(server, "-x", "241.0.0.10") == [
        ["10.0.0.241.in-addr.arpa.", "30", "IN", "PTR", "web.shop.mesh."]]
    # The legacy services beside it answer exactly as before.
    assert dig(server, "frontend.kong.svc.80.mesh", "A") == [
        ["frontend.kong.svc.80.mesh.", "30", "IN", "A", "240.0.0.7"]]


def test_named_port_srv_and_srv_at_the_name(server: ServerThread) -> None:
    http = dig(server, "_http._tcp.web.shop.mesh", "SRV")
    assert http == [["_http._tcp.web.shop.mesh.", "30", "IN", "SRV", "0", "100", "8080",
                     "web.shop.mesh."],
                    ["web.shop.mesh.", "30", "IN", "A", "241.0.0.10"],
                    ["web.shop.mesh.", "30", "IN", "AAAA", "fd00:fd00::a"]]
    assert dig(server, "_dns._udp.web.shop.mesh", "SRV")[0][6] == "5353"
    assert status(server, "_dns._tcp.web.shop.mesh", "SRV") == "NXDOMAIN"  # a UDP port
    every = dig(server, "web.shop.mesh", "SRV")
    assert [r[6] for r in every if r[3] == "SRV"] == ["8080", "9090", "5353"]  # ports order
    assert {r[7] for r in every if r[3] == "SRV"} == {"web.shop.mesh."}
    assert [r[3] for r in every if r[3] != "SRV"] == ["A", "AAAA"]
    # A built-in per-port name: that port only.
    assert [r[6] for r in dig(server, "web.shop.svc.9090.mesh", "SRV") if r[3] == "SRV"] \
        == ["9090"]
    # The SRV owner names exist: NODATA for A there, not NXDOMAIN (RFC 8020).
    for name in ("_http._tcp.web.shop.mesh", "_tcp.web.shop.mesh"):
        assert status(server, name, "A") == "NOERROR"
        assert dig(server, name, "A") == []
    assert status(server, "_nope._tcp.web.shop.mesh", "SRV") == "NXDOMAIN"


def test_the_api_lists_both_forms_and_explains(server: ServerThread) -> None:
    doc = call(server.api_url, "GET", "/v1/services").json()
    legacy = [s for s in doc["services"] if "port" in s]
    assert [s["name"] for s in legacy] == ["frontend", "backend", "redis"]
    assert "kind" not in legacy[0] and set(legacy[0]) == {
        "name", "namespace", "port", "vip", "vip6", "hostnames"}
    (web,) = [s for s in doc["services"] if "ports" in s]
    assert web == WEB  # every field as written, in the record's order
    assert list(web) == list(WEB)
    explained = call(server.api_url, "GET",
                     "/v1/resolve?name=_grpc._tcp.web.shop.mesh&type=SRV").json()
    assert explained["rule"] == "srv-port"
    assert explained["port"] == {"port": 9090, "name": "grpc", "appProtocol": "grpc"}
    assert explained["service"]["name"] == "web"
    canonical = call(server.api_url, "GET",
                     "/v1/resolve?name=web.shop.svc.8080.mesh").json()
    assert canonical["rule"] == "canonical" and canonical["port"]["port"] == 8080
    assert canonical["template"] == {"index": 0,
                                     "text": "{name}.{namespace}.svc.{port}.{domain}"}
    text = call(server.api_url, "GET", "/metrics").body.decode()
    assert 'meshdns_registry_entries{kind="MeshService"} 1.0' in text
    assert 'meshdns_registry_entries{kind="Service"} 3.0' in text
    assert "meshdns_registry_services 4.0" in text


def test_collisions_are_refused_whole_with_409(server: ServerThread) -> None:
    before = call(server.api_url, "GET", "/v1/services").json()["revision"]
    # (name, namespace, port) is unique across both forms.
    clash = {"name": "web", "namespace": "shop", "port": 9090}
    reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [clash]})
    assert reply.status == 409, reply.body
    assert "web.shop.svc.9090.mesh is owned by both web.shop:9090 and MeshService web" \
        in reply.json()["error"]
    twin = dict(WEB, name="frontend", namespace="kong", vip="241.0.0.11", vip6=None,
                hostnames=[], ports=[{"port": 80}])
    reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [twin]})
    assert reply.status == 409 and "frontend.kong.svc.80.mesh" in reply.json()["error"]
    # One VIP, one owner, across both forms.
    stolen = dict(WEB, name="other", hostnames=[], vip="240.0.0.7", vip6=None)
    reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [stolen]})
    assert reply.status == 409 and "240.0.0.7" in reply.json()["error"], reply.body
    # A host name has one owner.
    taken = dict(WEB, name="other", vip="241.0.0.12", vip6=None, hostnames=["frontend.mesh"])
    reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [taken]})
    assert reply.status == 409 and "frontend.mesh" in reply.json()["error"], reply.body
    # Both port and ports: 400 at the field.
    bad = call(server.api_url, "PATCH", "/v1/services",
               {"upsert": [dict(WEB, port=80)]}).json()
    assert bad["field"] == "upsert[0].port"
    assert call(server.api_url, "GET", "/v1/services").json()["revision"] == before


def test_a_patch_moves_a_service_to_a_mesh_service_keeping_its_address(
        server: ServerThread) -> None:
    # frontend.kong:80 (240.0.0.7) becomes a mesh service with ports 80 and 443 in one
    # PATCH: the per-port name keeps answering the same address.
    mesh_frontend = {"name": "frontend", "namespace": "kong", "mesh": "default",
                     "ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
                     "vip": "240.0.0.7", "vip6": "fd00:fd00::7",
                     "hostnames": ["frontend.mesh", "httpbin.org"]}
    patch(server, {"delete": [{"name": "frontend", "namespace": "kong", "port": 80}],
                   "upsert": [mesh_frontend]})
    for name in ("frontend.kong.svc.80.mesh", "frontend.kong.svc.443.mesh", "frontend.mesh"):
        assert dig(server, name, "A")[0][4] == "240.0.0.7", name
    gone = patch(server, {"delete": [{"kind": "MeshService", "mesh": "default",
                                      "namespace": "kong", "name": "frontend"}]})
    assert gone["services"] == 3
    assert status(server, "frontend.kong.svc.443.mesh", "A") == "NXDOMAIN"


@pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")
def test_the_seed_scenario_with_both_forms_in_one_registry(
        tmp_path: Path, cluster: ClusterDns) -> None:  # noqa: F811
    # ExternalName front -> frontend.kong.svc.80.mesh (a bare CNAME from cluster DNS,
    # a real unbound): completed by meshdns through the legacy service, then through a
    # mesh service that took its place, with another mesh service beside them.
    raw = make_config(tmp_path, {"dns": {"upstreams": [cluster.address],
                                         "upstream_timeout": 2.0,
                                         "search": ["default.svc.cluster.local"]}})
    want = [("front.default.svc.cluster.local.", "CNAME", "frontend.kong.svc.80.mesh."),
            ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]
    with running_server(raw) as s:
        patch(s, {"upsert": [WEB]})
        assert records(query(s, "front.default.svc.cluster.local", "A")) == want
        patch(s, {"delete": [{"name": "frontend", "namespace": "kong", "port": 80}],
                  "upsert": [{"name": "frontend", "namespace": "kong", "mesh": "default",
                              "ports": [{"port": 80, "name": "http"}, {"port": 443}],
                              "vip": "240.0.0.7"}]})
        assert records(query(s, "front.default.svc.cluster.local", "A", tcp=True)) == want
        assert records(query(s, "frontend.kong.svc.80.mesh.default.svc.cluster.local", "A")
                       )[-1] == ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")
        assert query(s, "frontend.kong.svc.80.mesh", "AAAA").answer == []  # vip only


# ---------------------------------------------------------------- Kuma's documents

KUMA_FILES = sorted(p.name for p in KUMA.glob("*.yaml"))


def cli(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshdns_cmd(*args, "--server", server.api_url),
                          capture_output=True, text=True, timeout=60, env=clean_env(),
                          check=False)


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, services=[])) as s:
        yield s


def test_apply_kuma_documents_every_kind_both_forms(empty: ServerThread) -> None:
    kinds: set[str] = set()
    for name in KUMA_FILES:
        first = cli(empty, "apply", "-f", str(KUMA / name))
        assert first.returncode == 0, (name, first.stderr)
        revision = call(empty.api_url, "GET", "/v1/services").json()["revision"]
        again = cli(empty, "apply", "-f", str(KUMA / name))  # a re-apply: a no-op
        assert again.returncode == 0 and "unchanged" in again.stdout, (name, again.stdout)
        assert f"revision {revision}," in again.stdout
        assert call(empty.api_url, "GET", "/v1/services").json()["revision"] == revision
    entries = call(empty.api_url, "GET", "/v1/services").json()["services"]
    kinds = {e["kind"] for e in entries}
    assert kinds == {"MeshService", "MeshExternalService", "MeshMultiZoneService"}
    by = {(e["kind"], e.get("zone"), e.get("namespace"), e["name"]): e for e in entries}
    # meshservice-kubernetes.yaml: mesh, zone, namespace from the labels and metadata,
    # both ports, the cluster IP and status.addresses as given, no vip6 allocated.
    redis = by[("MeshService", "east", "kuma-demo", "redis")]
    assert redis["mesh"] == "default" and redis["vip"] == "10.0.1.1" and redis["vip6"] is None
    assert redis["ports"] == [{"port": 6739, "appProtocol": "tcp"},
                              {"port": 16739, "name": "some-port", "appProtocol": "tcp"}]
    assert redis["hostnames"] == ["redis.mesh"]
    assert redis["labels"]["team"] == "db-operators"
    assert "targetPort" not in json.dumps(redis) and "selector" not in json.dumps(redis)
    # meshservice-universal.yaml: no status: both VIPs allocated, three named ports.
    backend = by[("MeshService", None, None, "backend")]
    assert [p["name"] for p in backend["ports"]] == ["http", "grpc", "metrics"]
    assert ipaddress.ip_address(backend["vip"]) in ipaddress.ip_network("240.0.0.0/4")
    assert ipaddress.ip_address(backend["vip6"]) in ipaddress.ip_network("fd00:fd00::/64")
    # Answered by DNS: an explicit Kuma host name, its named-port SRV, the cluster IP's PTR.
    assert dig(empty, "redis.mesh", "A") == [["redis.mesh.", "30", "IN", "A", "10.0.1.1"]]
    srv = dig(empty, "_some-port._tcp.redis.mesh", "SRV")
    assert srv[0][3:] == ["SRV", "0", "100", "16739", "redis.mesh."]
    assert dig(empty, "-x", "10.0.1.1")[0][3:] == ["PTR", "redis.mesh."]
    external = by[("MeshExternalService", None, "kuma-system", "httpbin")]
    assert dig(empty, "httpbin.extsvc.mesh.local", "A")[0][4] == external["vip"]
    table = cli(empty, "get", "services")
    assert table.returncode == 0, table.stderr
    assert ["kuma-demo", "redis", "6739,16739", "10.0.1.1", "-", "redis.mesh"] in [
        line.split() for line in table.stdout.splitlines()]
    webapp = by[("MeshMultiZoneService", None, "kuma-system", "webapp")]
    assert dig(empty, "webapp.mzsvc.mesh.local", "SRV")[0][6] == "8080"
    assert webapp["vip"] == "243.0.0.1"


def test_kuma_documents_through_the_api_put_and_patch(empty: ServerThread) -> None:
    stream = (KUMA / "stream.yaml").read_bytes()
    put = call(empty.api_url, "PUT", "/v1/services", raw=stream,
               content_type="application/yaml")
    assert put.status == 200, put.body
    again = call(empty.api_url, "PUT", "/v1/services", raw=stream,
                 content_type="application/yaml").json()
    assert again["changed"] is False and again["revision"] == put.json()["revision"]
    doc = yaml.safe_load((KUMA / "meshservice-kubernetes.yaml").read_text())
    patched = call(empty.api_url, "PATCH", "/v1/services", doc)  # JSON, one resource
    assert patched.status == 200, patched.body
    assert patched.json()["services"] == put.json()["services"] + 1
    other = dict(doc, kind="MeshTimeout")
    refused = call(empty.api_url, "PATCH", "/v1/services", other)
    assert refused.status == 400 and "MeshTimeout" in refused.json()["error"]
    assert refused.json()["field"].startswith("documents[0]")


# ---------------------------------------------------------------- follower


def test_a_follower_receives_a_multi_port_service_by_delta(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path))  # DEMO_SERVICES
    follower = start(procs, ServerProcess(tmp_path / "follower",
                                          {"registry": {"follow": leader.url}},
                                          name="follower"))
    wait_for(lambda: listing(follower.url)[0] == listing(leader.url)[0], 30, "first sync")
    deltas = metric(follower.url, "meshdns_follow_deltas_total")
    assert call(leader.url, "PATCH", "/v1/services", {"upsert": [WEB]}).status == 200
    revision = call(leader.url, "GET", "/v1/services").json()["revision"]
    wait_for(lambda: call(follower.url, "GET", "/v1/services").json()["revision"]
             == revision, 30, "the delta")
    assert metric(follower.url, "meshdns_follow_deltas_total") > deltas
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    assert call(follower.url, "GET", "/v1/services").json() == \
        call(leader.url, "GET", "/v1/services").json()
    out = run_tool("dig", "@127.0.0.1", "-p", str(follower.dns_addr[1]), "+short",
                   "_grpc._tcp.web.shop.mesh", "SRV")
    assert out.stdout.split() == ["0", "100", "9090", "web.shop.mesh."]
    # The delete goes by delta too, as a 5-part key.
    assert call(leader.url, "PATCH", "/v1/services", {"delete": [WEB_KEY]}).status == 200
    revision = call(leader.url, "GET", "/v1/services").json()["revision"]
    wait_for(lambda: call(follower.url, "GET", "/v1/services").json()["revision"]
             == revision, 30, "the delete")
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    assert query_status(follower, "web.shop.mesh") == dns.rcode.NXDOMAIN


def query_status(proc: ServerProcess, name: str) -> int:
    import dns.message
    import dns.query

    host, port = proc.dns_addr
    reply = dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=3)
    return reply.rcode()


# ---------------------------------------------------------------- state file, glibc


def test_state_file_keeps_mesh_services_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    raw = make_config(tmp_path, {"registry": {"state_file": str(state)}}, services=[])
    with running_server(raw) as s:
        patch(s, {"upsert": [WEB, {"name": "plain", "namespace": "kong", "port": 80}]})
        patch(s, {"upsert": [dict(WEB, name="api", vip="241.0.0.20", vip6=None,
                                  hostnames=[])]})
        patch(s, {"delete": [dict(WEB_KEY, name="api")]})
        before = call(s.api_url, "GET", "/v1/services").json()
    journal = state.with_name(state.name + ".journal").read_text().splitlines()
    assert json.loads(journal[-1])["delete"] == [["MeshService", "default", "", "shop", "api"]]
    with running_server(raw) as s:
        assert call(s.api_url, "GET", "/v1/services").json() == before
        assert query(s, "_http._tcp.web.shop.mesh", "SRV").answer[0][0].port == 8080


GLIBC_LOOKUPS = r"""
import json, subprocess
out = {}
for label, args in [
    ("v4", ["ahostsv4", "web.shop.mesh"]),
    ("v6", ["ahostsv6", "web.shop.mesh"]),
    ("v4-port", ["ahostsv4", "web.shop.svc.9090.mesh"]),
    ("legacy", ["ahostsv4", "frontend.kong.svc.80.mesh"]),
]:
    p = subprocess.run(["getent", *args], capture_output=True, text=True, timeout=20)
    out[label] = {"rc": p.returncode, "out": p.stdout}
print(json.dumps(out))
"""


def test_glibc_resolves_the_portless_name_to_the_one_vip(tmp_path: Path) -> None:
    require_namespaces("getent")
    d = tmp_path
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (d / "nsswitch.conf").write_text(NSSWITCH)
    (d / "hosts").write_text(HOSTS)
    (d / "upstream-resolv.conf").write_text("# no nameservers\n")
    # A state file holding both forms (the probe asks frontend.kong.svc.80.mesh for
    # 240.0.0.7: here the legacy service).
    records = [{"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
                "vip6": None, "hostnames": [], "vip_given": True, "vip6_given": False},
               dict(WEB, vip_given=True, vip6_given=True)]
    (d / "state.json").write_text(json.dumps({"format": 1, "revision": 3,
                                              "services": records, "held": {}}))
    (d / "meshdns.yaml").write_text(yaml.safe_dump({
        "dns": {"listen": ["127.0.0.1:53"], "upstreams": [],
                "resolv_conf": str(d / "upstream-resolv.conf")},
        "api": {"listen": "127.0.0.1:15080"},
        "registry": {"state_file": str(d / "state.json"), "cidr6": None},
        "log": {"level": "warning"},
    }))
    (d / "driver.sh").write_text(DRIVER)
    (d / "probe.py").write_text(PROBE)
    (d / "lookups.py").write_text(GLIBC_LOOKUPS)
    results = run_in_namespaces(
        ["env", f"PYTHON={sys.executable}", "sh", str(d / "driver.sh"), str(d)], d)
    assert {r[0] for r in lines(results["v4"])} == {"241.0.0.10"}
    assert lines(results["v4"])[0] == ["241.0.0.10", "STREAM", "web.shop.mesh"]
    assert {r[0] for r in lines(results["v6"])} == {"fd00:fd00::a"}
    assert {r[0] for r in lines(results["v4-port"])} == {"241.0.0.10"}
    assert {r[0] for r in lines(results["legacy"])} == {"240.0.0.7"}


pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
