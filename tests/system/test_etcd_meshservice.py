"""Mesh services (issue 25, docs/meshservice.md section 7) in etcd, end to end: a real
3-member etcd cluster on loopback, two meshdns instances as real processes, DNS asked
with dnspython, the API over HTTP.

A multi-port mesh service written through one instance is answered by the other (A at
its port-less name, SRV at the name and at ``_<port>._<proto>``, the built-in per-port
names); a PATCH of one mesh service is one entry key in etcd, applied by the other as a
delta (no listing); a delete holds its VIP under an object owner; two writers never
give one VIP to a service and a mesh service; a restarted instance reads mesh services
back from etcd.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from ..apiclient import ServerProcess, call, wait_for
from ..etcd_cluster import EtcdCluster
from ..etcd_support import (
    PREFIX,
    answers,
    instance,
    metric,
    patch,
    running_cluster,
    running_pair,
    start_listed,
    svc,
)

WEB = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "web",
       "ports": [{"port": 8080, "name": "http", "appProtocol": "http"},
                 {"port": 9090, "name": "grpc", "appProtocol": "grpc"}],
       "hostnames": ["web.shop.mesh"]}
WEB_KEY = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "web"}
WEB_ETCD = PREFIX + "meshservices/MeshService/default/_/shop/web"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from running_cluster(tmp_path)


@pytest.fixture
def pair(tmp_path: Path, cluster: EtcdCluster) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from running_pair(tmp_path, cluster)


def ask(server: ServerProcess, name: str, rdtype: str) -> dns.message.Message:
    host, port = server.dns_addr
    return dns.query.udp(dns.message.make_query(name, rdtype, use_edns=0), host, port=port,
                         timeout=5)


def srv(server: ServerProcess, name: str) -> list[tuple[int, str]]:
    reply = ask(server, name, "SRV")
    return [(rr.port, rr.target.to_text()) for rrset in reply.answer
            if rrset.rdtype == dns.rdatatype.SRV for rr in rrset]


def entries(server: ServerProcess) -> dict[str, dict[str, Any]]:
    reply = call(server.url, "GET", "/v1/services")
    assert reply.status == 200, reply.body
    return {s["name"]: s for s in reply.json()["services"]}


def touched_at(cluster: EtcdCluster, revision: int) -> list[str]:
    """The keys under the prefix that the transaction at ``revision`` put."""
    start = PREFIX.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    doc = cluster.any_request("/v3/kv/range", {"key": base64.b64encode(start).decode(),
                                               "range_end": base64.b64encode(end).decode()})
    return sorted(base64.b64decode(kv["key"]).decode() for kv in doc.get("kvs", [])
                  if int(kv["mod_revision"]) == revision)


def test_a_multi_port_mesh_service_through_one_instance_is_answered_by_the_other(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    reply = patch(a, [WEB, svc(1)])
    assert reply.status == 200, reply.body
    revision = reply.json()["revision"]
    web = entries(a)["web"]
    vip, vip6 = web["vip"], web["vip6"]
    assert vip is not None and vip6 is not None  # allocated, one of each for all ports
    # In etcd: the entry under its key (``_`` for the absent zone), one claim per VIP
    # owned by an object; the legacy service exactly as before.
    keys = cluster.keys(PREFIX)
    stored = json.loads(keys[WEB_ETCD])
    assert [p["port"] for p in stored["ports"]] == [8080, 9090]
    assert (stored["vip"], stored["vip_given"]) == (vip, False)
    owner = {"kind": "MeshService", "mesh": "default", "zone": "", "namespace": "shop",
             "name": "web"}
    assert json.loads(keys[PREFIX + "vips/" + vip]) == {"owner": owner}
    assert json.loads(keys[PREFIX + "vips/" + vip6]) == {"owner": owner}
    assert json.loads(keys[PREFIX + "services/shop/s1/80"])["port"] == 80
    # The other instance answers it: A at the port-less name, SRV, per-port names.
    wait_for(lambda: call(b.url, "GET", "/v1/services").etag == f'"{revision}"', 10,
             "b to apply the PATCH")
    assert entries(b)["web"] == web
    assert answers(b, "web.shop.mesh") == [vip]
    aaaa = ask(b, "web.shop.mesh", "AAAA")
    assert [rr.address for rrset in aaaa.answer for rr in rrset] == [vip6]
    assert srv(b, "web.shop.mesh") == [(8080, "web.shop.mesh."), (9090, "web.shop.mesh.")]
    assert srv(b, "_grpc._tcp.web.shop.mesh") == [(9090, "web.shop.mesh.")]
    for port in (8080, 9090):
        assert answers(b, f"web.shop.svc.{port}.mesh") == [vip]
        assert answers(b, f"web_shop_svc_{port}.mesh") == [vip]
    assert ask(b, "web.shop.svc.80.mesh", "A").rcode() == dns.rcode.NXDOMAIN
    assert answers(b, "s1.shop.svc.80.mesh") == [entries(a)["s1"]["vip"]]


def test_a_patch_of_one_mesh_service_is_one_key_applied_as_a_delta_then_deleted(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    others = [{**WEB, "name": f"m{i}", "hostnames": [f"m{i}.shop.mesh"]} for i in range(20)]
    first = patch(a, [WEB, *others, *(svc(i) for i in range(20))])
    assert first.status == 200, first.body
    wait_for(lambda: "web" in entries(b), 10, "b to apply the first PATCH")
    web = entries(b)["web"]
    relists = metric(b, "meshdns_etcd_relists_total")
    relists_a = metric(a, "meshdns_etcd_relists_total")  # (the first write: one listing)
    # A third port on one of 40 entries: one transaction putting that entry's key and the
    # revision key, nothing else (its VIPs stay: no claim is touched).
    changed = patch(a, [{**WEB, "ports": [*WEB["ports"], {"port": 7070, "name": "admin"}]}])
    assert changed.status == 200, changed.body
    revision = changed.json()["revision"]
    assert touched_at(cluster, revision) == [WEB_ETCD, PREFIX + "revision"]
    wait_for(lambda: call(b.url, "GET", "/v1/services").etag == f'"{revision}"', 10,
             "b to apply the change")
    # Applied by b as a delta: no listing of the prefix.
    assert metric(b, "meshdns_etcd_relists_total") == relists
    assert (entries(b)["web"]["vip"], entries(b)["web"]["vip6"]) == (web["vip"], web["vip6"])
    assert srv(b, "_admin._tcp.web.shop.mesh") == [(7070, "web.shop.mesh.")]
    assert answers(b, "web.shop.svc.7070.mesh") == [web["vip"]]
    # The delete, through b: a's copy drops it; its VIP is held under its object owner.
    deleted = patch(b, delete=[WEB_KEY])
    assert deleted.status == 200, deleted.body
    gone = deleted.json()["revision"]
    assert touched_at(cluster, gone) == sorted([PREFIX + "revision",
                                                PREFIX + "vips/" + web["vip"],
                                                PREFIX + "vips/" + web["vip6"]])
    assert WEB_ETCD not in cluster.keys(PREFIX)
    held = json.loads(cluster.keys(PREFIX + "vips/")[PREFIX + "vips/" + web["vip"]])
    assert held == {"owner": {"kind": "MeshService", "mesh": "default", "zone": "",
                              "namespace": "shop", "name": "web"}, "held": True}
    wait_for(lambda: "web" not in entries(a), 10, "a to apply the delete")
    assert ask(a, "web.shop.mesh", "A").rcode() == dns.rcode.NXDOMAIN
    assert metric(a, "meshdns_etcd_relists_total") == relists_a  # deltas all along
    # A newcomer does not get the held VIP; the mesh service coming back does.
    assert patch(a, [svc(99)]).status == 200
    assert entries(a)["s99"]["vip"] != web["vip"]
    assert patch(a, [WEB]).status == 200
    assert entries(a)["web"]["vip"] == web["vip"]


def test_one_vip_for_a_service_and_a_mesh_service_from_two_writers_is_refused(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    assert patch(a, [svc(0)]).status == 200  # the prefix is written
    wait_for(lambda: "s0" in entries(b), 10, "b to apply")
    vip = "240.0.0.200"
    legacy = svc(1, vip=vip)
    mesh = {**WEB, "vip": vip}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda job: patch(*job), [(a, [legacy]), (b, [mesh])]))
    statuses = sorted(r.status for r in replies)
    assert statuses == [200, 409], [r.body for r in replies]
    # One owner in etcd, and on both instances.
    owner = json.loads(cluster.keys(PREFIX + "vips/")[PREFIX + "vips/" + vip])["owner"]
    winner = "s1" if isinstance(owner, list) else "web"
    loser = "web" if winner == "s1" else "s1"
    for server in (a, b):
        wait_for(lambda s=server: winner in entries(s), 10, "the winner everywhere")
        assert loser not in entries(server)
        assert entries(server)[winner]["vip"] == vip
    # Sequentially, through either instance, the other form is refused too.
    again = patch(b if winner == "s1" else a, [mesh if winner == "s1" else legacy])
    assert again.status == 409, again.body


def test_a_restarted_instance_reads_mesh_services_back_from_etcd(
        tmp_path: Path, pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster
) -> None:
    a, b = pair
    given = {**WEB, "name": "given", "hostnames": ["given.shop.mesh"], "vip": "241.0.0.5"}
    zoned = {**WEB, "name": "db", "zone": "east", "namespace": None,
             "hostnames": ["db.east.mesh"]}
    zoned.pop("namespace")
    assert patch(a, [WEB, given, zoned, svc(1)]).status == 200
    wait_for(lambda: len(entries(b)) == 4, 10, "b to apply")
    before = entries(b)
    assert before["given"]["vip6"] is None  # all given: no vip6 allocated
    assert PREFIX + "meshservices/MeshService/default/east/_/db" in cluster.keys(PREFIX)
    b.stop()
    # Its state file gone: what it serves after the restart is etcd's listing.
    (tmp_path / "b" / "state.json").unlink()
    start_listed(b)
    wait_for(lambda: call(b.url, "GET", "/readyz").status == 200, 20, "b ready")
    assert entries(b) == before
    assert answers(b, "web.shop.mesh") == [before["web"]["vip"]]
    assert answers(b, "given.shop.mesh") == ["241.0.0.5"]
    assert answers(b, "db.east.mesh") == [before["db"]["vip"]]
    assert srv(b, "_http._tcp.given.shop.mesh") == [(8080, "given.shop.mesh.")]
    # A write through it after the restart leaves the others as they were.
    assert patch(b, [svc(2)]).status == 200
    after = entries(a)
    assert {k: after[k] for k in before} == before


def test_a_put_larger_than_one_transaction_stages_mesh_services_in_a_generation(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    """The staged large-write path (docs/scaling.md) with mesh services: a PUT over
    registry.etcd.max_txn_ops is staged as a new generation and committed in one small
    transaction; the other instance lists it whole; the keys left right under the
    prefix (a mesh service's included) are collected."""
    small = {"max_txn_ops": 16}
    a = instance(tmp_path, "a", cluster.endpoints, etcd=small)
    b = instance(tmp_path, "b", list(reversed(cluster.endpoints)), etcd=small)
    try:
        start_listed(a)
        start_listed(b)
        assert patch(a, [WEB]).status == 200  # under the prefix itself
        assert WEB_ETCD in cluster.keys(PREFIX)
        many = [{**WEB, "name": f"m{i}", "hostnames": [f"m{i}.shop.mesh"]} for i in range(30)]
        reply = call(a.url, "PUT", "/v1/services",
                     {"services": [*many, svc(1), {**WEB, "vip": "241.0.0.9"}]}, timeout=60)
        assert reply.status == 200, reply.body
        revision = reply.json()["revision"]
        keys = cluster.keys(PREFIX)
        root = PREFIX + keys[PREFIX + "revision"].decode()
        assert root.startswith(PREFIX + "g/")
        stored = [k for k in keys if k.startswith(root + "meshservices/")]
        assert len(stored) == 31
        assert json.loads(keys[root + "vips/241.0.0.9"])["owner"]["name"] == "web"
        wait_for(lambda: call(b.url, "GET", "/v1/services").etag == f'"{revision}"', 30,
                 "b to list the new generation")
        assert entries(b) == entries(a)
        assert answers(b, "m29.shop.mesh") == [entries(a)["m29"]["vip"]]
        assert answers(b, "web.shop.mesh") == ["241.0.0.9"]
        wait_for(lambda: WEB_ETCD not in cluster.keys(PREFIX), 30,
                 "the old root's keys collected")
    finally:
        a.stop()
        b.stop()


def test_an_address_set_to_an_etcd_registry_is_501_and_nothing_is_written(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    """Address sets have no etcd layout yet: a mesh service with endpoints (even an
    empty set, every pod down) and an endpoint patch are refused whole with 501, and
    etcd is left as it was."""
    a, _ = pair
    assert patch(a, [WEB]).status == 200
    before = cluster.keys(PREFIX)
    headless = {"kind": "MeshService", "namespace": "shop", "name": "db",
                "ports": [{"port": 5432, "name": "postgres"}]}
    for endpoints in ([{"address": "10.1.0.5", "name": "db-0"}], []):
        reply = patch(a, [{**headless, "endpoints": endpoints}])
        assert reply.status == 501, reply.body
        assert "address sets" in reply.json()["error"]
    reply = call(a.url, "PATCH", "/v1/services", {"endpoints": [
        {"service": WEB_KEY, "upsert": [{"address": "10.1.0.9"}]}]})
    assert reply.status == 501, reply.body
    assert cluster.keys(PREFIX) == before
