"""Every shipped configuration, started as shipped, end to end.

The configs: ``examples/meshdns.yaml`` (``make run``), the file the Dockerfile bakes
into the image, and the meshdns config in each ConfigMap under deploy/kubernetes.
Each gets exactly the environment its deployment gives it (``Shipped.env``: the
variables a manifest sets, from the Secret or literally; those of the documented
``docker run`` for the image; none for ``make run``), with the Secret's value a test
token. Unmodified, each must pass ``meshdns check-config --skip-files`` with that
environment: a config that would refuse to start as deployed (a public API whose
token the manifest forgets) fails here. Then each runs as a real ``python -m meshdns
serve --config FILE`` subprocess. Only addresses and paths change (``rewrite``): every
``listen`` (DNS, API and metrics) moves to a free loopback port, ``dns.upstreams`` to
a real unbound on loopback, ``registry.follow`` to a leader started from the shipped
leader ConfigMap, ``registry.etcd.endpoints`` to a real etcd started on loopback,
``*_file`` paths into the test's directory. Nothing is switched off. A config whose
registry lives in etcd is its own kind (it neither follows nor is the followers'
leader): its Deployment runs replicas that all write, so two instances of it run on
the one etcd, the service is written through one and asked of the other.
Then, against each:

- ``dig`` a mesh name (pushed through the API; also a seed name when there is a
  seed file; also ``<mesh name>.<search suffix>`` when a search list applies) and a
  name forwarded to unbound;
- scrape /metrics where Prometheus would (on ``metrics.listen`` when set: then the API
  answers 404 there, and /healthz and /readyz answer on the metrics port too), run
  ``promtool check metrics`` on the body, and check that every metric the Grafana
  dashboard and the alerting rules query has a sample, and a few values;
- /readyz is 200.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshdns.config import defaults_as_dict, is_loopback, parse_config

from ..apiclient import call, wait_for
from ..etcd_cluster import EtcdCluster
from ..fake_upstream import Unbound
from ..promql import dashboard_metrics, rule_metrics
from ..support import have_ipv6_loopback, run_tool, stop_process
from .test_deploy import (
    configmap_consumers,
    copy_sources,
    dockerfile_stages,
    documented_run_env,
    exec_form,
    instruction,
    manifest_env,
)

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
TOKEN = "shipped-config-test-token"
FORWARDED = ("www.example.test", "192.0.2.10")  # local-data of tests/fake_upstream.py
PUSHED = {"name": "shipped-check", "namespace": "e2e", "port": 8080, "vip": "240.0.0.77",
          "hostnames": []}
# Exported by a follower only (registry.follow set); absent elsewhere by design.
FOLLOWER_ONLY = {"meshdns_follow_sync_age_seconds",
                 "meshdns_follow_last_sync_timestamp_seconds"}
# Exported by an instance whose registry lives in etcd only (meshdns/etcd/backend.py).
ETCD_ONLY = {"meshdns_etcd_connected", "meshdns_etcd_last_sync_timestamp_seconds",
             "meshdns_etcd_sync_age_seconds", "meshdns_etcd_applied_revision",
             "meshdns_etcd_relists_total", "meshdns_etcd_write_commits_total",
             "meshdns_etcd_write_conflicts_total", "meshdns_etcd_write_unavailable_total",
             "meshdns_etcd_bad_keys_total"}
NEEDS_TOKEN = "api.token: is required when api.listen is not a loopback address"

pytestmark = [
    pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed"),
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed"),
    pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed"),
]


# ------------------------------------------------------------------ the shipped configs

@dataclass(frozen=True)
class Shipped:
    name: str  # test id
    source: str  # where it was read from, for messages
    text: str  # the config file as shipped
    env: dict[str, str]  # what its deployment sets (MESHDNS_*), Secret values = TOKEN

    @property
    def raw(self) -> dict[str, Any]:
        value = yaml.safe_load(self.text) or {}
        assert isinstance(value, dict), self.source
        return value

    @property
    def follows(self) -> bool:
        return bool((self.raw.get("registry") or {}).get("follow"))

    @property
    def in_etcd(self) -> bool:
        """Its registry lives in etcd (registry.etcd.endpoints): every instance writes."""
        return bool(((self.raw.get("registry") or {}).get("etcd") or {}).get("endpoints"))


def container_config() -> Shipped:
    """The file the image's CMD names, as the Dockerfile COPYs it from the context."""
    runtime = dockerfile_stages()[-1]
    cmd = exec_form(instruction(runtime, "CMD").args)
    entry = exec_form(instruction(runtime, "ENTRYPOINT").args)
    argv = entry + cmd
    target = argv[argv.index("--config") + 1]
    [source] = [srcs[0] for srcs, dest in copy_sources(runtime) if dest == target]
    # The environment of the Dockerfile's documented `docker run -e ...`.
    env = {name: TOKEN for name in documented_run_env()}
    return Shipped("container", source, (ROOT / source).read_text(), env)


