"""Thin asyncio adapters: datagrams and TCP frames in, core replies out.

All DNS policy lives in :mod:`meshdns.core`; these classes only move bytes,
enforce the TCP limits (RFC 7766 framing and pipelining, idle timeout, a
deadline per message, a connection cap that evicts the longest idle, bounded
buffers) and hand forwardable queries to the
forwarder. A bug in the core answers SERVFAIL for that one message and never
takes the listener down.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from ..core.answer import (
    HEADER_LEN,
    RCODE_SERVFAIL,
    ForwardRequest,
    MessageHandler,
    error_reply,
    prohibited_reply,
    slip_reply,
)
from .dnstap import EXCHANGE, QUERY, RESPONSE, TCP, UDP, DnstapSink, local_address
from .histogram import Histogram
from .policy import (
    ALLOW,
    LOCAL_ONLY,
    REFUSE,
    SLIP,
    ClientPolicy,
    packed_address,
    sockaddr_address,
)
from .querylog import QueryLog

log = logging.getLogger("meshdns.dns")

# forward(request, proto, done, ctx): done(ctx, reply) is called once, at once or when
# the upstream answers (None: no reply, shutting down); Forwarding.forward.
Done = Callable[[Any, bytes | None], None]
Forward = Callable[[ForwardRequest, str, Done, Any], None]
MAX_TCP_PENDING = 64  # forwarded queries in flight per TCP connection before pausing reads
SAMPLE_MASK = 63  # time one locally answered message in 64; forwarded ones are all timed


def servfail(data: bytes) -> bytes | None:
    """SERVFAIL echoing ID, opcode, RD and CD; None when there is no header to echo."""
    if len(data) < HEADER_LEN or data[2] & 0x80:
        return None
    return error_reply(data, RCODE_SERVFAIL, echo_question=False)


class _Errors:
    """Rate-limited logging of internal errors (never a log line per packet)."""

    count = 0

    @classmethod
    def report(cls, where: str) -> None:
        cls.count += 1
        if cls.count <= 10 or cls.count % 1000 == 0:
            log.exception("internal error answering over %s (%d so far)", where, cls.count)


class UdpDnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, handler: MessageHandler, forward: Forward | None,
                 latency: Histogram | None = None, qlog: QueryLog | None = None,
                 policy: ClientPolicy | None = None, tap: DnstapSink | None = None) -> None:
        self.handler = handler
        self.forward = forward
        self.latency = latency
        self.qlog = qlog  # log.queries: every message takes _logged instead
        self.policy = policy  # access control / rate limit (policy.py); None: none
        self.tap = tap  # log.dnstap: every message takes _logged too (dnstap.py)
        self.local: Any = None  # the listener's own address, for dnstap
        self._packed: dict[str, bytes] = {}  # client host -> address bytes
        self.seen = 0
        self.transport: asyncio.DatagramTransport | None = None

    def packed(self, addr: Any) -> bytes:
        host = addr[0]
        out = self._packed.get(host)
        if out is None:
            if len(self._packed) >= 65_536:
                self._packed.clear()
            out = self._packed[host] = packed_address(host)
        return out

    def screened(self, data: bytes, addr: Any) -> Any:
        """The policy's answer (bytes, a ForwardRequest, None: dropped), or PASS when the
        client is allowed and of the default view: handled as usual."""
        policy = self.policy
        if policy is None:
            return PASS
        packed = self.packed(addr)
        verdict = policy.admit(packed)
        view = policy.view(packed) if policy.views else 0
        if verdict == ALLOW:
            return self.handler.handle_view(data, "udp", view) if view else PASS
        return screened_reply(verdict, data, self.handler, "udp", view)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self.tap is not None:
            self.local = local_address(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.policy is not None:
            tapped = time.time_ns() if self.tap is not None else 0
            out = self.screened(data, addr)
            if out is not PASS:
                if self.tap is not None:
                    self.tap.put((QUERY if isinstance(out, ForwardRequest) else EXCHANGE, UDP,
                                  addr, self.local, data, out, tapped, time.time_ns()))
                self._dispatch(out, addr)
                return
        if self.qlog is not None or self.tap is not None:
            self._logged(data, addr)
            return
        self.seen += 1
        try:
            if self.seen & SAMPLE_MASK or self.latency is None:
                out = self.handler.handle_udp(data)
            else:
                started = time.perf_counter()
                out = self.handler.handle_udp(data)
                self.latency.observe(time.perf_counter() - started)
        except Exception:
            _Errors.report("udp")
            out = servfail(data)
        self._dispatch(out, addr)

    def _dispatch(self, out: bytes | ForwardRequest | None, addr: Any) -> None:
        if out is None:
            return
        if out.__class__ is bytes:
            self.transport.sendto(out, addr)  # type: ignore[union-attr]
        elif isinstance(out, ForwardRequest):
            self._submit(out, addr)

    def _logged(self, data: bytes, addr: Any) -> None:
        """One datagram with log.queries or log.dnstap on."""
        started = time.perf_counter()
        tapped = time.time_ns()
        try:
            out = self.handler.handle_udp(data)
        except Exception:
            _Errors.report("udp")
            out = servfail(data)
        tap = self.tap
        if isinstance(out, ForwardRequest):
            if tap is not None:
                tap.put((QUERY, UDP, addr, self.local, data, out, tapped, 0))
            self._submit(out, addr, started)
            return
        # Logged before the reply leaves: a client that got it can find its line.
        if self.qlog is not None:
            self.qlog.exchange("udp", addr, data, out, time.perf_counter() - started)
        if tap is not None:
            tap.put((EXCHANGE, UDP, addr, self.local, data, out, tapped, time.time_ns()))
        if out is not None:
            self.transport.sendto(out, addr)  # type: ignore[union-attr]

    def _submit(self, req: ForwardRequest, addr: Any, received: float | None = None) -> None:
        """Hand a forwarded query to the forwarder; ``_replied`` sends its reply."""
        ctx = (req, addr, time.perf_counter(), received,
               time.time_ns() if self.tap is not None else 0)
        if self.forward is None:
            self._replied(ctx, servfail(req.data))
            return
        try:
            self.forward(req, "udp", self._replied, ctx)
        except Exception:
            _Errors.report("udp forward")
            self._replied(ctx, servfail(req.data))

    def _replied(self, ctx: Any, reply: bytes | None) -> None:
        """The forwarder's callback (``done``): log, count and send one forwarded reply."""
        req, addr, started, received, tapped = ctx
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - started)
        if self.qlog is not None:
            self.qlog.exchange("udp", addr, req.data, reply,
                               time.perf_counter() - (received or started), forwarded=True)
        if self.tap is not None:
            self.tap.put((RESPONSE, UDP, addr, self.local, req.data, reply, tapped,
                          time.time_ns()))
        if reply is not None:
            self._send_reply(reply, addr)

    def _send_reply(self, reply: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from earlier sends (client port gone): nothing to do.
        pass


PASS: Any = object()  # UdpDnsProtocol.screened: allowed, default view, handle as usual


def screened_reply(verdict: int, data: bytes, handler: MessageHandler, proto: str,
                   view: int = 0) -> bytes | None:
    """What a query the policy did not simply allow gets (None: dropped)."""
    if verdict == LOCAL_ONLY:
        return handler.handle_local(data, proto, view)
    if verdict == REFUSE:
        return prohibited_reply(data, handler.nsid)
    return slip_reply(data) if verdict == SLIP else None


def batch_screen(policy: ClientPolicy, handler: MessageHandler
                 ) -> Callable[[bytes, memoryview], Any]:
    """The batched path's check of each datagram's sender (BatchUdpServer.screen)."""
    admit, handle, of_view, view_of = (policy.admit, handler.handle_udp,
                                       handler.handle_view, policy.view)

    def screen(data: bytes, name: memoryview) -> Any:
        packed = sockaddr_address(name)
        verdict = admit(packed)
        view = view_of(packed) if policy.views else 0  # views can come with a SIGHUP
        if verdict == ALLOW:
            return of_view(data, "udp", view) if view else handle(data)
        return screened_reply(verdict, data, handler, "udp", view)

    return screen


class _BatchTransport:
    """The two DatagramTransport methods UdpDnsProtocol needs, over a batch server."""

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
    sendmmsg; forwardable queries go to the forwarder with the client's raw sockaddr
    (never decoded), and their replies are queued and sent together, one sendmmsg
    per turn of the event loop for all the replies that came in it; a core bug
    answers SERVFAIL. Raises ImportError where batching is unavailable, so the caller
    falls back to the datagram endpoint.
    """

    def __init__(self, sock: Any, handler: MessageHandler, forward: Forward | None,
                 latency: Histogram | None = None, policy: ClientPolicy | None = None,
                 tap: DnstapSink | None = None) -> None:
        from .mmsg import BatchUdpServer

        super().__init__(handler, forward, latency, policy=policy, tap=tap)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        screen = None if policy is None else batch_screen(policy, handler)
        if tap is not None:  # dnstap sees each datagram through the same hook
            self.local = local_address(sock.getsockname())
            screen = tap.screen(screen, handler.handle_udp, self.local)
        self.batch = BatchUdpServer(
            sock, handler.handle_udp, self._on_forward, on_error=servfail,
            observe=latency.observe if latency is not None else None, screen=screen,
            raw_names=True)
        self.transport = _BatchTransport(self.batch)  # type: ignore[assignment]
        self.loop.add_reader(sock.fileno(), self.batch.serve_ready)

    def _on_forward(self, req: Any, name: Any) -> None:
        if isinstance(req, ForwardRequest):
            self._submit(req, name)  # name: the raw sockaddr, dnstap takes it as it is

    def _send_reply(self, reply: bytes, addr: Any) -> None:
        if not self.transport.closing and self.batch.queue_reply(reply, addr):  # type: ignore[union-attr]
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self.transport.closing:  # type: ignore[union-attr]
            self.batch.flush_queued()

    def close(self) -> None:
        if not self.transport.closing:  # type: ignore[union-attr]
            self.transport.closing = True  # type: ignore[union-attr]
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


def _udp_fd(transport: Any) -> int | None:
    sock = transport.sock if isinstance(transport, BatchedUdp) else \
        transport.get_extra_info("socket")
    try:
        return int(sock.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def detach_udp(transport: Any) -> None:
    """Stop a UDP listener's socket from being handed new queries, while the ones it
    has queued are still read and answered (the drain of a SIGTERM).

    The socket is connected to its own address: Linux then delivers it only what comes
    from there, and skips it when it picks a socket of a SO_REUSEPORT group, so a
    successor bound to the same port gets every new query and none is lost in a
    closing socket's queue. Without a successor, new queries are refused by the kernel
    (ICMP port unreachable), as after an exit.
    """
    fd = _udp_fd(transport)
    if fd is None:
        return
    with socket.socket(fileno=os.dup(fd)) as sock, contextlib.suppress(OSError):
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        sock.connect((host, port))


def udp_queued(transport: Any) -> int:
    """Bytes of the next datagram waiting in a UDP listener's socket (0: none)."""
    fd = _udp_fd(transport)
    if fd is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class TcpLimits:
    """Shared by every TCP connection of one server: the connection cap and its evictions.

    ``connections`` is kept in least-recently-active order (a connection moves to
    the end when a whole message arrives or a forwarded reply leaves), so the
    connection idle the longest is found at the front without a scan.
    """

    def __init__(self, max_connections: int, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.open = 0
        self.evicted = 0  # idle connections closed to make room for a new one
        self.connections: OrderedDict[TcpDnsProtocol, None] = OrderedDict()

    def admit(self, conn: TcpDnsProtocol) -> None:
        """Count ``conn`` in; at the cap, first close the connection idle the longest.

        Like unbound and Knot: refusing the newcomer would let a few slow or idle
        clients lock every real client out. A connection still waiting on forwarded
        replies is only chosen when every connection is.
        """
        connections = self.connections
        while self.open >= self.max_connections and connections:
            victim = next((c for c in connections if c.pending == 0), None)
            if victim is None:
                victim = next(iter(connections))
            self.evicted += 1
            victim.evict()
        self.open += 1
        connections[conn] = None

    def release(self, conn: TcpDnsProtocol) -> None:
        if conn in self.connections:
            del self.connections[conn]
            self.open -= 1

    def touch(self, conn: TcpDnsProtocol) -> None:
        if conn in self.connections:
            self.connections.move_to_end(conn)


class TcpDnsProtocol(asyncio.Protocol):
    """RFC 7766: 2-byte length framing, many queries per connection, replies as ready.

    Two clocks close a connection: ``idle_timeout`` after its last whole message
    (or forwarded reply) when nothing is in progress, and, once the first byte of a
    message has arrived, ``idle_timeout`` after that byte even if more keep coming:
    a client trickling a byte at a time cannot hold a connection slot forever.
    Unparsed bytes are at most one frame (65537 bytes) plus what arrived while
    reading was paused, which stops at the kernel's socket buffer.
    """

    def __init__(self, handler: MessageHandler, forward: Forward | None, limits: TcpLimits,
                 latency: Histogram | None = None, qlog: QueryLog | None = None,
                 policy: ClientPolicy | None = None, tap: DnstapSink | None = None) -> None:
        self.handler = handler
        self.policy = policy
        self.tap = tap
        self.local: Any = None
        self.verdict = ALLOW  # the access control verdict for this client (policy.py)
        self.view = 0  # its view (dns.views; 0: the default)
        self.qlog = qlog
        self.peer: Any = None  # the client's address, for the query log
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
        # When the message at the head of the buffer must be complete (None: buffer empty).
        self.message_deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream server's transport
        self.peer = transport.get_extra_info("peername")
        if self.tap is not None:
            self.local = local_address(transport.get_extra_info("sockname"))
        if self.policy is not None and self.peer:
            # Counted per query (in _answer), as over UDP.
            packed = packed_address(self.peer[0])
            self.verdict = self.policy.admit(packed, udp=False, count=False)
            self.view = self.policy.view(packed) if self.policy.views else 0
        limits = self.limits
        limits.admit(self)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(limits.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.release(self)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def evict(self) -> None:
        """Closed to make room under the cap (the slot is free at once)."""
        self.limits.release(self)
        self._close()

    def _close(self) -> None:
        """A FIN when nothing is left unsent, else a reset: a client that does not
        read must not keep the socket open behind a write buffer that never drains."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _check_idle(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        timeout = self.limits.idle_timeout
        deadline = self.message_deadline
        if deadline is not None and not self.reading_paused:
            # A message has begun and we are reading: it must be whole by its deadline.
            if now >= deadline:
                transport.abort()  # a reset: the client is not waiting for anything
                return
            due = deadline
        else:
            # Nothing half-read, or reads paused by us (pending forwards) or by the
            # client (not reading its replies): plain idleness decides.
            due = self.last_active + timeout
            if now >= due:
                if self.pending == 0:
                    self._close()
                    return
                due = now + timeout  # a forwarded reply will refresh last_active
        self.timer = self.loop.call_later(max(due - now, 0.05), self._check_idle)

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if not self.buffer:
            # This chunk starts a message: the whole of it must be here by the deadline.
            self.message_deadline = now + self.limits.idle_timeout
        self.buffer += data
        self._consume(now)

    def _consume(self, now: float) -> None:
        buf = self.buffer
        framed = answered = False
        while len(buf) >= 2 and self.transport is not None:
            size = (buf[0] << 8) | buf[1]
            if len(buf) < 2 + size:
                break
            message = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            framed = True
            answered |= self._answer(message)
            if self.reading_paused:
                break
        if framed:
            # What is left begins the next message: its clock starts now.
            self.message_deadline = now + self.limits.idle_timeout if buf else None
            if answered:  # frames we drop unanswered (e.g. empty ones) are not activity
                self.last_active = now
                self.limits.touch(self)

    def _answer(self, message: bytes) -> bool:
        """Answer or forward one framed message; False when it is dropped unanswered."""
        started = time.perf_counter()
        tapped = time.time_ns() if self.tap is not None else 0
        out: bytes | ForwardRequest | None
        if self.verdict != ALLOW:
            if self.verdict == REFUSE and self.policy is not None:
                self.policy.counts.refused += 1  # each query, as over UDP
            out = screened_reply(self.verdict, message, self.handler, "tcp", self.view)
            if self.tap is not None:
                self.tap.put((EXCHANGE, TCP, self.peer, self.local, message, out, tapped,
                              time.time_ns()))
            if out is not None:
                self._send(out)
            return out is not None
        try:
            if self.view:
                out = self.handler.handle_view(message, "tcp", self.view)
            elif self.latency is None:
                out = self.handler.handle_tcp(message)
            else:
                out = self.handler.handle_tcp(message)
                self.latency.observe(time.perf_counter() - started)
        except Exception:
            _Errors.report("tcp")
            out = servfail(message)
        if isinstance(out, ForwardRequest):
            if self.tap is not None:
                self.tap.put((QUERY, TCP, self.peer, self.local, message, out, tapped, 0))
            self.pending += 1
            if self.pending >= MAX_TCP_PENDING:
                self._pause_reading()
            self._submit(out, started)
            return True
        if self.qlog is not None:
            self.qlog.exchange("tcp", self.peer, message, out, time.perf_counter() - started)
        if self.tap is not None:
            self.tap.put((EXCHANGE, TCP, self.peer, self.local, message, out, tapped,
                          time.time_ns()))
        if out is not None:
            self._send(out)
        return out is not None

    def _submit(self, req: ForwardRequest, received: float) -> None:
        ctx = (req, received, time.perf_counter(),
               time.time_ns() if self.tap is not None else 0)
        if self.forward is None:
            self._replied(ctx, servfail(req.data))
            return
        try:
            self.forward(req, "tcp", self._replied, ctx)
        except Exception:
            _Errors.report("tcp forward")
            self._replied(ctx, servfail(req.data))

    def _replied(self, ctx: Any, reply: bytes | None) -> None:
        """The forwarder's callback (``done``): one forwarded reply on this connection."""
        req, received, started, tapped = ctx
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - started)
        self.pending -= 1
        if self.qlog is not None:
            self.qlog.exchange("tcp", self.peer, req.data, reply,
                               time.perf_counter() - received, forwarded=True)
        if self.tap is not None:
            self.tap.put((RESPONSE, TCP, self.peer, self.local, req.data, reply, tapped,
                          time.time_ns()))
        if reply is not None:
            self._send(reply)
            self.last_active = self.loop.time()
            self.limits.touch(self)
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
                # The head message waited on us, not on the client: a fresh deadline.
                now = self.loop.time()
                self.message_deadline = now + self.limits.idle_timeout
                self._consume(now)

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
