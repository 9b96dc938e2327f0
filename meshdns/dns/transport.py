"""Thin asyncio adapters: datagrams and TCP frames in, core replies out.

All DNS policy lives in :mod:`meshdns.core`; these classes only move bytes,
enforce the TCP limits (RFC 7766 framing and pipelining, idle timeout,
connection cap, bounded buffers) and hand forwardable queries to the
forwarder. A bug in the core answers SERVFAIL for that one message and never
takes the listener down.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ..core.resolver import ForwardRequest, Resolver
from ..core.wire import HEADER_LEN, RCODE_SERVFAIL
from .histogram import Histogram

log = logging.getLogger("meshdns.dns")

Forward = Callable[[ForwardRequest, str], Awaitable[bytes | None]]
MAX_TCP_PENDING = 64  # forwarded queries in flight per TCP connection before pausing reads
SAMPLE_MASK = 63  # time one locally answered message in 64; forwarded ones are all timed


_tasks: set[asyncio.Future[None]] = set()  # strong references: a task must not be collected


def _spawn(coro: Awaitable[None]) -> None:
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def servfail(data: bytes) -> bytes | None:
    """SERVFAIL echoing ID, opcode, RD and CD; None when there is no header to echo."""
    if len(data) < HEADER_LEN or data[2] & 0x80:
        return None
    return data[:2] + bytes((0x80 | (data[2] & 0x79), (data[3] & 0x10) | RCODE_SERVFAIL)) \
        + b"\x00" * 8


class _Errors:
    """Rate-limited logging of internal errors (never a log line per packet)."""

    count = 0

    @classmethod
    def report(cls, where: str) -> None:
        cls.count += 1
        if cls.count <= 10 or cls.count % 1000 == 0:
            log.exception("internal error answering over %s (%d so far)", where, cls.count)


class UdpDnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, forward: Forward | None,
                 latency: Histogram | None = None) -> None:
        self.resolver = resolver
        self.forward = forward
        self.latency = latency
        self.seen = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen += 1
        try:
            if self.seen & SAMPLE_MASK or self.latency is None:
                out = self.resolver.handle_udp(data)
            else:
                started = time.perf_counter()
                out = self.resolver.handle_udp(data)
                self.latency.observe(time.perf_counter() - started)
        except Exception:
            _Errors.report("udp")
            out = servfail(data)
        if out is None:
            return
        if out.__class__ is bytes:
            self.transport.sendto(out, addr)  # type: ignore[union-attr]
        elif isinstance(out, ForwardRequest):
            _spawn(self._forward(out, addr))

    async def _forward(self, req: ForwardRequest, addr: Any) -> None:
        reply: bytes | None
        started = time.perf_counter()
        try:
            reply = await self.forward(req, "udp") if self.forward else servfail(req.data)
        except Exception:
            _Errors.report("udp forward")
            reply = servfail(req.data)
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - started)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends (client port gone): nothing to do.
        pass


class _BatchTransport:
    """The two DatagramTransport methods UdpDnsProtocol._forward needs, over a batch server."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.closing = False

    def sendto(self, data: bytes, addr: Any) -> None:
        self.batch.send_to(data, addr)

    def is_closing(self) -> bool:
        return self.closing


class BatchedUdp(UdpDnsProtocol):
    """UDP through recvmmsg/sendmmsg batches (Linux only), driven by the loop's reader.

    Same behaviour as UdpDnsProtocol: local answers leave in the batch's
    sendmmsg; forwardable queries take UdpDnsProtocol._forward and are answered
    later with one sendto; a core bug answers SERVFAIL. Raises ImportError where
    batching is unavailable, so the caller falls back to the datagram endpoint.
    """

    def __init__(self, sock: Any, resolver: Resolver, forward: Forward | None,
                 latency: Histogram | None = None) -> None:
        from .mmsg import BatchUdpServer

        super().__init__(resolver, forward, latency)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.batch = BatchUdpServer(
            sock, resolver.handle_udp, self._on_forward, on_error=servfail,
            observe=latency.observe if latency is not None else None)
        self.transport = _BatchTransport(self.batch)  # type: ignore[assignment]
        self.loop.add_reader(sock.fileno(), self.batch.serve_ready)

    def _on_forward(self, req: Any, addr: Any) -> None:
        if isinstance(req, ForwardRequest):
            _spawn(self._forward(req, addr))

    def close(self) -> None:
        if not self.transport.closing:  # type: ignore[union-attr]
            self.transport.closing = True  # type: ignore[union-attr]
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class TcpLimits:
    """Shared by every TCP connection of one server: the connection cap."""

    def __init__(self, max_connections: int, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.open = 0
        self.refused = 0
        self.connections: set[TcpDnsProtocol] = set()


class TcpDnsProtocol(asyncio.Protocol):
    """RFC 7766: 2-byte length framing, many queries per connection, replies as ready."""

    def __init__(self, resolver: Resolver, forward: Forward | None, limits: TcpLimits,
                 latency: Histogram | None = None) -> None:
        self.resolver = resolver
        self.forward = forward
        self.limits = limits
        self.latency = latency
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending = 0
        self.paused_writes = False
        self.reading_paused = False
        self.eof = False
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        limits = self.limits
        if limits.open >= limits.max_connections:
            limits.refused += 1
            self.transport.abort()
            return
        limits.open += 1
        limits.connections.add(self)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(limits.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.limits.connections:
            self.limits.connections.discard(self)
            self.limits.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        idle = self.loop.time() - self.last_active
        if idle >= self.limits.idle_timeout and self.pending == 0:
            self.transport.close()
        else:
            wait = max(self.limits.idle_timeout - idle, 0.05)
            self.timer = self.loop.call_later(wait, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        buf = self.buffer
        buf += data
        while len(buf) >= 2 and self.transport is not None:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break  # a frame is at most 65537 bytes, so the buffer stays bounded
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            self._answer(message)
            if self.reading_paused:
                break

    def _answer(self, message: bytes) -> None:
        try:
            if self.latency is None:
                out = self.resolver.handle_tcp(message)
            else:
                started = time.perf_counter()
                out = self.resolver.handle_tcp(message)
                self.latency.observe(time.perf_counter() - started)
        except Exception:
            _Errors.report("tcp")
            out = servfail(message)
        if out is None:
            return
        if out.__class__ is bytes:
            self._send(out)
        elif isinstance(out, ForwardRequest):
            self.pending += 1
            if self.pending >= MAX_TCP_PENDING:
                self._pause_reading()
            _spawn(self._forward(out))

    async def _forward(self, req: ForwardRequest) -> None:
        reply: bytes | None
        started = time.perf_counter()
        try:
            reply = await self.forward(req, "tcp") if self.forward else servfail(req.data)
        except Exception:
            _Errors.report("tcp forward")
            reply = servfail(req.data)
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - started)
        self.pending -= 1
        if reply is not None:
            self._send(reply)
        if self.eof and self.pending == 0 and self.transport is not None:
            self.transport.close()
        elif self.pending < MAX_TCP_PENDING // 2:
            self._resume_reading()

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(reply)) + reply)

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.paused_writes and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
            if self.buffer:
                self.data_received(b"")

    # A client that does not read its replies stops being read from.
    def pause_writing(self) -> None:
        self.paused_writes = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.paused_writes = False
        if self.pending < MAX_TCP_PENDING // 2:
            self._resume_reading()

    def eof_received(self) -> bool | None:
        # Half-close: answer what is pending, then close (keep the transport open meanwhile).
        self.eof = True
        if self.pending:
            return True
        return None
