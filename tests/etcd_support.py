"""Shared pieces of the etcd tests: a running 3-member cluster and a pair of meshdns
instances on it (each test module turns them into fixtures), instances configured
for a cluster, and small helpers to write, read and ask DNS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .apiclient import ServerProcess, a_records, call, wait_for
from .etcd_cluster import EtcdCluster

PREFIX = "/meshdns/"


def running_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd", 3)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def instance(tmp_path: Path, name: str, endpoints: list[str], *,
             dns: dict[str, Any] | None = None, **registry: Any) -> ServerProcess:
    etcd = {"endpoints": endpoints, "request_timeout": 3.0, "dial_timeout": 0.5}
    etcd.update(registry.pop("etcd", {}))
    cfg = {"registry": {"etcd": etcd, "state_file": str(tmp_path / name / "state.json"),
                        **registry},
           "dns": dns or {}, "log": {"level": "info"}}
    return ServerProcess(tmp_path / name, cfg, name=name)


def start_listed(server: ServerProcess) -> ServerProcess:
    """Started, and its first listing of the prefix done (it logs it). Not ready yet when
    nothing was written under the prefix (test_etcd_unwritten): the first write makes
    every instance on it ready. For a first start (a restart logs the line again)."""
    server.start(ready=False)
    wait_for(lambda: "etcd: listed" in server.log(), 20, f"{server.name} to list etcd")
    return server


def running_pair(tmp_path: Path, cluster: EtcdCluster
                 ) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a = instance(tmp_path, "a", cluster.endpoints)
    b = instance(tmp_path, "b", list(reversed(cluster.endpoints)))
    try:
        start_listed(a)
        start_listed(b)
        yield a, b
    finally:
        a.stop()
        b.stop()


def svc(i: int, ns: str = "shop", **extra: Any) -> dict[str, Any]:
    return {"name": f"s{i}", "namespace": ns, "port": 80, **extra}


def name_of(s: dict[str, Any]) -> str:
    return f"{s['name']}.{s['namespace']}.svc.{s['port']}.mesh"


def vips(server: ServerProcess) -> dict[tuple[str, str, int], tuple[str, str | None]]:
    reply = call(server.url, "GET", "/v1/services")
    assert reply.status == 200, reply.body
    return {(s["name"], s["namespace"], s["port"]): (s["vip"], s["vip6"])
            for s in reply.json()["services"]}


def patch(server: ServerProcess, upsert: list[dict[str, Any]] | None = None,
          delete: list[dict[str, Any]] | None = None, timeout: float = 60.0) -> Any:
    return call(server.url, "PATCH", "/v1/services",
                {"upsert": upsert or [], "delete": delete or []}, timeout=timeout)


def answers(server: ServerProcess, name: str) -> list[str]:
    return a_records(server.dns_addr, name)


def metric(server: ServerProcess, name: str) -> float:
    for line in call(server.url, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}")
