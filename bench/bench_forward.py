"""Forwarded names served from the forwarder's cache vs local mesh names, same run.

Two measurements, each alternating the two query sets over several rounds:

1. in-process, through the entry point the transports use: ``MessageHandler.handle_udp``
   for both sets, plus ``await forwarder.resolve(request, "udp")`` for the
   forwarded ones (a cache hit: the coroutine never suspends). No sockets.
   Also shown: ``forwarder.resolve`` alone on prebuilt requests (the forwarder's
   own share of the cost).
2. over UDP on loopback: ``meshdns serve`` as its own process, load from dnsperf
   (``dnsperf -s 127.0.0.1 -p PORT -d FILE -l SECONDS -q 200``) or, without
   dnsperf, a bounded Python sender. The upstream is stopped after the warm-up
   pass, so every forwarded answer in the timed runs must come from the cache
   (any miss would be a SERVFAIL, and the rcode counts are checked).

The upstream is a server this script starts on 127.0.0.1 (unbound with local
data only, or the test suite's FakeUpstream): never the machine's resolver.
Writes bench/results/forward.md with the command that produced it.

    python bench/bench_forward.py [--seconds 5] [--rounds 2] [--names 1000]
    python bench/bench_forward.py --parse-only   # parse_reply alone: a miss's reply cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshdns.config import parse_config  # noqa: E402
from meshdns.core.answer import ForwardRequest  # noqa: E402
from meshdns.dns.forwarder import Forwarder  # noqa: E402
from meshdns.server import MeshServer  # noqa: E402
from tests.fake_upstream import FakeUpstream, Unbound  # noqa: E402

LOOPBACK = "127.0.0.1"
RESULTS = REPO / "bench" / "results" / "forward.md"


def local_names(n: int) -> list[str]:
    return [f"svc{i}.ns{i % 10}.svc.80.mesh" for i in range(n)]


def forwarded_names(n: int) -> list[str]:
    return [f"host{i}.example.test" for i in range(n)]


def services(n: int) -> list[dict[str, Any]]:
    return [{"name": f"svc{i}", "namespace": f"ns{i % 10}", "port": 80} for i in range(n)]


def wire(name: str, qid: int) -> bytes:
    msg = dns.message.make_query(name, "A", use_edns=0, payload=1232)
    msg.id = qid
    return msg.to_wire()


def start_upstream(workdir: Path, names: list[str]) -> tuple[Any, str]:
    """unbound (local data only) when installed, else the test suite's fake upstream."""
    if shutil.which("unbound"):
        data = ["example.test. 3600 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 30"]
        data += [f"{name}. 3600 IN A 192.0.2.{i % 250 + 1}" for i, name in enumerate(names)]
        (workdir / "unbound").mkdir()
        upstream = Unbound(workdir / "unbound", data=data).start()
        return upstream, f"unbound {unbound_version()} on {upstream.address}, local-data only"
    fake = FakeUpstream()
    fake.default.ttl = 3600
    fake.start()
    return fake, f"FakeUpstream (tests/fake_upstream.py) on {fake.address}"


