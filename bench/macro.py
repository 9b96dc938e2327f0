"""dnsperf against meshdns and peer servers, all serving the same generated data.

Servers: meshdns (dns.workers 1), unbound (1 thread, static local zone), knot
(knotd, 1 UDP worker, zone file), dnsmasq (host-record lines) and a dnslib
``DNSServer`` baseline, each on its own loopback port with its own config in a
temp dir. Every server is started once and warmed with one pass over the query
file; then rounds alternate (A, B, C, A, B, C, ...) so drift on this shared
machine hits every server alike, and each server's figure is the median over
its rounds. The ratio to unbound is the median of the per-round ratios.

A second table compares meshdns with 2 workers against unbound with 2 threads
(dnsperf with several clients so SO_REUSEPORT spreads them); it is skipped, with
the reason, when meshdns rejects ``dns.workers: 2`` or serves from one process.

Usage: python bench/macro.py [--rounds 3] [--seconds 5] [--sets a mix] [--services 10000]
       [--servers meshdns unbound knot dnsmasq dnslib] [--no-workers2] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datagen
import peers
import report

ALL_SERVERS = ("meshdns", "unbound", "knot", "dnsmasq", "dnslib")
QUERY_LINES = 10_000


def warm(srv: peers.Server, qfile: Path) -> None:
    """One pass over the query file: fills meshdns's reply cache and unbound's caches."""
    with contextlib.suppress(RuntimeError):
        peers.run_dnsperf(srv.port, qfile, 30, outstanding=50, extra=["-n", "1"])


def expected_rcodes(kind: str) -> set[str]:
    return {"NOERROR"} if kind == "a" else {"NOERROR", "NXDOMAIN"}


def run_rounds(servers: list[peers.Server], qfile: Path, kind: str, rounds: int,
               seconds: float, perf_opts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Alternating rounds; per server a list of per-round results (with server CPU)."""
    out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for srv in servers:
        warm(srv, qfile)
    for rnd in range(1, rounds + 1):
        for srv in servers:
            u0, s0 = srv.cpu_times()
            r = peers.run_dnsperf(srv.port, qfile, seconds, **perf_opts)
            u1, s1 = srv.cpu_times()
            cpu, sys_cpu = (u1 - u0) + (s1 - s0), s1 - s0
            out[srv.name].append({"round": rnd, "qps": r.qps, "sent": r.sent,
                                  "completed": r.completed, "lost": r.lost,
                                  "avg_ms": r.avg_ms, "max_ms": r.max_ms,
                                  "stddev_ms": r.stddev_ms, "rcodes": r.rcodes,
                                  "cpu_s": cpu, "sys_s": sys_cpu, "rss_kb": srv.rss_kb()})
            print(f"    round {rnd}/{rounds} {srv.name:<12} {r.qps:>10,.0f} q/s  "
                  f"avg {r.avg_ms:6.2f} ms  lost {r.lost:>5}  server cpu {cpu:5.2f} s  "
                  f"{dict(r.rcodes)}", flush=True)
    return out


def summarize(per_server: dict[str, list[dict[str, Any]]], baseline: str,
              kind: str) -> list[dict[str, Any]]:
    rows = []
    base = per_server.get(baseline)
    for name, runs in per_server.items():
        qps = [r["qps"] for r in runs]
        ratios = [r["qps"] / b["qps"] for r, b in zip(runs, base or [], strict=False)
                  if b["qps"] > 0]
        sent = sum(r["sent"] for r in runs)
        lost = sum(r["lost"] for r in runs)
        completed = sum(r["completed"] for r in runs)
        rcodes: Counter[str] = Counter()
        for r in runs:
            rcodes.update(r["rcodes"])
        unexpected = {k: v for k, v in rcodes.items() if k not in expected_rcodes(kind)}
        cpu_total = sum(r["cpu_s"] for r in runs)
        cpu_us = cpu_total / completed * 1e6 if completed else 0.0
        sys_pct = 100 * sum(r["sys_s"] for r in runs) / cpu_total if cpu_total else 0.0
        rows.append({
            "name": name, "qps_median": report.median(qps), "qps_min": min(qps),
            "qps_max": max(qps), "ratio": report.median(ratios) if ratios else None,
            "sent": sent, "lost": lost, "lost_pct": 100.0 * lost / sent if sent else 0.0,
            "avg_ms_median": report.median([r["avg_ms"] for r in runs]),
            "max_ms": max(r["max_ms"] for r in runs),
            "stddev_ms_median": report.median([r["stddev_ms"] for r in runs]),
            "cpu_us_per_query": cpu_us, "sys_pct": sys_pct, "rss_kb": runs[-1]["rss_kb"],
            "nx_pct": 100.0 * rcodes.get("NXDOMAIN", 0) / completed if completed else 0.0,
            "unexpected_rcodes": unexpected, "rounds": runs,
        })
    return rows


