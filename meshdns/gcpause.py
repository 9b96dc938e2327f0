"""Pause CPython's cyclic garbage collector around bulk registry work.

Building a snapshot of N services allocates several objects per service, all
of which stay alive. The collector counts those allocations and, as the heap
grows, keeps rescanning everything allocated so far: at 100k services about a
third of a PUT's build time went to collections that could find no garbage.
Reference counting still frees everything as usual while paused; only the
search for unreachable cycles waits until the last bulk job ends (nesting and
threads are counted), and resumes exactly as it was before the first.
"""

from __future__ import annotations

import contextlib
import functools
import gc
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
