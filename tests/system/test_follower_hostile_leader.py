"""A follower fed by a wrong or malicious leader: a fake leader (aiohttp, loopback) that
answers the follow protocol with what a real one never sends.

Within one lineage revisions only go up: a lower one is refused (the follower keeps
serving what it had, counts it, warns once, and /readyz shows ``follow.degraded``),
while a new lineage stays the leader's authority. A delta that claims the revision it
started from does not make the follower loop, and a leader that trickles its answer
cannot hold a poll open past its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest
from aiohttp import web

from meshdns.follower import Follower
from meshdns.protocol import LINEAGE_HEADER

from ..apiclient import call, wait_for
from ..support import ServerThread, make_config, query, running_server

Handler = Callable[["FakeLeader", web.Request], Awaitable[web.StreamResponse]]

A = {"name": "a", "namespace": "ns", "port": 80, "vip": "240.0.0.10"}
B = {"name": "b", "namespace": "ns", "port": 80, "vip": "240.0.0.11"}


class FakeLeader:
    """An aiohttp server on 127.0.0.1:0 in its own thread, answering GET /v1/services
    with ``handler``; ``requests`` records each one's kind ("full" or "delta") and query."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.state: dict[str, Any] = {}  # the handler's own memory
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve(request: web.Request) -> web.StreamResponse:
            kind = "delta" if "since" in request.query else "full"
            self.requests.append((kind, dict(request.query)))
            return await self.handler(self, request)

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/services", serve)
            self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        try:
            self.loop.run_until_complete(main())
        finally:
            self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> FakeLeader:
        self._thread.start()
        assert self._ready.wait(10) and self.port, "the fake leader did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        runner = self._runner
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, kind: str | None = None) -> int:
        return sum(1 for k, _ in list(self.requests) if kind is None or k == kind)


def registry(revision: int, lineage: str, *services: dict[str, Any]) -> web.Response:
    return web.json_response({"revision": revision, "services": list(services)},
                             headers={LINEAGE_HEADER: lineage, "ETag": f'"{revision}"'})


def delta(revision: int, lineage: str, upsert: list[dict[str, Any]],
          delete: list[dict[str, Any]] | None = None) -> web.Response:
    return web.json_response({"revision": revision, "lineage": lineage, "upsert": upsert,
                              "delete": delete or []},
                             headers={LINEAGE_HEADER: lineage, "ETag": f'"{revision}"'})


def gone(lineage: str) -> web.Response:
    return web.json_response({"error": "re-list", "field": "since"}, status=410,
                             headers={LINEAGE_HEADER: lineage})


