"""DNS latency while a 100k-service PUT is processed (issue 11: writes stall DNS).

One meshdns process on loopback (free high ports, no state file, an empty
resolv.conf) whose ``dns.upstreams`` is a loopback stub (peers' dnslib server
answering one external name), seeded with a few services. A probe thread sends
UDP queries at a fixed rate (default 200/s, dnspython, one socket per query,
1 s timeout), alternating a mesh name and the forwarded name, and records each
latency. Meanwhile the main thread PUTs N services (JSON, VIPs left to meshdns)
and waits for the answer. Reported: p50/p99/max DNS latency of the probes sent
while the PUT was in flight, the same for an idle baseline, and lost probes.

``--repo DIR`` runs the server from another checkout (e.g. the base commit in
/tmp) to get the "before" figures with the same client.

Usage: python bench/write_latency.py [--services 100000] [--rate 200] [--repo DIR]
       [--label after] [--write]   (--write appends a row to results/write_latency.md)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datagen import generate, meshdns_body, write_meshdns_seed
from peers import (
    LOOPBACK,
    REPO,
    Server,
    free_port,
    http_ok,
    project_python,
    spawn,
    wait_bound,
    wait_ready,
)

EXTERNAL = "ext.example.test"
RESULTS = Path(__file__).resolve().parent / "results" / "write_latency.md"


def start_stub(workdir: Path) -> Server:
    """peers' dnslib server as the upstream: it knows only ``EXTERNAL``."""
    port = free_port()
    table = workdir / "stub-table.json"
    table.write_text(json.dumps({EXTERNAL: ["192.0.2.7", "2001:db8::7"]}))
    log = workdir / "stub.log"
    proc = spawn([project_python(), str(REPO / "bench" / "peers.py"), "dnslib", "--port",
                  str(port), "--table", str(table)], log, cwd=REPO)
    srv = Server("stub", port, proc, log, workdir)
    wait_ready(srv, lambda: _probe(port, EXTERNAL) is not None, 60)
    return srv


def start_meshdns(workdir: Path, repo: Path, upstream: int, seed: Path) -> Server:
    resolv = workdir / "resolv.conf"
    resolv.write_text("# empty: only the stub upstream\n")
    cfg = {
        "dns": {"listen": [f"{LOOPBACK}:0"], "upstreams": [f"{LOOPBACK}:{upstream}"],
                "search": [], "resolv_conf": str(resolv)},
        "api": {"listen": f"{LOOPBACK}:0", "max_body_bytes": 1 << 30},
        "registry": {"seed_file": str(seed)},
        "log": {"level": "warning"},
    }
    conf = workdir / "meshdns.yaml"
    conf.write_text(json.dumps(cfg, indent=1))
    env = dict(os.environ, PYTHONPATH=str(repo))
    log = workdir / "meshdns.log"
    ports = workdir / "meshdns.ports.json"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([project_python(), "-m", "meshdns", "serve", "--config",
                                 str(conf), "--ports-file", str(ports)], cwd=repo, env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=fh,
                                start_new_session=True)
    from peers import _LIVE, _LIVE_LOCK  # registered so peers kills it at exit
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    port, api_port = wait_bound(proc, ports, log)
    srv = Server("meshdns", port, proc, log, workdir, api_port=api_port)
    wait_ready(srv, lambda: _probe(port, EXTERNAL) is not None
               and http_ok(f"http://{LOOPBACK}:{api_port}/healthz"), 120)
    return srv


def _probe(port: int, name: str, timeout: float = 1.0) -> float | None:
    """Seconds for one UDP A query to get a NOERROR answer, None if lost/wrong."""
    q = dns.message.make_query(name, "A")
    t0 = time.perf_counter()
    try:
        r = dns.query.udp(q, LOOPBACK, port=port, timeout=timeout)
    except (dns.exception.Timeout, OSError):
        return None
    took = time.perf_counter() - t0
    return took if r.rcode() == dns.rcode.NOERROR and r.answer else None


