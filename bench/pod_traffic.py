"""Pod traffic through a DNS sidecar: mesh names, forwarded pod lookups, new names (issue 23).

What a pod asks its sidecar, side by side on four sidecars that each answer 1,000
mesh names themselves and forward everything else to one cluster DNS:

- **cluster DNS**: unbound (1 thread) on 127.0.0.1 started by this script, static
  zones only: ``cluster.local`` (services ``app<j>.shop.svc.cluster.local`` A, TTL
  5 s, CoreDNS's default; SOA minimum 5, so negative answers carry an SOA and live 5 s)
  and ``example.com`` (``api<i>.example.com`` A, half of them also AAAA, TTL 300;
  SOA minimum 300), plus ``new.example.com`` as a redirect zone (every name under it
  answers one A, TTL 300) for the every-query-new stream.
- **sidecars**: meshdns (``dns.workers: 1``, ``dns.upstreams`` = the cluster DNS,
  ``dns.search`` = the pod's search list); unbound (1 thread) with the mesh names as
  local data and ``forward-zone: "."``; dnsmasq with ``host-record`` lines and
  ``server=``; Kuma's DNS proxy (``/work/shared/peers/kumadp``, Go + miekg/dns, no
  cache), built with Go from Debian when missing (skipped with a note where Go cannot
  be installed).
- **streams** (dnsperf ``-q 200``, alternating rounds, median over rounds):
  ``mesh``: the 1,000 mesh names, A 80% / AAAA 20%. ``pod``: app lookups expanded as
  glibc does with ``options ndots:5`` and ``search shop.svc.cluster.local
  svc.cluster.local cluster.local``: A and AAAA for each candidate in order until one
  exists, so an external ``api7.example.com`` is 8 queries (6 NXDOMAIN under
  cluster.local, then the name) and a cluster service ``app3`` is 2 (its first
  candidate ``app3.shop.svc.cluster.local`` exists), after one warm-up pass. ``new``:
  a name never asked before for every query (``n<k>.new.example.com A``), each one a
  forwarded miss.
- **per server**: qps; server CPU per query (/proc of its process group, user+system,
  over its rounds); latency (mean, p99 from ``dnsperf -v`` per-query output) at two
  paced rates: 5,000 qps and 30% of unbound's maximum for that stream, measured in
  the same run. For the pod stream the paced latency is also split by kind of name,
  which says whether the p99 comes from the 5 s names that keep expiring (misses) or
  from hits kept waiting.

Writes bench/results/pod_traffic.md (+ .json), which ``report.py`` puts into
bench/RESULTS.md. ``--quick``: short rounds, printed only (``--write`` to keep them).

Usage: python bench/pod_traffic.py [--quick] [--rounds 3] [--seconds 4]
       [--paced-seconds 3] [--streams mesh pod new] [--servers meshdns unbound dnsmasq kumadp]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datagen
import peers
import report

POD_NAMESPACE = "shop"
SEARCH = (f"{POD_NAMESPACE}.svc.cluster.local", "svc.cluster.local", "cluster.local")
NDOTS = 5
CLUSTER_TTL = 5
EXTERNAL_TTL = 300
MISS_ZONE = "new.example.com"
MESH_SERVICES = 1000
ALL_SERVERS = ("meshdns", "unbound", "dnsmasq", "kumadp")
STREAMS = {
    "mesh": "mesh names (A 80%, AAAA 20%)",
    "pod": "pod lookups, forwarded (glibc ndots:5, 3 search suffixes, A+AAAA), after a warm-up",
    "new": "every query a new name (forwarded miss)",
}
EXPECTED = {"mesh": {"NOERROR"}, "pod": {"NOERROR", "NXDOMAIN"}, "new": {"NOERROR"}}
BUSY_NODE_QPS = 5000
UNBOUND_SHARE = 0.3


# ---------------------------------------------------------------- names and zones


def glibc_queries(name: str, exists: Callable[[str], bool], search: Sequence[str] = SEARCH,
                  ndots: int = NDOTS) -> list[tuple[str, str]]:
    """The (name, type) queries glibc's getaddrinfo(AF_UNSPEC) sends for ``name``, in its
    order: a name with fewer than ``ndots`` dots tries each search suffix first, then the
    name itself (more dots: the name first); each candidate is asked A and AAAA (sent
    together), and the first candidate that ``exists`` ends the lookup."""
    name = name.rstrip(".")
    suffixed = [f"{name}.{s}" for s in search]
    candidates = [*suffixed, name] if name.count(".") < ndots else [name, *suffixed]
    out: list[tuple[str, str]] = []
    for cand in candidates:
        out += [(cand, "A"), (cand, "AAAA")]
        if exists(cand):
            break
    return out


def cluster_name(j: int) -> str:
    return f"app{j}.{SEARCH[0]}"


def external_name(i: int) -> str:
    return f"api{i}.example.com"


def zone_lines(n_cluster: int, n_external: int) -> list[str]:
    """The cluster DNS's server-clause lines: cluster.local (5 s, SOA minimum 5),
    example.com (300 s; even ``api<i>`` also have AAAA), the redirect zone for new names."""
    lines = [
        'local-zone: "cluster.local." static',
        f'local-data: "cluster.local. {CLUSTER_TTL} IN SOA ns.dns.cluster.local. '
        f'hostmaster.cluster.local. 1 7200 1800 86400 {CLUSTER_TTL}"',
        'local-zone: "example.com." static',
        f'local-data: "example.com. {EXTERNAL_TTL} IN SOA ns.example.com. '
        f'hostmaster.example.com. 1 7200 1800 86400 {EXTERNAL_TTL}"',
        f'local-zone: "{MISS_ZONE}." redirect',
        f'local-data: "{MISS_ZONE}. {EXTERNAL_TTL} IN A 192.0.2.250"',
    ]
    for j in range(n_cluster):
        lines.append(f'local-data: "{cluster_name(j)}. {CLUSTER_TTL} IN A '
                     f'10.96.{j // 250}.{j % 250 + 1}"')
    for i in range(n_external):
        lines.append(f'local-data: "{external_name(i)}. {EXTERNAL_TTL} IN A '
                     f'198.51.{i // 250}.{i % 250 + 1}"')
        if i % 2 == 0:
            lines.append(f'local-data: "{external_name(i)}. {EXTERNAL_TTL} IN AAAA '
                         f'2001:db8::{i + 1:x}"')
    return lines


def pod_lines(n_cluster: int, n_external: int, lookups: int, cluster_share: float,
              seed: int = 23) -> tuple[list[str], Counter[str]]:
    """dnsperf lines for ``lookups`` app lookups (a share ``cluster_share`` of them of a
    cluster service by its short name, the rest of an external name), each expanded as
    glibc does; and how many queries each kind of name got."""
    rng = random.Random(seed)
    known = {cluster_name(j) for j in range(n_cluster)}
    known |= {external_name(i) for i in range(n_external)}
    lines: list[str] = []
    kinds: Counter[str] = Counter()
    for _ in range(lookups):
        if rng.random() < cluster_share:
            asked = f"app{rng.randrange(n_cluster)}"
        else:
            asked = external_name(rng.randrange(n_external))
        for qname, qtype in glibc_queries(asked, known.__contains__):
            lines.append(f"{qname} {qtype}")
            kinds[pod_kind(qname)] += 1
    return lines, kinds


POD_KINDS = {
    "cluster": f"cluster service, first candidate (TTL {CLUSTER_TTL} s)",
    "expansion": f"search expansion of an external name: NXDOMAIN (SOA, {CLUSTER_TTL} s)",
    "external": f"external name (TTL {EXTERNAL_TTL} s; AAAA of odd ones NODATA)",
}


def pod_kind(qname: str) -> str:
    qname = qname.rstrip(".").lower()
    if qname.endswith(".example.com"):
        return "external"
    if qname.startswith("app") and qname.count(".") == 4:
        return "cluster"
    return "expansion"


def mesh_lines(services: Sequence[datagen.Svc], count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [f"{services[rng.randrange(len(services))].fqdn} "
            f"{'A' if rng.random() < 0.8 else 'AAAA'}" for _ in range(count)]


class NewNames:
    """Query files of names never asked before (``n<k>.new.example.com A``, k counting
    up across the whole run), one file per dnsperf run, run once (``-n 1``)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.serial = 0

    def file(self, count: int) -> Path:
        start = self.serial
        self.serial += count
        path = self.workdir / "new-names.txt"
        path.write_text("".join(f"n{k}.{MISS_ZONE} A\n" for k in range(start, start + count)),
                        encoding="ascii")
        return path


