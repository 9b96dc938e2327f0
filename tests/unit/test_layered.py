"""LayeredMap (meshdns/core/registry/_layered.py) behaves exactly as a copied-and-edited dict.

A snapshot's big tables (services, by_vip4, by_vip6) evolve as layered maps on
an incremental PATCH. These tests hold ``evolve`` to what ``d = old.copy();
del d[k]...; d[k] = v...`` gives: the same entries, the same iteration order
(``services`` order is the registry order that VIP allocation, GET and the
state file follow), the same lookups, and no version ever changes after it was
made. Then hundreds of consecutive PATCHes on a registry (so the layers build
up, and fold into a plain dict under small bounds) must each equal the full
rebuild of the same list of services.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshdns.core.registry._layered as layered_module
from meshdns.core.registry import (
    LayeredMap,
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceKey,
    ServiceSpec,
    VipRange,
    apply_patch,
    apply_put,
    evolve,
)

KEYS = tuple(range(12))  # few keys: deletes, re-adds and overwrites collide often
ABSENT_KEYS = (100, -1)


def check_same(m: Mapping[int, str], model: dict[int, str]) -> None:
    """Everything a Mapping shows equals the dict's, order included."""
    items = list(model.items())
    assert list(m.items()) == items
    assert list(m) == list(model)
    assert list(m.keys()) == list(model.keys())
    assert list(m.values()) == list(model.values())
    assert len(m) == len(model)
    assert m == model and model == m
    assert (m != model) is False
    assert m == MappingProxyType(model)
    assert m != [*model] and m != None  # noqa: E711 - not a mapping: unequal, no error
    assert dict(m) == model
    for key in KEYS + ABSENT_KEYS:
        assert (key in m) is (key in model)
        assert m.get(key) == model.get(key)
        assert m.get(key, "dflt") == model.get(key, "dflt")
        if key in model:
            assert m[key] == model[key]
        else:
            with pytest.raises(KeyError):
                m[key]
    assert set(m.keys()) == set(model.keys())
    assert set(m.items()) == set(model.items())
    if isinstance(m, LayeredMap):
        assert repr(m) == f"LayeredMap({model!r})"


Step = tuple[list[int], list[tuple[int, str]]]


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[int, Step]]:
    """(which earlier version to evolve, what to delete and write); the deletes are
    drawn as positions among that version's keys when applied (a delete of a
    missing key is a KeyError, tested separately)."""
    out: list[tuple[int, Step]] = []
    for i in range(draw(st.integers(1, 40))):
        parent = draw(st.integers(0, i))  # usually a recent one, sometimes an old one
        deletes = draw(st.lists(st.integers(0, 1000), max_size=3))
        writes = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.text("abc", max_size=2)),
                               max_size=4))
        out.append((parent, (deletes, writes)))
    return out


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text("xy", max_size=2)), max_size=10),
       steps(), st.integers(0, 6), st.integers(1, 4))
def test_evolve_is_a_copied_and_edited_dict(initial: list[tuple[int, str]],
                                            plan: list[tuple[int, Step]], min_layer: int,
                                            share: int) -> None:
    start = dict(initial)
    versions: list[tuple[Mapping[int, str], dict[int, str]]] = [(start, dict(start))]
    for parent, (delete_at, writes) in plan:
        table, model = versions[parent]
        present = list(model)
        deletes = list(dict.fromkeys(present[i % len(present)] for i in delete_at)) \
            if present else []
        new_model = model.copy()
        for key in deletes:
            del new_model[key]
        for key, value in writes:
            new_model[key] = value
        new = evolve(table, deletes, writes, min_layer, share)
        check_same(new, new_model)
        assert (new == table) is (table == new) is (new_model == model)
        versions.append((new, new_model))
    for table, model in versions:  # none changed since it was made
        check_same(table, model)


