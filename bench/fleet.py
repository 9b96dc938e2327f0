"""Fleet: one leader, N followers (flat) or leader -> R relays -> N followers (tree).

Every node is a real ``python -m meshdns serve`` process on loopback, with its
own DNS port and API port on 127.0.0.1, its own config file (``dns.upstreams:
[]`` and an empty ``dns.resolv_conf``, so nothing is ever forwarded; log level
warning) and its own process group. The leader is seeded with ``--services``
generated services; a relay follows the leader (``registry.follow``); a
follower follows the leader (flat) or one relay (tree, round-robin). Nodes are
started in batches, each waited for until ``GET /readyz`` is 200 and its DNS
answers a seeded name with the leader's VIP.

Followers sync by deltas (``GET /v1/services?since=N&lineage=L&wait=30``): after
a first full read, each change reaches a follower as the few services it
touched, applied with the incremental PATCH (docs/scaling.md).

Then, ``--changes`` times: PATCH one new service on the leader and poll every
follower's (and relay's) DNS for the new name concurrently -- one UDP socket
per node, one query per pending node per round, the round interval chosen so
the whole probe stays under ``--probe-rate`` queries/s (the resolution of a
convergence time is that interval). A node's convergence time is from just
before the PATCH is sent to the first reply that answers the name (NOERROR
with an answer). Reported over all (follower, change) pairs: p50, p99, max.

Measured on the leader during each change window (PATCH sent -> every
follower answers, plus ``--tail`` s so the followers' re-polls are counted):
CPU seconds of its process group (schedstat), the bytes it sent on its API
port (``ss -ti`` bytes_sent of each established connection: response headers
and bodies, TCP payload), and, before
the change, the open watches: established TCP connections whose local port is
the leader's API port (/proc/net/tcp; a follower keeps one keep-alive
connection and parks a ``?wait=30`` GET on it). The sum of the followers' and
relays' CPU over the window is recorded too (the adoption work), and per node
(follower CPU per change). At the end each follower's /metrics says how many
deltas, full reads and re-lists (410) it did.

Bounded: ``--time-limit`` for the whole run (SIGALRM backstop), a
convergence timeout per change, every process killed at the end of each
topology and on any exit (process groups; bench/peers.py).

Usage:
  python bench/fleet.py --quick                        # 3 followers, 300 services: a check
  python bench/fleet.py                                # 50 followers, flat and tree
  python bench/fleet.py --followers 50 200 --services 10000 100000   # issue 15's matrix
      (a size whose nodes would not fit in MemAvailable is skipped and listed as such)
  python bench/fleet.py --followers 50 --services 100000 --out fleet_100k
  python bench/fleet.py --followers 200 --topology tree --relays 14 --changes 5
Writes bench/results/fleet.md (+ fleet.json) unless --no-write.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peers
import report
from datagen import Svc, generate, write_meshdns_seed

LOOPBACK = peers.LOOPBACK
MAX_FOLLOWERS = 200
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class OverTime(Exception):
    """The run's --time-limit passed."""


# ---------------------------------------------------------------- nodes


@dataclass
class Node:
    role: str  # leader | relay | follower
    index: int
    server: peers.Server
    dns_port: int
    api_port: int
    upstream: str | None  # the URL it follows

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.api_port}"

    @property
    def name(self) -> str:
        return self.role if self.role == "leader" else f"{self.role}{self.index}"


def node_config(workdir: Path, name: str, dns_port: int, api_port: int, *,
                follow: str | None, seed: Path | None, max_watchers: int) -> Path:
    resolv = workdir / "resolv.conf"
    if not resolv.exists():
        resolv.write_text("# empty: the fleet bench never forwards\n")
    cfg: dict[str, Any] = {
        "dns": {"listen": [f"{LOOPBACK}:{dns_port}"], "upstreams": [], "search": [],
                "resolv_conf": str(resolv)},
        "api": {"listen": f"{LOOPBACK}:{api_port}", "max_watchers": max_watchers},
        "registry": {"follow": follow, "seed_file": str(seed) if seed else None},
        "log": {"level": "warning"},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(cfg, indent=1))  # JSON is valid YAML
    return path


_TAKEN: set[int] = set()


