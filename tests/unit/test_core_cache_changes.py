"""A registry change keeps the cached replies it did not change (resolver.py, outdated.py).

After a random PATCH of a random registry (worlds and questions as in
test_core_fastpath_equivalence.py), a resolver that kept its cached replies,
dropping only what the change outdated, answers every question exactly as a
fresh resolver of the new snapshot does, also over several PATCHes in a row with
caches small enough to clear themselves; and a one-service PATCH keeps the other
services' replies, with every hit still counted once.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import Any

import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshdns.core.answer import ForwardRequest, MessageHandler, Zone, service_names
from meshdns.core.registry import (
    Registry,
    RegistryError,
    ServiceSpec,
    apply_patch,
    apply_put,
    canonical_name,
)

from .test_core_fastpath_equivalence import (
    NAMES,
    NAMESPACES,
    OUTSIDE,
    PORTS,
    RANGE4,
    World,
    demo_world,
    packet,
    questions_for,
    random_case,
    worlds,
)


def patch_specs(draw: Any, reg: Registry) -> tuple[list[ServiceSpec], list[tuple[str, str, int]]]:
    keys = sorted(reg.services)
    deletes = draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)) if keys else []
    upserts: list[ServiceSpec] = []
    for i in range(draw(st.integers(0, 3))):
        if keys and draw(st.booleans()):
            name, ns, port = draw(st.sampled_from(keys))
        else:
            name, ns, port = (draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMESPACES)),
                              draw(st.sampled_from(PORTS)))
        if (name, ns, port) in deletes or any(u.key == (name, ns, port) for u in upserts):
            continue
        hosts = tuple(draw(st.lists(st.sampled_from((*OUTSIDE, "frontend.mesh")), max_size=1)))
        vip = None if draw(st.booleans()) else int(RANGE4.network.network_address) + 9000 + i
        upserts.append(ServiceSpec(name, ns, port, vip, None, hosts))
    return upserts, deletes


@st.composite
def changes(draw: Any) -> tuple[World, list[ServiceSpec], list[tuple[str, str, int]]]:
    world = draw(worlds())
    upserts, deletes = patch_specs(draw, world.zone.registry)
    return world, upserts, deletes


def ask_all(resolver: MessageHandler, packets: Sequence[bytes]) -> list[Any]:
    out: list[Any] = []
    for data in packets:
        for reply in (resolver.handle_udp(data), resolver.handle_tcp(data)):
            out.append(reply.query.labels if isinstance(reply, ForwardRequest) else reply)
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes(), st.integers(0, 2**32))
def test_a_change_keeps_only_replies_it_did_not_change(
        change: tuple[World, list[ServiceSpec], list[tuple[str, str, int]]], seed: int) -> None:
    world, upserts, deletes = change
    try:
        reg = apply_patch(world.zone.registry, upserts, deletes, world.policy, 2.0)
    except RegistryError:
        return  # a conflicting patch changes nothing
    rng = random.Random(seed)
    packets = [packet(random_case(n, rng), t, rng, rng.choice((0, 1)))
               for n, t, _ in world.questions]
    # Names the patch brings in, asked before it (cached as NXDOMAIN or forwarded).
    for spec in upserts:
        for name in (canonical_name(spec.name, spec.namespace, spec.port, "mesh"),
                     *spec.hostnames):
            packets.append(packet(name, "A", rng, 0))
    warm = MessageHandler(world.zone)
    ask_all(warm, packets)
    ask_all(warm, packets)  # the second round is served from the cache
    new_zone = Zone(reg, world.zone.settings)
    kept_before = warm.cached_answers()
    warm.set_zone(new_zone)
    assert warm.cached_answers() <= kept_before
    assert ask_all(warm, packets) == ask_all(MessageHandler(new_zone), packets)


def test_a_one_service_patch_keeps_the_other_services_replies() -> None:
    world = demo_world(("mesh",))
    resolver = MessageHandler(world.zone)
    rng = random.Random(3)
    front = packet("FrontEnd.kong.svc.80.mesh", "A", rng, 0)
    back = packet("backend.KONG.svc.8080.mesh", "A", rng, 0)
    back_ptr = packet("8.0.0.240.in-addr.arpa", "PTR", rng, 0)
    nx = packet("nope.mesh", "A", rng, 0)
    for data in (front, back, back_ptr, nx):
        resolver.handle_udp(data)
    assert resolver.cached_answers() == 4
    reg = apply_patch(world.zone.registry,
                      [ServiceSpec("frontend", "kong", 80, int(ipaddress.IPv4Address("240.0.0.9")),
                                   None, ())], [], world.policy, 1.0)
    assert reg._delta is not None
    resolver.handle_udp(back)  # a hit, counted on its (kept) entry
    resolver.handle_udp(nx)  # a hit, counted on its (dropped) entry
    before = resolver.snapshot_counts()
    resolver.set_zone(Zone(reg, world.zone.settings))
    # Kept: backend's A and PTR. Dropped: frontend's A (new VIP) and the NXDOMAIN (serial).
    assert resolver.cached_answers() == 2
    after = resolver.snapshot_counts()  # no request lost or counted twice
    assert (after.requests, after.responses) == (before.requests, before.responses)
    assert before.requests[("udp", 1)] == 5 and before.responses[(3, "local")] == 2
    out = resolver.handle_udp(front)
    assert isinstance(out, bytes)
    assert [r.to_text() for r in dns.message.from_wire(out).answer[0]] == ["240.0.0.9"]
    out = resolver.handle_udp(nx)
    assert isinstance(out, bytes)
    assert dns.message.from_wire(out).authority[0][0].serial == reg.revision
    hits = resolver.snapshot_counts().responses
    resolver.handle_udp(back)
    assert resolver.snapshot_counts().responses[(0, "local")] == hits[(0, "local")] + 1
    assert resolver.cached_answers() == 4
    # A full PUT (no delta) empties the caches.
    full = apply_put(reg, [s.to_spec() for s in reg.services.values()][:1], world.policy, 2.0)
    resolver.set_zone(Zone(full, world.zone.settings))
    assert resolver.cached_answers() == 0


def test_service_names_are_the_names_it_answers() -> None:
    world = demo_world()
    svc = world.zone.registry.services[("frontend", "kong", 80)]
    names = service_names(svc, ("mesh", "mesh.local"))
    assert set(names) == {
        "frontend.mesh", "httpbin.org", "frontend.kong.svc.80.mesh", "frontend_kong_svc_80.mesh",
        "frontend.kong.svc.80.mesh.local", "frontend_kong_svc_80.mesh.local",
        ipaddress.IPv4Address("240.0.0.7").reverse_pointer,
        ipaddress.IPv6Address("fd00:fd00::7").reverse_pointer}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.data(), st.integers(0, 2**32), st.sampled_from((4, 64, 100_000)))
def test_a_long_lived_handler_matches_a_fresh_one_after_every_change(
        world: World, data: st.DataObject, seed: int, cache_size: int) -> None:
    """Several PATCHes in a row, each answered by one handler kept across them all (its
    cache, name table and admission state carried over, a small cache clearing itself
    on the way) and by a fresh handler of the same snapshot: the replies are the same
    after every change, and the kept handler has counted every request exactly once."""
    rng = random.Random(seed)
    kept = MessageHandler(world.zone, answer_cache_size=cache_size)
    zone, asked = world.zone, 0
    packets: dict[tuple[str, str | int], bytes] = {}
    for _ in range(data.draw(st.integers(1, 5), label="changes")):
        upserts, deletes = patch_specs(data.draw, zone.registry)
        try:
            reg = apply_patch(zone.registry, upserts, deletes, world.policy, 2.0)
        except RegistryError:
            continue
        zone = Zone(reg, zone.settings)
        kept.set_zone(zone)
        for n, t, _ in (*world.questions, *questions_for(zone)):
            if (n, t) not in packets:  # the same bytes after every change: cache keys
                packets[n, t] = packet(random_case(n, rng), t, rng, rng.choice((0, 1)))
        asking = list(packets.values())
        assert ask_all(kept, asking) == ask_all(MessageHandler(zone), asking)
        assert ask_all(kept, asking) == ask_all(MessageHandler(zone), asking)  # cached now
        asked += 4 * len(asking)  # two rounds, UDP and TCP each
        counts = kept.snapshot_counts()
        assert sum(counts.requests.values()) == asked
