"""The registry in etcd, end to end: a real 3-member etcd cluster on loopback, meshdns
instances as real processes, DNS asked with dnspython, the API over HTTP.

Writes through any instance are etcd transactions answered by every instance, with
the same VIPs; concurrent writers never give one VIP twice; conflicts, exhaustion
and oversized writes answer as the contract says. (Faults: test_etcd_faults.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..apiclient import ServerProcess, call, wait_for
from ..etcd_cluster import EtcdCluster, make_tls
from ..etcd_support import (
    PREFIX,
    answers,
    instance,
    name_of,
    patch,
    running_cluster,
    running_pair,
    start_listed,
    svc,
    vips,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from running_cluster(tmp_path)


@pytest.fixture
def pair(tmp_path: Path, cluster: EtcdCluster) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from running_pair(tmp_path, cluster)


# ------------------------------------------------------------------ writes and reads


def test_put_through_one_is_answered_by_the_other_with_the_same_vips(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    services = [svc(i) for i in range(1000)]
    reply = call(a.url, "PUT", "/v1/services", {"services": services}, timeout=60)
    assert reply.status == 200, reply.body
    revision = reply.json()["revision"]
    assert reply.etag == f'"{revision}"'
    # Read-your-writes on the instance that took the write: answered at once.
    on_a = vips(a)
    assert len(on_a) == 1000
    assert answers(a, name_of(services[999])) == [on_a[("s999", "shop", 80)][0]]
    # The other instance: the same registry, revision and VIPs, soon.
    wait_for(lambda: call(b.url, "GET", "/v1/services").etag == f'"{revision}"', 10,
             "b to apply the PUT")
    assert vips(b) == on_a
    for i in (0, 500, 999):
        assert answers(b, name_of(services[i])) == [on_a[(f"s{i}", "shop", 80)][0]]
    # One key per service, one claim per VIP, in etcd itself (under the generation the
    # revision key names: a write larger than one transaction is a new one).
    keys = cluster.keys(PREFIX)
    root = PREFIX + keys[PREFIX + "revision"].decode()
    assert len([k for k in keys if k.startswith(root + "services/")]) == 1000
    stored = json.loads(keys[root + "services/shop/s7/80"])
    assert (stored["vip"], stored["vip6"]) == on_a[("s7", "shop", 80)]
    claim = json.loads(keys[root + "vips/" + stored["vip"]])
    assert claim == {"owner": ["s7", "shop", 80]}
    # A PUT of the same registry changes nothing, and says so with the same revision.
    again = call(b.url, "PUT", "/v1/services", {"services": services}, timeout=60)
    assert again.status == 200 and again.json()["revision"] == revision


def test_delete_holds_the_vip_on_a_lease_and_if_match_is_the_registry_revision(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    assert patch(a, [svc(1), svc(2)]).status == 200
    before = vips(a)
    first = call(a.url, "GET", "/v1/services").etag
    assert first is not None
    deleted = patch(b, delete=[{"name": "s1", "namespace": "shop", "port": 80}],
                    )
    assert deleted.status == 200, deleted.body
    vip = before[("s1", "shop", 80)][0]
    claim = json.loads(cluster.keys(PREFIX + "vips/")[PREFIX + "vips/" + vip])
    assert claim == {"owner": ["s1", "shop", 80], "held": True}
    # A newcomer (through the other instance) does not get the held VIP ...
    wait_for(lambda: ("s1", "shop", 80) not in vips(a), 10, "a to apply the delete")
    assert patch(a, [svc(3)]).status == 200
    assert vips(a)[("s3", "shop", 80)][0] != vip
    # ... but the deleted identity coming back gets it again.
    assert patch(b, [svc(1)]).status == 200
    assert vips(b)[("s1", "shop", 80)][0] == vip
    # If-Match with a revision that is no longer current: 412, nothing written.
    stale = call(a.url, "PATCH", "/v1/services", {"upsert": [svc(9)]},
                 headers={"If-Match": first})
    assert stale.status == 412, stale.body
    assert ("s9", "shop", 80) not in vips(a)
    current = call(b.url, "GET", "/v1/services").etag
    assert current is not None
    wait_for(lambda: call(a.url, "GET", "/v1/services").etag == current, 10, "a in sync")
    ok = call(a.url, "PATCH", "/v1/services", {"upsert": [svc(9)]},
              headers={"If-Match": current})
    assert ok.status == 200, ok.body


def test_dns_workers_answer_from_the_main_process_copy(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    """With dns.workers the main process watches etcd and its workers follow it (as
    without etcd): a write is answered once every DNS process serves it."""
    from .test_workers import _udp_owners, from_every_cpu

    a = instance(tmp_path, "workers", cluster.endpoints, dns={"workers": 2})
    try:
        start_listed(a)
        # Workers start serving with the main process's first registry: the prefix's.
        assert call(a.url, "PUT", "/v1/services", {"services": []}).status == 200
        wait_for(lambda: _udp_owners(a.dns_port) == 2, 30, "the worker to bind the port")
        for i in range(10):
            assert patch(a, [svc(i)]).status == 200
            vip = vips(a)[(f"s{i}", "shop", 80)][0]
            # Read-your-writes in every process (queries sent from every CPU, so both
            # the main process and the worker are asked), right after the 200.
            for reply in from_every_cpu(a.dns_port, name_of(svc(i))):
                assert [rr.address for rrset in reply.answer for rr in rrset] == [vip]
        assert "exited" not in a.log()
    finally:
        a.stop()


def test_a_write_larger_than_etcd_takes_in_one_transaction_is_413(tmp_path: Path) -> None:
    # registry.etcd.max_txn_ops says etcd takes more than it does (etcd's default, 128):
    # a write meshdns thinks fits in one transaction is refused whole, and named.
    c = EtcdCluster(tmp_path / "etcd-small", 1, max_txn_ops=128)  # etcd's default
    a = instance(tmp_path, "small-txn", c.endpoints, etcd={"max_txn_ops": 5000})
    try:
        c.start()
        start_listed(a)
        assert patch(a, [svc(i) for i in range(10)]).status == 200  # ~30 operations
        big = call(a.url, "PUT", "/v1/services", {"services": [svc(i) for i in range(100)]})
        assert big.status == 413, big.body
        assert "--max-txn-ops" in big.json()["error"]
        assert len(vips(a)) == 10  # nothing of it was written
        assert len([k for k in c.keys(PREFIX) if "/services/" in k]) == 10
    finally:
        a.stop()
        c.stop()


def test_a_follower_of_an_instance_gets_etcds_registry_and_metrics_pass_promtool(
        tmp_path: Path, pair: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = pair
    follower = ServerProcess(tmp_path / "f", {"registry": {"follow": b.url}}, name="f")
    try:
        follower.start(ready=False)
        assert patch(a, [svc(1, hostnames=["one.example.com"])]).status == 200
        reg = call(a.url, "GET", "/v1/services")
        wait_for(lambda: call(follower.url, "GET", "/v1/services").etag == reg.etag, 20,
                 "the follower to adopt etcd's registry through b")
        assert vips(follower) == vips(a)
        assert answers(follower, "one.example.com") == [vips(a)[("s1", "shop", 80)][0]]
        text = call(a.url, "GET", "/metrics").body.decode()
        assert "meshdns_etcd_write_commits_total 1.0" in text
        assert "meshdns_etcd_connected 1.0" in text
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        follower.stop()


def test_conflicts_and_exhaustion_answer_as_without_etcd(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    a = instance(tmp_path, "small", cluster.endpoints, cidr="10.9.0.0/29", cidr6=None)
    try:
        start_listed(a)
        assert patch(a, [svc(1, vip="10.9.0.1")]).status == 200
        taken = patch(a, [svc(2, vip="10.9.0.1")])
        assert taken.status == 409 and taken.json()["field"] == "upsert[0].vip"
        # 6 usable addresses in a /29: 5 more fit, a 7th does not.
        assert patch(a, [svc(i) for i in range(2, 7)]).status == 200
        full = patch(a, [svc(7)])
        assert full.status == 507, full.body
        assert len(vips(a)) == 6
        assert sorted(v for v, _ in vips(a).values()) == [f"10.9.0.{i}" for i in range(1, 7)]
    finally:
        a.stop()


def test_concurrent_creates_through_both_instances_never_share_a_vip(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair

    def create(i: int) -> tuple[int, bytes]:
        reply = patch(a if i % 2 else b, [svc(i, ns="race")], timeout=120)
        return reply.status, reply.body

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(create, range(200)))
    assert [r for r in replies if r[0] != 200] == []
    on_a = vips(a)
    wait_for(lambda: vips(b) == on_a, 10, "both instances to agree")
    assert len(on_a) == 200
    v4 = [v for v, _ in on_a.values()]
    v6 = [v for _, v in on_a.values()]
    assert len(set(v4)) == 200 and len(set(v6)) == 200
    # In etcd: exactly one claim per VIP, owned by the service that has it.
    claims = {k.removeprefix(PREFIX + "vips/"): json.loads(v)["owner"]
              for k, v in cluster.keys(PREFIX + "vips/").items()}
    assert len(claims) == 400
    for (name, ns, port), (v4, v6) in on_a.items():
        assert claims[v4] == claims[v6] == [name, ns, port]
    for i in (0, 1, 199):
        expected = [on_a[(f"s{i}", "race", 80)][0]]
        assert answers(a, name_of(svc(i, ns="race"))) == expected
        assert answers(b, name_of(svc(i, ns="race"))) == expected


# ------------------------------------------------------------------ TLS and authentication


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    c = EtcdCluster(tmp_path / "etcd-tls", 1, tls=tls)
    ok = instance(tmp_path, "tls", c.endpoints, etcd={
        "ca_file": str(tls.ca), "cert_file": str(tls.client_cert),
        "key_file": str(tls.client_key)})
    no_cert = instance(tmp_path, "nocert", c.endpoints, etcd={"ca_file": str(tls.ca)})
    try:
        c.start()
        assert c.endpoints[0].startswith("https://")
        start_listed(ok)
        assert patch(ok, [svc(1)]).status == 200
        vip = vips(ok)[("s1", "shop", 80)][0]
        assert answers(ok, name_of(svc(1))) == [vip]
        assert json.loads(c.keys(PREFIX + "services/")[PREFIX + "services/shop/s1/80"])[
            "vip"] == vip
        # etcd requires a client certificate: without one nothing is read or written.
        no_cert.start(ready=False)
        wait_for(lambda: "etcd:" in no_cert.log(), 20, "the refused connection to be logged")
        assert call(no_cert.url, "GET", "/readyz").status == 503
        assert patch(no_cert, [svc(2)], timeout=30).status == 503
    finally:
        ok.stop()
        no_cert.stop()
        c.stop()


def test_username_and_password(tmp_path: Path) -> None:
    c = EtcdCluster(tmp_path / "etcd-auth", 1)
    good = instance(tmp_path, "good", c.endpoints,
                    etcd={"username": "meshdns", "password": "s3cret"})
    bad = instance(tmp_path, "bad", c.endpoints,
                   etcd={"username": "meshdns", "password": "wrong"})
    try:
        c.start()
        etcdctl = ["etcdctl", "--endpoints", c.endpoints[0]]
        for args in (["user", "add", "root", "--new-user-password", "rootpw"],
                     ["user", "grant-role", "root", "root"],
                     ["user", "add", "meshdns", "--new-user-password", "s3cret"],
                     ["role", "add", "meshdns"],
                     ["role", "grant-permission", "meshdns", "readwrite", PREFIX,
                      "--prefix=true"],
                     ["user", "grant-role", "meshdns", "meshdns"],
                     ["auth", "enable"]):
            subprocess.run(etcdctl + args, check=True, capture_output=True, timeout=30,
                           env={**os.environ, "ETCDCTL_API": "3"})
        start_listed(good)
        assert patch(good, [svc(1)]).status == 200
        assert answers(good, name_of(svc(1))) == [vips(good)[("s1", "shop", 80)][0]]
        bad.start(ready=False)
        wait_for(lambda: "authentication failed" in bad.log(), 20, "the refusal to be logged")
        assert call(bad.url, "GET", "/readyz").status == 503
    finally:
        good.stop()
        bad.stop()
        c.stop()


# ------------------------------------------------------------------ in-process: a lagging copy
#
# Instance A's watch is slowed down on purpose (each response applied 1.5 s late), so
# its copy lags what instance B just wrote. What A answers must not depend on that.


def lagging_pair(tmp_path: Path, endpoints: list[str]) -> Any:
    """Two EtcdRegistry backends in this process (each with its own store) and the
    registry policy; call ``slow(a)`` to delay a's watch."""
    from meshdns.config import parse_config
    from meshdns.core.answer import MessageHandler, Zone
    from meshdns.core.registry import Registry
    from meshdns.etcd.backend import EtcdRegistry
    from meshdns.settings import registry_policy, zone_settings
    from meshdns.store import RegistryStore

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("")
    cfg = parse_config({"dns": {"resolv_conf": str(resolv)}, "registry": {"etcd": {
        "endpoints": endpoints, "request_timeout": 5}}}, env={})
    policy = registry_policy(cfg)

    def backend() -> EtcdRegistry:
        settings = zone_settings(cfg, forwarding=False)
        store = RegistryStore(policy, settings, MessageHandler(Zone(Registry.empty(), settings)))
        return EtcdRegistry(store, policy, cfg.registry)

    return backend(), backend(), policy


