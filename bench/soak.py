"""Soak: meshdns at 70% of its measured max qps for N minutes, sampled every second.

1. meshdns starts with the generated registry (default 10k services) and gets a
   warm pass over the query file;
2. its max qps is measured (unthrottled dnsperf, best of two short runs);
3. dnsperf runs for ``--minutes`` at ``--load`` (default 0.7) of that rate
   (``-Q``) with ``-v``: every answer's latency is read off dnsperf's output
   and bucketed per second (p50/p99/max), alongside meshdns's VmRSS and CPU;
4. the report compares the first and the last window (one minute each, or a
   third of the run when shorter): RSS growth and latency drift.

Usage: python bench/soak.py [--minutes 10] [--load 0.7] [--set mix] [--services 10000]
       (``--minutes 1`` is a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datagen
import peers
import report


def bucket_us(lat_s: float) -> int:
    """Latency histogram bucket in µs: 1 µs steps below 1 ms, then ~1% steps."""
    us = lat_s * 1e6
    if us < 1000:
        return int(us)
    if us < 10_000:
        return int(us // 10 * 10)
    step = 10 ** (int(math.log10(us)) - 2)
    return int(us // step * step)


def percentile(hist: Counter[int], q: float) -> float:
    """The q-quantile (0..1) of a histogram, in ms."""
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = q * (total - 1)
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen > rank:
            return value / 1000
    return max(hist) / 1000


class LatencyReader(threading.Thread):
    """Reads ``dnsperf -v`` output; per wall-clock second a histogram, rcodes and timeouts.

    Reads big chunks and takes the lock once per chunk: at tens of thousands of
    lines a second the reader must stay far cheaper than the load it measures.
    """

    def __init__(self, fd: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.t0 = t0
        self.lock = threading.Lock()
        self.hist: dict[int, Counter[int]] = {}
        self.rcodes: dict[int, Counter[str]] = {}
        self.timeouts: Counter[int] = Counter()
        self.tail: list[str] = []

    def run(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                break
            sec = int(time.monotonic() - self.t0)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            hist: Counter[int] = Counter()
            codes: Counter[str] = Counter()
            timeouts = 0
            for line in lines:
                if line.startswith(b"> "):
                    parts = line.split()
                    try:
                        hist[bucket_us(float(parts[-1]))] += 1
                    except (ValueError, IndexError):
                        continue
                    codes[parts[1].decode()] += 1
                elif line.startswith(b"[Timeout]"):
                    timeouts += 1
                else:
                    self.tail.append(line.decode(errors="replace") + "\n")
            del self.tail[:-60]
            with self.lock:
                self.hist.setdefault(sec, Counter()).update(hist)
                self.rcodes.setdefault(sec, Counter()).update(codes)
                self.timeouts[sec] += timeouts


def measure_max(srv: peers.Server, qfile: Path, seconds: float) -> float:
    with contextlib.suppress(RuntimeError):
        peers.run_dnsperf(srv.port, qfile, 30, outstanding=50, extra=["-n", "1"])
    runs = [peers.run_dnsperf(srv.port, qfile, seconds).qps for _ in range(2)]
    print(f"  max qps runs: {', '.join(f'{q:,.0f}' for q in runs)}", flush=True)
    return max(runs)


def soak(srv: peers.Server, qfile: Path, rate: float, duration: int) -> dict[str, Any]:
    cmd = peers.dnsperf_cmd(srv.port, qfile, duration, rate=rate, extra=["-v"])
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            bufsize=0, start_new_session=True)
    assert proc.stdout is not None
    reader = LatencyReader(proc.stdout.fileno(), t0)
    reader.start()
    cpu_prev = srv.cpu_seconds()
    died = None
    try:
        for sec in range(duration):
            # Sample at the end of second ``sec`` (the reader has filled it by then).
            time.sleep(max(0.0, t0 + sec + 1 - time.monotonic()))
            cpu = srv.cpu_seconds()
            samples.append({"t": sec, "rss_kb": peers.proc_status_kb(srv.pid),
                            "cpu": cpu - cpu_prev})
            cpu_prev = cpu
            if not srv.alive():
                died = f"meshdns exited ({srv.proc.returncode}) at t={sec}s:\n{srv.log_tail()}"
                break
            if sec % 10 == 9 or sec == duration - 1:
                with reader.lock:
                    h = reader.hist.get(sec, Counter())
                    n = sum(h.values())
                print(f"  t={sec + 1:>4}s  {n:>7,} answers/s  p50 {percentile(h, .5):.3f} ms  "
                      f"p99 {percentile(h, .99):.3f} ms  RSS "
                      f"{report.fmt_kb(samples[-1]['rss_kb'])}  cpu "
                      f"{samples[-1]['cpu'] * 100:.0f}%", flush=True)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        reader.join(timeout=10)
    summary = peers.parse_dnsperf("".join(reader.tail))
    with reader.lock:
        for s in samples:
            h = reader.hist.get(s["t"], Counter())
            s.update(answers=sum(h.values()), p50=percentile(h, .5), p99=percentile(h, .99),
                     max_ms=max(h) / 1000 if h else 0.0, timeouts=reader.timeouts[s["t"]],
                     rcodes=dict(reader.rcodes.get(s["t"], {})))
        hist = dict(reader.hist)
    return {"samples": samples, "hist": hist, "summary": summary, "died": died, "cmd": cmd}


def window(samples: list[dict[str, Any]], hist: dict[int, Counter[int]], lo: int,
           hi: int) -> dict[str, float]:
    part = [s for s in samples if lo <= s["t"] < hi]
    merged: Counter[int] = Counter()
    for s in part:
        merged.update(hist.get(s["t"], Counter()))
    n = len(part) or 1
    return {"rss_kb": sum(s["rss_kb"] for s in part) / n,
            "qps": sum(s["answers"] for s in part) / n,
            "cpu": sum(s["cpu"] for s in part) / n,
            "p50": percentile(merged, .5), "p99": percentile(merged, .99),
            "p999": percentile(merged, .999), "max": max(merged) / 1000 if merged else 0.0,
            "timeouts": sum(s["timeouts"] for s in part)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured max qps")
    ap.add_argument("--set", default="mix", choices=list(datagen.QUERY_SETS))
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="length of the max-qps runs")
    args = ap.parse_args()
    if not shutil.which("dnsperf"):
        raise SystemExit("dnsperf is not installed (`make bench-tools`)")
    duration = max(10, int(args.minutes * 60))
    win = min(60, duration // 3)
    services = datagen.generate(args.services)
    with tempfile.TemporaryDirectory(prefix="meshdns-soak-") as td:
        work = Path(td)
        qfile = datagen.write_lines(work / f"queries-{args.set}.txt",
                                    datagen.query_lines(services, args.set, 10_000))
        with peers.running("meshdns", work, services) as srv:
            print(f"meshdns with {args.services:,} services on :{srv.port}; measuring max qps "
                  f"({datagen.QUERY_SETS[args.set]}) ...", flush=True)
            max_qps = measure_max(srv, qfile, args.max_seconds)
            rate = max_qps * args.load
            print(f"  soaking {duration}s at {rate:,.0f} q/s ({args.load:.0%} of "
                  f"{max_qps:,.0f}) ...", flush=True)
            res = soak(srv, qfile, rate, duration)
            port = srv.port
    samples, hist = res["samples"], res["hist"]
    if not samples:
        raise SystemExit("no samples")
    end = samples[-1]["t"] + 1
    first, last = window(samples, hist, 0, win), window(samples, hist, end - win, end)
    s = res["summary"]
    growth = last["rss_kb"] - first["rss_kb"]
    headers = ["window", "RSS (mean)", "answers/s", "meshdns CPU", "p50", "p99", "p99.9",
               "max", "timeouts"]

    def row(name: str, w: dict[str, float]) -> list[str]:
        return [name, report.fmt_kb(w["rss_kb"]), report.fmt_int(w["qps"]),
                f"{w['cpu'] * 100:.0f}%", f"{w['p50']:.3f} ms", f"{w['p99']:.3f} ms",
                f"{w['p999']:.3f} ms", f"{w['max']:.1f} ms", str(int(w["timeouts"]))]

    rows = [row(f"first {win} s", first), row(f"last {win} s", last)]
    drift = [
        f"RSS growth first -> last window: {growth / 1024:+.2f} MiB "
        f"({100 * growth / first['rss_kb']:+.1f}%); peak VmRSS sample "
        f"{report.fmt_kb(max(x['rss_kb'] for x in samples))}",
        f"latency drift: p50 {first['p50']:.3f} -> {last['p50']:.3f} ms, "
        f"p99 {first['p99']:.3f} -> {last['p99']:.3f} ms",
        f"dnsperf totals: sent {s.sent:,}, completed {s.completed:,}, lost {s.lost:,} "
        f"({s.lost_pct:.3f}%), avg latency {s.avg_ms:.3f} ms, achieved {s.qps:,.0f} q/s, "
        f"rcodes {s.rcodes}",
    ]
    mean_cpu = sum(x["cpu"] for x in samples) / len(samples)
    achieved = s.qps / rate if rate else 0.0
    drift.append(f"target {rate:,.0f} q/s, achieved {s.qps:,.0f} q/s ({achieved:.0%}); "
                 f"meshdns CPU {mean_cpu:.0%} of one core on average")
    if achieved < 0.95:
        who = ("meshdns was not CPU-bound, so the shortfall is dnsperf (with -v) and the "
               "shared machine" if mean_cpu < 0.8 else "meshdns was close to CPU-bound")
        drift.append(f"**the load fell short of the target**: {who}")
    if res["died"]:
        drift.insert(0, f"**meshdns died during the soak**: {res['died']}")
    shown = " ".join(res["cmd"]).replace(str(qfile), "FILE").replace(f"-p {port} ", "-p PORT ")
    step = 60 if duration >= 300 else 10
    series = []
    for lo in range(0, end, step):
        w = window(samples, hist, lo, min(end, lo + step))
        series.append([f"{lo}-{min(end, lo + step)} s", report.fmt_kb(w["rss_kb"]),
                       report.fmt_int(w["qps"]), f"{w['cpu'] * 100:.0f}%",
                       f"{w['p50']:.3f} ms", f"{w['p99']:.3f} ms", f"{w['p999']:.3f} ms",
                       f"{w['max']:.1f} ms", str(int(w["timeouts"]))])
    print()
    print(report.text_table(headers, rows))
    for line in drift:
        print(line)
    md = [
        "# Soak: steady load over time",
        "",
        f"Command: `{report.command_line()}`",
        "",
        report.machine_md(),
        "",
        "## Method",
        "",
        f"meshdns (`dns.workers: 1`) with {args.services:,} generated services; query set "
        f"{datagen.QUERY_SETS[args.set]} (10,000 lines, looped). Max qps = best of two "
        f"unthrottled {args.max_seconds:g} s dnsperf runs after a warm pass: "
        f"**{max_qps:,.0f} q/s**. Then `{shown}` "
        f"({args.load:.0%}, {duration} s). Per second: latency of every answer from dnsperf's "
        "`-v` lines (histogram, 1 µs resolution below 1 ms), VmRSS and CPU of the meshdns "
        "process from /proc. Windows compare the start and the end of the run.",
        "",
        report.table(headers, rows),
        "",
        *[f"- {line}" for line in drift],
        "",
        f"## Every {step} s",
        "",
        report.table(headers, series),
        "",
    ]
    path = report.write_result("soak", "\n".join(md), {
        "max_qps": max_qps, "rate": rate, "duration": duration, "first": first, "last": last,
        "samples": samples, "machine": report.machine_info()})
    print(f"\nwrote {path}")
    return 1 if res["died"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
