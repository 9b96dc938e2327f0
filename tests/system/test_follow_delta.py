"""Follow by deltas (issue 15): ``GET /v1/services?since=N``, followers that apply them,
relays that pass them on, coalescing and gzip. Leader, relay and followers are real
``python -m meshdns serve`` processes on loopback."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ..apiclient import ServerProcess, a_records, call, wait_for
from ..support import DEMO_SERVICES

LINEAGE = "x-meshdns-lineage"


def leader_process(tmp: Path, name: str = "leader", **api: Any) -> ServerProcess:
    seed = tmp / name / "seed.yaml"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    return ServerProcess(tmp / name, {"registry": {"seed_file": str(seed)}, "api": api},
                         name=name)


def follower_process(tmp: Path, leader: ServerProcess, name: str, **api: Any
                     ) -> ServerProcess:
    return ServerProcess(tmp / name, {"registry": {"follow": leader.url}, "api": api},
                         name=name)


@pytest.fixture
def procs() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in reversed(started):
        if proc.proc is not None and proc.proc.poll() is None:
            os.kill(proc.proc.pid, signal.SIGCONT)  # a test may leave one stopped
        proc.stop()


def start(procs: list[ServerProcess], proc: ServerProcess) -> ServerProcess:
    procs.append(proc)
    return proc.start()


def listing(url: str) -> tuple[int, list[dict[str, Any]]]:
    """The full GET, services in key order: deltas reproduce the set of services (with
    their VIPs and host names) and the revision; the list order is no part of it."""
    reply = call(url, "GET", "/v1/services")
    assert reply.status == 200, reply.body
    doc = reply.json()
    return doc["revision"], sorted(doc["services"],
                                   key=lambda s: (s["name"], s["namespace"], s["port"]))


def metric(url: str, name: str, **labels: str) -> float:
    text = call(url, "GET", "/metrics").body.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def in_step(leader: ServerProcess, *followers: ServerProcess, timeout: float = 30) -> None:
    """Wait until every follower serves the leader's revision, then compare exactly."""
    want = listing(leader.url)
    for f in followers:
        wait_for(lambda f=f: listing(f.url)[0] == want[0], timeout,  # type: ignore[misc]
                 f"{f.name} to reach revision {want[0]}")
        assert listing(f.url) == want


def patch(url: str, upsert: list[dict[str, Any]] | None = None,
          delete: list[dict[str, Any]] | None = None) -> int:
    return call(url, "PATCH", "/v1/services", {"upsert": upsert or [],
                                                "delete": delete or []}).status


# ---------------------------------------------------------------- random changes


NAMES = [f"s{i}" for i in range(10)]


def random_service(rng: random.Random) -> dict[str, Any]:
    svc: dict[str, Any] = {"name": rng.choice(NAMES), "namespace": rng.choice(["a", "b"]),
                           "port": rng.choice([80, 8080])}
    if rng.random() < 0.25:
        svc["vip"] = f"240.1.{rng.randrange(3)}.{rng.randrange(1, 20)}"
    if rng.random() < 0.2:
        svc["vip6"] = f"fd00:fd00::1:{rng.randrange(1, 40):x}"
    if rng.random() < 0.3:
        svc["hostnames"] = [f"h{rng.randrange(5)}.example.com"]
    return svc


def random_write(url: str, rng: random.Random) -> int:
    key = ("name", "namespace", "port")
    if rng.random() < 0.1:  # a whole PUT: rewrites many at once, some VIPs given
        chosen = {tuple(s[k] for k in key): s for s in
                  (random_service(rng) for _ in range(rng.randrange(0, 12)))}
        return call(url, "PUT", "/v1/services", {"services": list(chosen.values())}).status
    upserts = {tuple(s[k] for k in key): s for s in
               (random_service(rng) for _ in range(rng.randrange(0, 4)))}
    # A PATCH may not upsert and delete one service (400): delete only other keys.
    deletes = [{k: s[k] for k in key} for s in
               (random_service(rng) for _ in range(rng.randrange(0, 3)))
               if tuple(s[k] for k in key) not in upserts]
    return patch(url, list(upserts.values()), deletes)