def configmap_configs() -> list[Shipped]:
    """Each meshdns config inside a ConfigMap (its ``*.yaml`` data entries), with the
    environment of the containers that run it."""
    consumers = configmap_consumers()
    out = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "ConfigMap":
                continue
            meta = doc["metadata"]
            for key, text in sorted((doc.get("data") or {}).items()):
                if key.endswith((".yaml", ".yml")):
                    rel = path.relative_to(ROOT)
                    envs = [manifest_env(c, TOKEN) for c in
                            consumers.get((meta["namespace"], meta["name"], key), [])]
                    assert envs, f"{rel}:data.{key}: no meshdns container runs it"
                    assert all(e == envs[0] for e in envs), f"{rel}:data.{key}: {envs}"
                    out.append(Shipped(f"k8s-{path.parent.name}", f"{rel}:data.{key}",
                                       text, envs[0]))
    return out


def shipped_configs() -> list[Shipped]:
    example = ROOT / "examples" / "meshdns.yaml"
    # `make run` passes no MESHDNS_* variable.
    return [Shipped("example", "examples/meshdns.yaml", example.read_text(), {}),
            container_config(), *configmap_configs()]


SHIPPED = shipped_configs()


def test_every_shipped_config_is_found() -> None:
    names = [s.name for s in SHIPPED]
    assert names[:2] == ["example", "container"]
    assert {"k8s-leader", "k8s-relay", "k8s-sidecar", "k8s-daemonset",
            "k8s-etcd"} <= set(names), names
    assert len(set(names)) == len(names), names
    [leader] = leaders()
    assert leader.name == "k8s-leader"
    [in_etcd] = [s for s in SHIPPED if s.in_etcd]
    assert in_etcd.name == "k8s-etcd" and not in_etcd.follows


def leaders() -> list[Shipped]:
    """Kubernetes configs that neither follow nor keep the registry in etcd: what the
    followers' follow URL reaches."""
    return [s for s in SHIPPED
            if s.name.startswith("k8s-") and not s.follows and not s.in_etcd]


def check_config(text: str, env: dict[str, str], tmp: Path
                 ) -> subprocess.CompletedProcess[str]:
    """``meshdns check-config --skip-files`` on ``text`` with exactly ``env`` (MESHDNS_*)."""
    path = tmp / "config.yaml"
    path.write_text(text)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    return subprocess.run([sys.executable, "-m", "meshdns", "check-config", "--skip-files",
                           str(path)], capture_output=True, text=True, timeout=60,
                          env={**base, **env}, cwd=tmp, check=False)


@pytest.mark.parametrize("shipped", SHIPPED, ids=[s.name for s in SHIPPED])
def test_shipped_config_as_deployed_passes_check_config(shipped: Shipped,
                                                        tmp_path: Path) -> None:
    """Unmodified (its own addresses), with the environment its deployment gives it: the
    config starts where it is deployed. The files it names are on the target machine."""
    out = check_config(shipped.text, shipped.env, tmp_path)
    assert out.returncode == 0, f"{shipped.source} with env {sorted(shipped.env)}: {out.stderr}"
    assert out.stdout.strip().endswith(": ok"), out.stdout