def unbound_version() -> str:
    out = subprocess.run(["unbound", "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"Version\s+(\S+)", out.stdout)
    return m.group(1) if m else "?"


def write_config(workdir: Path, upstream: str, n: int) -> Path:
    seed = workdir / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": services(n)}))
    (workdir / "resolv.conf").write_text("# bench: no nameservers\n")
    conf = {
        "dns": {"listen": [f"{LOOPBACK}:0"], "upstreams": [upstream],
                "resolv_conf": str(workdir / "resolv.conf"), "cache_size": max(10000, 2 * n)},
        "api": {"listen": f"{LOOPBACK}:0"},
        "registry": {"seed_file": str(seed)},
        "log": {"level": "warning"},
    }
    path = workdir / "meshdns.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


# ---------------------------------------------------------------- in-process


def rounds_of(fn: Callable[[], float], rounds: int) -> list[float]:
    return [fn() for _ in range(rounds)]


async def in_process(config_path: Path, n: int, iterations: int, rounds: int
                     ) -> dict[str, list[float]]:
    config = parse_config(yaml.safe_load(config_path.read_text()), {})
    server = MeshServer(config)
    server.store.load_initial(config.registry.seed_file)
    resolver = server.handler
    forwarder = Forwarder(server.upstreams, config.dns, resolver.tally)
    handle = resolver.handle_udp
    local = [wire(name, 0x1000 + i) for i, name in enumerate(local_names(n))]
    fwd = [wire(name, 0x2000 + i) for i, name in enumerate(forwarded_names(n))]
    for data in fwd:  # warm the forwarder's cache (the only upstream traffic)
        req = handle(data)
        assert isinstance(req, ForwardRequest)
        reply = await forwarder.resolve(req, "udp")
        assert reply is not None and reply[3] & 0xF == 0, "warm-up did not resolve"
    for data in local:
        assert isinstance(handle(data), bytes)
    prebuilt = [handle(data) for data in fwd]
    mask = n - 1 if n & (n - 1) == 0 else None
    pick: Callable[[int], int] = (lambda i: i & mask) if mask is not None else (lambda i: i % n)
    idx = [pick(i) for i in range(iterations)]
    resolve = forwarder.resolve
    upstream_before = sum(sum(s.requests.values()) for s in (
        up.stats for up in forwarder.upstreams))

    def time_local() -> float:
        t0 = time.perf_counter()
        for i in idx:
            handle(local[i])
        return iterations / (time.perf_counter() - t0)

    async def time_forwarded() -> float:
        t0 = time.perf_counter()
        for i in idx:
            await resolve(handle(fwd[i]), "udp")  # type: ignore[arg-type]
        return iterations / (time.perf_counter() - t0)

    async def time_resolve_only() -> float:
        t0 = time.perf_counter()
        for i in idx:
            await resolve(prebuilt[i], "udp")  # type: ignore[arg-type]
        return iterations / (time.perf_counter() - t0)

    def time_core_only() -> float:
        t0 = time.perf_counter()
        for i in idx:
            handle(fwd[i])  # parse + policy + ForwardRequest: the core's share
        return iterations / (time.perf_counter() - t0)

    out: dict[str, list[float]] = {"local": [], "forwarded": [], "resolve_only": [],
                                   "core_only": []}
    for _ in range(rounds):
        out["local"].append(time_local())
        out["forwarded"].append(await time_forwarded())
        out["resolve_only"].append(await time_resolve_only())
        out["core_only"].append(time_core_only())
    upstream_after = sum(sum(up.stats.requests.values()) for up in forwarder.upstreams)
    assert upstream_after == upstream_before, "a timed forwarded query went upstream"
    hits = resolver.tally.responses.get((0, "cache"), 0)
    assert hits >= 2 * rounds * iterations, "forwarded queries were not cache hits"
    assert forwarder.inflight == 0
    await forwarder.close()
    return out


# ---------------------------------------------------------------- over UDP


def start_meshdns(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """meshdns serving ``config`` (DNS on port 0): the process and its DNS port."""
    ports = log.with_suffix(".ports.json")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meshdns", "serve", "--config",
                                 str(config), "--ports-file", str(ports)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    probe = dns.message.make_query(local_names(1)[0], "A")
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"meshdns exited: {log.read_text()[-2000:]}")
        try:
            port = int(json.loads(ports.read_text())["dns"][0].rsplit(":", 1)[1])
            if dns.query.udp(probe, LOOPBACK, port=port, timeout=0.3,
                             ignore_unexpected=True).answer:
                return proc, port
        except Exception:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("meshdns did not answer in 60 s")
        time.sleep(0.1)


def warm_over_udp(port: int, names: list[str]) -> None:
    for name in names:
        reply = dns.query.udp(dns.message.make_query(name, "A"), LOOPBACK, port=port, timeout=5)
        if reply.rcode() != 0 or not reply.answer:
            raise RuntimeError(f"warm-up of {name} failed: rcode {reply.rcode()}")


def dnsperf(port: int, datafile: Path, seconds: float, outstanding: int
            ) -> tuple[float, dict[str, int], str]:
    cmd = ["dnsperf", "-s", LOOPBACK, "-p", str(port), "-d", str(datafile), "-l",
           f"{seconds:g}", "-q", str(outstanding)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    m = re.search(r"Queries per second:\s+([0-9.]+)", out.stdout)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"dnsperf failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
    rcodes: dict[str, int] = {}
    if rc := re.search(r"Response codes:\s+(.*)$", out.stdout, re.MULTILINE):
        rcodes = {c: int(k) for c, k in re.findall(r"([A-Z]+)\s+([0-9]+)\s+\(", rc.group(1))}
    return float(m.group(1)), rcodes, " ".join(cmd)


def python_sender(port: int, names: list[str], seconds: float, outstanding: int
                  ) -> tuple[float, dict[str, int], str]:
    """A bounded closed-loop sender: ``outstanding`` sockets, each one query at a time."""
    sel = selectors.DefaultSelector()
    socks = []
    queries = [wire(name, 0) for name in names]
    rcodes: dict[str, int] = {}
    done = 0
    try:
        for i in range(outstanding):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((LOCAL_ADDR, port))
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, i)
            s.send(queries[i % len(queries)])
        t0 = time.perf_counter()
        end = t0 + seconds
        nxt = outstanding
        while time.perf_counter() < end:
            events = sel.select(timeout=1.0)
            if not events:  # a lost datagram: resend on every socket (bounded by `end`)
                for i, s in enumerate(socks):
                    s.send(queries[(nxt + i) % len(queries)])
                continue
            for key, _ in events:
                s = key.fileobj
                assert isinstance(s, socket.socket)
                data = s.recv(4096)
                code = "NOERROR" if data[3] & 0xF == 0 else f"RCODE{data[3] & 0xF}"
                rcodes[code] = rcodes.get(code, 0) + 1
                done += 1
                s.send(queries[nxt % len(queries)])
                nxt += 1
        qps = done / (time.perf_counter() - t0)
    finally:
        for s in socks:
            sel.unregister(s)
            s.close()
        sel.close()
    return qps, rcodes, f"python sender ({outstanding} outstanding, {seconds:g} s)"


LOCAL_ADDR = LOOPBACK


def over_udp(config: Path, workdir: Path, upstream: Any, n: int, seconds: float,
             rounds: int, outstanding: int) -> dict[str, Any]:
    proc, port = start_meshdns(config, workdir / "meshdns.log")
    try:
        warm_over_udp(port, forwarded_names(n))
        upstream.stop()  # from here on, only the cache can answer forwarded names
        files = {}
        for label, names in (("local", local_names(n)), ("forwarded", forwarded_names(n))):
            files[label] = workdir / f"{label}.txt"
            files[label].write_text("".join(f"{name} A\n" for name in names))
        use_dnsperf = shutil.which("dnsperf") is not None
        out: dict[str, Any] = {"local": [], "forwarded": [], "rcodes": {}, "command": ""}
        for _ in range(rounds):
            for label in ("local", "forwarded"):
                if use_dnsperf:
                    qps, rcodes, cmd = dnsperf(port, files[label], seconds, outstanding)
                else:
                    names = local_names(n) if label == "local" else forwarded_names(n)
                    qps, rcodes, cmd = python_sender(port, names, seconds, outstanding)
                out[label].append(qps)
                for code, count in rcodes.items():
                    key = f"{label} {code}"
                    out["rcodes"][key] = out["rcodes"].get(key, 0) + count
                out["command"] = re.sub(r"-d \S+", "-d FILE", cmd)
        out["tool"] = "dnsperf" if use_dnsperf else "python sender"
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- report


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}..{max(values):,.0f})"


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median([x / y for x, y in zip(a, b, strict=True)])


