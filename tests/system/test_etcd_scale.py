"""The registry in etcd at registry scale, on an etcd with its default flags (128
operations and 1.5 MiB per transaction): PUTs far larger than one transaction
(staged as a new generation, committed by one small transaction), a writer killed
halfway, two large PUTs at once, a write through an election, and etcd's NOSPACE
alarm. A real 3-member etcd cluster on loopback, meshdns processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..apiclient import Reply, ServerProcess, call, wait_for
from ..etcd_cluster import EtcdCluster
from ..etcd_support import PREFIX, answers, instance, name_of, patch, start_listed, svc, vips


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd", 3, stock=True)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def pair_on(tmp_path: Path, cluster: EtcdCluster, **registry: Any
            ) -> tuple[ServerProcess, ServerProcess]:
    a = instance(tmp_path, "a", cluster.endpoints, **registry)
    b = instance(tmp_path, "b", list(reversed(cluster.endpoints)), **registry)
    start_listed(a)
    start_listed(b)
    return a, b


@pytest.fixture
def pair(tmp_path: Path, cluster: EtcdCluster) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a, b = pair_on(tmp_path, cluster)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def put(server: ServerProcess, services: list[dict[str, Any]], timeout: float = 600) -> Reply:
    return call(server.url, "PUT", "/v1/services", {"services": services}, timeout=timeout)


def many(n: int, ns: str = "shop") -> list[dict[str, Any]]:
    return [svc(i, ns) for i in range(n)]


def keys_of(services: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    return {(s["name"], s["namespace"], s["port"]) for s in services}


def unique_vips(table: dict[tuple[str, str, int], tuple[str, str | None]]) -> None:
    v4 = [v for v, _ in table.values()]
    v6 = [v for _, v in table.values() if v is not None]
    assert len(set(v4)) == len(v4) and len(set(v6)) == len(v6), "a VIP given twice"


def garbage(cluster: EtcdCluster) -> int:
    """Keys of generations other than the registry's, and staging markers."""
    current = cluster.keys(PREFIX + "revision").get(PREFIX + "revision", b"").decode()
    gens = cluster.keys(PREFIX + "gens/")
    other = cluster.count(PREFIX + "g/") - (cluster.count(PREFIX + current) if current else 0)
    legacy = cluster.count(PREFIX + "services/") + cluster.count(PREFIX + "vips/") \
        if current else 0
    return len(gens) + other + legacy


# ------------------------------------------------------------------ size


