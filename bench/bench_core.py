"""Micro benchmark of the pure core: no sockets, no event loop.

Times ``MessageHandler.handle_udp(bytes)`` per query kind, in the steady state (a hit
of the pre-encoded reply cache) and on the miss path (first-time: the wire fast
path, or parse, decide and dnslib encode for the rarer questions), plus the cost of building and swapping in a whole registry snapshot
(``parse_services`` + ``apply_put`` + ``Zone`` + ``MessageHandler.set_zone``).

Method: ``time.perf_counter_ns`` around a loop over a list of distinct query
packets; each figure is the median of several repeats. Hit figures include the
Python ``for`` loop and call overhead, which is measured separately (the
"empty loop" row) so the per-query work can be read off as the difference.

``--against REF`` adds the miss rows of the core at git ``REF`` (its meshdns/core,
extracted beside this one), timed in this same process alternately with this tree's:
both then see the same machine, which on a shared one is what makes two cores
comparable.

Usage: python bench/bench_core.py [--quick] [--big 100000] [--no-write] [--against REF]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import io
import ipaddress
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datagen
import report
from dnslib import DNSRecord

from meshdns.core.answer import MessageHandler, Zone, ZoneSettings
from meshdns.core.registry import (
    CANONICAL_TEMPLATE,
    Registry,
    RegistryPolicy,
    VipRange,
    apply_put,
    parse_entries,
    parse_services,
    parse_templates,
)
from meshdns.gcpause import gc_paused

DISTINCT = 1000  # distinct packets per kind in the hit loops
MISS_KINDS = ("A hit", "AAAA hit", "NXDOMAIN", "NODATA (TXT of a service)", "SRV",
              "PTR (in-addr.arpa)", "A hit, EDNS")
# Three hostname templates (issue 16): the canonical form and two rendered ones, so
# every service gets two names from a table built with the snapshot.
TEMPLATES = (CANONICAL_TEMPLATE, "{name}-{port}.{namespace}.svc.mesh.local",
             "{name}-{port}.{namespace}.{domain}")
TEMPLATE_POLICY = RegistryPolicy(templates=parse_templates(TEMPLATES))


def template_name(s: datagen.Svc) -> str:
    return f"{s.name}-{s.port}.{s.namespace}.svc.mesh.local"


def packet(name: str, qtype: str, qid: int = 0x1234) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    return bytes(q.pack())


def reverse_name(vip: str) -> str:
    return ipaddress.ip_address(vip).reverse_pointer


def settings() -> ZoneSettings:
    return ZoneSettings(domains=("mesh",), range4=VipRange.from_cidr("240.0.0.0/4"),
                        range6=VipRange.from_cidr("fd00:fd00::/64"))


def build(services: Sequence[datagen.Svc], policy: RegistryPolicy,
          allocate: bool = False) -> Registry:
    raw = [s.to_json() for s in services]
    if allocate:
        for item in raw:
            item.pop("vip")
            item.pop("vip6")
    return apply_put(Registry.empty(), parse_services(raw), policy, 1000.0)


def query_sets(services: Sequence[datagen.Svc]) -> dict[str, list[bytes]]:
    picked = services[:DISTINCT]
    nx = datagen.nx_names(DISTINCT, datagen.namespaces_for(len(services)))
    return {
        "A hit": [packet(s.fqdn, "A") for s in picked],
        "AAAA hit": [packet(s.fqdn, "AAAA") for s in picked],
        "NXDOMAIN": [packet(n, "A") for n in nx],
        "NODATA (TXT of a service)": [packet(s.fqdn, "TXT") for s in picked],
        "SRV": [packet(s.fqdn, "SRV") for s in picked],
        "PTR (in-addr.arpa)": [packet(reverse_name(s.vip), "PTR") for s in picked],
        "A hit, EDNS": [bytes(_edns(s.fqdn).pack()) for s in picked],
    }


def _edns(name: str) -> DNSRecord:
    from dnslib import EDNS0

    q = DNSRecord.question(name, "A")
    q.add_ar(EDNS0(udp_len=1232))
    return q


def time_loop(fn: Callable[[bytes], Any], packets: Sequence[bytes],
              passes: int) -> tuple[float, float]:
    """(wall ns, CPU ns) per call of ``fn`` over ``passes`` passes of ``packets``.

    The CPU figure (process_time) leaves out time this process sat descheduled,
    which on a shared machine is most of the noise in the wall-clock figure.
    """
    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(passes):
        for p in packets:
            fn(p)
    wall, cpu = time.perf_counter_ns() - t0, time.process_time_ns() - c0
    return wall / (passes * len(packets)), cpu / (passes * len(packets))


def stats(samples: list[tuple[float, float]]) -> dict[str, Any]:
    wall = [w for w, _ in samples]
    return {"ns": report.median(wall), "spread": (min(wall), max(wall)),
            "cpu_ns": report.median([c for _, c in samples])}


def noop(data: bytes) -> None:
    return None


def expect_rcode(resolver: MessageHandler, packets: Sequence[bytes], kind: str) -> str:
    out = resolver.handle_udp(packets[0])
    if not isinstance(out, bytes):
        raise SystemExit(f"{kind}: expected a local reply, got {out!r}")
    reply = DNSRecord.parse(out)
    from dnslib import RCODE
    return f"{RCODE[reply.header.rcode]}, {len(reply.rr)} answer(s), {len(out)} B"


def bench_hits(resolver: MessageHandler, sets: dict[str, list[bytes]], repeats: int,
               passes: int) -> list[dict[str, Any]]:
    shapes = {}
    for kind, packets in sets.items():
        shapes[kind] = expect_rcode(resolver, packets, kind)
        for p in packets:  # warm: every packet is now a cache hit
            resolver.handle_udp(p)
    gc.collect()
    # Repeats interleaved across kinds (loop, A, AAAA, ..., loop, A, ...): a slow
    # spell of the shared machine then lands on every row alike, not on a few.
    loop: list[tuple[float, float]] = []
    samples: dict[str, list[tuple[float, float]]] = {kind: [] for kind in sets}
    for _ in range(repeats):
        loop.append(time_loop(noop, sets["A hit"], passes))
        for kind, packets in sets.items():
            samples[kind].append(time_loop(resolver.handle_udp, packets, passes))
    rows = [{"kind": "empty loop (call overhead)", **stats(loop), "reply": "-"}]
    rows += [{"kind": kind + " (cached)", **stats(samples[kind]), "reply": shapes[kind]}
             for kind in sets]
    return rows


def bench_misses(zone: Zone, sets: dict[str, list[bytes]], repeats: int) -> list[dict[str, Any]]:
    """Each packet once through a fresh MessageHandler (an empty reply cache).

    The snapshot's encoded SRV targets and PTR names (``Zone.encoded``) are
    computed once per service and carried from snapshot to snapshot, so they are
    warm from the second repeat on; the "new snapshot" rows start each repeat from
    a zone that has encoded nothing yet (the first question ever for a service).
    """
    rows = []
    kinds = [(k, False) for k in MISS_KINDS]
    kinds += [("SRV", True), ("PTR (in-addr.arpa)", True)]
    for kind, fresh in kinds:
        packets = sets[kind]
        samples = []
        for _ in range(repeats):
            z = Zone(zone.registry, zone.settings) if fresh else zone
            resolver = MessageHandler(z)  # empty reply cache: every packet is a first time
            gc.collect()
            samples.append(time_loop(resolver.handle_udp, packets, 1))
        label = kind.replace(" hit", "") + " miss" + (", new snapshot" if fresh else "")
        rows.append({"kind": label, **stats(samples), "reply": "-"})
    return rows


def mesh_items(services: Sequence[datagen.Svc]) -> list[dict[str, Any]]:
    """The same services as multi-port mesh services (issue 25): each one entry with its
    port and a second one (port + 10000), one VIP for both, and a port-less host name."""
    return [{"name": s.name, "namespace": s.namespace, "mesh": "default",
             "ports": [{"port": s.port, "name": "http"},
                       {"port": s.port % 55000 + 10000, "name": "admin"}],
             "vip": s.vip, "vip6": s.vip6, "hostnames": [f"{s.name}.{s.namespace}.{datagen.DOMAIN}"]}
            for s in services]


def bench_mesh(services: Sequence[datagen.Svc], zone: Zone, repeats: int,
               passes: int) -> list[dict[str, Any]]:
    """Hit and miss cost of A questions at the per-port names of a registry of two-port
    mesh services, beside the same questions to today's per-port services (``zone``),
    alternately in each repeat."""
    mesh_reg = apply_put(Registry.empty(), parse_entries(mesh_items(services)),
                         RegistryPolicy(), 1000.0)
    mesh_zone = Zone(mesh_reg, settings())
    picked = services[:DISTINCT]
    sets = {
        "A, per-port name": ([packet(s.fqdn, "A") for s in picked], zone, mesh_zone),
        "A, port-less host name": (
            [packet(f"{s.name}.{s.namespace}.{datagen.DOMAIN}", "A") for s in picked], None,
            mesh_zone),
        "SRV, port-less host name": (
            [packet(f"{s.name}.{s.namespace}.{datagen.DOMAIN}", "SRV") for s in picked], None,
            mesh_zone),
    }
    rows = []
    for kind, (packets, legacy, mesh) in sets.items():
        for label, z in (("per-port services", legacy), ("mesh services", mesh)):
            if z is None:
                continue
            miss: list[tuple[float, float]] = []
            hit: list[tuple[float, float]] = []
            for _ in range(repeats):
                resolver = MessageHandler(Zone(z.registry, z.settings))
                gc.collect()
                miss.append(time_loop(resolver.handle_udp, packets, 1))
                hit.append(time_loop(resolver.handle_udp, packets, passes))
            shape = expect_rcode(MessageHandler(z), packets, kind)
            rows.append({"kind": f"{label}: {kind}", "miss": stats(miss), "hit": stats(hit),
                         "reply": shape})
    return rows


def core_at(ref: str) -> SimpleNamespace:
    """The core of git ``ref`` (meshdns/core, imported as the package ``core_at_ref``):
    the names the miss rows use, from either layout (core/answer + core/registry since
    issue 24, one flat core/ before)."""
    repo = Path(__file__).resolve().parent.parent
    tar = subprocess.run(["git", "-C", str(repo), "archive", ref, "meshdns/core"],
                         capture_output=True, check=True).stdout
    root = Path(tempfile.mkdtemp(prefix="bench-core-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")
    (root / "meshdns" / "core").rename(root / "core_at_ref")
    sys.path.insert(0, str(root))
    try:
        answer = importlib.import_module("core_at_ref.answer")
        registry = importlib.import_module("core_at_ref.registry")
        return SimpleNamespace(MessageHandler=answer.MessageHandler, Zone=answer.Zone,
                               ZoneSettings=answer.ZoneSettings, Registry=registry.Registry,
                               RegistryPolicy=registry.RegistryPolicy,
                               apply_put=registry.apply_put,
                               parse_services=registry.parse_services,
                               VipRange=registry.VipRange)
    except ModuleNotFoundError:  # the flat core/
        handler = importlib.import_module("core_at_ref.handler")
        zone = importlib.import_module("core_at_ref.zone")
        registry = importlib.import_module("core_at_ref.registry")
        return SimpleNamespace(MessageHandler=handler.MessageHandler, Zone=zone.Zone,
                               ZoneSettings=zone.ZoneSettings, Registry=registry.Registry,
                               RegistryPolicy=registry.RegistryPolicy,
                               apply_put=registry.apply_put,
                               parse_services=registry.parse_services,
                               VipRange=importlib.import_module("core_at_ref.vip").VipRange)


def bench_against(ref: str, services: Sequence[datagen.Svc], sets: dict[str, list[bytes]],
                  repeats: int) -> list[dict[str, Any]]:
    """Miss rows of the core at ``ref`` and of this tree's, each repeat of one then the
    other, in this process (the "miss" method of bench_misses otherwise)."""
    this = SimpleNamespace(MessageHandler=MessageHandler, Zone=Zone, ZoneSettings=ZoneSettings,
                           Registry=Registry, RegistryPolicy=RegistryPolicy,
                           apply_put=apply_put, parse_services=parse_services,
                           VipRange=VipRange)
    raw = [s.to_json() for s in services]
    zones = []
    for api in (core_at(ref), this):
        reg = api.apply_put(api.Registry.empty(), api.parse_services(raw), api.RegistryPolicy(),
                            1000.0)
        zones.append((api, api.Zone(reg, api.ZoneSettings(
            domains=("mesh",), range4=api.VipRange.from_cidr("240.0.0.0/4"),
            range6=api.VipRange.from_cidr("fd00:fd00::/64")))))
    rows = []
    for kind in MISS_KINDS:
        packets = sets[kind]
        samples: list[list[tuple[float, float]]] = [[], []]
        for _ in range(repeats):
            for i, (api, zone) in enumerate(zones):
                resolver = api.MessageHandler(zone)
                gc.collect()
                samples[i].append(time_loop(resolver.handle_udp, packets, 1))
        before, after = (report.median([c for _, c in s]) for s in samples)
        rows.append({"kind": kind.replace(" hit", "") + " miss", "before_cpu_ns": before,
                     "after_cpu_ns": after})
    return rows


def bench_change(services: Sequence[datagen.Svc], repeats: int) -> list[dict[str, Any]]:
    """A one-service PATCH under a warm reply cache: what it costs to get warm again.

    The cache holds an A reply for every service (random letter case) and 1000
    NXDOMAIN replies. After the PATCH, every one of those questions is asked
    again. "kept" is what the resolver does (it drops only the changed service's
    names and the negative answers); "dropped" is the same change without its
    delta (as after a full PUT), so every question is a miss again.
    """
    import dataclasses
    import random

    from meshdns.core.registry import ServiceSpec, apply_patch

    rng = random.Random(7)
    policy = RegistryPolicy()
    reg = build(services, policy)
    zone = Zone(reg, settings())
    names = [s.fqdn for s in services]
    nx = datagen.nx_names(1000, datagen.namespaces_for(len(services)))
    packets = [packet("".join(c.upper() if rng.random() < 0.5 else c for c in n), "A")
               for n in names + nx]
    first = next(iter(reg.services.values()))
    changed = apply_patch(reg, [ServiceSpec(first.name, first.namespace, first.port,
                                            None, None, ())],
                          [], policy, 2000.0)
    assert changed._delta is not None and changed.revision != reg.revision
    without_delta = dataclasses.replace(changed, _delta=None)
    rows = []
    for label, new_reg in (("kept (what a PATCH does)", changed),
                           ("dropped (every reply again)", without_delta)):
        swap: list[float] = []
        again: list[float] = []
        for _ in range(repeats):
            resolver = MessageHandler(zone)
            for p in packets:
                resolver.handle_udp(p)
            new_zone = Zone(new_reg, zone.settings)
            gc.collect()
            c0 = time.process_time_ns()
            resolver.set_zone(new_zone)
            c1 = time.process_time_ns()
            for p in packets:
                resolver.handle_udp(p)
            c2 = time.process_time_ns()
            swap.append(c1 - c0)
            again.append(c2 - c1)
        rows.append({"kind": label, "cached": len(packets), "swap_ns": report.median(swap),
                     "again_ns": report.median(again)})
    return rows


def bench_build(n: int, repeats: int, allocate: bool = False,
                policy: RegistryPolicy | None = None) -> dict[str, Any]:
    services = datagen.generate(n)
    raw = [s.to_json() for s in services]
    if allocate:
        for item in raw:
            item.pop("vip")
            item.pop("vip6")
    policy = policy or RegistryPolicy()
    zs = settings()
    resolver = MessageHandler(Zone(Registry.empty(), zs))
    parts: dict[str, list[float]] = {"parse": [], "apply_put": [], "zone": [], "swap": [],
                                     "total": []}
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter_ns()
        with gc_paused():  # as the server runs them (meshdns/gcpause.py)
            specs = parse_services(raw)
        t1 = time.perf_counter_ns()
        with gc_paused():
            reg = apply_put(Registry.empty(), specs, policy, 1000.0)
        t2 = time.perf_counter_ns()
        zone = Zone(reg, zs)
        t3 = time.perf_counter_ns()
        resolver.set_zone(zone)
        t4 = time.perf_counter_ns()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            parts[key].append(value)
        assert len(resolver.zone.registry) == n
        del specs, reg, zone
    return {"n": n, "allocate": allocate, "templates": len(policy.templates),
            **{k: report.median(v) for k, v in parts.items()},
            "total_spread": (min(parts["total"]), max(parts["total"]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000, help="registry size for queries")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--passes", type=int, default=200, help="passes over 1000 packets per repeat")
    ap.add_argument("--big", type=int, nargs="*", default=[10_000, 100_000],
                    help="registry sizes to time building/swapping (default 10k 100k)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and passes (smoke)")
    ap.add_argument("--no-write", action="store_true", help="print only, no results/core.md")
    ap.add_argument("--mesh", action="store_true",
                    help="also time a registry of two-port mesh services (issue 25)")
    ap.add_argument("--against", metavar="REF",
                    help="also time the miss rows of the core at this git ref, alternately")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.passes = 3, 20
    header = report.machine_md({"registry for queries": f"{args.services:,} services"})
    print(header)

    services = datagen.generate(args.services)
    zone = Zone(build(services, RegistryPolicy()), settings())
    resolver = MessageHandler(zone)
    sets = query_sets(services)
    print(f"\ntiming handle_udp: {args.repeats} repeats x {args.passes} passes x "
          f"{DISTINCT} distinct packets per kind ...", flush=True)
    hits = bench_hits(resolver, sets, args.repeats, args.passes)
    # The hit path with 3 templates: the same cached-reply lookup, whatever named it.
    t_resolver = MessageHandler(Zone(build(services, TEMPLATE_POLICY), settings()))
    t_sets = {"A hit": sets["A hit"],
              "A hit, rendered name": [packet(template_name(s), "A")
                                       for s in services[:DISTINCT]]}
    for row in bench_hits(t_resolver, t_sets, args.repeats, args.passes)[1:]:
        hits.append({**row, "kind": "3 templates: " + row["kind"]})
    misses = bench_misses(zone, sets, args.repeats)
    against = bench_against(args.against, services, sets, args.repeats) if args.against else []
    a_headers = ["miss", f"{args.against} (CPU ns)", "this tree (CPU ns)", "this / that"]
    a_rows = [[r["kind"], f"{r['before_cpu_ns']:,.0f}", f"{r['after_cpu_ns']:,.0f}",
               f"{r['after_cpu_ns'] / r['before_cpu_ns']:.3f}"] for r in against]
    if a_rows:
        print(report.text_table(a_headers, a_rows), flush=True)
    mesh_rows = bench_mesh(services, zone, args.repeats, args.passes) if args.mesh else []
    m_headers = ["question", "miss CPU ns (median)", "hit CPU ns (median)", "reply"]
    m_rows = [[r["kind"], f"{r['miss']['cpu_ns']:,.0f}", f"{r['hit']['cpu_ns']:,.0f}",
               r["reply"]] for r in mesh_rows]
    if m_rows:
        print(report.text_table(m_headers, m_rows), flush=True)
    change = bench_change(services, args.repeats)
    c_headers = ["after a one-service PATCH", "cached replies", "set_zone (CPU)",
                 "asking them all again (CPU)", "per question", "total"]
    c_rows = [[c["kind"], f"{c['cached']:,}", report.fmt_ns(c["swap_ns"]),
               report.fmt_ns(c["again_ns"]), f"{c['again_ns'] / c['cached']:,.0f} ns",
               report.fmt_ns(c["swap_ns"] + c["again_ns"])] for c in change]
    overhead = hits[0]["cpu_ns"]
    q_rows = []
    for r in hits + misses:
        net = r["cpu_ns"] - overhead if r is not hits[0] else r["cpu_ns"]
        q_rows.append([r["kind"], f"{r['ns']:,.0f}",
                       f"{r['spread'][0]:,.0f}..{r['spread'][1]:,.0f}", f"{r['cpu_ns']:,.0f}",
                       f"{net:,.0f}", report.fmt_int(1e9 / r["cpu_ns"]), r["reply"]])
    q_headers = ["query", "wall ns/query (median)", "wall min..max", "CPU ns/query (median)",
                 "CPU minus loop", "queries/s, 1 core (CPU)", "reply"]
    print(report.text_table(q_headers, q_rows), flush=True)
    print(report.text_table(c_headers, c_rows), flush=True)

    b_rows = []
    build_data = []
    sizes = [(n, False, False) for n in args.big] + [(args.big[0], True, False)] \
        + [(args.big[-1], False, True)] if args.big else []
    for n, allocate, templated in sizes:
        reps = 3 if n <= 100_000 and not args.quick else 1
        print(f"\nbuilding a {n:,}-service registry{' (VIPs allocated)' if allocate else ''}"
              f"{' (3 templates)' if templated else ''}, {reps} repeat(s) ...", flush=True)
        b = bench_build(n, reps, allocate, TEMPLATE_POLICY if templated else None)
        build_data.append(b)
        b_rows.append([f"{n:,}" + (" (VIPs allocated)" if allocate else " (VIPs given)")
                       + (", 3 templates" if templated else ""),
                       report.fmt_ns(b["parse"]), report.fmt_ns(b["apply_put"]),
                       report.fmt_ns(b["zone"]), report.fmt_ns(b["swap"]),
                       report.fmt_ns(b["total"]), f"{b['total'] / n / 1000:.1f} µs",
                       reps])
    b_headers = ["services", "parse_services", "apply_put", "Zone()", "set_zone", "total",
                 "per service", "repeats"]
    if b_rows:
        print(report.text_table(b_headers, b_rows))

    md = [
        "# Core micro benchmark (no sockets)",
        "",
        f"Command: `{report.command_line()}`",
        "",
        header,
        "",
        "## Method",
        "",
        f"`MessageHandler.handle_udp(bytes)` called in a Python loop over {DISTINCT} distinct query "
        f"packets per kind (names from a generated {args.services:,}-service registry, "
        "`bench/datagen.py`), timed with `time.perf_counter_ns`; "
        f"{args.passes} passes per repeat, median of {args.repeats} repeats, the repeats of all hit kinds interleaved so a slow spell of the shared machine lands on every row alike. "
        "*Cached* rows are the steady state: every packet was answered once before, so the "
        "reply comes from the pre-encoded cache (slice + dict lookup + concatenation). "
        "*Miss* rows run each packet once through a fresh `MessageHandler` (empty cache, nothing "
        "encoded yet for the snapshot): the wire fast path (`meshdns/core/answer/_fastpath.py`: light "
        "parse, `Zone.locate`, a bytes join), cache insert. \"CPU minus loop\" subtracts the empty "
        "loop (calling a no-op function per packet). queries/s = 1e9 / ns: an upper bound for one "
        "core, before any socket work. *CPU* columns use `time.process_time_ns` over the same "
        "loops: on a shared machine they leave out the time the benchmark sat descheduled, "
        "so they are the steadier figure; wall and CPU agree on an idle machine.",
        "",
        report.table(q_headers, q_rows, "lrrrrrl"),
        "",
        "## A registry change under a warm cache",
        "",
        "The reply cache holds an A reply for every service of the registry (random letter "
        "case) and 1000 NXDOMAIN replies; one service is PATCHed, then every question is "
        "asked again (`bench_change`). *kept*: the resolver drops only the replies the PATCH "
        "can have changed (the service's names, reverse names, and every negative answer, "
        "whose SOA serial is the revision). *dropped*: the same change without its delta, as "
        "after a full PUT: every reply is a miss again. CPU time, median of the repeats.",
        "",
        report.table(c_headers, c_rows, "lrrrrr"),
        "",
        "## Registry build and swap",
        "",
        "Time to turn a full snapshot of N service dicts (as a PUT body or seed file "
        "would hold them, after JSON decoding) into what DNS answers from: "
        "`parse_services` (validation), `apply_put` onto an empty registry (indexes, VIP "
        "checks or allocation), `Zone(registry, settings)` and `MessageHandler.set_zone` "
        "(the swap, which drops the reply caches). The first two run with the cyclic "
        "garbage collector paused, as the server runs them (`meshdns/gcpause.py`). "
        "Median of the repeats shown. The \"3 templates\" row builds under "
        f"`dns.hostname_templates: {list(TEMPLATES)}`: two names rendered per service and "
        "checked for collisions while the snapshot is built (issue 16).",
        "",
        report.table(b_headers, b_rows),
        "",
    ]
    if m_rows:
        md += [
            "## Multi-port mesh services (issue 25)",
            "",
            f"The same {args.services:,} services as two-port mesh services (one VIP for "
            "both ports, a port-less host name each; `bench_mesh`), beside today's per-port "
            "services. Each repeat: the 1000 packets once through a fresh `MessageHandler` "
            f"(*miss*), then {args.passes} passes (*hit*: the reply cache). CPU ns per "
            "query including the loop, median of the repeats.",
            "",
            report.table(m_headers, m_rows, "lrrl"),
            "",
        ]
    if a_rows:
        md += [
            f"## Misses against `{args.against}`",
            "",
            f"The miss rows of the core at `{args.against}` and of this tree, in this one "
            "process: each repeat runs one core's fresh `MessageHandler`, then the other's, "
            "so a slow spell of the shared machine lands on both alike. CPU ns per query "
            f"including the loop, median of {args.repeats} repeats.",
            "",
            report.table(a_headers, a_rows, "lrrr"),
            "",
        ]
    if not args.no_write:
        path = report.write_result("core", "\n".join(md),
                                   {"queries": hits + misses, "change": change,
                                    "against": {"ref": args.against, "misses": against},
                                    "mesh": mesh_rows,
                                    "build": build_data,
                                    "machine": report.machine_info()})
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
