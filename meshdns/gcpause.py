"""Pause CPython's cyclic garbage collector around bulk registry work.

Building a snapshot of N services allocates several objects per service, all
of which stay alive. The collector counts those allocations and, as the heap
grows, keeps rescanning everything allocated so far: at 100k services about a
third of a PUT's build time went to collections that could find no garbage.
Reference counting still frees everything as usual while paused; only the
search for unreachable cycles waits until the last bulk job ends (nesting and
threads are counted), and resumes exactly as it was before the first.

``bulk_write`` is the whole protection one large registry write gets, wherever
it comes from (a PUT on the leader, a follower adopting its leader's registry):
the collector paused, a short thread switch interval, what it built frozen, and
the heap handed back to the system once a large write has freed its predecessor.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def paused(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` run under :func:`gc_paused` (for ``asyncio.to_thread(paused(f), ...)``)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with gc_paused():
            return fn(*args, **kwargs)

    return run


# While a write decodes and builds in a worker thread, the event loop thread (DNS)
# needs the GIL back quickly: CPython hands it over every switch interval (5 ms by
# default), and a UDP answer takes several hand-overs. 1 ms keeps DNS within a few
# ms of its idle latency for the second or two a 100k-service write takes.
WRITE_SWITCH_INTERVAL = 0.001
# Objects a write left for the collector above which they are frozen, not scanned.
FREEZE_AFTER = 50_000
_writes_in_flight = 0
_switch_interval_before = 0.005


@contextlib.contextmanager
def bulk_write() -> Iterator[None]:
    """One write's decode, build and publish, kept from stalling DNS.

    The cyclic collector stays paused for the whole write: resumed between the
    parse and the build, it would scan every object the parse made, in one call
    that holds the GIL (~50-150 ms at 100k services). What a large write leaves
    behind is frozen at the end, like the registry loaded at start-up
    (server.start): a new snapshot is long-lived and acyclic, and reference
    counting still frees it when it is replaced. Must be entered on the event
    loop thread (it counts writes without a lock).
    """
    global _writes_in_flight, _switch_interval_before
    if _writes_in_flight == 0:
        _switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(min(WRITE_SWITCH_INTERVAL, _switch_interval_before))
    _writes_in_flight += 1
    try:
        with gc_paused():
            try:
                yield
            finally:
                if gc.get_count()[0] > FREEZE_AFTER:
                    gc.freeze()
    finally:
        _writes_in_flight -= 1
        if _writes_in_flight == 0:
            sys.setswitchinterval(_switch_interval_before)


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl)
    except OSError:  # pragma: no cover - no loadable C library
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim = _load_malloc_trim()


def release_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``).

    After a large registry is replaced by a small one, what it occupied is free
    inside the process but stays in its RSS: glibc returns only the top of the
    main heap on its own, never the free pages in the middle of it or of the
    per-thread arenas the worker threads allocated the registry in. ctypes drops
    the GIL for the call, so from a worker thread it does not hold up DNS.
    False where there is no glibc (nothing done).

    First, unless a bulk job has the collector paused, a full collection: it is
    what empties the interpreter's free lists (tuples, floats, dicts, lists
    kept for re-use), whose objects pin pymalloc arenas just as live ones do
    (-13 MiB of RSS at 100k -> 3 services). Cheap after a large write, which froze
    what it built: frozen objects are not scanned.
    """
    with _lock:
        idle = _depth == 0
    if idle:
        gc.collect()
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