HEADERS = ["server", "qps (median)", "min..max", "vs unbound", "lost", "avg latency",
           "max latency", "latency stddev", "server CPU/query", "of it kernel", "RSS",
           "NXDOMAIN"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        name = r["name"] + (" (!)" if r["unexpected_rcodes"] else "")
        out.append([name, report.fmt_int(r["qps_median"]),
                    f"{r['qps_min'] / 1000:.1f}k..{r['qps_max'] / 1000:.1f}k", ratio,
                    f"{r['lost']} ({r['lost_pct']:.2f}%)", f"{r['avg_ms_median']:.2f} ms",
                    f"{r['max_ms']:.1f} ms", f"{r['stddev_ms_median']:.2f} ms",
                    f"{r['cpu_us_per_query']:.1f} µs", f"{r['sys_pct']:.0f}%",
                    report.fmt_kb(r["rss_kb"]),
                    f"{r['nx_pct']:.1f}%"])
    return out


def start_all(names: list[str], workdir: Path, services: list[datagen.Svc],
              stack: contextlib.ExitStack) -> tuple[list[peers.Server], list[str]]:
    servers, notes = [], []
    for name in names:
        if not peers.available(name):
            notes.append(f"{name}: skipped, binary `{peers.BINARIES[name]}` not installed "
                         "(`make bench-tools`)")
            continue
        t0 = time.monotonic()
        try:
            srv = stack.enter_context(peers.running(name, workdir, services))
        except peers.ServerFailed as exc:
            notes.append(f"{name}: failed to start: {str(exc).splitlines()[0]}")
            continue
        print(f"  started {name:<8} on 127.0.0.1:{srv.port} in {time.monotonic() - t0:.1f}s "
              f"(pids {srv.pids()})", flush=True)
        servers.append(srv)
    return servers, notes


def workers2(workdir: Path, services: list[datagen.Svc], qfiles: dict[str, Path],
             rounds: int, seconds: float, perf_opts: dict[str, Any]
             ) -> tuple[list[dict[str, Any]], str]:
    """meshdns with 2 workers (steered by CPU, and by the kernel's hash) vs unbound with 2
    threads, per query set; or no sets and the reason it was skipped."""
    with contextlib.ExitStack() as stack:
        try:
            mesh = stack.enter_context(peers.running("meshdns", workdir, services, workers=2,
                                                     steering="cpu"))
            hashed = stack.enter_context(peers.running("meshdns", workdir, services,
                                                       workers=2, steering="hash"))
        except peers.ServerFailed as exc:
            return [], ("skipped: meshdns did not start with `dns.workers: 2`: "
                        + str(exc).splitlines()[0][:300])
        hashed.name = "meshdns-2w-hash"
        time.sleep(0.5)  # give forked workers a moment to appear
        pids = mesh.pids()
        if len(pids) < 2:
            return [], (f"skipped: meshdns accepted `dns.workers: 2` but serves from one "
                        f"process (pids {pids}); SO_REUSEPORT workers are not implemented yet")
        unb = stack.enter_context(peers.running("unbound", workdir, services, threads=2))
        opts = dict(perf_opts, clients=4, threads=2)
        print(f"  workers2: meshdns pids {pids}, meshdns-2w-hash pids {hashed.pids()}, "
              f"unbound-2t pid {unb.pids()}", flush=True)
        sets = []
        for kind, qfile in qfiles.items():
            print(f"\n  2 workers, query set {datagen.QUERY_SETS[kind]}", flush=True)
            per = run_rounds([mesh, hashed, unb], qfile, kind, rounds, seconds, opts)
            sets.append({"kind": kind, "label": f"{datagen.QUERY_SETS[kind]}, 2 workers",
                         "servers": summarize(per, unb.name, kind)})
        return sets, (
            f"dnsperf with `-c {opts['clients']} -T {opts['threads']}` (4 client sockets from "
            "2 threads). `meshdns-2w` is `dns.workers: 2` with its default steering on "
            "loopback (`dns.worker_steering: cpu`: a cBPF program on the SO_REUSEPORT group "
            "hands each query to the process of the CPU it arrived on); `meshdns-2w-hash` "
            "is the same with `dns.worker_steering: hash` (the kernel's hash of the client "
            "address and port, as unbound's `so-reuseport` uses). unbound: num-threads 2, "
            "so-reuseport yes.")


def profile(workdir: Path, services: list[datagen.Svc], qfile: Path, seconds: float) -> str:
    """py-spy (with native frames) on meshdns under dnsperf load: Markdown with the split."""
    spy = shutil.which("py-spy") or str(Path(peers.project_python()).parent / "py-spy")
    if not Path(spy).exists():
        return "py-spy not installed (`pip install py-spy`): no profile."
    with peers.running("meshdns", workdir, services) as srv:
        warm(srv, qfile)
        raw = workdir / "profile.txt"
        cmd = [spy, "record", "--native", "--rate", "200", "--format", "raw",
               "--duration", f"{int(seconds) + 1}", "--output", str(raw), "--pid", str(srv.pid)]
        rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            time.sleep(0.5)
            r = peers.run_dnsperf(srv.port, qfile, seconds)
            _, err = rec.communicate(timeout=seconds + 60)
        finally:
            if rec.poll() is None:
                rec.kill()
                rec.wait()
        if not raw.exists():
            return f"py-spy failed: {err.decode(errors='replace')[-500:]}"
        shown = "py-spy record --native --rate 200 --format raw --pid PID"
        return summarize_profile(raw.read_text(), r.qps, shown)


CATEGORIES = (
    ("kernel send: sendmsg/sendto syscall", ("sendmsg (", "sendto (libc", "__sendmsg")),
    ("kernel receive: recvmsg/recvfrom syscall", ("recvmsg (", "recvfrom (", "__recvmsg")),
    ("waiting in epoll (idle: no datagram ready)", ("epoll_wait", "epoll_pwait")),
)


def categorize(frames: list[str]) -> str:
    leaf = frames[-1]
    for name, needles in CATEGORIES:
        if any(n in leaf for n in needles):
            return name
    if "meshdns/core/" in leaf:
        return "meshdns core, Python (MessageHandler.handle_udp, ...)"
    if "meshdns/" in leaf:
        return "meshdns transport, Python (datagram_received)"
    if any("meshdns/core/" in f for f in frames):
        return "called from the core (dnslib, builtins)"
    return "event loop (uvloop/libuv), interpreter, other"


def _function(frame: str) -> str:
    """``func (file:line)`` -> ``func (file)``: lines of one function summed."""
    head, sep, rest = frame.rpartition(" (")
    if not sep or ":" not in rest:
        return frame
    return f"{head} ({rest.rstrip(')').rsplit(':', 1)[0]})"


def summarize_profile(collapsed: str, qps: float, cmd: str, top: int = 12) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        total += n
        self_t[frames[-1]] += n
        cats[categorize(frames)] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "py-spy recorded no samples."
    pct = lambda n: f"{100 * n / total:.1f}"  # noqa: E731
    rows_cat = [[c, pct(n)] for c, n in cats.most_common()]
    rows_self = [[f"`{f[:100]}`", pct(n), pct(incl[f])] for f, n in self_t.most_common(top)]
    return "\n".join([
        f"`{cmd}` while dnsperf ran at {qps:,.0f} q/s ({total} samples of the main thread, "
        "wall clock, native frames included). Wall-clock samples of a process that is "
        "runnable but preempted land where it was preempted, typically a syscall return, so "
        "on a busy machine the syscall shares run high; the user/system CPU split in the "
        "macro table (\"of it kernel\") is the steadier measure of kernel time.",
        "", "Where the samples fall (by the innermost frame):", "",
        report.table(["category", "% of samples"], rows_cat), "",
        "Top functions by self time:", "",
        report.table(["function", "self %", "inclusive %"], rows_self, "lrr"),
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sets", nargs="+", default=["a", "mix"], choices=list(datagen.QUERY_SETS))
    ap.add_argument("--servers", nargs="+", default=list(ALL_SERVERS), choices=ALL_SERVERS)
    ap.add_argument("--outstanding", "-q", type=int, default=200)
    ap.add_argument("--clients", "-c", type=int, default=1)
    ap.add_argument("--threads", "-T", type=int, default=1)
    ap.add_argument("--no-workers2", action="store_true", help="skip the 2-worker comparison")
    ap.add_argument("--profile", action="store_true",
                    help="also py-spy meshdns under load (bench/results/profile.md)")
    args = ap.parse_args()
    if not shutil.which("dnsperf"):
        raise SystemExit("dnsperf is not installed (`make bench-tools`)")
    services = datagen.generate(args.services)
    perf_opts = {"outstanding": args.outstanding, "clients": args.clients,
                 "threads": args.threads}
    flags = (f"`dnsperf -s 127.0.0.1 -p PORT -d FILE -l {args.seconds:g} "
             f"-q {args.outstanding} -c {args.clients} -T {args.threads} -t 2`")
    data: dict[str, Any] = {"services": args.services, "rounds": args.rounds,
                            "seconds": args.seconds, "dnsperf": flags, "sets": [],
                            "machine": report.machine_info()}
    notes: list[str] = []
    md_sets: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshdns-macro-") as td, \
            contextlib.ExitStack() as stack:
        work = Path(td)
        print(f"starting servers with {args.services:,} services ...", flush=True)
        servers, notes = start_all(args.servers, work, services, stack)
        if not servers:
            raise SystemExit("no server started")
        baseline = "unbound" if any(s.name == "unbound" for s in servers) else servers[0].name
        qfiles = {}
        for kind in args.sets:
            qfiles[kind] = datagen.write_lines(
                work / f"queries-{kind}.txt",
                datagen.query_lines(services, kind, QUERY_LINES))
            label = datagen.QUERY_SETS[kind]
            print(f"\n  query set {label}: {args.rounds} rounds x {args.seconds:g}s x "
                  f"{len(servers)} servers", flush=True)
            per = run_rounds(servers, qfiles[kind], kind, args.rounds, args.seconds, perf_opts)
            rows = summarize(per, baseline, kind)
            data["sets"].append({"kind": kind, "label": label, "servers": rows})
            for r in rows:
                if r["unexpected_rcodes"]:
                    notes.append(f"{label}: {r['name']} answered unexpected rcodes "
                                 f"{r['unexpected_rcodes']}")
            print(report.text_table(HEADERS, table_rows(rows)), flush=True)
            md_sets += [f"## {label}", "", report.table(HEADERS, table_rows(rows)), ""]
        for srv in servers:
            srv.stop()
        w2_md: list[str] = []
        if not args.no_workers2:
            print("\n  meshdns 2 workers vs unbound 2 threads ...", flush=True)
            w2_sets, w2_note = workers2(work, services, qfiles, args.rounds, args.seconds,
                                        perf_opts)
            data["workers2"] = {"sets": w2_sets, "note": w2_note}
            print(f"  {w2_note}")
            w2_md = ["## meshdns 2 workers vs unbound 2 threads", "", w2_note, ""]
            for qset in w2_sets:
                w2_md += [f"### {qset['label']}", "",
                          report.table(HEADERS, table_rows(qset["servers"])), ""]
                print(report.text_table(HEADERS, table_rows(qset["servers"])))
        if args.profile and "a" in qfiles:
            print("\n  profiling meshdns with py-spy ...", flush=True)
            prof = profile(work, services, qfiles.get("mix", qfiles["a"]), args.seconds)
            report.write_result("profile", "\n".join([
                "# Where meshdns spends its time under dnsperf", "",
                f"Command: `{report.command_line()}`", "", report.machine_md(), "", prof]))
    versions = {
        "meshdns": report.tool_version([peers.project_python(), "-m", "meshdns", "--version"]),
        "unbound": report.tool_version(["unbound", "-V"]),
        "knot": report.tool_version(["knotd", "--version"]),
        "dnsmasq": report.tool_version(["dnsmasq", "--version"]),
        "dnsperf": report.tool_version(["dnsperf", "-h"]),
    }
    md = [
        "# Macro benchmark: dnsperf against meshdns and peers",
        "",
        f"Command: `{report.command_line()}`",
        "",
        report.machine_md({"versions": ", ".join(f"{k} {v}" for k, v in versions.items())}),
        "",
        "## Method",
        "",
        f"`bench/datagen.py` generates {args.services:,} services (canonical names "
        "`svc<i>.ns<k>.svc.<port>.mesh`, VIPs from 240.0.0.0/4 and fd00:fd00::/64, all given "
        "explicitly) and renders them for each server: meshdns seed file; unbound "
        "`local-zone: \"mesh.\" static` + `local-data` (num-threads 1); knot zone file "
        "(knotd, udp-workers 1); dnsmasq `host-record` + `local=/mesh/`; dnslib's threaded "
        "`DNSServer` answering from a dict. meshdns runs `dns.workers: 1`, "
        "`dns.upstreams: []` and an empty `dns.resolv_conf`. All on 127.0.0.1.",
        "",
        f"Load: {flags}, {QUERY_LINES:,} query lines per set (A-only: distinct service names; "
        "mix: 80% A hits, 10% AAAA hits, 10% NXDOMAIN names under `mesh`). Each server gets "
        f"one warm-up pass over the file, then {args.rounds} rounds of {args.seconds:g} s "
        "alternating between servers. qps and latency are dnsperf's own figures, median over "
        "rounds; \"vs unbound\" is the median of per-round ratios; lost = queries dnsperf "
        "counted as lost (timeout 2 s), summed over rounds; server CPU/query = CPU time the "
        "server process group used during its rounds (/proc/PID/stat) divided by completed "
        "queries — the efficiency figure that does not depend on who saturates first; "
        "\"of it kernel\" is the system-time share (syscalls, and on loopback the delivery "
        "of each sent datagram into the receiver's socket). "
        f"dnsperf and the server share {report.machine_info()['nproc']} CPUs, so a server "
        "faster than dnsperf's own limit shows as a tie on qps and a difference in CPU/query.",
        "",
        *md_sets,
        *w2_md,
    ]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = report.write_result("macro", "\n".join(md), data)
    print(f"\nwrote {path}")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
