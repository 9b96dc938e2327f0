"""glibc's stub resolver (getent) resolving mesh names through meshdns on 127.0.0.1:53.

glibc only talks to port 53 of the nameservers in /etc/resolv.conf, so the test
runs in its own network and mount namespaces (``unshare -n -m``): a fresh
loopback-only network where meshdns may bind 127.0.0.1:53, and private bind
mounts of resolv.conf, nsswitch.conf and hosts. Nothing leaves that namespace
(it has no interface but lo) and nothing changes on the host.

It skips, saying why, only when unshare is not permitted here; with CI=true it
fails instead, so CI always runs it (tests/netns.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from ..netns import HOSTS, NSSWITCH, require_namespaces, run_in_namespaces

SERVICES = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"},
]

# The driver runs inside the namespaces as root. It starts meshdns, waits until
# it answers, runs every getent and writes {label: {"rc": N, "out": "..."}} as JSON.
DRIVER = r"""
set -u
D="$1"
fail() { echo "driver: $*" >&2; exit 3; }
ip link set lo up || fail "cannot bring lo up"
# getent ahosts* passes AI_ADDRCONFIG: glibc then returns only the families of
# addresses configured other than 127.0.0.1 and ::1. Documentation addresses on lo
# satisfy it; they are local to this namespace, so nothing is ever sent anywhere.
ip addr add 192.0.2.1/32 dev lo || fail "cannot add 192.0.2.1 to lo"
ip -6 addr add 2001:db8::1/128 dev lo nodad || fail "cannot add 2001:db8::1 to lo"
for f in resolv.conf nsswitch.conf hosts; do
    [ -e "/etc/$f" ] || fail "/etc/$f does not exist: nothing to bind-mount over"
    mount --bind "$D/$f" "/etc/$f" || fail "cannot bind-mount $D/$f over /etc/$f"
done
grep -qx 'hosts: files dns' /etc/nsswitch.conf || fail "nsswitch.conf in the namespace lacks 'hosts: files dns'"
grep -qx 'nameserver 127.0.0.1' /etc/resolv.conf || fail "resolv.conf in the namespace is not ours"
"$PYTHON" -m meshdns serve --config "$D/meshdns.yaml" >"$D/meshdns.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT
"$PYTHON" "$D/probe.py" || { cat "$D/meshdns.log" >&2; fail "meshdns did not answer on 127.0.0.1:53"; }
"$PYTHON" "$D/lookups.py" >"$D/results.json" || fail "lookups failed"
"""

# Waits (bounded) until meshdns answers a mesh name on 127.0.0.1:53.
PROBE = r"""
import sys, time
import dns.message, dns.query
q = dns.message.make_query("frontend.kong.svc.80.mesh", "A")
for _ in range(200):
    try:
        r = dns.query.udp(q, "127.0.0.1", port=53, timeout=0.2, ignore_unexpected=True)
        if any(rr.to_text() == "240.0.0.7" for s in r.answer for rr in s):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit(1)
"""

LOOKUPS = r"""
import json, subprocess
out = {}
for label, args in [
    ("v4-canonical", ["ahostsv4", "frontend.kong.svc.80.mesh"]),
    ("v4-hostname", ["ahostsv4", "frontend.mesh"]),
    ("v4-kuma", ["ahostsv4", "backend_kong_svc_8080.mesh"]),
    ("v6-canonical", ["ahostsv6", "frontend.kong.svc.80.mesh"]),
    ("v6-hostname", ["ahostsv6", "frontend.mesh"]),
    ("unspec-no-vip6", ["ahosts", "backend.kong.svc.8080.mesh"]),
    ("hosts-canonical", ["hosts", "frontend.kong.svc.80.mesh"]),
    ("hosts-no-vip6", ["hosts", "backend.kong.svc.8080.mesh"]),
    ("v4-unknown", ["ahostsv4", "nope.kong.svc.80.mesh"]),
]:
    p = subprocess.run(["getent", *args], capture_output=True, text=True, timeout=20)
    out[label] = {"rc": p.returncode, "out": p.stdout}