# ---------------------------------------------------------------- servers


def start_sidecars(names: Sequence[str], workdir: Path, services: Sequence[datagen.Svc],
                   upstream: int, kumadp: Path | None, stack: contextlib.ExitStack
                   ) -> tuple[list[peers.Server], list[str]]:
    starters: dict[str, Callable[[], peers.Server]] = {
        "meshdns": lambda: peers.start_meshdns(workdir, services,
                                               upstreams=[f"{peers.LOOPBACK}:{upstream}"],
                                               search=SEARCH),
        "unbound": lambda: peers.start_unbound_forwarding(workdir, services, upstream),
        "dnsmasq": lambda: peers.start_dnsmasq_forwarding(workdir, services, upstream),
        "kumadp": lambda: peers.start_kumadp(workdir, services, upstream,
                                             binary=kumadp or peers.KUMADP_BINARY),
    }
    servers, notes = [], []
    for name in names:
        if name == "kumadp" and kumadp is None:
            continue  # the build step said why
        if not peers.available(name):
            notes.append(f"{name}: skipped, `{peers.BINARIES[name]}` not installed "
                         "(`make bench-tools`)")
            continue
        t0 = time.monotonic()
        try:
            srv = starters[name]()
        except peers.ServerFailed as exc:
            notes.append(f"{name}: failed to start: {str(exc).splitlines()[0]}")
            continue
        stack.callback(srv.stop)
        print(f"  started {name:<8} on 127.0.0.1:{srv.port} in {time.monotonic() - t0:.1f}s "
              f"(pids {srv.pids()})", flush=True)
        servers.append(srv)
    return servers, notes


