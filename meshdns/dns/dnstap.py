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
  (:class:`Encoder`: ``dnstap-pb``'s schema, its constant fields encoded once by
  protobuf, the rest joined around them) and writes it in one call; it waits for
  the socket to drain before the next chunk, so a collector that stops reading
  fills the queue, never the process's memory, and DNS is served between chunks.
  Encoding is the cost that remains: it runs on the DNS process's own core
  (bench/bench_dnstap.py measures it).
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

from .. import __version__
from ..config import Config, DnstapConfig, HostPort, nsid_bytes

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


def varint(n: int) -> bytes:
    """A protobuf base-128 varint (lengths: the only varints not taken from the schema)."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_NHEADS = 1536  # DNS messages shorter than this have their tag and length looked up
_NPREFIXES = 2048  # dnstap messages shorter than this have their frame prefix looked up
MAX_ADDRESSES = 4096  # addresses (with their port, and without) whose fields are kept
_RAW_INET = socket.AF_INET.to_bytes(2, sys.byteorder)  # a raw sockaddr's sa_family
_RAW_FAMILIES = (_RAW_INET, socket.AF_INET6.to_bytes(2, sys.byteorder))
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
# One address's fields, as an entry's peer or local side: indexed by SocketProtocol
# (1, 2) its socket_family and socket_protocol fields; then as the query side its
# address and port fields (3, 4), as the response side (5, 6).
Fields = tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes]
_FIXED32 = struct.Struct("<BI")  # a fixed32 field: its one-byte tag, the value


class Encoder:
    """Entries to Frame Streams data frames of dnstap-pb's ``Dnstap`` message.

    Every field that does not change per message (identity, version, the frame's
    type, each message type, protocol, and each address and port, cached per
    address, the current second) is encoded once by dnstap-pb's generated schema on
    protobuf's C backend; per message only the nanoseconds and the DNS messages are
    joined around them, in the schema's field order, with the lengths (and the frame
    prefix) looked up in tables made once for the sizes most messages have (~250 KB).
    The bytes are protobuf's own serialization of the same message
    (tests/system/test_dnstap.py checks them against ``SerializeToString``): filling a
    message object and serializing it costs ~1.5 us per message, this ~0.5 us.
    """

    def __init__(self, identity: bytes, version: bytes, messages: tuple[str, ...]) -> None:
        from dnstap_pb import dnstap_pb2 as pb

        self.pb = pb
        M = pb.Message
        # Dnstap: identity (1), version (2), message (14), type (15) = MESSAGE.
        self.head = bytes(pb.Dnstap(identity=identity, version=version)
                          .SerializePartialToString())
        self.message_tag = _tag(pb.Dnstap, "message", 2)
        self.tail = pb.Dnstap(type=pb.Dnstap.MESSAGE).SerializePartialToString()
        wanted = set(messages)

        def typed(name: str) -> bytes | None:
            return (M(type=M.Type.Value(name.upper())).SerializePartialToString()
                    if name in wanted else None)

        cq, cr = typed("client_query"), typed("client_response")
        # Per entry kind: the message types it becomes (query side, response side).
        self.types: dict[int, tuple[bytes | None, bytes | None]] = {
            EXCHANGE: (cq, cr), QUERY: (cq, None), RESPONSE: (None, cr),
            FORWARDED: (typed("forwarder_query"), typed("forwarder_response")),
        }
        self.protocols = {p: M(socket_protocol=p).SerializePartialToString() for p in (UDP, TCP)}
        self.query_message_tag = _tag(M, "query_message", 2)
        self.response_message_tag = _tag(M, "response_message", 2)
        self.query_nsec_tag = _tag(M, "query_time_nsec", 5)[0]
        self.response_nsec_tag = _tag(M, "response_time_nsec", 5)[0]
        # A frame: _prefix(m), the message (m bytes), tail (type MESSAGE); the prefixes of
        # the sizes most messages have, made once.
        self.prefixes = [self._prefix(m) for m in range(_NPREFIXES)]
        # A DNS message's tag and length, for the lengths most have.
        self.query_message_heads = [self.query_message_tag + varint(i) for i in range(_NHEADS)]
        self.response_message_heads = [self.response_message_tag + varint(i)
                                       for i in range(_NHEADS)]
        # address (raw sockaddr or tuple) -> its Fields; None (unknown): the protocol only.
        self.no_address: Fields = (b"", self.protocols[UDP], self.protocols[TCP],
                                   b"", b"", b"", b"")
        self._fields: dict[Any, Fields] = {None: self.no_address}
        # address bytes (4 or 16) -> its fields without the port (_host).
        self._hosts: dict[bytes, tuple[bytes, bytes, bytes, bytes]] = {}
        self.query_port_tag = _tag(M, "query_port", 0)
        self.response_port_tag = _tag(M, "response_port", 0)
        self._now = self._second(time.time_ns())  # the second of the last time encoded

    def count(self, entry: Entry) -> int:
        """How many messages ``entry`` becomes."""
        q, r = self.types[entry[0]]
        return (q is not None) + (r is not None and entry[5].__class__ is bytes)

    def _addr(self, addr: Any) -> Fields:
        """The fields of ``addr`` (a raw sockaddr or an address tuple, also the cache
        key); no address fields for what is no IPv4 or IPv6 address. Clients ask from a
        new port each time, so a miss is cheap too: the address's own fields are cached
        apart from its port's, which are made here."""
        if len(self._fields) >= MAX_ADDRESSES:
            self._fields.clear()
            self._fields[None] = self.no_address
        if addr.__class__ is bytes and addr[:2] in _RAW_FAMILIES:  # recvmmsg's sockaddr
            raw = addr[4:8] if addr[:2] == _RAW_INET else addr[8:24]
            if len(raw) == 16 and raw[:12] == _V4_MAPPED:
                raw = raw[12:]
            port = addr[2] << 8 | addr[3]
        else:
            fields = address_fields(addr)
            if fields is None:
                out = self._fields[addr] = self.no_address
                return out
            _, raw, port = fields
        host = self._hosts.get(raw) or self._host(raw)
        # The port as a varint (protobuf's base 128, least significant group first).
        if port < 0x80:
            size = bytes((port,))
        elif port < 0x4000:
            size = bytes((port & 0x7F | 0x80, port >> 7))
        else:
            size = bytes((port & 0x7F | 0x80, port >> 7 & 0x7F | 0x80, port >> 14))
        out = self._fields[addr] = (b"", host[0], host[1], host[2], self.query_port_tag + size,
                                    host[3], self.response_port_tag + size)
        return out

    def _host(self, raw: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """An address's own fields (4 or 16 bytes): socket_family with socket_protocol
        (UDP, TCP), and its address field as the query side and as the response side."""
        if len(self._hosts) >= MAX_ADDRESSES:
            self._hosts.clear()
        family = 1 if len(raw) == 4 else 2  # dnstap SocketFamily INET, INET6
        M = self.pb.Message

        def field(**kw: Any) -> bytes:
            return bytes(M(**kw).SerializePartialToString())

        out = self._hosts[raw] = (
            field(socket_family=family, socket_protocol=UDP),
            field(socket_family=family, socket_protocol=TCP),
            field(query_address=raw), field(response_address=raw))
        return out

    def _prefix(self, m: int) -> bytes:
        """What comes before a message of ``m`` bytes in its frame: the frame's length,
        the Dnstap head (identity, version, the message's tag) and the message's length."""
        size = varint(m)
        return _BE32.pack(len(self.head) + len(self.message_tag) + len(size) + m
                          + len(self.tail)) + self.head + self.message_tag + size

    def _second(self, t: int) -> tuple[int, bytes, bytes]:
        """The second ``t`` (ns) is in: its start in ns, and its two time_sec fields."""
        sec = t // 1_000_000_000
        M = self.pb.Message
        return (sec * 1_000_000_000, M(query_time_sec=sec).SerializePartialToString(),
                M(response_time_sec=sec).SerializePartialToString())

    def encode(self, entries: list[Entry]) -> tuple[bytes, int]:
        """The frames of ``entries`` joined, and how many messages they are."""
        out: list[bytes] = []
        types, fields = self.types, self._fields
        tail = self.tail  # a frame: its prefix (_prefix), the message, tail
        q_heads, r_heads = self.query_message_heads, self.response_message_heads
        q_tag, r_tag = self.query_message_tag, self.response_message_tag
        qn_tag, rn_tag = self.query_nsec_tag, self.response_nsec_tag
        fixed32, prefixes = _FIXED32.pack, self.prefixes
        base, q_sec, r_sec = self._now
        no_address = self.no_address
        n = 0
        for kind, proto, peer, local, query, reply, t_query, t_reply in entries:
            qtype, rtype = types[kind]
            if reply.__class__ is not bytes:
                rtype = None
            if qtype is None and rtype is None:
                continue
            # Client messages: the client sent the query (query_address), meshdns got it
            # (response_address). Forwarder messages: meshdns sent it to the upstream.
            if kind == FORWARDED:
                q_side = fields.get(local) or self._addr(local)
                r_side = fields.get(peer) or self._addr(peer)
            else:
                q_side = fields.get(peer) or self._addr(peer)
                r_side = fields.get(local) or self._addr(local)
            nsec = t_query - base
            if not 0 <= nsec < 1_000_000_000:  # another second (most are in the same one)
                base, q_sec, r_sec = self._now = self._second(t_query)
                nsec = t_query - base
            qlen = len(query)
            # Fields 2..10, the same in the query and the response message (the family
            # comes with the protocol: the response side's, else the query side's).
            common = b"".join((
                (q_side if r_side is no_address else r_side)[proto],
                q_side[3], r_side[5], q_side[4], r_side[6], q_sec, fixed32(qn_tag, nsec),
                q_heads[qlen] if qlen < _NHEADS else q_tag + varint(qlen), query))
            if qtype is not None:
                m = len(qtype) + len(common)
                out += (prefixes[m] if m < _NPREFIXES else self._prefix(m), qtype, common, tail)
                n += 1
            if rtype is not None:
                nsec = t_reply - base
                if not 0 <= nsec < 1_000_000_000:
                    base, q_sec, r_sec = self._now = self._second(t_reply)
                    nsec = t_reply - base
                rlen = len(reply)
                r_head = r_heads[rlen] if rlen < _NHEADS else r_tag + varint(rlen)
                # Fields 12..14 after the common ones: time_sec, time_nsec (5 bytes), reply.
                m = len(rtype) + len(common) + len(r_sec) + 5 + len(r_head) + rlen
                out += (prefixes[m] if m < _NPREFIXES else self._prefix(m), rtype, common, r_sec,
                        fixed32(rn_tag, nsec), r_head, reply, tail)
                n += 1
        return b"".join(out), n


_BE32 = struct.Struct("!I")  # a Frame Streams frame's length


def _tag(message: Any, field: str, wire_type: int) -> bytes:
    """The tag of ``field`` of a dnstap-pb message (its number from the schema)."""
    return varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type)


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


