"""The state file's journal: small writes append, start-up replays, torn tails are cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshdns import store as store_mod
from meshdns.core.registry import Registry, RegistryPolicy, ServiceSpec, parse_services
from meshdns.core.resolver import Resolver
from meshdns.core.vip import VipRange
from meshdns.core.zone import Zone, ZoneSettings
from meshdns.store import RegistryStore, StateError, journal_path, read_state

POLICY = RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/24"), hold_seconds=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_store(state: Path, clock: Clock | None = None) -> RegistryStore:
    settings = ZoneSettings(range4=POLICY.range4, range6=POLICY.range6)
    resolver = Resolver(Zone(Registry.empty(), settings))
    return RegistryStore(POLICY, settings, resolver, str(state), clock=clock or Clock())


def specs(*names: str, **extra: object) -> list[ServiceSpec]:
    return parse_services([{"name": n, "namespace": "ns", "port": 80, **extra} for n in names])


def same(a: Registry, b: Registry) -> None:
    assert a.revision == b.revision
    assert a.services == b.services
    assert dict(a.by_vip4) == dict(b.by_vip4) and dict(a.by_vip6) == dict(b.by_vip6)
    assert dict(a.held4) == dict(b.held4) and dict(a.held6) == dict(b.held6)
    assert dict(a.hostnames) == dict(b.hostnames)


def restarted(state: Path) -> Registry:
    s = new_store(state)
    s.load_initial(None)
    return s.registry


def test_patches_append_to_the_journal_and_leave_the_snapshot_alone(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a", "b", "c"))
    snapshot = state.read_bytes()
    s.patch(specs("d", hostnames=["d.mesh"]), [])
    s.patch([], [("b", "ns", 80)])  # its VIP goes on hold
    s.patch(specs("a", vip="240.0.0.200"), [])  # a given VIP replaces an allocated one
    assert state.read_bytes() == snapshot
    assert len(journal_path(state).read_bytes().splitlines()) == 3
    same(restarted(state), s.registry)
    assert read_state(state, POLICY, 1000.0).revision == s.registry.revision == 4


def test_held_vips_survive_a_restart_through_the_journal(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    clock = Clock()
    s = new_store(state, clock)
    s.load_initial(None)
    s.put(specs("a", "b"))
    freed = s.registry.services[("b", "ns", 80)].vip
    s.patch([], [("b", "ns", 80)])
    s2 = new_store(state, clock)
    s2.load_initial(None)
    s2.patch(specs("c"), [])
    assert s2.registry.services[("c", "ns", 80)].vip != freed  # still on hold
    s2.patch(specs("b"), [])
    assert s2.registry.services[("b", "ns", 80)].vip == freed  # its own VIP back


def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    s.patch(specs("b"), [])
    acknowledged = s.registry
    with journal_path(state).open("ab") as f:
        f.write(b'{"revision": 3, "upsert": [{"name": "c"')  # the write cut short
    s2 = new_store(state)
    s2.load_initial(None)
    same(s2.registry, acknowledged)
    assert journal_path(state).read_bytes().endswith(b"\n")
    s2.patch(specs("c"), [])  # appends cleanly after the cut
    same(restarted(state), s2.registry)


def test_a_corrupt_line_before_the_last_stops_start_up(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    s.patch(specs("b"), [])
    s.patch(specs("c"), [])
    lines = journal_path(state).read_bytes().splitlines(keepends=True)
    journal_path(state).write_bytes(b"not json\n" + lines[1])
    before = journal_path(state).read_bytes()
    with pytest.raises(StateError, match="corrupt"):
        new_store(state).load_initial(None)
    assert journal_path(state).read_bytes() == before  # left for the operator to inspect


def test_the_journal_is_compacted_into_a_new_snapshot(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "JOURNAL_MAX_ENTRIES", 3)
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    for name in ("b", "c", "d"):
        s.patch(specs(name), [])
    assert len(journal_path(state).read_bytes().splitlines()) == 3
    s.patch(specs("e"), [])  # no room: a snapshot, and the journal starts empty
    assert journal_path(state).read_bytes() == b""
    assert read_state(state, POLICY, 1000.0).revision == s.registry.revision
    same(restarted(state), s.registry)


def test_entries_already_in_the_snapshot_are_skipped(tmp_path: Path) -> None:
    """A crash between writing a snapshot and emptying the journal replays nothing twice."""
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    s.patch(specs("b"), [])
    s.patch([], [("a", "ns", 80)])
    stale = journal_path(state).read_bytes()
    store_mod.write_state(state, s.registry)  # the snapshot now holds both entries
    journal_path(state).write_bytes(stale)
    same(restarted(state), s.registry)


def test_a_journal_without_its_snapshot_is_never_replayed(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    s.patch(specs("b"), [])
    state.unlink()  # the operator removed the state file, not the journal
    s2 = new_store(state)
    assert s2.load_initial(None) == "empty registry"
    assert journal_path(state).read_bytes() == b""
    s2.patch(specs("x"), [])  # no snapshot yet: this write is one
    assert state.exists()
    same(restarted(state), s2.registry)


def test_a_write_that_changes_much_of_the_registry_is_a_snapshot(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a"))
    s.patch(specs("b"), [])  # small: journal
    assert len(journal_path(state).read_bytes().splitlines()) == 1
    # 1200 changed services (given VIPs: the test's /24 range holds 252): a snapshot.
    s.put([ServiceSpec(f"n{i}", "ns", 80, vip=0x0A000000 + i) for i in range(1200)])
    assert journal_path(state).read_bytes() == b""
    assert read_state(state, POLICY, 1000.0).revision == s.registry.revision
    same(restarted(state), s.registry)


@pytest.mark.parametrize("seed", range(6))
def test_random_patches_journal_exactly_what_changed_and_replay_to_the_same(
        tmp_path: Path, seed: int) -> None:
    # A PATCH's journal line comes from what the incremental patch says it touched
    # (Registry._delta); it must equal the line a full comparison of the two
    # snapshots gives, and a restart must replay to the live registry.
    import dataclasses
    import random

    rnd = random.Random(seed)
    clock = Clock()
    s = new_store(tmp_path / "state.json", clock)
    s.put(specs(*(f"s{i}" for i in range(30))))
    names = [f"s{i}" for i in range(45)]
    for _ in range(40):
        base = s.registry
        ups = []
        for n in rnd.sample(names, rnd.randint(0, 3)):
            extra: dict[str, object] = {}
            if rnd.random() < 0.3:
                extra["hostnames"] = [f"{n}.example.com"]
            if rnd.random() < 0.2:
                extra["vip"] = f"240.0.0.{200 + names.index(n) % 50}"
            ups.append({"name": n, "namespace": "ns", "port": 80, **extra})
        dels = [(n, "ns", 80) for n in rnd.sample(names, rnd.randint(0, 2))
                if n not in {u["name"] for u in ups}]
        clock.now += rnd.choice([0.0, 10.0, 400.0])
        try:
            new = s.patch(parse_services(ups), dels)
        except store_mod.RegistryError:
            continue
        if new is base or new.revision == base.revision:
            continue
        full = store_mod.journal_entry(base, dataclasses.replace(new, _delta=None))
        got = store_mod.journal_entry(base, new)
        assert full is not None and got is not None
        # The same records; their order may differ (new keys keep theirs, which is
        # what replay's order depends on: checked below, after the restart).
        for entry in (full, got):
            entry["upsert"].sort(key=lambda r: (r["name"], r["namespace"], r["port"]))
            entry["delete"].sort()
        assert got == full
    # Restarted at the live clock: expired hold-downs, dropped in memory by writes that
    # changed nothing else (not journalled), are dropped by the restart too.
    fresh = new_store(tmp_path / "state.json", clock)
    fresh.load_initial(None)
    back = fresh.registry
    same(back, s.registry)
    assert list(back.services) == list(s.registry.services)  # the order GET shows