def test_layers_build_up_then_fold_into_a_plain_dict() -> None:
    base = {k: f"v{k}" for k in range(100)}
    model = dict(base)
    table: Mapping[int, str] = base
    kinds: list[str] = []
    rnd = random.Random(7)
    for step in range(300):
        key = rnd.randrange(140)
        if key in model and rnd.random() < 0.4:
            deletes, writes = [key], ([(key, f"again{step}")] if rnd.random() < 0.5 else [])
        else:
            deletes, writes = [], [(key, f"s{step}")]
        for k in deletes:
            del model[k]
        model.update(writes)
        table = evolve(table, deletes, writes, 8, 100)
        kinds.append(type(table).__name__)
        check_same(table, model)
    # The layers grew past the bound (9 entries at most with 100 keys) and folded.
    assert kinds.count("LayeredMap") > 150
    assert kinds.count("dict") > 20
    assert isinstance(table, (dict, LayeredMap))


def test_a_layered_map_shares_its_base_and_copies_only_the_layers() -> None:
    base = {k: k * 10 for k in range(1000)}
    one = evolve(base, [3], [(3, -3), (5000, 1)])
    two = evolve(one, [5000], [(4, -4)])
    assert isinstance(one, LayeredMap) and isinstance(two, LayeredMap)
    assert one._base is base and two._base is base
    assert base == {k: k * 10 for k in range(1000)}
    assert list(two)[-1] == 3  # deleted and written again: appended
    assert 5000 in one and 5000 not in two
    assert two[4] == -4 and list(two).index(4) == 3  # overwritten in place (3 moved)
    assert evolve(base, [], []) is base  # nothing written: the plain dict itself


def test_equality_is_by_contents_across_bases_and_orders() -> None:
    a = evolve({1: "a", 2: "b", 3: "c"}, [1], [(1, "a")])  # order 2, 3, 1
    b = evolve({3: "c", 9: "z"}, [9], [(2, "b"), (1, "a")])
    assert isinstance(a, LayeredMap) and isinstance(b, LayeredMap)
    assert list(a) == [2, 3, 1] and list(b) == [3, 2, 1]  # order is not part of equality
    assert a == b and b == a and a == {1: "a", 2: "b", 3: "c"}
    c = evolve(b, [], [(3, "C")])
    assert c != b and c != {1: "a", 2: "b", 3: "c"} and c == {1: "a", 2: "b", 3: "C"}
    d = evolve(b, [3], [])
    assert d != b and len(d) == 2
    with pytest.raises(TypeError):
        hash(a)


def test_a_delete_of_a_missing_key_raises_and_changes_nothing() -> None:
    base = {1: "a", 2: "b"}
    one = evolve(base, [1], [])
    with pytest.raises(KeyError):
        evolve(one, [1], [])
    with pytest.raises(KeyError):
        evolve(base, [9], [(3, "c")])
    with pytest.raises(KeyError):
        evolve(one, [2, 2], [])
    check_same(one, {2: "b"})
    check_same(base, {1: "a", 2: "b"})


# ---------------------------------------------------------------- on a registry

RANGE4 = VipRange.from_cidr("240.0.0.0/24")
RANGE6 = VipRange.from_cidr("fd00:fd00::/120")
POLICY = RegistryPolicy(range4=RANGE4, range6=RANGE6, hold_seconds=50)
NAMES = tuple(f"s{i}" for i in range(40))
HOSTS = tuple(f"h{i}.mesh" for i in range(6))


def random_key(rnd: random.Random) -> ServiceKey:
    return (rnd.choice(NAMES), rnd.choice(("a", "b", "c")), rnd.choice((80, 443)))


def random_spec(rnd: random.Random, reg: Registry, key: ServiceKey) -> ServiceSpec:
    vip = None
    if rnd.random() < 0.1:
        vip = RANGE4.first + rnd.randrange(250)  # maybe taken or held: a 409 then
    vip6 = RANGE6.first + rnd.randrange(250) if rnd.random() < 0.05 else None
    hosts = (rnd.choice(HOSTS),) if rnd.random() < 0.1 else ()
    labels = (("v", str(rnd.randrange(3))),) if rnd.random() < 0.5 else ()
    return ServiceSpec(*key, vip, vip6, hosts, labels=labels)


