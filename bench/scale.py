"""How meshdns behaves as the registry grows: memory, sync time, update latency, qps.

For each size (default 10k and 100k services; ``--million`` adds 1M) a fresh
meshdns starts with an empty registry and is loaded the way a control plane
would: one ``PUT /v1/services`` with the whole snapshot. Measured:

- RSS (VmRSS from /proc/PID/status) empty, after the load, and after the qps
  runs (reply cache filled), plus VmHWM (peak) — the memory a sidecar needs;
- full-sync time: the PUT round trip (the API answers once DNS serves the new
  snapshot), and a re-PUT of the identical snapshot (the steady-state push);
- PATCH-to-visible: PATCH one new service, then poll DNS until it answers;
  time from sending the PATCH to the first correct answer (median of several);
- qps: dnsperf A-only over names sampled from the registry, after a warm pass,
  rounds alternating between the sizes.

Every size's server stays up until the end, and the qps rounds alternate
between the sizes, so the ratio to the smallest size is measured under the
same machine conditions.

Usage: python bench/scale.py [--sizes 10000 100000] [--million] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import datagen
import peers
import report

SAMPLE = 20_000  # distinct names in the dnsperf file (sampled from the registry)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


class NoRoute(Exception):
    pass


def http(method: str, url: str, body: bytes | None = None,
         timeout: float = 600.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"error": text.decode(errors="replace")[:300]}
        if exc.code in (404, 405):
            raise NoRoute(f"{method} {url}: HTTP {exc.code}") from None
        return exc.code, doc


def wait_visible(port: int, svc: datagen.Svc, deadline_s: float = 30.0) -> float | None:
    """Seconds until ``svc`` answers with its VIP, polling every ~0.2 ms; None on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        got = peers.dns_query(port, svc.fqdn, "A", timeout=0.2)
        if got is not None and got[0] == "NOERROR" and svc.vip in got[1]:
            return time.perf_counter() - t0
        time.sleep(0.0002)
    return None


def timed_put(srv: peers.Server, body: bytes) -> tuple[float, float, Any]:
    """One PUT: (wall seconds, server CPU seconds, response document)."""
    c0 = sum(srv.cpu_times())
    t0 = time.perf_counter()
    code, doc = http("PUT", f"http://127.0.0.1:{srv.api_port}/v1/services", body)
    wall = time.perf_counter() - t0
    if code != 200:
        raise RuntimeError(f"PUT answered {code}: {doc}")
    return wall, sum(srv.cpu_times()) - c0, doc


def load_size(n: int, work: Path, patches: int, stack: contextlib.ExitStack,
              put_repeats: int = 1
              ) -> tuple[dict[str, Any], peers.Server | None, Path | None]:
    """Start a meshdns for ``n`` services, PUT, re-PUT, PATCH; leave it running (in stack).

    With ``put_repeats`` > 1 the PUT and re-PUT are timed on that many fresh
    processes (all but the last stopped again) and the medians reported.
    """
    res: dict[str, Any] = {"n": n, "notes": []}
    print(f"\n== {n:,} services", flush=True)
    services = datagen.generate(n)
    body = json.dumps(datagen.meshdns_body(services), separators=(",", ":")).encode()
    res["body_mb"] = len(body) / 1e6
    puts: list[tuple[float, float]] = []
    reputs: list[tuple[float, float]] = []
    for r in range(put_repeats):
        d = work / f"n{n}-{r}"
        d.mkdir()
        last = r == put_repeats - 1
        srv = stack.enter_context(peers.running("meshdns", d, None)) if last \
            else peers.start_meshdns(d, None)
        rss_empty = srv.rss_kb()
        wall, cpu, doc = timed_put(srv, body)
        puts.append((wall, cpu))
        print(f"  PUT {res['body_mb']:.1f} MB: {wall:.2f} s (server CPU {cpu:.2f} s) -> {doc}",
              flush=True)
        rss_loaded = srv.rss_kb()
        hwm_load = peers.proc_status_kb(srv.pid, "VmHWM")
        wall, cpu, doc = timed_put(srv, body)
        reputs.append((wall, cpu))
        print(f"  re-PUT identical: {wall:.2f} s (server CPU {cpu:.2f} s) -> {doc}", flush=True)
        if not last:
            srv.stop()
    res.update(rss_empty_kb=rss_empty, rss_loaded_kb=rss_loaded, hwm_load_kb=hwm_load,
               put_repeats=put_repeats,
               put_s=report.median([w for w, _ in puts]),
               put_cpu_s=report.median([c for _, c in puts]),
               put_range=(min(w for w, _ in puts), max(w for w, _ in puts)),
               reput_s=report.median([w for w, _ in reputs]),
               reput_cpu_s=report.median([c for _, c in reputs]),
               reput_range=(min(w for w, _ in reputs), max(w for w, _ in reputs)))
    del body
    rng = random.Random(n)
    for svc in rng.sample(services, 5):
        got = peers.dns_query(srv.port, svc.fqdn, "A")
        if got is None or got[1] != [svc.vip]:
            raise RuntimeError(f"{svc.fqdn}: expected {svc.vip}, got {got}")

    visible, rtts = [], []
    for k in range(patches):
        probe = datagen.Svc(f"probe{k}", "bench", 80,
                            f"241.0.{k // 256}.{k % 256}", f"fd00:fd00::ffff:0:0:{k:x}")
        patch = json.dumps({"upsert": [probe.to_json()], "delete": []}).encode()
        t0 = time.perf_counter()
        code, doc = http("PATCH", f"http://127.0.0.1:{srv.api_port}/v1/services", patch)
        rtt = time.perf_counter() - t0
        if code != 200:
            res["notes"].append(f"PATCH answered {code}: {doc}")
            break
        seen = wait_visible(srv.port, probe)
        if seen is None:
            res["notes"].append(f"{probe.fqdn} not visible 30 s after the PATCH")
            break
        visible.append(rtt + seen)
        rtts.append(rtt)
        time.sleep(0.05)
    if visible:
        res["patch_rtt_s"] = report.median(rtts)
        res["patch_visible_s"] = report.median(visible)
        res["patch_visible_max_s"] = max(visible)
        print(f"  PATCH round trip {res['patch_rtt_s'] * 1000:.1f} ms, visible in DNS "
              f"after {res['patch_visible_s'] * 1000:.1f} ms (median of {len(visible)})",
              flush=True)
    res["rss_patched_kb"] = srv.rss_kb()
    qfile = datagen.write_lines(d / "queries-a.txt",
                                datagen.query_lines(services, "a", SAMPLE, seed=n))
    return res, srv, qfile