def typical_replies() -> dict[str, bytes]:
    """Upstream replies as a miss gets them (dnslib-encoded, compressed, OPT last), and
    one from a liar whose scrubbing re-encodes it."""
    from dnslib import CNAME, EDNS0, QTYPE, RR, SOA, A, DNSRecord

    def reply(kind: str) -> bytes:
        q = DNSRecord.question("www.example.com", "A")
        r = q.reply()
        if kind == "A x2":
            for i in range(2):
                r.add_answer(RR("www.example.com", QTYPE.A, ttl=300, rdata=A(f"192.0.2.{i}")))
        elif kind == "CNAME + 4 A":
            r.add_answer(RR("www.example.com", QTYPE.CNAME, ttl=300,
                            rdata=CNAME("edge.cdn.example.net")))
            for i in range(4):
                r.add_answer(RR("edge.cdn.example.net", QTYPE.A, ttl=60,
                                rdata=A(f"192.0.2.{i}")))
        elif kind == "NXDOMAIN + SOA":
            r.header.rcode = 3
            r.add_auth(RR("example.com", QTYPE.SOA, ttl=300, rdata=SOA(
                "ns.example.com", "h.example.com", (1, 2, 3, 4, 5))))
        else:  # a liar: records for other names, scrubbed and re-encoded
            r.add_answer(RR("www.example.com", QTYPE.A, ttl=300, rdata=A("192.0.2.1")))
            r.add_answer(RR("evil.example.net", QTYPE.A, ttl=300, rdata=A("6.6.6.6")))
        r.add_ar(EDNS0(udp_len=1232))
        return bytes(r.pack())

    return {kind: reply(kind) for kind in ("A x2", "CNAME + 4 A", "NXDOMAIN + SOA",
                                           "liar (scrubbed)")}


