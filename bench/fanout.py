"""Fan-out: one meshdns leader, N watchers held by one client process (this one).

The leader is a real ``python -m meshdns serve`` process on loopback, seeded with
``--services`` generated services, ``api.max_watchers`` raised to fit. This
process is the load generator, as one would be: N lightweight connections on
one asyncio loop (uvloop when installed), raw sockets, each a minimal HTTP/1.1
client that only scans what it receives for the revision it waits for.

Two kinds of watcher, one after the other:

- **stream**: ``GET /v1/services?since=R&lineage=L&stream=1&wait=300`` -- one
  long-lived NDJSON response per watcher (meshdns/api/stream.py);
- **long-poll**: ``GET /v1/services?since=R&lineage=L&wait=300`` on a keep-alive
  connection, sent again (``since`` = the revision answered) as soon as an answer
  is complete, as a follower does.

For each, once all N are parked (the leader's ``meshdns_api_watchers`` gauge says
N): the leader's idle CPU over ``--idle`` seconds (heartbeats included), then
``--changes`` times a one-service PATCH and:

- the time from just before the PATCH is sent until each watcher has received
  the change (its revision in the bytes it got): p50, p99, max over all
  (watcher, change) pairs. It includes ``api.follow_coalesce`` (0.1 s by
  default; ``--coalesce``) and this process's own time to go through N sockets;
- the leader's CPU for the change (utime + stime of its process, /proc/PID/stat,
  from just before the PATCH until every watcher has it and, for long-polls,
  every one is parked again; the idle rate over that window subtracted), per
  change and per watcher;
- bytes per watcher per change (received by the watchers; for long-polls also
  the requests they send);
- and once: the leader's RSS growth with the N watchers open, per watcher.

Usage (exclusive lock: nothing else should run meanwhile):
  flock -x /tmp/cpu.lock .venv/bin/python bench/fanout.py                # 10,000 of each
  flock -x /tmp/cpu.lock .venv/bin/python bench/fanout.py --watchers 1000 --changes 3
  flock -x /tmp/cpu.lock .venv/bin/python bench/fanout.py --longpolls 2000  # fewer long-polls
Writes bench/results/fanout.md (+ fanout.json) unless --no-write.

N is capped by ``ulimit -n`` (the soft limit is raised to the hard one; the
leader and this process each need N descriptors and a few more); a cap is said.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import report

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BATCH = 500  # connections opened at once


# ---------------------------------------------------------------- the leader


class Leader:
    def __init__(self, work: Path, services: int, max_watchers: int, coalesce: float) -> None:
        self.work = work
        seed = work / "seed.json"
        seed.write_text(json.dumps({"services": [
            {"name": f"svc{i}", "namespace": "bench", "port": 80} for i in range(services)]}))
        (work / "resolv.conf").write_text("# nothing\n")
        config = {
            "dns": {"listen": ["127.0.0.1:0"], "upstreams": [],
                    "resolv_conf": str(work / "resolv.conf"), "lameduck": 0},
            "api": {"listen": "127.0.0.1:0", "max_watchers": max_watchers,
                    "follow_coalesce": coalesce},
            "registry": {"seed_file": str(seed)},
            "log": {"level": "warning"},
        }
        (work / "leader.yaml").write_text(json.dumps(config))
        self.log = open(work / "leader.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshdns", "serve", "--config", str(work / "leader.yaml"),
             "--ports-file", str(work / "ports.json")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")})
        deadline = time.monotonic() + 60
        while not (work / "ports.json").exists() or not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"leader did not start:\n{(work / 'leader.log').read_text()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            api = json.loads((self.work / "ports.json").read_text())["api"]
        except (ValueError, KeyError):
            return False
        self.host, port = api.rsplit(":", 1)
        self.port = int(port)
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)

    def patch(self, service: dict[str, Any]) -> int:
        req = urllib.request.Request(self.url + "/v1/services", method="PATCH",
                                     data=json.dumps({"upsert": [service]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(json.loads(resp.read())["revision"])

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def cpu(self) -> float:
        """CPU seconds of the leader's threads: schedstat (ns), else /proc/PID/stat
        (utime + stime, in clock ticks)."""
        pid = self.proc.pid
        try:
            return sum(int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                       for tid in os.listdir(f"/proc/{pid}/task")) / 1e9
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss(self) -> int:
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


# ---------------------------------------------------------------- watchers


class Watcher(asyncio.Protocol):
    """One raw HTTP/1.1 connection; ``seen`` once the bytes carry the awaited revision."""

    def __init__(self, bench: Fanout, mode: str, since: int) -> None:
        self.bench = bench
        self.mode = mode
        self.since = since
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.buf = bytearray()  # long-poll: the answer being read
        self.received = 0
        self.sent = 0
        self.seen_at: float | None = None
        self.parked = asyncio.get_running_loop().create_future()  # stream: first line in
        self.closed = False

    def request(self) -> None:
        query = f"since={self.since}&lineage={self.bench.lineage}&wait=300"
        if self.mode == "stream":
            query += "&stream=1"
        data = f"GET /v1/services?{query} HTTP/1.1\r\nHost: leader\r\n\r\n".encode()
        self.sent += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.request()
        if self.mode == "longpoll":
            self.parked.set_result(None)  # parked once the leader says so (its gauge)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.mode == "stream":
            if not self.parked.done() and b"\n" in data:
                self.parked.set_result(None)
            target = self.bench.target
            if target is not None and self.seen_at is None and target in self.tail + data:
                self.bench.saw(self)
            self.tail = data[-64:]
            return
        self.buf += data
        while True:  # whole answers: headers, then Content-Length bytes
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            target = self.bench.target
            if target is not None and self.seen_at is None and target in body:
                self.bench.saw(self)
            self.since = json.loads(body)["revision"]
            self.request()  # as a follower does: at once, on the same connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.parked.done():
            self.parked.set_exception(ConnectionError(f"closed before parking: {exc}"))


class Fanout:
    def __init__(self, leader: Leader, lineage: str) -> None:
        self.leader = leader
        self.lineage = lineage
        self.target: bytes | None = None
        self.pending = 0
        self.done = asyncio.Event()
        self.watchers: list[Watcher] = []

    def saw(self, watcher: Watcher) -> None:
        watcher.seen_at = time.monotonic()
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

    async def open(self, mode: str, n: int, since: int) -> None:
        loop = asyncio.get_running_loop()
        for start in range(0, n, BATCH):
            pairs = await asyncio.gather(*(
                loop.create_connection(lambda: Watcher(self, mode, since), self.leader.host,
                                       self.leader.port)
                for _ in range(min(BATCH, n - start))))
            batch = [w for _, w in pairs]
            await asyncio.gather(*(w.parked for w in batch))
            self.watchers += batch
        await self.wait_parked(n)

    async def wait_parked(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while (await asyncio.to_thread(self.leader.metric, "meshdns_api_watchers")) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the leader does not hold {n} watchers")
            await asyncio.sleep(0.2)

    def close(self) -> None:
        for w in self.watchers:
            if w.transport is not None:
                w.transport.close()
        self.watchers = []


# ---------------------------------------------------------------- one run


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


async def run_mode(bench: Fanout, mode: str, n: int, args: argparse.Namespace,
                   revision: int) -> tuple[dict[str, Any], int]:
    leader = bench.leader
    rss0 = leader.rss()
    t_open = time.monotonic()
    await bench.open(mode, n, revision)
    opened_in = time.monotonic() - t_open
    await asyncio.sleep(1.0)
    rss1 = leader.rss()
    c0, t0 = leader.cpu(), time.monotonic()
    await asyncio.sleep(args.idle)
    idle_rate = (leader.cpu() - c0) / (time.monotonic() - t0)
    latencies: list[float] = []
    cpu_changes: list[float] = []
    down: list[float] = []
    up: list[float] = []
    for change in range(args.changes):
        expected = revision + 1
        bench.target = b'"revision":%d,' % expected
        bench.pending = n
        bench.done.clear()
        for w in bench.watchers:
            w.seen_at = None
        recv0 = sum(w.received for w in bench.watchers)
        sent0 = sum(w.sent for w in bench.watchers)
        cpu0 = leader.cpu()
        start = time.monotonic()
        revision = await asyncio.to_thread(leader.patch, {
            "name": f"change{change}-{mode}", "namespace": "bench", "port": 80})
        assert revision == expected, (revision, expected)
        await asyncio.wait_for(bench.done.wait(), 120)
        if mode == "longpoll":
            await bench.wait_parked(n)  # every watcher asked again: that is the change's cost
        else:
            await asyncio.sleep(0.2)
        cpu = leader.cpu() - cpu0 - idle_rate * (time.monotonic() - start)
        cpu_changes.append(max(cpu, 0.0))
        latencies += [w.seen_at - start for w in bench.watchers if w.seen_at is not None]
        down.append((sum(w.received for w in bench.watchers) - recv0) / n)
        up.append((sum(w.sent for w in bench.watchers) - sent0) / n)
        bench.target = None
        await asyncio.sleep(0.5)
    cut = leader.metric("meshdns_api_stream_cutoffs_total")
    bench.close()
    cpu_med = statistics.median(cpu_changes)
    return {
        "mode": mode, "watchers": n, "opened_s": round(opened_in, 1),
        "p50_ms": round(pct(latencies, 50) * 1000, 1),
        "p99_ms": round(pct(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "cpu_per_change_ms": round(cpu_med * 1000, 1),
        "cpu_per_watcher_us": round(cpu_med / n * 1e6, 2),
        "cpu_changes_ms": [round(c * 1000, 1) for c in cpu_changes],
        "idle_cpu_ms_per_s": round(idle_rate * 1000, 2),
        "bytes_down_per_watcher": round(statistics.median(down), 1),
        "bytes_up_per_watcher": round(statistics.median(up), 1),
        "rss_per_watcher_kib": round((rss1 - rss0) / n / 1024, 2),
        "cutoffs": cut,
    }, revision


def fd_capacity() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the leader inherits it
        soft = hard
    return soft - 200


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    cap = fd_capacity()
    counts = {"stream": args.streams or args.watchers, "longpoll": args.longpolls or args.watchers}
    for mode, n in counts.items():
        if n > cap:
            print(f"# {mode}: {n} watchers do not fit ulimit -n; {cap} instead", flush=True)
            counts[mode] = cap
    results = []
    for mode in args.modes:  # a fresh leader for each: RSS growth is that kind's alone
        with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
            leader = Leader(Path(tmp), args.services, counts[mode] + 100, args.coalesce)
            try:
                _, body, headers = leader.get("/v1/services")
                revision = json.loads(body)["revision"]
                bench = Fanout(leader, headers["X-Meshdns-Lineage"])
                print(f"# {mode}: {counts[mode]} watchers ...", flush=True)
                result, revision = await run_mode(bench, mode, counts[mode], args, revision)
                print(json.dumps(result), flush=True)
                results.append(result)
            finally:
                leader.stop()
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = ["| watchers | N | p50 | p99 | max | leader CPU/change | per watcher | idle CPU "
            "(heartbeats) | bytes/watcher/change (down, up) | leader RSS/watcher |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['mode']} | {r['watchers']:,} | {r['p50_ms']:.0f} ms | "
                    f"{r['p99_ms']:.0f} ms | {r['max_ms']:.0f} ms | "
                    f"{r['cpu_per_change_ms']:.0f} ms | {r['cpu_per_watcher_us']:.1f} µs | "
                    f"{r['idle_cpu_ms_per_s']:.1f} ms/s | {r['bytes_down_per_watcher']:.0f}, "
                    f"{r['bytes_up_per_watcher']:.0f} B | {r['rss_per_watcher_kib']:.1f} KiB |")
    return "\n".join(rows) + (f"\n\n{args.services:,} services, {args.changes} one-service "
                              f"PATCHes per kind, api.follow_coalesce {args.coalesce:g} s.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watchers", type=int, default=10_000, help="N of each kind")
    ap.add_argument("--streams", type=int, default=0, help="N streams (default --watchers)")
    ap.add_argument("--longpolls", type=int, default=0,
                    help="N long-polls (default --watchers)")
    ap.add_argument("--modes", nargs="+", default=["stream", "longpoll"],
                    choices=["stream", "longpoll"])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--idle", type=float, default=10.0,
                    help="s of idle CPU measured (one heartbeat interval)")
    ap.add_argument("--coalesce", type=float, default=0.1, help="api.follow_coalesce")
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    machine = report.machine_md({  # the load average before we start
        "processes": "the leader is a real `python -m meshdns serve` on 127.0.0.1 (log level "
                     "warning), a fresh one for each kind; the watchers are raw sockets on "
                     "this process's one asyncio loop (uvloop)",
        "ulimit -n": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1])})
    begin = time.monotonic()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("fanout: --time-limit reached"))
    signal.alarm(int(args.time_limit))
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    results = asyncio.run(amain(args))
    print()
    print(table(results, args))
    if not args.no_write:
        path = report.write_result("fanout", "\n\n".join([
            "## Fan-out: one leader, 10,000 watch streams vs 10,000 long-polls",
            f"Command: `{report.command_line()}` — "
            f"{(time.monotonic() - begin) / 60:.1f} min (run as `flock -x /tmp/cpu.lock "
            ".venv/bin/python bench/fanout.py`: nothing else on the CPUs meanwhile).",
            machine, table(results, args),
            "Latency: from just before the PATCH is sent until each watcher received the "
            "change (one coalescing window included). Leader CPU: its threads' schedstat "
            "over that window (long-polls: until every watcher is parked again), the idle "
            "rate subtracted; median over the changes. Idle CPU: with the watchers open "
            "and nothing changing (streams: heartbeats every 10 s; long-polls here wait "
            "300 s, a follower's 30 s would add N/30 empty answers a second)."]),
            results)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