def api_host(shipped: Shipped) -> str:
    listen = (shipped.raw.get("api") or {}).get("listen") or defaults_as_dict()["api"]["listen"]
    return str(listen).rpartition(":")[0].strip("[]")


PUBLIC_API = [s for s in SHIPPED if not is_loopback(api_host(s))]


@pytest.mark.parametrize("shipped", PUBLIC_API, ids=[s.name for s in PUBLIC_API])
def test_a_shipped_public_api_without_its_token_fails_check_config(shipped: Shipped,
                                                                   tmp_path: Path) -> None:
    """The token its deployment passes is what lets it start: without it, refused."""
    assert "MESHDNS_API_TOKEN" in shipped.env, shipped.source
    env = {k: v for k, v in shipped.env.items() if k != "MESHDNS_API_TOKEN"}
    out = check_config(shipped.text, env, tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert NEEDS_TOKEN in out.stderr and "MESHDNS_API_TOKEN" in out.stderr, out.stderr


def test_the_image_and_the_leader_publish_their_api() -> None:
    """The negative case above runs at least for the image (`docker run -p 15080`) and
    the leader (its Service); sidecar and DaemonSet keep the API on loopback."""
    assert {"container", "k8s-leader"} <= {s.name for s in PUBLIC_API}
    assert not {"k8s-sidecar", "k8s-daemonset"} & {s.name for s in PUBLIC_API}


# ------------------------------------------------------------------ rewriting

def _listen(value: Any) -> Any:
    """Each address to port 0 on the loopback of its family (IPv6 dropped without ::1):
    the server picks its ports and says which in its ``--ports-file``."""
    if isinstance(value, str):
        return "127.0.0.1:0"  # a single address (api.listen): IPv4 loopback
    assert isinstance(value, list), value
    out = []
    for addr in value:
        if str(addr).startswith("["):
            if have_ipv6_loopback():
                out.append("[::1]:0")
        else:
            out.append("127.0.0.1:0")
    return out or ["127.0.0.1:0"]


def _path(value: Any, tmp: Path) -> Any:
    """A file path into ``tmp``: a file that ships in the repository is copied along
    (a seed file); any other gets its directory created, as a mounted volume would."""
    if not isinstance(value, str):
        return value
    shipped = ROOT / value
    dest = tmp / "files" / Path(value).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not Path(value).is_absolute() and shipped.is_file():
        shutil.copyfile(shipped, dest)
    return str(dest)


def rewrite(raw: dict[str, Any], tmp: Path, upstream: str, leader: str | None,
            etcd: list[str] | None = None) -> dict[str, Any]:
    """``raw`` with only addresses and paths changed (see the module docstring)."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    defaults = defaults_as_dict()
    for name in defaults:
        if out.get(name) is None:
            out[name] = {}
        section = out[name]
        # Defaulted keys too: a default listen address is a fixed port on this host.
        for key, value in {**defaults[name], **section}.items():
            if key == "listen" and value is not None:
                section[key] = _listen(value)
            elif key.endswith("_file") and value is not None:
                section[key] = _path(value, tmp)
    dns = out.setdefault("dns", {})
    dns["upstreams"] = [upstream]
    # A pod's resolv.conf: search suffixes of a namespace, and a nameserver that must not
    # be used (dns.upstreams is set); never the machine's own file.
    resolv = tmp / "resolv.conf"
    resolv.write_text("search demo.svc.cluster.local svc.cluster.local cluster.local\n"
                      "nameserver 127.0.0.1\n")
    dns["resolv_conf"] = str(resolv)
    registry = out.get("registry") or {}
    if registry.get("follow"):
        assert leader is not None
        registry["follow"] = leader
    if (registry.get("etcd") or {}).get("endpoints"):
        assert etcd, "a config in etcd needs the test's etcd endpoints"
        registry["etcd"]["endpoints"] = list(etcd)
    return out


def listen_addresses(config: dict[str, Any]) -> dict[str, list[str]]:
    """Every listen address a config sets: dns.listen, api.listen, metrics.listen."""
    out = {}
    for name in ("dns", "api", "metrics"):
        value = (config.get(name) or {}).get("listen")
        if value is not None:
            out[name] = value if isinstance(value, list) else [value]
    return out


@pytest.mark.parametrize("shipped", SHIPPED, ids=[s.name for s in SHIPPED])
def test_rewrite_moves_every_listener_to_loopback_and_keeps_the_rest(
        shipped: Shipped, tmp_path: Path) -> None:
    """A shipped listener left on a wildcard or fixed port would make the end-to-end run
    test something else (or collide); metrics.listen stays set exactly when shipped."""
    raw = shipped.raw
    out = rewrite(raw, tmp_path, "127.0.0.1:5", "http://127.0.0.1:6", ["http://127.0.0.1:7"])
    for name, addrs in listen_addresses(out).items():
        for addr in addrs:
            host, _, port = addr.rpartition(":")
            assert is_loopback(host.strip("[]")), (name, addr)
            assert int(port) == 0, (name, addr)  # no fixed port to collide on
    assert ("metrics" in listen_addresses(out)) == ("metrics" in listen_addresses(raw))
    # Every other key as shipped; of registry.etcd, all but the endpoints.
    for name, section in raw.items():
        for key, value in (section or {}).items():
            if key != "listen" and not key.endswith("_file") and key not in (
                    "upstreams", "follow", "etcd"):
                assert out[name][key] == value, f"{name}.{key}"
    etcd = (raw.get("registry") or {}).get("etcd") or {}
    for key, value in etcd.items():
        expected = ["http://127.0.0.1:7"] if key == "endpoints" else value
        assert out["registry"]["etcd"][key] == expected, f"registry.etcd.{key}"
    assert bool(etcd) == shipped.in_etcd
    for name, section in out.items():  # the state file (a volume) moves into the test's
        for key, value in (section or {}).items():
            if key.endswith("_file") and value is not None:
                assert Path(value).is_relative_to(tmp_path), f"{name}.{key}: {value}"


# ------------------------------------------------------------------ processes

def _env(shipped: Shipped) -> dict[str, str]:
    """The deployment's variables (shipped.env) and nothing else of meshdns's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    env.update(shipped.env, PYTHONUNBUFFERED="1")
    return env


@dataclass
class Running:
    config: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log: Path
    ports: Path  # serve --ports-file: the addresses it bound

    def bound(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.ports.read_text())
        return doc

    @property
    def api(self) -> str:
        return f"http://{self.bound()['api']}"

    @property
    def metrics_listener(self) -> str | None:
        """http://metrics.listen, when set (then /metrics is served there only)."""
        listen = self.bound()["metrics"]
        return f"http://{listen}" if listen else None

    @property
    def dns(self) -> tuple[str, int]:
        host, _, port = self.bound()["dns"][0].rpartition(":")
        return host.strip("[]"), int(port)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serving_or_exited(running: Running) -> bool:
    if running.proc.poll() is not None:
        return True
    if not running.ports.exists():
        return False
    return call(running.api, "GET", "/healthz", timeout=2).status == 200


@contextmanager
def serve(shipped: Shipped, tmp: Path, upstream: str, leader: str | None = None,
          etcd: list[str] | None = None, instance: str = "") -> Iterator[Running]:
    """The rewritten config served by a subprocess, once /healthz answers (/readyz waits
    for a registry: a config without a seed or state file needs a first write). Its
    listeners bind port 0 and ``--ports-file`` says where. ``instance`` tells replicas
    of one config apart (their directories, state files)."""
    work = tmp / f"{shipped.name}{instance}"
    work.mkdir(parents=True)
    config = rewrite(shipped.raw, work, upstream, leader, etcd)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    # check-config (keys, and the files the config names) agrees that it can serve.
    checked = subprocess.run([sys.executable, "-m", "meshdns", "check-config", str(path)],
                             capture_output=True, text=True, timeout=60,
                             env=_env(shipped),
                             cwd=work, check=False)
    assert checked.returncode == 0, checked.stderr
    log = work / "meshdns.log"
    ports = work / "ports.json"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meshdns", "serve", "--config",
                                 str(path), "--ports-file", str(ports)],
                                stdout=out, stderr=subprocess.STDOUT,
                                env=_env(shipped), cwd=work)
    running = Running(config, proc, log, ports)
    try:
        wait_for(functools.partial(serving_or_exited, running), 60,
                 f"{shipped.source} to serve")
        if proc.poll() is not None:
            pytest.fail(f"{shipped.source} exited {proc.returncode}:\n{running.output()}")
        yield running
        assert proc.poll() is None, f"{shipped.source} died:\n{running.output()}"
    finally:
        stop_process(proc, 15)