def reply_parse(rounds: int) -> None:
    """CPU time of parse_reply (parse whole + scrub + TTL walk), best of ``rounds``."""
    from meshdns.dns.reply import parse_reply

    question_len = len(b"\x03www\x07example\x03com\x00") + 4
    print(f"parse_reply, us per reply (CPU time, best of {max(rounds, 5)} runs of 3000):")
    for kind, data in typical_replies().items():
        def once(data: bytes = data) -> None:
            parse_reply(data, question_len)

        best = min(timeit.timeit(once, number=3000, timer=time.process_time)
                   for _ in range(max(rounds, 5)))
        print(f"  {kind:16s} {best / 3000 * 1e6:6.2f}  ({len(data)} bytes)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--names", type=int, default=1024, help="names per set")
    ap.add_argument("--iterations", type=int, default=200_000, help="in-process, per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="UDP: per dnsperf run")
    ap.add_argument("--outstanding", type=int, default=200)
    ap.add_argument("--skip-udp", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not write " + str(RESULTS))
    ap.add_argument("--parse-only", action="store_true",
                    help="only time parse_reply (what a miss spends on the reply) and exit")
    args = ap.parse_args()
    command = "python bench/bench_forward.py " + " ".join(sys.argv[1:])
    if args.parse_only:
        reply_parse(args.rounds)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="meshdns-bench-forward-"))
    upstream, upstream_desc = start_upstream(workdir, forwarded_names(args.names))
    try:
        config = write_config(workdir, upstream.address, args.names)
        print(f"upstream: {upstream_desc}")
        inproc = asyncio.run(in_process(config, args.names, args.iterations, args.rounds))
        print("in-process qps, median (min..max) over", args.rounds, "rounds:")
        for label in ("local", "forwarded", "resolve_only", "core_only"):
            print(f"  {label:13s} {fmt(inproc[label])}")
        print(f"  forwarded/local: {ratio(inproc['forwarded'], inproc['local']):.3f}x")
        udp = None
        if not args.skip_udp:
            udp = over_udp(config, workdir, upstream, args.names, args.seconds,
                           args.rounds, args.outstanding)
            print(f"UDP ({udp['tool']}: {udp['command']}), qps median (min..max):")
            for label in ("local", "forwarded"):
                print(f"  {label:13s} {fmt(udp[label])}")
            print(f"  forwarded/local: {ratio(udp['forwarded'], udp['local']):.3f}x")
            print(f"  rcodes: {udp['rcodes']}")
    finally:
        upstream.stop()
    if not args.no_write:
        write_report(command, upstream_desc, args, inproc, udp)
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


def write_report(command: str, upstream: str, args: argparse.Namespace,
                 inproc: dict[str, list[float]], udp: dict[str, Any] | None) -> None:
    lines = [
        "# Forwarded names from the cache vs local mesh names",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"- machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Linux {platform.release()}; python {platform.python_version()}; "
        f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- run at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"- upstream: {upstream} (started by the bench; stopped before the UDP timed runs)",
        f"- {args.names} names per set: local `svc<i>.ns<k>.svc.80.mesh` (A), forwarded "
        "`host<i>.example.test` (A, TTL 3600, cached by one warm-up pass)",
        "",
        "## In-process (no sockets)",
        "",
        f"{args.iterations:,} queries per round, {args.rounds} rounds alternating. local: "
        "`MessageHandler.handle_udp(data)`; forwarded: `await forwarder.resolve(handle_udp(data), "
        "\"udp\")` (what the UDP transport runs, minus its task); resolve only: "
        "`await forwarder.resolve(request, \"udp\")` on prebuilt requests.",
        "",
        "| path | qps median (min..max) |",
        "| --- | ---: |",
        f"| local mesh name | {fmt(inproc['local'])} |",
        f"| forwarded, cache hit | {fmt(inproc['forwarded'])} |",
        f"| forwarder.resolve alone | {fmt(inproc['resolve_only'])} |",
        f"| core alone: handle_udp of a forwarded name | {fmt(inproc['core_only'])} |",
        "",
        f"forwarded / local: **{ratio(inproc['forwarded'], inproc['local']):.3f}x** "
        "(median of per-round ratios)",
        "",
        "Where the time goes: a local name is one dict hit on the query bytes in "
        "`MessageHandler.handle_udp`. A forwarded name misses that cache every time (the core "
        "does not cache forward decisions), so each query pays `parse_query` + "
        "`Zone.decide` + a `ForwardRequest` (the \"core alone\" row), and over UDP the "
        "transport then creates a task per query to await the forwarder. The forwarder's "
        "own cache hit (\"resolve alone\") is a memoised dict hit. Reaching 0.8x needs the "
        "core to memoise forward decisions per query bytes and call "
        "`Forwarder.answer_cached` synchronously (see the forwarding issue's notes).",
        "",
    ]
    if udp is not None:
        lines += [
            "## Over UDP on loopback",
            "",
            f"`meshdns serve` in its own process; load: {udp['tool']} "
            f"`{udp['command']}`, {args.rounds} rounds alternating local/forwarded. The "
            "upstream was stopped after the warm-up, so forwarded answers are cache hits "
            "(a miss would be SERVFAIL).",
            "",
            "| query set | qps median (min..max) |",
            "| --- | ---: |",
            f"| local mesh names | {fmt(udp['local'])} |",
            f"| forwarded, cache hit | {fmt(udp['forwarded'])} |",
            "",
            f"forwarded / local: **{ratio(udp['forwarded'], udp['local']):.3f}x**; "
            f"response codes: {udp['rcodes']}",
            "",
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