@pytest.mark.timeout(900)  # 100,000 services through a 3-member etcd: ~70 s on 2 idle CPUs
def test_put_of_1000_then_100000_services_on_stock_etcd_is_served_whole_by_the_other(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    small = many(3)
    assert put(a, small).status == 200
    for n in (1000, 100_000):
        services = many(n)
        reply = put(a, services)
        assert reply.status == 200, reply.body
        assert reply.json()["revision"] > 0
        table = vips(b)  # read-your-writes on a; b lists the new generation whole
        wait_for(lambda n=n: len(vips(b)) == n, 300, f"b to serve {n} services")
        table = vips(b)
        assert set(table) == keys_of(services)
        assert table == vips(a)
        unique_vips(table)
        last = services[-1]
        assert answers(b, name_of(last)) == [table[keys_of([last]).pop()][0]]
    # A small PATCH after it is one transaction again, into the new generation.
    reply = patch(b, [svc(0, "other")], [svc(1)])
    assert reply.status == 200, reply.body
    wait_for(lambda: (("s0", "other", 80) in vips(a)) and ("s1", "shop", 80) not in vips(a),
             20, "a to apply b's PATCH")
    assert len(vips(a)) == 100_000
    # The registry the PUTs replaced (top-level keys, then the 1,000 generation) is gone.
    wait_for(lambda: garbage(cluster) == 0, 180, "old generations to be collected")


# ------------------------------------------------------------------ a writer killed


KILLED_PUT = 100_000  # services: 200,000 keys staged, hundreds of staging transactions
HOLD = 10  # s: registry.vip_hold_seconds in the killed-writer test (the old VIPs' claims)


@pytest.mark.timeout(1200)  # two 100,000-service PUTs (one killed halfway): ~3 min on 2 CPUs
def test_writer_killed_in_the_middle_of_a_100000_service_put_leaves_nothing_visible(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    # VIPs held for HOLD s once freed (the PUT frees the old registry's: their claims
    # are staged on a hold lease), DNS TTL below it as the config requires.
    a, b = pair_on(tmp_path, cluster, vip_hold_seconds=HOLD, dns={"ttl": 5})
    try:
        old = many(50, "old")  # 150 keys: more than one transaction, a generation too
        assert put(a, old).status == 200
        wait_for(lambda: len(vips(b)) == 50, 20, "b to serve the old registry")
        before = vips(b)
        revision_key = cluster.keys(PREFIX + "revision")
        old_root = PREFIX + revision_key[PREFIX + "revision"].decode()

        def old_keys() -> tuple[dict[str, bytes], dict[str, bytes]]:
            return cluster.keys(old_root + "services/"), cluster.keys(old_root + "vips/")

        old_keys_before = old_keys()
        assert len(old_keys_before[0]) == 50 and len(old_keys_before[1]) == 100  # v4 and v6
        leases_before = set(cluster.leases())
        services = many(KILLED_PUT, "new")
        result: list[Any] = []
        writer = threading.Thread(target=lambda: result.append(_try_put(a, services)))
        writer.start()
        staged = 3 * KILLED_PUT  # a service and its two claims each
        gen: list[str] = []

        def staging() -> int:
            """Keys staged so far under the one generation being written (its marker)."""
            markers = cluster.keys(PREFIX + "gens/")
            assert len(markers) <= 1, markers
            if not markers:
                return 0
            gen[:] = [next(iter(markers))[len(PREFIX + "gens/"):]]
            return cluster.count(f"{PREFIX}g/{gen[0]}/")

        # In the middle of it: the marker is there and 10% of the generation's keys are
        # staged. Watched in etcd, not slept for.
        wait_for(lambda: staging() > staged // 10, 300, "staging to be under way",
                 interval=0.2)
        a.kill()
        writer.join(30)
        assert result and result[0] is None, result  # the connection died: no answer
        # The kill landed before the commit: the revision key still names the old
        # registry, and the generation is part-staged.
        assert cluster.keys(PREFIX + "revision") == revision_key
        part = cluster.count(f"{PREFIX}g/{gen[0]}/")
        assert staged // 10 < part < staged, part
        # The dead writer's leases: the staging one (its marker) and the hold lease of
        # the old VIPs' claims in its generation. Nothing keeps them alive any more.
        dead = {lid: ttl for lid, ttl in cluster.leases().items() if lid not in leases_before}
        assert dead and all(granted <= max(HOLD, 10) for _, granted in dead.values()), dead

        def old_registry_whole_on_b() -> None:
            # b never saw a part of it: the old registry, whole, in GET and DNS, and in
            # etcd the old registry's keys as they were.
            assert vips(b) == before
            assert answers(b, name_of(old[7])) == [before[("s7", "old", 80)][0]]
            assert answers(b, name_of(services[0])) == []
            assert old_keys() == old_keys_before

        def leases_gone() -> bool:
            try:
                old_registry_whole_on_b()
            except AssertionError as exc:  # not to be polled past: fail at once
                raise RuntimeError(f"b served something else meanwhile: {exc}") from exc
            return not set(cluster.leases()) & set(dead)

        # No claim outlives its lease: every lease of the dead writer runs out and is
        # revoked (within its TTL and the leader's next check, bounded here with slack
        # for a loaded machine), its marker and held claims with it; the old registry is
        # served whole all along.
        wait_for(leases_gone, max(g for _, g in dead.values()) + 20,
                 "the dead writer's leases to expire", interval=0.5)
        assert not cluster.keys(PREFIX + "gens/")
        old_registry_whole_on_b()
        reply = put(b, services)  # retried through the survivor
        assert reply.status == 200, reply.body
        table = vips(b)
        assert set(table) == keys_of(services)
        unique_vips(table)
        last = services[-1]
        assert answers(b, name_of(last)) == [table[keys_of([last]).pop()][0]]
        # The dead writer's part-staged generation and the old registry's keys go.
        wait_for(lambda: garbage(cluster) == 0, 180, "the dead writer's generation to go")
    finally:
        a.stop()
        b.stop()


def _try_put(server: ServerProcess, services: list[dict[str, Any]]) -> int | None:
    try:
        return put(server, services).status
    except OSError:
        return None


# ------------------------------------------------------------------ two writers


def test_two_concurrent_puts_of_5000_one_wins_whole_no_vip_twice(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    assert put(a, many(10, "seed")).status == 200
    first = many(5000, "first")
    second = [svc(i, "second") for i in range(2500, 7500)]
    statuses: dict[str, int] = {}
    threads = [threading.Thread(target=lambda s=s, w=w, n=n: statuses.__setitem__(
        n, put(w, s).status)) for w, s, n in ((a, first, "first"), (b, second, "second"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert statuses == {"first": 200, "second": 200}, statuses
    wait_for(lambda: vips(a) == vips(b), 60, "both instances to agree")
    table = vips(a)
    # The later commit replaced the earlier whole: never a mix of the two, or of either
    # with the seed registry.
    assert set(table) in (keys_of(first), keys_of(second)), \
        {ns for _, ns, _ in table}
    unique_vips(table)
    wait_for(lambda: garbage(cluster) == 0, 60, "the loser's generation to be collected")


# ------------------------------------------------------------------ an election


def test_first_patch_after_the_etcd_leader_is_killed_is_answered_within_3_s(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    others = [m.url for m in cluster.members if m is not leader]
    # The instance talks to the leader first: the worst case, every request meets it.
    # registry.etcd.request_timeout at its default (5 s): what one attempt may take.
    a = start_listed(instance(tmp_path, "a", [leader.url, *others],
                              etcd={"request_timeout": 5.0}))
    try:
        assert patch(a, [svc(1)]).status == 200
        cluster.kill(leader)
        t0 = time.monotonic()
        reply = patch(a, [svc(2)], timeout=30)
        elapsed = time.monotonic() - t0
        print(f"first PATCH after the leader was killed: {reply.status} in {elapsed:.2f} s")
        assert reply.status == 200, reply.body
        # The contract (issue 27): within about one election time (~1 s on loopback),
        # bounded generously against CI noise.
        assert elapsed < 3.0, f"first PATCH after the leader died took {elapsed:.1f} s"
        assert ("s2", "shop", 80) in vips(a)
    finally:
        a.stop()


# ------------------------------------------------------------------ NOSPACE


def test_nospace_is_507_dns_unaffected_and_writes_resume_after_compact_defrag_disarm(
        tmp_path: Path) -> None:
    quota = 4 * 1024 * 1024
    cluster = EtcdCluster(tmp_path / "etcd", 3, stock=True,
                          extra_args=["--quota-backend-bytes", str(quota)])
    cluster.start()
    a = b = None
    try:
        a, b = pair_on(tmp_path, cluster)
        reply: Reply | None = None
        # PATCHes of one transaction each (~25 KB) rewriting the same 30 services: the
        # space fills with their old revisions, as it does on an etcd that is never
        # compacted, which is what compaction and defragmentation give back. (New
        # services each round would fill it with live data, which they cannot free: the
        # next write after the disarm would raise the alarm again.)
        for round_ in range(1000):
            services = [svc(i, "fill", hostnames=[
                f"r{round_}-{i}-{j}.example.com" for j in range(10)]) for i in range(30)]
            reply = patch(a, services)
            if reply.status != 200:
                break
        assert reply is not None and reply.status == 507, reply and reply.body
        assert "NOSPACE" in reply.json()["error"], reply.body
        assert any(al.get("alarm") == "NOSPACE" for al in cluster.alarms())
        served = vips(a)
        assert served == vips(b) and served
        # Nothing half-applied, DNS and reads go on; a write larger than one transaction
        # (staged) is refused too, through the other instance.
        big = put(b, many(2000, "late"))
        assert big.status == 507, big.body
        one = next(iter(served))
        for server in (a, b):
            assert vips(server) == served
            assert answers(server, f"{one[0]}.{one[1]}.svc.{one[2]}.mesh") == [served[one][0]]
            assert call(server.url, "GET", "/readyz").status == 200
        # The operator's recovery: compact, defragment every member, disarm.
        cluster.compact(cluster.revision())
        cluster.defragment()
        cluster.disarm()
        assert not cluster.alarms()
        reply = patch(b, [svc(1, "late")])
        assert reply.status == 200, reply.body
        wait_for(lambda: ("s1", "late", 80) in vips(a), 20, "a to apply the write")
    finally:
        for server in (a, b):
            if server is not None:
                server.stop()
        cluster.stop()