def dig(addr: tuple[str, int], name: str, qtype: str = "A") -> tuple[str, list[str]]:
    """(status, the answer's A/AAAA addresses) from one real dig over UDP."""
    out = run_tool("dig", f"@{addr[0]}", "-p", str(addr[1]), "+tries=1", "+time=5",
                   name, qtype)
    assert out.returncode == 0, out.stdout + out.stderr
    status = re.search(r"status: (\w+)", out.stdout)
    assert status, out.stdout
    answers: list[str] = []
    _, found, section = out.stdout.partition(";; ANSWER SECTION:\n")
    if found:
        for line in section.split("\n\n")[0].splitlines():
            fields = line.split()  # owner ttl class type data
            if len(fields) == 5 and fields[3] in ("A", "AAAA"):
                answers.append(fields[4])
    return status.group(1), answers


# ------------------------------------------------------------------ the scrape

def scrape(running: Running) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    """/metrics where Prometheus scrapes it: metrics.listen when set, else api.listen."""
    reply = call(running.metrics_listener or running.api, "GET", "/metrics")
    assert reply.status == 200, reply.body[:2000]
    body = reply.body.decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return body, samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for lbl, v in samples.get(name, []) if labels.items() <= lbl.items())


def promtool_check(body: str) -> None:
    out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ the tests