def dnstap_sink(config: Config) -> DnstapSink | None:
    """log.dnstap's sink (not started); identity: log.dnstap.identity, else dns.nsid,
    else the host name."""
    cfg = config.log.dnstap
    if cfg is None:
        return None
    identity = cfg.identity.encode() if cfg.identity else (nsid_bytes(config.dns)
                                                           or socket.gethostname().encode())
    version = cfg.version if cfg.version is not None else f"meshdns {__version__}"
    return DnstapSink(cfg, identity, version.encode())


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
        # put() inlined: this runs for every datagram, and a call is a third of its cost.
        # self.queue is one list for the sink's life (the writer deletes from its front).
        queue, limit, wake, put, now = self.queue, self.limit, self._wake.set, self.put, time.time_ns

        def tapped(data: bytes, name: memoryview) -> Any:
            started = now()
            out = handle(data)
            entry = (EXCHANGE if out.__class__ is bytes or out is None else QUERY, UDP,
                     name.tobytes(), local, data, out, started, now())
            if len(queue) < limit:
                queue.append(entry)
                if len(queue) == 1:
                    wake()
            else:
                put(entry)  # counted as dropped
            return out

        if inner is None:
            return tapped

        def screen(data: bytes, name: memoryview) -> Any:
            started = now()
            out = inner(data, name)
            entry = (EXCHANGE if out.__class__ is bytes or out is None else QUERY, UDP,
                     name.tobytes(), local, data, out, started, now())
            if len(queue) < limit:
                queue.append(entry)
                if len(queue) == 1:
                    wake()
            else:
                put(entry)
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
