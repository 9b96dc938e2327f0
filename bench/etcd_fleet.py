"""etcd fleet: N meshdns instances watching one registry in a 3-member etcd cluster.

Every node is a real process on loopback: etcd members (tests/etcd_cluster.py) with
etcd's default limits (128 operations, 1.5 MiB per transaction; ``--raised-limits``:
the tests' 50,000 / 64 MiB) and ``python -m meshdns serve`` instances configured
with ``registry.etcd.endpoints`` (log level warning, no forwarding). The registry
(``--services`` generated services, VIPs given) is PUT through instance 0: larger
than one transaction, it is staged as a new generation and committed in one
(docs/scaling.md); the first PUT's time and instance 0's peak RSS (VmHWM) are
reported. The other instances start afterwards and list it.

Then, after one unmeasured PATCH through every instance (the first write through
an instance pays once for its lock, a pooled connection, first calls),
``--changes`` times: PATCH one new service through instance ``c % N`` (any
instance takes writes) and poll every instance's DNS for the new name
(bench/fleet.py's ``converge``: one UDP socket per node, one query per pending
node per round). Reported:

- convergence from just before the PATCH to each instance's first answer: p50, p99,
  max over all (instance, change) pairs, and the PATCH's own acknowledgement time
  (read-your-writes: the writer already answers when it says 200);
- CPU per change of each watching instance (the writer excluded): /proc schedstat
  of its process over the window (PATCH sent -> all answer, + ``--tail`` s);
  O(change) means this does not grow with ``--services``;
- the writer's CPU per change, and etcd's (all members summed).

``--profile DIR``: every change goes through instance 0, and py-spy (``pip install
py-spy``) samples instance 0 (the writer) and instance 1 (a watcher) over the
changes; the functions with the largest shares of each are printed (and written),
the collapsed stacks kept in DIR (``instance0.spy``, ``instance1.spy``).

Usage:
  python bench/etcd_fleet.py                 # 10,000 services, 20 instances, 20 changes
  python bench/etcd_fleet.py --services 100000 --instances 3 --changes 10
  python bench/etcd_fleet.py --quick         # 300 services, 4 instances, 3 changes (~20 s)
Writes bench/results/etcd_fleet.md (+ .json) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fleet
import peers
import report
from datagen import Svc, generate

from tests.etcd_cluster import EtcdCluster

LOOPBACK = peers.LOOPBACK
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[etcd-fleet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spawn_instance(workdir: Path, index: int, endpoints: list[str]) -> fleet.Node:
    dns_port, api_port = fleet.fleet_port(), fleet.fleet_port()
    name = f"i{index}"
    resolv = workdir / "resolv.conf"
    resolv.write_text("# empty: never forwards\n")
    cfg: dict[str, Any] = {
        "dns": {"listen": [f"{LOOPBACK}:{dns_port}"], "upstreams": [], "search": [],
                "resolv_conf": str(resolv)},
        "api": {"listen": f"{LOOPBACK}:{api_port}", "max_body_bytes": 1 << 30},
        "registry": {"etcd": {"endpoints": endpoints[index % len(endpoints):]
                              + endpoints[:index % len(endpoints)],
                              "request_timeout": 30}},
        "log": {"level": "warning"},
    }
    conf = workdir / f"{name}.yaml"
    conf.write_text(json.dumps(cfg, indent=1))
    logf = workdir / f"{name}.log"
    proc = peers.spawn([peers.project_python(), "-m", "meshdns", "serve", "--config",
                        str(conf)], logf, cwd=peers.REPO)
    srv = peers.Server(f"meshdns-{name}", dns_port, proc, logf, workdir, api_port=api_port)
    return fleet.Node("instance", index, srv, dns_port, api_port, None)


def wait_all(nodes: list[fleet.Node], probe_svc: Svc, timeout: float) -> None:
    for node in nodes:
        peers.wait_ready(node.server, fleet.ready_probe(node, probe_svc), timeout)


def etcd_cpu(cluster: EtcdCluster) -> float:
    return sum(fleet.task_cpu(m.proc.pid) for m in cluster.members if m.proc is not None)


def spy_on(pid: int, out: Path) -> subprocess.Popen[str]:
    """py-spy recording ``pid`` (collapsed stacks, idle threads left out) until stopped."""
    spy = shutil.which("py-spy") or str(Path(peers.project_python()).parent / "py-spy")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "500", "--format",
                             "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def spy_shares(rec: subprocess.Popen[str], raw: Path, top: int = 30) -> list[str]:
    """Stop ``rec``; the functions with the largest shares of its samples (own and with
    callees), as Markdown table lines."""
    rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=60)
    if not raw.exists():
        return [f"py-spy failed ({rec.returncode}): {err.strip()[-500:]}"]
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        # "func (/path/to/file.py:123)" -> "func (file.py)": one row per function.
        frames = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)$", r" (\1)", f)
                  for f in stack.split(";")]
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
    total = max(total, 1)
    out = [f"{total} samples at 500 Hz (threads on CPU only)", "",
           "| function | own | with callees |", "| --- | ---: | ---: |"]
    for f, _n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| `{f}` | {own.get(f, 0) / total:.1%} | {inclusive[f] / total:.1%} |")
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    services = generate(args.services)
    cluster = EtcdCluster(workdir / "etcd", args.members,
                          stock=not args.raised_limits).start()
    nodes: list[fleet.Node] = []
    try:
        first = spawn_instance(workdir, 0, cluster.endpoints)
        nodes.append(first)
        # Not ready before the first write: nothing is under the prefix yet.
        peers.wait_ready(first.server, lambda: peers.http_ok(f"{first.url}/healthz"), 60)
        t0 = time.perf_counter()
        status, body = fleet.http("PUT", f"{first.url}/v1/services",
                                  {"services": [s.to_json() for s in services]}, timeout=600)
        put_s = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"seeding PUT: HTTP {status}: {body[:300]!r}")
        writer_hwm_kb = sum(peers.proc_status_kb(p, "VmHWM") for p in first.server.pids())
        log(f"PUT {len(services)} services in {put_s:.2f} s; starting {args.instances - 1} "
            "more instances")
        t0 = time.perf_counter()
        nodes += [spawn_instance(workdir, i, cluster.endpoints)
                  for i in range(1, args.instances)]
        wait_all(nodes, services[-1], args.ready_timeout)
        list_s = time.perf_counter() - t0
        log(f"all {len(nodes)} instances answer (listing took {list_s:.2f} s for all)")
        times: list[float] = []
        acks: list[float] = []
        watcher_cpu: list[float] = []
        writer_cpu: list[float] = []
        etcd_cpus: list[float] = []
        ports = [n.dns_port for n in nodes]
        # One unmeasured PATCH through every instance first: the first write through an
        # instance pays once for what later ones reuse (its write lock, a pooled
        # connection to etcd, first calls), which is not what a change costs.
        for node in nodes:
            status, body = fleet.http("PATCH", f"{node.url}/v1/services",
                                      {"upsert": [{"name": f"warm-{node.name}",
                                                   "namespace": "bench", "port": 80}]},
                                      timeout=60)
            if status != 200:
                raise RuntimeError(f"warm-up PATCH: HTTP {status}: {body[:300]!r}")
        time.sleep(args.tail)
        spy_dir = Path(args.profile or workdir)
        spy_dir.mkdir(parents=True, exist_ok=True)
        spies = [(n, spy_dir / f"{n.name}.spy", spy_on(n.server.pid, spy_dir / f"{n.name}.spy"))
                 for n in nodes[:2]] if args.profile else []
        time.sleep(1.0 if spies else 0)  # attached before the first change
        for c in range(args.changes):
            writer = nodes[0 if args.profile else c % len(nodes)]
            svc = {"name": f"change{c}", "namespace": "bench", "port": 80}
            before = [fleet.node_cpu(n) for n in nodes]
            e_before = etcd_cpu(cluster)
            t0 = time.perf_counter()
            status, body = fleet.http("PATCH", f"{writer.url}/v1/services",
                                      {"upsert": [svc]}, timeout=60)
            ack = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"PATCH: HTTP {status}: {body[:300]!r}")
            got = fleet.converge(ports, f"change{c}.bench.svc.80.mesh", t0,
                                 time.perf_counter() + args.timeout, args.interval)
            time.sleep(args.tail)
            after = [fleet.node_cpu(n) for n in nodes]
            etcd_cpus.append(etcd_cpu(cluster) - e_before)
            missing = [nodes[i].name for i, t in enumerate(got) if t is None]
            if missing:
                raise RuntimeError(f"change {c}: never answered by {missing}")
            times += [t for t in got if t is not None]
            acks.append(ack)
            for i, node in enumerate(nodes):
                (writer_cpu if node is writer else watcher_cpu).append(after[i] - before[i])
            log(f"change {c} via {writer.name}: ack {ack * 1000:.0f} ms, all answer in "
                f"{max(t for t in got if t is not None) * 1000:.0f} ms")
        profiles = {("writer " if i == 0 else "watcher ") + n.name: spy_shares(rec, raw)
                    for i, (n, raw, rec) in enumerate(spies)}
        return {
            "profiles": profiles,
            "services": args.services, "instances": args.instances, "members": args.members,
            "changes": args.changes, "put_seconds": put_s, "list_seconds_all": list_s,
            "converge_p50": fleet.pct(times, 50), "converge_p99": fleet.pct(times, 99),
            "converge_max": max(times), "ack_p50": fleet.pct(acks, 50),
            "watcher_cpu_median": statistics.median(watcher_cpu),
            "watcher_cpu_p99": fleet.pct(watcher_cpu, 99),
            "writer_cpu_median": statistics.median(writer_cpu),
            "etcd_cpu_median": statistics.median(etcd_cpus),
            "rss_kb_median": statistics.median(n.server.rss_kb() for n in nodes),
            "put_peak_rss_kb": writer_hwm_kb,
            "peak_rss_kb_max": max(sum(peers.proc_status_kb(p, "VmHWM")
                                       for p in n.server.pids()) for n in nodes),
            "etcd_limits": "raised (50,000 ops, 64 MiB)" if args.raised_limits
            else "stock (128 ops, 1.5 MiB)",
        }
    finally:
        fleet.stop_nodes(nodes)
        cluster.stop()


def render(r: dict[str, Any]) -> str:
    ms = fleet.ms
    return "\n".join([
        f"# etcd fleet: {r['services']:,} services, {r['instances']} meshdns instances, "
        f"{r['members']}-member etcd ({r.get('etcd_limits', 'raised limits')}), "
        f"{r['changes']} one-service changes",
        "",
        f"`{r['command']}` on {r['machine']}",
        "",
        "| | value |",
        "|---|---:|",
        f"| first PUT of the registry (staged generation) | {r['put_seconds']:.2f} s |",
        f"| peak RSS of the writing instance after it (VmHWM) | "
        f"{r.get('put_peak_rss_kb', 0) / 1024:.0f} MiB |",
        f"| every other instance started and listed it | {r['list_seconds_all']:.2f} s |",
        f"| change -> every instance answers: p50 / p99 / max | {ms(r['converge_p50'])} / "
        f"{ms(r['converge_p99'])} / {ms(r['converge_max'])} |",
        f"| PATCH acknowledged (writer already answers): p50 | {ms(r['ack_p50'])} |",
        f"| CPU per change, each watching instance: median / p99 | "
        f"{r['watcher_cpu_median'] * 1000:.2f} ms / {r['watcher_cpu_p99'] * 1000:.2f} ms |",
        f"| CPU per change, the writing instance (median) | "
        f"{r['writer_cpu_median'] * 1000:.2f} ms |",
        f"| CPU per change, etcd (all members, median) | {r['etcd_cpu_median'] * 1000:.2f} ms |",
        f"| instance RSS (median) / peak RSS (max over instances) | "
        f"{r['rss_kb_median'] / 1024:.1f} MiB / {r.get('peak_rss_kb_max', 0) / 1024:.0f} MiB |",
        "",
        "CPU windows run from the PATCH to every answer plus the tail, so they include "
        "each instance's heartbeat (one range read every 2 s) when one falls inside.",
        "",
        *[line for who, lines in r.get("profiles", {}).items()
          for line in (f"### py-spy: {who}, over the {r['changes']} changes", "", *lines, "")],
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.002, help="probe round, s")
    ap.add_argument("--timeout", type=float, default=30.0, help="per change, s")
    ap.add_argument("--tail", type=float, default=0.2, help="CPU window after the last answer")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="300 services, 4 instances, 3 changes")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", metavar="DIR", default="",
                    help="changes through instance 0; py-spy on it and on instance 1, "
                    "their collapsed stacks written to DIR")
    ap.add_argument("--raised-limits", action="store_true",
                    help="etcd with --max-txn-ops 50000 --max-request-bytes 64 MiB")
    args = ap.parse_args()
    if args.quick:
        args.services, args.instances, args.changes = 300, 4, 3
    with tempfile.TemporaryDirectory(prefix="meshdns-etcd-fleet-") as tmp:
        result = run(args, Path(tmp))
    result["command"] = "python bench/etcd_fleet.py " + shlex.join(sys.argv[1:])
    result["machine"] = f"{report.cpu_model()} ({os.cpu_count()} CPUs, shared)"
    text = render(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        name = "etcd_fleet" if args.services < 100000 else "etcd_fleet_100k"
        (RESULTS / f"{name}.md").write_text(text)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