def fleet_port() -> int:
    """A loopback port free for UDP and TCP, below the kernel's ephemeral range.

    peers.free_port() hands out ephemeral ports, and with hundreds of nodes the
    followers' own outgoing connections (and the probe's sockets) may take one
    between the check and the node's bind; ports under the ephemeral range are
    never picked by the kernel.
    """
    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    lo = max(lo, 12000)
    for _ in range(1000):
        port = random.randrange(10000, lo)
        if port in _TAKEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((LOOPBACK, port))
                t.bind((LOOPBACK, port))
        except OSError:
            continue
        _TAKEN.add(port)
        return port
    return peers.free_port()


def spawn_node(workdir: Path, role: str, index: int, *, follow: str | None,
               seed: Path | None, max_watchers: int) -> Node:
    dns_port, api_port = fleet_port(), fleet_port()
    name = role if role == "leader" else f"{role}{index}"
    conf = node_config(workdir, name, dns_port, api_port, follow=follow, seed=seed,
                       max_watchers=max_watchers)
    logf = workdir / f"{name}.log"
    proc = peers.spawn([peers.project_python(), "-m", "meshdns", "serve", "--config",
                        str(conf)], logf, cwd=peers.REPO)
    srv = peers.Server(f"meshdns-{name}", dns_port, proc, logf, workdir, api_port=api_port)
    return Node(role, index, srv, dns_port, api_port, follow)


def ready_probe(node: Node, svc: Svc) -> Any:
    dns_ok = peers.answers_probe(node.dns_port, svc)

    def probe() -> bool:
        return peers.http_ok(f"{node.url}/readyz", timeout=1.0) and dns_ok()
    return probe


def start_batch(workdir: Path, role: str, indexes: range, follows: list[str], seed_svc: Svc,
                max_watchers: int, ready_timeout: float) -> list[Node]:
    def spawn(i: int) -> Node:
        return spawn_node(workdir, role, i, follow=follows[i % len(follows)], seed=None,
                          max_watchers=max_watchers)

    nodes = [spawn(i) for i in indexes]
    for k, node in enumerate(nodes):
        for attempt in range(3):
            try:
                peers.wait_ready(node.server, ready_probe(node, seed_svc), ready_timeout)
                break
            except peers.ServerFailed as exc:
                # A port taken by someone else between the check and the bind: new ports.
                if "address already in use" not in str(exc) or attempt == 2:
                    stop_nodes(nodes)
                    raise
                log(f"{node.name}: port taken, restarting it on new ports")
                node.server.stop()
                node = nodes[k] = spawn(node.index)
    return nodes


def stop_nodes(nodes: list[Node]) -> None:
    """SIGTERM every group at once, then reap (SIGKILL what is left): peers._kill_group."""
    if not nodes:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, len(nodes))) as pool:
        list(pool.map(lambda n: n.server.stop(), nodes))


# ---------------------------------------------------------------- leader side


