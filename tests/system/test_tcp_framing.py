"""TCP framing under hostile clients, over real sockets (issue 11, item 3).

A message must be whole within ``dns.tcp_idle_timeout`` of its first byte, however
slowly the rest trickles in; at ``dns.tcp_max_connections`` the connection idle the
longest is closed to make room, so a fresh client is always served. Tricklers are
threads sending one byte every ``gap`` seconds; no test asserts a speed, only that
a connection ends before its trickled frame could be complete, or that a real
client (dig, dnspython) is answered within the configured timeout.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ..apiclient import ServerProcess
from ..fake_upstream import wait_until
from ..support import (
    DEMO_SERVICES,
    ServerThread,
    make_config,
    recv_exact,
    run_tool,
    running_server,
    tool,
    udp_query,
)

F = "frontend.kong.svc.80.mesh."
VIP = "240.0.0.7"


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def qname(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode()
                    for label in name.rstrip(".").split(".")) + b"\x00"


def query_wire(qid: int, padding: int | None = None) -> bytes:
    """A query for F; with ``padding``, an OPT carrying an EDNS padding option of that
    many bytes (RFC 7830), so a valid query can have any length up to 65535."""
    question = qname(F) + struct.pack("!HH", 1, 1)
    if padding is None:
        return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + question
    option = struct.pack("!HH", 12, padding) + b"\x00" * padding
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, len(option)) + option
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1) + question + opt


QUERY_OVERHEAD = len(query_wire(0, 0))  # a padded query with 0 bytes of padding
MAX_PADDING = 65535 - QUERY_OVERHEAD  # the padded query is then exactly 65535 bytes


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!H", recv_exact(sock, 2))
    return recv_exact(sock, size)


def assert_answered(wire: bytes, qid: int) -> None:
    msg = dns.message.from_wire(wire)
    assert msg.id == qid and msg.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in msg.answer for r in rrset] == [VIP]


def tcp_server(tmp: Path, timeout: float, cap: int = 20) -> Any:
    return running_server(make_config(tmp, {"dns": {
        "listen": ["127.0.0.1:0"], "tcp_idle_timeout": timeout, "tcp_max_connections": cap}}))


def on_loop(server: ServerThread, fn: Any) -> Any:
    """Read server state on its own loop thread (no torn reads)."""
    return server.call(fn)


def open_connections(server: ServerThread) -> int:
    return int(on_loop(server, lambda: server.mesh.tcp_limits.open))


def evicted(server: ServerThread) -> int:
    return int(on_loop(server, lambda: server.mesh.tcp_limits.evicted))


# ---------------------------------------------------------------- trickling clients


@dataclass
class Session:
    sent: int = 0  # bytes of the frame sent before the session ended
    ended: str = ""  # closed | reset | answered | completed | stopped | connect-failed


class Trickler(threading.Thread):
    """A hostile client: one byte of a valid framed query every ``gap`` seconds.

    The frame would take ``gap * len(frame)`` seconds to complete, far longer than
    the server's timeout. With ``reconnect`` it connects again whenever dropped
    (after ``pause``), as an attacker holding slots would; sessions are bounded.
    """

    FRAME = frame(query_wire(0xBEEF))

    def __init__(self, addr: tuple[str, int], gap: float, reconnect: bool = False,
                 pause: float = 0.05, max_sessions: int = 500) -> None:
        super().__init__(daemon=True)
        self.addr, self.gap, self.reconnect = addr, gap, reconnect
        self.pause, self.max_sessions = pause, max_sessions
        self.stopping = threading.Event()
        self.connected = threading.Event()  # set once the first byte is out
        self.sessions: list[Session] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        for _ in range(self.max_sessions):
            if self.stopping.is_set():
                break
            session = Session()
            with self.lock:
                self.sessions.append(session)
            self._session(session)
            if not self.reconnect:
                break
            self.stopping.wait(self.pause)

    def _session(self, s: Session) -> None:
        try:
            sock = socket.create_connection(self.addr, timeout=5)
        except OSError:
            s.ended = "connect-failed"
            return
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while s.sent < len(self.FRAME):
                try:
                    sock.send(self.FRAME[s.sent : s.sent + 1])
                except OSError:
                    s.ended = "reset"
                    return
                s.sent += 1
                self.connected.set()
                if self._server_spoke(sock, s, self.gap):
                    return
                if self.stopping.is_set():
                    s.ended = "stopped"
                    return
            if not self._server_spoke(sock, s, 5.0):
                s.ended = "completed"  # whole frame sent and nothing came back

    @staticmethod
    def _server_spoke(sock: socket.socket, s: Session, wait: float) -> bool:
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            return False
        try:
            data = sock.recv(4096)
        except OSError:
            s.ended = "reset"
            return True
        s.ended = "answered" if data else "closed"
        return True

    def ended(self) -> list[Session]:
        with self.lock:
            return [s for s in self.sessions if s.ended]

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


@pytest.fixture
def tricklers() -> Iterator[list[Trickler]]:
    started: list[Trickler] = []
    yield started
    for t in started:
        t.stopping.set()
    for t in started:
        t.join(10)


def start_trickler(pool: list[Trickler], addr: tuple[str, int], gap: float,
                   reconnect: bool = False) -> Trickler:
    t = Trickler(addr, gap, reconnect)
    pool.append(t)
    t.start()
    assert t.connected.wait(10), "trickler could not connect"
    return t


def dropped(pool: list[Trickler]) -> list[Session]:
    """Sessions the server ended: "closed" (FIN: evicted) or "reset" (the deadline)."""
    return [s for t in pool for s in t.ended() if s.ended in ("closed", "reset")]


def stop_and_check(pool: list[Trickler], evictions: Any) -> None:
    """Stop the tricklers: none was ever answered, every drop came before its frame
    was whole, and more were dropped than evicted: the deadline dropped the rest."""
    for t in pool:
        t.stop()
    sessions = [s for t in pool for s in t.sessions]
    assert not [s for s in sessions if s.ended in ("answered", "completed")]
    assert all(s.sent < len(Trickler.FRAME) for s in dropped(pool))
    assert len(dropped(pool)) > evictions()


def dig_tcp(addr: tuple[str, int], timeout: int) -> str:
    digp = tool("dig")
    assert digp, "dig is installed on this machine"
    host, port = addr
    out = run_tool(digp, "+tcp", f"+time={timeout}", "+tries=1", "+retry=0", "-p", str(port),
                   f"@{host}", F, "A")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "status: NOERROR" in out.stdout, out.stdout
    assert any(line.split()[-1] == VIP for line in out.stdout.splitlines()
               if line.startswith(F)), out.stdout
    return out.stdout


def dnspython_tcp(addr: tuple[str, int], timeout: float) -> None:
    host, port = addr
    reply = dns.query.tcp(dns.message.make_query(F, "A"), host, port=port, timeout=timeout)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in reply.answer for r in rrset] == [VIP]


# ---------------------------------------------------------------- the cap evicts


def test_at_the_cap_the_longest_idle_connection_makes_room(
        tmp_path: Path, tricklers: list[Trickler]) -> None:
    """20 tricklers hold every slot (timeout far away): a fresh dig, then a fresh
    dnspython client, are served, each by closing the trickler idle the longest."""
    with tcp_server(tmp_path, timeout=60) as server:
        addr = server.dns_addr()
        for _ in range(20):
            start_trickler(tricklers, addr, gap=0.5)  # one at a time: a known order
        wait_until(lambda: open_connections(server) == 20, "20 tricklers connected")

        dig_tcp(server.dns_addr(), timeout=5)
        wait_until(lambda: bool(tricklers[0].ended()), "the oldest trickler closed")
        assert tricklers[0].ended()[0].ended in ("closed", "reset")
        assert all(not t.ended() for t in tricklers[1:])  # only the longest idle one went
        assert evicted(server) == 1

        wait_until(lambda: open_connections(server) == 19, "dig's connection closed")
        start_trickler(tricklers, addr, gap=0.5)  # the cap is full again
        wait_until(lambda: open_connections(server) == 20, "cap full again")
        dnspython_tcp(server.dns_addr(), timeout=5)
        wait_until(lambda: bool(tricklers[1].ended()), "the next-oldest trickler closed")
        assert all(not t.ended() for t in tricklers[2:])
        assert evicted(server) == 2
        assert open_connections(server) <= 20


def test_eviction_picks_the_least_recently_active_not_the_oldest(tmp_path: Path) -> None:
    """A, B, C connect in that order; A then asks a question. At the cap (3), a new
    connection closes B, idle the longest, while A (older, but active) keeps working."""
    with tcp_server(tmp_path, timeout=60, cap=3) as server:
        addr = server.dns_addr()
        a, b, c = (socket.create_connection(addr, timeout=5) for _ in range(3))
        with a, b, c:
            wait_until(lambda: open_connections(server) == 3, "three connections")
            a.sendall(frame(query_wire(1)))
            assert_answered(recv_frame(a), 1)
            with socket.create_connection(addr, timeout=5) as d:
                d.sendall(frame(query_wire(2)))
                assert_answered(recv_frame(d), 2)
                assert b.recv(1) == b""  # B was closed (FIN: it had nothing unsent)
                a.sendall(frame(query_wire(3)))
                assert_answered(recv_frame(a), 3)
                c.sendall(frame(query_wire(4)))
                assert_answered(recv_frame(c), 4)
            assert evicted(server) == 1
            with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert "meshdns_dns_tcp_evicted_connections_total 1.0" in text.splitlines()


# ---------------------------------------------------------------- the per-message deadline


def test_trickler_is_dropped_at_the_message_deadline_though_it_keeps_sending(
        tmp_path: Path, tricklers: list[Trickler]) -> None:
    """One byte every 0.25 s would finish the frame after ~11 s; the deadline is 2 s
    after its first byte, so the server drops it first and never answers it."""
    with tcp_server(tmp_path, timeout=2) as server:
        t = start_trickler(tricklers, server.dns_addr(), gap=0.25)
        t.join(30)
        assert not t.is_alive()
        (session,) = t.sessions
        assert session.ended in ("closed", "reset"), session
        assert 1 <= session.sent < len(Trickler.FRAME)
        assert evicted(server) == 0  # the deadline closed it, not the cap
        wait_until(lambda: open_connections(server) == 0, "the slot freed")


def test_whole_messages_keep_a_connection_open_past_the_timeout(tmp_path: Path) -> None:
    """The deadline is per message: a client sending whole queries every 0.5 s keeps
    its connection for longer than tcp_idle_timeout (2 s) and gets every answer."""
    with tcp_server(tmp_path, timeout=2) as server, \
            socket.create_connection(server.dns_addr(), timeout=5) as sock:
        started = time.monotonic()
        for qid in range(1, 100):
            sock.sendall(frame(query_wire(qid)))
            assert_answered(recv_frame(sock), qid)
            if time.monotonic() - started > 3.0:
                break
            time.sleep(0.5)
        assert qid >= 5  # several timeouts' worth of messages on one connection


def test_fresh_clients_are_served_while_reconnecting_tricklers_hold_the_cap(
        tmp_path: Path, tricklers: list[Trickler]) -> None:
    """Issue 11 item 3: 20 tricklers (a byte every 0.5 s, reconnecting whenever
    dropped) against tcp_max_connections 20 and tcp_idle_timeout 2 s; dig +tcp and
    dnspython clients are each answered within the 2 s timeout."""
    with tcp_server(tmp_path, timeout=2) as server:
        addr = server.dns_addr()
        for _ in range(20):
            start_trickler(tricklers, addr, gap=0.5, reconnect=True)
        wait_until(lambda: open_connections(server) == 20, "the cap filled")
        # Every trickler dropped once (the deadline) and back trickling.
        wait_until(lambda: len(dropped(tricklers)) >= 20, "every trickler dropped", 30)
        for _ in range(3):
            dig_tcp(server.dns_addr(), timeout=2)
            dnspython_tcp(server.dns_addr(), timeout=2.0)
            assert open_connections(server) <= 20
        stop_and_check(tricklers, lambda: evicted(server))


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.split(" ")[0] == name:
                return float(line.split(" ")[1])
    raise AssertionError(f"{name} not exported")


def test_same_under_uvloop_in_a_real_meshdns_process(tmp_path: Path,
                                                     tricklers: list[Trickler]) -> None:
    """The production event loop (uvloop, `python -m meshdns serve`): at the cap a
    fresh client evicts the longest-idle trickler; past the 2 s deadline reconnecting
    tricklers are dropped again and again while fresh clients are served."""
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    proc = ServerProcess(tmp_path, {"dns": {"tcp_idle_timeout": 2, "tcp_max_connections": 20},
                                    "registry": {"seed_file": str(seed)}})
    proc.start()
    try:
        assert "uvloop" in subprocess.run(
            [sys.executable, "-c", "import meshdns.cli as c, asyncio; c._event_loop_policy();"
             " print(type(asyncio.get_event_loop_policy()).__module__)"],
            capture_output=True, text=True, check=True).stdout
        for _ in range(20):
            start_trickler(tricklers, proc.dns_addr, gap=0.5, reconnect=True)
        wait_until(lambda: metric(proc.url, "meshdns_dns_tcp_connections") == 20,
                   "the cap filled")
        dig_tcp(proc.dns_addr, timeout=2)
        assert metric(proc.url, "meshdns_dns_tcp_evicted_connections_total") >= 1
        wait_until(lambda: len(dropped(tricklers)) >= 20, "every trickler dropped", 30)
        for _ in range(3):
            dig_tcp(proc.dns_addr, timeout=2)
            dnspython_tcp(proc.dns_addr, timeout=2.0)
        assert metric(proc.url, "meshdns_dns_tcp_connections") <= 20
        stop_and_check(tricklers, lambda: metric(
            proc.url, "meshdns_dns_tcp_evicted_connections_total"))
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        proc.stop()
    assert "Traceback" not in proc.log(), proc.log()


# ---------------------------------------------------------------- framing fuzz


FUZZ_TIMEOUT = 5.0
MAX_STALL = 0.15  # each stall, far below FUZZ_TIMEOUT
TOTAL_STALL = 0.6  # per example: every message is whole well within its deadline


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with tcp_server(tmp_path_factory.mktemp("fuzz"), timeout=FUZZ_TIMEOUT) as server:
        yield server


# A frame: a query padded to a length (0 .. MAX_PADDING, i.e. up to exactly 65535
# bytes), or junk shorter than a header (lengths 0..11, never answered).
padding_st = st.one_of(st.just(0), st.just(MAX_PADDING), st.integers(0, 3000),
                       st.integers(0, MAX_PADDING))
item_st = st.one_of(padding_st.map(lambda p: ("query", p)),
                    st.binary(max_size=11).map(lambda b: ("junk", b)))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(items=st.lists(item_st, min_size=1, max_size=12), data=st.data())
def test_fuzz_random_splits_lengths_and_stalls(fuzz_server: ServerThread,
                                               items: list[tuple[str, Any]],
                                               data: st.DataObject) -> None:
    """Every whole message gets exactly one answer (matched by ID), junk frames none,
    however the stream is cut and paused; the server keeps serving."""
    stream = b""
    expected: list[int] = []
    for i, (kind, value) in enumerate(items):
        if kind == "query":
            qid = 0x1000 + i
            expected.append(qid)
            stream += frame(query_wire(qid, value))
        else:
            stream += frame(value)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20)
                                if len(stream) > 1 else st.just([]))))
    stalls = data.draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.05, MAX_STALL]),
                                min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got: list[int] = []
    with socket.create_connection(fuzz_server.dns_addr(), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stalled = 0.0
        for chunk, stall in zip(chunks, stalls, strict=True):
            sock.sendall(chunk)
            if stall and stalled + stall <= TOTAL_STALL:
                stalled += stall
                time.sleep(stall)
        sock.shutdown(socket.SHUT_WR)  # half-close: the server answers all, then closes
        while True:
            head = sock.recv(1, socket.MSG_PEEK)
            if not head:
                break
            wire = recv_frame(sock)
            msg = dns.message.from_wire(wire)
            assert msg.rcode() == dns.rcode.NOERROR
            assert [r.address for rrset in msg.answer for r in rrset] == [VIP]
            got.append(msg.id)
    assert sorted(got) == expected


def test_fuzz_server_still_answers_afterwards(fuzz_server: ServerThread) -> None:
    dnspython_tcp(fuzz_server.dns_addr(), timeout=5.0)
    host, port = fuzz_server.dns_addr()
    reply = udp_query(dns.message.make_query(F, "A"), host, port, timeout=5)
    assert [r.address for rrset in reply.answer for r in rrset] == [VIP]
