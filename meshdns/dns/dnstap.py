"""dnstap output (``log.dnstap``): every exchange as dnstap messages over Frame Streams.

The DNS world's query log format: CoreDNS, unbound, Knot, BIND and PowerDNS emit
it; ``fstrm_capture``, ``dnstap-ldns`` and DNS-collector read it. meshdns sends
CLIENT_QUERY and CLIENT_RESPONSE for every query it gets, and FORWARDER_QUERY and
FORWARDER_RESPONSE for each lookup it sends upstream (``log.dnstap.messages``
picks which), over a Unix socket or TCP, with the Frame Streams bidirectional
handshake (READY, ACCEPT, START; STOP, FINISH) that ``fstrm_capture`` expects.

A slow or absent collector never slows DNS:

- The transports only append a tuple of what they already hold (the raw
  sockaddr of a batched datagram, the query and reply bytes, two clocks) to a
  bounded list: :meth:`DnstapSink.put`. Past ``log.dnstap.queue_size`` messages
  waiting, a message is dropped and counted (``meshdns_dnstap_dropped_total``).
- One writer task takes the list a chunk (256 entries) at a time, encodes it
  (protobuf, through ``dnstap-pb``'s generated schema on protobuf's C backend)
  and writes it in one call; it waits for the socket to drain before the next
  chunk, so a collector that stops reading fills the queue, never the process's
  memory, and DNS is served between chunks. Encoding is the cost that remains:
  it runs on the DNS process's own core (bench/bench_dnstap.py measures it).
- A collector that is gone or refuses is retried with exponential backoff
  (0.1 s to 5 s); meanwhile messages wait in the queue up to its bound.

Frames already handed to the kernel when a collector dies may be lost without
notice (TCP reports the peer's reset only on a later write); a write that fails
counts its batch as dropped (reason ``write_failed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from ..config import DnstapConfig, HostPort

log = logging.getLogger("meshdns.dnstap")

CONTENT_TYPE = b"protobuf:dnstap.Dnstap"
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # s between connection attempts
CONNECT_TIMEOUT = 2.0  # s for a connection and its handshake
FINISH_TIMEOUT = 1.0  # s to wait for the collector's FINISH after our STOP
LINGER = 0.005  # s the writer waits after a wake-up, so a batch gathers what follows
CHUNK = 256  # entries encoded and written at a time
MAX_CONTROL_FRAME = 512  # bytes: a control frame longer than this is no collector's

# Entry kinds (what the transports and the forwarder put).
EXCHANGE = 0  # a query answered at once: CLIENT_QUERY and CLIENT_RESPONSE
QUERY = 1  # a query forwarded (its reply comes later as RESPONSE): CLIENT_QUERY
RESPONSE = 2  # the reply to a forwarded query: CLIENT_RESPONSE
FORWARDED = 3  # one upstream exchange: FORWARDER_QUERY and FORWARDER_RESPONSE
UDP, TCP = 1, 2  # dnstap SocketProtocol

# An entry: (kind, protocol, peer, local, query, reply, query time ns, reply time ns).
# ``peer`` is the other side's address: a raw sockaddr (bytes, as recvmmsg wrote it)
# or an address tuple; ``local`` is meshdns's side (a tuple, or None when unknown).
Entry = tuple[int, int, Any, Any, bytes, Any, int, int]


class HandshakeError(Exception):
    """The collector did not answer the Frame Streams handshake as the protocol says."""


def address_fields(addr: Any) -> tuple[int, bytes, int] | None:
    """(dnstap SocketFamily, address bytes, port) of a raw sockaddr or an address tuple."""
    if isinstance(addr, bytes):
        family = int.from_bytes(addr[0:2], sys.byteorder)
        port = int.from_bytes(addr[2:4], "big")
        if family == socket.AF_INET:
            return 1, addr[4:8], port
        if family == socket.AF_INET6:
            raw = addr[8:24]
            if raw[:12] == b"\0" * 10 + b"\xff\xff":
                return 1, raw[12:], port
            return 2, raw, port
        return None
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0]).split("%", 1)[0]
        try:
            if ":" in host:
                packed = socket.inet_pton(socket.AF_INET6, host)
                if packed[:12] == b"\0" * 10 + b"\xff\xff":
                    return 1, packed[12:], int(addr[1])
                return 2, packed, int(addr[1])
            return 1, socket.inet_pton(socket.AF_INET, host), int(addr[1])
        except OSError:
            return None
    return None


def local_address(sock_name: Any) -> Any:
    """A listener's own address for the messages; None for a wildcard (unknown per query)."""
    if isinstance(sock_name, tuple) and sock_name and sock_name[0] not in ("0.0.0.0", "::"):
        return sock_name
    return None