def http(method: str, url: str, body: dict[str, Any] | None = None,
         timeout: float = 60.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (server side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "01" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def bytes_sent(port: int) -> dict[str, int]:
    """TCP payload bytes sent so far on each established connection from local ``port``
    (``ss -ti``: bytes_sent, retransmits included), by peer address."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    sent: dict[str, int] = {}
    peer = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            peer = fields[-1] if fields else None
        elif peer is not None:
            for item in line.split():
                if item.startswith("bytes_sent:"):
                    sent[peer] = int(item.split(":", 1)[1])
    return sent


def sent_between(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes sent between two ``bytes_sent`` samples (connections opened meanwhile count
    whole; ones closed meanwhile are lost: followers keep theirs open)."""
    return sum(n - before.get(peer, 0) for peer, n in after.items())


def follow_counts(node: Node) -> dict[str, float]:
    """How the node synced: deltas applied, full reads, 410 re-lists (its /metrics)."""
    status, text = http("GET", f"{node.url}/metrics", timeout=10)
    out = {"deltas": 0.0, "full_syncs": 0.0, "relists": 0.0}
    if status != 200:
        return out
    for line in text.decode(errors="replace").splitlines():
        for key in out:
            if line.startswith(f"meshdns_follow_{key}_total "):
                out[key] = float(line.split()[1])
    return out


# ---------------------------------------------------------------- DNS probe


def query_packet(name: str, qid: int) -> bytes:
    """A plain (no EDNS) RD=0 query for ``name`` A, with the given ID."""
    qname = b"".join(len(label).to_bytes(1, "big") + label.encode("ascii")
                     for label in name.rstrip(".").split(".")) + b"\x00"
    return qid.to_bytes(2, "big") + b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + \
        b"\x00\x01\x00\x01"


def converge(ports: list[int], name: str, t0: float, deadline: float,
             interval: float) -> list[float | None]:
    """Seconds after ``t0`` at which each port first answered ``name`` (None: never).

    One non-blocking UDP socket per node; every ``interval`` one query goes to each
    node that has not answered yet; replies are timestamped when read.
    """
    n = len(ports)
    got: list[float | None] = [None] * n
    sel = selectors.DefaultSelector()
    socks = []
    qids = [random.randrange(1, 65536) for _ in range(n)]
    packets = [query_packet(name, q) for q in qids]
    try:
        for i, port in enumerate(ports):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((LOOPBACK, port))
            sel.register(s, selectors.EVENT_READ, i)
            socks.append(s)
        pending = set(range(n))
        next_round = time.perf_counter()
        while pending:
            now = time.perf_counter()
            if now >= deadline:
                break
            if now >= next_round:
                for i in pending:
                    # refused (node gone) or buffer full: it gets the next round
                    with contextlib.suppress(OSError):
                        socks[i].send(packets[i])
                next_round = now + interval
            timeout = max(0.0, min(next_round, deadline) - time.perf_counter())
            for key, _ in sel.select(timeout):
                i = key.data
                while True:
                    try:
                        data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if got[i] is None and len(data) >= 12 and \
                            int.from_bytes(data[:2], "big") == qids[i] and \
                            data[3] & 0x0F == 0 and int.from_bytes(data[6:8], "big") > 0:
                        got[i] = time.perf_counter() - t0
                        pending.discard(i)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return got


# ---------------------------------------------------------------- stats


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    k = max(0, min(len(ys) - 1, math.ceil(p / 100 * len(ys)) - 1))
    return ys[k]


def ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x * 1000:,.0f} ms"


# ---------------------------------------------------------------- one topology


@dataclass
class Fleet:
    leader: Node
    relays: list[Node] = field(default_factory=list)
    followers: list[Node] = field(default_factory=list)
    alone_cpu: list[float] = field(default_factory=list)  # leader CPU per PATCH, no watchers

    def all(self) -> list[Node]:
        return [self.leader, *self.relays, *self.followers]


def leader_alone(leader: Node, changes: int, tail: float) -> list[float]:
    """Leader CPU per PATCH + one delta GET (+ tail) with nobody watching: the change's own
    cost and one encode of its delta; what watchers add comes on top of this."""
    out = []
    for k in range(changes):
        cpu0 = node_cpu(leader)
        status, text = http("PATCH", f"{leader.url}/v1/services",
                            {"upsert": [{"name": f"alone{k}", "namespace": "fleet", "port": 80}]})
        if status != 200:
            raise RuntimeError(f"PATCH failed: {status} {text[:300]!r}")
        revision = json.loads(text)["revision"]
        # The delta encoded once, sent once.
        http("GET", f"{leader.url}/v1/services?since={revision - 1}")
        time.sleep(tail)
        out.append(node_cpu(leader) - cpu0)
    return out


def build(workdir: Path, topology: str, n: int, r: int, services: list[Svc], batch: int,
          deadline: float, changes: int, tail: float) -> Fleet:
    seed = write_meshdns_seed(workdir / "seed.json", services)
    watchers = max(1000, 4 * n)
    leader = spawn_node(workdir, "leader", 0, follow=None, seed=seed, max_watchers=watchers)
    fleet = Fleet(leader)
    try:
        peers.wait_ready(leader.server, ready_probe(leader, services[0]), 300)
        log(f"leader up: dns {leader.dns_port}, api {leader.api_port}, "
            f"{len(services)} services, pid {leader.server.pid}")
        fleet.alone_cpu = leader_alone(leader, changes, tail)
        log(f"leader alone: {statistics.median(fleet.alone_cpu) * 1000:.1f} ms CPU per "
            "PATCH (median, no followers yet)")
        upstreams = [leader.url]
        if topology == "tree":
            for lo in range(0, r, batch):
                check_time(deadline)
                fleet.relays += start_batch(workdir, "relay", range(lo, min(r, lo + batch)),
                                            [leader.url], services[0], watchers, 300)
            log(f"{r} relays up")
            upstreams = [x.url for x in fleet.relays]
        t_start = time.monotonic()
        for lo in range(0, n, batch):
            check_time(deadline)
            fleet.followers += start_batch(workdir, "follower", range(lo, min(n, lo + batch)),
                                           upstreams, services[0], watchers, 300)
            log(f"{len(fleet.followers)}/{n} followers up "
                f"({time.monotonic() - t_start:.0f} s)")
    except BaseException:
        stop_nodes(fleet.all())
        raise
    return fleet


def check_time(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise OverTime("over --time-limit")


def task_cpu(pid: int) -> float:
    """On-CPU seconds of every live thread of ``pid`` (schedstat: ns, not 10 ms ticks).

    Falls back to /proc/PID/stat when schedstat is missing (no CONFIG_SCHEDSTATS).
    """
    total, seen = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            seen = True
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9 if seen else peers.cpu_seconds(pid)


def node_cpu(node: Node) -> float:
    return sum(task_cpu(pid) for pid in node.server.pids())


def group_cpu(nodes: list[Node]) -> float:
    return sum(node_cpu(node) for node in nodes)


def wait_watches(port: int, expected: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    seen = established(port)
    while seen < expected and time.monotonic() < end:
        time.sleep(0.1)
        seen = established(port)
    return seen


def measure(fleet: Fleet, topology: str, changes: int, args: argparse.Namespace,
            deadline: float, run_id: str, services: int) -> dict[str, Any]:
    leader = fleet.leader
    n, r = len(fleet.followers), len(fleet.relays)
    expected_leader = r if topology == "tree" else n
    targets = fleet.followers + fleet.relays
    ports = [t.dns_port for t in targets]
    interval = max(args.min_interval, len(ports) / args.probe_rate)
    status, body = http("GET", f"{leader.url}/v1/services")
    body_bytes = len(body) if status == 200 else 0
    # Idle: what the parked watches cost the leader with no change at all.
    idle0, t_idle = node_cpu(leader), time.perf_counter()
    time.sleep(args.idle)
    idle_cpu = node_cpu(leader) - idle0
    idle_window = time.perf_counter() - t_idle
    per_change = []
    for k in range(changes):
        check_time(deadline)
        watches_before = wait_watches(leader.api_port, expected_leader, 10.0)
        relay_watches = [established(x.api_port) for x in fleet.relays]
        name = f"fleet{run_id}c{k}"
        svc = {"name": name, "namespace": "fleet", "port": 80}
        fqdn = f"{name}.fleet.svc.80.mesh"
        cpu_leader0 = node_cpu(leader)
        cpu_rest0 = group_cpu(fleet.relays + fleet.followers)
        sent0 = bytes_sent(leader.api_port)
        ack: dict[str, Any] = {}

        def patch(svc: dict[str, Any] = svc, ack: dict[str, Any] = ack) -> None:
            status, text = http("PATCH", f"{leader.url}/v1/services", {"upsert": [svc]})
            ack["status"], ack["at"], ack["body"] = status, time.perf_counter(), text[:300]

        t0 = time.perf_counter()
        th = threading.Thread(target=patch, daemon=True)
        th.start()
        stop = min(t0 + args.converge_timeout,
                   time.perf_counter() + max(1.0, deadline - time.monotonic()))
        got = converge(ports, fqdn, t0, stop, interval)
        th.join(30)
        if ack.get("status") != 200:
            raise RuntimeError(f"PATCH failed: {ack}")
        time.sleep(args.tail)  # the followers' re-polls land on the leader here
        window = time.perf_counter() - t0
        cpu_leader = node_cpu(leader) - cpu_leader0
        cpu_rest = group_cpu(fleet.relays + fleet.followers) - cpu_rest0
        leader_sent = sent_between(sent0, bytes_sent(leader.api_port))
        watches_after = established(leader.api_port)
        fol = [g for g in got[:n] if g is not None]
        rel = [g for g in got[n:] if g is not None]
        missed = n - len(fol)
        rec = {
            "change": k, "name": fqdn, "patch_ack_s": ack["at"] - t0,
            "follower_s": got[:n], "relay_s": got[n:],
            "p50_s": pct(fol, 50), "p99_s": pct(fol, 99), "max_s": max(fol) if fol else None,
            "first_s": min(fol) if fol else None, "missed": missed,
            "relay_max_s": max(rel) if rel else None,
            "window_s": window, "leader_cpu_s": cpu_leader, "fleet_cpu_s": cpu_rest,
            "follower_cpu_s": cpu_rest / max(1, n + r), "leader_bytes": leader_sent,
            "leader_watches_before": watches_before, "leader_watches_after": watches_after,
            "relay_watches_before": relay_watches,
        }
        per_change.append(rec)
        log(f"  {topology} n={n} change {k + 1}/{changes}: PATCH ack {rec['patch_ack_s'] * 1000:.0f} ms, "
            f"followers p50 {ms(rec['p50_s'])} max {ms(rec['max_s'] or float('nan'))}"
            f"{f' ({missed} missed)' if missed else ''}, leader CPU {cpu_leader * 1000:.0f} ms, "
            f"fleet CPU {cpu_rest:.2f} s ({cpu_rest / max(1, n + r) * 1000:.1f} ms/node), "
            f"leader sent {leader_sent:,} B, "
            f"watches {watches_before}")
        time.sleep(args.settle)
    all_fol = [g for c in per_change for g in c["follower_s"] if g is not None]
    rss = {x.name: x.server.rss_kb() for x in fleet.all()}
    fol_rss = [rss[x.name] for x in fleet.followers]
    leader_cpu = [c["leader_cpu_s"] for c in per_change]
    sync = [follow_counts(x) for x in fleet.relays + fleet.followers]
    leader_bytes = statistics.mean(c["leader_bytes"] for c in per_change)
    out = {
        "topology": topology, "followers": n, "relays": r, "services": services,
        "follower_cpu_per_change_s": statistics.mean(c["follower_cpu_s"] for c in per_change),
        "leader_bytes_per_change": leader_bytes,
        "leader_bytes_per_change_per_watch": leader_bytes / max(1, expected_leader),
        "sync": {k: sum(x[k] for x in sync) for k in ("deltas", "full_syncs", "relists")},
        "body_bytes": body_bytes, "probe_interval_s": interval, "changes": per_change,
        "p50_s": pct(all_fol, 50), "p99_s": pct(all_fol, 99),
        "max_s": max(all_fol) if all_fol else None,
        "missed": sum(c["missed"] for c in per_change),
        "patch_ack_median_s": statistics.median(c["patch_ack_s"] for c in per_change),
        "leader_cpu_per_change_s": statistics.mean(leader_cpu),
        "leader_cpu_per_change_max_s": max(leader_cpu),
        "leader_alone_cpu_s": statistics.median(fleet.alone_cpu),
        "leader_cpu_per_watcher_per_change_ms":
            max(0.0, statistics.mean(leader_cpu) - statistics.median(fleet.alone_cpu))
            / max(1, expected_leader) * 1000,
        "fleet_cpu_per_change_s": statistics.mean(c["fleet_cpu_s"] for c in per_change),
        "window_mean_s": statistics.mean(c["window_s"] for c in per_change),
        "leader_idle_cpu_s": idle_cpu, "leader_idle_window_s": idle_window,
        "leader_watches": statistics.median(c["leader_watches_before"] for c in per_change),
        "relay_watches": [c["relay_watches_before"] for c in per_change][-1],
        "relay_max_s": max((c["relay_max_s"] or 0.0) for c in per_change) if r else None,
        "rss_kb": {"leader": rss["leader"],
                   "follower_median": statistics.median(fol_rss) if fol_rss else 0,
                   "relay_median": statistics.median(rss[x.name] for x in fleet.relays)
                   if fleet.relays else 0,
                   "total": sum(rss.values())},
    }
    return out


def run_topology(topology: str, n: int, r: int, services: list[Svc],
                 args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"meshdns-fleet-{topology}{n}-") as tmp:
        workdir = Path(tmp)
        log(f"== {topology}: {n} followers" + (f" via {r} relays" if topology == "tree" else "")
            + f", {len(services)} services")
        t0 = time.monotonic()
        fleet = build(workdir, topology, n, r, services, args.batch, deadline, args.changes,
                      args.tail)
        started = time.monotonic() - t0
        try:
            res = measure(fleet, topology, args.changes, args, deadline,
                          f"{topology[0]}{n}s{len(services)}", len(services))
            res["startup_s"] = started
            dead = [x.name for x in fleet.all() if not x.server.alive()]
            if dead:
                res["died"] = dead
            return res
        finally:
            log(f"stopping {len(fleet.all())} processes")
            stop_nodes(fleet.all())


# ---------------------------------------------------------------- report


def render(results: list[dict[str, Any]], args: argparse.Namespace, elapsed: float,
           machine: str) -> str:
    rows = []
    for res in results:
        watches = str(round(res["leader_watches"]))
        if res["relays"]:
            rw = res["relay_watches"]
            watches += f" (each relay {min(rw)}-{max(rw)})" if rw else ""
        missed = f" ({res['missed']} missed)" if res["missed"] else ""
        sync = res["sync"]
        rows.append([
            res["topology"], f"{res['services']:,}", res["followers"], res["relays"] or "—",
            ms(res["p50_s"]), ms(res["p99_s"]), ms(res["max_s"] or float("nan")) + missed,
            f"{res['follower_cpu_per_change_s'] * 1000:,.2f} ms",
            f"{res['leader_bytes_per_change']:,.0f} B "
            f"({res['leader_bytes_per_change_per_watch']:,.0f} B/watch)",
            f"{sync['deltas']:,.0f} / {sync['full_syncs']:,.0f} / {sync['relists']:,.0f}",
            f"{res['leader_cpu_per_change_s'] * 1000:,.1f} ms",
            f"{res['leader_alone_cpu_s'] * 1000:,.1f} ms",
            f"{res['leader_cpu_per_watcher_per_change_ms']:.2f} ms",
            f"{res['fleet_cpu_per_change_s']:.2f} s",
            watches,
        ])
    rss_rows = [[r["topology"], f"{r['services']:,}", r["followers"], r["relays"] or "—",
                 report.fmt_kb(r["rss_kb"]["leader"]),
                 report.fmt_kb(r["rss_kb"]["relay_median"]) if r["relays"] else "—",
                 report.fmt_kb(r["rss_kb"]["follower_median"]),
                 f"{r['rss_kb']['total'] / 1024 / 1024:.1f} GiB", f"{r['startup_s']:.0f} s"]
                for r in results]
    bodies = ", ".join(sorted({f"{r['services']:,} services: "
                               f"{r['body_bytes'] / 1024:,.0f} KiB" for r in results}))
    interval_txt = ", ".join(f"{r['topology']}/{r['followers']}: "
                             f"{r['probe_interval_s'] * 1000:.0f} ms" for r in results)
    idle = ", ".join(f"{r['topology']}/{r['followers']}: {r['leader_idle_cpu_s'] * 1000:.0f} ms "
                     f"in {r['leader_idle_window_s']:.0f} s" for r in results)
    notes = []
    for r in results:
        if r.get("died"):
            notes.append(f"- {r['topology']}/{r['followers']}: processes died: {r['died']}")
        typical = statistics.median(c["fleet_cpu_s"] for c in r["changes"])
        heavy = [c for c in r["changes"] if c["fleet_cpu_s"] > 1.8 * typical]
        rest = [c["max_s"] or 0.0 for c in r["changes"] if c not in heavy]
        if heavy:
            which = ", ".join(f"{c['change'] + 1} (fleet CPU {c['fleet_cpu_s']:.2f} s, "
                              f"max {ms(c['max_s'] or float('nan'))})" for c in heavy)
            notes.append(f"- {r['topology']}/{r['followers']}: change {which} cost the "
                         f"followers over 1.8x the median change ({typical:.2f} s): every "
                         "follower did extra work at the same moment; without it, max "
                         f"convergence was {ms(max(rest) if rest else float('nan'))} "
                         "(see docs/scaling.md).")
        if r["relays"] and r["relay_max_s"] is not None:
            notes.append(f"- {r['topology']}/{r['followers']}: the relays themselves had the "
                         f"name after at most {ms(r['relay_max_s'])}.")
    per_change = []
    for r in results:
        for c in r["changes"]:
            per_change.append([
                r["topology"], f"{r['services']:,}", r["followers"], c["change"] + 1,
                f"{c['patch_ack_s'] * 1000:.0f} ms", ms(c["first_s"] or float("nan")),
                ms(c["p50_s"]), ms(c["max_s"] or float("nan")),
                f"{c['leader_cpu_s'] * 1000:.0f} ms", f"{c['leader_bytes']:,} B",
                f"{c['fleet_cpu_s']:.2f} s",
                f"{c['window_s']:.2f} s"])
    return "\n".join([
        "## Fleet: one leader, many followers (convergence after a change)",
        "",
        f"`{report.command_line()}` — {elapsed / 60:.1f} min.",
        "",
        machine,
        "",
        "Method: the leader is seeded with "
        f"generated services (full GET body, uncompressed: {bodies}); "
        "a follower has `registry.follow` = the leader (flat) or one relay (tree, "
        "round-robin), a relay follows the leader; after one full read each follower "
        "long-polls for deltas, `GET /v1/services?since=N&lineage=L&wait=30` "
        "(changes coalesced for `api.follow_coalesce`, default 100 ms, per hop), and "
        "applies them with the incremental PATCH. Nodes start in batches of "
        f"{args.batch}, each ready when `/readyz` is 200 and its DNS answers a seeded "
        f"name. Then {args.changes} times: PATCH one new service on the leader and "
        "poll every follower's (and relay's) DNS for it over UDP, all nodes concurrently "
        "from one selector loop, one query per pending node per round (round interval: "
        f"{interval_txt}; that is the resolution). Convergence = PATCH sent → the "
        "follower's first answer for the new name; p50/p99/max over all "
        "(follower, change) pairs. Leader CPU = CPU time of the leader process over "
        f"the change window (PATCH sent → every follower answers, + {args.tail:g} s so "
        "the re-polls count), mean per change. *Change alone* = the leader's CPU for the "
        "same PATCH plus one delta GET (one encode of the change) before any follower "
        "started; *per watch* = (per change - change alone) ÷ watches on the leader: "
        "what each parked watcher adds to a change (wake it, send it the body, "
        "accept the re-poll). Fleet CPU = the same for all followers and relays together (the "
        "adoption work: parse the delta, patch the registry, publish); *follower CPU per "
        "change* is that ÷ followers and relays. *Leader bytes* = TCP payload the leader "
        "sent on its API port over the window (`ss -ti` bytes_sent per connection: "
        "headers and bodies), and that ÷ watches on the leader. *Syncs* = deltas "
        "applied / full reads / 410 re-lists, summed over followers and relays from their "
        "/metrics at the end (one full read each is the start). Open watches = "
        "established TCP connections on the leader's API port (`/proc/net/tcp`), "
        "before each change.",
        "",
        report.table(["topology", "services", "followers", "relays", "p50", "p99", "max",
                      "follower CPU per change", "leader bytes per change",
                      "syncs (delta / full / 410)",
                      "leader CPU per change", "of which change alone", "leader CPU per watch",
                      "fleet CPU per change", "open watches on leader"], rows,
                     "lrrrrrrrrrrrrrl"),
        "",
        "Memory (VmRSS after the run) and start-up (all nodes ready):",
        "",
        report.table(["topology", "services", "followers", "relays", "leader",
                      "relay (median)", "follower (median)", "all processes", "start-up"],
                     rss_rows, "lrrrrrrrr"),
        "",
        f"- Leader CPU with every watch parked and no change (idle): {idle}.",
        *notes,
        "",
        "<details><summary>Per change</summary>",
        "",
        report.table(["topology", "services", "followers", "change", "PATCH ack",
                      "first follower", "p50", "max", "leader CPU", "leader bytes",
                      "fleet CPU", "window"], per_change, "lrrrrrrrrrrr"),
        "",
        "</details>",
        "",
        "Reading: this is one machine, so every follower's adoption work competes for "
        f"the same {os.cpu_count()} CPUs; the convergence spread here is mostly that "
        "queue (fleet CPU per change ÷ CPUs) plus the coalescing window per hop, not "
        "the network or the leader. In a "
        "real mesh each sidecar adopts on its own node, in parallel. The leader's own "
        "cost per change is the column to project from; see docs/scaling.md.",
    ])


# ---------------------------------------------------------------- main


# VmRSS of one node (measured, bench/results/fleet.md and sync.md): ~45 MiB empty plus
# ~1.7 KiB per service (a follower's delta history and parse buffers included).
NODE_BASE_BYTES = 45 << 20
NODE_PER_SERVICE_BYTES = 1700


def fleet_memory(services: int, nodes: int) -> int:
    """What ``nodes`` meshdns processes of ``services`` services take, with 10% headroom."""
    return int(nodes * (NODE_BASE_BYTES + services * NODE_PER_SERVICE_BYTES) * 1.1)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # pragma: no cover - not Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--followers", type=int, nargs="+", default=[50],
                    help=f"fleet sizes to run, each 1..{MAX_FOLLOWERS} (default 50)")
    ap.add_argument("--topology", choices=("flat", "tree", "both"), default="both")
    ap.add_argument("--relays", type=int, default=0,
                    help="relays in the tree (default round(sqrt(followers)))")
    ap.add_argument("--services", type=int, nargs="+", default=[1000],
                    help="registry sizes to run (default 1000)")
    ap.add_argument("--quick", action="store_true",
                    help="a check that the bench works: 3 followers, 300 services, 2 changes, "
                         "short pauses, nothing written")
    ap.add_argument("--changes", type=int, default=5, help="PATCHes measured per topology")
    ap.add_argument("--batch", type=int, default=25, help="nodes started at once")
    ap.add_argument("--probe-rate", type=float, default=4000.0,
                    help="DNS probe queries/s over all nodes at most (default 4000)")
    ap.add_argument("--min-interval", type=float, default=0.01,
                    help="shortest probe round, s (default 0.01)")
    ap.add_argument("--converge-timeout", type=float, default=60.0)
    ap.add_argument("--tail", type=float, default=0.5,
                    help="s added to each change window after the last follower answers")
    ap.add_argument("--settle", type=float, default=1.0, help="s between changes")
    ap.add_argument("--idle", type=float, default=3.0, help="s of idle leader CPU sampled")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="whole run, s")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default="fleet",
                    help="result name: bench/results/OUT.md and OUT.json (default fleet)")
    args = ap.parse_args()
    if args.quick:
        args.followers, args.services, args.changes, args.relays = [3], [300], 2, 1
        args.idle, args.settle, args.tail, args.no_write = 0.5, 0.2, 0.3, True
        args.time_limit = min(args.time_limit, 300.0)
    for n in args.followers:
        if not 1 <= n <= MAX_FOLLOWERS:
            ap.error(f"--followers must be 1..{MAX_FOLLOWERS}, got {n}")
    topologies = ("flat", "tree") if args.topology == "both" else (args.topology,)
    for key in [k for k in os.environ if k.startswith("MESHDNS_")]:
        del os.environ[key]  # no token or config from the caller's environment

    machine = report.machine_md({
        "processes": "every node is a real `python -m meshdns serve` on 127.0.0.1 (own DNS "
                     "and API port, own config, no upstreams, empty resolv.conf, log level "
                     "warning, its own process group)"})  # the load average before we start
    t_begin = time.monotonic()
    deadline = t_begin + args.time_limit

    def alarm(signum: int, frame: Any) -> None:
        raise OverTime(f"--time-limit {args.time_limit:.0f} s (+60 s) passed")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(args.time_limit) + 60)  # backstop for a step stuck past the checks
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        for size in args.services:
            services = generate(size)
            for n in args.followers:
                for topology in topologies:
                    r = (args.relays or max(1, round(math.sqrt(n)))) if topology == "tree" \
                        else 0
                    need, have = fleet_memory(size, n + r + 1), available_memory()
                    if need > have:
                        skipped.append(f"{topology}/{n} followers at {size:,} services: needs "
                                       f"~{need / 2**30:.1f} GiB (every node holds the whole "
                                       f"registry), this machine has {have / 2**30:.1f} GiB "
                                       "available")
                        log(f"skipped {skipped[-1]}")
                        continue
                    results.append(run_topology(topology, n, r, services, args, deadline))
    except (OverTime, KeyboardInterrupt) as exc:
        log(f"stopped: {exc or type(exc).__name__}; writing what was measured")
    finally:
        signal.alarm(0)
        peers.stop_all()
    elapsed = time.monotonic() - t_begin
    if not results:
        log("nothing measured")
        return 1
    rows = [[r["topology"], r["services"], r["followers"], r["relays"], ms(r["p50_s"]),
             ms(r["p99_s"]), ms(r["max_s"] or float("nan")),
             f"{r['follower_cpu_per_change_s'] * 1000:.2f} ms",
             f"{r['leader_bytes_per_change_per_watch']:,.0f} B",
             f"{r['leader_cpu_per_change_s'] * 1000:.0f} ms",
             "/".join(f"{v:.0f}" for v in r["sync"].values()),
             round(r["leader_watches"])] for r in results]
    print(report.text_table(["topology", "services", "followers", "relays", "p50", "p99", "max",
                             "follower CPU/change", "leader B/change/watch",
                             "leader CPU/change", "delta/full/410", "watches"], rows),
          flush=True)
    if not args.no_write:
        md = render(results, args, elapsed, machine)
        if skipped:
            md += "\nNot run (memory):\n\n" + "".join(f"- {line}\n" for line in skipped)
        data = {"machine": report.machine_info(), "command": report.command_line(),
                "args": vars(args), "elapsed_s": elapsed, "results": results}
        path = report.write_result(args.out, md, data)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
