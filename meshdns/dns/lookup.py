"""One forwarded lookup as a state machine driven by callbacks: no task, no coroutine.

A cache miss used to cost a task, a shielded future, a coroutine chain and a
timeout context per lookup, on top of the socket work. Here a :class:`Lookup` is one
object: it sends on an upstream's pooled UDP socket (udppool.py) with ``done``
pointing back at itself, arms one timer for that upstream's share of the budget,
and on the reply (a reader callback) or the timer moves on: the next upstream, or
:meth:`finish` with the answer. Only what is rare takes a task: TCP (a
``protocol: tcp`` zone, a TC=1 reply), whose connections are pipelined coroutines
(tcpupstream.py).

Clients wait on plain futures (:meth:`wait`); one client giving up cancels only its
own future, never the lookup others wait on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .reply import build_query
from .scrub import Owned
from .udppool import Exchange, UdpPorts
from .upstream import (
    ERROR,
    OK,
    TIMEOUT,
    TRUNCATED,
    Attempt,
    Upstream,
    parsed_attempt,
    query_tcp,
    try_order,
)

if TYPE_CHECKING:
    from .cache import CachedReply

log = logging.getLogger("meshdns.forward")


class Lookup:
    """The upstreams of one zone asked in health order for one question, each with an
    equal share of what is left of the budget; ``settle`` makes the entry."""

    __slots__ = (
        "budget_end",
        "cd",
        "dnssec_ok",
        "exchange",
        "finished",
        "index",
        "keep",
        "key",
        "loop",
        "order",
        "owned",
        "owner",
        "protocol",
        "q",
        "question",
        "results",
        "sent_ns",
        "t0",
        "task",
        "timer",
        "waiters",
    )

    def __init__(self, owner: Any, key: Any, q: Any, question: bytes, upstreams: list[Upstream],
                 protocol: str, budget: float, owned: Owned | None,
                 keep: CachedReply | None) -> None:
        self.owner = owner  # the Forwarder: _reject, _health, on_upstream, _settle
        self.key = key
        self.q = q
        self.question = question
        self.protocol = protocol
        self.owned = owned
        self.keep = keep
        self.cd = bool(q.cd)
        self.dnssec_ok = bool(key[3])
        self.loop = loop = asyncio.get_running_loop()
        now = loop.time()
        self.budget_end = now + budget
        # Every upstream healthy (the common case): the zone's own list, in its order
        # (only read); else try_order's health order.
        for up in upstreams:
            if up.failures:
                self.order = try_order(upstreams, now, budget)
                break
        else:
            self.order = upstreams
        self.index = 0
        self.results: tuple[str, ...] = ()  # of the failed attempts (the answer's EDE)
        self.waiters: list[asyncio.Future[CachedReply]] = []
        self.exchange: Exchange | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Future[None] | None = None
        self.t0 = 0.0
        self.sent_ns = 0
        self.finished = False

    # ------------------------------------------------------------ driving

    def start(self) -> None:
        self._next()

    def wait(self) -> asyncio.Future[CachedReply]:
        future: asyncio.Future[CachedReply] = self.loop.create_future()
        self.waiters.append(future)
        return future

    def _next(self) -> None:
        """Ask the next upstream in order, or finish (SERVFAIL) when none is left."""
        loop = self.loop
        now = loop.time()
        if self.index >= len(self.order) or now >= self.budget_end:
            self._finish(None)
            return
        up = self.order[self.index]
        share_end = self._share_end(now)
        self.t0 = now
        if self.protocol == "tcp":
            self._tcp(up, share_end)
            return
        pool = up.udp
        if pool is None:
            pool = up.udp = UdpPorts(up.sockaddr, up.family, up.ports, self.owner._reject)
        self.sent_ns = time.time_ns() if self.owner.on_upstream is not None else 0
        wire = build_query(self.question, 0, self.cd, self.dnssec_ok)  # the pool draws the ID
        self.exchange = pool.send(wire, self.question, self._reply)
        if self.exchange is None:
            self._attempt(up, Attempt(ERROR), "udp", wire)
            return
        self.timer = loop.call_at(share_end, self._timeout)

    def _share_end(self, now: float) -> float:
        """The current upstream's deadline: an equal share of what is left of the
        budget, so a dead upstream cannot eat it."""
        return now + (self.budget_end - now) / (len(self.order) - self.index)

    def _reply(self, data: bytes | None) -> None:
        """A pool socket's callback: the reply to our query, or None (ICMP error)."""
        try:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            ex, self.exchange = self.exchange, None
            assert ex is not None
            up = self.order[self.index]
            if data is None:
                attempt = Attempt(ERROR)
            else:
                attempt = parsed_attempt(data, self.question, self.owned, self.owner._reject)
            self._attempt(up, attempt, "udp", ex.wire, data)
        except Exception:  # a bug must not leave clients waiting forever
            log.exception("forwarded lookup failed")
            self._finish(None)

    def _timeout(self) -> None:
        try:
            self.timer = None
            ex, self.exchange = self.exchange, None
            if ex is not None:
                ex.cancel()
            self._attempt(self.order[self.index], Attempt(TIMEOUT), "udp",
                          ex.wire if ex is not None else b"")
        except Exception:
            log.exception("forwarded lookup failed")
            self._finish(None)

    def _attempt(self, up: Upstream, attempt: Attempt, proto: str, wire: bytes,
                 data: bytes | None = None) -> None:
        """Count one attempt; then TCP after TC=1, the answer, or the next upstream."""
        if self.finished:
            return
        now = self.loop.time()
        tap = self.owner.on_upstream
        if tap is not None and wire:
            tap(proto, up.address, wire, data if data is not None else attempt.data,
                self.sent_ns, time.time_ns())
        self.owner._health(up, up.record(attempt.result, now - self.t0, now), attempt.result)
        if attempt.result == TRUNCATED:
            self.t0 = now
            self._tcp(up, self._share_end(now))
            return
        if attempt.result == OK:
            self._finish(attempt)
            return
        self.results += (attempt.result,)
        self.index += 1
        self._next()

    def _tcp(self, up: Upstream, deadline: float) -> None:
        self.task = asyncio.ensure_future(self._ask_tcp(up, deadline))

    async def _ask_tcp(self, up: Upstream, deadline: float) -> None:
        try:
            self.sent_ns = time.time_ns() if self.owner.on_upstream is not None else 0
            wire = build_query(self.question, self.owner._ids.randrange(0x10000), self.cd,
                               self.dnssec_ok)
            attempt = await query_tcp(up, wire, self.question, deadline, self.owner._reject,
                                      self.owned)
            self.task = None
            self._attempt(up, attempt, "tcp", attempt.sent or wire)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forwarded lookup failed")
            self.task = None
            self._finish(None)

    # ------------------------------------------------------------ ending

    def _finish(self, attempt: Attempt | None) -> None:
        if self.finished:
            return
        self.finished = True
        waiters, self.waiters = self.waiters, []
        try:
            entry = self.owner._settle(self, attempt.reply if attempt is not None else None)
        except Exception as exc:  # a bug: the waiters see it (the transport logs it)
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            return
        for future in waiters:
            if not future.done():
                future.set_result(entry)

    def cancel(self) -> None:
        """Shutting down: stop asking; waiting clients get CancelledError."""
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.exchange is not None:
            self.exchange.cancel()
            self.exchange = None
        if self.task is not None:
            self.task.cancel()
        waiters, self.waiters = self.waiters, []
        for future in waiters:
            future.cancel()