print(json.dumps(out))
"""


def run_glibc_driver(d: Path, services: list[dict[str, object]], dns: dict[str, object],
                     lookups: str) -> dict[str, dict[str, object]]:
    """meshdns serving ``services`` on 127.0.0.1:53 (``dns`` added to its dns section)
    in private namespaces, then the ``lookups`` script there: its JSON results."""
    require_namespaces("getent")
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (d / "nsswitch.conf").write_text(NSSWITCH)
    (d / "hosts").write_text(HOSTS)
    (d / "upstream-resolv.conf").write_text("# no nameservers: meshdns forwards nothing\n")
    (d / "seed.yaml").write_text(yaml.safe_dump({"services": services}))
    (d / "meshdns.yaml").write_text(yaml.safe_dump({
        "dns": {"listen": ["127.0.0.1:53"], "upstreams": [],
                "resolv_conf": str(d / "upstream-resolv.conf"), **dns},
        "api": {"listen": "127.0.0.1:15080"},
        # No allocated IPv6 VIPs: a service without vip6 has no AAAA (glibc: NODATA).
        "registry": {"seed_file": str(d / "seed.yaml"), "cidr6": None},
        "log": {"level": "warning"},
    }))
    (d / "driver.sh").write_text(DRIVER)
    (d / "probe.py").write_text(PROBE)
    (d / "lookups.py").write_text(lookups)
    results: dict[str, dict[str, object]] = run_in_namespaces(
        ["env", f"PYTHON={sys.executable}", "sh", str(d / "driver.sh"), str(d)], d)
    return results


@pytest.fixture(scope="module")
def glibc_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return run_glibc_driver(tmp_path_factory.mktemp("glibc"), SERVICES, {}, LOOKUPS)


def lines(result: dict[str, object]) -> list[list[str]]:
    assert result["rc"] == 0, result
    out = result["out"]
    assert isinstance(out, str)
    return [line.split() for line in out.splitlines() if line.strip()]


def test_getent_ahostsv4_canonical_name(glibc_results: dict[str, dict[str, object]]) -> None:
    rows = lines(glibc_results["v4-canonical"])
    assert {r[0] for r in rows} == {"240.0.0.7"}
    assert rows[0] == ["240.0.0.7", "STREAM", "frontend.kong.svc.80.mesh"]


def test_getent_ahostsv4_hostname(glibc_results: dict[str, dict[str, object]]) -> None:
    rows = lines(glibc_results["v4-hostname"])
    assert {r[0] for r in rows} == {"240.0.0.7"}
    assert rows[0] == ["240.0.0.7", "STREAM", "frontend.mesh"]


def test_getent_ahostsv4_kuma_name(glibc_results: dict[str, dict[str, object]]) -> None:
    rows = lines(glibc_results["v4-kuma"])
    assert {r[0] for r in rows} == {"240.0.0.8"}


def test_getent_ahostsv6_gives_the_vip6(glibc_results: dict[str, dict[str, object]]) -> None:
    for label, name in (("v6-canonical", "frontend.kong.svc.80.mesh"),
                        ("v6-hostname", "frontend.mesh")):
        rows = lines(glibc_results[label])
        # The AAAA record itself, not a v4-mapped ::ffff:240.0.0.7.
        assert {r[0] for r in rows} == {"fd00:fd00::7"}, rows
        assert rows[0] == ["fd00:fd00::7", "STREAM", name]


def test_getent_ahosts_without_vip6_gives_only_the_vip(
        glibc_results: dict[str, dict[str, object]]) -> None:
    # AF_UNSPEC: glibc asks A and AAAA together; the AAAA NODATA must not spoil the A.
    rows = lines(glibc_results["unspec-no-vip6"])
    assert {r[0] for r in rows} == {"240.0.0.8"}
    assert rows[0] == ["240.0.0.8", "STREAM", "backend.kong.svc.8080.mesh"]


def test_getent_hosts(glibc_results: dict[str, dict[str, object]]) -> None:
    # `getent hosts` asks gethostbyname2(AF_INET6) first, then AF_INET.
    assert lines(glibc_results["hosts-canonical"]) == [["fd00:fd00::7",
                                                        "frontend.kong.svc.80.mesh"]]
    assert lines(glibc_results["hosts-no-vip6"]) == [["240.0.0.8",
                                                      "backend.kong.svc.8080.mesh"]]


def test_getent_unknown_name_is_not_found(glibc_results: dict[str, dict[str, object]]) -> None:
    result = glibc_results["v4-unknown"]
    assert result == {"rc": 2, "out": ""}  # getent: 2 = key not found (NXDOMAIN)
