"""Registry sync over HTTP: full PUTs, PATCH-to-DNS latency, full GET, memory.

One meshdns process on loopback (free high ports, a state file in a temp dir,
no upstreams, an empty resolv.conf), driven over real HTTP the way a control
plane drives it. Measured, wall-clock on the client side:

- full PUT of N services (VIPs left to meshdns to allocate): request sent ->
  answer received; the API answers once the write is durable (state file
  fsynced) and DNS answers from it, so this is the whole push;
- re-PUT of the identical N (the steady-state push that changes nothing);
- PATCH of 1 new service in the largest registry -> the DNS answer for it
  (PATCH round trip + one UDP query, which must already see it); median, max;
- GET of the whole registry (what a follower pulls on (re)connect);
- RSS (VmRSS) of the server: empty, after the PUT, and a fresh process that
  loaded the same registry from its state file (no garbage left from parsing);
  the per-100k figure is (fresh with N) - (fresh empty), scaled to 100k.

``--follower N`` measures a follower instead (issue 22): a leader and a
follower process (each with a state file), the follower probed over UDP at
``--rate``/s (write_latency.Prober: one mesh name, 1 s timeout) while it

1. re-reads in full a leader grown to N services (the follower restarted from
   its 3-service state file, so DNS answers from the first moment and the first
   poll is the full read; "during" is from its first answer to the first answer
   for the last of the N);
2. applies the delta that takes a running follower from 3 to N services;
3. applies the delta back to 3 services, then RSS (VmRSS) after 2 s, against a
   fresh follower process in sync with the same 3 services.

Usage: python bench/bench_sync.py [--sizes 10000,100000] [--patches 5] [--no-write]
       python bench/bench_sync.py --follower 300000 [--rate 200] [--no-write]
Writes bench/results/sync.md (a Markdown section) unless --no-write; --follower
writes bench/results/sync_follower.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from write_latency import Prober, stats  # noqa: E402  (one prober for both benches)


class Server:
    def __init__(self, workdir: Path, follow: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.dns_port = self.api_port = 0  # port 0: known from --ports-file once started
        self.ports = workdir / "meshdns.ports.json"
        (workdir / "resolv.conf").write_text("# none\n")
        self.state = workdir / "state.json"
        cfg: dict[str, Any] = {
            "dns": {"listen": ["127.0.0.1:0"], "upstreams": [],
                    "resolv_conf": str(workdir / "resolv.conf")},
            "api": {"listen": "127.0.0.1:0", "max_body_bytes": 1 << 30},
            "registry": {"state_file": str(self.state)},
            "log": {"level": "warning"},
        }
        if follow is not None:
            cfg["registry"]["follow"] = follow
        self.config = workdir / "meshdns.yaml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
        if self.api_port:  # a restart binds the ports of the first run again
            doc = json.loads(self.config.read_text())
            doc["dns"]["listen"] = [f"127.0.0.1:{self.dns_port}"]
            doc["api"]["listen"] = f"127.0.0.1:{self.api_port}"
            self.config.write_text(json.dumps(doc))
        self.ports.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshdns", "serve", "--config", str(self.config),
             "--ports-file", str(self.ports)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "meshdns.log", "ab"), start_new_session=True)  # noqa: SIM115
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "meshdns.log").read_text())
            try:
                if not self.ports.exists():
                    raise ConnectionError("not listening yet")
                bound = json.loads(self.ports.read_text())
                self.dns_port = int(bound["dns"][0].rsplit(":", 1)[1])
                self.api_port = int(bound["api"].rsplit(":", 1)[1])
                status, _, _ = self.request("GET", "/healthz", timeout=1)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("meshdns did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def timed(self, method: str, path: str, body: bytes | None = None) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        status, _, data = self.request(method, path, body)
        elapsed = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return elapsed, data

    def a_record(self, name: str, timeout: float = 5) -> list[str]:
        reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1",
                              port=self.dns_port, timeout=timeout, ignore_unexpected=True)
        return [rr.address for rrset in reply.answer for rr in rrset]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


def services(n: int) -> list[dict[str, Any]]:
    return [{"name": f"svc{i}", "namespace": f"ns{i % 100}", "port": 8000 + i % 7,
             "hostnames": [f"svc{i}.ns{i % 100}.example.internal"] if i % 10 == 0 else []}
            for i in range(n)]


def run(sizes: list[int], patches: int) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": {}, "patch": {}, "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="meshdns-bench-sync-") as tmp:
        server = Server(Path(tmp))
        try:
            server.start()
            server.timed("PUT", "/v1/services", b'{"services": []}')
            out["rss_empty"] = server.rss_mib()
            for n in sizes:
                body = json.dumps({"services": services(n)}).encode()
                put, resp = server.timed("PUT", "/v1/services", body)
                assert json.loads(resp)["services"] == n
                reput, _ = server.timed("PUT", "/v1/services", body)
                name = f"svc{n - 1}.ns{(n - 1) % 100}.svc.{8000 + (n - 1) % 7}.mesh"
                assert server.a_record(name), f"{name} not served after the PUT"
                get, data = server.timed("GET", "/v1/services")
                row = {"put_s": put, "reput_s": reput, "get_s": get, "body_mib": len(body) / 2**20,
                       "get_mib": len(data) / 2**20, "rss_after_put": server.rss_mib(),
                       "state_mib": server.state.stat().st_size / 2**20}
                out["sizes"][n] = row
                print(f"{n:>7} services: PUT {put:.2f} s, re-PUT {reput:.2f} s, GET {get:.2f} s, "
                      f"RSS {row['rss_after_put']:.0f} MiB", flush=True)
            largest = max(sizes)
            ack, total = [], []
            for k in range(patches):
                body = json.dumps({"upsert": [{"name": f"patch{k}", "namespace": "bench",
                                               "port": 80}]}).encode()
                t0 = time.perf_counter()
                server.timed("PATCH", "/v1/services", body)
                t1 = time.perf_counter()
                answer = server.a_record(f"patch{k}.bench.svc.80.mesh")
                t2 = time.perf_counter()
                assert answer, "read-your-writes broken: the PATCH is not in DNS"
                ack.append(t1 - t0)
                total.append(t2 - t0)
            out["patch"] = {"n": largest, "ack_median": statistics.median(ack),
                            "ack_max": max(ack), "dns_median": statistics.median(total),
                            "dns_max": max(total)}
            print(f"PATCH 1 in {largest}: to DNS answer median {statistics.median(total):.3f} s, "
                  f"max {max(total):.3f} s", flush=True)
            server.stop()
            # Memory of a process that holds the registry and nothing else: restart on it.
            out["load_s"] = server.start()  # the API listens only after the state is loaded
            out["rss_fresh_loaded"] = server.rss_mib()
            server.stop()
            server.state.unlink()
            server.start()
            out["rss_fresh_empty"] = server.rss_mib()
        finally:
            server.stop()
    largest = max(sizes)
    out["rss_per_100k"] = (out["rss_fresh_loaded"] - out["rss_fresh_empty"]) * 100_000 / largest
    print(f"RSS: {out['rss_per_100k']:.0f} MiB per 100k services (fresh process, from state)")
    return out


def mesh_name(i: int) -> str:
    return f"svc{i}.ns{i % 100}.svc.{8000 + i % 7}.mesh"


def wait_answer(server: Server, name: str, present: bool, limit: float = 600) -> float:
    """Poll ``name`` on ``server`` until it is (or is no longer) answered; monotonic time."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if bool(server.a_record(name, timeout=1)) == present:
                return time.monotonic()
        except (OSError, dns.exception.Timeout):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{name} still {'absent' if present else 'answered'} after {limit} s")


