"""TCP to one upstream, reused and pipelined (RFC 7766 §6.2.1).

Used for a ``protocol: tcp`` forward zone and for the retry after a TC=1 UDP reply.
Each upstream has a :class:`TcpPool` of at most ``MAX_CONNECTIONS`` connections. A
query goes on the open (or opening) connection with the fewest queries waiting; a
new connection is opened only when every one has ``PIPELINE_SPLIT`` waiting. Queries
are written back to back, without waiting for replies, and replies (in any order,
as RFC 7766 allows) are matched to their query by ID, then checked against its
question (reply.check_reply) as over UDP. IDs are unique per connection: a query
whose random ID is taken there draws another.

A connection idle for ``IDLE_TIMEOUT`` seconds is closed (the upstream may close one
sooner: it is dropped and the next query opens another). A connection that dies with
queries in flight (reset, closed by the upstream, a broken frame) hands each one back
to its caller, which sends it again on a fresh connection, at most ``RETRIES`` times
and within its deadline. A connection that cannot be opened fails its queries at
once (``error``): the forwarder asks the next upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

from .reply import MALFORMED, WRONG_ID, ReplyRejected, check_reply

Reject = Callable[[str], None]  # counts a reply dropped, by reason

MAX_CONNECTIONS = 4  # per upstream
PIPELINE_SPLIT = 32  # queries waiting on every connection before another is opened
IDLE_TIMEOUT = 10.0  # seconds a connection with nothing in flight stays open
RETRIES = 2  # fresh connections a query is sent on after the one it was on died
MAX_FRAME_BUFFER = 2 * (65535 + 2)  # more unparsed than that: the peer misbehaves


class ConnectionDied(Exception):
    """The connection a query was on closed before its reply came."""


class CannotConnect(Exception):
    """No connection to the upstream could be opened."""


class _Pending:
    __slots__ = ("future", "question", "wire")

    def __init__(self, wire: bytes, question: bytes, future: asyncio.Future[bytes]) -> None:
        self.wire = wire
        self.question = question
        self.future = future


class _Connection(asyncio.Protocol):
    """One TCP connection: frames out, frames in, replies matched by ID."""

    def __init__(self, pool: TcpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, _Pending] = {}
        self.buffer = bytearray()
        self.dead = False
        self.idle: asyncio.TimerHandle | None = None
        self.sent = 0  # queries written (tests and metrics read it)

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        self.transport = writer
        if self.pending:  # queued while it was opening, in the order they came
            writer.write(b"".join(len(p.wire).to_bytes(2, "big") + p.wire
                                  for p in self.pending.values()))
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2:2 + size])
            del buf[:2 + size]
            self._reply(message)
        if len(buf) > MAX_FRAME_BUFFER:
            self.close()

    def eof_received(self) -> bool | None:
        return False  # the upstream is done with it: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._die()

    # ------------------------------------------------------------ queries

    def _reply(self, message: bytes) -> None:
        if len(message) < 2:
            self.pool.reject(MALFORMED)
            return
        pending = self.pending.pop((message[0] << 8) | message[1], None)
        if pending is None:
            self.pool.reject(WRONG_ID)  # none of ours on this connection (or late)
            return
        if not pending.future.done():
            pending.future.set_result(message)
        if not self.pending:
            self._arm_idle()

    def send(self, wire: bytes, question: bytes) -> tuple[bytes, asyncio.Future[bytes]]:
        """Queue ``wire`` (its ID made unique here); the future gets the raw reply."""
        qid = (wire[0] << 8) | wire[1]
        while qid in self.pending:
            qid = self.pool.ids.randrange(0x10000)
        if qid != (wire[0] << 8) | wire[1]:
            wire = qid.to_bytes(2, "big") + wire[2:]
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = _Pending(wire, question, future)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self.transport is not None:  # else still opening: written by connection_made
            self.transport.write(len(wire).to_bytes(2, "big") + wire)
        self.sent += 1
        return wire, future

    def forget(self, wire: bytes) -> None:
        """The caller gave up on ``wire`` (its deadline): a late reply is not ours."""
        qid = (wire[0] << 8) | wire[1]
        pending = self.pending.get(qid)
        if pending is not None and pending.wire is wire:
            del self.pending[qid]
            if not self.pending:
                self._arm_idle()

    def _arm_idle(self) -> None:
        if self.idle is None and not self.dead:
            self.idle = asyncio.get_running_loop().call_later(self.pool.idle_timeout,
                                                              self.close)

    def close(self) -> None:
        if self.transport is not None:
            if self.pending:
                self.transport.abort()
            else:
                self.transport.close()
        self._die()

    def _die(self) -> None:
        if self.dead:
            return
        self.dead = True
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.pool.forget(self)
        if not self.ready.done():
            self.ready.set_exception(CannotConnect())
            self.ready.exception()  # retrieved: each waiter sees it through its future
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionDied())


class TcpPool:
    """The TCP connections to one upstream address."""

    def __init__(self, host: str, port: int, reject: Reject, *,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT
                 ) -> None:
        self.host = host
        self.port = port
        self.reject = reject
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.connections: list[_Connection] = []
        self.opened = 0  # connections opened, ever (tests count them)
        self.retried = 0  # queries sent again after their connection died
        self.ids = random.SystemRandom()
        self._connecting: set[asyncio.Task[None]] = set()

    def _pick(self) -> _Connection:
        best: _Connection | None = None
        for conn in self.connections:
            if best is None or len(conn.pending) < len(best.pending):
                best = conn
        if best is not None and (len(best.pending) < PIPELINE_SPLIT
                                 or len(self.connections) >= self.max_connections):
            return best
        return self._open()

    def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        self.connections.append(conn)
        self.opened += 1

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: conn, self.host, self.port)
            except OSError:
                conn.close()

        task = asyncio.ensure_future(connect())
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return conn

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)

    async def query(self, wire: bytes, question: bytes, deadline: float) -> tuple[bytes, bytes]:
        """The query as sent (its ID one not in flight on the connection) and its raw
        reply, ID and question checked: sent on a pooled connection, again on a fresh
        one if that one dies in flight.

        Raises TimeoutError at ``deadline``, CannotConnect, ConnectionDied (after
        RETRIES fresh connections), ReplyRejected for a reply to another question."""
        tries = 0
        while True:
            conn = self._pick()
            sent, future = conn.send(wire, question)
            try:
                async with asyncio.timeout_at(deadline):
                    data = await future
            except ConnectionDied:
                if conn.transport is None:  # never connected: the upstream refuses
                    raise CannotConnect() from None
                tries += 1
                if tries > RETRIES:
                    raise
                self.retried += 1
                continue
            except BaseException:
                conn.forget(sent)
                raise
            check_reply(data, sent, question)
            return sent, data

    def retire(self) -> None:
        """No longer a configured upstream (SIGHUP): each connection closes as soon as
        nothing is in flight on it."""
        self.idle_timeout = 0.0
        for conn in list(self.connections):
            if not conn.pending:
                conn.close()

    def close(self) -> None:
        for task in list(self._connecting):
            task.cancel()
        for conn in list(self.connections):
            conn.close()


__all__ = ["CannotConnect", "ConnectionDied", "ReplyRejected", "TcpPool"]