# ---------------------------------------------------------------- measuring

_PER_QUERY = re.compile(r"^> (\S+) (\S+) (\S+) ([0-9.]+)$", re.MULTILINE)


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not sorted_xs:
        return 0.0
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(p / 100 * len(sorted_xs)) - 1))]


def latency_stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"n": len(ms), "mean_ms": sum(ms) / len(ms) if ms else 0.0,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "p999_ms": percentile(ms, 99.9), "max_ms": ms[-1] if ms else 0.0}


class Bench:
    """One stream's rounds over the running sidecars."""

    def __init__(self, servers: list[peers.Server], upstream: peers.Server,
                 new_names: NewNames, args: argparse.Namespace) -> None:
        self.servers = servers
        self.upstream = upstream
        self.new = new_names
        self.args = args

    def one_run(self, srv: peers.Server, stream: str, fixed: Path | None, seconds: float,
                rate: float | None = None) -> dict[str, Any]:
        """One dnsperf run, with the server's and the cluster DNS's CPU over it. A new-name
        file holds enough names for the run, asked once (``-n 1``): none is repeated."""
        extra: list[str] = ["-v"] if rate is not None else []
        qfile = fixed
        if qfile is None:
            qfile = self.new.file(int((rate or self.args.new_max_qps) * seconds * 1.05) + 100)
            extra += ["-n", "1"]
        u0, c0 = srv.cpu_seconds(), self.upstream.cpu_seconds()
        r = peers.run_dnsperf(srv.port, qfile, seconds, outstanding=self.args.outstanding,
                              rate=rate, extra=extra)
        cpu, up_cpu = srv.cpu_seconds() - u0, self.upstream.cpu_seconds() - c0
        run: dict[str, Any] = {
            "qps": r.qps, "sent": r.sent, "completed": r.completed, "lost": r.lost,
            "runtime": r.runtime, "avg_ms": r.avg_ms, "rcodes": r.rcodes, "cpu_s": cpu,
            "upstream_cpu_s": up_cpu,
            "ran_out": fixed is None and r.runtime < seconds * 0.95}
        if rate is not None:
            per = _PER_QUERY.findall(r.raw)
            run["latency"] = latency_stats([float(t) * 1000 for *_, t in per])
            if stream == "pod":
                by_kind: dict[str, list[float]] = {}
                for _, qname, _, t in per:
                    by_kind.setdefault(pod_kind(qname), []).append(float(t) * 1000)
                run["latency_by_kind"] = {k: latency_stats(v) for k, v in by_kind.items()}
        return run

    def warm(self, fixed: Path | None) -> None:
        if fixed is None:
            return  # nothing to warm: every name is new
        for srv in self.servers:
            with contextlib.suppress(RuntimeError):
                peers.run_dnsperf(srv.port, fixed, 60, outstanding=50, extra=["-n", "1"])

    def stream(self, stream: str, fixed: Path | None) -> dict[str, Any]:
        a = self.args
        t0 = time.monotonic()
        print(f"\n  stream {stream}: {STREAMS[stream]}", flush=True)
        self.warm(fixed)
        rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in self.servers}
        for rnd in range(1, a.rounds + 1):
            for srv in self.servers:
                try:
                    run = self.one_run(srv, stream, fixed, a.seconds)
                except RuntimeError as exc:
                    print(f"    {srv.name}: dnsperf failed: {str(exc)[:200]}", flush=True)
                    continue
                rounds[srv.name].append(run)
                print(f"    round {rnd}/{a.rounds} {srv.name:<8} {run['qps']:>10,.0f} q/s  "
                      f"lost {run['lost']:>5}  cpu {run['cpu_s']:5.2f} s  "
                      f"{dict(run['rcodes'])}{'  (ran out of names)' if run['ran_out'] else ''}",
                      flush=True)
        summary = {name: summarize(runs, stream) for name, runs in rounds.items()}
        unbound_max = summary.get("unbound", {}).get("qps_median", 0.0)
        rates = [float(BUSY_NODE_QPS)]
        if unbound_max:
            rates.append(round(unbound_max * UNBOUND_SHARE, -2))
        paced: dict[str, dict[str, dict[str, Any]]] = {}
        for rate in rates:
            key = f"{rate:.0f}"
            paced[key] = {}
            for srv in self.servers:
                try:
                    run = self.one_run(srv, stream, fixed, a.paced_seconds, rate=rate)
                except RuntimeError as exc:
                    print(f"    {srv.name}: paced dnsperf failed: {str(exc)[:200]}", flush=True)
                    continue
                paced[key][srv.name] = run
                lat = run["latency"]
                print(f"    paced {rate:>7,.0f} q/s {srv.name:<8} got {run['qps']:>8,.0f}  "
                      f"mean {lat['mean_ms']:.3f} ms  p99 {lat['p99_ms']:.3f} ms  "
                      f"max {lat['max_ms']:.1f} ms  lost {run['lost']}", flush=True)
        print(f"  stream {stream}: {time.monotonic() - t0:.0f} s", flush=True)
        return {"stream": stream, "label": STREAMS[stream], "servers": summary,
                "rounds": rounds, "rates": rates, "paced": paced,
                "ratio_unbound": per_round_ratio(rounds, "meshdns", "unbound")}