def random_patch(rnd: random.Random, reg: Registry) -> tuple[list[ServiceSpec], list[ServiceKey]]:
    existing = list(reg.services)
    upserts: dict[ServiceKey, ServiceSpec] = {}
    deletes: list[ServiceKey] = []
    for _ in range(rnd.randint(1, 3)):
        roll = rnd.random()
        if existing and roll < 0.35:  # rewrite an existing service (stays in place)
            key = rnd.choice(existing)
            upserts[key] = random_spec(rnd, reg, key)
        elif existing and roll < 0.6:
            key = rnd.choice(existing)
            if key not in upserts:
                deletes.append(key)
        else:  # a new one, or one deleted earlier coming back (appended)
            key = random_key(rnd)
            if key not in deletes:
                upserts[key] = random_spec(rnd, reg, key)
    return list(upserts.values()), deletes


def fingerprint(reg: Registry) -> tuple[Any, ...]:
    return (reg.revision, list(reg.services.items()), list(reg.by_vip4.items()),
            list(reg.by_vip6.items()), list(reg.hostnames.items()), list(reg.held4.items()),
            list(reg.held6.items()))


@pytest.fixture(params=[(2, 10_000), (25, 10_000), (None, None)], ids=["fold", "mid", "default"])
def layer_bounds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[int]:
    min_layer, share = request.param
    if min_layer is not None:
        monkeypatch.setattr(layered_module, "MIN_LAYER", min_layer)
        monkeypatch.setattr(layered_module, "LAYER_SHARE", share)
    yield layered_module.MIN_LAYER


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hundreds_of_consecutive_patches_equal_the_full_rebuild(seed: int,
                                                               layer_bounds: int) -> None:
    rnd = random.Random(seed)
    specs = [ServiceSpec(*random_key(rnd)) for _ in range(60)]
    reg = apply_put(Registry.empty(), list({s.key: s for s in specs}.values()), POLICY, 0.0)
    now = 0.0
    seen: list[tuple[Registry, tuple[Any, ...]]] = [(reg, fingerprint(reg))]
    layered = folded = rejected = 0
    for _ in range(500):
        now += rnd.choice((0.0, 1.0, 5.0))
        upserts, deletes = random_patch(rnd, reg)
        before = reg
        # The reference: the full list the PATCH amounts to, rebuilt from scratch
        # (apply_put), in the order the registry keeps.
        full = {key: s.to_spec() for key, s in before.services.items()}
        for key in deletes:
            full.pop(key, None)
        for spec in upserts:
            full[spec.key] = spec
        try:
            ref = apply_put(before, list(full.values()), POLICY, now)
        except RegistryError as exc:
            with pytest.raises(RegistryError) as raised:
                apply_patch(before, upserts, deletes, POLICY, now)
            assert raised.value.status == exc.status
            rejected += 1
            continue
        reg = apply_patch(before, upserts, deletes, POLICY, now)
        assert reg.revision == ref.revision
        assert list(reg.services.items()) == list(ref.services.items())  # order too
        assert len(reg.services) == len(ref.services)
        for name in ("by_vip4", "by_vip6", "hostnames", "held4", "held6"):
            assert dict(getattr(reg, name)) == dict(getattr(ref, name)), name
        assert reg.by_vip4 == {s.vip: k for k, s in reg.services.items()}
        for key in full:
            assert reg.services[key] == ref.services[key]
            assert reg.by_vip4.get(reg.services[key].vip) == key
        assert reg.free_vips(POLICY) == ref.free_vips(POLICY)
        if isinstance(reg.services, LayeredMap):
            layered += 1
        elif before.services is not reg.services:
            folded += 1
        seen.append((reg, fingerprint(reg)))
    for snap, print_ in seen:  # snapshots share tables: none may have changed since
        assert fingerprint(snap) == print_
    assert len(seen) > 300 and rejected > 5
    assert layered > 100  # the layers did build up
    if layer_bounds < 1000:
        assert folded > 5  # and folded into a plain dict again
    else:
        assert folded == 0 and layered > 250
