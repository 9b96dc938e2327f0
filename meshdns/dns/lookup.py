"""One forwarded lookup as a state machine driven by callbacks: no task, no future.

A cache miss used to cost a task, a shielded future, a coroutine chain and a
timeout context per lookup, on top of the socket work. Here a :class:`Lookup` is one
object from the client's datagram to its reply: it sends on an upstream's pooled UDP
socket (udppool.py), where the socket keeps the lookup itself under the query's ID;
its deadline goes into the forwarder's :class:`Timeouts` (a bucket of a coarse
wheel, one loop timer for all lookups, not one ``call_at`` each); on the reply (a
reader callback) or the deadline it moves on: the next upstream, or
:meth:`finish` with the answer, which the forwarder renders for each waiting client
and hands to the client's transport callback. Only what is rare takes a task: TCP
(a ``protocol: tcp`` zone, a TC=1 reply), whose connections are pipelined
coroutines (tcpupstream.py).

A waiter is a tuple ``(request, proto, done, ctx)``: ``done(ctx, reply)`` is called
once, with the reply bytes, or None when there is none to send (shutting down). A
waiter with no request (``/v1/resolve``) gets the entry itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .reply import ParsedReply, build_query, query_tail
from .scrub import Owned
from .udppool import UdpPorts, _Port
from .upstream import (
    ERROR,
    OK,
    TIMEOUT,
    TRUNCATED,
    Upstream,
    judge,
    query_tcp,
    try_order,
)

if TYPE_CHECKING:
    from .cache import CachedReply

log = logging.getLogger("meshdns.forward")

TICKS = 100  # buckets of Timeouts per second: a deadline fires at most 1/TICKS s late
# (request, proto, done, ctx): done(ctx, reply bytes or None), once.
Waiter = tuple[Any, str, Callable[[Any, Any], None], Any]


class Timeouts:
    """The deadlines of the UDP attempts in flight, in buckets of 1/TICKS seconds, with
    one loop timer armed for the earliest bucket.

    A lookup goes into the bucket of its deadline rounded up (it never fires early)
    and out of it when its reply comes (a set: adding and taking out cost a hash,
    nothing is left behind for the collector). The timer fires once per bucket at
    most, so a thousand queries a second in flight cost a hundred timer wakeups, not
    a thousand ``call_at`` handles.
    """

    __slots__ = ("armed", "buckets", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, set[Lookup]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.armed = 0  # the bucket the timer is armed for (0: none)

    def add(self, lookup: Lookup, when: float) -> int:
        """File ``lookup`` to time out at ``when`` (loop time); its bucket."""
        tick = int(when * TICKS) + 1
        bucket = self.buckets.get(tick)
        if bucket is None:
            bucket = self.buckets[tick] = set()
            if not self.armed or tick < self.armed:
                self._arm(tick)
        bucket.add(lookup)
        return tick

    def discard(self, lookup: Lookup, tick: int) -> None:
        bucket = self.buckets.get(tick)
        if bucket is not None:
            bucket.discard(lookup)  # an empty bucket goes when its time comes

    def _arm(self, tick: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed = tick
        # A millisecond after the bucket's end: the loop's clock may run a little behind.
        self.timer = self.loop.call_at(tick / TICKS + 0.001, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.armed = 0
        buckets = self.buckets
        now = self.loop.time()
        while buckets:
            tick = min(buckets)
            if tick > now * TICKS:
                self._arm(tick)
                return
            for lookup in buckets.pop(tick):
                lookup.timed_out()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.armed = 0
        self.buckets.clear()


class Lookup:
    """The upstreams of one zone asked in health order for one question, each with an
    equal share of what is left of the budget; ``settle`` makes the entry. It is its
    own pool socket's asker (udppool.Asker: ``port``, ``qid``, ``sent``, ``udp_reply``)."""

    __slots__ = (
        "budget_end",
        "finished",
        "index",
        "keep",
        "key",
        "loop",
        "order",
        "owned",
        "owner",
        "port",
        "protocol",
        "q",
        "qid",
        "question",
        "results",
        "sent",
        "sent_ns",
        "t0",
        "tail",
        "task",
        "tick",
        "waiters",
    )

    def __init__(self, owner: Any, key: Any, q: Any, question: bytes, upstreams: list[Upstream],
                 protocol: str, budget: float, owned: Owned | None,
                 keep: CachedReply | None, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner  # the Forwarder: _reject, _health, on_upstream, _settle, _deliver
        self.key = key
        self.q = q
        self.question = question
        self.protocol = protocol
        self.owned = owned
        self.keep = keep
        self.loop = loop
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
        self.waiters: list[Waiter] = []
        self.port: _Port | None = None  # the pool socket our UDP query is in flight on
        self.qid = 0
        self.sent = b""  # the UDP query as sent (its ID drawn by the pool)
        # The query after its ID, the same for every UDP attempt.
        self.tail = query_tail(question, bool(q.cd), bool(key[3]))
        self.tick = 0  # the Timeouts bucket of the UDP attempt in flight (0: none)
        self.task: asyncio.Future[None] | None = None
        self.t0 = 0.0
        self.sent_ns = 0
        self.finished = False

    # ------------------------------------------------------------ driving

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        """Ask the next upstream in order, or finish (SERVFAIL) when none is left."""
        now = self.loop.time()
        if self.index >= len(self.order) or now >= self.budget_end:
            self._finish(None)
            return
        up = self.order[self.index]
        share_end = self._share_end(now)
        self.t0 = now
        if self.protocol == "tcp":
            self._tcp(up, share_end)
            return
        owner = self.owner
        pool = up.udp
        if pool is None:
            pool = up.udp = UdpPorts(up.sockaddr, up.family, up.ports, owner._reject,
                                     self.loop)
        self.sent_ns = time.time_ns() if owner.on_upstream is not None else 0
        if not pool.send(self, self.tail):
            self._attempt(up, ERROR, None, "udp", b"\0\0" + self.tail)
            return
        self.tick = owner.timeouts.add(self, share_end)

    def _share_end(self, now: float) -> float:
        """The current upstream's deadline: an equal share of what is left of the
        budget, so a dead upstream cannot eat it."""
        return now + (self.budget_end - now) / (len(self.order) - self.index)

    def udp_reply(self, data: bytes | None) -> None:
        """The pool socket's callback: the reply to our query, or None (ICMP error)."""
        try:
            if self.tick:
                self.owner.timeouts.discard(self, self.tick)
                self.tick = 0
            if data is None:
                result, parsed = ERROR, None
            else:
                result, parsed = judge(data, len(self.question), self.owned,
                                       self.owner._reject, bool(data[2] & 0x02))
            self._attempt(self.order[self.index], result, parsed, "udp", self.sent, data)
        except Exception:  # a bug must not leave clients waiting forever
            log.exception("forwarded lookup failed")
            self._finish(None)

    def timed_out(self) -> None:
        """Timeouts' callback: the UDP attempt's deadline passed."""
        try:
            self.tick = 0
            UdpPorts.cancel(self)
            self._attempt(self.order[self.index], TIMEOUT, None, "udp", self.sent)
        except Exception:
            log.exception("forwarded lookup failed")
            self._finish(None)

    def _attempt(self, up: Upstream, result: str, parsed: ParsedReply | None, proto: str,
                 wire: bytes, data: bytes | None = None) -> None:
        """Count one attempt (``data``: the reply as it came, for log.dnstap); then TCP
        after TC=1, the answer, or the next upstream."""
        if self.finished:
            return
        now = self.loop.time()
        tap = self.owner.on_upstream
        if tap is not None and wire:
            tap(proto, up.address, wire, data, self.sent_ns, time.time_ns())
        change = up.record(result, now - self.t0, now)
        if change is not None:
            self.owner._health(up, change, result)
        if result == TRUNCATED:
            self.t0 = now
            self._tcp(up, self._share_end(now))
            return
        if result == OK:
            self._finish(parsed)
            return
        self.results += (result,)
        self.index += 1
        self._next()

    def _tcp(self, up: Upstream, deadline: float) -> None:
        self.task = asyncio.ensure_future(self._ask_tcp(up, deadline))

    async def _ask_tcp(self, up: Upstream, deadline: float) -> None:
        try:
            self.sent_ns = time.time_ns() if self.owner.on_upstream is not None else 0
            wire = build_query(self.question, self.owner._ids.randrange(0x10000), self.q.cd,
                               self.key[3])
            attempt = await query_tcp(up, wire, self.question, deadline, self.owner._reject,
                                      self.owned)
            self.task = None
            self._attempt(up, attempt.result, attempt.reply, "tcp", attempt.sent or wire,
                          attempt.data)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forwarded lookup failed")
            self.task = None
            self._finish(None)

    # ------------------------------------------------------------ ending

    def _finish(self, parsed: ParsedReply | None) -> None:
        if self.finished:
            return
        self.finished = True
        waiters, self.waiters = self.waiters, []
        owner = self.owner
        try:
            entry = owner._settle(self, parsed)
        except Exception:  # a bug: the waiters get SERVFAIL
            log.exception("forwarded lookup failed")
            owner._deliver(None, waiters)
            return
        owner._deliver(entry, waiters)

    def cancel(self) -> None:
        """Shutting down: stop asking; waiting clients get no reply (``done(ctx, None)``)."""
        if self.finished:
            return
        self.finished = True
        if self.tick:
            self.owner.timeouts.discard(self, self.tick)
            self.tick = 0
        UdpPorts.cancel(self)
        if self.task is not None:
            self.task.cancel()
        waiters, self.waiters = self.waiters, []
        for _req, _proto, done, ctx in waiters:
            try:
                done(ctx, None)
            except Exception:
                log.exception("forwarded lookup: a waiter failed")