def summarize(runs: list[dict[str, Any]], stream: str) -> dict[str, Any]:
    if not runs:
        return {"qps_median": 0.0, "rounds": 0}
    completed = sum(r["completed"] for r in runs)
    sent = sum(r["sent"] for r in runs)
    rcodes: Counter[str] = Counter()
    for r in runs:
        rcodes.update(r["rcodes"])
    qps = [r["qps"] for r in runs]
    return {
        "qps_median": report.median(qps), "qps_min": min(qps), "qps_max": max(qps),
        "rounds": len(runs), "sent": sent, "lost": sum(r["lost"] for r in runs),
        "cpu_us_per_query": sum(r["cpu_s"] for r in runs) / completed * 1e6 if completed else 0,
        "upstream_cpu_us_per_query":
            sum(r["upstream_cpu_s"] for r in runs) / completed * 1e6 if completed else 0,
        "rcodes": dict(rcodes),
        "unexpected": {k: v for k, v in rcodes.items() if k not in EXPECTED[stream]},
        "ran_out": any(r["ran_out"] for r in runs),
    }


def per_round_ratio(rounds: dict[str, list[dict[str, Any]]], a: str, b: str) -> float | None:
    ratios = [x["qps"] / y["qps"] for x, y in zip(rounds.get(a, []), rounds.get(b, []),
                                                  strict=False) if y["qps"] > 0]
    return report.median(ratios) if ratios else None


