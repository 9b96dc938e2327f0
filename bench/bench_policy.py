"""What access control and rate limiting cost on the warm mesh mix (issue 26).

Method: meshdns processes serving the same generated registry on loopback: one with
no policy (a loopback listener with the defaults checks nothing), one with access
control on every datagram (``dns.allow``/``deny``/``allow_recursion`` set), one with
access control and response rate limiting (``dns.rate_limit`` far above the load, so
nothing is limited, with ``rate_limit_loopback``: every reply goes through the bucket
of its /24). dnsperf (``-q 200``, the warm mix: 80% A, 10% AAAA, 10% NXDOMAIN) runs
against them in rotating rounds; ratios are per round, medians shown. Writes
bench/results/policy.md.

    python bench/bench_policy.py [--rounds 3] [--seconds 5] [--services 10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import datagen
import peers
import report

ACL = {"allow": ["127.0.0.0/8"], "deny": ["10.0.0.0/8"], "allow_recursion": ["127.0.0.0/8"]}
CONFIGS = {"none": {}, "acl": ACL,
           "acl+rrl": {**ACL, "rate_limit": 10_000_000, "rate_limit_loopback": True}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    qps: dict[str, list[float]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="meshdns-bench-policy-") as tmp:
        work = Path(tmp)
        services = datagen.generate(args.services)
        qfile = datagen.write_lines(work / "queries.txt",
                                    datagen.query_lines(services, "mix", 20_000))
        servers = {k: peers.start_meshdns(work, services, dns_extra=v)
                   for k, v in CONFIGS.items()}
        try:
            for srv in servers.values():  # warm: every reply cached
                peers.run_dnsperf(srv.port, qfile, 1.0)
            names = list(CONFIGS)
            for i in range(args.rounds):
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order:
                    r = peers.run_dnsperf(servers[name].port, qfile, args.seconds)
                    qps[name].append(r.qps)
                    print(f"round {i + 1}/{args.rounds} {name}: {r.qps:,.0f} qps, "
                          f"lost {r.lost_pct:.2f}%", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()
    ratios = {k: statistics.median(a / b for a, b in zip(qps[k], qps["none"], strict=True))
              for k in CONFIGS}
    for k, v in ratios.items():
        print(f"median qps ratio {k}/none: {v:.3f}")
    md = [
        "## Access control and rate limiting: what they cost",
        "",
        f"Command: `{report.command_line()}`",
        "",
        f"Three meshdns processes with the same registry ({args.services:,} services): "
        "`none` (a loopback listener with the defaults: no per-datagram check), `acl` "
        "(`dns.allow`, `dns.deny`, `dns.allow_recursion` set: every datagram's sender "
        "checked, the verdict remembered per address), `acl+rrl` (also `dns.rate_limit` "
        "10,000,000/s with `rate_limit_loopback`: every reply counted in its /24's bucket, "
        "none limited). dnsperf (`-q 200`, warm mix: 80% A, 10% AAAA, 10% NXDOMAIN) "
        f"rotates over them, {args.rounds} rounds of {args.seconds:g} s after a warm-up.",
        "",
        report.table(["round", *(f"{k} (qps)" for k in CONFIGS)],
                     [(i + 1, *(f"{qps[k][i]:,.0f}" for k in CONFIGS))
                      for i in range(args.rounds)]),
        "",
        "Median per-round ratio to `none`: " + ", ".join(
            f"**{k} {v:.3f}**" for k, v in ratios.items() if k != "none") + ".",
        "",
        report.machine_md(),
    ]
    if not args.no_write:
        path = report.write_result("policy", "\n".join(md) + "\n",
                                   {"qps": qps, "ratios": ratios})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
