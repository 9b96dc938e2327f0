"""Memory sizing of a leader and a follower (sidecar) by registry size.

For each size N a fresh pair of real processes starts on loopback: a leader
(``python -m meshdns serve``, registry API on loopback, a state file, as
deploy/kubernetes/leader ships it) and a follower of it (``registry.follow``, a
state file and ``dns.answer_cache_size: 20000``, as the shipped sidecar). The
leader is loaded the way a control plane does it, one ``PUT /v1/services`` with N
services from bench/datagen.py (explicit VIPs); the follower pulls them in one full
read. Then the follower's reply cache is filled: one UDP query for each of
min(N, 20000) distinct names (a sidecar's cache is bounded by that setting).
Last, the leader is restarted (same state file, a new lineage), so the follower
reads the whole registry again while it still serves the one it has: the peak a
running sidecar reaches on every leader restart.

RSS is read from /proc/PID/status: VmRSS (resident now) after the load has settled
and the cache is filled, and VmHWM (the peak, which is what a memory limit has to
hold: the kernel's OOM killer acts on it). A straight line through the sizes gives
a base and a cost per 10k services; the size at which the follower's peak reaches
the shipped sidecar limit (deploy/kubernetes/sidecar: 192 Mi) is printed.

Usage: python bench/sizing.py [--sizes 10000 50000 100000] [--limit-mib 192]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import datagen

CACHE = 20_000  # the shipped sidecar's dns.answer_cache_size
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, timeout: float = 300.0
         ) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB (/proc/PID/status)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Meshdns:
    """One ``python -m meshdns serve`` on loopback ports."""

    def __init__(self, work: Path, name: str, extra: dict[str, Any]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.dns_port, self.api_port = free_port(), free_port()
        (work / "resolv.conf").write_text("# no nameservers\n")
        config: dict[str, Any] = {
            "dns": {"listen": [f"127.0.0.1:{self.dns_port}"], "upstreams": [],
                    "resolv_conf": str(work / "resolv.conf")},
            "api": {"listen": f"127.0.0.1:{self.api_port}"},
            "registry": {"state_file": str(work / "state.json")},
            "log": {"level": "warning"},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        path = work / f"{name}.json"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.path, self.work = path, work
        self.log = (work / f"{name}.log").open("ab")
        self.proc = self.spawn()
        self.url = f"http://127.0.0.1:{self.api_port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
        return subprocess.Popen([sys.executable, "-m", "meshdns", "serve", "--config",
                                 str(self.path)], stdout=self.log, stderr=subprocess.STDOUT,
                                env=env, cwd=self.work)

    def restart(self) -> float:
        """SIGTERM, then the same config again (same ports, same state file); returns
        the seconds from SIGTERM to the exit."""
        t0 = time.monotonic()
        self.proc.terminate()
        self.proc.wait(120)
        stopped = time.monotonic() - t0
        self.proc = self.spawn()
        return stopped

    def counter(self, name: str) -> float:
        """The value of an unlabelled counter in this server's /metrics."""
        with _OPENER.open(f"{self.url}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def ready(self, revision: int | None = None, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"meshdns exited {self.proc.returncode}: see {self.log.name}")
            try:
                status, body = http("GET", f"{self.url}/readyz", timeout=5)
            except OSError:
                status, body = 0, None
            if status == 200 and (revision is None or body.get("revision") == revision):
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.url} not ready (revision {revision}) within {timeout} s")

    def healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if http("GET", f"{self.url}/healthz", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.url}: /healthz did not answer")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def fill_cache(port: int, names: list[str]) -> int:
    """One A query per name over UDP, each waited for; returns the answers received."""
    got = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        for i, name in enumerate(names):
            sock.send(query(name, i & 0xFFFF))
            try:
                sock.recv(4096)
                got += 1
            except TimeoutError:
                pass
    return got


