"""One generated service set, rendered into every benchmarked server's own format.

The data is produced once (deterministic for a given size and seed) and then
written as: a meshdns seed/PUT body (JSON), unbound ``local-data`` lines, a knot
zone file, dnsmasq ``host-record`` lines and a plain dict for the dnslib
baseline. Every server therefore answers the same names with the same VIPs, and
the query files exercise the same answers on each.

Names are canonical mesh names ``svc<i>.ns<k>.svc.<port>.mesh``; IPv4 VIPs are
taken in order from 240.0.0.0/4 and IPv6 VIPs from fd00:fd00::/64, both given
explicitly (as a control plane would), so no server allocates anything.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAIN = "mesh"
TTL = 30
NEGATIVE_TTL = 5
PORTS = (80, 443, 8080, 9090, 5432, 6379, 3000, 50051)
V4_BASE = int(ipaddress.IPv4Address("240.0.0.0"))
V6_BASE = int(ipaddress.IPv6Address("fd00:fd00::"))
V4_SIZE = 1 << 28  # 240.0.0.0/4


@dataclass(frozen=True, slots=True)
class Svc:
    name: str
    namespace: str
    port: int
    vip: str
    vip6: str

    @property
    def fqdn(self) -> str:
        """Canonical mesh name, no trailing dot."""
        return f"{self.name}.{self.namespace}.svc.{self.port}.{DOMAIN}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "port": self.port,
                "vip": self.vip, "vip6": self.vip6}


def namespaces_for(n: int) -> int:
    """About 100 services per namespace, at least 1, at most 10 000 namespaces."""
    return max(1, min(10_000, n // 100))


def generate(n: int) -> list[Svc]:
    """``n`` services; service ``i`` always gets the same name and VIPs."""
    if not 0 < n < V4_SIZE - 1:
        raise ValueError(f"n must be 1..{V4_SIZE - 2}")
    n_ns = namespaces_for(n)
    out = []
    for i in range(n):
        out.append(Svc(
            name=f"svc{i}",
            namespace=f"ns{i % n_ns}",
            port=PORTS[i % len(PORTS)],
            vip=str(ipaddress.IPv4Address(V4_BASE + 1 + i)),
            vip6=str(ipaddress.IPv6Address(V6_BASE + 1 + i)),
        ))
    return out


def nx_names(count: int, n_ns: int, seed: int = 7) -> list[str]:
    """Names under the served domain that no server knows (NXDOMAIN everywhere).

    ``nx<j>.ns<k>.svc.80.mesh`` sits below an existing empty non-terminal in
    meshdns, which is exactly where a mistyped service name lands.
    """
    rng = random.Random(seed)
    return [f"nx{j}-{rng.randrange(1 << 30)}.ns{j % n_ns}.svc.80.{DOMAIN}" for j in range(count)]


# ---------------------------------------------------------------- query files


def query_lines(services: Sequence[Svc], kind: str, count: int, seed: int = 1) -> list[str]:
    """dnsperf input lines (``name TYPE``).

    ``a``: A queries for service names (each name once, shuffled, sampled when the
    registry is larger than ``count``). ``mix``: 80% A hits, 10% AAAA hits, 10%
    NXDOMAIN names, interleaved at random.
    """
    rng = random.Random(seed)
    if kind == "a":
        picked = rng.sample(range(len(services)), min(count, len(services)))
        return [f"{services[i].fqdn} A" for i in picked]
    if kind == "mix":
        n_a, n_aaaa = count * 8 // 10, count // 10
        n_nx = count - n_a - n_aaaa
        lines = [f"{services[rng.randrange(len(services))].fqdn} A" for _ in range(n_a)]
        lines += [f"{services[rng.randrange(len(services))].fqdn} AAAA" for _ in range(n_aaaa)]
        lines += [f"{name} A" for name in nx_names(n_nx, namespaces_for(len(services)))]
        rng.shuffle(lines)
        return lines
    raise ValueError(f"unknown query set {kind!r} (a, mix)")


QUERY_SETS = {"a": "A-only", "mix": "mix (80% A, 10% AAAA, 10% NXDOMAIN)"}


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="ascii")
    return path


# ---------------------------------------------------------------- renderers


def meshdns_body(services: Sequence[Svc]) -> dict[str, Any]:
    """A PUT /v1/services body; also a valid seed file (registry.seed_file)."""
    return {"services": [s.to_json() for s in services]}


def write_meshdns_seed(path: Path, services: Sequence[Svc]) -> Path:
    # JSON is YAML, and the PUT body and the seed file share one shape.
    path.write_text(json.dumps(meshdns_body(services), separators=(",", ":")), encoding="ascii")
    return path


def unbound_local_data(services: Sequence[Svc]) -> list[str]:
    """Server-clause lines: a static local zone holding every A and AAAA."""
    lines = [f'local-zone: "{DOMAIN}." static']
    for s in services:
        lines.append(f'local-data: "{s.fqdn}. {TTL} IN A {s.vip}"')
        lines.append(f'local-data: "{s.fqdn}. {TTL} IN AAAA {s.vip6}"')
    return lines


def knot_zone(services: Sequence[Svc]) -> str:
    head = [
        f"$ORIGIN {DOMAIN}.",
        f"$TTL {TTL}",
        f"@ SOA ns.{DOMAIN}. nobody.invalid. 1 3600 1200 604800 {NEGATIVE_TTL}",
        f"@ NS ns.{DOMAIN}.",
        "ns A 127.0.0.1",
    ]
    body = []
    for s in services:
        rel = s.fqdn[: -len(DOMAIN) - 1]
        body.append(f"{rel} A {s.vip}")
        body.append(f"{rel} AAAA {s.vip6}")
    return "\n".join(head + body) + "\n"


def dnsmasq_lines(services: Sequence[Svc]) -> list[str]:
    """Config lines: answer ``mesh`` locally only (unknown names: NXDOMAIN)."""
    lines = [f"local=/{DOMAIN}/"]
    lines += [f"host-record={s.fqdn},{s.vip},{s.vip6}" for s in services]
    return lines


def python_table(services: Sequence[Svc]) -> dict[str, list[str]]:
    """name (lower case, no trailing dot) -> [vip, vip6], for the dnslib baseline."""
    return {s.fqdn: [s.vip, s.vip6] for s in services}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", "-n", type=int, default=10_000)
    ap.add_argument("--out", required=True, help="directory to write every rendering to")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    svcs = generate(args.services)
    write_meshdns_seed(out / "meshdns-seed.json", svcs)
    write_lines(out / "unbound-local-data.conf", unbound_local_data(svcs))
    (out / "mesh.zone").write_text(knot_zone(svcs), encoding="ascii")
    write_lines(out / "dnsmasq-hosts.conf", dnsmasq_lines(svcs))
    (out / "table.json").write_text(json.dumps(python_table(svcs)), encoding="ascii")
    for kind in QUERY_SETS:
        write_lines(out / f"queries-{kind}.txt", query_lines(svcs, kind, 10_000))
    print(f"wrote {len(svcs)} services in every format to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
