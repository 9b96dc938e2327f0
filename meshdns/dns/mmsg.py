"""Batched UDP for Linux: ``recvmmsg``/``sendmmsg`` through ctypes, no compiled code.

Per datagram, the asyncio path pays a ``recvfrom`` and a ``sendto`` system call
plus the event loop's bookkeeping; at ~100k qps that, not the ~300 ns dict
lookup of a cache hit, is where the time goes. Here one ``recvmmsg`` takes up
to ``batch`` datagrams and one ``sendmmsg`` returns their replies.

Everything is preallocated once: one ``mmsghdr``/``iovec`` array per direction,
one data slot of ``bufsize`` bytes per message, one sockaddr slot per message.
Per message the Python work is: copy the query out as ``bytes`` (the slot is
reused by the next batch), call ``handle``, copy the reply into its send slot
and write its length. Addresses are never decoded on the hot path: a reply's
``msg_name`` points at the sockaddr the query arrived from, byte for byte, so
IPv4, IPv6 and v4-mapped peers all get their reply where the kernel said the
query came from. Only results that are not ``bytes`` (a ``ForwardRequest``)
get a decoded ``(host, port[, flowinfo, scope_id])`` address for ``on_other``.

Importing this module raises ImportError where libc has no ``recvmmsg``
(anything but Linux), so callers fall back to the asyncio transport.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

if not sys.platform.startswith("linux"):
    raise ImportError("recvmmsg/sendmmsg batching needs Linux")

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _recvmmsg = _libc.recvmmsg
    _sendmmsg = _libc.sendmmsg
except (OSError, AttributeError) as exc:  # a libc without them (very old, or not glibc/musl)
    raise ImportError(f"libc has no recvmmsg/sendmmsg: {exc}") from exc

log = logging.getLogger("meshdns.dns")

# <bits/socket.h>; the same on every Linux architecture.
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000

DEFAULT_BATCH = 64
DEFAULT_BUFSIZE = 4096  # a DNS query is < 512 bytes in practice; larger datagrams are dropped
NAME_SLOT = 32  # >= sizeof(struct sockaddr_in6) == 28
MAX_BATCHES_PER_WAKEUP = 4  # then yield to the event loop (TCP, API) even under load
_BLOCKED = (errno.EAGAIN, errno.EWOULDBLOCK)


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint))


_recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int
_sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int

_STRIDE = ctypes.sizeof(_MMsgHdr)
_MSGLEN = _MMsgHdr.msg_len.offset // 4
assert _STRIDE % 4 == 0 and _MMsgHdr.msg_len.offset % 4 == 0
_SOCKADDR_SIZE = {socket.AF_INET: 16, socket.AF_INET6: 28}
assert ctypes.sizeof(_IoVec) == 2 * ctypes.sizeof(ctypes.c_size_t)

Handle = Callable[[bytes], Any]  # bytes (a reply), None (drop), or anything else (on_other)
Address = tuple[Any, ...]


def _headers(n: int, names: int, namelen: int, datas: int, bufsize: int
             ) -> tuple[bytearray, ctypes.Array[_MMsgHdr], bytearray, ctypes.Array[_IoVec]]:
    """``n`` mmsghdrs: message ``i`` -> name slot ``i``, iovec ``i`` -> data slot ``i``."""
    iov_raw = bytearray(n * ctypes.sizeof(_IoVec))
    iov = (_IoVec * n).from_buffer(iov_raw)
    raw = bytearray(n * _STRIDE)
    msgs = (_MMsgHdr * n).from_buffer(raw)
    iov_addr = ctypes.addressof(iov)
    for i in range(n):
        iov[i].iov_base = datas + i * bufsize
        iov[i].iov_len = bufsize
        h = msgs[i].msg_hdr
        h.msg_name = names + i * NAME_SLOT
        h.msg_namelen = namelen
        h.msg_iov = iov_addr + i * ctypes.sizeof(_IoVec)
        h.msg_iovlen = 1
    return raw, msgs, iov_raw, iov


def decode_sockaddr(raw: bytes | bytearray | memoryview) -> Address:
    """A sockaddr_in/sockaddr_in6 as the address tuple Python's socket API uses."""
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[4:8])), port
    if family == socket.AF_INET6:
        flowinfo = int.from_bytes(raw[4:8], "big")
        host = socket.inet_ntop(socket.AF_INET6, bytes(raw[8:24]))
        return host, port, flowinfo, int.from_bytes(raw[24:28], sys.byteorder)
    raise ValueError(f"unexpected address family {family}")


