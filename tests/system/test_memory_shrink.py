"""What a registry that shrank keeps of the services it no longer has (issue 22).

A follower back from 300k services to 3 kept ~200 MiB more than a fresh one:
the VIP hold-down tables kept an entry (and so the key) per deleted service
although a follower holds nothing (hold 0), and the IPv4/IPv6 spelling caches
kept strings cut from the big write, which pinned the allocator arenas that
write's garbage had been in. These tests hold the shape, by values: nothing
per deleted service is held beyond its hold, and nothing the write allocated
in the core stays behind but the services that remain.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import meshdns.core
from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    ServiceSpec,
    VipRange,
    apply_patch,
    apply_put,
    parse_services,
    restore,
)
from meshdns.core.registry._patch import SHRINK_REBUILD_MIN

from ..apiclient import ServerProcess, call, wait_for
from .test_follow_delta import follower_process, leader_process, metric

RANGE4 = VipRange.from_cidr("240.0.0.0/4")  # the default registry.cidr
RANGE6 = VipRange.from_cidr("fd00:fd00::/64")  # the default registry.cidr6
# As follower.py builds its snapshots: every VIP from the leader, nothing held here.
FOLLOWER = replace(RegistryPolicy(), range6=None, hold_seconds=0.0)
BIG = SHRINK_REBUILD_MIN + 2000  # past the size where a large delete is rebuilt whole


def specs(n: int) -> list[ServiceSpec]:
    return [ServiceSpec(f"svc{i}", f"ns{i % 10}", 80) for i in range(n)]


def leader_doc(i: int) -> dict[str, Any]:
    """One service as a leader lists it: both VIPs given."""
    return {"name": f"svc{i}", "namespace": f"ns{i % 10}", "port": 80,
            "vip": f"240.0.{i >> 8 & 255}.{i & 255}",
            "vip6": f"fd00:fd00::{i >> 16:x}:{i & 0xffff:x}"}


@pytest.mark.parametrize("n", [50, BIG])
def test_a_hold_of_zero_keeps_nothing_of_the_deleted_services(n: int) -> None:
    policy = replace(RegistryPolicy(), hold_seconds=0.0)
    big = apply_put(Registry.empty(), specs(n), policy, 10.0)
    keep = list(big.services)[:3]
    # A PATCH deleting all but 3 (incremental at 50, rebuilt whole past
    # SHRINK_REBUILD_MIN), and a PUT of the 3: the same registry either way.
    patched = apply_patch(big, [], list(big.services)[3:], policy, 10.0)
    put = apply_put(big, [big.services[k].to_spec() for k in keep], policy, 10.0)
    for reg in (patched, put):
        assert list(reg.services) == keep
        assert dict(reg.held4) == {} and dict(reg.held6) == {}
        # The freed addresses are free at once, not counted held until the next write.
        assert reg.free_vips(policy) == {"ipv4": RANGE4.size - 3, "ipv6": RANGE6.size - 3}
    # The next write still sees them free: one of them goes to a newcomer at once.
    newcomer = apply_patch(patched, [ServiceSpec("new", "ns0", 80)], [], policy, 10.0)
    assert newcomer.services[("new", "ns0", 80)].vip == big.services[list(big.services)[3]].vip


def test_a_hold_ends_with_the_next_write_after_it_expired() -> None:
    policy = replace(RegistryPolicy(), hold_seconds=40.0)
    big = apply_put(Registry.empty(), specs(BIG), policy, 0.0)
    deleted = list(big.services)[3:]
    shrunk = apply_patch(big, [], deleted, policy, 0.0)
    # Within its hold each freed address is held for its last owner, as SPEC §3 says.
    assert len(shrunk.held4) == len(shrunk.held6) == len(deleted)
    assert {owner for _, owner in shrunk.held4.values()} == set(deleted)
    still = apply_patch(shrunk, [ServiceSpec("a", "x", 80)], [], policy, 39.0)
    assert len(still.held4) == len(deleted)
    later = apply_patch(still, [ServiceSpec("b", "x", 80)], [], policy, 40.0)
    assert dict(later.held4) == {} and dict(later.held6) == {}
    assert later.revision == still.revision + 1


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()


def core_blocks_alive() -> tuple[int, dict[str, int]]:
    """Blocks allocated by meshdns/core since tracing started and still alive."""
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, f"{meshdns.core.__path__[0]}/*")])
    stats = snap.statistics("filename")
    return (sum(s.count for s in stats),
            {Path(s.traceback[0].filename).name: s.count for s in stats})


def test_a_follower_back_at_3_services_keeps_nothing_of_the_big_write(traced: None) -> None:
    # As a follower adopts its leader's registry (parse, restore) and then the delta
    # back to 3 services. Whatever the core allocated for the big write and still
    # holds afterwards is held here: on the main branch before this fix, a held entry
    # per deleted service and family, and the /24 spellings of their VIPs.
    docs = [leader_doc(i) for i in range(1, BIG + 1)]
    reg = restore(1, parse_services(docs, consume=True), {}, FOLLOWER, now=10.0)
    del docs
    assert len(reg) == BIG
    reg = apply_patch(reg, [], list(reg.services)[3:], FOLLOWER, 11.0)
    assert len(reg) == 3
    total, by_file = core_blocks_alive()
    # 3 services, their VIPs, and the snapshot's small tables: ~30 blocks.
    assert total < 100, by_file
    # The next large write parsed starts with empty caches too.
    reg = restore(2, parse_services([leader_doc(i) for i in range(1, 1001)]), {}, FOLLOWER)
    del reg
    assert core_blocks_alive()[0] < 100


def test_a_follower_process_frees_the_addresses_of_a_shrunk_registry(
        tmp_path: Path) -> None:
    # Over real processes: a leader grows to BIG services and back to 3; the follower
    # (hold 0) counts every address of the deleted services free again at once. Before
    # this fix, the incremental delta (50) and the rebuilt one (BIG) both left them held.
    leader = leader_process(tmp_path).start()
    follower: ServerProcess | None = None
    try:
        follower = follower_process(tmp_path, leader, "follower").start()
        for n in (50, BIG):
            many = [{"name": f"svc{i}", "namespace": f"ns{i % 10}", "port": 80}
                    for i in range(n)]
            for size in (n, 3):
                assert call(leader.url, "PUT", "/v1/services",
                            {"services": many[:size]}).status == 200
                revision = call(leader.url, "GET", "/v1/services").json()["revision"]
                wait_for(lambda r=revision: call(follower.url, "GET", "/v1/services")  # type: ignore[misc,union-attr]
                         .json()["revision"] == r, 60, f"the follower at revision {revision}")
                assert len(call(follower.url, "GET", "/v1/services").json()["services"]) \
                    == size
            assert metric(follower.url, "meshdns_vip_pool_free", family="ipv4") \
                == RANGE4.size - 3
            assert metric(follower.url, "meshdns_follow_deltas_total") >= 2
    finally:
        if follower is not None:
            follower.stop()
        leader.stop()
