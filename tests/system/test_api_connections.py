"""The API's connections: what aiohttp cannot parse is a clean 400 (no traceback in the
log), and an idle connection is closed after ``api.idle_timeout`` while a long-poll in
flight is not. One real meshdns process on loopback."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..apiclient import ServerProcess, call, wait_for
from ..support import DEMO_SERVICES

IDLE = 1.0  # api.idle_timeout of the server under test


def serve(tmp: Path, **api: object) -> Iterator[ServerProcess]:
    seed = tmp / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    proc = ServerProcess(tmp / "srv", {"api": api, "registry": {"seed_file": str(seed)}},
                         name="srv")
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    yield from serve(tmp_path, idle_timeout=IDLE)


def test_a_1mb_query_string_is_a_400_without_a_traceback(plain: ServerProcess) -> None:
    server = plain
    for _ in range(3):
        reply = call(server.url, "GET", "/v1/services?x=" + "a" * (1 << 20))
        assert reply.status == 400
    assert call(server.url, "GET", "/healthz").status == 200  # and it still serves
    server.stop()  # flushes the log
    log = server.log()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if " ERROR " in line] == []


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF), without waiting for it."""
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_are_closed_after_the_idle_timeout(server: ServerProcess) -> None:
    socks: list[socket.socket] = []
    try:
        for i in range(60):
            sock = socket.create_connection(("127.0.0.1", server.api_port), timeout=5)
            if i % 3 == 1:
                sock.sendall(b"GET /v1/serv")  # a request line never finished
            elif i % 3 == 2:  # a keep-alive connection after one answered request
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b" 200 " in sock.recv(65536).split(b"\r\n", 1)[0]
            sock.setblocking(False)
            socks.append(sock)
        wait_for(lambda: all(_closed(s) for s in socks), 15,
                 f"60 idle connections closed after api.idle_timeout {IDLE:g} s",
                 interval=0.2)
    finally:
        for sock in socks:
            sock.close()


def test_a_long_poll_outlives_the_idle_timeout(server: ServerProcess) -> None:
    etag = call(server.url, "GET", "/v1/services").etag
    assert etag
    conn = http.client.HTTPConnection("127.0.0.1", server.api_port, timeout=20)
    try:
        # A watch of 3 s, three times api.idle_timeout: in flight, so not idle.
        conn.request("GET", "/v1/services?wait=3", headers={"If-None-Match": etag})
        assert conn.getresponse().status == 304
    finally:
        conn.close()
