"""Sampled cache admission (handler.py ``_clear``): a reply cache that fills up with
replies nobody asks twice (a scan, or 0x20-randomized letter case) stops taking
every one, and goes back to taking every one once a full cache shows reuse.

Whatever admission does, every reply is the same bytes and every query is counted
exactly once.
"""

from __future__ import annotations

import random

from dnslib import DNSRecord

from meshdns.core.answer import ADMIT_ONE_IN, MIN_SAMPLED_CACHE, MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import Registry, RegistryPolicy, VipRange, apply_put, parse_services

RANGE4 = VipRange.from_cidr("240.0.0.0/16")
SERVICES = 3000
CACHE = MIN_SAMPLED_CACHE


def zone() -> Zone:
    items = [{"name": f"svc{i}", "namespace": "ns", "port": 80} for i in range(SERVICES)]
    policy = RegistryPolicy(domains=("mesh",), range4=RANGE4, range6=None)
    reg = apply_put(Registry.empty(), parse_services(items), policy, 0.0)
    return Zone(reg, ZoneSettings(domains=("mesh",), range4=RANGE4, range6=None))


def query(name: str, qid: int) -> bytes:
    q = DNSRecord.question(name, "A")
    q.header.id = qid
    return bytes(q.pack())


def mixed_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name)


def requests_a(handler: MessageHandler) -> int:
    return handler.snapshot_counts().requests.get(("udp", 1), 0)


def test_a_cache_of_unasked_replies_samples_then_reuse_switches_it_back() -> None:
    z = zone()
    handler = MessageHandler(z, answer_cache_size=CACHE)
    reference = MessageHandler(z, answer_cache_size=10 * SERVICES)
    rng = random.Random(5)
    asked = 0

    # 1. Every name once, in random case: the first full cache had no reuse.
    for i in range(SERVICES):
        data = query(mixed_case(f"svc{i}.ns.svc.80.mesh", rng), i)
        assert handler.handle_udp(data) == reference.handle_udp(data)
        asked += 1
        if asked == CACHE:
            assert not handler.sampling  # not before a cache has filled up
    assert handler.sampling
    assert requests_a(handler) == asked
    assert handler.snapshot_counts().responses.get((0, "local"), 0) == asked
    # Since sampling began, about one reply in ADMIT_ONE_IN went into the cache.
    assert handler.cached_answers() < CACHE // 2

    # 2. A few names asked over and over (same bytes): admitted after a few misses,
    # then served from the cache.
    hot = [query(f"svc{i}.ns.svc.80.mesh", 7) for i in range(10)]
    for _ in range(4 * ADMIT_ONE_IN):
        for data in hot:
            assert handler.handle_udp(data) == reference.handle_udp(data)
            asked += 1
    cached = handler.cached_answers()
    for data in hot:
        handler.handle_udp(data)
        asked += 1
    assert handler.cached_answers() == cached  # all hits now: nothing new went in
    assert requests_a(handler) == asked

    # 3. A working set asked again and again fills the cache with reused replies:
    # the next clear switches admission back to every reply. (A working set larger
    # than the cache then refills it with replies not asked again before it is
    # emptied, so admission goes back and forth: sampled is the better state there.)
    working = [query(f"svc{i}.ns.svc.80.mesh", 9) for i in range(100, 100 + 3 * CACHE // 2)]
    switched_back = False
    for _ in range(3 * ADMIT_ONE_IN):
        for data in working:
            assert handler.handle_udp(data) == reference.handle_udp(data)
            asked += 1
            switched_back = switched_back or not handler.sampling
    assert switched_back
    assert requests_a(handler) == asked
    assert handler.snapshot_counts().responses.get((0, "local"), 0) == asked


def test_small_caches_never_sample() -> None:
    z = zone()
    handler = MessageHandler(z, answer_cache_size=CACHE // 4)
    for i in range(SERVICES):
        handler.handle_udp(query(f"svc{i}.ns.svc.80.mesh", i))
    assert not handler.sampling
    assert requests_a(handler) == SERVICES
