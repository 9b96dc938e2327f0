"""The state file's journal: small writes append, start-up replays, torn tails are cut,
failed writes are rolled back."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshdns import store as store_mod
from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    ServiceSpec,
    VipRange,
    parse_services,
)
from meshdns.store import RegistryStore, StateError, StateWriteError, journal_path, read_state
from meshdns.store import journal as journal_mod

POLICY = RegistryPolicy(range4=VipRange.from_cidr("240.0.0.0/24"), hold_seconds=300.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_store(state: Path, clock: Clock | None = None) -> RegistryStore:
    settings = ZoneSettings(range4=POLICY.range4, range6=POLICY.range6)
    resolver = MessageHandler(Zone(Registry.empty(), settings))
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
    monkeypatch.setattr(journal_mod, "JOURNAL_MAX_ENTRIES", 3)
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
        except RegistryError:
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


# ---------------------------------------------------------------- failed writes
#
# The real full disk (a 1 MiB tmpfs) is in test_disk_full.py. Here the kernel calls
# on one file are made to fail the way a full or failing device makes them fail
# (a short write then ENOSPC, fsync EIO, a truncate that fails too), including the
# cases no tmpfs produces.


class DiskFaults:
    """Fails os.write/os.fsync/os.ftruncate on the files whose path ``target`` accepts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: Callable[[str], bool]) -> None:
        self.target = target
        self.room: int | None = None  # bytes writes may still take, then ENOSPC
        self.fsync: int | None = None  # errno for fsync
        self.ftruncate: int | None = None  # errno for ftruncate
        self.short_writes = 0
        real_write, real_fsync, real_ftruncate = os.write, os.fsync, os.ftruncate

        def hit(fd: int) -> bool:
            try:
                return self.target(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return False

        def write(fd: int, data: Any) -> int:
            if self.room is not None and hit(fd):
                if self.room == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n = real_write(fd, bytes(data[: self.room]))
                self.room -= n
                self.short_writes += n < len(data)
                return n
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            if self.fsync is not None and hit(fd):
                raise OSError(self.fsync, os.strerror(self.fsync))
            real_fsync(fd)

        def ftruncate(fd: int, size: int) -> None:
            if self.ftruncate is not None and hit(fd):
                raise OSError(self.ftruncate, os.strerror(self.ftruncate))
            real_ftruncate(fd, size)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "ftruncate", ftruncate)

    def clear(self) -> None:
        self.room = self.fsync = self.ftruncate = None


def journalled(tmp_path: Path) -> tuple[Path, RegistryStore]:
    """A store with a snapshot and two journal lines."""
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a", "b"))
    s.patch(specs("c"), [])
    s.patch(specs("a", hostnames=["a.example.org"]), [])
    return state, s


def many() -> list[ServiceSpec]:
    """A PUT that changes too much for a journal line: its write is a snapshot.
    (Given VIPs: the test's /24 range holds 252.)"""
    return [ServiceSpec(f"n{i}", "ns", 80, vip=0x0A000000 + i) for i in range(1200)]


def assert_not_applied(s: RegistryStore, before: Registry) -> None:
    """A failed write changed nothing: the store and what DNS answers from are as before."""
    assert s.registry is before
    assert s.handler.zone.registry is before


def test_a_short_write_then_enospc_is_cut_back_and_the_next_write_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    before, on_disk, snapshot = s.registry, journal.read_bytes(), state.read_bytes()
    faults = DiskFaults(monkeypatch, lambda p: p == str(journal))
    faults.room = 25  # part of the line fits, then the disk is full
    with pytest.raises(StateWriteError) as info:
        s.patch(specs("d", hostnames=["d.example.org"]), [])
    assert faults.short_writes == 1  # the torn line really was written ...
    assert journal.read_bytes() == on_disk  # ... and cut off again
    assert state.read_bytes() == snapshot
    assert info.value.errno == errno.ENOSPC and info.value.status == 507
    assert str(state) in info.value.message and "No space left" in info.value.message
    assert_not_applied(s, before)
    assert s.state_write_failures == 1
    with pytest.raises(StateWriteError):  # still full: refused again, nothing appended
        s.patch(specs("e"), [])
    assert journal.read_bytes() == on_disk and s.state_write_failures == 2
    faults.clear()  # space is back
    after = s.patch(specs("f"), [])
    assert after.revision == before.revision + 1
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["revision"] for line in lines)
    back = restarted(state)
    same(back, after)
    assert ("d", "ns", 80) not in back.services and ("e", "ns", 80) not in back.services


