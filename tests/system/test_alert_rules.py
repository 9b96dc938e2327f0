"""deploy/prometheus: the alerting rules (promtool check + promtool's unit tests) and
the PodMonitor example (checked against the manifests it is meant to scrape).

That every metric the rules query is exported, with a sample, is checked on each
shipped configuration by tests/system/test_shipped_configs.py.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshdns.config import parse_config

from ..apiclient import ServerProcess, call
from ..promql import dashboard_metrics, promql_metric_names, rule_metrics
from .test_deploy import config_source, manifest_env

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yaml"
RULES_TEST = PROMETHEUS / "rules_test.yaml"
PODMONITOR = PROMETHEUS / "podmonitor.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def alerts() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_rules_unit_tests_pass() -> None:
    out = promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_rules_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation is caught: promtool compares the rendered annotations too."""
    shutil.copy(RULES, tmp_path / "rules.yaml")
    text = RULES_TEST.read_text().replace("9.091% of queries", "9.1% of queries")
    (tmp_path / "rules_test.yaml").write_text(text)
    out = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert out.returncode != 0
    assert "MeshdnsServfailRatioHigh" in out.stdout + out.stderr


def test_the_required_alerts_exist() -> None:
    by_metric = {name: rule["expr"] for name, rule in alerts().items()}
    wanted = {
        "MeshdnsFollowerSyncStale": "meshdns_follow_sync_age_seconds",
        "MeshdnsEtcdSyncStale": "meshdns_etcd_sync_age_seconds",
        "MeshdnsServfailRatioHigh": 'meshdns_dns_responses_total{rcode="SERVFAIL"}',
        "MeshdnsUpstreamFailing": "meshdns_upstream_requests_total{result!~",
        "MeshdnsVipPoolLow": "meshdns_vip_pool_free",
        "MeshdnsStateWriteFailing": "meshdns_state_write_failures_total",
    }
    assert set(by_metric) == set(wanted)
    for name, fragment in wanted.items():
        assert fragment in by_metric[name], (name, by_metric[name])
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == ["rules.yaml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
            for alert in check["exp_alerts"]:
                # The expectation names the series that fires: the others must not.
                assert alert["exp_labels"]["instance"], check
    assert firing == set(alerts()), set(alerts()) - firing
    assert silent == set(alerts()), set(alerts()) - silent


# ------------------------------------------------------------------ HTTP statuses

def _statuses(alert: str) -> set[int]:
    """The HTTP statuses an alert's description tells the operator about."""
    return {int(s) for s in re.findall(r"HTTP (\d{3})", alerts()[alert]["annotations"]
                                       ["description"])}


def _counter(server: ServerProcess, name: str) -> float:
    body = call(server.url, "GET", "/metrics").body.decode()
    [line] = [ln for ln in body.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def _services(count: int) -> dict[str, Any]:
    return {"services": [{"name": f"s{i}", "namespace": "alerts", "port": 80}
                         for i in range(count)]}


def test_vip_pool_alert_names_the_status_a_write_gets(tmp_path: Path) -> None:
    """A real meshdns with a 2-address pool: the write that needs a third VIP is
    refused with the status the MeshdnsVipPoolLow description gives, and counted."""
    server = ServerProcess(tmp_path, {"registry": {"cidr": "240.0.0.0/30", "cidr6": None}})
    try:
        server.start(ready=False)
        assert call(server.url, "PUT", "/v1/services", _services(2)).status == 200
        refused = call(server.url, "PUT", "/v1/services", _services(3))
        assert _statuses("MeshdnsVipPoolLow") == {refused.status}, refused.body
        assert _counter(server, "meshdns_vip_pool_exhausted_total") == 1
    finally:
        server.stop()


def test_state_write_alert_names_the_statuses_a_write_gets(tmp_path: Path) -> None:
    """A real meshdns whose state file cannot be written: over the file size limit
    (EFBIG, like a full volume: the storage failed) and in a directory that is gone
    (a wrong path). Each write is refused with a status the MeshdnsStateWriteFailing
    description gives, and counted by the metric it alerts on."""
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    server = ServerProcess(tmp_path, {"registry": {"state_file": str(state)}})
    got = set()
    try:
        server.start(ready=False)
        assert server.proc is not None
        assert call(server.url, "PUT", "/v1/services", _services(1)).status == 200
        # CPython ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG.
        limit = state.stat().st_size + 4096
        hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
        too_big = call(server.url, "PUT", "/v1/services", _services(2000))
        got.add(too_big.status)
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        shutil.rmtree(state.parent)
        gone = call(server.url, "PUT", "/v1/services", _services(3))
        got.add(gone.status)
        assert _counter(server, "meshdns_state_write_failures_total") == 2
    finally:
        server.stop()
    assert got == _statuses("MeshdnsStateWriteFailing") == {507, 500}, (too_big.body,
                                                                        gone.body)


# ------------------------------------------------------------------ PodMonitor

def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _configmaps() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d
            for path in sorted(KUBERNETES.rglob("*.yaml")) for d in _docs(path)
            if d["kind"] == "ConfigMap"}


def _meshdns_pods() -> list[tuple[str, str, dict[str, str], dict[str, int], int]]:
    """(where, namespace, pod labels, the meshdns container's ports by name, the port its
    config serves /metrics on) for each workload in deploy/kubernetes that runs meshdns."""
    configmaps = _configmaps()
    out = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
                continue
            template = doc["spec"]["template"]
            pod = template["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                if c["image"].split(":")[0].rsplit("/", 1)[-1] != "meshdns":
                    continue
                name, key = config_source(pod, c)
                text = configmaps[(doc["metadata"]["namespace"], name)]["data"][key]
                config = parse_config(yaml.safe_load(text), env=manifest_env(c))
                metrics_port = (config.metrics.listen or config.api.listen).port
                out.append((f"{path.relative_to(ROOT)} {doc['metadata']['name']}",
                            doc["metadata"]["namespace"], template["metadata"]["labels"],
                            {p["name"]: p["containerPort"] for p in c.get("ports", [])
                             if "name" in p}, metrics_port))
    return out


def _selects(monitor: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    spec = monitor["spec"]
    ns = spec.get("namespaceSelector", {})
    if not ns.get("any") and namespace not in ns.get("matchNames", [monitor["metadata"]
                                                                      ["namespace"]]):
        return False
    selector = spec["selector"]
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    wanted: dict[str, str] = selector.get("matchLabels", {})
    return wanted.items() <= labels.items()


def test_podmonitor_is_a_prometheus_operator_podmonitor() -> None:
    docs = _docs(PODMONITOR)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["kind"] == "PodMonitor"
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
        assert set(doc["spec"]) <= {"namespaceSelector", "selector", "podMetricsEndpoints"}
        for endpoint in doc["spec"]["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            assert isinstance(endpoint["port"], str)  # a port name, as the Operator wants


def test_podmonitor_scrapes_every_shipped_meshdns_pod() -> None:
    """Each meshdns workload is selected by a monitor whose endpoint names a port that
    its meshdns container declares (a missing port name silently scrapes nothing), and
    that port is where its config serves /metrics (metrics.listen, else api.listen:
    the API answers 404 for /metrics once metrics.listen is set)."""
    monitors = _docs(PODMONITOR)
    pods = _meshdns_pods()
    assert len(pods) >= 3
    for where, namespace, labels, ports, metrics_port in pods:
        scraped = [e["port"] for m in monitors if _selects(m, namespace, labels)
                   for e in m["spec"]["podMetricsEndpoints"] if e["port"] in ports]
        assert len(scraped) == 1, f"{where}: scraped through {scraped} (ports {ports})"
        assert ports[scraped[0]] == metrics_port, f"{where}: {scraped[0]} is not /metrics"


# ------------------------------------------------------------------ PromQL metric names

def test_dashboard_metric_names_are_parsed() -> None:
    names = dashboard_metrics()
    assert {"meshdns_dns_responses_total", "meshdns_dns_request_duration_seconds_bucket",
            "meshdns_follow_sync_age_seconds", "meshdns_vip_pool_free",
            # what sizing a sidecar's requests and limits needs (docs/operations.md)
            "meshdns_process_cpu_seconds_total",
            "meshdns_process_resident_memory_bytes"} <= names, names
    assert not {"sum", "rate", "histogram_quantile", "le", "upstream", "time"} & names
    assert promql_metric_names('sum by (a) (rate(x_total{b="c"}[5m])) / on(a) y > 0.5e3') \
        == {"x_total", "y"}
    assert {"meshdns_follow_sync_age_seconds", "meshdns_etcd_sync_age_seconds",
            "meshdns_dns_responses_total", "meshdns_upstream_requests_total", "meshdns_vip_pool_free",
            "meshdns_state_write_failures_total"} == rule_metrics()
