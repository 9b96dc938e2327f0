"""Where the forward path's p99 comes from, per stream of bench/pod_traffic.py (issue 23).

For each stream (``pod``: forwarded pod lookups after a warm-up, the 5 s names
expiring; ``new``: a new name for every query, each a forwarded miss) at a paced
rate, the same meshdns is run twice against the same cluster DNS (unbound on
loopback, pod_traffic's zones):

- ``gc on``: as it runs in production, with every pause of CPython's cyclic
  collector recorded (gc.callbacks in the server process: generation, length);
- ``gc off``: the same with the cyclic collector disabled (reference counting still
  frees everything; only the search for cycles is off), which takes GC out of the
  latency and shows what is left: the miss path and the event loop.

and unbound (forward-zone, 1 thread) beside it for reference. Per run: dnsperf's
per-query times (``-v``): mean, p99, p99.9, max; for the pod stream split by kind of
name (the 5 s names that expire and are asked again vs the 300 s names, all hits);
and the GC pauses during the run (count and total per generation, the longest).

Reading it: p99 that drops to unbound's with ``gc off`` is the collector's; p99 that
stays, on the 5 s names only, is the expiring entries (a miss waits for the upstream
round trip plus the miss path); p99 that stays on hits too is the event loop (a
hit queued behind other work in the same turn).

Usage: python bench/forward_p99.py [--rate 5000] [--seconds 4] [--streams pod new]
(run it under ``flock -x /tmp/cpu.lock``; the server-side wrapper is this script's
``--wrap`` mode, which the benchmark starts itself.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datagen
import peers
import pod_traffic as pt


def wrap(log_path: str, mode: str, argv: list[str]) -> None:
    """Server side: record (or switch off) the cyclic GC, then run the meshdns CLI."""
    sys.path.insert(0, os.getcwd())  # the checkout the benchmark runs (cwd = its repo)
    if mode == "off":
        gc.disable()
    started = [0.0]
    out = open(log_path, "a", buffering=1, encoding="ascii")  # noqa: SIM115

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            out.write(f"{info['generation']} {(time.perf_counter() - started[0]) * 1e3:.3f}\n")

    gc.callbacks.append(record)
    from meshdns.cli import main

    sys.argv = ["meshdns", *argv]
    raise SystemExit(main())


def gc_pauses(path: Path) -> dict[str, Any]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    by_gen: dict[int, list[float]] = {}
    for gen, ms in rows:
        by_gen.setdefault(int(gen), []).append(float(ms))
    every = sorted(ms for v in by_gen.values() for ms in v)
    return {"by_gen": {g: (len(v), sum(v)) for g, v in sorted(by_gen.items())},
            "max_ms": every[-1] if every else 0.0,
            "over_1ms": sum(1 for ms in every if ms >= 1.0)}


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="meshdns-p99-") as td, \
            contextlib.ExitStack() as stack:
        work = Path(td)
        upstream = peers.start_unbound_zones(work, pt.zone_lines(200, 200),
                                             pt.external_name(0))
        stack.callback(upstream.stop)
        services = datagen.generate(pt.MESH_SERVICES)
        unbound = peers.start_unbound_forwarding(work, services, upstream.port)
        stack.callback(unbound.stop)
        pod, _ = pt.pod_lines(200, 200, 20_000, 0.5)
        pod_file = datagen.write_lines(work / "pod.txt", pod)
        names = pt.NewNames(work)
        print(f"forward_p99: {args.rate:,.0f} q/s paced, {args.seconds:g} s per run, "
              f"dnsperf -q {args.outstanding}", flush=True)
        for stream in args.streams:
            for label in ("unbound", "meshdns gc on", "meshdns gc off"):
                log = work / f"gc-{stream}-{label.replace(' ', '-')}.txt"
                if label == "unbound":
                    srv = unbound
                else:
                    program = (str(Path(__file__).resolve()), "--wrap", str(log),
                               label.rsplit(" ", 1)[-1])
                    srv = peers.start_meshdns(work, services, program=program,
                                              upstreams=[f"{peers.LOOPBACK}:{upstream.port}"],
                                              search=pt.SEARCH)
                fixed = pod_file if stream == "pod" else None
                if fixed is not None:  # warm the cache, as pod_traffic does
                    peers.run_dnsperf(srv.port, fixed, 60, outstanding=50, extra=["-n", "1"])
                else:  # open the upstream port pool
                    peers.run_dnsperf(srv.port, names.file(20_000), 1, outstanding=200,
                                      extra=["-n", "1"])
                if log.exists():  # only the paced run's pauses (the server appends to it)
                    log.write_text("")
                qfile = fixed or names.file(int(args.rate * args.seconds * 1.1) + 100)
                extra = ["-v"] + (["-n", "1"] if fixed is None else [])
                r = peers.run_dnsperf(srv.port, qfile, args.seconds,
                                      outstanding=args.outstanding, rate=args.rate,
                                      extra=extra)
                per = pt._PER_QUERY.findall(r.raw)
                st = pt.latency_stats([float(t) * 1000 for *_, t in per])
                line = (f"  {stream:<4} {label:<15} got {r.qps:>7,.0f} q/s  mean "
                        f"{st['mean_ms']:.3f}  p99 {st['p99_ms']:.2f}  p99.9 "
                        f"{st['p999_ms']:.2f}  max {st['max_ms']:.1f} ms  lost {r.lost}")
                if label != "unbound":
                    g = gc_pauses(log)
                    gens = ", ".join(f"gen{k} {n} x, {ms:.0f} ms" for k, (n, ms)
                                     in g["by_gen"].items()) or "none"
                    line += f"\n         GC pauses: {gens}; longest {g['max_ms']:.1f} ms"
                    srv.stop()
                print(line, flush=True)
                if stream == "pod":
                    kinds: dict[str, list[float]] = {}
                    for _, qname, _, t in per:
                        kinds.setdefault(pt.pod_kind(qname), []).append(float(t) * 1000)
                    for kind, ms in sorted(kinds.items()):
                        ks = pt.latency_stats(ms)
                        print(f"         {kind:<9} mean {ks['mean_ms']:.3f}  p99 "
                              f"{ks['p99_ms']:.2f} ms  ({len(ms)} queries)", flush=True)
    return 0


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--wrap":
        wrap(sys.argv[2], sys.argv[3], sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=float(pt.BUSY_NODE_QPS))
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--outstanding", "-q", type=int, default=200)
    ap.add_argument("--streams", nargs="+", default=["pod", "new"], choices=["pod", "new"])
    return run(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
