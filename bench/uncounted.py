"""meshdns with counting switched off, for bench_metrics.py only: what counting costs.

    python bench/uncounted.py serve --config CONF

Runs the real CLI after replacing, in this process only, the handler's two entry
points with versions that serve cache hits without counting them, and the latency
histogram's ``observe`` with a no-op. The product has no such switch: the bench
keeps what only the bench needs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshdns.core.answer import ForwardRequest, MessageHandler
from meshdns.dns.histogram import Histogram


def _udp(self: MessageHandler, data: bytes) -> bytes | ForwardRequest | None:
    tail = data[2:]
    entry = self._state.udp.get(tail)
    if entry is not None:
        cached: bytes = entry[0]
        return data[:2] + cached
    return self._miss(data, tail, "udp")


def _tcp(self: MessageHandler, data: bytes) -> bytes | ForwardRequest | None:
    tail = data[2:]
    entry = self._state.tcp.get(tail)
    if entry is not None:
        cached: bytes = entry[0]
        return data[:2] + cached
    return self._miss(data, tail, "tcp")


def _no_observe(self: Histogram, value: float) -> None:
    pass


def uncount(cls: Any = MessageHandler) -> None:
    """Switch counting off for every handler of this process."""
    cls.handle_udp = _udp
    cls.handle_tcp = _tcp
    Histogram.observe = _no_observe  # type: ignore[method-assign]


if __name__ == "__main__":
    from meshdns.cli import main

    uncount()
    sys.exit(main())
