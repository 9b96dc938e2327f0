"""Watch streams (issue 27): ``GET /v1/services?since=N&stream=1`` answers one long-lived
NDJSON response of deltas, and followers and relays use it when the leader offers it.
Leaders, relays and followers are real ``python -m meshdns serve`` processes on
loopback; the slow reader is a raw socket that never reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from ..apiclient import ServerProcess, a_records, call, wait_for
from ..support import running_server
from .test_follow_delta import (  # noqa: F401  (procs: a fixture)
    in_step,
    leader_process,
    listing,
    metric,
    patch,
    procs,
    start,
)
from .test_follower_hostile_leader import A, B, FakeLeader, delta, follower_config, registry

LINEAGE = "x-meshdns-lineage"


def follower_process(tmp: Path, leader: ServerProcess, name: str, state: bool = False,
                     **api: Any) -> ServerProcess:
    registry_cfg: dict[str, Any] = {"follow": leader.url}
    if state:
        registry_cfg["state_file"] = str(tmp / name / "state.json")
    return ServerProcess(tmp / name, {"registry": registry_cfg, "api": api}, name=name)


def wide_name(*parts: int) -> str:
    """A host name of ~200 bytes (labels of at most 63), unique to ``parts``."""
    return f"h{'-'.join(map(str, parts))}.{'.'.join(['x' * 60] * 3)}.example.com"


def deltas_asked(url: str) -> float:
    """``?since=`` requests the server answered 200: a long-poll each, or a stream each."""
    return metric(url, "meshdns_sync_requests_total", op="delta", code="200")


def on_stream(leader: ServerProcess, follower: ServerProcess, streams: int = 1) -> None:
    wait_for(lambda: metric(follower.url, "meshdns_follow_streams_total") >= streams
             and metric(leader.url, "meshdns_api_streams") >= 1, 30,
             f"{follower.name} to stream from {leader.name}")


def read_stream(url: str, since: int, lineage: str, wait: float) -> tuple[dict[str, str],
                                                                         list[Any]]:
    query = urllib.parse.urlencode({"since": since, "lineage": lineage, "stream": 1,
                                    "wait": wait})
    with urllib.request.urlopen(f"{url}/v1/services?{query}", timeout=wait + 30) as resp:
        return dict(resp.headers), [json.loads(line) for line in resp.read().splitlines()]


# ---------------------------------------------------------------- the wire


def test_a_stream_is_ndjson_deltas_with_heartbeats_that_end_after_wait(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path, stream_heartbeat=0.2, follow_coalesce=0))
    rev, _ = listing(leader.url)
    lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    assert patch(leader.url, [{"name": "one", "namespace": "ns", "port": 80}]) == 200
    result: dict[str, Any] = {}

    def reader() -> None:
        result["headers"], result["lines"] = read_stream(leader.url, rev, lineage, 2.0)

    thread = threading.Thread(target=reader)
    thread.start()
    wait_for(lambda: metric(leader.url, "meshdns_api_streams") == 1, 10, "the stream")
    assert patch(leader.url, [], [{"name": "one", "namespace": "ns", "port": 80}]) == 200
    thread.join(30)
    headers, lines = result["headers"], result["lines"]
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["X-Meshdns-Heartbeat"] == "0.2" and headers["X-Meshdns-Lineage"] == lineage
    # The catch-up from rev (the one service added), the heartbeat it joins with, the
    # delete as it happened, then heartbeats at rev + 2 until the wait ran out.
    assert lines[0]["revision"] == rev + 1 and [s["name"] for s in lines[0]["upsert"]] \
        == ["one"] and lines[0]["delete"] == []
    assert lines[1] == {"revision": rev + 1, "lineage": lineage, "upsert": [], "delete": []}
    deleted = next(i for i, line in enumerate(lines) if line["delete"])
    assert lines[deleted] == {"revision": rev + 2, "lineage": lineage, "upsert": [],
                              "delete": [{"name": "one", "namespace": "ns", "port": 80}]}
    assert all(line == {"revision": rev + 2 if i > deleted else rev + 1, "lineage": lineage,
                        "upsert": [], "delete": []}
               for i, line in enumerate(lines[1:], 1) if i != deleted)
    assert len(lines) - deleted - 1 >= 2, "heartbeats after the change"
    # One request, one stream: counted once, as a delta; the change encoded once.
    assert deltas_asked(leader.url) == 1
    assert metric(leader.url, "meshdns_api_stream_events_total") == 1
    assert metric(leader.url, "meshdns_api_streams") == 0
    # Errors are a long-poll's: 410 for another lineage or a revision ahead, 400 for a
    # value that is no boolean; no wait: what there is, then the end.
    assert call(leader.url, "GET", f"/v1/services?since={rev}&lineage=0123456789abcdef"
                "&stream=1").status == 410
    assert call(leader.url, "GET", f"/v1/services?since={rev + 9}&stream=1").status == 410
    bad = call(leader.url, "GET", f"/v1/services?since={rev}&stream=maybe")
    assert bad.status == 400 and bad.json()["field"] == "stream"
    at_once = call(leader.url, "GET", f"/v1/services?since={rev + 2}&stream=1")
    assert at_once.status == 200 and [json.loads(x) for x in at_once.body.splitlines()] == [
        {"revision": rev + 2, "lineage": lineage, "upsert": [], "delete": []}]


# ---------------------------------------------------------------- followers


def test_fifty_changes_reach_a_follower_through_one_stream(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path, follow_coalesce=0))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    on_stream(leader, follower)
    in_step(leader, follower)
    asked = deltas_asked(leader.url)
    applied = metric(follower.url, "meshdns_follow_deltas_total")
    for i in range(50):
        assert patch(leader.url, [{"name": f"s{i}", "namespace": "ns", "port": 80,
                                   "vip": f"240.1.0.{i + 1}"}]) == 200
    in_step(leader, follower)
    assert a_records(follower.dns_addr, "s49.ns.svc.80.mesh") == ["240.1.0.50"]
    # Fifty changes, and no new request to the leader: they came on the open stream
    # (a long-poll follower asks once per change). At most one more, should the first
    # stream's wait (30 s, while the leader's support was unknown) run out meanwhile.
    assert deltas_asked(leader.url) - asked <= 1
    assert metric(follower.url, "meshdns_follow_streams_total") <= 2
    events = metric(leader.url, "meshdns_api_stream_events_total")
    assert metric(follower.url, "meshdns_follow_deltas_total") - applied >= 25
    assert events >= 25
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    assert metric(follower.url, "meshdns_follow_errors_total") == 0


def test_a_reader_that_never_reads_is_cut_off_and_the_others_keep_up(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    buffer = 256 * 1024
    leader = start(procs, leader_process(tmp_path, stream_buffer=buffer, follow_coalesce=0))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    on_stream(leader, follower)
    rev, _ = listing(leader.url)
    lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    rss_before = metric(leader.url, "meshdns_process_resident_memory_bytes")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow.connect(("127.0.0.1", leader.api_port))
    slow.sendall(f"GET /v1/services?since={rev}&lineage={lineage}&stream=1&wait=300 "
                 "HTTP/1.1\r\nHost: leader\r\n\r\n".encode())
    try:
        wait_for(lambda: metric(leader.url, "meshdns_api_streams") == 2, 10, "both streams")
        # Rewrites of 200 services with long host names: ~50 KB per change.
        most_buffered = 0.0
        for i in range(400):
            services = [{"name": f"big{n}", "namespace": "ns", "port": 80,
                         "hostnames": [wide_name(i, n, 0)]} for n in range(200)]
            assert patch(leader.url, services) == 200
            most_buffered = max(most_buffered,
                                metric(leader.url, "meshdns_api_stream_buffered_bytes"))
            if metric(leader.url, "meshdns_api_stream_cutoffs_total") >= 1:
                break
        assert metric(leader.url, "meshdns_api_stream_cutoffs_total") == 1
        # Never more than the buffer unsent for the slow one (plus what the follower has
        # not taken yet, also under its own bound), and its memory handed back.
        assert most_buffered <= 2 * buffer
        assert metric(leader.url, "meshdns_api_streams") == 1
        growth = metric(leader.url, "meshdns_process_resident_memory_bytes") - rss_before
        assert growth < 64 << 20, f"leader RSS grew {growth / 2**20:.0f} MiB"
        # The follower kept up all along, on its one stream, never cut.
        in_step(leader, follower)
        assert metric(follower.url, "meshdns_follow_streams_total") <= 2
        assert metric(follower.url, "meshdns_follow_errors_total") == 0
        # The slow reader's connection was aborted: reading it now comes to an end.
        slow.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            while slow.recv(1 << 20):
                pass
    finally:
        slow.close()


def test_a_long_poll_follower_works_beside_streams_and_max_watchers_counts_both(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path, max_watchers=2))
    streaming = start(procs, follower_process(tmp_path, leader, "streaming"))
    on_stream(leader, streaming)
    # An older follower's long-poll, beside the stream.
    rev, _ = listing(leader.url)
    lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    result: dict[str, Any] = {}

    def long_poll() -> None:
        result["reply"] = call(leader.url, "GET", f"/v1/services?since={rev}&lineage="
                               f"{lineage}&wait=30")

    thread = threading.Thread(target=long_poll)
    thread.start()
    wait_for(lambda: metric(leader.url, "meshdns_api_watchers") == 2, 10,
             "a stream and a long-poll parked")
    # Two watchers (one stream, one long-poll): the third is refused, stream or not.
    third = call(leader.url, "GET", f"/v1/services?since={rev}&stream=1&wait=5")
    assert third.status == 503 and "max_watchers" in third.json()["error"]
    assert patch(leader.url, [{"name": "both", "namespace": "ns", "port": 80,
                               "vip": "240.2.0.1"}]) == 200
    thread.join(30)
    reply = result["reply"]
    assert reply.status == 200 and reply.headers["content-type"].startswith(
        "application/json")
    assert [s["name"] for s in reply.json()["upsert"]] == ["both"]
    in_step(leader, streaming)
    assert a_records(streaming.dns_addr, "both.ns.svc.80.mesh") == ["240.2.0.1"]
    assert metric(streaming.url, "meshdns_follow_errors_total") == 0


def test_a_relay_serves_a_stream_of_what_it_streams(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path))
    relay = start(procs, follower_process(tmp_path, leader, "relay"))
    follower = start(procs, follower_process(tmp_path, relay, "follower"))
    on_stream(leader, relay)
    on_stream(relay, follower)
    asked = deltas_asked(relay.url)
    for i in range(10):
        assert patch(leader.url, [{"name": f"r{i}", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, relay, follower)
    # Both hops by their streams: the relay re-encodes each change once for its own.
    assert deltas_asked(relay.url) - asked <= 1
    assert metric(relay.url, "meshdns_api_stream_events_total") >= 1
    for f in (relay, follower):
        assert metric(f.url, "meshdns_follow_full_syncs_total") == 1
        assert metric(f.url, "meshdns_follow_relists_total") == 0


def test_a_follower_cut_off_resumes_from_its_revision(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    """A follower that stops reading (SIGSTOP) is cut off once its stream holds
    api.stream_buffer unsent; resumed, it reconnects and catches up from the revision it
    had, by one delta: no full read."""
    leader = start(procs, leader_process(tmp_path, stream_buffer=256 * 1024,
                                         follow_coalesce=0))
    # A registry big enough that the history keeps every change below (it holds as
    # many keys as the registry has services).
    assert call(leader.url, "PUT", "/v1/services", {"services": [
        {"name": f"base{i}", "namespace": "ns", "port": 80} for i in range(20_000)]}
    ).status == 200
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    on_stream(leader, follower)
    in_step(leader, follower)
    assert follower.proc is not None
    os.kill(follower.proc.pid, signal.SIGSTOP)
    try:
        # ~100 KB a change; the kernel's socket buffers take some MB before the stream's.
        for i in range(400):
            services = [{"name": f"wide{n}", "namespace": "ns", "port": 80,
                         "hostnames": [wide_name(i, n, k) for k in range(20)]}
                        for n in range(20)]
            assert patch(leader.url, services) == 200
            if metric(leader.url, "meshdns_api_stream_cutoffs_total") >= 1:
                break
        assert metric(leader.url, "meshdns_api_stream_cutoffs_total") == 1
        assert metric(leader.url, "meshdns_api_stream_buffered_bytes") == 0
    finally:
        os.kill(follower.proc.pid, signal.SIGCONT)
    in_step(leader, follower, timeout=60)
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    assert metric(follower.url, "meshdns_follow_relists_total") == 0
    assert metric(follower.url, "meshdns_follow_errors_total", code="transport") >= 1
    on_stream(leader, follower, streams=2)


def test_a_change_larger_than_the_buffer_ends_the_streams_and_each_catches_up(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    """An event over api.stream_buffer goes to no stream (each would hold it whole):
    every stream ends, and its follower catches up by itself from its revision."""
    leader = start(procs, leader_process(tmp_path, stream_buffer=4096))
    followers = [start(procs, follower_process(tmp_path, leader, f"f{i}")) for i in range(2)]
    for f in followers:
        on_stream(leader, f)
    streams = [metric(f.url, "meshdns_follow_streams_total") for f in followers]
    # ~10 KB of delta in one change.
    assert patch(leader.url, [{"name": f"big{n}", "namespace": "ns", "port": 80,
                               "hostnames": [wide_name(n)]} for n in range(50)]) == 200
    in_step(leader, *followers)
    assert metric(leader.url, "meshdns_api_stream_cutoffs_total") == 0
    for f, before in zip(followers, streams, strict=True):
        wait_for(lambda f=f, before=before: metric(f.url, "meshdns_follow_streams_total")
                 > before, 20, f"{f.name} to stream again")  # type: ignore[misc]
        assert metric(f.url, "meshdns_follow_relists_total") == 0
        assert metric(f.url, "meshdns_follow_full_syncs_total") == 1
        assert metric(f.url, "meshdns_follow_errors_total") == 0
    # Small changes go on the streams again.
    assert patch(leader.url, [{"name": "small", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, *followers)


def test_a_restarted_leader_is_relisted_once_then_streamed_again(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    """A leader restart breaks the stream; the follower backs off, reconnects, and (the
    restarted leader being a new lineage: its revisions may mean other contents) reads
    it in full once, then streams again."""
    leader = start(procs, leader_process(tmp_path))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    on_stream(leader, follower)
    leader.stop()
    leader.start()
    assert patch(leader.url, [{"name": "new", "namespace": "ns", "port": 80}]) == 200
    wait_for(lambda: listing(follower.url) == listing(leader.url), 60,
             "the follower to serve the restarted leader's registry")
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 2
    on_stream(leader, follower, streams=2)
    asked = deltas_asked(leader.url)
    assert patch(leader.url, [{"name": "newer", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, follower)
    assert deltas_asked(leader.url) - asked <= 1
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 2


def test_a_leader_restarted_from_its_state_file_is_resumed_from_the_revision(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    """With registry.state_file the restarted leader's new lineage continues the one its
    state file names, at the revision the file gave back: the relay and the follower
    behind it reconnect, catch up from their revisions and stream on, with no full read
    anywhere."""
    leader_dir = tmp_path / "leader"
    leader = leader_process(tmp_path)
    leader.config["registry"]["state_file"] = str(leader_dir / "state.json")
    leader._write_config(0, 0)
    start(procs, leader)
    relay = start(procs, follower_process(tmp_path, leader, "relay"))
    follower = start(procs, follower_process(tmp_path, relay, "follower"))
    on_stream(leader, relay)
    on_stream(relay, follower)
    assert patch(leader.url, [{"name": "before", "namespace": "ns", "port": 80}]) == 200
    in_step(leader, relay, follower)
    old_lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    leader.kill()  # SIGKILL: only what the state file (snapshot and journal) holds
    leader.start()
    new_lineage = call(leader.url, "GET", "/v1/services").headers[LINEAGE]
    assert new_lineage != old_lineage  # a new process is a new lineage, as ever...
    for i in range(3):  # ...that continues the old one
        assert patch(leader.url, [{"name": f"after{i}", "namespace": "ns", "port": 80}]) \
            == 200
    in_step(leader, relay, follower, timeout=60)
    assert call(relay.url, "GET", "/v1/services").headers[LINEAGE] == new_lineage
    for f in (relay, follower):
        assert metric(f.url, "meshdns_follow_full_syncs_total") == 1, f.name
        assert metric(f.url, "meshdns_follow_relists_total") == 0, f.name
    on_stream(leader, relay, streams=2)
    on_stream(relay, follower, streams=2)
    # Another lineage, or the old one from a revision other than the restored one, is
    # still gone.
    rev, _ = listing(leader.url)
    assert call(leader.url, "GET", f"/v1/services?since={rev}&lineage={old_lineage}"
                ).status == 410
    assert call(leader.url, "GET", f"/v1/services?since={rev}&lineage={new_lineage}"
                ).status == 200


# ---------------------------------------------------------------- leaders without streams


def test_a_leader_without_streams_is_long_polled(tmp_path: Path,
                                                 procs: list[ServerProcess]) -> None:  # noqa: F811
    """api.streams false answers ``stream=1`` as the long-poll it also is: the follower
    applies that answer and long-polls from then on, one request per change."""
    leader = start(procs, leader_process(tmp_path, streams=False, follow_coalesce=0))
    follower = start(procs, follower_process(tmp_path, leader, "follower"))
    in_step(leader, follower)
    for i in range(5):
        assert patch(leader.url, [{"name": f"p{i}", "namespace": "ns", "port": 80}]) == 200
        in_step(leader, follower)
    assert metric(follower.url, "meshdns_follow_streams_total") == 0
    assert metric(follower.url, "meshdns_follow_deltas_total") >= 5
    assert deltas_asked(leader.url) >= 5
    assert metric(leader.url, "meshdns_api_streams") == 0


async def _no_stream_param(fake: FakeLeader, request: web.Request) -> web.Response:
    """An older server that rejects what it does not know: 400 for ``stream``."""
    if "stream" in request.query:
        return web.json_response({"error": "unknown parameter stream", "field": "stream"},
                                 status=400)
    if "since" not in request.query:
        return registry(1, "L1", A)
    if fake.state.setdefault("deltas", 0) == 0:
        fake.state["deltas"] = 1
        return delta(2, "L1", [B])
    await _sleep(0.2)
    return delta(2, "L1", [])


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_a_leader_answering_400_to_stream_is_long_polled(tmp_path: Path) -> None:
    with FakeLeader(_no_stream_param) as fake, \
            running_server(follower_config(tmp_path / "f", fake.url)) as srv:
        wait_for(lambda: srv.mesh.store.revision == 2, 20, "the delta by long-poll")
        wait_for(lambda: fake.count("delta") >= 4, 20, "long-polls")
        asked = [q for kind, q in fake.requests if kind == "delta"]
        assert "stream" in asked[0]  # asked once...
        assert all("stream" not in q for q in asked[1:])  # ...then long-polls only
        assert srv.mesh.follower is not None and srv.mesh.follower.streams is False


# ---------------------------------------------------------------- the history, alone


def test_the_history_between_revisions_and_across_a_continued_lineage() -> None:
    from meshdns.core.registry import Registry, RegistryPolicy, apply_patch, parse_services
    from meshdns.history import ChangeHistory

    policy = RegistryPolicy()

    def upsert(base: Registry, name: str) -> Registry:
        return apply_patch(base, parse_services([{"name": name, "namespace": "ns",
                                                  "port": 80}]), [], policy, 0.0)

    history = ChangeHistory(lineage="L")
    calls: list[None] = []
    history.listeners.append(lambda: calls.append(None))
    snaps = [upsert(Registry.empty(), "a")]
    history.record(None, snaps[0])
    for name in ("b", "c", "d"):
        snaps.append(upsert(snaps[-1], name))
        history.record(snaps[-2], snaps[-1])
    assert len(calls) == 4  # the streams' hook, once per recorded snapshot
    r0 = snaps[0].revision
    # As of an earlier snapshot: only the changes up to it, read from it.
    mid = history.between(r0, snaps[2], "L")
    assert mid is not None and mid.registry is snaps[2]
    assert mid.keys == {("b", "ns", 80), ("c", "ns", 80)}
    assert history.between(r0, snaps[2], "M") is None  # another lineage
    assert history.between(snaps[3].revision, snaps[2], "L") is None  # after its end
    # A lineage that continues another one answers for it up to where it does.
    history.adopt_lineage("N", snaps[3], continues=snaps[3].revision)
    assert len(calls) == 5 and history.lineage == "N" and history.parent == ("L", snaps[3].revision)
    assert history.resolve("L", r0) == "N" and history.resolve("L", snaps[3].revision) == "N"
    assert history.resolve("L", snaps[3].revision + 1) is None
    assert history.resolve("M", r0) is None and history.resolve(None, r0) == "N"
    kept = history.since(r0, "N")  # the history was kept under the new name
    assert kept is not None and len(kept.keys) == 3
    # Another lineage with no continuation starts over.
    history.adopt_lineage("O", snaps[3])
    assert history.parent is None and history.resolve("N", snaps[3].revision) is None
    assert history.oldest == snaps[3].revision
