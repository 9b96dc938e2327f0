"""meshdns as a node's resolver, in a network of its own (issue 26): access control, rate
limiting with slip and views, seen by dig and kdig from several client addresses.

Two private network namespaces (tests/netns.py) joined by a veth pair: "node", where
meshdns listens on 10.77.0.1:53 and [fd77::1]:53 (not loopback, so the listener's
default access control applies: loopback plus RFC 1918, RFC 6598 and ULA) and a
second meshdns with dns.views on 10.77.0.2:53; and "pods", whose veth carries every
client address: private ones, a shared-space one (100.64.0.0/10), public-looking
ones (198.51.100.7, 2001:db8::7) and one in a denied range. Each client is
``dig -b ADDRESS`` (or kdig, or a flood of datagrams from one bound socket) run in
"pods"; the packets cross the veth like a pod's to its node. An unbound in "node"
is the upstream. The namespaces, and everything in them, are gone after the module
(on any failure too).

It skips, saying why, only when namespaces are not permitted here; with CI=true it
fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..fake_upstream import UNBOUND_DATA, Unbound
from ..netns import REPO, NetNamespace, require_namespaces, veth

NODE, VIEWS_NODE, NODE6 = "10.77.0.1", "10.77.0.2", "fd77::1"
UPSTREAM_PORT = 5300  # unbound on the node's own loopback
POLICY_API, VIEWS_API = "127.0.0.1:15080", "127.0.0.1:15081"
# Clients, each in its own /24 where rate limiting could otherwise mix them up.
ALLOWED = "10.77.1.7"  # RFC 1918: allowed by default, and in dns.allow_recursion
ALLOWED6 = "fd77::7"  # ULA
SHARED = "100.64.0.9"  # RFC 6598: allowed by default, outside dns.allow_recursion
DENIED = "10.77.0.200"  # RFC 1918, but in dns.deny
PUBLIC, PUBLIC6 = "198.51.100.7", "2001:db8::7"  # outside every default range
FLOODER = "10.77.3.7"  # over dns.rate_limit
PROBE = "10.77.2.7"  # waits for meshdns to answer
VIEW_A, VIEW_B, VIEW_NONE = "10.77.5.7", "10.77.6.7", "10.77.7.7"
CLIENTS = [ALLOWED, SHARED, DENIED, PUBLIC, FLOODER, PROBE, VIEW_A, VIEW_B, VIEW_NONE]
CLIENTS6 = [ALLOWED6, PUBLIC6]
RATE, SLIP = 10, 2

FRONTEND = "frontend.kong.svc.80.mesh"
POLICY_SERVICES = [{"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7"}]
VIEW_SERVICES = [
    {"name": name, "namespace": "team", "port": 80, "vip": vip, "mesh": mesh}
    for name, vip, mesh in [("web", "240.0.9.1", "a"), ("api", "240.0.9.2", "b"),
                            ("web-udp", "240.0.9.3", "a"), ("api-udp", "240.0.9.4", "b"),
                            ("web-tcp", "240.0.9.5", "a"), ("api-tcp", "240.0.9.6", "b")]]
VIEWS = [{"clients": [f"{VIEW_A}/32"], "select": {"matchLabels": {"mesh": "a"}}},
         {"clients": [f"{VIEW_B}/32"], "select": {"matchLabels": {"mesh": "b"}}}]

# Sends COUNT queries from SOURCE as one burst (IDs 0..COUNT-1) and, unless WAIT is 0,
# reads replies for WAIT s after the last: {"full": n, "slipped": n} (TC=1, no answer).
FLOOD = r"""
import json, socket, sys, time
import dns.flags, dns.message
source, server, count, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((source, 0))
for i in range(count):
    q = dns.message.make_query(sys.argv[5], "A", use_edns=0)
    q.id = i
    sock.sendto(q.to_wire(), (server, 53))
full = slipped = 0
ids = set()
sock.settimeout(0.5)
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    try:
        data, peer = sock.recvfrom(4096)
    except TimeoutError:
        continue
    reply = dns.message.from_wire(data)
    if peer[0] != server or reply.id in ids:
        continue
    ids.add(reply.id)
    if reply.flags & dns.flags.TC:
        assert not reply.answer, reply
        slipped += 1
    else:
        assert [rr.address for rrset in reply.answer for rr in rrset] == ["240.0.0.7"], reply
        full += 1
