"""Follower mode: a meshdns that mirrors another one's registry over HTTP.

In-process tests (two servers on loopback in threads) cover the details; one
test runs leader and follower as two real processes and kills the leader.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from meshdns.follower import Follower

from ..apiclient import ServerProcess, a_records, call, dns_query, wait_for
from ..support import DEMO_SERVICES, ServerThread, make_config, query, running_server

TOKEN = "leader-token"


def follower_config(tmp: Path, leader_url: str, **registry: Any) -> dict[str, Any]:
    tmp.mkdir(exist_ok=True)
    return make_config(tmp, {"registry": {"follow": leader_url, **registry}}, services=[])


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[ServerThread]:
    (tmp_path / "leader").mkdir()
    with running_server(make_config(tmp_path / "leader")) as srv:
        yield srv


def services(srv: ServerThread, token: str | None = None) -> Any:
    reply = call(srv.api_url, "GET", "/v1/services", token=token)
    assert reply.status == 200
    return reply.json()


def addresses(srv: ServerThread, name: str) -> list[str]:
    return [rr.address for rrset in query(srv, name).answer for rr in rrset]


def in_sync(leader: ServerThread, follower: ServerThread) -> bool:
    return bool(follower.mesh.store.loaded
                and follower.mesh.store.registry.to_json() == leader.mesh.store.registry.to_json())


def test_follower_mirrors_the_leader_and_follows_changes(leader: ServerThread,
                                                         tmp_path: Path) -> None:
    with running_server(follower_config(tmp_path / "f", leader.api_url)) as follower:
        wait_for(lambda: in_sync(leader, follower), 15, "first sync")
        assert call(follower.api_url, "GET", "/readyz").status == 200
        assert services(follower) == services(leader)  # same VIPs, same revision
        assert call(follower.api_url, "GET", "/v1/services").etag == '"1"'
        assert addresses(follower, "frontend.kong.svc.80.mesh") == ["240.0.0.7"]
        # The SOA serial is the leader's revision, too.
        soa = query(follower, "mesh", "SOA").answer[0][0]
        assert soa.serial == 1

        reply = call(leader.api_url, "PATCH", "/v1/services", {
            "upsert": [{"name": "new", "namespace": "ns", "port": 81}],
            "delete": [{"name": "redis", "namespace": "cache", "port": 6379}]})
        assert reply.status == 200
        new_vip = next(s["vip"] for s in services(leader)["services"] if s["name"] == "new")
        wait_for(lambda: addresses(follower, "new.ns.svc.81.mesh") == [new_vip], 15,
                 "the change on the follower")
        assert query(follower, "redis.cache.svc.6379.mesh").rcode() == dns.rcode.NXDOMAIN
        assert services(follower) == services(leader)
        f = follower.mesh.follower
        assert f.connected and f.last_success is not None and f.adopted + f.deltas >= 2


def test_follower_write_routes_answer_409(leader: ServerThread, tmp_path: Path) -> None:
    with running_server(follower_config(tmp_path / "f", leader.api_url)) as follower:
        wait_for(lambda: in_sync(leader, follower), 15, "first sync")
        before = services(follower)
        for method, body in (("PUT", {"services": []}),
                             ("PATCH", {"upsert": [{"name": "a", "namespace": "b", "port": 1}]}),
                             ("PATCH", {"bogus": True}), ("PUT", None)):
            reply = call(follower.api_url, method, "/v1/services", body)
            assert reply.status == 409, reply.body
            assert "follower" in reply.json()["error"] and reply.json()["field"] is None
            assert services(follower) == before


def test_follower_never_allocates_vips_of_its_own(tmp_path: Path) -> None:
    """The leader has no IPv6 range; the follower has one. The follower must not invent
    vip6s the leader does not have (its AAAA answers would then differ)."""
    (tmp_path / "leader").mkdir()
    extra = {"registry": {"cidr6": None, "cidr": "10.20.0.0/16"}}
    state = tmp_path / "follower-state.json"
    with running_server(make_config(tmp_path / "leader", extra)) as leader:
        url = leader.api_url
        with running_server(follower_config(tmp_path / "f", url, state_file=str(state))) as follower:
            wait_for(lambda: in_sync(leader, follower), 15, "first sync")
            expected = services(leader)
            assert services(follower) == expected
            redis = next(s for s in expected["services"] if s["name"] == "redis")
            assert redis["vip"].startswith("10.20.")  # outside the follower's own cidr: kept
            assert redis["vip6"] is None
            reply = query(follower, "redis.cache.svc.6379.mesh", "AAAA")
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
            assert addresses(follower, "redis.cache.svc.6379.mesh") == [redis["vip"]]
    # Restarted from its own state file (leader gone): still exactly the leader's VIPs.
    with running_server(follower_config(tmp_path / "f", url, state_file=str(state))) as follower:
        assert services(follower) == expected
        assert query(follower, "redis.cache.svc.6379.mesh", "AAAA").answer == []


def test_follower_sends_the_follow_token(tmp_path: Path) -> None:
    (tmp_path / "leader").mkdir()
    with running_server(make_config(tmp_path / "leader", {"api": {"token": TOKEN}})) as leader:
        good = follower_config(tmp_path / "good", leader.api_url, follow_token=TOKEN)
        with running_server(good) as follower:
            wait_for(lambda: in_sync(leader, follower), 15, "sync with the token")
        bad = follower_config(tmp_path / "bad", leader.api_url, follow_token="wrong")
        with running_server(bad) as follower:
            f = follower.mesh.follower
            wait_for(lambda: f.failures >= 1, 15, "a refused poll")
            assert "401" in (f.last_error or "")
            assert not follower.mesh.store.loaded
            assert call(follower.api_url, "GET", "/readyz").status == 503


def test_follower_keeps_serving_from_its_state_file_while_the_leader_is_down(
        tmp_path: Path) -> None:
    (tmp_path / "leader").mkdir()
    state = tmp_path / "follower-state.json"
    with running_server(make_config(tmp_path / "leader")) as leader:
        url = leader.api_url
        with running_server(follower_config(tmp_path / "f", url, state_file=str(state))) as f:
            wait_for(lambda: in_sync(leader, f), 15, "first sync")
            expected = services(f)
    # Leader gone: the follower restarts from its own state file, the leader's VIPs intact.
    with running_server(follower_config(tmp_path / "f", url, state_file=str(state))) as f:
        assert services(f) == expected
        assert call(f.api_url, "GET", "/readyz").status == 200
        assert addresses(f, "frontend.kong.svc.80.mesh") == ["240.0.0.7"]
        wait_for(lambda: f.mesh.follower.failures >= 1, 15, "a failed poll")
        assert not f.mesh.follower.connected
        assert query(f, "redis.cache.svc.6379.mesh", "AAAA").answer  # the leader's vip6, kept


def test_readyz_turns_503_once_the_last_sync_is_too_old(tmp_path: Path) -> None:
    (tmp_path / "leader").mkdir()
    state = tmp_path / "follower-state.json"
    with running_server(make_config(tmp_path / "leader")) as leader:
        url = leader.api_url
        cfg = follower_config(tmp_path / "f", url, state_file=str(state), follow_max_staleness=1)
        with running_server(cfg) as f:
            wait_for(lambda: in_sync(leader, f), 15, "first sync")
    with running_server(cfg) as f:
        ready = wait_for(lambda: (r := call(f.api_url, "GET", "/readyz")).status == 503 and r, 15,
                         "/readyz to report staleness")
        doc = ready.json()
        assert doc["ready"] is False and "follow_max_staleness" in doc["reason"]
        assert doc["follow"]["connected"] is False
        # Stale or not, DNS keeps answering from the last registry.
        assert query(f, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR


class _BadLeader(http.server.BaseHTTPRequestHandler):
    body = b'{"revision": 5, "services": [{"name": "BAD", "namespace": "x", "port": 1}]}'

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("body, error", [
    (b'{"revision": 5, "services": [', "malformed"),
    (b'{"revision": -1, "services": []}', "revision"),
    (b'{"revision": 5, "services": [{"name": "BAD", "namespace": "x", "port": 1}]}',
     "services[0].name"),
    (b'[]', "no registry"),
])
def test_follower_rejects_what_it_cannot_adopt(tmp_path: Path, body: bytes, error: str) -> None:
    handler = type("H", (_BadLeader,), {"body": body})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with running_server(follower_config(tmp_path / "f", url)) as f:
            follower = f.mesh.follower
            wait_for(lambda: follower.failures >= 1, 15, "a rejected pull")
            assert error in (follower.last_error or "")
            assert not f.mesh.store.loaded
            assert call(f.api_url, "GET", "/readyz").status == 503
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_backoff_is_exponential_jittered_and_bounded() -> None:
    f = Follower.__new__(Follower)
    for attempt in range(40):
        step = min(Follower.BACKOFF_MAX, Follower.BACKOFF_FIRST * 2 ** attempt)
        for _ in range(20):
            delay = f.backoff(attempt)
            assert step / 2 <= delay <= step <= Follower.BACKOFF_MAX


# ---------------------------------------------------------------- two processes


def test_two_processes_leader_killed_and_restarted(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    import yaml

    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    leader = ServerProcess(tmp_path / "leader", {"registry": {
        "seed_file": str(seed), "state_file": str(tmp_path / "leader" / "state.json")}},
        name="leader")
    follower: ServerProcess | None = None
    try:
        leader.start()
        follower = ServerProcess(tmp_path / "follower", {"registry": {
            "follow": leader.url, "state_file": str(tmp_path / "follower" / "state.json")}},
            name="follower").start()
        assert a_records(follower.dns_addr, "frontend.kong.svc.80.mesh") == ["240.0.0.7"]

        # 1. A change on the leader shows up in the follower's DNS answers.
        assert call(leader.url, "PATCH", "/v1/services", {"upsert": [
            {"name": "one", "namespace": "ns", "port": 1, "vip": "240.0.5.1"}]}).status == 200
        wait_for(lambda: a_records(follower.dns_addr, "one.ns.svc.1.mesh") == ["240.0.5.1"], 20,
                 "change 1 on the follower")

        # 2. Leader killed: the follower keeps answering and stays ready.
        leader.kill()
        wait_for(lambda: call(follower.url, "GET", "/readyz").json()["follow"]["connected"]
                 is False, 20, "the follower to notice the leader is gone")
        assert call(follower.url, "GET", "/readyz").status == 200
        assert a_records(follower.dns_addr, "one.ns.svc.1.mesh") == ["240.0.5.1"]
        assert a_records(follower.dns_addr, "frontend.kong.svc.80.mesh") == ["240.0.0.7"]

        # 3. Leader back (same state file, same port): the follower catches up.
        leader.start()
        assert call(leader.url, "GET", "/v1/services").json()["revision"] == 2
        assert call(leader.url, "PATCH", "/v1/services", {"upsert": [
            {"name": "two", "namespace": "ns", "port": 2, "vip": "240.0.5.2"}]}).status == 200
        wait_for(lambda: a_records(follower.dns_addr, "two.ns.svc.2.mesh") == ["240.0.5.2"], 30,
                 "change 2 on the follower after the leader came back")
        assert call(follower.url, "GET", "/v1/services").json() == \
            call(leader.url, "GET", "/v1/services").json()
        assert dns_query(follower.dns_addr, "mesh", "SOA").answer[0][0].serial == 3
        assert call(follower.url, "GET", "/readyz").json()["follow"]["connected"] is True
    finally:
        if follower is not None:
            follower.stop()
        leader.stop()