def measure(n: int, root: Path) -> dict[str, Any]:
    services = datagen.generate(n)
    body = json.dumps(datagen.meshdns_body(services), separators=(",", ":")).encode()
    with ExitStack() as stack:
        leader = Meshdns(root / f"leader-{n}", "leader", {})
        stack.callback(leader.stop)
        leader.healthy()
        idle_leader = rss_kib(leader.proc.pid)["VmRSS"]
        status, reply = http("PUT", f"{leader.url}/v1/services", body)
        if status != 200:
            raise SystemExit(f"PUT of {n} services: HTTP {status}")
        revision = reply["revision"]
        follower = Meshdns(root / f"follower-{n}", "follower", {
            "dns": {"answer_cache_size": CACHE},
            "registry": {"follow": leader.url, "follow_max_staleness": 86400}})
        stack.callback(follower.stop)
        follower.ready(revision)
        answered = fill_cache(follower.dns_port, [s.fqdn for s in services[:CACHE]])
        time.sleep(2)  # let the pull's garbage go, as between two changes
        out = {"services": n, "body_bytes": len(body), "answered": answered,
               "leader_idle_kib": idle_leader,
               "leader": rss_kib(leader.proc.pid), "follower": rss_kib(follower.proc.pid)}
        # A leader restart: a new lineage, so the follower reads everything again. Its
        # peak is reset first (clear_refs 5, Linux >= 4.0): VmHWM then is this re-read's.
        full_reads = follower.counter("meshdns_follow_full_syncs_total")
        Path(f"/proc/{follower.proc.pid}/clear_refs").write_text("5")
        out["leader_stop_s"] = leader.restart()
        t0 = time.monotonic()
        leader.ready(revision)
        t1 = time.monotonic()
        deadline = t1 + 120
        while follower.counter("meshdns_follow_full_syncs_total") <= full_reads:
            if time.monotonic() > deadline:
                raise SystemExit("the follower did not re-read after the leader restart")
            time.sleep(0.05)
        t2 = time.monotonic()
        # SIGTERM to exit, start to ready (with the state file loaded): the write gap
        # of a restart, without the pod's own; ready to the follower having re-read
        # (its backoff included).
        out["leader_start_s"], out["follower_reread_s"] = t1 - t0, t2 - t1
        time.sleep(2)
        out["follower_after_leader_restart"] = rss_kib(follower.proc.pid)
        return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--limit-mib", type=float, default=192.0,
                    help="the sidecar's memory limit to place (default: the shipped 192 Mi)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    print(f"# bench/sizing.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; RSS from /proc/PID/status "
          "(VmRSS after load + cache fill + 2 s, VmHWM = peak; the re-read's peak counted "
          "from a reset just before it)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshdns-sizing-") as tmp:
        for n in args.sizes:
            rows.append(measure(n, Path(tmp)))
            r = rows[-1]
            print(f"{n:>8} services ({r['body_bytes'] / 2**20:.1f} MiB PUT): "
                  f"leader {r['leader']['VmRSS'] / 1024:.0f} MiB (peak "
                  f"{r['leader']['VmHWM'] / 1024:.0f}), follower {r['follower']['VmRSS'] / 1024:.0f}"
                  f" MiB (peak {r['follower']['VmHWM'] / 1024:.0f}); idle leader "
                  f"{r['leader_idle_kib'] / 1024:.0f} MiB; {r['answered']} queries answered; "
                  "follower after a leader restart "
                  f"{r['follower_after_leader_restart']['VmRSS'] / 1024:.0f} MiB (peak "
                  f"{r['follower_after_leader_restart']['VmHWM'] / 1024:.0f}); leader "
                  f"SIGTERM to exit {r['leader_stop_s']:.1f} s, start to ready "
                  f"{r['leader_start_s']:.1f} s, follower re-read "
                  f"{r['follower_reread_s']:.1f} s after", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if len(rows) < 2:
        return 0
    xs = [float(r["services"]) for r in rows]
    print("\n| role | RSS base | RSS per 10k services | peak base | peak per 10k services |")
    print("|---|---:|---:|---:|---:|")
    lines = {}
    for role in ("leader", "follower", "follower_after_leader_restart"):
        a, b = fit(xs, [r[role]["VmRSS"] / 1024 for r in rows])
        pa, pb = fit(xs, [r[role]["VmHWM"] / 1024 for r in rows])
        lines[role] = (pa, pb)
        print(f"| {role.replace('_', ' ')} | {a:.0f} MiB | {b * 1e4:.1f} MiB | {pa:.0f} MiB | {pb * 1e4:.1f} MiB |")
    for role in ("follower", "follower_after_leader_restart"):
        pa, pb = lines[role]
        if pb > 0:
            print(f"{role.replace('_', ' ')}: peak reaches {args.limit_mib:g} MiB at about "
                  f"{(args.limit_mib - pa) / pb:,.0f} services (straight-line fit)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
