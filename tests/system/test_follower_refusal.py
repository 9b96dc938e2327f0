"""A follower the leader refuses: for ``api.max_watchers`` (503 + Retry-After), or for a
wrong follow token (401). Leader and followers are real processes on loopback.

A refusal is the leader saying "not now", not "your copy is wrong": the follower keeps
its position (no full re-read), waits at least the Retry-After, keeps backing off, and
logs one warning for the outage. A refused token is a configuration error: /readyz
says so at once, and the follow-error metric counts it by status code.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from ..apiclient import ServerProcess, call, wait_for
from ..support import DEMO_SERVICES, running_server
from .test_follow_delta import metric, procs, start  # noqa: F401  (procs: a fixture)
from .test_follower_hostile_leader import FakeLeader, follower_config, registry

WINDOW = 6.0  # seconds over which requests are counted


def leader_process(tmp: Path, **api: object) -> ServerProcess:
    seed = tmp / "leader" / "seed.yaml"
    seed.parent.mkdir(parents=True, exist_ok=True)
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    return ServerProcess(tmp / "leader", {"registry": {"seed_file": str(seed)}, "api": api},
                         name="leader")


def follower_process(tmp: Path, leader: ServerProcess, name: str,
                     **registry: object) -> ServerProcess:
    return ServerProcess(tmp / name, {"registry": {"follow": leader.url, **registry}},
                         name=name)


def follower_lines(proc: ServerProcess, level: str, contains: str = "") -> list[str]:
    return [line for line in proc.log().splitlines()
            if f" {level} meshdns.follower:" in line and contains in line]


def test_a_follower_refused_for_max_watchers_keeps_its_position_and_backs_off(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path, max_watchers=1))
    followers = [start(procs, follower_process(tmp_path, leader, name))
                 for name in ("f1", "f2")]
    # One follower's long-poll holds the only watcher slot; the other one's is refused.
    wait_for(lambda: metric(leader.url, "meshdns_sync_requests_total", op="delta",
                            code="503") >= 1, 20, "a refused delta")
    full_before = metric(leader.url, "meshdns_sync_requests_total", op="watch", code="200")
    refused_before = metric(leader.url, "meshdns_sync_requests_total", op="delta", code="503")
    threading.Event().wait(WINDOW)
    full = metric(leader.url, "meshdns_sync_requests_total", op="watch",
                  code="200") - full_before
    refused = metric(leader.url, "meshdns_sync_requests_total", op="delta",
                     code="503") - refused_before
    # The refusal kept the follower's position: it asks for the same delta again, and
    # never re-reads the registry in full (before: ~5 full reads a second).
    assert full == 0, f"{full} full reads in {WINDOW:g} s"
    # Retry-After: 1, and the backoff keeps growing: at most one request a second.
    assert 1 <= refused <= WINDOW, f"{refused} refused deltas in {WINDOW:g} s"

    # The follower counts what the leader refused, by status code.
    def counted() -> bool:
        on_leader = metric(leader.url, "meshdns_sync_requests_total", op="delta", code="503")
        by_followers = sum(metric(f.url, "meshdns_follow_errors_total", code="503")
                           for f in followers)
        return on_leader == by_followers
    wait_for(counted, 10, "the followers' 503 count to match the leader's")

    refused_follower = next(f for f in followers
                            if metric(f.url, "meshdns_follow_errors_total", code="503"))
    ready = call(refused_follower.url, "GET", "/readyz")
    assert ready.status == 200  # it serves the registry it has, as fresh as the leader's
    assert "503" in ready.json()["follow"]["error"]
    assert "max_watchers" in ready.json()["follow"]["error"]
    # One warning for the outage, not one per cycle.
    assert len(follower_lines(refused_follower, "WARNING")) == 1
    assert sum(len(follower_lines(f, "WARNING")) for f in followers) == 1

    # What the refused follower is told: 503 with a Retry-After (the watcher slot is
    # still taken by the other follower's long-poll).
    revision = call(leader.url, "GET", "/v1/services").json()["revision"]
    direct = call(leader.url, "GET", f"/v1/services?since={revision}&wait=5")
    assert direct.status == 503 and "max_watchers" in direct.json()["error"]
    assert direct.headers["retry-after"] == "1"


async def _busy_leader(fake: FakeLeader, request: web.Request) -> web.Response:
    if "since" not in request.query:
        return registry(1, "L1", {"name": "a", "namespace": "ns", "port": 80,
                                  "vip": "240.0.0.10"})
    return web.json_response({"error": "too many watchers (1, api.max_watchers); retry later",
                              "field": None}, status=503, headers={"Retry-After": "3"})


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    with FakeLeader(_busy_leader) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        wait_for(lambda: fake.count("delta") >= 1, 20, "a refused delta")
        seen = fake.count()
        threading.Event().wait(5.0)
        # Retry-After: 3 (and a little jitter on top): one more request in 5 s at most.
        # Ignoring it, the backoff alone (0.25 s, doubling) would ask 4 or 5 times.
        assert fake.count() - seen <= 1, fake.requests
        assert fake.count("full") == 1
        assert srv.mesh.store.revision == 1


def test_a_refused_follow_token_is_a_config_error_in_readyz_and_metrics(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path, token="the-leader-token-0123456789"))
    follower = follower_process(tmp_path, leader, "f", follow_token="wrong-token-0123456789")
    procs.append(follower)
    follower.start(ready=False)
    wait_for(lambda: metric(follower.url, "meshdns_follow_errors_total", code="401") >= 3, 20,
             "three refused polls")
    ready = call(follower.url, "GET", "/readyz")
    assert ready.status == 503
    reason = ready.json()["reason"]
    assert "401" in reason and "registry.follow_token" in reason

    def counted() -> bool:
        return metric(leader.url, "meshdns_sync_requests_total", code="401") == \
            metric(follower.url, "meshdns_follow_errors_total", code="401")
    wait_for(counted, 10, "the follower's 401 count to match the leader's")
    assert metric(follower.url, "meshdns_follow_errors_total", code="transport") == 0
    # Said once, as what it is; not "leader unavailable", and not again each retry.
    assert len(follower_lines(follower, "ERROR", "registry.follow_token")) == 1
    assert follower_lines(follower, "WARNING") == []


@pytest.mark.parametrize("value, seconds", [("3", 3.0), ("0", 0.0), ("junk", None),
                                            ("99999999", 300.0), (None, None)])
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    from meshdns.follower import retry_after

    assert retry_after(value) == seconds