def test_an_fsync_eio_is_rolled_back_and_never_acknowledged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    before, on_disk = s.registry, journal.read_bytes()
    faults = DiskFaults(monkeypatch, lambda p: p == str(journal))
    faults.fsync = errno.EIO  # the whole line was written, but the device failed it
    with pytest.raises(StateWriteError) as info:
        s.patch(specs("d"), [])
    assert info.value.status == 507 and "Input/output error" in info.value.message
    assert journal.read_bytes() == on_disk
    assert_not_applied(s, before)
    faults.clear()
    same(restarted(state), before)  # a restart now holds no trace of it


def test_a_journal_that_cannot_be_cut_back_refuses_writes_until_it_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    before, on_disk, snapshot = s.registry, journal.read_bytes(), state.read_bytes()
    faults = DiskFaults(monkeypatch, lambda p: p == str(journal))
    faults.room, faults.ftruncate = 25, errno.EIO
    with pytest.raises(StateWriteError):
        s.patch(specs("d"), [])
    torn = journal.read_bytes()
    assert torn.startswith(on_disk) and len(torn) == len(on_disk) + 25  # the cut failed
    faults.room = None  # space is back, but the torn bytes are still there
    writes: list[Callable[[], Registry]] = [lambda: s.patch(specs("e"), []),  # a line
                                            lambda: s.put(many())]  # a snapshot
    for write in writes:
        with pytest.raises(StateWriteError) as info:
            write()
        assert info.value.status == 507 and "refusing writes" in info.value.message
        assert journal.read_bytes() == torn  # nothing was appended onto the torn line
        assert state.read_bytes() == snapshot
        assert_not_applied(s, before)
    assert s.state_write_failures == 3
    # Killed now, a restart drops the torn tail: exactly the acknowledged writes.
    (tmp_path / "copy").mkdir()
    for f in (state, journal):
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    same(restarted(tmp_path / "copy" / state.name), before)
    faults.clear()  # the device recovers: the next write cuts the tail and goes on
    after = s.patch(specs("g"), [])
    assert journal.read_bytes().startswith(on_disk) and journal.read_bytes().endswith(b"\n")
    same(restarted(state), after)


def test_a_failed_snapshot_leaves_the_old_files_and_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    before, on_disk, snapshot = s.registry, journal.read_bytes(), state.read_bytes()
    faults = DiskFaults(monkeypatch, lambda p: p.endswith(".tmp"))
    faults.fsync = errno.ENOSPC
    with pytest.raises(StateWriteError) as info:
        s.put(many())
    assert info.value.status == 507
    assert state.read_bytes() == snapshot and journal.read_bytes() == on_disk
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, journal.name]
    assert_not_applied(s, before)
    faults.clear()
    s.patch(specs("d"), [])  # a journal line again: the old snapshot is intact
    assert state.read_bytes() == snapshot
    after = s.put(many())
    assert journal.read_bytes() == b""  # it was a snapshot
    same(restarted(state), after)


def test_a_snapshot_renamed_but_not_made_durable_is_rewritten_by_the_next_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    before = s.registry
    faults = DiskFaults(monkeypatch, lambda p: p == str(tmp_path))  # the directory
    faults.fsync = errno.EIO
    with pytest.raises(StateWriteError) as info:
        s.put(many())
    assert "could not be made durable" in info.value.message and info.value.status == 507
    assert_not_applied(s, before)
    faults.clear()
    # The file may hold the failed revision; a journal line with the same revision
    # would be skipped on replay, so this small write is a whole snapshot.
    after = s.patch(specs("d"), [])
    assert journal_path(state).read_bytes() == b""
    back = restarted(state)
    same(back, after)
    assert ("n0", "ns", 80) not in back.services


