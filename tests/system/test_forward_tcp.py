"""TCP to the upstream, reused and pipelined (RFC 7766), against a TCP server the test
controls: it counts the connections it accepts and the queries each one carried, and
can kill a connection in the middle of a pipeline (RST, or a plain close).

What must hold: every client query is answered, with the right answer, even when the
connection its upstream query was on dies before the reply; the queries of a burst
share one connection; sequential queries reuse it; a connection the upstream closes
while idle is replaced by a new one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from ..fake_upstream import wait_until
from ..support import ServerThread, make_config, query, recv_exact, running_server

ZONE = "pipe.test"


def address_for(name: str) -> str:
    """q7.pipe.test. -> 192.0.2.7: each answer says which question it answers."""
    return f"192.0.2.{int(name.split('.')[0][1:])}"


class PipelineUpstream:
    """A TCP DNS server on loopback, one thread per connection.

    The connection numbered ``kill_conn`` (0: the first) reads until it holds
    ``hold`` queries, answers ``answer_first`` of them and is then killed: reset
    (``rst``) or closed (``fin``). Every other connection answers each query as it
    comes. ``close_idle``: each connection is closed after its first answered query."""

    def __init__(self, hold: int = 0, answer_first: int = 0, kill: str = "rst",
                 close_idle: bool = False) -> None:
        self.hold, self.answer_first, self.kill = hold, answer_first, kill
        self.close_idle = close_idle
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.queries: list[list[str]] = []  # names per connection, in arrival order
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.stopped = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> PipelineUpstream:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                index = self.accepted
                self.accepted += 1
                self.queries.append([])
            t = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            t.start()

    @staticmethod
    def _read(conn: socket.socket) -> dns.message.Message:
        size = struct.unpack("!H", recv_exact(conn, 2))[0]
        return dns.message.from_wire(recv_exact(conn, size))

    @staticmethod
    def _answer(conn: socket.socket, msg: dns.message.Message) -> None:
        reply = dns.message.make_response(msg)
        name = msg.question[0].name.to_text()
        reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", address_for(name)))
        wire = reply.to_wire()
        conn.sendall(struct.pack("!H", len(wire)) + wire)

    def _serve(self, conn: socket.socket, index: int) -> None:
        with conn:
            try:
                if index == 0 and self.hold:
                    held = []
                    while len(held) < self.hold:
                        held.append(self._read(conn))
                        self.queries[index].append(held[-1].question[0].name.to_text())
                    for msg in held[:self.answer_first]:
                        self._answer(conn, msg)
                    if self.kill == "rst":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    return  # closed here: the rest of the pipeline is never answered
                while True:
                    msg = self._read(conn)
                    self.queries[index].append(msg.question[0].name.to_text())
                    self._answer(conn, msg)
                    if self.close_idle:
                        return
            except (OSError, ConnectionError, EOFError):
                return


@contextlib.contextmanager
def serve_zone(tmp: Path, upstream: PipelineUpstream) -> Iterator[ServerThread]:
    raw = make_config(tmp, {"dns": {"upstream_timeout": 5.0, "forward": [
        {"zone": ZONE, "upstreams": [upstream.address], "protocol": "tcp"}]}})
    with running_server(raw) as s:
        yield s


def burst(server: ServerThread, names: list[str]) -> dict[str, dns.message.Message]:
    """Send every query at once over UDP, then collect the replies (by name)."""
    host, port = server.dns_addr()
    out: dict[str, dns.message.Message] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        for name in names:
            s.sendto(dns.message.make_query(name, "A").to_wire(), (host, port))
        while len(out) < len(names):
            reply = dns.message.from_wire(s.recv(65535))
            out[reply.question[0].name.to_text()] = reply
    return out


@pytest.mark.parametrize("kill", ["rst", "fin"])
def test_connection_killed_mid_pipeline_every_query_still_answered(
        tmp_path: Path, kill: str) -> None:
    names = [f"q{i}.{ZONE}." for i in range(1, 11)]
    with PipelineUpstream(hold=len(names), answer_first=3, kill=kill) as upstream, \
            serve_zone(tmp_path, upstream) as server:
        replies = burst(server, names)
        for name in names:
            assert replies[name].rcode() == dns.rcode.NOERROR, name
            assert [r.address for r in replies[name].answer[0]] == [address_for(name)]
        # All ten were pipelined on the first connection before it died; the seven
        # left unanswered were sent again on one fresh connection.
        assert sorted(upstream.queries[0]) == sorted(names)
        assert upstream.accepted == 2
        assert len(upstream.queries[1]) == 7
        pool = server.mesh.forwarder.upstreams[0].tcp
        assert pool is not None and pool.retried == 7


def test_sequential_queries_reuse_one_connection(tmp_path: Path) -> None:
    with PipelineUpstream() as upstream, serve_zone(tmp_path, upstream) as server:
        for i in range(1, 6):
            reply = query(server, f"q{i}.{ZONE}", timeout=5.0)
            assert [r.address for r in reply.answer[0]] == [f"192.0.2.{i}"]
        assert upstream.accepted == 1 and len(upstream.queries[0]) == 5


def test_connection_closed_by_the_upstream_when_idle_is_replaced(tmp_path: Path) -> None:
    with PipelineUpstream(close_idle=True) as upstream, \
            serve_zone(tmp_path, upstream) as server:
        assert [r.address for r in query(server, f"q1.{ZONE}").answer[0]] == ["192.0.2.1"]
        pool = server.mesh.forwarder.upstreams[0].tcp
        assert pool is not None
        # The upstream closed it after its answer: the pool notices and drops it.
        wait_until(lambda: not pool.connections, "the closed connection dropped")
        assert [r.address for r in query(server, f"q2.{ZONE}").answer[0]] == ["192.0.2.2"]
        assert upstream.accepted == 2
        assert pool.retried == 0  # nothing was in flight when it closed


def test_a_refused_connection_is_servfail_not_a_hang(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections refused
        raw = make_config(tmp_path, {"dns": {"upstream_timeout": 2.0, "forward": [
            {"zone": ZONE, "upstreams": [f"127.0.0.1:{port}"], "protocol": "tcp"}]}})
        with running_server(raw) as server:
            assert query(server, f"q1.{ZONE}", timeout=5.0).rcode() == dns.rcode.SERVFAIL
            stats = server.mesh.forwarder.upstream_stats()[f"127.0.0.1:{port}"]
            assert stats.requests == {"error": 1}