print(json.dumps({"full": full, "slipped": slipped}))
"""


@dataclass
class Node:
    node: NetNamespace
    pods: NetNamespace
    logs: list[Path]

    def dig(self, server: str, source: str, name: str, *opts: str) -> str:
        """dig's whole output for ``name`` asked of ``server`` from ``source`` (in "pods")."""
        proc = self.pods.run("dig", f"@{server}", "-b", source, "+tries=1", "+timeout=2",
                             *opts, name)
        return proc.stdout + proc.stderr

    def kdig(self, server: str, source: str, name: str, *opts: str) -> str:
        proc = self.pods.run("kdig", f"@{server}", "-b", source, "+retry=0", "+timeout=2",
                             *opts, name)
        return proc.stdout + proc.stderr

    def http(self, api: str, path: str) -> str:
        """GET ``path`` of a meshdns API (in "node"): the body."""
        proc = self.node.run("curl", "-sS", "--max-time", "5", f"http://{api}{path}")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def flood(self, source: str, count: int, wait: float) -> dict[str, int]:
        proc = self.pods.run(sys.executable, "-c", FLOOD, source, NODE, str(count), str(wait),
                             FRONTEND, timeout=30)
        assert proc.returncode == 0, proc.stderr
        counts: dict[str, int] = json.loads(proc.stdout)
        return counts


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def answers(out: str, name: str) -> list[str]:
    """The A/AAAA addresses of ``name`` in dig's answer section."""
    return re.findall(rf"^{re.escape(name)}\.\s+\d+\s+IN\s+(?:A|AAAA)\s+(\S+)$", out, re.M)


