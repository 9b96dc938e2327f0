"""Does batching UDP with recvmmsg/sendmmsg (meshdns.dns.mmsg) close the gap to unbound?

The same core ``MessageHandler`` (the generated services, answer cache warm) behind:

  asyncio  the current ``UdpDnsProtocol`` on uvloop (one recvfrom + sendto per query)
  reader   ``BatchUdpServer.serve_ready`` as a uvloop ``add_reader`` callback
  thread   ``BatchUdpServer.run_blocking`` in a dedicated thread (blocking recvmmsg
           with MSG_WAITFORONE); the uvloop loop stays idle in the main thread
  unbound  1 thread (or N), ``local-zone: "mesh." static`` + ``local-data``

Each meshdns variant is its own process (``bench_mmsg.py serve --mode M``) bound
to 127.0.0.1 port 0; with ``--workers 2`` it forks a second process bound to the
same port with SO_REUSEPORT, like ``dns.workers: 2``. Every server gets one
warm-up pass over the query file, then rounds rotate over the servers so drift
on this shared machine hits each alike; figures are medians over rounds, "vs
unbound" the median of per-round ratios. All processes are killed at the end.

Usage: python bench/bench_mmsg.py [--rounds 3] [--seconds 5] [--sets a mix]
       [--workers 1 2] [--services 10000] [--modes asyncio reader thread]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import datagen  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402

MODES = ("asyncio", "reader", "thread", "poll")
DEFAULT_MODES = ("asyncio", "reader", "thread")
QUERY_LINES = 10_000


# ---------------------------------------------------------------- the server side


def build_resolver(seed: Path) -> Any:
    from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
    from meshdns.core.registry import Registry, RegistryPolicy, apply_put, parse_services

    policy = RegistryPolicy()
    specs = parse_services(json.loads(seed.read_text())["services"])
    registry = apply_put(Registry.empty(), specs, policy, 0)
    settings = ZoneSettings(range4=policy.range4, range6=policy.range6)
    return MessageHandler(Zone(registry, settings))


def bind_udp(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.setblocking(False)
    sock.bind((peers.LOOPBACK, port))
    return sock


def serve(mode: str, seed: Path, port_file: Path, workers: int) -> None:
    """One meshdns-like process (plus forked workers) answering on one UDP port."""
    import asyncio

    import uvloop

    resolver = build_resolver(seed)
    sock = bind_udp(0, workers > 1)
    port = sock.getsockname()[1]
    for _ in range(workers - 1):
        if os.fork() == 0:  # a worker: its own socket on the same port, its own cache
            sock.close()
            sock = bind_udp(port, True)
            break
    else:
        port_file.write_text(str(port))

    from meshdns.dns.histogram import Histogram
    from meshdns.dns.transport import UdpDnsProtocol, servfail

    latency = Histogram()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, done.set)
        server: Any = None
        if mode == "asyncio":
            await loop.create_datagram_endpoint(
                lambda: UdpDnsProtocol(resolver, None, latency), sock=sock)
        else:
            from meshdns.dns.mmsg import BatchUdpServer

            server = BatchUdpServer(sock, resolver.handle_udp, None, on_error=servfail,
                                    observe=latency.observe)
            if mode == "reader":
                loop.add_reader(sock.fileno(), server.serve_ready)
            else:
                stop = threading.Event()
                run = server.run_blocking if mode == "thread" else server.run_polling
                threading.Thread(target=run, args=(stop,), daemon=True).start()
        await done.wait()
        if server is not None:  # how well did batching batch? (read by the driver)
            print(f"mmsg-stats received={server.received} batches={server.batches} "
                  f"truncated={server.truncated} send_dropped={server.send_dropped} "
                  f"send_errors={server.send_errors}", file=sys.stderr, flush=True)

    uvloop.run(main())


def start_variant(mode: str, workdir: Path, seed: Path, services: list[datagen.Svc],
                  workers: int, tag: str) -> peers.Server:
    port_file = workdir / f"port-{mode}-{workers}-{tag}"
    log = workdir / f"{mode}-{workers}-{tag}.log"
    proc = peers.spawn([peers.project_python(), str(Path(__file__).resolve()), "serve",
                        "--mode", mode, "--seed", str(seed), "--port-file", str(port_file),
                        "--workers", str(workers)], log, cwd=BENCH.parent)
    deadline = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            peers._kill_group(proc)
            raise peers.ServerFailed(f"{mode} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    name = mode if workers == 1 else f"{mode}-{workers}w"
    srv = peers.Server(name, int(port_file.read_text()), proc, log, workdir)
    peers.wait_ready(srv, peers.answers_probe(srv.port, services[0]), 60)
    return srv


def batch_stats(srv: peers.Server) -> str:
    """Mean datagrams per recvmmsg over the server's life (all workers), from its log."""
    received = batches = 0
    for m in re.finditer(r"mmsg-stats received=(\d+) batches=(\d+)", srv.log.read_text()):
        received += int(m.group(1))
        batches += int(m.group(2))
    return f"{received / batches:.1f}" if batches else "-"


