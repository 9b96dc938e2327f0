"""What counting costs: meshdns with metrics counting on vs off, in the same run.

Method: two meshdns processes serve the same generated registry on loopback,
one normal, one started through bench/uncounted.py (hits not counted, latency
not sampled: the build the metrics are compared against). dnsperf
runs against them in alternating rounds; the median per-round ratio is the
cost. The in-process part times MessageHandler.handle_udp with and without counting
on a cached A answer. Writes bench/results/metrics.md.

    python bench/bench_metrics.py [--rounds 5] [--seconds 5] [--services 10000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import datagen
import peers
import report
import uncounted

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshdns.core.answer import MessageHandler, Zone, ZoneSettings  # noqa: E402
from meshdns.core.registry import Registry, RegistryPolicy, apply_put, parse_services  # noqa: E402


def in_process(services: int, loops: int, repeats: int) -> tuple[float, float]:
    """ns per cached A answer through handle_udp: counted, uncounted (medians)."""
    import dns.message

    specs = parse_services(datagen.meshdns_body(datagen.generate(services))["services"])
    policy = RegistryPolicy()
    reg = apply_put(Registry.empty(), specs, policy, 0.0)
    s = specs[0]
    wire = dns.message.make_query(f"{s.name}.{s.namespace}.svc.{s.port}.mesh", "A").to_wire()
    out = []
    for counting in (True, False):
        r = MessageHandler(Zone(reg, ZoneSettings(range4=policy.range4, range6=policy.range6)))
        handle = r.handle_udp if counting else functools.partial(uncounted._udp, r)
        handle(wire)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            for _ in range(loops):
                handle(wire)
            runs.append((time.perf_counter_ns() - t0) / loops)
        out.append(statistics.median(runs))
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    counted_ns, uncounted_ns = in_process(args.services, 200_000, 7)
    print(f"in-process cached A: counted {counted_ns:.0f} ns, uncounted {uncounted_ns:.0f} ns "
          f"(+{(counted_ns / uncounted_ns - 1) * 100:.1f}%)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="meshdns-bench-metrics-") as tmp:
        work = Path(tmp)
        services = datagen.generate(args.services)
        qfile = datagen.write_lines(work / "queries.txt",
                                    datagen.query_lines(services, "mix", 20_000))
        counted = peers.start_meshdns(work, services)
        uncounted_srv = peers.start_meshdns(work, services,
                                            program=(str(REPO / "bench" / "uncounted.py"),))
        try:
            for i in range(args.rounds):
                # Alternate which goes first, so drift on a shared machine cancels out.
                order = [(counted, "on"), (uncounted_srv, "off")]
                if i % 2:
                    order.reverse()
                got = {}
                for srv, label in order:
                    got[label] = peers.run_dnsperf(srv.port, qfile, args.seconds)
                    print(f"round {i + 1}/{args.rounds} counting {label}: "
                          f"{got[label].qps:,.0f} qps, lost {got[label].lost_pct:.2f}%",
                          flush=True)
                rows.append((got["on"].qps, got["off"].qps))
        finally:
            counted.stop()
            uncounted_srv.stop()

    ratios = [on / off for on, off in rows]
    med = statistics.median(ratios)
    cost = (1 - med) * 100
    print(f"median qps ratio counting on/off: {med:.3f} (cost {cost:.1f}%; goal <= 5%)")
    md = [
        "## Metrics: what counting costs",
        "",
        f"Command: `{report.command_line()}`",
        "",
        "Two meshdns processes with the same registry "
        f"({args.services:,} services), one with counting on and one started with "
        "`bench/uncounted.py` (the CLI with hit counting and latency sampling patched out); dnsperf (`-q 200`, query mix: 80% A, 10% AAAA, "
        f"10% NXDOMAIN) alternates between them, {args.rounds} rounds of {args.seconds:g} s. "
        "Ratios are per round; the machine is shared, so absolute qps drift.",
        "",
        report.table(["round", "counting on (qps)", "counting off (qps)", "on/off"],
                     [(i + 1, f"{on:,.0f}", f"{off:,.0f}", f"{on / off:.3f}")
                      for i, (on, off) in enumerate(rows)]),
        "",
        f"**Median on/off: {med:.3f}, i.e. counting costs {cost:.1f}% of throughput "
        "(goal: at most 5%).**",
        "",
        f"In-process, one cached A answer through `MessageHandler.handle_udp`: counted "
        f"{counted_ns:.0f} ns, uncounted {uncounted_ns:.0f} ns.",
        "",
        report.machine_md(),
    ]
    if not args.no_write:
        path = report.write_result("metrics", "\n".join(md) + "\n",
                                   {"rounds": rows, "median_ratio": med,
                                    "in_process_ns": [counted_ns, uncounted_ns]})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