@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[Unbound]:
    (tmp_path / "unbound").mkdir()
    with Unbound(tmp_path / "unbound") as server:
        yield server


def mesh_name(service: dict[str, Any], domain: str) -> str:
    return f"{service['name']}.{service['namespace']}.svc.{service['port']}.{domain}"


@pytest.mark.parametrize("shipped", SHIPPED, ids=[s.name for s in SHIPPED])
def test_shipped_config_end_to_end(shipped: Shipped, tmp_path: Path, unbound: Unbound) -> None:
    with ExitStack() as stack:
        writer: Running | None = None  # where the service is written, when not `running`
        etcd: list[str] | None = None
        if shipped.follows:
            [leader_config] = leaders()
            writer = stack.enter_context(serve(leader_config, tmp_path, unbound.address))
        if shipped.in_etcd:  # one member is enough; its replicas: two instances
            cluster = EtcdCluster(tmp_path / "etcd", 1)
            stack.callback(cluster.stop)
            etcd = cluster.start().endpoints
            writer = stack.enter_context(serve(shipped, tmp_path, unbound.address, etcd=etcd,
                                               instance="-writer"))
        running = stack.enter_context(
            serve(shipped, tmp_path, unbound.address,
                  writer.api if writer and shipped.follows else None, etcd))
        check_running(shipped, running, writer, unbound)