async def started(*backends: Any) -> None:
    for x in backends:
        x.start()
    for x in backends:
        assert await x.mirror.wait_until(lambda x=x: x.mirror.state is not None, 10)


def slow(backend: Any) -> None:
    applied = backend.mirror._apply

    async def late(events: list[dict[str, Any]]) -> None:
        await asyncio.sleep(1.5)
        await applied(events)

    backend.mirror._apply = late


def test_if_match_with_an_etag_from_another_instance_waits_for_this_copy(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    """An ETag read from B names a revision A's copy does not have yet: A catches up
    with etcd before judging If-Match, so that ETag is not a 412."""
    from meshdns.core.registry import Registry, ServiceSpec, apply_patch

    a, b, policy = lagging_pair(tmp_path, cluster.endpoints)

    def add(name: str) -> Any:
        return lambda base: apply_patch(base, [ServiceSpec(name, "ns", 80)], [], policy, 0.0)

    async def scenario() -> tuple[int, int, list[str]]:
        await started(a, b)
        try:
            slow(a)
            want = (await b.write(add("from-b"))).revision
            assert a.store.revision < want  # A has not seen it yet

            def if_match(base: Registry) -> None:
                if base.revision != want:
                    raise ValueError(f"412: {base.revision} != {want}")

            result = await a.write(add("from-a"), check=if_match)
            return want, result.revision, sorted(k[0] for k in result.services)
        finally:
            await a.stop()
            await b.stop()

    want, revision, names = asyncio.run(scenario())
    assert revision > want
    assert names == ["from-a", "from-b"]


def test_a_lagging_copy_neither_drops_a_delete_nor_refuses_a_freed_host_name(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    """B creates s1 and A, not having seen it, is asked to delete it: a 200 must mean it
    is gone. B deletes s2 (host name shared.example.com) and A, still holding s2 in its
    copy, is asked to give that name to s3: no 409."""
    from meshdns.core.registry import ServiceSpec, apply_patch

    a, b, policy = lagging_pair(tmp_path, cluster.endpoints)
    s2 = ServiceSpec("s2", "ns", 80, hostnames=("shared.example.com",))
    s3 = ServiceSpec("s3", "ns", 80, hostnames=("shared.example.com",))

    def change(upserts: list[Any], deletes: list[tuple[str, str, int]]) -> Any:
        return lambda base: apply_patch(base, upserts, deletes, policy, 0.0)

    async def scenario() -> list[str]:
        await started(a, b)
        try:
            await a.write(change([s2], []))
            slow(a)
            await b.write(change([ServiceSpec("s1", "ns", 80)], []))
            assert ("s1", "ns", 80) not in a.store.registry.services
            await a.write(change([], [("s1", "ns", 80)]))
            await b.mirror.wait_until(lambda: b.mirror.write_revision
                                      >= a.mirror.write_revision, 10)
            await b.write(change([], [("s2", "ns", 80)]))
            assert ("s2", "ns", 80) in a.store.registry.services
            await a.write(change([s3], []))
            return sorted(k for k in cluster.keys("/meshdns/services/"))
        finally:
            await a.stop()
            await b.stop()

    assert asyncio.run(scenario()) == ["/meshdns/services/ns/s3/80"]