def qps_rounds(loaded: list[tuple[dict[str, Any], peers.Server, Path]], rounds: int,
               seconds: float) -> None:
    """dnsperf against every loaded size, one warm pass each, then alternating rounds.

    Alternating (10k, 100k, 1M, 10k, ...) puts each size's rounds under the same
    machine conditions, so the per-round ratio to the smallest size is the figure
    to read on a shared machine.
    """
    for res, srv, qfile in loaded:
        with contextlib.suppress(RuntimeError):
            peers.run_dnsperf(srv.port, qfile, 60, outstanding=50, extra=["-n", "1"])
        res.update(qps_rounds=[], avg_ms_rounds=[], lost=0, cpu_s=0.0, completed=0)
    for rnd in range(rounds):
        for res, srv, qfile in loaded:
            c0 = sum(srv.cpu_times())
            r = peers.run_dnsperf(srv.port, qfile, seconds)
            res["cpu_s"] += sum(srv.cpu_times()) - c0
            res["completed"] += r.completed
            res["qps_rounds"].append(r.qps)
            res["avg_ms_rounds"].append(r.avg_ms)
            res["lost"] += r.lost
            print(f"  round {rnd + 1}/{rounds} {res['n']:>9,} services: {r.qps:,.0f} q/s, "
                  f"avg {r.avg_ms:.2f} ms, lost {r.lost}", flush=True)
    base = loaded[0][0]["qps_rounds"]
    for res, srv, _ in loaded:
        q = res["qps_rounds"]
        res.update(qps=report.median(q), qps_min=min(q), qps_max=max(q),
                   cpu_us_per_query=res["cpu_s"] / res["completed"] * 1e6
                   if res["completed"] else 0.0,
                   avg_ms=report.median(res["avg_ms_rounds"]),
                   vs_smallest=report.median([a / b for a, b in zip(q, base, strict=True)
                                              if b > 0]))
        res["rss_after_kb"] = srv.rss_kb()
        res["hwm_kb"] = peers.proc_status_kb(srv.pid, "VmHWM")
        print(f"  {res['n']:,}: RSS empty {report.fmt_kb(res['rss_empty_kb'])}, loaded "
              f"{report.fmt_kb(res['rss_loaded_kb'])}, after PATCHes "
              f"{report.fmt_kb(res['rss_patched_kb'])}, after queries "
              f"{report.fmt_kb(res['rss_after_kb'])}, peak {report.fmt_kb(res['hwm_kb'])}",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--million", action="store_true", help="also 1,000,000 services (heavy)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--patches", type=int, default=5, help="PATCH-to-visible samples per size")
    ap.add_argument("--put-repeats", type=int, default=5,
                    help="fresh processes the PUT is timed on, for sizes up to 100k")
    args = ap.parse_args()
    if not shutil.which("dnsperf"):
        raise SystemExit("dnsperf is not installed (`make bench-tools`)")
    sizes = sorted(set(args.sizes + ([1_000_000] if args.million else [])))
    results = []
    with tempfile.TemporaryDirectory(prefix="meshdns-scale-") as td, \
            contextlib.ExitStack() as stack:
        loaded = []
        for n in sizes:
            try:
                res, srv, qfile = load_size(n, Path(td), args.patches, stack,
                                            args.put_repeats if n <= 100_000 else 1)
                loaded.append((res, srv, qfile))
                results.append(res)
            except (RuntimeError, NoRoute, peers.ServerFailed, OSError) as exc:
                print(f"  {n:,}: failed: {exc}", flush=True)
                results.append({"n": n, "error": str(exc)[:500], "notes": []})
        if loaded:
            print(f"\n== qps: {args.rounds} rounds x {args.seconds:g} s, sizes alternating",
                  flush=True)
            qps_rounds(loaded, args.rounds, args.seconds)

    def spread(r: dict[str, Any], key: str) -> str:
        lo, hi = r[f"{key}_range"]
        if r["put_repeats"] == 1:
            return f"{r[f'{key}_s']:.2f} s"
        return f"{r[f'{key}_s']:.2f} s ({lo:.2f}..{hi:.2f}, {r['put_repeats']} runs)"

    def ms(r: dict[str, Any], key: str) -> str:
        return f"{r[key] * 1000:,.1f} ms" if key in r else "-"

    headers = ["services", "PUT body", "full sync (PUT)", "its server CPU", "re-PUT same",
               "its server CPU", "PATCH round trip",
               "PATCH-to-visible", "RSS empty", "RSS loaded", "RSS after PATCHes",
               "RSS after queries", "peak RSS", "RSS/service", "qps (median)", "min..max",
               f"vs {sizes[0]:,}", "server CPU/query", "avg latency"]
    rows = []
    notes = []
    for r in results:
        if "error" in r:
            rows.append([f"{r['n']:,}", "failed"] + ["-"] * (len(headers) - 2))
            notes.append(f"{r['n']:,}: {r['error']}")
            continue
        per_svc = (r["rss_loaded_kb"] - r["rss_empty_kb"]) * 1024 / r["n"]
        rows.append([
            f"{r['n']:,}", f"{r['body_mb']:.1f} MB", spread(r, "put"),
            f"{r['put_cpu_s']:.2f} s", spread(r, "reput"), f"{r['reput_cpu_s']:.2f} s",
            ms(r, "patch_rtt_s"), ms(r, "patch_visible_s"),
            report.fmt_kb(r["rss_empty_kb"]), report.fmt_kb(r["rss_loaded_kb"]),
            report.fmt_kb(r.get("rss_patched_kb", 0)), report.fmt_kb(r["rss_after_kb"]),
            report.fmt_kb(r["hwm_kb"]),
            f"{per_svc:,.0f} B", report.fmt_int(r["qps"]),
            f"{r['qps_min'] / 1000:.1f}k..{r['qps_max'] / 1000:.1f}k",
            f"{r['vs_smallest']:.2f}x", f"{r['cpu_us_per_query']:.1f} µs",
            f"{r['avg_ms']:.2f} ms"])
        notes += [f"{r['n']:,}: {n}" for n in r["notes"]]
    print()
    print(report.text_table(headers, rows))
    md = [
        "# Scale: registry size vs memory, sync time, update latency and qps",
        "",
        f"Command: `{report.command_line()}`",
        "",
        report.machine_md(),
        "",
        "## Method",
        "",
        "For each size a fresh meshdns (`dns.workers: 1`, no upstreams, empty resolv.conf) "
        "starts with an empty registry and gets the whole generated snapshot "
        "(`bench/datagen.py`, VIPs given) in one `PUT /v1/services`. *full sync* is that "
        "PUT's round trip from a Python client on loopback (the API answers only once DNS "
        "serves the new snapshot); *re-PUT same* pushes the identical snapshot again; "
        f"up to 100k services both are timed on {args.put_repeats} fresh processes (median, "
        "min..max; the last one stays up for the rest); "
        "*its server CPU* is the CPU time (user + system, /proc/PID/stat) the meshdns "
        "process used meanwhile, which, unlike the wall time, leaves out time spent "
        "waiting for a CPU other jobs held. "
        "*PATCH-to-visible*: PATCH upserting one new service, then UDP queries every ~0.2 ms "
        f"until it answers; median of {args.patches}, measured from sending the PATCH. "
        "RSS is VmRSS of the meshdns process (/proc/PID/status): empty, right after the PUT, "
        "after the re-PUT and the PATCHes (each builds a new snapshot; CPython keeps freed "
        "memory in its arenas), and after the qps runs (reply cache filled); *peak* is "
        "VmHWM. RSS/service = (loaded - empty) / services. Every size's server stays up "
        "for the qps part: dnsperf `-q 200 -c 1 -T 1`, A queries over "
        f"{SAMPLE:,} names sampled from each registry (fewer if smaller), one warm pass "
        f"each, then {args.rounds} rounds x {args.seconds:g} s alternating between the "
        f"sizes; qps is the median, *vs {sizes[0]:,}* the median of per-round ratios to "
        "the smallest size; *server CPU/query* is the meshdns process's CPU time during "
        "its rounds divided by the queries answered (the efficiency figure, which does "
        "not depend on how dnsperf and the server share the 2 CPUs in a round).",
        "",
        report.table(headers, rows),
        "",
    ]
    if notes:
        md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if not args.million:
        md += ["1M services is opt-in: `python bench/scale.py --million`.", ""]
    path = report.write_result("scale", "\n".join(md), {"results": results,
                                                        "machine": report.machine_info()})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
