"""meshdns and unbound side by side away from the warm steady state (issue #13).

Three conditions, each run on the same generated data (``bench/datagen.py``):

- **cold**: the mix (80% A, 10% AAAA, 10% NXDOMAIN) over ``--cold-services``
  services (default 100k), every name in random letter case as 0x20-randomizing
  forwarders send it. The query file has ``--cold-lines`` distinct lines and
  meshdns runs with a reply cache of ``--answer-cache`` entries (default 1000,
  cleared when full), so a line seen once is not still cached when dnsperf comes
  back to it: nearly every query is a reply-cache miss. unbound answers its
  local data the same way every time (it has no reply cache for it).
- **churn**: the mix over ``--services`` services (default 10k), steady and
  then with one change every ``--interval`` s (default 0.1) while dnsperf runs:
  meshdns gets a one-service PATCH over its API (the service's VIP moves),
  unbound an ``unbound-control local_data`` of the same record. Reported: each
  server's qps under churn, as a fraction of its own steady qps in the same
  round, and meshdns/unbound under churn.
- **patch latency**: dnsperf saturates meshdns (``-q 200``) while one-service
  PATCHes go out back to back, one every ``--interval`` s: latency p50, p99 and
  max, and how many completed in the round.

Rounds alternate servers so drift on a shared machine hits both alike; each
figure is the median over rounds. The 2-worker comparison is in macro.py.

Usage: python bench/conditions.py [--quick] [--rounds 3] [--seconds 8]
       [--services 10000] [--cold-services 100000] [--only cold churn patch] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datagen
import peers
import report

CHURN_BASE = int(ipaddress.IPv4Address("250.0.0.0"))  # VIPs the churn moves services to


# ---------------------------------------------------------------- servers


def start_unbound_control(workdir: Path, services: Sequence[datagen.Svc]) -> tuple[
        peers.Server, Path]:
    """unbound (1 thread, the same static local zone as macro.py) with remote control on a
    unix socket, so ``unbound-control local_data`` can churn it. Returns (server, conf)."""
    port = peers.free_port()
    d = workdir / f"unbound-{port}"
    d.mkdir()
    lines = peers.unbound_server_lines(port, d, services)
    lines += ["remote-control:", "  control-enable: yes",
              f'  control-interface: "{d / "control.sock"}"', "  control-use-cert: no"]
    conf = datagen.write_lines(d / "unbound.conf", lines)
    check = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                           timeout=120, check=False)
    if check.returncode != 0:
        raise peers.ServerFailed(f"unbound-checkconf: {check.stdout}{check.stderr}")
    log = d / "unbound.log"
    proc = peers.spawn(["unbound", "-d", "-c", str(conf)], log, cwd=d)
    srv = peers.Server("unbound", port, proc, log, d)
    peers.wait_ready(srv, peers.answers_probe(port, services[0]), 300.0)
    return srv, conf


# ---------------------------------------------------------------- changes


class MeshPatcher:
    """One-service PATCHes over one keep-alive HTTP connection, timed."""

    def __init__(self, api_port: int) -> None:
        self.conn = http.client.HTTPConnection(peers.LOOPBACK, api_port, timeout=30)

    def change(self, svc: datagen.Svc, vip: str) -> float:
        body = json.dumps({"upsert": [dict(svc.to_json(), vip=vip)]})
        t0 = time.perf_counter()
        self.conn.request("PATCH", "/v1/services", body=body,
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"PATCH answered {resp.status}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def unbound_change(conf: Path) -> Callable[[datagen.Svc, str], float]:
    def change(svc: datagen.Svc, vip: str) -> float:
        t0 = time.perf_counter()
        out = subprocess.run(["unbound-control", "-c", str(conf), "local_data",
                              f"{svc.fqdn}. {datagen.TTL} IN A {vip}"],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0 or "ok" not in out.stdout:
            raise RuntimeError(f"unbound-control: {out.stdout}{out.stderr}")
        return time.perf_counter() - t0
    return change


def churn_during(change: Callable[[datagen.Svc, str], float], services: Sequence[datagen.Svc],
                 interval: float, seconds: float, counter: list[int]) -> tuple[
                     threading.Thread, list[float], threading.Event]:
    """A thread making one change every ``interval`` s for ``seconds`` s (latencies out)."""
    latencies: list[float] = []
    stop = threading.Event()
    rng = random.Random(len(counter))

    def run() -> None:
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < deadline:
            svc = services[rng.randrange(len(services))]
            counter[0] += 1
            latencies.append(change(svc, str(ipaddress.IPv4Address(CHURN_BASE + counter[0]))))
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))

    thread = threading.Thread(target=run, name="churn", daemon=True)
    thread.start()
    return thread, latencies, stop


def pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- conditions


def random_case_lines(services: Sequence[datagen.Svc], count: int, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    out = []
    for line in datagen.query_lines(services, "mix", count, seed):
        name, qtype = line.split()
        out.append("".join(c.upper() if rng.random() < 0.5 else c for c in name) + " " + qtype)
    return out


def cold(work: Path, args: argparse.Namespace, perf: dict[str, Any]) -> dict[str, Any]:
    services = datagen.generate(args.cold_services)
    qfile = datagen.write_lines(work / "queries-cold.txt",
                                random_case_lines(services, args.cold_lines))
    runs: dict[str, list[float]] = {"meshdns": [], "unbound": []}
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(peers.running("meshdns", work, services,
                                                 answer_cache=args.answer_cache))
        unb = stack.enter_context(peers.running("unbound", work, services))
        for rnd in range(args.rounds):
            for srv in (mesh, unb):
                r = peers.run_dnsperf(srv.port, qfile, args.seconds, **perf)
                runs[srv.name].append(r.qps)
                print(f"    cold round {rnd + 1} {srv.name:<8} {r.qps:>10,.0f} q/s "
                      f"{dict(r.rcodes)}", flush=True)
    ratios = [m / u for m, u in zip(runs["meshdns"], runs["unbound"], strict=True) if u]
    return {"meshdns_qps": report.median(runs["meshdns"]),
            "unbound_qps": report.median(runs["unbound"]),
            "ratio": report.median(ratios) if ratios else float("nan"), "runs": runs}


def churn(work: Path, args: argparse.Namespace, perf: dict[str, Any]) -> dict[str, Any]:
    services = datagen.generate(args.services)
    qfile = datagen.write_lines(work / "queries-mix.txt",
                                datagen.query_lines(services, "mix", 10_000))
    out: dict[str, Any] = {}
    counter = [0]
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(peers.running("meshdns", work, services))
        unb, conf = start_unbound_control(work, services)
        stack.callback(unb.stop)
        patcher = MeshPatcher(mesh.api_port or 0)
        stack.callback(patcher.close)
        changers = {"meshdns": patcher.change, "unbound": unbound_change(conf)}
        per: dict[str, dict[str, list[float]]] = {
            n: {"steady": [], "churn": [], "lat": [], "changes": []} for n in changers}
        for srv in (mesh, unb):
            with contextlib.suppress(RuntimeError):
                peers.run_dnsperf(srv.port, qfile, 30, outstanding=50, extra=["-n", "1"])
        for rnd in range(args.rounds):
            for srv in (mesh, unb):
                steady = peers.run_dnsperf(srv.port, qfile, args.seconds, **perf)
                thread, lat, stop = churn_during(changers[srv.name], services, args.interval,
                                                 args.seconds, counter)
                churned = peers.run_dnsperf(srv.port, qfile, args.seconds, **perf)
                stop.set()
                thread.join(timeout=60)
                p = per[srv.name]
                p["steady"].append(steady.qps)
                p["churn"].append(churned.qps)
                p["lat"] += lat
                p["changes"].append(len(lat))
                print(f"    churn round {rnd + 1} {srv.name:<8} steady {steady.qps:>10,.0f} "
                      f"churn {churned.qps:>10,.0f} q/s ({len(lat)} changes, p50 "
                      f"{pct(lat, 0.5) * 1000:.1f} ms)", flush=True)
        for name, p in per.items():
            out[name] = {"steady_qps": report.median(p["steady"]),
                         "churn_qps": report.median(p["churn"]),
                         "of_steady": report.median([c / s for c, s in
                                                     zip(p["churn"], p["steady"], strict=True)
                                                     if s]),
                         "changes": sum(p["changes"]), "change_p50_ms": pct(p["lat"], 0.5) * 1e3,
                         "change_p99_ms": pct(p["lat"], 0.99) * 1e3}
        ratios = [m / u for m, u in zip(per["meshdns"]["churn"], per["unbound"]["churn"],
                                        strict=True) if u]
        out["ratio"] = report.median(ratios) if ratios else float("nan")
    return out


def patch_latency(work: Path, args: argparse.Namespace, perf: dict[str, Any]) -> dict[str, Any]:
    services = datagen.generate(args.services)
    qfile = datagen.write_lines(work / "queries-mix-patch.txt",
                                datagen.query_lines(services, "mix", 10_000))
    counter = [1 << 20]
    lat: list[float] = []
    planned = 0
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(peers.running("meshdns", work, services))
        patcher = MeshPatcher(mesh.api_port or 0)
        stack.callback(patcher.close)
        idle = [patcher.change(services[i], str(ipaddress.IPv4Address(CHURN_BASE + 100 + i)))
                for i in range(10)]
        for _ in range(args.rounds):
            thread, round_lat, stop = churn_during(patcher.change, services, args.interval,
                                                   args.seconds, counter)
            r = peers.run_dnsperf(mesh.port, qfile, args.seconds, **perf)
            stop.set()
            thread.join(timeout=120)
            lat += round_lat
            planned += int(args.seconds / args.interval)
            print(f"    patch round: dnsperf {r.qps:,.0f} q/s, {len(round_lat)} PATCHes, p99 "
                  f"{pct(round_lat, 0.99) * 1000:.1f} ms", flush=True)
    return {"idle_p50_ms": pct(idle, 0.5) * 1e3, "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3 if lat else float("nan"),
            "completed": len(lat), "planned": planned}


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000, help="churn and PATCH latency")
    ap.add_argument("--cold-services", type=int, default=100_000)
    ap.add_argument("--cold-lines", type=int, default=100_000,
                    help="distinct random-case lines in the cold query file (~3.5 MB)")
    ap.add_argument("--answer-cache", type=int, default=1000,
                    help="meshdns dns.answer_cache_size in the cold condition")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between changes")
    ap.add_argument("--outstanding", "-q", type=int, default=200)
    ap.add_argument("--only", nargs="+", default=["cold", "churn", "patch"],
                    choices=["cold", "churn", "patch"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one short round (smoke)")
    ap.add_argument("--no-write", action="store_true", help="print only, no results file")
    args = ap.parse_args()
    if args.quick:
        args.services, args.cold_services, args.cold_lines = 2000, 5000, 5000
        args.rounds, args.seconds, args.answer_cache = 1, 2.0, 200
    for tool in ("dnsperf", "unbound", "unbound-control"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (`make bench-tools`)")
    perf = {"outstanding": args.outstanding}
    data: dict[str, Any] = {"args": vars(args), "machine": report.machine_info()}
    with tempfile.TemporaryDirectory(prefix="meshdns-conditions-") as td:
        work = Path(td)
        if "cold" in args.only:
            print(f"cold: mix over {args.cold_services:,} services, random case ...", flush=True)
            data["cold"] = cold(work, args, perf)
        if "churn" in args.only:
            print(f"churn: a change every {args.interval:g} s ...", flush=True)
            data["churn"] = churn(work, args, perf)
        if "patch" in args.only:
            print("PATCH latency under saturating dnsperf ...", flush=True)
            data["patch"] = patch_latency(work, args, perf)
    md = render(data, args)
    print("\n" + md)
    if not args.no_write and not args.quick:
        print(f"wrote {report.write_result('conditions', md, data)}")
    return 0


def render(data: dict[str, Any], args: argparse.Namespace) -> str:
    md = ["# meshdns and unbound away from the warm steady state", "",
          f"Command: `{report.command_line()}`", "", report.machine_md(), "",
          f"dnsperf `-q {args.outstanding}`, {args.rounds} round(s) of {args.seconds:g} s, "
          "servers alternating, medians over rounds. meshdns: 1 worker; unbound: 1 thread.", ""]
    if "cold" in data:
        c = data["cold"]
        md += ["## Cold: every query a reply-cache miss", "",
               f"The mix over {args.cold_services:,} services, {args.cold_lines:,} distinct "
               f"lines, each name in random letter case; meshdns `dns.answer_cache_size: "
               f"{args.answer_cache}`.", "",
               report.table(["server", "qps", "meshdns / unbound"],
                            [["meshdns", report.fmt_int(c["meshdns_qps"]), f"{c['ratio']:.2f}"],
                             ["unbound", report.fmt_int(c["unbound_qps"]), "1.00"]]), ""]
    if "churn" in data:
        ch = data["churn"]
        rows = [[n, report.fmt_int(ch[n]["steady_qps"]), report.fmt_int(ch[n]["churn_qps"]),
                 f"{ch[n]['of_steady']:.2f}", str(ch[n]["changes"]),
                 f"{ch[n]['change_p50_ms']:.1f} / {ch[n]['change_p99_ms']:.1f}"]
                for n in ("meshdns", "unbound")]
        md += [f"## Churn: a change every {args.interval:g} s during dnsperf", "",
               "meshdns: a one-service PATCH (its VIP moves); unbound: `unbound-control "
               f"local_data` of the same record. meshdns / unbound under churn: "
               f"{ch['ratio']:.2f}.", "",
               report.table(["server", "steady qps", "churn qps", "of steady", "changes",
                             "change ms p50 / p99"], rows), ""]
    if "patch" in data:
        p = data["patch"]
        md += ["## PATCH latency under saturating DNS load", "",
               report.table(["idle p50 ms", "loaded p50 ms", "p99 ms", "max ms",
                             "completed / planned"],
                            [[f"{p['idle_p50_ms']:.1f}", f"{p['p50_ms']:.1f}",
                              f"{p['p99_ms']:.1f}", f"{p['max_ms']:.1f}",
                              f"{p['completed']} / {p['planned']}"]]), ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