class Encoder:
    """Entries to Frame Streams data frames: dnstap-pb's generated ``Dnstap`` message,
    one object reused for every message (protobuf's C backend does the encoding)."""

    def __init__(self, identity: bytes, version: bytes, messages: tuple[str, ...]) -> None:
        from dnstap_pb import dnstap_pb2 as pb

        self.pb = pb
        self.frame = pb.Dnstap(identity=identity, version=version, type=pb.Dnstap.MESSAGE)
        self.message = self.frame.message
        T = pb.Message
        wanted = set(messages)
        # Per entry kind: the message types it becomes (query side, response side).
        self.types = {
            EXCHANGE: (T.CLIENT_QUERY if "client_query" in wanted else None,
                       T.CLIENT_RESPONSE if "client_response" in wanted else None),
            QUERY: (T.CLIENT_QUERY if "client_query" in wanted else None, None),
            RESPONSE: (None, T.CLIENT_RESPONSE if "client_response" in wanted else None),
            FORWARDED: (T.FORWARDER_QUERY if "forwarder_query" in wanted else None,
                        T.FORWARDER_RESPONSE if "forwarder_response" in wanted else None),
        }
        self._fields: dict[Any, tuple[int, bytes, int] | None] = {}

    def count(self, entry: Entry) -> int:
        """How many messages ``entry`` becomes."""
        q, r = self.types[entry[0]]
        return (q is not None) + (r is not None and entry[5].__class__ is bytes)

    def _addr(self, addr: Any) -> tuple[int, bytes, int] | None:
        if addr is None:
            return None
        key = addr if isinstance(addr, bytes) else tuple(addr[:2])
        out = self._fields.get(key, False)
        if out is False:
            if len(self._fields) > 4096:
                self._fields.clear()
            out = self._fields[key] = address_fields(addr)
        return out  # type: ignore[return-value]

    def encode(self, entries: list[Entry]) -> tuple[bytes, int]:
        """The frames of ``entries`` joined, and how many messages they are."""
        out: list[bytes] = []
        m, frame, types = self.message, self.frame, self.types
        pack = struct.Struct("!I").pack
        for kind, proto, peer, local, query, reply, t_query, t_reply in entries:
            qtype, rtype = types[kind]
            if reply.__class__ is not bytes:
                rtype = None
            if qtype is None and rtype is None:
                continue
            m.Clear()
            m.socket_protocol = proto
            # Client messages: the client sent the query (query_address), meshdns got it
            # (response_address). Forwarder messages: meshdns sent it to the upstream.
            if kind == FORWARDED:
                q_side, r_side = self._addr(local), self._addr(peer)
            else:
                q_side, r_side = self._addr(peer), self._addr(local)
            if q_side is not None:
                m.socket_family = q_side[0]
                m.query_address, m.query_port = q_side[1], q_side[2]
            if r_side is not None:
                m.socket_family = r_side[0]
                m.response_address, m.response_port = r_side[1], r_side[2]
            m.query_time_sec, m.query_time_nsec = divmod(t_query, 1_000_000_000)
            if qtype is not None:
                m.type = qtype
                m.query_message = query
                data = frame.SerializeToString()
                out.append(pack(len(data)))
                out.append(data)
            if rtype is not None:
                m.type = rtype
                if qtype is None:
                    m.query_message = query  # a response carries its query too
                m.response_time_sec, m.response_time_nsec = divmod(t_reply, 1_000_000_000)
                m.response_message = reply
                data = frame.SerializeToString()
                out.append(pack(len(data)))
                out.append(data)
        return b"".join(out), len(out) // 2