class Prober(threading.Thread):
    """Queries at ``rate``/s (start times on a fixed schedule) until stopped."""

    def __init__(self, port: int, names: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.names, self.period = port, names, 1.0 / rate
        self.samples: list[tuple[float, float | None]] = []  # (sent at, latency or None)
        self.stop_at = time.monotonic() + 3600

    def run(self) -> None:
        nxt = time.monotonic()
        i = 0
        while nxt < self.stop_at:
            now = time.monotonic()
            if now < nxt:
                time.sleep(nxt - now)
            sent = time.monotonic()
            self.samples.append((sent, _probe(self.port, self.names[i % len(self.names)])))
            i += 1
            nxt = max(nxt + self.period, time.monotonic() - self.period)  # no burst catch-up


def stats(lat: list[float | None]) -> dict[str, Any]:
    got = sorted(x for x in lat if x is not None)
    if not got:
        return {"n": len(lat), "lost": len(lat)}
    q = statistics.quantiles(got, n=100, method="inclusive") if len(got) > 1 else got * 99
    return {"n": len(lat), "lost": len(lat) - len(got), "p50_ms": q[49] * 1e3,
            "p99_ms": q[98] * 1e3, "max_ms": got[-1] * 1e3}


def put(api_port: int, body: bytes) -> tuple[int, float]:
    conn = http.client.HTTPConnection(LOOPBACK, api_port, timeout=600)
    t0 = time.monotonic()
    conn.request("PUT", "/v1/services", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.monotonic() - t0


def run(repo: Path, n: int, rate: float) -> dict[str, Any]:
    services = generate(n)
    seeded = services[:10]
    with tempfile.TemporaryDirectory(prefix="meshdns-wl-") as tmp:
        work = Path(tmp)
        stub = start_stub(work)
        seed = write_meshdns_seed(work / "seed.json", seeded)
        srv = start_meshdns(work, repo, stub.port, seed)
        try:
            body = json.dumps({"services": [
                {k: v for k, v in s.items() if k not in ("vip", "vip6")}
                for s in meshdns_body(services)["services"]]}, separators=(",", ":")).encode()
            prober = Prober(srv.port, [seeded[0].fqdn, EXTERNAL], rate)
            prober.start()
            time.sleep(3.0)  # idle baseline
            t_put = time.monotonic()
            status, took = put(srv.api_port or 0, body)
            t_done = time.monotonic()
            time.sleep(1.0)
            prober.stop_at = time.monotonic()
            prober.join(5)
            idle = [lat for sent, lat in prober.samples if sent < t_put]
            during = [lat for sent, lat in prober.samples if t_put <= sent <= t_done]
            return {"status": status, "put_s": took, "body_mib": len(body) / 2**20,
                    "idle": stats(idle), "during": stats(during)}
        finally:
            srv.stop()
            stub.stop()


def _commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--label", default="")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    repo = args.repo.resolve()
    res = run(repo, args.services, args.rate)
    d, i = res["during"], res["idle"]
    label = args.label or _commit(repo)
    print(f"method: {args.services} services PUT (JSON, {res['body_mib']:.1f} MiB) -> "
          f"{res['status']} in {res['put_s']:.2f} s; UDP probes at {args.rate:.0f}/s "
          f"(mesh name / forwarded name alternating) from {repo} ({label})")
    for what, s in (("idle", i), ("during PUT", d)):
        print(f"{what:>11}: n={s['n']} lost={s['lost']} p50={s.get('p50_ms', 0):.1f} ms "
              f"p99={s.get('p99_ms', 0):.1f} ms max={s.get('max_ms', 0):.1f} ms")
    if args.write:
        if not RESULTS.exists():
            RESULTS.write_text(
                "# DNS latency during a 100k-service PUT\n\n"
                "Command: `python bench/write_latency.py [--repo CHECKOUT] --label L --write`\n\n"
                "One meshdns process on loopback (no state file; `dns.upstreams` = a loopback "
                "dnslib stub), seeded with 10 services. A probe thread sends UDP A queries "
                "with dnspython at the given rate, alternating a mesh name and a forwarded "
                "(cached) name; latencies are of the probes sent while the PUT of N new "
                "services (JSON, VIPs allocated by meshdns) was in flight. Idle = the 3 s "
                "before the PUT. Timeout 1 s (a timeout counts as lost).\n\n"
                "| run | machine | services | PUT | probes | lost | p50 | p99 | max | "
                "idle p99 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        load = os.getloadavg()[0]
        with RESULTS.open("a") as fh:
            fh.write(f"| {label} | {os.cpu_count()} CPUs, py {platform.python_version()}, "
                     f"load {load:.1f}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
                     f" | {args.services:,} | {res['put_s']:.2f} s ({res['status']}) | "
                     f"{d['n']} | {d['lost']} | {d.get('p50_ms', 0):.1f} ms | "
                     f"{d.get('p99_ms', 0):.1f} ms | {d.get('max_ms', 0):.1f} ms | "
                     f"{i.get('p99_ms', 0):.1f} ms |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
