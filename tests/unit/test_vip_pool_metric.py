"""meshdns_vip_pool_free stays exact change after change without recounting the registry.

A follower builds its snapshots without an IPv6 range (it allocates nothing), so
``free_vips`` cannot read its IPv6 count off the snapshot's index and would walk
every service on each scrape after a change (~0.25 s at 100k services). The store
collector instead advances its last count by each published delta
(``core.registry.free_vips_after``); these tests hold that count to a full recount.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    ServiceSpec,
    VipRange,
    apply_patch,
    apply_put,
    free_vips_after,
)
from meshdns.store.metrics import StoreCollector
from meshdns.store.store import RegistryStore

RANGE4 = VipRange.from_cidr("10.8.0.0/24")
RANGE6 = VipRange.from_cidr("fd00:8::/120")
POLICY = RegistryPolicy(domains=("mesh",), range4=RANGE4, range6=RANGE6)
FOLLOWER = replace(POLICY, range6=None)  # as follower.py builds its snapshots
OUTSIDE4 = int(VipRange.from_cidr("10.9.0.0/24").first)
OUTSIDE6 = int(VipRange.from_cidr("fd00:9::/120").first)


def full_count(reg: Registry) -> dict[str, int]:
    """The pool counted the slow way: every VIP of every service and every held one."""
    out = {}
    for family, rng, by_vip, held in (("ipv4", RANGE4, reg.by_vip4, reg.held4),
                                      ("ipv6", RANGE6, reg.by_vip6, reg.held6)):
        used = {v for v in by_vip if v in rng} | {v for v in held if v in rng}
        out[family] = rng.size - len(used)
    return out


def random_spec(rng: random.Random, i: int) -> ServiceSpec:
    name = f"s{rng.randrange(40)}"
    vip = RANGE4.first + rng.randrange(250) if rng.random() < 0.8 else OUTSIDE4 + i % 200
    vip6 = None
    if rng.random() < 0.7:
        vip6 = RANGE6.first + rng.randrange(250) if rng.random() < 0.8 else OUTSIDE6 + i % 200
    return ServiceSpec(name, "ns", 80, vip, vip6, ())


def test_advancing_by_deltas_matches_a_full_count() -> None:
    rng = random.Random(3)
    reg = apply_put(Registry.empty(), [], FOLLOWER, 0.0)
    free = reg.free_vips(POLICY)
    steps = advanced = 0
    for i in range(600):
        base = reg
        ups = [random_spec(rng, i)]
        dels = [(f"s{rng.randrange(40)}", "ns", 80)] if rng.random() < 0.3 else []
        dels = [k for k in dels if k != ups[0].key]
        try:
            reg = apply_patch(base, ups, dels, FOLLOWER, float(i))
        except Exception:  # a VIP another service holds: a 409, nothing changed
            continue
        steps += 1
        nxt = free_vips_after(base, free, reg, POLICY)
        if nxt is not None:
            advanced += 1
            free = nxt
        else:
            free = reg.free_vips(POLICY)
        assert free == full_count(reg) == reg.free_vips(POLICY), i
    assert advanced > steps * 0.9  # the O(change) path is the one taken


def test_the_collector_counts_a_followers_pool_from_its_deltas() -> None:
    settings = ZoneSettings(domains=("mesh",), range4=RANGE4, range6=RANGE6)
    store = RegistryStore(FOLLOWER, settings, MessageHandler(Zone(Registry.empty(), settings)))
    collector = StoreCollector(store, POLICY)

    def scraped() -> dict[str, int]:
        metric = next(m for m in collector.collect() if m.name == "meshdns_vip_pool_free")
        return {s.labels["family"]: int(s.value) for s in metric.samples}

    async def run() -> None:
        rng = random.Random(9)
        specs = [ServiceSpec(f"s{i}", "ns", 80, RANGE4.first + i, RANGE6.first + i, ())
                 for i in range(100)]
        await store.write(lambda base: apply_put(base, specs, FOLLOWER, 0.0), mirror=True)
        assert scraped() == full_count(store.registry)
        for i in range(60):
            spec = ServiceSpec(f"n{i}", "ns", 80, RANGE4.first + 100 + i,
                               RANGE6.first + 100 + i if rng.random() < 0.5 else None, ())
            dels = [(f"s{i}", "ns", 80)] if i % 3 == 0 else []
            await store.write(lambda base, s=spec, d=dels: apply_patch(base, [s], d, FOLLOWER,
                                                                       1.0), mirror=True)
            cached = collector._free_cache
            assert cached is not None and cached[0] is store.registry  # advanced on publish
            assert scraped() == full_count(store.registry)

    asyncio.run(run())