# ---------------------------------------------------------------- the driver


def warm(srv: peers.Server, qfile: Path, perf_opts: dict[str, Any]) -> None:
    """Passes over the query file so every worker's reply cache holds every name."""
    passes = "1" if perf_opts.get("clients", 1) == 1 else "4"
    with contextlib.suppress(RuntimeError):
        peers.run_dnsperf(srv.port, qfile, 60, outstanding=50,
                          clients=perf_opts.get("clients", 1), extra=["-n", passes])


def run_rounds(servers: list[peers.Server], qfile: Path, rounds: int, seconds: float,
               perf_opts: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for srv in servers:
        warm(srv, qfile, perf_opts)
    for rnd in range(rounds):
        order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
        for srv in order:
            cpu0 = srv.cpu_seconds()
            r = peers.run_dnsperf(srv.port, qfile, seconds, **perf_opts)
            cpu = srv.cpu_seconds() - cpu0
            out[srv.name].append({"round": rnd + 1, "qps": r.qps, "sent": r.sent,
                                  "completed": r.completed, "lost": r.lost,
                                  "avg_ms": r.avg_ms, "cpu_s": cpu, "runtime": r.runtime,
                                  "rcodes": r.rcodes})
            print(f"    round {rnd + 1}/{rounds} {srv.name:<12} {r.qps:>10,.0f} q/s  "
                  f"avg {r.avg_ms:5.2f} ms  lost {r.lost:>5}  server cpu {cpu:5.2f} s  "
                  f"{dict(r.rcodes)}", flush=True)
    return out


HEADERS = ["server", "qps (median)", "min..max", "vs unbound", "vs asyncio", "lost",
           "avg latency", "server CPU", "CPU/query", "msgs/batch"]


def summarize(per: dict[str, list[dict[str, Any]]], batching: dict[str, str]
              ) -> list[list[str]]:
    def ratios(runs: list[dict[str, Any]], base: list[dict[str, Any]] | None) -> str:
        if not base:
            return "-"
        rs = [r["qps"] / b["qps"] for r, b in zip(runs, base, strict=False) if b["qps"]]
        return f"{report.median(rs):.2f}x" if rs else "-"

    unbound = next((v for k, v in per.items() if k.startswith("unbound")), None)
    asyncio_ = next((v for k, v in per.items() if k.startswith("asyncio")), None)
    rows = []
    for name, runs in per.items():
        qps = [r["qps"] for r in runs]
        sent = sum(r["sent"] for r in runs)
        lost = sum(r["lost"] for r in runs)
        done = sum(r["completed"] for r in runs)
        cpu = sum(r["cpu_s"] for r in runs)
        wall = sum(r["runtime"] for r in runs) or 1.0
        rows.append([name, report.fmt_int(report.median(qps)),
                     f"{min(qps) / 1000:.1f}k..{max(qps) / 1000:.1f}k",
                     ratios(runs, unbound), ratios(runs, asyncio_),
                     f"{lost} ({100 * lost / sent if sent else 0:.2f}%)",
                     f"{report.median([r['avg_ms'] for r in runs]):.2f} ms",
                     f"{100 * cpu / wall:.0f}%",
                     f"{cpu / done * 1e6 if done else 0:.1f} µs", batching.get(name, "-")])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) one server variant")
    s.add_argument("--mode", choices=MODES, required=True)
    s.add_argument("--seed", type=Path, required=True)
    s.add_argument("--port-file", type=Path, required=True)
    s.add_argument("--workers", type=int, default=1)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sets", nargs="+", default=["a", "mix"], choices=list(datagen.QUERY_SETS))
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    ap.add_argument("--outstanding", "-q", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.mode, args.seed, args.port_file, args.workers)
        return 0
    if not shutil.which("dnsperf"):
        raise SystemExit("dnsperf is not installed")
    have_unbound = peers.available("unbound")
    services = datagen.generate(args.services)
    md: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="meshdns-mmsg-") as td:
            work = Path(td)
            seed = datagen.write_meshdns_seed(work / "seed.json", services)
            for workers in args.workers:
                # Several dnsperf sockets so SO_REUSEPORT spreads them over 2 workers.
                perf_opts: dict[str, Any] = {"outstanding": args.outstanding,
                                             "clients": 1 if workers == 1 else 4,
                                             "threads": 1 if workers == 1 else 2}
                for kind in args.sets:
                    qfile = datagen.write_lines(work / f"queries-{kind}.txt",
                                                datagen.query_lines(services, kind, QUERY_LINES))
                    label = (f"{datagen.QUERY_SETS[kind]}, {workers} worker"
                             f"{'s' if workers > 1 else ''} / unbound {workers} thread"
                             f"{'s' if workers > 1 else ''}")
                    print(f"\n  {label}: `-c {perf_opts['clients']} -T {perf_opts['threads']}`",
                          flush=True)
                    with contextlib.ExitStack() as stack:
                        servers, batchers = [], []
                        for mode in args.modes:
                            srv = start_variant(mode, work, seed, services, workers, kind)
                            stack.callback(srv.stop)
                            servers.append(srv)
                            if mode != "asyncio":
                                batchers.append(srv)
                        if have_unbound:
                            unb = peers.start_unbound(work, services, threads=workers)
                            stack.callback(unb.stop)
                            servers.append(unb)
                        per = run_rounds(servers, qfile, args.rounds, args.seconds, perf_opts)
                    rows = summarize(per, {b.name: batch_stats(b) for b in batchers})
                    print(report.text_table(HEADERS, rows), flush=True)
                    cmd = " ".join(peers.dnsperf_cmd(0, Path("FILE"), args.seconds,
                                                     **perf_opts)).replace("-p 0", "-p PORT")
                    md += [f"## {label}", "", f"`{cmd}`", "", report.table(HEADERS, rows), ""]
    finally:
        peers.stop_all()
    if not args.no_write:
        head = [
            "# UDP batching experiment: recvmmsg/sendmmsg via ctypes (meshdns.dns.mmsg)",
            "",
            f"Command: `{report.command_line()}`",
            "",
            report.machine_md(),
            "",
            "## Method",
            "",
            f"{args.services:,} generated services (`bench/datagen.py`), one core `MessageHandler` "
            "per process (reply cache on, counting on, latency sampled as in meshdns), "
            "served by: **asyncio** = `UdpDnsProtocol` on uvloop; **reader** = "
            "`BatchUdpServer.serve_ready` as a uvloop `add_reader` callback; **thread** = "
            "`BatchUdpServer.run_blocking` in its own thread (blocking recvmmsg, "
            "MSG_WAITFORONE); **poll** (only with `--modes poll`) = the same thread with poll "
            "+ non-blocking drain; "
            "**unbound** = static local zone with the same names. Batch 64, 4096-byte "
            "slots. Each server is warmed with a pass over the query file, then "
            f"{args.rounds} rounds of {args.seconds:g} s rotate over the servers. qps and "
            "latency are dnsperf's; \"vs\" columns are medians of per-round ratios; server "
            "CPU = CPU time of the server's process group / wall time of its runs "
            "(100% = one core); CPU/query = that CPU time / completed queries; msgs/batch = "
            "mean datagrams per recvmmsg. dnsperf shares the 2 CPUs with the server and, on "
            "a machine shared with other jobs, qps swings with their load: CPU/query is the "
            "steadier figure.",
            "",
        ]
        report.write_result("mmsg", "\n".join(head + md))
        print(f"\nwrote {BENCH / 'results' / 'mmsg.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
