"""The UDP source ports one upstream is asked from (RFC 5452), kept open and re-drawn.

Opening a socket per query is a syscall storm at 40k misses a second; one socket
for everything would give an off-path attacker one port to aim at. So each upstream
has a pool of up to ``size`` sockets (``dns.upstream_ports``, default 1024), each bound
to a port drawn at random from the kernel's ephemeral range and connected to the
upstream. A query goes out on a slot chosen at random, with a random 16-bit ID not
in flight on that socket. A socket serves at most ``MAX_USES`` queries or a lifetime
drawn between ``LIFETIME``/2 and ``LIFETIME`` seconds (so the sockets a burst opened
are not all re-drawn in the same second); the first query to pick it after that
closes it (once nothing is in flight on it) and draws a new port in its place (from
the same buffered urandom bits as the IDs). A slot is filled when first
picked, so an upstream asked often has ``size`` ports in use at once, each younger
than ``LIFETIME``.

An off-path attacker must guess both port and ID: with 1,024 ports in use, log2(1024)
+ 16 = 26 bits per query, and the ports move within seconds (RFC 5452 §10 asks for
at least a pool of that size and 16 random bits of ID).

Replies are checked as before: the connected socket only receives from the
upstream's address and port (the kernel drops the rest), the ID must be one in
flight on that socket and the question ours (reply.check_reply); anything else is
counted by reason and dropped, and the query waits on. An ICMP error (port
unreachable) on a socket fails what is in flight on it at once (``error``).

Replies arrive through ``loop.add_reader`` callbacks (one registration per socket
for its whole life, no task, future or other object per query): the asker (the
lookup itself, :class:`Asker`) is what a socket keeps in flight under its ID, and
its ``udp_reply(reply)`` is called with the raw reply, or ``udp_reply(None)`` for a
socket error. Timeouts are the caller's (:meth:`UdpPorts.cancel` forgets a query).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .reply import MALFORMED, WRONG_ID, ReplyRejected, check_reply

log = logging.getLogger("meshdns.forward")

DEFAULT_PORTS = 1024  # dns.upstream_ports: RFC 5452's pool of ports in use at once
LIFETIME = 5.0  # seconds a socket (its port) is used for new queries
MAX_USES = 128  # queries a socket is used for
MAX_REPLY = 65535
FD_RESERVE = 512  # descriptors kept for clients, TCP, the API, files
BIND_TRIES = 16  # random ports tried before the kernel picks one (port 0)
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")

Reject = Callable[[str], None]


def ephemeral_range(path: Path = EPHEMERAL) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return (low, high) if 1024 <= low <= high <= 65535 else (32768, 60999)


def descriptor_budget(wanted: int) -> int:
    """How many upstream sockets this process may hold: RLIMIT_NOFILE's soft limit is
    raised to ``wanted + FD_RESERVE`` (up to the hard limit) and FD_RESERVE kept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class RandomBits:
    """Unpredictable 16-bit numbers (os.urandom, the kernel's CSPRNG) read 4 KiB at a time:
    one getrandom() per 2,048 draws instead of one per draw (random.SystemRandom)."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def bits16(self) -> int:
        pos = self.pos
        if pos + 2 > len(self.buf):
            self.buf, pos = os.urandom(4096), 0
        self.pos = pos + 2
        return (self.buf[pos] << 8) | self.buf[pos + 1]

    def below(self, n: int) -> int:
        """Uniform in 0..n-1 (n <= 65536): rejection sampling, no modulo bias."""
        limit = 65536 - 65536 % n
        while True:
            value = self.bits16()
            if value < limit:
                return value % n


class Asker(Protocol):
    """What asks on a pool socket (a forwarded lookup, lookup.py): the pool writes
    ``port``, ``qid`` and ``sent`` into it when it sends, and calls ``udp_reply`` with
    the checked reply, or None for a socket error. One object per query, the asker's
    own: the pool allocates nothing per query but the datagram."""

    port: _Port | None
    qid: int
    sent: bytes
    question: bytes

    def udp_reply(self, data: bytes | None) -> None: ...


class _Port:
    """One socket: its port, age, uses and the queries in flight on it."""

    __slots__ = ("born", "fd", "loop", "pending", "pool", "retired", "sock", "until", "uses")

    def __init__(self, pool: UdpPorts, sock: socket.socket, now: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.born = now
        # Used for new queries until then: a lifetime drawn between LIFETIME/2 and
        # LIFETIME, so sockets opened together (a burst) are not all re-drawn together.
        self.until = now + pool.lifetime * (0.5 + pool.rand.bits16() / 131072)
        self.uses = 0
        self.pending: dict[int, Asker] = {}
        self.retired = False
        self.loop = loop
        loop.add_reader(self.fd, self.readable)

    def readable(self) -> None:
        # One datagram per callback: the selector is level-triggered, so another
        # queued one calls again; the common case pays no EAGAIN exception.
        try:
            data = self.sock.recv(MAX_REPLY)
        except BlockingIOError:
            return
        except OSError:  # ICMP port unreachable and the like: the upstream is not there
            self.fail()
            return
        # The reply checks (the kernel checked address and port: the socket is connected).
        if len(data) < 12:
            self.pool.reject(MALFORMED)
            return
        qid = (data[0] << 8) | data[1]
        asker = self.pending.get(qid)
        if asker is None:
            self.pool.reject(WRONG_ID)  # forged, or too late (its query gave up)
            return
        try:
            check_reply(data, asker.sent, asker.question)
        except ReplyRejected as exc:
            self.pool.reject(exc.reason)
            return
        asker.port = None
        del self.pending[qid]
        if self.retired and not self.pending:
            self.close()
        asker.udp_reply(data)

    def forget(self, qid: int) -> None:
        """``qid`` is no longer in flight; a retired socket closes with its last query."""
        del self.pending[qid]
        if self.retired and not self.pending:
            self.close()

    def retire(self) -> None:
        self.retired = True
        if not self.pending:
            self.close()

    def fail(self) -> None:
        pending, self.pending = self.pending, {}
        for asker in pending.values():
            asker.port = None
            asker.udp_reply(None)
        if self.retired:
            self.close()

    def close(self) -> None:
        if self.fd != -1:
            self.loop.remove_reader(self.fd)
            self.fd = -1
            self.sock.close()
            self.pool.live.discard(self)


class UdpPorts:
    """The pool of connected UDP sockets one upstream is asked from."""

    def __init__(self, sockaddr: tuple[str, int], family: int, size: int, reject: Reject,
                 loop: asyncio.AbstractEventLoop, *, lifetime: float = LIFETIME,
                 max_uses: int = MAX_USES) -> None:
        self.loop = loop
        self.sockaddr = sockaddr
        self.family = family
        self.size = size
        self.reject = reject
        self.lifetime = lifetime
        self.max_uses = max_uses
        self.slots: list[_Port | None] = [None] * size
        self.rand = RandomBits()
        self.ports = ephemeral_range()
        self.live: set[_Port] = set()  # open sockets, in a slot or retired
        self.drawn = 0  # sockets opened, ever (each a new random port)
        self._bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"

    def send(self, asker: Asker, tail: bytes) -> bool:
        """Send the query ``tail`` (all of it after the ID) with a random ID on a random
        pool socket; ``asker.udp_reply`` gets the reply. False: it could not be sent
        (``udp_reply`` is not called)."""
        loop = self.loop
        now = loop.time()
        rand = self.rand
        i = rand.below(self.size)
        port = self.slots[i]
        if port is None or port.uses >= self.max_uses or now >= port.until:
            if port is not None:
                port.retire()
            port = self.slots[i] = self._open(now, loop)
            if port is None:
                return False
        qid = rand.bits16()
        pending = port.pending
        while qid in pending:
            qid = rand.bits16()
        wire = qid.to_bytes(2, "big") + tail
        try:
            port.sock.send(wire)
        except OSError:
            return False
        port.uses += 1
        pending[qid] = asker
        asker.port = port
        asker.qid = qid
        asker.sent = wire
        return True

    @staticmethod
    def cancel(asker: Asker) -> None:
        """Forget ``asker``'s query (its deadline passed): a late reply is not accepted."""
        port = asker.port
        if port is not None:
            asker.port = None
            if port.pending.get(asker.qid) is asker:
                port.forget(asker.qid)

    def _open(self, now: float, loop: asyncio.AbstractEventLoop) -> _Port | None:
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            low, high = self.ports
            for _ in range(BIND_TRIES):
                try:
                    sock.bind((self._bind_host, low + self.rand.below(high - low + 1)))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                        raise
            else:
                sock.bind((self._bind_host, 0))  # the kernel's random pick
            sock.connect(self.sockaddr)
        except OSError:
            sock.close()
            return None
        self.drawn += 1
        port = _Port(self, sock, now, loop)
        self.live.add(port)
        return port

    def retire(self) -> None:
        """No longer a configured upstream (SIGHUP): each socket closes once nothing is
        in flight on it."""
        slots, self.slots = self.slots, [None] * self.size
        for port in slots:
            if port is not None:
                port.retire()

    def in_use(self) -> list[int]:
        """The local ports of the pool's open sockets (tests read them)."""
        return [port.sock.getsockname()[1] for port in self.live]

    def close(self) -> None:
        self.slots = [None] * self.size
        for port in list(self.live):
            port.fail()
            port.close()