def test_a_state_file_that_is_not_writable_is_a_500_not_a_507(tmp_path: Path) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    journal.unlink()
    journal.mkdir()  # a configuration problem, not a full disk
    before = s.registry
    with pytest.raises(StateWriteError) as info:
        s.patch(specs("d"), [])
    assert info.value.status == 500 and s.state_write_failures == 1
    assert_not_applied(s, before)


# ---------------------------------------------------------------- torn tails at start-up


def test_a_whole_last_line_without_its_newline_was_never_acknowledged(tmp_path: Path) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    acknowledged, on_disk = s.registry, journal.read_bytes()
    s.patch(specs("d"), [])
    full = journal.read_bytes()
    journal.write_bytes(full[:-1])  # every byte but the newline: its fsync never returned
    back = restarted(state)
    same(back, acknowledged)
    assert journal.read_bytes() == on_disk


def test_a_torn_tail_that_cannot_be_cut_still_starts_and_refuses_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, s = journalled(tmp_path)
    journal = journal_path(state)
    acknowledged, on_disk = s.registry, journal.read_bytes()
    journal.write_bytes(on_disk + b'{"revision": 4, "ups')
    faults = DiskFaults(monkeypatch, lambda p: p == str(journal))
    faults.ftruncate = errno.EIO
    s2 = new_store(state)
    s2.load_initial(None)  # start-up succeeds: every acknowledged write is intact
    same(s2.registry, acknowledged)
    with pytest.raises(StateWriteError, match="refusing writes"):
        s2.patch(specs("d"), [])
    faults.clear()
    after = s2.patch(specs("d"), [])
    assert journal.read_bytes().startswith(on_disk) and journal.read_bytes().endswith(b"\n")
    same(restarted(state), after)


# ---------------------------------------------------------------- corrupt allocated VIPs


@pytest.mark.parametrize("bad", ["240.0.0.999", "", 4026531841, None, "DELETE"])
def test_a_corrupt_allocated_vip_stops_start_up(tmp_path: Path, bad: object) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a", "b"))
    doc = json.loads(state.read_bytes())
    (row,) = [r for r in doc["services"] if r["name"] == "b"]
    assert row["vip_given"] is False  # allocated here: re-allocating would move it
    if bad == "DELETE":
        del row["vip"]
    else:
        row["vip"] = bad
    state.write_bytes(json.dumps(doc).encode())
    damaged = state.read_bytes()
    with pytest.raises(StateError) as info:
        new_store(state).load_initial(None)
    message = str(info.value)
    assert str(state) in message and "'b'" in message and "namespace 'ns'" in message
    assert "field vip must be an IPv4 address" in message
    assert state.read_bytes() == damaged  # left for the operator


def test_a_corrupt_allocated_vip_in_a_journal_line_stops_start_up(tmp_path: Path) -> None:
    state, _ = journalled(tmp_path)
    journal = journal_path(state)
    lines = journal.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[-1])
    entry["upsert"][0]["vip"] = "240.0.0.x"
    journal.write_bytes(lines[0] + json.dumps(entry).encode() + b"\n")
    with pytest.raises(StateError, match=r"service 'a' .*field vip must be an IPv4"):
        new_store(state).load_initial(None)


def test_a_corrupt_allocated_vip6_stops_start_up(tmp_path: Path) -> None:
    policy6 = RegistryPolicy(range4=POLICY.range4, range6=VipRange.from_cidr("fd00::/120"))
    state = tmp_path / "state.json"
    settings = ZoneSettings(range4=policy6.range4, range6=policy6.range6)
    s = RegistryStore(policy6, settings, MessageHandler(Zone(Registry.empty(), settings)), str(state))
    s.put(specs("a"))
    doc = json.loads(state.read_bytes())
    assert doc["services"][0]["vip6"] and not doc["services"][0]["vip6_given"]
    doc["services"][0]["vip6"] = "fd00::zz"
    state.write_bytes(json.dumps(doc).encode())
    with pytest.raises(StateError, match=r"service 'a' .*field vip6 must be an IPv6 address, "
                                         r"got 'fd00::zz'"):
        read_state(state, policy6, 0.0)