class BatchUdpServer:
    """Answers datagrams on one UDP socket in batches.

    ``handle(query) -> bytes | None | other`` is called once per datagram (in
    arrival order); ``bytes`` are sent back to the sender, ``None`` drops the
    query, anything else goes to ``on_other(result, address)`` (forwarding;
    that path answers later with :meth:`send_to`). If ``handle`` raises,
    ``on_error(query)`` gives the reply (e.g. SERVFAIL) or None.
    ``observe(seconds)``, if given, gets the mean time per message spent
    answering (copy out, ``handle``, copy in) for one batch in eight.

    Drive it with ``loop.add_reader(sock.fileno(), server.serve_ready)`` on a
    non-blocking socket, or with :meth:`run_blocking` in a dedicated thread.
    The socket stays the caller's to close. Not thread-safe: one driver only.
    """

    def __init__(self, sock: socket.socket, handle: Handle,
                 on_other: Callable[[Any, Any], None] | None = None, *,
                 on_error: Callable[[bytes], bytes | None] | None = None,
                 observe: Callable[[float], None] | None = None,
                 screen: Callable[[bytes, memoryview], Any] | None = None,
                 batch: int = DEFAULT_BATCH, bufsize: int = DEFAULT_BUFSIZE,
                 raw_names: bool = False) -> None:
        if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET,
                                                                 socket.AF_INET6):
            raise ValueError("BatchUdpServer needs an AF_INET/AF_INET6 datagram socket")
        if not 0 < batch <= 1024 or bufsize < 512:
            raise ValueError("batch must be 1..1024 and bufsize >= 512")
        self.sock = sock
        self.fd = sock.fileno()
        self.handle = handle
        # Called instead of ``handle`` with the datagram and its raw sockaddr when set:
        # it decides (access control, rate limit) and calls ``handle`` itself.
        self.screen = screen
        self.on_other = on_other
        # on_other gets the sender's raw sockaddr (bytes) instead of an address tuple:
        # what queue_reply takes, so a forwarded reply is sent without decoding it.
        self.raw_names = raw_names
        self.on_error = on_error
        self.observe = observe
        self.batch = batch
        self.bufsize = bufsize
        # Counters (plain ints, bumped once per batch where possible).
        self.received = 0
        self.replied = 0
        self.truncated = 0  # datagrams larger than bufsize, dropped
        self.send_dropped = 0  # replies dropped: socket buffer full
        self.send_errors = 0  # replies the kernel refused (e.g. unreachable address)
        self.recv_errors = 0
        self.handler_errors = 0  # handle() raised
        self.batches = 0

        n = batch
        self._names = bytearray(n * NAME_SLOT)
        self._rdata = bytearray(n * bufsize)
        self._sdata = bytearray(n * bufsize)
        # ctypes views pin the bytearrays (no resize) and give their addresses.
        self._pins = [(ctypes.c_char * len(b)).from_buffer(b)
                      for b in (self._names, self._rdata, self._sdata)]
        names, rdata, sdata = (ctypes.addressof(p) for p in self._pins)
        # msg_namelen is value-result, but the kernel always writes back the size of
        # the socket family's sockaddr (IPv6 sockets report v4-mapped peers as
        # sockaddr_in6), so set once to that size it never needs resetting, and a
        # reply's header can use the same length.
        namelen = _SOCKADDR_SIZE[sock.family]
        self._rraw, self._rmsgs, self._riov_raw, self._riov = _headers(n, names, namelen,
                                                                       rdata, bufsize)
        # Send header i starts out pointing at name slot i too: when every query of a
        # batch is answered, reply i goes to the address of query i with no copying.
        self._sraw, self._smsgs, self._siov_raw, self._siov = _headers(n, names, namelen,
                                                                       sdata, bufsize)
        self._rmsgs_addr = ctypes.addressof(self._rmsgs)
        self._smsgs_addr = ctypes.addressof(self._smsgs)
        # The hot path reads msg_len and writes iov_len through memoryviews of the
        # raw arrays (one strided view per field), not ctypes attribute access.
        self._r_len = memoryview(self._rraw).cast("I")[_MSGLEN :: _STRIDE // 4]
        iov = memoryview(self._siov_raw)
        self._s_iovlen = (iov.cast("Q") if ctypes.sizeof(ctypes.c_size_t) == 8
                          else iov.cast("I"))[1::2]
        rview = memoryview(self._rdata)
        self._rslots = [rview[i * bufsize : (i + 1) * bufsize] for i in range(n)]
        self._s_off = [i * bufsize for i in range(n)]
        self._sview = memoryview(self._sdata)
        self._nview = memoryview(self._names)
        # Replies sent later (forwarded answers): queued, then one sendmmsg for all of
        # them (flush_queued), from their own headers, names and data slots.
        self._queued: list[tuple[bytes, bytes]] = []
        self._lnames = bytearray(n * NAME_SLOT)
        self._ldata = bytearray(n * bufsize)
        self._pins += [(ctypes.c_char * len(b)).from_buffer(b)
                       for b in (self._lnames, self._ldata)]
        lnames, ldata = (ctypes.addressof(p) for p in self._pins[3:])
        self._lraw, self._lmsgs, self._liov_raw, self._liov = _headers(n, lnames, namelen,
                                                                       ldata, bufsize)
        self._lmsgs_addr = ctypes.addressof(self._lmsgs)
        liov = memoryview(self._liov_raw)
        self._l_iovlen = (liov.cast("Q") if ctypes.sizeof(ctypes.c_size_t) == 8
                          else liov.cast("I"))[1::2]
        self._lview = memoryview(self._ldata)
        self._lnview = memoryview(self._lnames)

    # ------------------------------------------------------------ receive

    def _recv(self, flags: int) -> int:
        """One recvmmsg: the number of datagrams now in the slots, 0 if none (EAGAIN)."""
        for _ in range(8):  # EINTR / stray socket errors: bounded retries
            n: int = _recvmmsg(self.fd, self._rmsgs_addr, self.batch, flags, None)
            if n >= 0:
                return n
            err = ctypes.get_errno()
            if err in _BLOCKED:
                return 0
            if err != errno.EINTR:
                # A pending socket error (e.g. ECONNREFUSED after an ICMP) is consumed
                # by reporting it; anything else persistent ends this wakeup.
                self.recv_errors += 1
                if self.recv_errors <= 10 or self.recv_errors % 1000 == 0:
                    log.warning("recvmmsg: %s (%d so far)", errno.errorcode.get(err, err),
                                self.recv_errors)
                if err not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    return 0
        return 0

    def serve_ready(self) -> int:
        """Drain the socket (at most MAX_BATCHES_PER_WAKEUP batches); messages handled."""
        total = 0
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            n = self._recv(MSG_DONTWAIT | MSG_TRUNC)
            if n == 0:
                break
            self._answer(n)
            total += n
            if n < self.batch:
                break  # the socket was drained a moment ago; don't pay for an EAGAIN
        return total

    def run_blocking(self, stop: threading.Event, wake_interval: float = 0.2) -> None:
        """Serve until ``stop`` is set, blocking in recvmmsg (a dedicated thread).

        Takes the socket over: it is made blocking with SO_RCVTIMEO =
        ``wake_interval`` so ``stop`` is checked at least that often. ctypes
        releases the GIL while the call blocks.
        """
        usec = int(wake_interval * 1_000_000)
        self.sock.setblocking(True)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("@ll", usec // 1_000_000, usec % 1_000_000))
        while not stop.is_set():
            # MSG_WAITFORONE: block for the first datagram, then take what is queued.
            n = self._recv(MSG_WAITFORONE | MSG_TRUNC)
            if n:
                self._answer(n)

    def run_polling(self, stop: threading.Event, wake_interval: float = 0.2) -> None:
        """Like :meth:`run_blocking` but leaves the socket non-blocking (poll + drain)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        timeout_ms = int(wake_interval * 1000)
        while not stop.is_set():
            if not self.serve_ready():
                poller.poll(timeout_ms)

    # ------------------------------------------------------------ answer

    def _answer(self, n: int) -> None:
        """Handle datagrams 0..n-1 of the receive slots and send the replies."""
        self.batches += 1
        self.received += n
        # recv ran with MSG_TRUNC, so msg_len is a datagram's real length: one larger
        # than its slot was cut short (msg_flags has MSG_TRUNC too) and is dropped.
        lens = self._r_len[:n].tolist()
        handle, screen, nview = self.handle, self.screen, self._nview
        slots, sview, s_iovlen, s_off = self._rslots, self._sview, self._s_iovlen, self._s_off
        size = self.bufsize
        timed = self.observe is not None and not self.batches & 7
        started = time.perf_counter() if timed else 0.0
        j = 0  # next send slot; j <= i always, so slot j's query is already handled
        for i, length in enumerate(lens):
            if length > size:
                self.truncated += 1
                continue
            data = slots[i][:length].tobytes()  # copied out: the slot is reused next batch
            try:
                if screen is None:
                    out = handle(data)
                else:  # access control / rate limit first: it needs the sender's address
                    out = screen(data, nview[i * NAME_SLOT : (i + 1) * NAME_SLOT])
            except Exception:
                out = self._failed(data)
            if out.__class__ is bytes:
                m = len(out)
                if m > size:
                    self.send_to(out, self._address(i))
                    continue
                so = s_off[j]
                sview[so : so + m] = out
                s_iovlen[j] = m
                if i != j:  # compact: reply j goes to query i's address
                    self._move_name(i, j)
                j += 1
            elif out is not None:
                self._other(out, i)
        if timed:
            self.observe((time.perf_counter() - started) / n)  # type: ignore[misc]
        if j:
            self._flush(j)

    def _failed(self, data: bytes) -> bytes | None:
        self.handler_errors += 1
        if self.handler_errors <= 10 or self.handler_errors % 1000 == 0:  # never per packet
            log.exception("internal error answering over udp (%d so far)", self.handler_errors)
        return self.on_error(data) if self.on_error is not None else None

    def _move_name(self, i: int, j: int) -> None:
        # Compaction only ever writes slots below the query being handled, so name
        # slot i still holds query i's address here.
        nv = self._nview
        nv[j * NAME_SLOT : (j + 1) * NAME_SLOT] = nv[i * NAME_SLOT : (i + 1) * NAME_SLOT]

    def _address(self, i: int) -> Address:
        return decode_sockaddr(self._nview[i * NAME_SLOT : (i + 1) * NAME_SLOT])

    def _other(self, result: Any, i: int) -> None:
        if self.on_other is None:
            return
        try:
            self.on_other(result, self._nview[i * NAME_SLOT : (i + 1) * NAME_SLOT].tobytes()
                          if self.raw_names else self._address(i))
        except Exception:
            log.exception("internal error handing over a batched datagram")

    # ------------------------------------------------------------ send

    def _flush(self, count: int, headers: int = 0) -> None:
        """sendmmsg replies 0..count-1, continuing after a partial send.

        A reply the kernel refuses (sendmmsg fails on its first message, e.g. an
        unreachable address) is skipped and the rest still go out; a full socket
        buffer (EAGAIN/ENOBUFS) drops what is left, as UDP would anyway.
        """
        done = 0  # replies sent or skipped
        refused = 0
        headers = headers or self._smsgs_addr
        for _ in range(count + 8):  # bounded even if EINTR kept coming
            if done >= count:
                break
            sent: int = _sendmmsg(self.fd, headers + done * _STRIDE, count - done,
                                  MSG_DONTWAIT)
            if sent > 0:
                done += sent
                continue
            err = ctypes.get_errno() if sent < 0 else errno.EIO
            if err == errno.EINTR:
                continue
            if err in _BLOCKED or err == errno.ENOBUFS:
                break
            refused += 1
            done += 1
        self.replied += done - refused
        self.send_errors += refused
        self.send_dropped += count - done

    def queue_reply(self, data: bytes, name: bytes) -> bool:
        """Queue a reply to the raw sockaddr ``name`` (as on_other got it with
        ``raw_names``) for the next :meth:`flush_queued`; True when the queue was empty
        (the caller schedules the flush)."""
        queued = self._queued
        queued.append((data, name))
        return len(queued) == 1

    def flush_queued(self) -> None:
        """Send every queued reply: sendmmsg in batches of up to ``batch``."""
        queued, self._queued = self._queued, []
        size, batch = self.bufsize, self.batch
        lview, lnview, iovlen = self._lview, self._lnview, self._l_iovlen
        j = 0
        for data, name in queued:
            m = len(data)
            if m > size:
                self.send_to(data, decode_sockaddr(name))
                continue
            so = j * size
            lview[so : so + m] = data
            iovlen[j] = m
            no = j * NAME_SLOT
            lnview[no : no + len(name)] = name
            j += 1
            if j == batch:
                self._flush(j, self._lmsgs_addr)
                j = 0
        if j:
            self._flush(j, self._lmsgs_addr)

    def send_to(self, data: bytes, addr: Address) -> None:
        """One reply outside a batch (forwarded answers, oversized replies)."""
        try:
            # MSG_DONTWAIT: never block the caller's event loop, even when a
            # run_blocking thread has made the socket blocking.
            self.sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += 1
        except OSError:
            self.send_errors += 1