def test_deltas_applied_by_a_follower_equal_a_full_relist(tmp_path: Path,
                                                          procs: list[ServerProcess]) -> None:
    leader = start(procs, leader_process(tmp_path))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    in_step(leader, follower)
    applied = 0
    for seed in range(3):
        rng = random.Random(seed)
        for _ in range(12):
            # A batch of writes, some rejected (a taken VIP or host name: 409), then
            # the follower must hold exactly what a full read of the leader lists.
            for _ in range(rng.randrange(1, 6)):
                assert random_write(leader.url, rng) in (200, 409)
            in_step(leader, follower)
            applied += 1
    revision, services = listing(leader.url)
    assert revision > 20 and services
    # It got there by deltas: one full read at the start, no re-list since.
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    assert metric(follower.url, "meshdns_follow_relists_total") == 0
    assert metric(follower.url, "meshdns_follow_deltas_total") >= applied // 2
    # ... and DNS answers from it: each A record is the leader's VIP.
    for svc in services[:5]:
        name = f"{svc['name']}.{svc['namespace']}.svc.{svc['port']}.mesh"
        assert a_records(follower.dns_addr, name) == [svc["vip"]]


# ---------------------------------------------------------------- the protocol itself


def test_since_answers_the_changes_410_and_400(tmp_path: Path,
                                               procs: list[ServerProcess]) -> None:
    leader = start(procs, leader_process(tmp_path, follow_history=5))
    full = call(leader.url, "GET", "/v1/services")
    lineage = full.headers[LINEAGE]
    rev = full.json()["revision"]
    base = f"/v1/services?lineage={lineage}&since="

    nothing = call(leader.url, "GET", f"{base}{rev}&wait=0")
    assert nothing.status == 200
    assert nothing.json() == {"revision": rev, "lineage": lineage, "upsert": [], "delete": []}

    assert patch(leader.url, [{"name": "new", "namespace": "ns", "port": 81,
                               "hostnames": ["new.example.com"]}],
                 [{"name": "redis", "namespace": "cache", "port": 6379}]) == 200
    delta = call(leader.url, "GET", f"{base}{rev}")
    assert delta.status == 200 and delta.headers[LINEAGE] == lineage
    new = next(s for s in listing(leader.url)[1] if s["name"] == "new")
    assert delta.json() == {"revision": rev + 1, "lineage": lineage, "upsert": [new],
                            "delete": [{"name": "redis", "namespace": "cache", "port": 6379}]}
    assert delta.etag == f'"{rev + 1}"'

    ahead = call(leader.url, "GET", f"{base}{rev + 5}")
    assert ahead.status == 410 and ahead.json()["field"] == "since"
    assert ahead.headers[LINEAGE] == lineage
    other = call(leader.url, "GET", f"/v1/services?since={rev}&lineage=0123456789abcdef")
    assert other.status == 410 and "lineage" in other.json()["error"]
    bad = call(leader.url, "GET", "/v1/services?since=-1")
    assert bad.status == 400 and bad.json()["field"] == "since"
    # The history keeps follow_history (5) revisions: older is gone, the edge is not.
    for i in range(6):
        assert patch(leader.url, [{"name": f"n{i}", "namespace": "ns", "port": 80}]) == 200
    now = rev + 7
    old = call(leader.url, "GET", f"{base}{rev}")
    assert old.status == 410 and "history" in old.json()["error"]
    edge = call(leader.url, "GET", f"{base}{now - 5}")
    assert edge.status == 200 and edge.json()["revision"] == now
    assert sorted(s["name"] for s in edge.json()["upsert"]) == ["n1", "n2", "n3", "n4", "n5"]
    assert metric(leader.url, "meshdns_sync_requests_total", op="delta", code="410") == 3