def control_frame(kind: int) -> bytes:
    """A Frame Streams control frame (fstrm's codec) with our content type where it
    takes one (READY, ACCEPT, START)."""
    from fstrm import FstrmCodec
    from fstrm.fstrm_codec import FSTRM_CONTROL_READY, FSTRM_CONTROL_START

    ct = [CONTENT_TYPE] if kind in (FSTRM_CONTROL_READY, FSTRM_CONTROL_START) else []
    return bytes(FstrmCodec().encode(ctrl=kind, ct=ct))


async def read_control(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """One control frame from the collector: its type and content types."""
    from fstrm import FstrmCodec

    head = await reader.readexactly(8)
    escape, length = struct.unpack("!II", head)
    if escape != 0 or not 4 <= length <= MAX_CONTROL_FRAME:
        raise HandshakeError(f"expected a control frame, got {head.hex()}")
    codec = FstrmCodec()
    if not codec.append_and_process(head + await reader.readexactly(length)):
        raise HandshakeError("incomplete control frame")
    try:
        kind, types, _ = codec.decode()
    except Exception as exc:  # fstrm raises bare Exception on a malformed field
        raise HandshakeError(f"malformed control frame: {exc}") from None
    return int(kind), [bytes(t) for t in types]


class DnstapSink:
    """The bounded queue the transports put entries in, and the writer task that sends them.

    Counters (plain ints, read by /metrics): ``written`` messages handed to the
    collector's socket, ``dropped`` messages by reason (``queue_full``,
    ``write_failed``), ``connects`` successful handshakes; ``connected`` and
    ``queued`` (messages waiting) as they are now. ``log.dnstap.queue_size`` bounds
    the entries waiting (an answered query is one entry, two messages).
    """

    def __init__(self, config: DnstapConfig, identity: bytes, version: bytes) -> None:
        self.config = config
        self.encoder = Encoder(identity, version, config.messages)
        self.limit = config.queue_size
        wanted = set(config.messages)
        self.client = bool(wanted & {"client_query", "client_response"})
        self.forwarder = bool(wanted & {"forwarder_query", "forwarder_response"})
        self.queue: list[Entry] = []
        self.written = 0
        self.sending = 0  # messages of the write under way (counted written once drained)
        self.dropped = {"queue_full": 0, "write_failed": 0}
        self.connects = 0
        self.connected = False
        self.target = (f"unix:{config.socket}" if config.socket is not None
                       else f"tcp:{config.tcp}")
        self._wake = asyncio.Event()  # set when the queue gets its first entry, or closing
        self._stop = asyncio.Event()
        self._closing = False
        self._lost = False
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    # ------------------------------------------------------------ hot path

    def put(self, entry: Entry) -> None:
        """Queue one entry for the writer; drop it (its messages counted) when
        ``queue_size`` entries are waiting."""
        queue = self.queue
        if len(queue) >= self.limit:
            self.dropped["queue_full"] += self.encoder.count(entry)
            return
        queue.append(entry)
        if len(queue) == 1:
            self._wake.set()

    @property
    def queued(self) -> int:
        """Messages waiting: queued, or in the write under way (read when /metrics is
        scraped, never per packet)."""
        count = self.encoder.count
        return self.sending + sum(count(e) for e in self.queue)

    def screen(self, inner: Callable[[bytes, memoryview], Any] | None,
               handle: Callable[[bytes], Any], local: Any) -> Callable[[bytes, memoryview], Any]:
        """The batched UDP path's per-datagram hook (BatchUdpServer.screen) with each
        datagram and its answer put here; ``inner`` is the access control's hook, if any."""
        put, now = self.put, time.time_ns

        def screen(data: bytes, name: memoryview) -> Any:
            started = now()
            out = handle(data) if inner is None else inner(data, name)
            put((EXCHANGE if out.__class__ is bytes or out is None else QUERY, UDP,
                 name.tobytes(), local, data, out, started, now()))
            return out

        return screen

    def forwarded(self, proto: str, upstream: HostPort, query: bytes, reply: bytes | None,
                  sent: int, received: int) -> None:
        """One exchange with an upstream (Forwarder.on_upstream): FORWARDER_QUERY and
        FORWARDER_RESPONSE (none when no reply came)."""
        self.put((FORWARDED, UDP if proto == "udp" else TCP, (upstream.host, upstream.port),
                  None, query, reply, sent, received))

    # ------------------------------------------------------------ writer

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Send what is queued (if connected), STOP, wait for FINISH, and stop."""
        self._closing = True
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, CONNECT_TIMEOUT + FINISH_TIMEOUT + 1)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            self._task = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cfg = self.config
        if cfg.socket is not None:
            reader, writer = await asyncio.open_unix_connection(cfg.socket)
        else:
            assert cfg.tcp is not None
            reader, writer = await asyncio.open_connection(cfg.tcp.host, cfg.tcp.port)
        try:
            from fstrm.fstrm_codec import (
                FSTRM_CONTROL_ACCEPT,
                FSTRM_CONTROL_READY,
                FSTRM_CONTROL_START,
            )

            writer.write(control_frame(FSTRM_CONTROL_READY))
            kind, types = await read_control(reader)
            if kind != FSTRM_CONTROL_ACCEPT:
                raise HandshakeError(f"expected ACCEPT, got control frame {kind}")
            if types and CONTENT_TYPE not in types:
                raise HandshakeError("the collector accepts none of our content types "
                                     f"({b', '.join(types).decode(errors='replace')})")
            writer.write(control_frame(FSTRM_CONTROL_START))
            await writer.drain()
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, HandshakeError) as exc:
                self._failures += 1
                if self._failures == 1 or self._failures % 100 == 0:
                    log.warning("dnstap: cannot reach the collector at %s (%s); retrying, "
                                "messages queue up to log.dnstap.queue_size (%d so far)",
                                self.target, exc or type(exc).__name__, self._failures)
                await self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            self._failures = 0
            self.connects += 1
            self.connected = True
            log.info("dnstap: connected to the collector at %s", self.target)
            try:
                await self._pump(reader, writer)
            except Exception:  # never let the writer die: DNS keeps its queue bounded
                log.exception("dnstap: the writer to %s failed; reconnecting", self.target)
                await self._sleep(BACKOFF_MIN)
            finally:
                self.connected = False
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)  # close() ends it at once

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """The collector's side: a STOP, EOF or error means it is gone."""
        with contextlib.suppress(Exception):
            while await reader.read(4096):
                pass
        self._lost = True
        self._wake.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._lost = False
        if self.queue:
            self._wake.set()
        watcher = asyncio.ensure_future(self._watch(reader))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._lost:
                    log.warning("dnstap: the collector at %s went away; reconnecting",
                                self.target)
                    return
                if not self._closing:
                    await asyncio.sleep(LINGER)
                while self.queue:
                    # A chunk at a time, DNS served in between: a long queue never holds
                    # the event loop for more than one chunk's encoding.
                    chunk = self.queue[:CHUNK]
                    del self.queue[:CHUNK]
                    data, n = self.encoder.encode(chunk)
                    self.sending = n
                    try:
                        writer.write(data)
                        await writer.drain()
                    except (OSError, ConnectionError) as exc:
                        self.dropped["write_failed"] += n
                        log.warning("dnstap: writing to %s failed (%s); reconnecting",
                                    self.target, exc)
                        return
                    finally:
                        self.sending = 0
                    self.written += n
                    await asyncio.sleep(0)
                    if self._lost:
                        break  # said at the next wake-up (set by _watch)
                if self._closing:
                    break
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._finish(reader, writer)

    async def _finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from fstrm.fstrm_codec import FSTRM_CONTROL_STOP

        with contextlib.suppress(Exception):
            writer.write(control_frame(FSTRM_CONTROL_STOP))
            await writer.drain()
            await asyncio.wait_for(read_control(reader), FINISH_TIMEOUT)  # FINISH
