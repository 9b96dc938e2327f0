"""The state file and its journal hold the whole registry: both are private (0600),
whatever the umask, and a journal an older meshdns left world-readable is tightened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshdns.store import journal_path

from .test_state_journal import new_store, specs


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)  # the usual default: files the process creates 0644 unless told
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_journal_is_created_0600_like_the_state_file(tmp_path: Path, umask_022: None) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a", "b", "c"))
    s.patch(specs("d"), [])  # a small write: one journal line
    journal = journal_path(state)
    assert journal.exists() and journal.read_bytes().count(b"\n") == 1
    assert mode(state) == 0o600
    assert mode(journal) == 0o600


def test_a_world_readable_journal_is_tightened_on_the_next_append(tmp_path: Path,
                                                                  umask_022: None) -> None:
    state = tmp_path / "state.json"
    s = new_store(state)
    s.load_initial(None)
    s.put(specs("a", "b", "c"))
    s.patch(specs("d"), [])
    journal = journal_path(state)
    journal.chmod(0o644)  # as an older meshdns created it
    s.patch(specs("e"), [])
    assert mode(journal) == 0o600
    assert journal.read_bytes().count(b"\n") == 2