def check_running(shipped: Shipped, running: Running, writer: Running | None,
                  unbound: Unbound) -> None:
    """``writer``: the follower's leader, or another replica of a config in etcd."""
    config = parse_config(running.config, {})
    domain = config.dns.domains[0]

    # A mesh name pushed through the API (the leader's for a follower, the other
    # replica's for a config in etcd).
    pushed = call((writer or running).api, "PATCH", "/v1/services", {"upsert": [PUSHED]},
                  token=TOKEN)
    assert pushed.status == 200, pushed.body
    revision = pushed.json()["revision"]
    if writer is not None:  # served here once pulled from the leader / watched in etcd
        wait_for(lambda: call(running.api, "GET", "/readyz").json().get("revision") == revision,
                 30, f"{shipped.source} to serve revision {revision} written elsewhere")
    name = mesh_name(PUSHED, domain)
    assert dig(running.dns, name) == ("NOERROR", [PUSHED["vip"]])
    digs_a = 1
    seed_services = []
    if config.registry.seed_file:
        seed = yaml.safe_load(Path(config.registry.seed_file).read_text())
        seed_services = seed["services"]
        first = seed_services[0]
        status, answers = dig(running.dns, mesh_name(first, domain))
        digs_a += 1
        assert status == "NOERROR" and len(answers) == 1, (status, answers)
        if first.get("vip"):
            assert answers == [first["vip"]]
    search = config.dns.search or ("demo.svc.cluster.local",)  # else: the test resolv.conf's
    assert dig(running.dns, f"{name}.{search[0]}") == ("NOERROR", [PUSHED["vip"]])
    digs_a += 1
    assert dig(running.dns, "no-such-service.e2e.svc.1.mesh")[0] == "NXDOMAIN"
    digs_a += 1

    # A name forwarded to unbound, twice: the second answer comes from the cache.
    for _ in range(2):
        assert dig(running.dns, FORWARDED[0]) == ("NOERROR", [FORWARDED[1]])
        digs_a += 1

    services = call(running.api, "GET", "/v1/services", token=TOKEN)
    assert services.status == 200, services.body
    assert services.json()["revision"] == revision
    ready = call(running.api, "GET", "/readyz")
    assert ready.status == 200, ready.body
    assert ready.json()["services"] == len(seed_services) + 1
    if config.api.token:  # the token its deployment gives it guards /v1
        assert call(running.api, "GET", "/v1/services").status == 401

    if running.metrics_listener is not None:
        # The probes of the manifests and the image's HEALTHCHECK ask this port.
        assert call(running.metrics_listener, "GET", "/healthz").status == 200
        ready_there = call(running.metrics_listener, "GET", "/readyz")
        assert ready_there.status == 200, ready_there.body
        assert ready_there.json()["services"] == len(seed_services) + 1
        # Open and read-only: nothing of /v1; and /metrics is no longer on the API.
        assert call(running.metrics_listener, "GET", "/v1/services",
                    token=TOKEN).status == 404
        assert call(running.api, "GET", "/metrics").status == 404

    if shipped.in_etcd:  # a heartbeat (every 2 s) that saw the write already applied
        wait_for(lambda: value(scrape(running)[1], "meshdns_etcd_connected") == 1, 30,
                 f"{shipped.source} to report its copy of etcd current")
    body, samples = scrape(running)
    promtool_check(body)
    wanted = dashboard_metrics() | rule_metrics()
    if not shipped.follows:
        wanted -= FOLLOWER_ONLY
        assert not FOLLOWER_ONLY & samples.keys(), "a non-follower exports follower metrics"
    if shipped.in_etcd:
        wanted |= ETCD_ONLY
    else:
        wanted -= ETCD_ONLY
        assert not ETCD_ONLY & samples.keys(), "a registry not in etcd exports etcd metrics"
    missing = sorted(n for n in wanted if not samples.get(n))
    assert not missing, \
        f"{shipped.source}: metrics the dashboard or alerts query, without a sample: {missing}"

    assert value(samples, "meshdns_dns_requests_total", proto="udp", qtype="A") == digs_a
    assert value(samples, "meshdns_dns_responses_total", rcode="NOERROR",
                 source="upstream") == 1
    assert value(samples, "meshdns_dns_responses_total", rcode="NOERROR",
                 source="cache") == 1
    assert value(samples, "meshdns_dns_responses_total", rcode="NXDOMAIN") == 1
    assert value(samples, "meshdns_upstream_requests_total", upstream=unbound.address,
                 result="ok") == 1
    assert value(samples, "meshdns_upstream_request_duration_seconds_count",
                 upstream=unbound.address) == 1
    assert value(samples, "meshdns_registry_services") == len(seed_services) + 1
    assert value(samples, "meshdns_registry_revision") == revision
    assert value(samples, "meshdns_registry_loaded") == 1
    assert value(samples, "meshdns_sync_requests_total", op="get", code="200") == 1
    assert value(samples, "meshdns_vip_pool_free", family="ipv4") > 0
    if shipped.follows:
        age = value(samples, "meshdns_follow_sync_age_seconds")
        assert 0 <= age < config.registry.follow_max_staleness
    if shipped.in_etcd:
        check_etcd_metrics(samples, config.registry.follow_max_staleness)
        assert writer is not None
        _, written = scrape(writer)  # the write was one transaction, by the other replica
        assert value(written, "meshdns_etcd_write_commits_total") == 1
        assert value(written, "meshdns_etcd_applied_revision") == value(
            samples, "meshdns_etcd_applied_revision")


