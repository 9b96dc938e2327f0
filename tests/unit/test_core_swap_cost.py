"""A one-service PATCH costs O(change) when DNS swaps to the new snapshot (issue 24).

Two defects made every PATCH cost the size of the registry or of the caches, on the
event loop: the zone rebuilt the empty non-terminals above every explicit host name
(45 ms with 50k host names), and ``MessageHandler.set_zone`` copied all four reply
caches (4 ms with 100k cached replies). Memory allocated during the swap is the
timing-free witness: an O(registry) rebuild or an O(cache) copy allocates megabytes,
an O(change) swap a few kilobytes. And the host-name empty non-terminals evolved
PATCH by PATCH stay exactly what a fresh build finds.
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable

import dns.message
import dns.rdatatype
from hypothesis import given, settings
from hypothesis import strategies as st

from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    Registry,
    RegistryPolicy,
    ServiceSpec,
    VipRange,
    apply_patch,
    apply_put,
)

SETTINGS = ZoneSettings(domains=("mesh",), range4=VipRange.from_cidr("240.0.0.0/4"))
POLICY = RegistryPolicy()
# What a swap may allocate: the new state, a few names, a small layer. A copy of a
# 50k-entry dict or a set of 50k host-name parents is several megabytes.
SMALL = 256 * 1024


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def big_registry(n: int) -> Registry:
    # Each service has a host name in a team of its own: one empty non-terminal each.
    specs = [ServiceSpec(f"svc{i}", f"ns{i % 50}", 80, None, None, (f"web.team{i}.mesh",))
             for i in range(n)]
    return apply_put(Registry.empty(), specs, POLICY, 1000.0)


def query(name: str, qtype: str = "A") -> bytes:
    return dns.message.make_query(name, dns.rdatatype.from_text(qtype), use_edns=False).to_wire()


def test_a_one_service_patch_does_not_rebuild_the_host_name_parents() -> None:
    reg = big_registry(50_000)
    handler = MessageHandler(Zone(reg, SETTINGS))
    # The empty non-terminal of a host name is known: NODATA, not NXDOMAIN.
    reply = dns.message.from_wire(handler.handle_udp(query("team7.mesh")))  # type: ignore[arg-type]
    assert reply.rcode() == 0 and not reply.answer
    changed = apply_patch(reg, [ServiceSpec("svc7", "ns7", 80, None, None,
                                            ("web.moved7.mesh",))], [], POLICY, 2000.0)

    def swap() -> None:
        handler.set_zone(Zone(changed, SETTINGS))
        handler.handle_udp(query("team8.mesh"))  # the parents are in use

    assert peak_bytes(swap) < SMALL
    for name, rcode in (("team7.mesh", 3), ("moved7.mesh", 0), ("team8.mesh", 0)):
        reply = dns.message.from_wire(handler.handle_udp(query(name)))  # type: ignore[arg-type]
        assert reply.rcode() == rcode, name
        assert not reply.answer


def test_a_one_service_patch_keeps_the_reply_caches_in_place() -> None:
    n = 50_000
    reg = big_registry(n)
    handler = MessageHandler(Zone(reg, SETTINGS))
    packets = [query(f"svc{i}.ns{i % 50}.svc.80.mesh") for i in range(n)]
    for data in packets:
        handler.handle_udp(data)
    assert handler.cached_answers() == n
    changed = apply_patch(reg, [ServiceSpec("svc7", "ns7", 80, None, None, ())], [],
                          POLICY, 2000.0)
    assert peak_bytes(lambda: handler.set_zone(Zone(changed, SETTINGS))) < SMALL
    assert handler.cached_answers() == n - 1  # only svc7's reply went
    before = sum(handler.snapshot_counts().requests.values())
    for data in packets[:100]:
        handler.handle_udp(data)
    assert handler.cached_answers() == n  # svc7's reply is answered anew, and cached
    # Every question counted once, hits (kept replies) and the miss alike.
    assert sum(handler.snapshot_counts().requests.values()) == before + 100


HOSTS = ("a.b.mesh", "c.b.mesh", "x.y.z.mesh", "y.z.mesh", "q.mesh", "out.example.com",
         "d.deep.b.mesh")


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 6))
def test_evolved_host_name_parents_equal_a_fresh_build(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    keys = [(f"s{i}", "ns", 80) for i in range(6)]

    def spec(key: tuple[str, str, int], taken: set[str]) -> ServiceSpec:
        free = [h for h in HOSTS if h not in taken]
        hosts = tuple(rng.sample(free, min(len(free), rng.randint(0, 2))))
        taken.update(hosts)
        return ServiceSpec(*key, None, None, hosts)

    taken: set[str] = set()
    reg = apply_put(Registry.empty(), [spec(k, taken) for k in keys[:3]], POLICY, 1000.0)
    zone = Zone(reg, SETTINGS)
    zone.host_ents()
    for step in range(steps):
        owned = {h for s in reg.services.values() for h in s.hostnames}
        deletes = rng.sample(sorted(reg.services), rng.randint(0, min(2, len(reg.services))))
        for key in deletes:
            owned.difference_update(reg.services[key].hostnames)
        upserts = []
        for key in rng.sample(keys, rng.randint(0, 2)):
            if key in deletes:
                continue
            if key in reg.services:
                owned.difference_update(reg.services[key].hostnames)
            upserts.append(spec(key, owned))
        reg = apply_patch(reg, upserts, deletes, POLICY, 2000.0 + step)
        new = Zone(reg, SETTINGS)
        new.inherit(zone)
        assert dict(new.host_ents()) == dict(Zone(reg, SETTINGS).host_ents())
        zone = new
