"""The state journal: one appended line per write, replayed onto the snapshot at start."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ..core.registry import Registry, ServiceKey, key_of_list, key_of_record
from .records import StateWriteError, fast_ip4, fast_ip6, fsync_dir, service_record

log = logging.getLogger("meshdns.registry")

#
# A PATCH of one service in a 100k-service registry must not rewrite a 10 MB
# state file. Each write appends one line to ``<state_file>.journal`` holding
# what changed (services upserted and deleted, hold-down entries set and
# cleared), fsynced before the write is acknowledged. Start-up replays the
# lines newer than the snapshot; a torn last line was never acknowledged and is
# cut off. When the journal grows past JOURNAL_MAX_ENTRIES or half the
# snapshot's size, the next write is a snapshot and the journal starts empty.
#
# An append that fails (ENOSPC, EIO) may have written part of its line: the file
# is cut back to its length before the append and fsynced, so the next append
# starts on a line boundary. If even that fails, the journal is marked damaged
# and every write is refused until the cut succeeds: an append onto a torn line
# would turn an acknowledged write into a corrupt middle line.

JOURNAL_MAX_ENTRIES = 1000


def journal_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".journal")


def _held_diff(old: Any, new: Any, fmt: Callable[[int], str]) -> dict[str, Any]:
    return {"set": [[fmt(v), t, list(k)] for v, (t, k) in new.items() if old.get(v) != (t, k)],
            "clear": [fmt(v) for v in old if v not in new]}


def journal_entry(base: Registry, new: Registry) -> dict[str, Any] | None:
    """What ``new`` changes relative to ``base`` (unchanged services cost a compare);
    None when that is a large part of the registry: a snapshot is the better write."""
    old_services, services = base.services, new.services
    touched = new.touched_since(base)
    written: Collection[ServiceKey]
    deleted: Collection[ServiceKey]
    if touched is not None:
        # An incremental PATCH of this very snapshot says which keys it touched.
        written, deleted = touched
    else:
        written, deleted = services.keys(), old_services.keys()
    changed = [s for k in written if (s := services.get(k)) is not None
               and (o := old_services.get(k)) is not s and o != s]
    delete = [list(k) for k in deleted if k not in services and k in old_services]
    if len(changed) + len(delete) > max(1000, len(services) // 10):
        return None
    upsert = [service_record(s) for s in changed]
    return {"revision": new.revision, "upsert": upsert, "delete": delete,
            "held4": _held_diff(base.held4, new.held4, fast_ip4),
            "held6": _held_diff(base.held6, new.held6, fast_ip6)}


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = 0
        self.size = 0
        self.snapshot_size = 0
        # The length to cut the file back to, while a failed append's rollback is
        # still owed; None when the file ends on a whole line.
        self.damaged_at: int | None = None
        self.dir_pending = False  # created, but its directory entry not yet fsynced

    def refresh(self) -> None:
        """Count what the journal holds (after start-up replayed it)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.entries, self.size = data.count(b"\n"), len(data)
        if data and not data.endswith(b"\n"):  # replay could not cut its torn tail
            self.damaged_at = self.size = data.rfind(b"\n") + 1

    def has_room(self, services: int) -> bool:
        # Half the snapshot, estimated at ~150 bytes a service, and at least 1 MiB.
        limit = max(1 << 20, services * 75)
        return self.entries < JOURNAL_MAX_ENTRIES and self.size < limit

    def append(self, entry: dict[str, Any]) -> None:
        """One fsynced line, or OSError with the file as it was before."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        self.repair()
        new_entry = self.dir_pending or not self.path.exists()
        # 0600, like the snapshot (tempfile.mkstemp): both hold the whole registry.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:  # created by an older meshdns with the umask's 0644
                os.fchmod(fd, 0o600)
            good = st.st_size  # whole lines only: repair() saw to that
            try:
                view = memoryview(line)
                while view:  # a nearly full disk takes part of a write, then says ENOSPC
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if new_entry:
                    fsync_dir(self.path)
            except OSError as exc:
                self.dir_pending = new_entry
                self._roll_back(fd, good, exc)
                raise
        finally:
            os.close(fd)
        self.dir_pending = False
        self.entries += 1
        self.size = good + len(line)

    def _roll_back(self, fd: int, good: int, cause: OSError) -> None:
        try:
            os.ftruncate(fd, good)
            os.fsync(fd)
        except OSError as exc:
            self.damaged_at = good
            log.error("state journal %s: a failed append (%s) could not be rolled back (%s); "
                      "refusing writes until it can be cut back to %d bytes", self.path,
                      cause.strerror or cause, exc.strerror or exc, good)
        else:
            log.warning("state journal %s: a failed append (%s) was rolled back to %d bytes",
                        self.path, cause.strerror or cause, good)

    def repair(self) -> None:
        """Cut off what a failed append left, or StateWriteError: no write may go on."""
        good = self.damaged_at
        if good is None:
            return
        try:
            _truncate(self.path, good)
        except FileNotFoundError:
            pass  # removed by hand: nothing left to cut
        except OSError as exc:
            raise StateWriteError(exc.errno, f"the state journal {self.path} still holds part "
                                  f"of a failed write and cannot be cut back ({exc.strerror or exc}); "
                                  "refusing writes until it can, nothing changed") from exc
        log.info("state journal %s: cut back to %d bytes; writes resume", self.path, good)
        self.damaged_at = None
        self.size = good

    def reset(self) -> None:
        if self.path.exists():
            with open(self.path, "wb") as f:
                f.flush()
                os.fsync(f.fileno())
        self.entries = self.size = 0
        self.damaged_at = None


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: Path, good: int, torn: int) -> None:
    log.warning("dropping a torn last line of %s (%d bytes without a newline: a write that "
                "was never acknowledged)", path, torn)
    try:
        _truncate(path, good)
    except OSError as exc:
        # Start-up goes on without the line; the store refuses writes until the cut
        # succeeds (Journal.refresh sees the tail), so nothing is appended onto it.
        log.error("could not cut the torn last line off %s (%s)", path, exc.strerror or exc)


def replay_journal(doc: dict[str, Any], path: Path) -> int:
    """Apply the journal's lines newer than the snapshot to ``doc``; the final revision.

    A last line without its newline is a write that was cut short before it was
    acknowledged (even if what it holds parses): it is dropped and cut off the
    file so later appends start clean. A bad line anywhere else, including a last
    one with its newline, is corruption: ValueError.
    """
    revision = int(doc["revision"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return revision
    lines = data.split(b"\n")
    good = 0  # bytes of the journal that are whole, parsed lines
    entries: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if last:
            if line:
                _cut_torn_tail(path, good, len(line))
            break
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
                raise ValueError("not a journal entry")
        except ValueError as exc:
            raise ValueError(f"journal {path} line {i + 1} is corrupt: {exc}") from None
        entries.append(entry)
        good += len(line) + 1
    if not entries:
        return revision
    services = {key_of_record(r): r for r in doc["services"]}
    held = doc.setdefault("held", {})
    tables = {fam: {row[0]: row for row in held.get(fam, [])} for fam in ("ipv4", "ipv6")}
    for entry in entries:
        if entry["revision"] <= revision:
            continue  # already in the snapshot (a crash between snapshot and journal reset)
        if isinstance(entry.get("lineage"), str):
            doc["lineage"] = entry["lineage"]  # the lineage that made this revision
        for key in entry["delete"]:
            services.pop(key_of_list(key), None)
        for record in entry["upsert"]:
            services[key_of_record(record)] = record
        for fam, diff in (("ipv4", entry["held4"]), ("ipv6", entry["held6"])):
            for ip in diff["clear"]:
                tables[fam].pop(ip, None)
            for row in diff["set"]:
                tables[fam][row[0]] = row
        revision = entry["revision"]
    doc["services"] = list(services.values())
    doc["held"] = {fam: list(rows.values()) for fam, rows in tables.items()}
    doc["revision"] = revision
    return revision
