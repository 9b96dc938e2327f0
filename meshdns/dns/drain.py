"""Graceful drain on SIGTERM (lameduck), the way node resolvers restart without loss.

1. ``/readyz`` fails at once (``DrainState.draining``), so a Service or a load
   balancer stops sending new clients here, while DNS answers as before for
   ``dns.lameduck`` seconds (CoreDNS ``health { lameduck 5s }``).
2. Then the listeners stop taking queries: each UDP socket is detached from its
   SO_REUSEPORT group (``detach_udp``: a successor started on the same port gets
   every new datagram), TCP listeners stop accepting.
3. What is already here is finished: datagrams queued in the sockets, forwarded
   lookups in flight, TCP queries waiting on an upstream, up to a bound.
4. The server then stops as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .transport import TcpLimits, detach_udp, udp_queued

log = logging.getLogger("meshdns.drain")

SETTLE = 0.05  # s after detaching: datagrams the kernel was already delivering land
POLL = 0.01


@dataclass
class DrainState:
    """Whether this process is draining (read by /readyz)."""

    lameduck: float
    since: float | None = None  # time.time() of the SIGTERM

    @property
    def draining(self) -> bool:
        return self.since is not None


async def drain(state: DrainState, udp: Sequence[Any], tcp: Sequence[asyncio.AbstractServer],
                limits: TcpLimits, inflight: Callable[[], int], finish_within: float) -> None:
    """Steps 1-3 above; returns when nothing is left to answer or ``finish_within``
    seconds after the lameduck period."""
    state.since = time.time()
    if state.lameduck > 0:
        log.info("draining: /readyz fails, DNS answers for %g s more (dns.lameduck)",
                 state.lameduck)
        await asyncio.sleep(state.lameduck)
    for transport in udp:
        detach_udp(transport)
    for server in tcp:
        server.close()
    await asyncio.sleep(SETTLE)
    deadline = time.monotonic() + finish_within
    while time.monotonic() < deadline:
        busy = (any(udp_queued(t) for t in udp) or inflight() > 0
                or any(conn.pending for conn in limits.connections))
        if not busy:
            break
        await asyncio.sleep(POLL)
    else:
        log.warning("draining: still busy after %g s; stopping anyway", finish_within)
    log.info("drained: stopping")