def counter(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def start_meshdns(ns: NetNamespace, d: Path, name: str, dns: dict[str, Any], api: str,
                  services: list[dict[str, Any]]) -> Path:
    (d / f"{name}-seed.yaml").write_text(yaml.safe_dump({"services": services}))
    (d / f"{name}.yaml").write_text(yaml.safe_dump({
        "dns": {"resolv_conf": str(d / "resolv.conf"), "nsid": name, **dns},
        "api": {"listen": api},
        "registry": {"seed_file": str(d / f"{name}-seed.yaml")},
        "log": {"level": "warning"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHDNS_")}
    if "MESHDNS_UDP_BATCH" in os.environ:  # the Makefile's unbatched tier
        env["MESHDNS_UDP_BATCH"] = os.environ["MESHDNS_UDP_BATCH"]
    log = d / f"{name}.log"
    with log.open("wb") as out:
        ns.popen([sys.executable, "-m", "meshdns", "serve", "--config", str(d / f"{name}.yaml")],
                 cwd=REPO, env=env, stdout=out, stderr=out)
    return log


def wait_answering(net: Node, server: str, name: str, vip: str, source: str) -> None:
    deadline = time.monotonic() + 60
    while answers(net.dig(server, source, name, "+timeout=1"), name) != [vip]:
        for proc in net.node.procs:
            assert proc.poll() is None, "\n".join(p.read_text() for p in net.logs)
        assert time.monotonic() < deadline, "\n".join(p.read_text() for p in net.logs)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require_namespaces("nsenter", "dig", "kdig", "curl", "unbound")
    d = tmp_path_factory.mktemp("node-netns")
    (d / "resolv.conf").write_text("# no nameservers: dns.upstreams is set\n")
    with NetNamespace("node") as node, NetNamespace("pods") as pods:
        veth(node, "node0", pods, "pods0")
        for addr in (f"{NODE}/24", f"{VIEWS_NODE}/24"):
            node.sh("ip", "addr", "add", addr, "dev", "node0")
        node.sh("ip", "-6", "addr", "add", f"{NODE6}/64", "dev", "node0", "nodad")
        # Replies to clients off the /24 (198.51.100.7, 100.64.0.9, ...) go back on the veth.
        node.sh("ip", "route", "add", "default", "dev", "node0")
        node.sh("ip", "-6", "route", "add", "default", "dev", "node0")
        pods.sh("ip", "addr", "add", "10.77.0.100/24", "dev", "pods0")
        for addr in CLIENTS:
            pods.sh("ip", "addr", "add", f"{addr}/32", "dev", "pods0")
        for addr in CLIENTS6:
            pods.sh("ip", "-6", "addr", "add", f"{addr}/128", "dev", "pods0", "nodad")
        pods.sh("ip", "-6", "route", "add", f"{NODE6}/128", "dev", "pods0")

        unbound = Unbound(d / "unbound", port=UPSTREAM_PORT)
        unbound.dir.mkdir()
        unbound.write_conf(UNBOUND_DATA)
        with unbound.log.open("wb") as out:
            node.popen(["unbound", "-d", "-c", str(unbound.conf)], stdout=out, stderr=out)
        logs = [start_meshdns(node, d, "policy", {
            "listen": [f"{NODE}:53", f"[{NODE6}]:53"],
            "upstreams": [f"127.0.0.1:{UPSTREAM_PORT}"],
            "deny": ["10.77.0.192/26"],
            "allow_recursion": ["10.0.0.0/8", "fc00::/7"],
            "rate_limit": RATE, "rate_limit_slip": SLIP,
        }, POLICY_API, POLICY_SERVICES), start_meshdns(node, d, "views", {
            "listen": [f"{VIEWS_NODE}:53"], "upstreams": [], "views": VIEWS,
        }, VIEWS_API, VIEW_SERVICES), unbound.log]
        net = Node(node, pods, logs)
        wait_answering(net, NODE, FRONTEND, "240.0.0.7", PROBE)
        wait_answering(net, NODE, "www.example.test", "192.0.2.10", PROBE)  # unbound is up
        wait_answering(net, VIEWS_NODE, "web.team.svc.80.mesh", "240.0.9.1", VIEW_NONE)
        yield net


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_private_clients_are_answered_others_refused_with_ede_18(net: Node, tcp: bool) -> None:
    proto = ["+tcp"] if tcp else []
    for server, source in ((NODE, ALLOWED), (NODE6, ALLOWED6), (NODE, SHARED)):
        out = net.dig(server, source, FRONTEND, *proto)
        assert status(out) == "NOERROR" and answers(out, FRONTEND) == ["240.0.0.7"], out
        assert "EDE:" not in out, out
    out = net.dig(NODE, ALLOWED, "www.example.test", *proto)  # forwarded to unbound
    assert status(out) == "NOERROR" and answers(out, "www.example.test") == ["192.0.2.10"], out
    for server, source in ((NODE, PUBLIC), (NODE6, PUBLIC6), (NODE, DENIED)):
        out = net.dig(server, source, FRONTEND, "+nsid", *proto)
        assert status(out) == "REFUSED" and not answers(out, FRONTEND), (source, out)
        assert "; EDE: 18 (Prohibited): (client not allowed)" in out, (source, out)
        assert 'NSID: 70 6f 6c 69 63 79 ("policy")' in out, out  # which replica refused
    # Outside dns.allow_recursion: mesh names yes (above), forwarded names refused.
    out = net.dig(NODE, SHARED, "www.example.test", *proto)
    assert status(out) == "REFUSED" and "; EDE: 18 (Prohibited)" in out, out


def test_kdig_sees_the_refusal_too(net: Node) -> None:
    out = net.kdig(NODE, PUBLIC, FRONTEND, "+edns")  # EDE goes to EDNS queries only
    assert "status: REFUSED" in out, out
    assert re.search(r"EDE: 18 \(Prohibited\): '?client not allowed'?", out), out
    out = net.kdig(NODE6, ALLOWED6, FRONTEND, "+tcp", "+short")
    assert out.strip() == "240.0.0.7", out


def test_refusals_are_counted(net: Node) -> None:
    before = net.http(POLICY_API, "/metrics")
    for _ in range(3):
        assert status(net.dig(NODE, PUBLIC, FRONTEND)) == "REFUSED"
    assert status(net.dig(NODE, SHARED, "www.example.test")) == "REFUSED"
    after = net.http(POLICY_API, "/metrics")
    for name, delta in (("meshdns_dns_acl_refused_total", 3),
                        ("meshdns_dns_recursion_refused_total", 1)):
        assert counter(after, name) - counter(before, name) == delta, name


def test_a_flood_is_rate_limited_with_slip_and_counted(net: Node) -> None:
    name = "meshdns_dns_rate_limited_total"
    before = net.http(POLICY_API, "/metrics")
    sent = 6 * RATE
    got = net.flood(FLOODER, sent, 3.0)
    dropped = sent - got["full"] - got["slipped"]
    # RATE a second: the burst may straddle one second boundary, so at most two windows;
    # past the rate, every SLIP-th reply is slipped (TC=1) and the others dropped.
    assert RATE <= got["full"] <= 2 * RATE, got
    over = sent - got["full"]
    assert over // SLIP - 1 <= got["slipped"] <= over // SLIP + 1, got
    after = net.http(POLICY_API, "/metrics")
    assert counter(after, name, '{action="slipped"}') - \
        counter(before, name, '{action="slipped"}') == got["slipped"]
    assert counter(after, name, '{action="dropped"}') - \
        counter(before, name, '{action="dropped"}') == dropped
    # The flooder's limit is its own /24's: another client is still answered over UDP.
    assert answers(net.dig(NODE, ALLOWED, FRONTEND), FRONTEND) == ["240.0.0.7"]


def test_a_rate_limited_client_that_switches_to_tcp_is_answered(net: Node) -> None:
    """dig from the flooding address, right after a burst that used up its rate: its UDP
    query is slipped (TC=1), and dig retries over TCP, which is never limited."""
    burst = RATE + 2 * SLIP - 1  # leaves the next reply over the rate a slipped one
    for _ in range(10):  # a burst split by a second boundary leaves dig under the rate
        net.flood(FLOODER, burst, 0)
        out = net.dig(NODE, FLOODER, FRONTEND)
        if "Truncated, retrying in TCP mode" in out:
            break
    assert "Truncated, retrying in TCP mode" in out, out
    assert status(out) == "NOERROR" and answers(out, FRONTEND) == ["240.0.0.7"], out
    assert "(TCP)" in out, out  # ";; SERVER: 10.77.0.1#53(10.77.0.1) (TCP)"


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_two_client_addresses_get_different_answers(net: Node, tcp: bool) -> None:
    proto = ["+tcp"] if tcp else []
    web, api = "web.team.svc.80.mesh", "api.team.svc.80.mesh"
    expect = {(VIEW_A, web): ["240.0.9.1"], (VIEW_A, api): [],
              (VIEW_B, web): [], (VIEW_B, api): ["240.0.9.2"],
              (VIEW_NONE, web): ["240.0.9.1"], (VIEW_NONE, api): ["240.0.9.2"]}
    for (source, name), vips in expect.items():
        out = net.dig(VIEWS_NODE, source, name, *proto)
        assert status(out) == ("NOERROR" if vips else "NXDOMAIN"), (source, name, out)
        assert answers(out, name) == vips, (source, name, out)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_name_answered_for_one_view_is_never_served_to_another(net: Node, tcp: bool) -> None:
    """Names no one asked before (each transport has its own reply cache): web-* first
    from view A, which has it, then view B; api-* first from view B, which has it, then
    view A. Asked again and again, each view's answer comes from its own cache."""
    proto, label = (["+tcp"], "tcp") if tcp else ([], "udp")
    web, api = f"web-{label}.team.svc.80.mesh", f"api-{label}.team.svc.80.mesh"
    web_vip, api_vip = ("240.0.9.5", "240.0.9.6") if tcp else ("240.0.9.3", "240.0.9.4")
    for _ in range(3):
        a = net.dig(VIEWS_NODE, VIEW_A, web, *proto)
        b = net.dig(VIEWS_NODE, VIEW_B, web, *proto)
        assert status(a) == "NOERROR" and answers(a, web) == [web_vip], a
        assert status(b) == "NXDOMAIN" and not answers(b, web), b
    for _ in range(3):
        b = net.dig(VIEWS_NODE, VIEW_B, api, *proto)
        a = net.dig(VIEWS_NODE, VIEW_A, api, *proto)
        assert status(b) == "NOERROR" and answers(b, api) == [api_vip], b
        assert status(a) == "NXDOMAIN" and not answers(a, api), a
    for name, vip in ((web, web_vip), (api, api_vip)):  # the default view has both
        assert answers(net.dig(VIEWS_NODE, VIEW_NONE, name, *proto), name) == [vip]


def test_resolve_explains_the_view_of_a_client_address(net: Node) -> None:
    body = json.loads(net.http(VIEWS_API, f"/v1/resolve?name=web.team.svc.80.mesh"
                                          f"&client={VIEW_B}"))
    assert body["view"] == {"index": 2, "select": {"matchLabels": {"mesh": "b"}}}
    assert body["rcode"] == "NXDOMAIN"


def test_the_namespaces_are_gone_afterwards() -> None:
    """What the fixture relies on: closing a NetNamespace (here on an error inside it)
    kills what runs in it, so no process is left in the namespace and it is gone."""
    require_namespaces("nsenter")
    with pytest.raises(RuntimeError, match="boom"), NetNamespace("doomed") as ns:
        proc = ns.popen(["sleep", "600"])
        assert ns.holder is not None
        inode = os.readlink(ns.path)
        assert inode != os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while proc.pid not in (members := processes_in(inode)):  # nsenter has entered
            assert time.monotonic() < deadline, members
            time.sleep(0.01)
        assert ns.holder.pid in members
        raise RuntimeError("boom")
    assert proc.poll() is not None and ns.holder is None
    # (The kernel may give the number to a new namespace at once: its processes differ.)
    assert not processes_in(inode) & members


def processes_in(inode: str) -> set[int]:
    """The processes now in the network namespace ``inode`` ("net:[4026532...]")."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if os.readlink(entry / "ns" / "net") == inode:
                    found.add(int(entry.name))
    return found
