"""recvmmsg/sendmmsg batching (meshdns.dns.mmsg) over real loopback sockets.

Every test drives a real ``MessageHandler`` (or a stub handler) through a
``BatchUdpServer`` and checks what the clients receive: each reply reaches the
socket its query came from with the query's ID, over IPv4, IPv6 and
v4-mapped addresses, across batches; oversized, short and unanswerable
datagrams are dropped without disturbing the rest of their batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import Registry, RegistryPolicy, apply_put, parse_services
from meshdns.dns.transport import servfail

from ..support import have_ipv6_loopback

mmsg = pytest.importorskip("meshdns.dns.mmsg", reason="recvmmsg batching is Linux-only")
BatchUdpServer = mmsg.BatchUdpServer

N_SERVICES = 50
needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")


def vip(i: int) -> str:
    return f"240.0.{i // 250}.{i % 250 + 1}"


def name(i: int) -> str:
    return f"svc{i}.ns0.svc.80.mesh"


def make_resolver() -> MessageHandler:
    items = [{"name": f"svc{i}", "namespace": "ns0", "port": 80, "vip": vip(i)}
             for i in range(N_SERVICES)]
    policy = RegistryPolicy()
    reg = apply_put(Registry.empty(), parse_services(items), policy, 0.0)
    return MessageHandler(Zone(reg, ZoneSettings(range4=policy.range4, range6=policy.range6)))


def query(i: int, qid: int) -> bytes:
    q = DNSRecord.question(name(i), "A")
    q.header.id = qid
    return bytes(q.pack())


def check_reply(raw: bytes, qid: int, i: int) -> None:
    reply = DNSRecord.parse(raw)
    assert reply.header.id == qid
    assert reply.header.rcode == RCODE.NOERROR
    assert str(reply.q.qname).rstrip(".") == name(i)
    assert [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A] == [vip(i)]


@contextmanager
def udp(family: int = socket.AF_INET, host: str = "127.0.0.1",
        v6only: bool = True) -> Iterator[socket.socket]:
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.bind((host, 0))
        yield s
    finally:
        s.close()


def server_socket(family: int = socket.AF_INET, host: str = "127.0.0.1",
                  v6only: bool = True) -> Any:
    return udp(family, host, v6only)


def pump(server: Any, want: int, timeout: float = 5.0) -> None:
    """Call serve_ready until ``want`` datagrams were received (they are queued already)."""
    deadline = time.monotonic() + timeout
    start = server.received
    while server.received - start < want:
        if not server.serve_ready():
            assert time.monotonic() < deadline, f"only {server.received - start}/{want} arrived"
            time.sleep(0.001)


def recv_all(sock: socket.socket, n: int, timeout: float = 2.0) -> list[bytes]:
    sock.settimeout(timeout)
    out = []
    try:
        while len(out) < n:
            out.append(sock.recv(65535))
    except TimeoutError:
        pass
    return out


def assert_silent(sock: socket.socket, wait: float = 0.1) -> None:
    sock.settimeout(wait)
    with pytest.raises(TimeoutError):
        sock.recv(65535)


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize("family,host,client_host,v6only", [
    pytest.param(socket.AF_INET, "127.0.0.1", "127.0.0.1", True, id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", "::1", True, id="ipv6", marks=needs_ipv6),
    pytest.param(socket.AF_INET6, "::ffff:127.0.0.1", "127.0.0.1", False, id="v4-mapped", marks=needs_ipv6),
])
def test_each_client_gets_its_own_reply(family: int, host: str, client_host: str,
                                        v6only: bool) -> None:
    resolver = make_resolver()
    client_family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    with server_socket(family, host, v6only) as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, resolver.handle_udp)
        port = ss.getsockname()[1]
        target = ("::1" if client_host == "::1" else "127.0.0.1", port)
        with udp(client_family, client_host) as a, udp(client_family, client_host) as b:
            a.sendto(query(1, 0x1111), target)
            b.sendto(query(2, 0x2222), target)
            a.sendto(query(3, 0x3333), target)
            pump(server, 3)
            got_a, got_b = recv_all(a, 2), recv_all(b, 1)
            assert len(got_a) == 2 and len(got_b) == 1
            check_reply(got_a[0], 0x1111, 1)
            check_reply(got_a[1], 0x3333, 3)
            check_reply(got_b[0], 0x2222, 2)
            assert_silent(a)
            assert_silent(b)
    assert server.replied == 3 and server.send_errors == server.send_dropped == 0


# ---------------------------------------------------------------- bursts


def burst(server: Any, target: tuple[str, int], clients: list[socket.socket], total: int,
          drive: Callable[[int], None] | None) -> None:
    """``total`` queries round-robin over ``clients`` (every 7th one malformed), in chunks
    small enough for the socket buffers; every client gets exactly its good replies."""
    sent: dict[int, list[tuple[int, int]]] = {c.fileno(): [] for c in clients}
    chunk = 100
    qid = 0
    for base in range(0, total, chunk):
        expected = {c.fileno(): 0 for c in clients}
        for k in range(base, min(base + chunk, total)):
            c = clients[k % len(clients)]
            qid += 1
            if k % 7 == 3:
                c.sendto(b"\x12\x34\x01", target)  # short: no header, dropped
                continue
            i = k % N_SERVICES
            c.sendto(query(i, qid), target)
            sent[c.fileno()].append((qid, i))
            expected[c.fileno()] += 1
        if drive is not None:
            drive(min(base + chunk, total) - base)
        for c in clients:
            got = recv_all(c, expected[c.fileno()])
            assert len(got) == expected[c.fileno()]
            mine = sent[c.fileno()][-expected[c.fileno()]:]
            for raw, (q, i) in zip(got, mine, strict=True):  # one socket: arrival order kept
                check_reply(raw, q, i)
    for c in clients:
        assert_silent(c, 0.05)


def test_burst_of_500_from_several_clients_serve_ready() -> None:
    resolver = make_resolver()
    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, resolver.handle_udp, batch=16)  # many batches per chunk
        target = ss.getsockname()
        with udp() as c1, udp() as c2, udp() as c3, udp() as c4, udp() as c5:
            burst(server, target, [c1, c2, c3, c4, c5], 500, lambda n: pump(server, n))
    assert server.received == 500
    assert server.replied == 500 - sum(1 for k in range(500) if k % 7 == 3)
    assert server.batches >= 500 // 16


def test_burst_with_run_blocking_thread() -> None:
    resolver = make_resolver()
    with server_socket() as ss:
        server = BatchUdpServer(ss, resolver.handle_udp)
        stop = threading.Event()
        thread = threading.Thread(target=server.run_blocking, args=(stop, 0.05), daemon=True)
        thread.start()
        try:
            with udp() as c1, udp() as c2, udp() as c3:
                burst(server, ss.getsockname(), [c1, c2, c3], 500, None)
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive(), "run_blocking did not notice stop"
    assert server.received == 500


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_add_reader_on_event_loop(loop_factory: str) -> None:
    if loop_factory == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    resolver = make_resolver()

    async def main(ss: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = BatchUdpServer(ss, resolver.handle_udp)
        loop.add_reader(ss.fileno(), server.serve_ready)
        try:
            with udp() as c:
                c.connect(ss.getsockname())  # uvloop has no sock_sendto
                c.setblocking(False)
                for k in range(150):
                    await loop.sock_sendall(c, query(k % N_SERVICES, k))
                for k in range(150):
                    raw = await asyncio.wait_for(loop.sock_recv(c, 65535), 5)
                    check_reply(raw, k, k % N_SERVICES)
        finally:
            loop.remove_reader(ss.fileno())

    with server_socket() as ss:
        ss.setblocking(False)
        loop = new_loop()
        try:
            loop.run_until_complete(main(ss))
        finally:
            loop.close()


# ---------------------------------------------------------------- what gets dropped


def test_oversized_datagram_dropped_next_ones_answered() -> None:
    resolver = make_resolver()
    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, resolver.handle_udp, bufsize=512)
        with udp() as c:
            c.sendto(query(1, 1), ss.getsockname())
            c.sendto(query(2, 2)[:12] + b"\x00" * 2000, ss.getsockname())  # > bufsize
            c.sendto(query(3, 3), ss.getsockname())
            pump(server, 3)
            c.sendto(b"\xff" * 60000, ss.getsockname())  # alone in its batch
            c.sendto(query(4, 4), ss.getsockname())
            pump(server, 2)
            got = recv_all(c, 3)
            assert len(got) == 3
            for raw, (q, i) in zip(got, [(1, 1), (3, 3), (4, 4)], strict=True):
                check_reply(raw, q, i)
            assert_silent(c)
    assert server.truncated == 2


def test_short_and_malformed_datagrams_dropped() -> None:
    resolver = make_resolver()
    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, resolver.handle_udp)
        with udp() as c:
            for junk in (b"", b"\x00", b"\x12\x34" + b"\x00" * 9,  # shorter than a header
                         query(5, 5)[:2] + b"\x80" + query(5, 5)[3:]):  # a response: QR=1
                c.sendto(junk, ss.getsockname())
            c.sendto(query(6, 6), ss.getsockname())
            pump(server, 5)
            got = recv_all(c, 1)
            assert len(got) == 1
            check_reply(got[0], 6, 6)
            assert_silent(c)


def test_non_bytes_results_go_to_on_other_with_the_sender_address() -> None:
    marker = object()
    handed: list[tuple[Any, Any]] = []

    def handle(data: bytes) -> Any:
        return marker if data.startswith(b"F") else b"R" + data

    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, handle, lambda r, a: handed.append((r, a)))
        with udp() as a, udp() as b:
            a.sendto(b"F-a", ss.getsockname())
            b.sendto(b"plain-b", ss.getsockname())
            b.sendto(b"F-b", ss.getsockname())
            a.sendto(b"plain-a", ss.getsockname())
            pump(server, 4)
            assert handed == [(marker, a.getsockname()), (marker, b.getsockname())]
            assert recv_all(a, 1) == [b"Rplain-a"]  # compacted into send slot 0
            assert recv_all(b, 1) == [b"Rplain-b"]
            # the forward path answers later, outside a batch
            server.send_to(b"late", handed[1][1])
            assert recv_all(b, 1) == [b"late"]


def test_queued_replies_reach_their_raw_senders_in_batches() -> None:
    """The forward path's replies: on_other gets each sender's raw sockaddr, and the
    replies queued to them later all leave with flush_queued, more than a batch of them
    too, an oversized one on its own."""
    handed: list[tuple[Any, bytes]] = []
    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, lambda d: 42, lambda r, a: handed.append((r, a)),
                                batch=4, bufsize=512, raw_names=True)
        with udp() as a, udp() as b:
            a.sendto(b"from-a", ss.getsockname())
            b.sendto(b"from-b", ss.getsockname())
            pump(server, 2)
            assert [r for r, _ in handed] == [42, 42]
            name_a, name_b = handed[0][1], handed[1][1]
            assert isinstance(name_a, bytes) and mmsg.decode_sockaddr(name_a) == a.getsockname()
            assert server.queue_reply(b"a0", name_a) is True  # the first: flush it
            assert server.queue_reply(b"b0", name_b) is False
            for i in range(1, 6):  # 12 replies in all: three sendmmsg batches of 4
                server.queue_reply(b"a%d" % i, name_a)
                server.queue_reply(b"b%d" % i, name_b)
            server.queue_reply(b"B" * 600, name_b)  # over the slot size: sent alone
            server.flush_queued()
            assert recv_all(a, 6) == [b"a%d" % i for i in range(6)]
            assert sorted(recv_all(b, 7)) == sorted([b"b%d" % i for i in range(6)] + [b"B" * 600])
            server.flush_queued()  # nothing queued: nothing sent
            assert_silent(a)


@needs_ipv6
def test_on_other_ipv6_address_tuple() -> None:
    handed: list[Any] = []
    with server_socket(socket.AF_INET6, "::1") as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, lambda d: 42, lambda r, a: handed.append(a))
        with udp(socket.AF_INET6, "::1") as c:
            c.sendto(b"x" * 20, ss.getsockname())
            pump(server, 1)
            assert handed == [c.getsockname()]  # (host, port, flowinfo, scope_id)


def test_handler_error_answers_on_error_reply() -> None:
    def boom(data: bytes) -> Any:
        if data[2:3] == b"\x01":
            raise RuntimeError("core bug")
        return b"ok" + data[:2]

    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, boom, on_error=servfail)
        with udp() as c:
            c.sendto(query(1, 7), ss.getsockname())  # RD=1: flags byte 0x01 -> raises
            c.sendto(b"\x00\x09\x00" + b"\x00" * 20, ss.getsockname())
            pump(server, 2)
            got = recv_all(c, 2)
            assert DNSRecord.parse(got[0]).header.rcode == RCODE.SERVFAIL
            assert DNSRecord.parse(got[0]).header.id == 7
            assert got[1] == b"ok\x00\x09"


# ---------------------------------------------------------------- partial sends


def test_partial_sendmmsg_retries_skips_refused_and_drops_on_eagain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = mmsg._sendmmsg
    script = iter([
        ("real", 2),  # a partial send: 2 of 6
        ("errno", errno.EPERM),  # the third is refused: skipped
        ("real", 1),
        ("errno", errno.EAGAIN),  # buffer full: the remaining two are dropped
    ])
    calls: list[int] = []

    def fake(fd: int, ptr: int, vlen: int, flags: int) -> int:
        calls.append(vlen)
        kind, arg = next(script)
        if kind == "errno":
            ctypes.set_errno(arg)
            return -1
        return int(real(fd, ptr, min(arg, vlen), flags))

    monkeypatch.setattr(mmsg, "_sendmmsg", fake)
    with server_socket() as ss:
        ss.setblocking(False)
        server = BatchUdpServer(ss, lambda d: b"R" + d)
        with udp() as c:
            for k in range(6):
                c.sendto(b"%d" % k, ss.getsockname())
            pump(server, 6)
            assert calls == [6, 4, 3, 2]
            assert recv_all(c, 3, timeout=0.3) == [b"R0", b"R1", b"R3"]
    assert (server.replied, server.send_errors, server.send_dropped) == (3, 1, 2)


def test_rejects_what_it_cannot_serve() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
            pytest.raises(ValueError):
        BatchUdpServer(tcp, lambda d: None)
    with server_socket() as ss, pytest.raises(ValueError):
        BatchUdpServer(ss, lambda d: None, batch=0)


def test_decode_sockaddr_round_trip() -> None:
    import struct

    raw4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 5353) \
        + socket.inet_pton(socket.AF_INET, "10.1.2.3") + b"\x00" * 8
    assert mmsg.decode_sockaddr(raw4) == ("10.1.2.3", 5353)
    raw6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 53, 7) \
        + socket.inet_pton(socket.AF_INET6, "fe80::1") + struct.pack("=I", 2)
    assert mmsg.decode_sockaddr(raw6) == ("fe80::1", 53, 7, 2)


def test_import_fails_cleanly_off_linux() -> None:
    """Callers fall back on ImportError; simulate another platform in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; sys.platform = 'darwin'\n"
            "try:\n    import meshdns.dns.mmsg\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("ImportError"), out.stdout + out.stderr
