"""What the last registry writes changed: the follow protocol's deltas (``?since=N``).

Each published snapshot is recorded as one entry: the revision it follows, its
own revision, and the keys of the services it changed (added, rewritten or
deleted). The keys come from the write itself when it was an incremental PATCH
(``Registry._delta``), so recording a one-service change costs O(1); only a
whole-registry write (a PUT, a follower's full re-list) is compared service by
service, as that write already was O(registry).

A delta since revision N is then "the current state of every key some entry
after N touched": a service present now is an upsert, one absent a delete.
That is exact whatever happened in between (a service added then deleted is a
delete of a key the follower may not hold, which is a no-op), and lets a relay
whose entries span several of its leader's revisions serve any revision inside
them.

The history is bounded in revisions (``api.follow_history``) and in keys (no
more than the registry holds: a delta that large is better sent as a full
list). A revision it no longer reaches is answered 410 Gone, and so is one
from another lineage: a lineage id names one unbroken sequence of revisions,
so a leader that lost its registry and was written back up to the same
revision number is not mistaken for the one a follower copied.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain

from .core.registry import Registry, ServiceKey

MIN_KEYS = 1000  # keys kept even for a tiny registry


def new_lineage() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class _Entry:
    after: int  # the revision this write applied to
    revision: int  # the revision it made
    keys: tuple[ServiceKey, ...]  # services it added, changed or deleted
    at: float  # monotonic time it was recorded (coalescing waits from the first unseen)


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed after a revision: the snapshot to read them from, and which keys."""

    registry: Registry
    lineage: str
    keys: frozenset[ServiceKey]
    first_at: float | None  # when the oldest of them was recorded; None: nothing newer


def changed_keys(base: Registry, new: Registry) -> tuple[ServiceKey, ...]:
    """The keys whose service differs between ``base`` and ``new``."""
    old, cur = base.services, new.services
    touched = new.touched_since(base)
    candidates: Iterable[ServiceKey]
    if touched is not None:
        candidates = chain(*touched)  # what this incremental PATCH touched
    else:
        candidates = chain(cur, (k for k in old if k not in cur))
    return tuple(k for k in candidates
                 if (o := old.get(k)) is not (s := cur.get(k)) and o != s)


class ChangeHistory:
    """The bounded, in-memory change log one process serves deltas from.

    ``record`` is the store's hook, called for each published snapshot (from the
    event loop, or from any thread for a direct ``store.put``); readers take a
    consistent view under a lock.
    """

    def __init__(self, depth: int = 1000, lineage: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.depth = depth
        self.lineage = lineage or new_lineage()
        self.clock = clock
        self.registry: Registry | None = None  # the newest snapshot recorded
        self.oldest: int | None = None  # deltas can start from here up to registry.revision
        self._entries: deque[_Entry] = deque()
        self._keys = 0  # keys held over all entries
        self._lock = threading.Lock()
        # Called (no arguments, outside the lock, from the recording thread) after each
        # record or lineage change: the API's watch streams encode each change once here.
        self.listeners: list[Callable[[], None]] = []
        # (lineage, revision): this lineage continues that one, whose registry up to that
        # revision is this one's (a leader restarted from its state file, a relay whose
        # leader did): a request in it up to there is answered in this lineage.
        self.parent: tuple[str, int] | None = None

    @property
    def revision(self) -> int | None:
        reg = self.registry
        return None if reg is None else reg.revision

    def record(self, base: Registry | None, new: Registry,
               keys: tuple[ServiceKey, ...] | None = None) -> None:
        """``new`` was published on top of ``base`` (None: a first load).

        ``keys``: ``changed_keys(base, new)`` if the caller computed it already (in a
        worker thread: for a whole-registry write it is O(registry) on the DNS loop)."""
        try:
            self._record(base, new, keys)
        finally:
            self._notify()

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _record(self, base: Registry | None, new: Registry,
                keys: tuple[ServiceKey, ...] | None) -> None:
        contiguous = base is not None and self.registry is not None \
            and base.revision == self.registry.revision and new.revision > base.revision
        if not contiguous or base is None:
            keys = ()
        elif keys is None:
            keys = changed_keys(base, new)
        with self._lock:
            if not contiguous or base is None:
                self._restart(new)
                return
            self._entries.append(_Entry(base.revision, new.revision, keys, self.clock()))
            self._keys += len(keys)
            self.registry = new
            limit = max(MIN_KEYS, len(new.services))
            entries = self._entries
            while entries and (entries[0].after < new.revision - self.depth
                               or (self._keys > limit and len(entries) > 1)):
                self._keys -= len(entries.popleft().keys)
            if self._keys > limit:  # one write changed more than the registry holds now
                self._restart(new)
                return
            self.oldest = entries[0].after if entries else new.revision

    def adopt_lineage(self, lineage: str, reg: Registry, continues: int | None = None) -> None:
        """A follower copied ``reg`` from a leader of ``lineage``: serve that lineage.

        A changed lineage drops the history: deltas start from ``reg``; unless the new
        lineage ``continues`` the old one from that revision (the leader said so by
        answering a delta from it): the history is kept, under the new name.
        """
        with self._lock:
            changed = lineage != self.lineage
            if changed:
                if continues is not None:
                    self.parent = (self.lineage, continues)
                    self.lineage = lineage
                else:
                    self.parent = None
                    self.lineage = lineage
                    self._restart(reg)
        if changed:
            self._notify()

    def _restart(self, reg: Registry) -> None:
        self._entries.clear()
        self._keys = 0
        self.registry = reg
        self.oldest = reg.revision

    def since(self, revision: int, lineage: str | None = None) -> Changes | None:
        """What changed after ``revision``; None when the history cannot say (410)."""
        with self._lock:
            reg = self.registry
            if reg is None or (lineage is not None and lineage != self.lineage):
                return None
            return self._changes(revision, reg)

    def between(self, revision: int, upto: Registry, lineage: str) -> Changes | None:
        """What changed after ``revision`` up to ``upto``, a snapshot this history recorded
        in ``lineage`` (the changes as of then, not of now); None when it cannot say.

        A watch stream's catch-up: the stream then continues from ``upto`` with the
        events every stream gets, so it must end exactly there."""
        with self._lock:
            reg = self.registry
            if reg is None or lineage != self.lineage or upto.revision > reg.revision:
                return None
            return self._changes(revision, upto)

    def _changes(self, revision: int, upto: Registry) -> Changes | None:
        """The keys written after ``revision`` up to ``upto`` (held lock; ``upto`` is this
        history's latest snapshot or one it recorded), and when the first of them was."""
        oldest = self.oldest
        if oldest is None or not oldest <= revision <= upto.revision:
            return None
        keys: set[ServiceKey] = set()
        first: float | None = None
        for entry in reversed(self._entries):
            if entry.revision <= revision:
                break
            if entry.revision <= upto.revision:
                keys.update(entry.keys)
                first = entry.at
        if first is None and revision < upto.revision:
            first = self.clock()  # pragma: no cover - entries always cover (oldest, rev]
        return Changes(upto, self.lineage, frozenset(keys), first)

    def resolve(self, lineage: str | None, revision: int) -> str | None:
        """The lineage a request in ``lineage`` from ``revision`` is answered in: this
        one, when it is this one (or none is named), or the one this continues, up to
        where it does; None when neither (410)."""
        if lineage is None or lineage == self.lineage:
            return self.lineage
        parent = self.parent
        if parent is not None and lineage == parent[0] and revision <= parent[1]:
            return self.lineage
        return None