def test_big_bodies_are_gzipped_once_asked(tmp_path: Path, procs: list[ServerProcess]) -> None:
    leader = start(procs, leader_process(tmp_path))
    rev = listing(leader.url)[0]
    assert patch(leader.url, [{"name": f"svc{i}", "namespace": "ns", "port": 80}
                              for i in range(60)]) == 200
    plain = call(leader.url, "GET", "/v1/services")
    packed = call(leader.url, "GET", "/v1/services", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert gzip.decompress(packed.body) == plain.body and len(packed.body) < len(plain.body)
    refused = call(leader.url, "GET", "/v1/services", headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers and refused.body == plain.body
    big = call(leader.url, "GET", f"/v1/services?since={rev}",
               headers={"Accept-Encoding": "gzip, deflate"})
    assert big.headers["content-encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(big.body))["upsert"]) == 60
    small = call(leader.url, "GET", f"/v1/services?since={rev + 1}",
                 headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # an empty delta fits a packet as it is


# ---------------------------------------------------------------- falling behind, lineage


def test_a_follower_behind_the_history_relists(tmp_path: Path,
                                               procs: list[ServerProcess]) -> None:
    # No coalescing: the long-poll parked when the follower stops is answered with the
    # first change alone, so the next one asks from a revision the history dropped.
    # Long-polls only (api.streams false): a watch stream would carry every change to
    # the stopped follower; test_follow_stream.py has a stream falling behind.
    leader = start(procs, leader_process(tmp_path, follow_history=3, follow_coalesce=0,
                                         streams=False))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    in_step(leader, follower)
    assert follower.proc is not None
    os.kill(follower.proc.pid, signal.SIGSTOP)
    try:
        for i in range(12):
            assert patch(leader.url, [{"name": f"late{i}", "namespace": "ns", "port": 80}]) \
                == 200
    finally:
        os.kill(follower.proc.pid, signal.SIGCONT)
    in_step(leader, follower)
    assert metric(follower.url, "meshdns_follow_relists_total") == 1
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 2
    assert metric(leader.url, "meshdns_sync_requests_total", op="delta", code="410") == 1
    # Back on deltas afterwards.
    deltas = metric(follower.url, "meshdns_follow_deltas_total")
    assert patch(leader.url, [{"name": "after", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, follower)
    assert metric(follower.url, "meshdns_follow_deltas_total") == deltas + 1
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 2


def test_a_leader_back_at_the_same_revision_with_another_registry_is_relisted(
        tmp_path: Path, procs: list[ServerProcess]) -> None:
    """The leader loses its registry (no state file), restarts from its seed and is
    written back up to the very revision the follower holds, with other contents:
    only the lineage tells the follower that its revision means something else now."""
    leader = start(procs, leader_process(tmp_path))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    for i in range(3):
        assert patch(leader.url, [{"name": f"old{i}", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, follower)
    revision, before = listing(leader.url)
    assert follower.proc is not None
    os.kill(follower.proc.pid, signal.SIGSTOP)  # it must not look while the leader is away
    try:
        leader.kill()
        leader.start()
        for i in range(3):
            assert patch(leader.url, [{"name": f"other{i}", "namespace": "ns", "port": 80}]) \
                == 200
        assert listing(leader.url)[0] == revision and listing(leader.url)[1] != before
    finally:
        os.kill(follower.proc.pid, signal.SIGCONT)
    wait_for(lambda: listing(follower.url) == listing(leader.url), 60,
             "the follower to re-list the new leader")
    assert metric(follower.url, "meshdns_follow_relists_total") == 1


# ---------------------------------------------------------------- relays


def test_a_relay_forwards_deltas(tmp_path: Path, procs: list[ServerProcess]) -> None:
    # The relay serves long-polls (api.streams false), counted one per delta below;
    # test_follow_stream.py has a relay serving a watch stream.
    leader = start(procs, leader_process(tmp_path))
    relay = start(procs, follower_process(tmp_path, leader, "relay", streams=False))
    follower = start(procs, follower_process(tmp_path, relay, "follower"))
    in_step(leader, relay, follower)
    lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    # The relay serves the leader's lineage and revisions.
    assert call(relay.url, "GET", "/v1/services").headers[LINEAGE] == lineage
    rng = random.Random(7)
    for _ in range(15):
        assert random_write(leader.url, rng) in (200, 409)
        in_step(leader, relay, follower)
    # Both hops went by deltas: one full read each, at the start.
    for f in (relay, follower):
        assert metric(f.url, "meshdns_follow_full_syncs_total") == 1
        assert metric(f.url, "meshdns_follow_deltas_total") >= 5
    assert metric(relay.url, "meshdns_sync_requests_total", op="get", code="200") >= 1
    assert metric(relay.url, "meshdns_sync_requests_total", op="delta", code="200") >= 5
    assert metric(relay.url, "meshdns_sync_requests_total", op="delta", code="410") == 0


# ---------------------------------------------------------------- coalescing


async def _burst(url: str, count: int, parallel: int) -> None:
    async with aiohttp.ClientSession() as session:
        queue = list(range(count))

        async def sender() -> None:
            while queue:
                i = queue.pop()
                body = {"upsert": [{"name": f"b{i}", "namespace": "burst", "port": 80}]}
                async with session.patch(f"{url}/v1/services", json=body) as resp:
                    assert resp.status == 200, await resp.text()

        await asyncio.gather(*(sender() for _ in range(parallel)))


def test_a_burst_of_1000_patches_reaches_followers_as_a_few_deltas(
        tmp_path: Path, procs: list[ServerProcess]) -> None:
    window = 0.5
    leader = start(procs, leader_process(tmp_path, follow_coalesce=window))
    followers = [start(procs, follower_process(tmp_path, leader, f"f{i}")) for i in range(3)]
    in_step(leader, *followers)
    before = [metric(f.url, "meshdns_follow_deltas_total") for f in followers]
    began = time.monotonic()
    asyncio.run(_burst(leader.url, 1000, 20))
    took = time.monotonic() - began
    in_step(leader, *followers, timeout=60)
    assert listing(leader.url)[0] == 1 + 1000  # seed revision 1, one revision per PATCH
    # Each answer waits a window after the first change it carries, so the next one
    # starts after it: a burst lasting `took` seconds is at most took/window + 1 deltas
    # (whatever speed this machine writes at), not one per PATCH.
    bound = int(took / window) + 2
    for f, n in zip(followers, before, strict=True):
        got = metric(f.url, "meshdns_follow_deltas_total") - n
        assert 1 <= got <= bound, (f.name, got, took)
        assert metric(f.url, "meshdns_follow_full_syncs_total") == 1


# ---------------------------------------------------------------- the history's bounds


def test_history_is_bounded_in_revisions_and_keys() -> None:
    from meshdns.core.registry import (
        Registry,
        RegistryPolicy,
        apply_patch,
        apply_put,
        parse_services,
    )
    from meshdns.history import MIN_KEYS, ChangeHistory

    policy = RegistryPolicy()

    def put(base: Registry, names: list[str]) -> Registry:
        return apply_put(base, parse_services(
            [{"name": n, "namespace": "ns", "port": 80} for n in names]), policy, 0.0)

    def upsert(base: Registry, name: str) -> Registry:
        return apply_patch(base, parse_services([{"name": name, "namespace": "ns",
                                                  "port": 80}]), [], policy, 0.0)

    history = ChangeHistory(depth=4, lineage="L")
    reg = put(Registry.empty(), ["a", "b"])
    history.record(None, reg)  # a first load: deltas start here
    assert history.oldest == reg.revision and history.since(reg.revision, "L") is not None
    start = reg.revision
    for i in range(6):
        new = upsert(reg, f"n{i}")
        history.record(reg, new)
        reg = new
    assert history.revision == start + 6 and history.oldest == start + 2  # 4 revisions kept
    assert history.since(start + 1) is None and history.since(start + 7) is None
    changes = history.since(start + 3)
    assert changes is not None and changes.keys == {("n3", "ns", 80), ("n4", "ns", 80),
                                                    ("n5", "ns", 80)}
    assert history.since(start + 3, "other") is None
    # A write that changes more keys than the registry holds drops what came before.
    big = put(reg, [f"m{i}" for i in range(MIN_KEYS + 10)])
    history.record(reg, big)
    assert history.oldest == big.revision and history.since(reg.revision) is None
    # A snapshot that does not follow the last one recorded starts over too.
    history.record(reg, upsert(reg, "gap"))
    assert history.oldest == history.revision
    # Adopting another lineage (a relay's leader changed) starts over under it.
    history.adopt_lineage("M", big)
    assert history.lineage == "M" and history.since(big.revision, "M") is not None
    assert history.since(big.revision, "L") is None