# ---------------------------------------------------------------- report


def best_peer(result: dict[str, Any]) -> tuple[str, float] | None:
    peers_ = [(n, s["qps_median"]) for n, s in result["servers"].items()
              if n != "meshdns" and s.get("qps_median")]
    return max(peers_, key=lambda p: p[1]) if peers_ else None


def qps_table(results: list[dict[str, Any]], names: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["query stream", *names, "meshdns / best peer", "meshdns / unbound"]
    rows = []
    for res in results:
        row = [res["label"]]
        for n in names:
            s = res["servers"].get(n)
            if not s or not s.get("rounds"):
                row.append("-")
                continue
            flag = " (!)" if s["unexpected"] or s["ran_out"] else ""
            row.append(f"{s['qps_median'] / 1000:.1f}k ({s['qps_min'] / 1000:.0f}.."
                       f"{s['qps_max'] / 1000:.0f}k){flag}")
        mesh = res["servers"].get("meshdns", {}).get("qps_median", 0.0)
        best = best_peer(res)
        row.append(f"**{mesh / best[1]:.2f}x** ({best[0]})" if best and mesh else "-")
        ratio = res["ratio_unbound"]
        row.append(f"**{ratio:.2f}x**" if ratio is not None else "-")
        rows.append(row)
    return headers, rows


def cpu_table(results: list[dict[str, Any]], names: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["query stream", *[f"{n}" for n in names], "cluster DNS, per query (with meshdns)"]
    rows = []
    for res in results:
        row = [res["label"]]
        for n in names:
            s = res["servers"].get(n)
            row.append(f"{s['cpu_us_per_query']:.1f} µs" if s and s.get("rounds") else "-")
        m = res["servers"].get("meshdns")
        row.append(f"{m['upstream_cpu_us_per_query']:.1f} µs" if m and m.get("rounds") else "-")
        rows.append(row)
    return headers, rows


def latency_table(results: list[dict[str, Any]], names: list[str]
                  ) -> tuple[list[str], list[list[str]]]:
    headers = ["query stream", "paced rate", *[f"{n} mean / p99" for n in names],
               "meshdns mean / unbound", "meshdns p99 / unbound"]
    rows = []
    for res in results:
        for rate, per in res["paced"].items():
            row = [res["stream"], f"{int(rate):,} q/s"]
            for n in names:
                run = per.get(n)
                if not run:
                    row.append("-")
                    continue
                lat = run["latency"]
                lost = f", {run['lost']} lost" if run["lost"] else ""
                row.append(f"{lat['mean_ms']:.3f} / {lat['p99_ms']:.2f} ms{lost}")
            m, u = per.get("meshdns"), per.get("unbound")
            if m and u and u["latency"]["mean_ms"] and u["latency"]["p99_ms"]:
                row.append(f"{m['latency']['mean_ms'] / u['latency']['mean_ms']:.2f}x")
                row.append(f"{m['latency']['p99_ms'] / u['latency']['p99_ms']:.2f}x")
            else:
                row += ["-", "-"]
            rows.append(row)
    return headers, rows


def kind_table(pod: dict[str, Any], names: list[str], kinds: Counter[str]
               ) -> tuple[list[str], list[list[str]]]:
    """Paced pod-stream latency by kind of name at the busy-node rate."""
    headers = ["kind of name", "share of queries", *[f"{n} mean / p99" for n in names]]
    per = pod["paced"].get(f"{BUSY_NODE_QPS}", {})
    total = sum(kinds.values())
    rows = []
    for kind, label in POD_KINDS.items():
        row = [label, f"{100 * kinds[kind] / total:.0f}%" if total else "-"]
        for n in names:
            st = per.get(n, {}).get("latency_by_kind", {}).get(kind)
            row.append(f"{st['mean_ms']:.3f} / {st['p99_ms']:.2f} ms" if st else "-")
        rows.append(row)
    return headers, rows


def targets(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The issue's targets, each with the measured figure and met / not met."""
    out: list[list[str]] = []

    def qps(stream: str, name: str) -> float:
        return float(results.get(stream, {}).get("servers", {}).get(name, {})
                     .get("qps_median", 0.0))

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    if "pod" in results and qps("pod", "unbound"):
        r = results["pod"]["ratio_unbound"] or 0.0
        out.append(["forwarded pod lookups ≥ 1.0x unbound", f"{r:.2f}x", verdict(r >= 1.0)])
    if "new" in results:
        if qps("new", "kumadp"):
            r = qps("new", "meshdns") / qps("new", "kumadp")
            out.append(["every-query-new ≥ 1.0x Kuma's proxy", f"{r:.2f}x", verdict(r >= 1.0)])
        if qps("new", "unbound"):
            r = results["new"]["ratio_unbound"] or 0.0
            out.append(["every-query-new ≥ 0.8x unbound (aim 1.0x)", f"{r:.2f}x",
                        verdict(r >= 0.8)])
    if "mesh" in results and (best := best_peer(results["mesh"])):
        r = qps("mesh", "meshdns") / best[1]
        out.append([f"mesh names ≥ 1.2x the best peer ({best[0]})", f"{r:.2f}x",
                    verdict(r >= 1.2)])
    for stream, res in results.items():
        for rate, per in res["paced"].items():
            m, u = per.get("meshdns"), per.get("unbound")
            if not (m and u):
                continue
            mm, um = m["latency"]["mean_ms"], u["latency"]["mean_ms"]
            mp, up = m["latency"]["p99_ms"], u["latency"]["p99_ms"]
            out.append([f"{stream} at {int(rate):,} q/s: mean ≤ unbound",
                        f"{mm:.3f} vs {um:.3f} ms", verdict(mm <= um)])
            out.append([f"{stream} at {int(rate):,} q/s: p99 ≤ 2x unbound",
                        f"{mp:.2f} vs {up:.2f} ms ({mp / up:.1f}x)" if up else f"{mp:.2f} ms",
                        verdict(mp <= 2 * up)])
    return out


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short rounds (2 x 2 s, paced 2 s), printed only unless --write")
    ap.add_argument("--write", action="store_true", help="write results even with --quick")
    ap.add_argument("--no-write", action="store_true", help="print only, no results file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="per qps round")
    ap.add_argument("--paced-seconds", type=float, default=3.0, help="per paced run")
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    ap.add_argument("--servers", nargs="+", default=list(ALL_SERVERS), choices=ALL_SERVERS)
    ap.add_argument("--outstanding", "-q", type=int, default=200)
    ap.add_argument("--cluster-services", type=int, default=200)
    ap.add_argument("--external-names", type=int, default=200)
    ap.add_argument("--lookups", type=int, default=20_000,
                    help="app lookups in the pod query file (each 2 or 8 queries)")
    ap.add_argument("--cluster-share", type=float, default=0.5,
                    help="share of app lookups that ask a cluster service")
    ap.add_argument("--new-max-qps", type=float, default=80_000,
                    help="names per second of a new-name file (more: the run ends early)")
    ap.add_argument("--kumadp", type=Path, default=peers.KUMADP_BINARY,
                    help="Kuma proxy binary (built from ../shared/peers/kumadp when missing)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.paced_seconds = 2, 2.0, 2.0
    write = not args.no_write and (args.write or not args.quick)
    if not shutil.which("dnsperf") or not shutil.which("unbound"):
        raise SystemExit("dnsperf and unbound are needed (`make bench-tools`)")
    started = time.monotonic()
    load_start = report.machine_info()["loadavg"]
    machine = report.machine_md()  # its load average is the one at the start
    notes: list[str] = []
    kumadp: Path | None = None
    if "kumadp" in args.servers:
        kumadp, note = peers.build_kumadp(binary=args.kumadp)
        print(f"  {note}", flush=True)
        if kumadp is None:
            notes.append(note)
    services = datagen.generate(MESH_SERVICES)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="meshdns-pod-") as td, \
            contextlib.ExitStack() as stack:
        work = Path(td)
        upstream = peers.start_unbound_zones(
            work, zone_lines(args.cluster_services, args.external_names), external_name(0))
        stack.callback(upstream.stop)
        print(f"  cluster DNS: unbound on 127.0.0.1:{upstream.port}", flush=True)
        servers, start_notes = start_sidecars(args.servers, work, services, upstream.port,
                                              kumadp, stack)
        notes += start_notes
        if not servers:
            raise SystemExit("no sidecar started: " + "; ".join(notes))
        names = [s.name for s in servers]
        pod, kinds = pod_lines(args.cluster_services, args.external_names, args.lookups,
                               args.cluster_share)
        files = {
            "mesh": datagen.write_lines(work / "mesh.txt", mesh_lines(services, 10_000)),
            "pod": datagen.write_lines(work / "pod.txt", pod),
            "new": None,
        }
        bench = Bench(servers, upstream, NewNames(work), args)
        for stream in STREAMS:  # mesh, pod, then the flood of new names last
            if stream in args.streams:
                results[stream] = bench.stream(stream, files[stream])
        for srv in servers:
            if not srv.alive():
                notes.append(f"{srv.name} exited during the run: {srv.log_tail(3)}")
    elapsed = time.monotonic() - started
    for res in results.values():
        for n, s in res["servers"].items():
            if s.get("unexpected"):
                notes.append(f"{res['stream']}: {n} answered unexpected rcodes {s['unexpected']}")
            if s.get("ran_out"):
                notes.append(f"{res['stream']}: {n} used up its new-name file before the "
                             "round's end (raise --new-max-qps); its qps is over the shorter run")
    md = render(args, results, names, kinds, notes, machine, load_start, elapsed)
    print("\n" + md)
    if write:
        data = {"args": {k: str(v) for k, v in vars(args).items()}, "streams": results,
                "pod_kinds": dict(kinds), "notes": notes, "machine": report.machine_info(),
                "load_at_start": load_start, "elapsed_s": elapsed}
        path = report.write_result("pod_traffic", md, data)
        print(f"\nwrote {path} (then `python bench/report.py` assembles RESULTS.md)")
    return 0


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]], names: list[str],
           kinds: Counter[str], notes: list[str], machine: str, load_start: str,
           elapsed: float) -> str:
    versions = {
        "meshdns": report.tool_version([peers.project_python(), "-m", "meshdns", "--version"]),
        "unbound": report.tool_version(["unbound", "-V"]),
        "dnsmasq": report.tool_version(["dnsmasq", "--version"]),
        "dnsperf": report.tool_version(["dnsperf", "-h"]),
    }
    res = list(results.values())
    total = sum(kinds.values())
    per_lookup = total / args.lookups if args.lookups else 0
    md = [
        "# Pod traffic through a sidecar: mesh names, forwarded lookups, new names",
        "",
        f"Command: `{report.command_line()}`",
        "",
        machine,
        f"- load average at the end: {report.machine_info()['loadavg']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- wall time: {elapsed:.0f} s",
        "",
        "## Method",
        "",
        f"Cluster DNS: unbound 1 thread on 127.0.0.1, static zones only: `cluster.local` "
        f"({args.cluster_services} services `app<j>.{SEARCH[0]}` A, TTL {CLUSTER_TTL} s, "
        f"SOA minimum {CLUSTER_TTL}: negative answers carry the SOA), `example.com` "
        f"({args.external_names} names `api<i>.example.com` A, every second one also AAAA, "
        f"TTL {EXTERNAL_TTL} s, SOA minimum {EXTERNAL_TTL}), and `{MISS_ZONE}` as a redirect "
        "zone (any name under it: one A).",
        "",
        f"Sidecars, each answering the same {MESH_SERVICES:,} mesh names "
        "(`bench/datagen.py`) itself and forwarding the rest to the cluster DNS: "
        "meshdns (`dns.workers: 1`, `dns.upstreams: [cluster DNS]`, `dns.search` = the pod's "
        "search list, defaults otherwise: `cache_size` 10000); unbound 1 thread, mesh names as "
        "`local-data`, `forward-zone: \".\"`, its defaults (no prefetch); dnsmasq "
        "`host-record` + `server=`, `cache-size=10000`, `dns-forward-max=1000`; Kuma's DNS "
        "proxy (`/work/shared/peers/kumadp`: Go + miekg/dns, no cache, a new client per "
        "forwarded query; the Go runtime uses both CPUs).",
        "",
        f"Streams: **mesh**: 10,000 lines over the mesh names, A 80% / AAAA 20%. **pod**: "
        f"{args.lookups:,} app lookups ({args.cluster_share:.0%} a cluster service by its "
        "short name, the rest an external name), each expanded as glibc's getaddrinfo does "
        f"with `options ndots:{NDOTS}` and `search {' '.join(SEARCH)}`: A and AAAA for each "
        "candidate in order until one exists, so `api7.example.com` is 8 queries (6 NXDOMAIN "
        f"under cluster.local, then A and AAAA of the name) and `app3` is 2 "
        f"(`app3.{SEARCH[0]}` exists) — {total:,} queries, {per_lookup:.1f} per lookup; one "
        "warm-up pass, then the 5 s names keep expiring during the rounds. **new**: "
        f"`n<k>.{MISS_ZONE} A` with k counting up over the whole run, each file asked once "
        "(`dnsperf -n 1`): every query is a forwarded miss.",
        "",
        f"Load: `dnsperf -s 127.0.0.1 -p PORT -d FILE -l {args.seconds:g} -q "
        f"{args.outstanding} -t 2`, {args.rounds} rounds alternating between servers (A, B, "
        "C, D, A, ...), median (min..max) over rounds; meshdns / unbound is the median of "
        "per-round ratios, meshdns / best peer the ratio of medians. Server CPU per query: "
        "user+system CPU of the sidecar's process group over its rounds (/proc/PID/stat) ÷ "
        "completed queries. Paced latency: `dnsperf -Q RATE -v -l "
        f"{args.paced_seconds:g}` at {BUSY_NODE_QPS:,} q/s (a busy node) and at "
        f"{UNBOUND_SHARE:.0%} of unbound's median qps for that stream in this run, mean and "
        "p99 (nearest rank) of the per-query times dnsperf prints; lost queries (2 s) are "
        "not in them. dnsperf, the sidecar and the cluster DNS share the machine's CPUs.",
        "",
        f"Load average when the run started: {load_start} (the machine is shared: read the "
        "ratios, measured in the same minutes, more than the absolutes).",
        "",
        "## Queries per second",
        "",
        report.table(*qps_table(res, names)),
        "",
        "## Server CPU per query",
        "",
        report.table(*cpu_table(res, names)),
        "",
        "## Latency at paced rates",
        "",
        report.table(*latency_table(res, names)),
        "",
    ]
    if "pod" in results:
        md += ["### Pod stream at the busy-node rate, by kind of name", "",
               f"Where the pod stream's latency comes from at {BUSY_NODE_QPS:,} q/s: the "
               f"{CLUSTER_TTL} s names expire and are asked upstream again (a miss per name "
               f"every {CLUSTER_TTL} s), the external names stay cached after the warm-up. "
               "A high p99 on the 300 s names alone means hits waiting behind other work "
               "(the event loop, GC), a high p99 on the 5 s names only means the miss path.",
               "", report.table(*kind_table(results["pod"], names, kinds)), ""]
    md += ["## Targets (issue 23)", "",
           report.table(["target", "measured", ""], targets(results), "lrl"), ""]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