def probed(prober: Prober, start: float, end: float) -> dict[str, Any]:
    return stats([lat for sent, lat in prober.samples if start <= sent <= end])


def run_follower(n: int, rate: float) -> dict[str, Any]:
    small = json.dumps({"services": services(3)}).encode()
    big = json.dumps({"services": services(n)}).encode()
    last = mesh_name(n - 1)
    out: dict[str, Any] = {"n": n, "rate": rate, "body_mib": len(big) / 2**20,
                           "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="meshdns-bench-follow-") as tmp:
        work = Path(tmp)
        leader = Server(work / "leader")
        leader.start()  # its port (bound 0) is in the follower's URL
        follower = Server(work / "follower", follow=leader.url)
        prober: Prober | None = None
        try:
            leader.timed("PUT", "/v1/services", small)
            follower.start()
            wait_answer(follower, mesh_name(2), True)
            out["rss_small_start"] = follower.rss_mib()
            follower.stop()
            out["leader_put_s"], _ = leader.timed("PUT", "/v1/services", big)

            # 1. The full read: the follower restarts on its 3-service state file.
            prober = Prober(follower.dns_port, [mesh_name(0)], rate)
            prober.start()
            follower.start()
            first = wait_answer(follower, mesh_name(0), True)
            done = wait_answer(follower, last, True)
            out["full"] = probed(prober, first, done) | {"s": done - first}
            out["rss_after_full"] = follower.rss_mib()

            # 3 (first half). Back to 3 services: a delta of N deletes.
            t0 = time.monotonic()
            leader.timed("PUT", "/v1/services", small)
            done = wait_answer(follower, last, False)
            out["shrink"] = probed(prober, t0, done) | {"s": done - t0}
            time.sleep(2.0)
            out["rss_after_shrink"] = follower.rss_mib()
            t0 = time.monotonic()
            time.sleep(2.0)
            out["idle"] = probed(prober, t0, time.monotonic()) | {"s": 2.0}

            # 2. From 3 to N services as a delta, on the running follower.
            t0 = time.monotonic()
            leader.timed("PUT", "/v1/services", big)
            done = wait_answer(follower, last, True)
            out["grow"] = probed(prober, t0, done) | {"s": done - t0}
            out["rss_after_grow"] = follower.rss_mib()
            leader.timed("PUT", "/v1/services", small)
            wait_answer(follower, last, False)
            time.sleep(2.0)
            out["rss_after_second_shrink"] = follower.rss_mib()
            prober.stop_at = time.monotonic()
            prober.join(5)

            # The baseline: a fresh follower process in sync with the same 3 services.
            follower.stop()
            fresh = Server(work / "fresh", follow=leader.url)
            try:
                fresh.start()
                wait_answer(fresh, mesh_name(2), True)
                time.sleep(2.0)
                out["rss_fresh_small"] = fresh.rss_mib()
            finally:
                fresh.stop()
        finally:
            if prober is not None:
                prober.stop_at = time.monotonic()
            follower.stop()
            leader.stop()
    return out


def follower_markdown(res: dict[str, Any], command: str) -> str:
    def row(what: str, key: str) -> str:
        s = res[key]
        return (f"| {what} | {s['s']:.2f} s | {s['n']} | {s['lost']} | "
                f"{s.get('p50_ms', 0):.1f} ms | **{s.get('p99_ms', 0):.1f} ms** | "
                f"{s.get('max_ms', 0):.1f} ms |")

    n = res["n"]
    return "\n".join([
        f"## A follower adopting {n:,} services",
        "",
        f"`{command}` — {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load average {res['load']:.1f} at start), "
        f"{time.strftime('%Y-%m-%d')}; a leader and a follower process on loopback, each "
        f"with a state file; the follower's DNS probed at {res['rate']:g}/s (one mesh name, "
        f"UDP, 1 s timeout). Registry body {res['body_mib']:.1f} MiB.",
        "",
        "| follower | took | probes | lost | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row(f"full read of {n:,} (restarted on a 3-service state file)", "full"),
        row(f"delta {n:,} -> 3", "shrink"),
        row(f"delta 3 -> {n:,}", "grow"),
        row("idle, 3 services (baseline)", "idle"),
        "",
        f"- RSS of the follower: {res['rss_small_start']:.0f} MiB in sync with 3 services; "
        f"{res['rss_after_full']:.0f} MiB with {n:,}; **{res['rss_after_shrink']:.0f} MiB** "
        f"back at 3 (and {res['rss_after_second_shrink']:.0f} MiB after a second "
        f"3 -> {n:,} -> 3); a fresh follower process in sync with the same 3: "
        f"{res['rss_fresh_small']:.0f} MiB.",
        "- Method: `during` is from the restarted follower's first DNS answer (it serves its "
        "state file at once) to its first answer for the last of the N services; for the "
        "deltas, from the leader's PUT to the follower's answer for (or NXDOMAIN of) that "
        "name. RSS is VmRSS 2 s after the follower stopped answering the last name.",
        "",
    ])


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "## Registry sync over HTTP",
        "",
        f"`{command}` — {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load average {res['load']:.1f} at start: other work was "
        f"running), {time.strftime('%Y-%m-%d')}; one meshdns process on loopback "
        "with a state file (every write fsynced before it is answered), client-side wall time.",
        "",
        "| services | body | full PUT | identical re-PUT | full GET | state file | RSS after PUT |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in res["sizes"].items():
        lines.append(f"| {n:,} | {row['body_mib']:.1f} MiB | {row['put_s']:.2f} s | "
                     f"{row['reput_s']:.2f} s | {row['get_s']:.2f} s | {row['state_mib']:.1f} MiB | "
                     f"{row['rss_after_put']:.0f} MiB |")
    p = res["patch"]
    lines += [
        "",
        f"- PATCH of 1 new service in a {p['n']:,}-service registry -> its DNS answer "
        f"(PATCH round trip + one UDP query, which already sees it): median "
        f"**{p['dns_median'] * 1000:.0f} ms**, max {p['dns_max'] * 1000:.0f} ms "
        f"(PATCH acknowledged after {p['ack_median'] * 1000:.0f} ms median).",
        f"- RSS per 100k services: **{res['rss_per_100k']:.0f} MiB** (fresh process loaded from "
        f"the state file: {res['rss_fresh_loaded']:.0f} MiB, vs {res['rss_fresh_empty']:.0f} MiB "
        f"empty; start-up with the state file {res['load_s']:.1f} s).",
        "- Method: VIPs allocated by meshdns (none given); every 10th service has one extra host "
        "name. A PATCH is computed incrementally in the core and appended to the state file's "
        "journal (one fsynced line), not a rewrite of the snapshot; the work runs in a worker thread, "
        "DNS keeps answering meanwhile.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--patches", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--follower", type=int, default=0,
                        help="measure a follower adopting this many services instead")
    parser.add_argument("--rate", type=float, default=200.0, help="DNS probes/s (--follower)")
    args = parser.parse_args()
    command = "python bench/bench_sync.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.follower:
        res = run_follower(args.follower, args.rate)
        text = follower_markdown(res, command.strip())
        print(json.dumps(res, indent=1, default=str))
        print(text)
        if not args.no_write:
            (HERE / "results").mkdir(exist_ok=True)
            (HERE / "results" / "sync_follower.md").write_text(text)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    res = run(sizes, args.patches)
    text = markdown(res, command.strip())
    print()
    print(text)
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / "sync.md").write_text(text)
        (results / "sync.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
