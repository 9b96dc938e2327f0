"""Watching the registry: ``GET /v1/services?wait=S`` with ``If-None-Match``.

No test asserts on time: a waiter is known to be parked by the server's own
count of waiters, and known to have been released by a change because it comes
back with the new revision (a timeout would have answered 304).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshdns.api.services import parse_wait
from meshdns.api.state import MAX_WAIT_SECONDS

from ..apiclient import Reply, call, wait_for
from ..support import ServerThread, make_config, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, {"api": {"max_watchers": 3}})) as srv:
        yield srv


class Watcher(threading.Thread):
    """One long-poll in a thread; ``reply`` once it returned."""

    def __init__(self, srv: ServerThread, etag: str | None, wait: float = 60) -> None:
        super().__init__(daemon=True)
        self.srv, self.etag, self.wait = srv, etag, wait
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        headers = {"If-None-Match": self.etag} if self.etag else {}
        try:
            self.reply = call(self.srv.api_url, "GET", f"/v1/services?wait={self.wait:g}",
                              headers=headers, timeout=90)
        except BaseException as exc:
            self.error = exc

    def result(self) -> Reply:
        self.join(30)
        assert not self.is_alive(), "watcher was not released"
        assert self.error is None, self.error
        assert self.reply is not None
        return self.reply


def waiting(srv: ServerThread) -> int:
    return int(srv.call(lambda: srv.mesh.api.state.watch.waiting))


def park(srv: ServerThread, n: int, etag: str = '"1"') -> list[Watcher]:
    watchers = [Watcher(srv, etag) for _ in range(n)]
    for w in watchers:
        w.start()
    wait_for(lambda: waiting(srv) == n, 10, f"{n} parked watchers")
    return watchers


def patch(srv: ServerThread, name: str) -> Reply:
    reply = call(srv.api_url, "PATCH", "/v1/services",
                 {"upsert": [{"name": name, "namespace": "default", "port": 80}]})
    assert reply.status == 200
    return reply


def test_a_change_releases_every_waiter_with_the_new_registry(server: ServerThread) -> None:
    watchers = park(server, 3)
    assert patch(server, "new").json()["revision"] == 2
    for w in watchers:
        reply = w.result()
        assert reply.status == 200
        assert reply.etag == '"2"'
        doc = reply.json()
        assert doc["revision"] == 2
        assert "new" in {s["name"] for s in doc["services"]}
    assert waiting(server) == 0


def test_wait_answers_at_once_when_the_client_is_behind_or_sent_no_etag(
        server: ServerThread) -> None:
    patch(server, "a")
    for etag in (None, '"1"', '"99"'):
        reply = Watcher(server, etag, wait=300)
        reply.start()
        result = reply.result()
        assert result.status == 200 and result.etag == '"2"'
    assert waiting(server) == 0


def test_a_wait_that_runs_out_answers_304(server: ServerThread) -> None:
    reply = call(server.api_url, "GET", "/v1/services?wait=0.2", headers={"If-None-Match": '"1"'})
    assert reply.status == 304 and reply.etag == '"1"'
    assert waiting(server) == 0


def test_watchers_beyond_max_watchers_get_503(server: ServerThread) -> None:
    watchers = park(server, 3)
    over = call(server.api_url, "GET", "/v1/services?wait=60", headers={"If-None-Match": '"1"'})
    assert over.status == 503
    assert over.headers["retry-after"] == "1"
    assert "max_watchers" in over.json()["error"]
    # A plain GET (no wait) is still served while the watch slots are full.
    assert call(server.api_url, "GET", "/v1/services").status == 200
    patch(server, "x")
    assert all(w.result().status == 200 for w in watchers)
    # Slots are free again.
    assert call(server.api_url, "GET", "/v1/services?wait=0.1",
                headers={"If-None-Match": '"2"'}).status == 304


def test_a_watcher_that_hangs_up_frees_its_slot(server: ServerThread) -> None:
    import http.client

    hp = server.mesh.api_address
    assert hp is not None
    conns = []
    for _ in range(3):
        conn = http.client.HTTPConnection(hp.host, hp.port, timeout=10)
        conn.request("GET", "/v1/services?wait=120", headers={"If-None-Match": '"1"'})
        conns.append(conn)
    wait_for(lambda: waiting(server) == 3, 10, "3 parked watchers")
    for conn in conns:
        conn.close()
    wait_for(lambda: waiting(server) == 0, 10, "hung-up watchers to be released")


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", "", "1e999"])
def test_bad_wait_is_400(server: ServerThread, value: str) -> None:
    reply = call(server.api_url, "GET", f"/v1/services?wait={value}", headers={"If-None-Match": '"1"'})
    assert reply.status == 400
    assert reply.json()["field"] == "wait"


def test_wait_is_capped() -> None:
    assert parse_wait("1000000") == MAX_WAIT_SECONDS
    assert parse_wait("0") == 0 and parse_wait("2.5") == 2.5 and parse_wait(None) == 0


def test_a_watch_on_a_server_with_no_registry_yet_waits_for_the_first_write(
        tmp_path: Path) -> None:
    with running_server(make_config(tmp_path, services=[])) as srv:
        watcher = Watcher(srv, None, wait=60)
        watcher.start()
        wait_for(lambda: waiting(srv) == 1, 10, "a parked watcher")
        assert call(srv.api_url, "PUT", "/v1/services",
                    {"services": [{"name": "a", "namespace": "b", "port": 1}]}).status == 200
        reply = watcher.result()
        assert reply.status == 200 and reply.json()["revision"] == 1


def test_stopping_the_server_releases_waiters(tmp_path: Path) -> None:
    srv = ServerThread(_config(tmp_path)).start()
    try:
        watcher = Watcher(srv, '"1"', wait=300)
        watcher.start()
        wait_for(lambda: waiting(srv) == 1, 10, "a parked watcher")
    finally:
        srv.stop()
    watcher.join(30)
    assert not watcher.is_alive()
    if watcher.reply is not None:
        assert watcher.reply.status == 304


def _config(tmp_path: Path) -> Any:
    from meshdns.config import parse_config

    return parse_config(make_config(tmp_path), {})


def test_store_listener_from_another_thread_is_safe(server: ServerThread) -> None:
    """A write published off the event loop thread (a direct store call) still wakes
    watchers, through call_soon_threadsafe."""
    from meshdns.core.registry import parse_services

    watchers = park(server, 1)
    specs: Callable[[], Any] = lambda: parse_services(  # noqa: E731
        [{"name": "direct", "namespace": "x", "port": 1}])
    store = server.mesh.store
    store.patch(specs(), [])  # runs on this (test) thread, not the server's loop
    reply = watchers[0].result()
    assert reply.status == 200 and reply.json()["revision"] == 2