class Records(logging.Handler):
    """Every record of one logger, kept for the test to count."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int, contains: str = "") -> list[str]:
        return [r.getMessage() for r in list(self.records)
                if r.levelno == level and contains in r.getMessage()]


@pytest.fixture
def follower_log() -> Iterator[Records]:
    logger = logging.getLogger("meshdns.follower")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def follower_config(tmp: Path, url: str) -> dict[str, Any]:
    tmp.mkdir(exist_ok=True)
    return make_config(tmp, {"registry": {"follow": url}}, services=[])


def vip(srv: ServerThread, name: str) -> list[str] | int:
    """The A records for ``name``, or the rcode when it is not NOERROR."""
    reply = query(srv, name)
    if reply.rcode() != dns.rcode.NOERROR:
        return reply.rcode()
    return [rr.address for rrset in reply.answer for rr in rrset]


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(call(url, "GET", "/metrics").body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---------------------------------------------------------------- revisions going back


async def _backwards_delta(fake: FakeLeader, request: web.Request) -> web.Response:
    if "since" not in request.query:
        return registry(5, "L1", A)
    fake.state["regressions"] = fake.state.get("regressions", 0) + 1
    return delta(3, "L1", [B], [{"name": "a", "namespace": "ns", "port": 80}])


def test_a_delta_that_goes_back_in_revision_is_refused_and_the_old_registry_served(
        tmp_path: Path, follower_log: Records) -> None:
    with FakeLeader(_backwards_delta) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        follower = srv.mesh.follower
        assert follower is not None
        wait_for(lambda: fake.state.get("regressions", 0) >= 3, 20, "three backward deltas")
        # Still revision 5 with its service; what revision 3 claimed is not served.
        assert srv.mesh.store.revision == 5
        assert vip(srv, "a.ns.svc.80.mesh") == ["240.0.0.10"]
        assert vip(srv, "b.ns.svc.80.mesh") == dns.rcode.NXDOMAIN
        assert fake.count("full") == 1  # refused, not re-read in full and adopted
        ready = call(srv.api_url, "GET", "/readyz")
        assert ready.status == 200, ready.body  # serving what it had: still ready
        degraded = ready.json()["follow"]["degraded"]
        assert "revision 3" in degraded and "since revision 5" in degraded
        assert ready.json()["follow"]["connected"] is False
        seen = fake.state["regressions"]
        counted = metric(srv.api_url, "meshdns_follow_errors_total", code="regression")
        assert seen - 1 <= counted <= seen  # one may be in flight
        assert len(follower_log.at(logging.WARNING, "revisions only go up")) == 1


async def _backwards_full_read(fake: FakeLeader, request: web.Request) -> web.Response:
    if "since" in request.query:
        if request.query.get("lineage") == "L2":
            await asyncio.sleep(1.0)  # a long-poll that finds nothing new
            return delta(3, "L2", [])
        return gone(fake.state.get("lineage", "L1"))
    fake.state["fulls"] = fake.state.get("fulls", 0) + 1
    if fake.state["fulls"] == 1:
        return registry(5, "L1", A)
    lineage = fake.state.get("lineage", "L1")  # L1: the same registry, gone back to 3
    return registry(3, lineage, B)


def test_a_full_read_at_a_lower_revision_of_the_same_lineage_is_refused(
        tmp_path: Path, follower_log: Records) -> None:
    with FakeLeader(_backwards_full_read) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        wait_for(lambda: fake.state.get("fulls", 0) >= 3, 20, "two full reads after the first")
        assert srv.mesh.store.revision == 5
        assert vip(srv, "a.ns.svc.80.mesh") == ["240.0.0.10"]
        assert vip(srv, "b.ns.svc.80.mesh") == dns.rcode.NXDOMAIN
        ready = call(srv.api_url, "GET", "/readyz").json()
        assert "revision 3" in ready["follow"]["degraded"]
        assert metric(srv.api_url, "meshdns_follow_errors_total", code="regression") >= 2
        assert len(follower_log.at(logging.WARNING, "revisions only go up")) == 1

        # A new lineage (the leader restarted, or lost its registry): its word again.
        fake.state["lineage"] = "L2"
        wait_for(lambda: srv.mesh.store.revision == 3, 20, "the new lineage adopted")
        assert vip(srv, "b.ns.svc.80.mesh") == ["240.0.0.11"]
        assert vip(srv, "a.ns.svc.80.mesh") == dns.rcode.NXDOMAIN
        ready = call(srv.api_url, "GET", "/readyz").json()
        assert ready["follow"]["degraded"] is None and ready["revision"] == 3


# ---------------------------------------------------------------- no retry storm


async def _delta_at_since(fake: FakeLeader, request: web.Request) -> web.Response:
    if "since" not in request.query:
        return registry(5, "L1", A)
    return delta(5, "L1", [B])  # "changes" at the revision it started from


def test_a_delta_at_its_own_since_backs_off_instead_of_looping(
        tmp_path: Path, follower_log: Records) -> None:
    with FakeLeader(_delta_at_since) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        wait_for(lambda: fake.count("delta") >= 1, 20, "a first delta")
        wait_for(lambda: fake.count() >= 8, 30, "a few retries")
        before = fake.count()
        threading.Event().wait(4.0)  # a window: requests counted, not timed
        during = fake.count() - before
        # Backing off (0.25 s doubling, 10 s at most): a handful of requests in 4 s. The
        # loop it replaces re-read and re-asked every ~200 ms: 40 in 4 s.
        assert during <= 6, f"{during} requests in 4 s"
        assert srv.mesh.store.revision == 5
        assert vip(srv, "b.ns.svc.80.mesh") == dns.rcode.NXDOMAIN
        # One warning for the outage, one "in sync" line: not a pair per cycle.
        assert len(follower_log.at(logging.WARNING)) == 1
        assert len(follower_log.at(logging.INFO, "in sync")) <= 2


async def _drip(fake: FakeLeader, request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                       LINEAGE_HEADER: "L1"})
    await resp.prepare(request)
    fake.state["open"] = fake.state.get("open", 0) + 1
    try:
        for byte in b'{"revision": 5, "services": [' + b" " * 200:  # bounded: ~40 s at most
            await resp.write(bytes([byte]))
            await asyncio.sleep(0.2)
    finally:
        fake.state["open"] -= 1
    return resp


def test_a_leader_dripping_its_answer_cannot_hold_a_poll_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A poll's deadline is the wait plus READ_SLACK: 1.5 s here instead of 45.
    monkeypatch.setattr(Follower, "WAIT", 1.0)
    monkeypatch.setattr(Follower, "READ_SLACK", 0.5)
    with FakeLeader(_drip) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        follower = srv.mesh.follower
        assert follower is not None
        # Each byte arrives well within any read timeout; only a total deadline ends it.
        wait_for(lambda: follower.failures >= 2, 15, "polls cut at their deadline")
        assert fake.count("full") >= 2  # gave up and asked again
        assert follower.errors["transport"] == follower.failures  # timed out, not invalid
        assert not srv.mesh.store.loaded
        assert call(srv.api_url, "GET", "/readyz").status == 503