def check_etcd_metrics(samples: dict[str, list[tuple[dict[str, str], float]]],
                       max_staleness: float) -> None:
    """The replica that did not take the write: watching, current, nothing of its own
    committed or refused."""
    assert value(samples, "meshdns_etcd_connected") == 1
    assert 0 <= value(samples, "meshdns_etcd_sync_age_seconds") < max_staleness
    assert value(samples, "meshdns_etcd_applied_revision") > 0
    assert value(samples, "meshdns_etcd_write_commits_total") == 0
    assert value(samples, "meshdns_etcd_write_unavailable_total") == 0
    assert value(samples, "meshdns_etcd_bad_keys_total") == 0


def _serves_revision(running: Running, revision: int) -> bool:
    return bool(call(running.api, "GET", "/readyz").json().get("revision") == revision)


def test_shipped_relay_passes_changes_on_to_a_shipped_follower(tmp_path: Path,
                                                               unbound: Unbound) -> None:
    """leader -> relay -> sidecar, each config as shipped (only addresses and paths
    rewritten; the sidecar's registry.follow pointed at the relay, as deploy/README.md
    says): a write to the leader is answered by the sidecar, and a second write reaches
    it as a delta served by the relay, not as a full read."""
    [leader] = leaders()
    [relay] = [s for s in SHIPPED if s.name == "k8s-relay"]
    [sidecar] = [s for s in SHIPPED if s.name == "k8s-sidecar"]
    assert relay.follows and not is_loopback(api_host(relay)), "others reach its API"
    with ExitStack() as stack:
        top = stack.enter_context(serve(leader, tmp_path, unbound.address))
        middle = stack.enter_context(serve(relay, tmp_path, unbound.address, top.api))
        edge = stack.enter_context(serve(sidecar, tmp_path, unbound.address, middle.api))
        domain = parse_config(edge.config, {}).dns.domains[0]
        second = dict(PUSHED, name="shipped-relayed", vip="240.0.0.78")
        for number, service in enumerate((PUSHED, second), 1):
            pushed = call(top.api, "PATCH", "/v1/services", {"upsert": [service]},
                          token=TOKEN)
            assert pushed.status == 200, pushed.body
            revision = pushed.json()["revision"]
            wait_for(functools.partial(_serves_revision, edge, revision), 60,
                     f"the sidecar to serve revision {revision}")
            assert dig(edge.dns, mesh_name(service, domain)) == ("NOERROR", [service["vip"]])
            assert dig(edge.dns, mesh_name(PUSHED, domain)) == ("NOERROR", [PUSHED["vip"]])
            if number == 1:
                _, first = scrape(edge)
        _, samples = scrape(edge)
        assert value(samples, "meshdns_follow_deltas_total") > value(
            first, "meshdns_follow_deltas_total"), "the second write came as a delta"
        assert value(samples, "meshdns_follow_full_syncs_total") == value(
            first, "meshdns_follow_full_syncs_total")
        _, relayed = scrape(middle)
        assert value(relayed, "meshdns_sync_requests_total", op="delta", code="200") >= 1
        # One full read each: the relay's from the leader, the sidecar's from the relay.
        _, led = scrape(top)
        for samples_of in (led, relayed):
            assert sum(value(samples_of, "meshdns_sync_requests_total", op=op, code="200")
                       for op in ("get", "watch")) == 1
