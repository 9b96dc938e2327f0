"""Metrics: exact counter deltas for a known mix, promtool, a real Prometheus scrape."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..support import (
    ServerThread,
    connected_udp,
    make_config,
    query,
    running_server,
    stop_process,
    udp_query,
)

REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerThread) -> str:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(snap: Samples, name: str, **labels: str) -> float:
    return snap.get((name, tuple(sorted(labels.items()))), 0.0)


def http(server: ServerThread, method: str, path: str, body: Any = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.api_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def raw_udp(server: ServerThread, payload: bytes, expect_reply: bool) -> bytes | None:
    host, port = server.dns_addr(4)
    with connected_udp(host, port) as s:  # the server's replies only
        s.settimeout(2.0 if expect_reply else 0.3)
        s.send(payload)
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def test_known_mix_gives_exact_counter_deltas(demo_server: ServerThread) -> None:
    before = samples(scrape(demo_server))
    for _ in range(3):
        assert query(demo_server, "frontend.kong.svc.80.mesh", "A").rcode() == dns.rcode.NOERROR
    assert query(demo_server, "frontend.kong.svc.80.mesh", "AAAA", tcp=True).rcode() == 0
    for _ in range(2):
        assert query(demo_server, "nope.mesh", "A").rcode() == dns.rcode.NXDOMAIN
    assert query(demo_server, "example.com", "A").rcode() == dns.rcode.REFUSED
    formerr = raw_udp(demo_server, b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6, True)  # QDCOUNT=2
    assert formerr is not None and formerr[3] & 0x0F == dns.rcode.FORMERR
    assert raw_udp(demo_server, b"\x00\x01\x02", False) is None  # short: dropped
    assert http(demo_server, "GET", "/v1/services") == 200
    assert http(demo_server, "PATCH", "/v1/services",
                {"upsert": [{"name": "extra", "namespace": "kong", "port": 81}]}) == 200
    assert http(demo_server, "PATCH", "/v1/services",
                {"upsert": [{"name": "BAD", "namespace": "kong", "port": 81}]}) == 400
    after = samples(scrape(demo_server))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("meshdns_dns_requests_total", proto="udp", qtype="A") == 6
    assert delta("meshdns_dns_requests_total", proto="tcp", qtype="AAAA") == 1
    assert delta("meshdns_dns_requests_total", proto="udp", qtype="invalid") == 2
    assert delta("meshdns_dns_responses_total", rcode="NOERROR", source="local") == 4
    assert delta("meshdns_dns_responses_total", rcode="NXDOMAIN", source="local") == 2
    assert delta("meshdns_dns_responses_total", rcode="REFUSED", source="local") == 1
    assert delta("meshdns_dns_responses_total", rcode="FORMERR", source="local") == 1
    assert delta("meshdns_dns_dropped_total") == 1
    assert delta("meshdns_sync_requests_total", op="get", code="200") == 1
    assert delta("meshdns_sync_requests_total", op="patch", code="200") == 1
    assert delta("meshdns_sync_requests_total", op="patch", code="400") == 1
    assert value(after, "meshdns_registry_services") == 4
    assert delta("meshdns_registry_revision") == 1
    assert value(after, "meshdns_registry_last_update_timestamp_seconds") > 0
    assert delta("meshdns_vip_pool_free", family="ipv4") == -1
    hist_count = value(after, "meshdns_dns_request_duration_seconds_count")
    assert hist_count == value(after, "meshdns_dns_request_duration_seconds_bucket", le="+Inf")
    assert value(after, "meshdns_build_info", version=__import__("meshdns").__version__,
                 python=__import__("platform").python_version()) == 1
    assert value(after, "meshdns_process_resident_memory_bytes") > 0


def test_cache_hits_are_counted_after_a_registry_swap(demo_server: ServerThread) -> None:
    """Hits counted on cache entries are folded, not lost, when a write drops the cache."""
    before = samples(scrape(demo_server))
    for _ in range(5):
        query(demo_server, "frontend.kong.svc.80.mesh", "A")
    assert http(demo_server, "PATCH", "/v1/services",
                {"delete": [{"name": "redis", "namespace": "cache", "port": 6379}]}) == 200
    for _ in range(2):
        query(demo_server, "frontend.kong.svc.80.mesh", "A")
    after = samples(scrape(demo_server))
    got = value(after, "meshdns_dns_responses_total", rcode="NOERROR", source="local") \
        - value(before, "meshdns_dns_responses_total", rcode="NOERROR", source="local")
    assert got == 7


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(.ci/run installs the Debian package prometheus)")
def test_promtool_check_metrics_passes(demo_server: ServerThread) -> None:
    query(demo_server, "frontend.kong.svc.80.mesh", "A")
    query(demo_server, "nope.mesh", "A", tcp=True)
    text = scrape(demo_server)
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_spec_metric_is_exposed(demo_server: ServerThread) -> None:
    names = {f.name for f in text_string_to_metric_families(scrape(demo_server))}
    spec = ["dns_requests", "dns_responses", "dns_request_duration_seconds",
            "registry_services", "registry_revision", "registry_last_update_timestamp_seconds",
            "sync_requests", "upstream_requests", "upstream_request_duration_seconds",
            "cache_entries", "vip_pool_free", "build_info"]
    missing = [n for n in spec if "meshdns_" + n not in names]
    assert not missing


def test_dashboard_uses_only_exposed_metrics(demo_server: ServerThread) -> None:
    text = scrape(demo_server)
    exposed = {f.name for f in text_string_to_metric_families(text)}
    exposed |= {"meshdns_follow_sync_age_seconds"}  # followers only
    dashboard = json.loads((REPO / "deploy/grafana/meshdns.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"meshdns_[a-z_]+", target["expr"]))
    assert used, "the dashboard queries no meshdns metric"
    suffixes = ("_total", "_bucket", "_count", "_sum")
    unknown = {u for u in used if u not in exposed
               and not any(u.endswith(s) and u[: -len(s)] in exposed for s in suffixes)}
    assert not unknown


@pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                    reason="prometheus not installed (.ci/run installs it)")
def test_real_prometheus_scrapes_registry_size(tmp_path: Path) -> None:
    with running_server(make_config(tmp_path)) as server:
        api = server.mesh.api_address
        assert api is not None
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: meshdns\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{api.port}']\n")
        log = tmp_path / "prom.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 "--web.listen-address=127.0.0.1:0"],  # it logs the port it got
                stdout=subprocess.DEVNULL, stderr=err)
        try:
            result = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                found = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)',
                                  log.read_text())
                url = found and (f"http://127.0.0.1:{found[1]}/api/v1/query?query="
                                 "meshdns_registry_services")
                try:
                    if url:
                        with urllib.request.urlopen(url, timeout=5) as resp:
                            doc = json.loads(resp.read())
                        if doc["status"] == "success" and doc["data"]["result"]:
                            result = doc["data"]["result"]
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.5)
            assert result is not None, (tmp_path / "prom.log").read_text()[-2000:]
            assert float(result[0]["value"][1]) == len(server.mesh.store.registry) == 3
        finally:
            stop_process(proc)


def test_no_log_line_per_packet_at_the_default_level(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, {"log": {"level": "info"}})
    with running_server(config) as server, caplog.at_level("INFO"):
        caplog.clear()
        for _ in range(20):
            query(server, "frontend.kong.svc.80.mesh", "A")
            query(server, "nope.mesh", "A")
        host, port = server.dns_addr(4)
        msg = dns.message.make_query("frontend.kong.svc.80.mesh", "A")
        udp_query(msg, host, port, 3)
        assert len([r for r in caplog.records if r.levelno >= 20]) == 0


def test_a_follower_exposes_the_age_of_its_last_sync(tmp_path: Path) -> None:
    from ..apiclient import wait_for

    (tmp_path / "leader").mkdir()
    (tmp_path / "f").mkdir()
    with running_server(make_config(tmp_path / "leader")) as leader:
        cfg = make_config(tmp_path / "f", {"registry": {"follow": leader.api_url}}, services=[])
        with running_server(cfg) as follower:
            wait_for(lambda: follower.mesh.store.revision == leader.mesh.store.revision
                     and follower.mesh.store.loaded, 15, "first sync")
            snap = samples(scrape(follower))
            age = value(snap, "meshdns_follow_sync_age_seconds")
            last = value(snap, "meshdns_follow_last_sync_timestamp_seconds")
            assert 0 <= age < 60
            assert abs(last - time.time()) < 60
            assert value(snap, "meshdns_registry_services") == 3


def test_an_exhausted_vip_range_is_a_507_and_counted(tmp_path: Path) -> None:
    """SPEC §3: the write is rejected whole (507, clear message, metric), nothing changes."""
    cfg = make_config(tmp_path, {"registry": {"cidr": "240.0.0.0/29", "cidr6": None}},
                      services=[{"name": "a", "namespace": "x", "port": 80}])
    with running_server(cfg) as server:
        before = samples(scrape(server))
        revision = server.mesh.store.revision
        body = {"upsert": [{"name": f"n{i}", "namespace": "x", "port": 80} for i in range(6)]}
        assert http(server, "PATCH", "/v1/services", body) == 507
        after = samples(scrape(server))
        assert value(after, "meshdns_vip_pool_exhausted_total") \
            - value(before, "meshdns_vip_pool_exhausted_total") == 1
        assert server.mesh.store.revision == revision
        assert value(after, "meshdns_registry_services") == 1
        assert value(after, "meshdns_vip_pool_free", family="ipv4") == 5


def test_metrics_with_a_real_upstream_count_what_was_forwarded(tmp_path: Path) -> None:
    """The shipped configs all forward: /metrics must serve (it 500'd) and count upstreams."""
    from ..fake_upstream import Unbound

    with Unbound(tmp_path) as unbound:
        raw = make_config(tmp_path, {"dns": {"upstreams": [unbound.address]}})
        with running_server(raw) as server:
            before = samples(scrape(server))
            assert query(server, "www.example.test").rcode() == dns.rcode.NOERROR
            assert query(server, "www.example.test").rcode() == dns.rcode.NOERROR  # cached
            assert query(server, "nope.example.test").rcode() == dns.rcode.NXDOMAIN
            text = scrape(server)
    after = samples(text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    up = unbound.address
    assert delta("meshdns_upstream_requests_total", upstream=up, result="ok") == 2
    assert delta("meshdns_upstream_request_duration_seconds_count", upstream=up) == 2
    assert delta("meshdns_upstream_request_duration_seconds_bucket", upstream=up,
                 le="+Inf") == 2
    assert delta("meshdns_dns_responses_total", rcode="NOERROR", source="upstream") == 1
    assert delta("meshdns_dns_responses_total", rcode="NOERROR", source="cache") == 1
    assert delta("meshdns_dns_responses_total", rcode="NXDOMAIN", source="upstream") == 1
    assert value(after, "meshdns_cache_entries", cache="upstream") == 2
    assert value(after, "meshdns_upstream_inflight") == 0
    if shutil.which("promtool"):
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metrics_without_counting_still_serve(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """MESHDNS_BENCH_NO_COUNTING (bench/ measures what counting costs) crashed /metrics."""
    monkeypatch.setenv("MESHDNS_BENCH_NO_COUNTING", "1")
    with running_server(make_config(tmp_path)) as server:
        assert query(server, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR
        snap = samples(scrape(server))
    assert value(snap, "meshdns_registry_services") == 3
    assert value(snap, "meshdns_dns_request_duration_seconds_count") == 0


def test_batched_udp_drops_are_exported(demo_server: ServerThread) -> None:
    """What the recvmmsg path drops is counted where an operator sees it (issue 24): an
    oversized query (larger than a 4096-byte slot) is dropped and counted, by reason."""
    if os.environ.get("MESHDNS_UDP_BATCH") == "0":
        pytest.skip("the portable UDP path answers every datagram it receives")
    before = samples(scrape(demo_server))
    for reason in ("oversized", "send_buffer_full", "send_error", "receive_error",
                   "internal_error"):
        assert ("meshdns_dns_udp_errors_total", (("reason", reason),)) in before
    big = dns.message.make_query("frontend.kong.svc.80.mesh", "A").to_wire() + b"\x00" * 5000
    assert raw_udp(demo_server, big, False) is None
    assert query(demo_server, "frontend.kong.svc.80.mesh", "A").rcode() == dns.rcode.NOERROR
    after = samples(scrape(demo_server))
    assert value(after, "meshdns_dns_udp_errors_total", reason="oversized") == \
        value(before, "meshdns_dns_udp_errors_total", reason="oversized") + 1
    assert value(after, "meshdns_dns_udp_errors_total", reason="internal_error") == 0
