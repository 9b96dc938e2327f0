"""The registry in etcd under faults: the etcd leader killed, a member that stops
answering, all of etcd gone (fail static, 503 for writes, restart from the state
file, catching up), a copy older than follow_max_staleness, and a compaction past
the watch's revision. A real 3-member etcd cluster on loopback, meshdns processes.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..apiclient import ServerProcess, call, wait_for
from ..etcd_cluster import CuttableProxy, EtcdCluster
from ..etcd_support import (
    answers,
    instance,
    metric,
    name_of,
    patch,
    running_cluster,
    running_pair,
    start_listed,
    svc,
    vips,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    yield from running_cluster(tmp_path)


@pytest.fixture
def pair(tmp_path: Path, cluster: EtcdCluster) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    yield from running_pair(tmp_path, cluster)


# ------------------------------------------------------------------ etcd faults


def test_killing_the_etcd_leader_costs_an_election_not_writes(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    assert patch(a, [svc(1)]).status == 200
    cluster.kill(cluster.leader())
    for writer, reader, i in ((a, b, 2), (b, a, 3)):
        t0 = time.monotonic()
        # Within ~5 s (an election on loopback takes ~1 s): the instance retries an
        # unavailable etcd for registry.etcd.request_timeout (3 s) before saying 503.
        reply = patch(writer, [svc(i)], timeout=30)
        while reply.status == 503 and time.monotonic() - t0 < 5:
            reply = patch(writer, [svc(i)], timeout=30)
        assert reply.status == 200, reply.body
        vip = vips(writer)[(f"s{i}", "shop", 80)][0]

        def seen(r: ServerProcess = reader, name: str = name_of(svc(i)),
                 want: str = vip) -> bool:
            return answers(r, name) == [want]

        wait_for(seen, 10, f"the other instance to answer s{i}")


def test_a_watch_on_a_member_that_stopped_answering_moves_to_another(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    """A member cut off from the others (here: SIGSTOP) keeps its TCP connections open
    and sends nothing: the watch on it is silently stuck, not broken. The heartbeat
    reads from the next member, sees the copy fall behind, and restarts the watch there."""
    reader = instance(tmp_path, "reader", cluster.endpoints)
    writer: ServerProcess | None = None
    try:
        start_listed(reader)
        # The first write lists the prefix again and starts a new watch: made before the
        # watch that counts is looked at.
        assert call(reader.url, "PUT", "/v1/services", {"services": []}).status == 200

        def watches() -> list[str]:
            return re.findall(r"watching /meshdns/ from revision \d+ on (\S+)", reader.log())

        wait_for(lambda: len(watches()) >= 2, 10, "the reader's watch after the first write")
        # The member the reader's watch is on (it logs it); the writer uses the others.
        watched = watches()[-1]
        [stopped] = [m for m in cluster.members if m.url == watched]
        writer = instance(tmp_path, "writer",
                          [m.url for m in cluster.members if m is not stopped])
        start_listed(writer)
        assert patch(writer, [svc(1)]).status == 200
        wait_for(lambda: ("s1", "shop", 80) in vips(reader), 10, "the reader to see s1")
        assert stopped.proc is not None
        stopped.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        reply = patch(writer, [svc(2)], timeout=30)
        while reply.status == 503 and time.monotonic() - t0 < 20:  # it may have led
            reply = patch(writer, [svc(2)], timeout=30)
        assert reply.status == 200, reply.body
        vip = vips(writer)[("s2", "shop", 80)][0]
        wait_for(lambda: answers(reader, name_of(svc(2))) == [vip], 40,
                 "the reader to get s2 through another member")
        assert "the watch is behind" in reader.log()
        moved = re.findall(r"watching /meshdns/ from revision \d+ on (\S+)", reader.log())
        assert moved[-1] != watched
    finally:
        for m in cluster.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGCONT)
        reader.stop()
        if writer is not None:
            writer.stop()


def test_without_etcd_dns_keeps_answering_writes_get_503_and_state_file_restarts(
        pair: tuple[ServerProcess, ServerProcess], cluster: EtcdCluster) -> None:
    a, b = pair
    assert patch(a, [svc(1), svc(2)]).status == 200
    vip1 = vips(a)[("s1", "shop", 80)][0]
    wait_for(lambda: answers(b, name_of(svc(1))) == [vip1], 10, "b to answer s1")
    cluster.stop()
    # DNS keeps answering from each copy; /readyz stays 200 (the copy is young).
    for server in (a, b):
        assert answers(server, name_of(svc(1))) == [vip1]
        assert call(server.url, "GET", "/readyz").status == 200
    # Writes: 503, nothing acknowledged, nothing changed.
    refused = patch(a, [svc(3)], timeout=30)
    assert refused.status == 503, refused.body
    assert "etcd" in refused.json()["error"]
    assert ("s3", "shop", 80) not in vips(a)
    # A restarted instance serves its last copy from its state file at once.
    b.kill()
    b.start(ready=True)
    assert answers(b, name_of(svc(1))) == [vip1]
    assert ("s2", "shop", 80) in vips(b)
    metrics = call(b.url, "GET", "/metrics").body.decode()
    assert "meshdns_etcd_connected 0.0" in metrics
    # etcd comes back: writes succeed and reach the other instance.
    cluster.restart()
    reply = patch(b, [svc(3)], timeout=30)
    while reply.status == 503:
        time.sleep(0.2)
        reply = patch(b, [svc(3)], timeout=30)
    assert reply.status == 200, reply.body
    vip3 = vips(b)[("s3", "shop", 80)][0]
    wait_for(lambda: answers(a, name_of(svc(3))) == [vip3], 20, "a to answer s3")
    assert vips(a) == vips(b)
    # The restarted instance follows writes made elsewhere again, too.
    assert patch(a, [svc(4)], timeout=30).status == 200
    vip4 = vips(a)[("s4", "shop", 80)][0]
    wait_for(lambda: answers(b, name_of(svc(4))) == [vip4], 20, "b to answer s4")
    assert "etcd: watching /meshdns/ again from revision" in a.log()
    assert "still serving revision" in a.log()


def test_a_copy_older_than_follow_max_staleness_is_not_ready_but_still_answers(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    a = instance(tmp_path, "stale", cluster.endpoints, follow_max_staleness=3)
    try:
        start_listed(a)
        assert patch(a, [svc(1)]).status == 200
        vip = vips(a)[("s1", "shop", 80)][0]
        cluster.stop()
        wait_for(lambda: call(a.url, "GET", "/readyz").status == 503, 20,
                 "/readyz to say the copy is too old")
        body = call(a.url, "GET", "/readyz").json()
        assert "registry.follow_max_staleness 3" in body["reason"]
        assert metric(a, "meshdns_etcd_sync_age_seconds") > 3
        assert answers(a, name_of(svc(1))) == [vip]  # fail static: still answered
        assert "still serving revision" in a.log()
    finally:
        a.stop()


# ------------------------------------------------------------------ compaction


def test_compaction_past_the_watch_relists_and_loses_nothing(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    proxy = CuttableProxy(cluster.members[0].client_port)
    writer = instance(tmp_path, "w", cluster.endpoints)
    watcher = instance(tmp_path, "r", [f"http://127.0.0.1:{proxy.port}"])
    try:
        start_listed(writer)
        start_listed(watcher)
        assert patch(writer, [svc(i) for i in range(20)]).status == 200
        wait_for(lambda: len(vips(watcher)) == 20, 10, "the watcher to apply 20 services")
        relists = metric(watcher, "meshdns_etcd_relists_total")
        proxy.cut()
        # Meanwhile: new services, changed ones, deleted ones; then etcd compacts them away.
        assert patch(writer, [svc(i) for i in range(20, 40)],
                     [{"name": f"s{i}", "namespace": "shop", "port": 80}
                      for i in range(5)]).status == 200
        assert patch(writer, [svc(7, hostnames=["seven.example.com"])]).status == 200
        cluster.compact(cluster.revision())
        proxy.restore()
        expected = vips(writer)
        wait_for(lambda: vips(watcher) == expected, 20, "the watcher to re-list")
        assert metric(watcher, "meshdns_etcd_relists_total") > relists
        assert "compacted" in watcher.log()
        assert answers(watcher, "seven.example.com") == [expected[("s7", "shop", 80)][0]]
        assert answers(watcher, name_of(svc(39))) == [expected[("s39", "shop", 80)][0]]
        assert answers(watcher, name_of(svc(0))) == []
        # And it keeps following by watch afterwards.
        assert patch(writer, [svc(40)]).status == 200
        wait_for(lambda: ("s40", "shop", 80) in vips(watcher), 10, "the watch to resume")
    finally:
        writer.stop()
        watcher.stop()
        proxy.close()
