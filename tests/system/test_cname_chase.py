"""An ExternalName service pointing at a mesh name resolves for every client (issue 17).

A real unbound plays cluster DNS on loopback. Its ``cluster.local`` zone is an
auth-zone answered downstream, so ``front.default.svc.cluster.local`` gets the
bare CNAME to ``frontend.kong.svc.80.mesh.`` that a Kubernetes ExternalName
service gets from CoreDNS, and in-zone chains come back whole in one answer
(the 9-link chain, the loop). Everything outside ``cluster.local`` is a static
root zone (NXDOMAIN): unbound never iterates and never sends a packet anywhere.

meshdns forwards to it and appends its own answer for the chain's mesh target.
The other direction, a cluster resolver forwarding the ``mesh.`` zone to
meshdns, is unbound with a ``forward-zone``. glibc's view (search list,
ndots:5, ``getent ahostsv4 front``) runs in a private network namespace, like
tests/system/test_glibc_search.py: this file is also the program run inside it.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from ..apiclient import call
from ..fake_upstream import UNBOUND_SERVER, Unbound
from ..netns import enter_private_network, require_namespaces, run_in_namespaces
from ..support import (
    ServerThread,
    make_config,
    query,
    run_tool,
    running_server,
)

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")

REPO = Path(__file__).resolve().parents[2]
CHAIN_9 = [f"c{i}.default.svc 300 IN CNAME c{i + 1}.default.svc" for i in range(1, 9)]
CLUSTER_ZONE = [
    "@ 300 IN SOA ns.cluster.local. host.cluster.local. 1 3600 600 86400 30",
    "@ 300 IN NS ns.cluster.local.",
    "ns 300 IN A 127.0.0.2",
    # ExternalName services, as CoreDNS answers them: a bare CNAME.
    "front.default.svc 300 IN CNAME frontend.kong.svc.80.mesh.",
    "ext.default.svc 300 IN CNAME httpbin.org.",  # a `hostnames` entry outside .mesh
    "gone.default.svc 300 IN CNAME nope.kong.svc.80.mesh.",  # no such service
    # A search-list name of the mesh (answered by meshdns with one more CNAME).
    "viasearch.default.svc 300 IN CNAME frontend.kong.svc.80.mesh.default.svc.cluster.local.",
    # Ordinary cluster names.
    "web.default.svc 300 IN A 10.96.0.10",
    "alias.default.svc 300 IN CNAME web.default.svc",
    # c1 -> c2 -> ... -> c9 -> frontend: 9 links from c1, 8 from c2.
    *CHAIN_9,
    "c9.default.svc 300 IN CNAME frontend.kong.svc.80.mesh.",
    # A loop, which unbound hands on as it is.
    "la.default.svc 300 IN CNAME lb.default.svc",
    "lb.default.svc 300 IN CNAME la.default.svc",
]
ROOT_ZONE = [". 300 IN SOA ns.root. host.root. 1 3600 600 86400 30", ". 300 IN NS ns.root."]

UNBOUND_CONF = UNBOUND_SERVER + """\
    # Only ever asks meshdns (the forward-zone), which runs on loopback.
    do-not-query-localhost: {no_localhost}
auth-zone:
    name: "cluster.local."
    zonefile: "cluster.zone"
    for-downstream: {downstream}
    for-upstream: yes
    fallback-enabled: no
auth-zone:
    name: "."
    zonefile: "root.zone"
    for-downstream: no
    for-upstream: yes
    fallback-enabled: no
{forward}
remote-control:
    control-enable: no
"""


class ClusterDns(Unbound):
    """unbound as a cluster's DNS: ``cluster.local`` from a zone file, NXDOMAIN for the
    rest. With ``iterate`` (implied by ``mesh``) ``cluster.local`` is resolved by its
    iterator, which chases CNAMEs itself; with ``mesh`` set, the ``mesh.`` zone is
    forwarded there (zone-forwarding mode)."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int | None = None,
                 mesh: str | None = None, iterate: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.mesh, self.iterate = mesh, iterate
        super().__init__(directory, port=port, host=host)

    def write_conf(self, data: list[str]) -> None:
        (self.dir / "cluster.zone").write_text(
            "$ORIGIN cluster.local.\n" + "\n".join(CLUSTER_ZONE) + "\n")
        (self.dir / "root.zone").write_text("\n".join(ROOT_ZONE) + "\n")
        forward = ""
        if self.mesh is not None:
            mhost, mport = self.mesh.rsplit(":", 1)
            forward = f'forward-zone:\n    name: "mesh."\n    forward-addr: {mhost}@{mport}\n'
        self.conf.write_text(UNBOUND_CONF.format(
            host=self.host, port=self.port, dir=self.dir, forward=forward,
            downstream="no" if self.mesh or self.iterate else "yes",
            no_localhost="no" if self.mesh else "yes"))

    def ready(self) -> bool:
        return bool(self.ask("web.default.svc.cluster.local", timeout=0.2).answer)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDns]:
    dns_ = ClusterDns(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield dns_
    finally:
        dns_.stop()


@pytest.fixture
def server(tmp_path: Path, cluster: ClusterDns) -> Iterator[ServerThread]:
    raw = make_config(tmp_path, {"dns": {"upstreams": [cluster.address],
                                         "upstream_timeout": 2.0,
                                         "search": ["default.svc.cluster.local"]}})
    with running_server(raw) as s:
        yield s


def dig(server: ServerThread, *args: str) -> str:
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def upstream_queries(server: ServerThread) -> int:
    stats = server.mesh.forwarder.upstream_stats().values()
    return sum(sum(s.requests.values()) for s in stats)


def records(reply: dns.message.Message) -> list[tuple[str, str, str]]:
    return [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rr.to_text())
            for rrset in reply.answer for rr in rrset]


def patch(server: ServerThread, body: dict[str, Any]) -> None:
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == 200, reply.body


FRONTEND = {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
            "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org"]}


# ---------------------------------------------------------------- sidecar mode


def test_cluster_dns_gives_the_bare_cname_meshdns_completes_it(server: ServerThread,
                                                                 cluster: ClusterDns) -> None:
    bare = cluster.ask("front.default.svc.cluster.local")
    assert records(bare) == [("front.default.svc.cluster.local.", "CNAME",
                              "frontend.kong.svc.80.mesh.")]
    out = dig(server, "front.default.svc.cluster.local", "A")
    assert "status: NOERROR" in out
    flags = out.split(";; flags:")[1].split(";")[0].split()
    assert "aa" not in flags and {"qr", "rd", "ra"} <= set(flags), flags
    answer = [line.split() for line in out.split(";; ANSWER SECTION:\n")[1].split("\n\n")[0]
              .splitlines()]
    assert [(a[0], a[3], a[4]) for a in answer] == [
        ("front.default.svc.cluster.local.", "CNAME", "frontend.kong.svc.80.mesh."),
        ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]
    assert int(answer[1][1]) == 30  # meshdns's own TTL for its part (dns.ttl)


def test_aaaa_case_and_the_cname_question(server: ServerThread) -> None:
    aaaa = query(server, "front.default.svc.cluster.local", "AAAA")
    assert records(aaaa)[-1] == ("frontend.kong.svc.80.mesh.", "AAAA", "fd00:fd00::7")
    assert not aaaa.flags & dns.flags.AA
    mixed = query(server, "FRONT.Default.svc.cluster.LOCAL", "A", tcp=True)
    assert mixed.question[0].name.to_text() == "FRONT.Default.svc.cluster.LOCAL."
    assert records(mixed)[-1] == ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")
    cname = query(server, "front.default.svc.cluster.local", "CNAME")
    assert records(cname) == [("front.default.svc.cluster.local.", "CNAME",
                               "frontend.kong.svc.80.mesh.")]
    txt = query(server, "front.default.svc.cluster.local", "TXT")  # NODATA from the mesh zone
    assert txt.rcode() == dns.rcode.NOERROR and len(records(txt)) == 1
    assert [r.rdtype for r in txt.authority] == [dns.rdatatype.SOA]
    assert txt.authority[0].name.to_text() == "mesh."


def test_hostname_entry_unknown_mesh_name_and_search_name_targets(server: ServerThread) -> None:
    ext = query(server, "ext.default.svc.cluster.local")
    assert records(ext) == [("ext.default.svc.cluster.local.", "CNAME", "httpbin.org."),
                            ("httpbin.org.", "A", "240.0.0.7")]
    gone = query(server, "gone.default.svc.cluster.local")
    assert gone.rcode() == dns.rcode.NXDOMAIN
    assert records(gone) == [("gone.default.svc.cluster.local.", "CNAME",
                              "nope.kong.svc.80.mesh.")]
    assert [(r.name.to_text(), r.rdtype) for r in gone.authority] == [("mesh.",
                                                                      dns.rdatatype.SOA)]
    via = query(server, "viasearch.default.svc.cluster.local")
    assert records(via) == [
        ("viasearch.default.svc.cluster.local.", "CNAME",
         "frontend.kong.svc.80.mesh.default.svc.cluster.local."),
        ("frontend.kong.svc.80.mesh.default.svc.cluster.local.", "CNAME",
         "frontend.kong.svc.80.mesh."),
        ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]


def test_ordinary_cluster_names_are_passed_on_unchanged(server: ServerThread) -> None:
    web = query(server, "web.default.svc.cluster.local")
    assert records(web) == [("web.default.svc.cluster.local.", "A", "10.96.0.10")]
    alias = query(server, "alias.default.svc.cluster.local")
    assert records(alias) == [("alias.default.svc.cluster.local.", "CNAME",
                               "web.default.svc.cluster.local."),
                              ("web.default.svc.cluster.local.", "A", "10.96.0.10")]
    assert query(server, "example.com").rcode() == dns.rcode.NXDOMAIN
    assert server.mesh.forwarder.chased == 0


def test_a_registry_change_shows_up_in_the_cached_chased_answer(server: ServerThread) -> None:
    assert records(query(server, "front.default.svc.cluster.local"))[-1][2] == "240.0.0.7"
    assert records(query(server, "ext.default.svc.cluster.local"))[-1][2] == "240.0.0.7"
    asked = upstream_queries(server)
    patch(server, {"upsert": [dict(FRONTEND, vip="240.0.0.77")]})
    for tcp in (False, True, False):  # the second UDP one comes from the rebuilt entry
        moved = query(server, "front.default.svc.cluster.local", tcp=tcp)
        assert records(moved)[-1] == ("frontend.kong.svc.80.mesh.", "A", "240.0.0.77")
    assert upstream_queries(server) == asked  # rebuilt from the cache, not asked again
    patch(server, {"delete": [{"name": "frontend", "namespace": "kong", "port": 80}]})
    gone = query(server, "front.default.svc.cluster.local")
    assert gone.rcode() == dns.rcode.NXDOMAIN and len(records(gone)) == 1
    assert gone.authority[0].name.to_text() == "mesh."
    assert upstream_queries(server) == asked
    # A `hostnames` entry that disappeared is no longer ours: the upstream is asked again
    # and its answer (the bare CNAME) passed on.
    ext = query(server, "ext.default.svc.cluster.local")
    assert records(ext) == [("ext.default.svc.cluster.local.", "CNAME", "httpbin.org.")]
    assert upstream_queries(server) == asked + 1
    patch(server, {"upsert": [FRONTEND]})
    back = query(server, "front.default.svc.cluster.local")
    assert records(back)[-1] == ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")


def test_ttls_count_down_and_a_rebuilt_answer_keeps_the_upstream_age(
        server: ServerThread) -> None:
    from ..fake_upstream import Clock

    clock = Clock()
    server.mesh.forwarder.clock = clock
    first = query(server, "front.default.svc.cluster.local")
    assert [r.ttl for r in first.answer] == [300, 30]
    clock.now += 10
    assert [r.ttl for r in query(server, "front.default.svc.cluster.local").answer] == [290, 20]
    asked = upstream_queries(server)
    patch(server, {"upsert": [dict(FRONTEND, vip="240.0.0.78")]})
    rebuilt = query(server, "front.default.svc.cluster.local")
    assert [r.ttl for r in rebuilt.answer] == [290, 30]  # the mesh part is new, 30 s again
    assert records(rebuilt)[-1][2] == "240.0.0.78" and upstream_queries(server) == asked
    clock.now += 30  # the mesh part ran out: the whole answer is asked for again
    again = query(server, "front.default.svc.cluster.local")
    assert [r.ttl for r in again.answer] == [300, 30] and upstream_queries(server) == asked + 1


def _reply(answer: bytes, ancount: int) -> tuple[bytes, int]:
    question = b"\x01a\x00\x00\x01\x00\x01"
    header = struct.pack("!HHHHHH", 0, 0x8180, 1, ancount, 0, 0)
    return header + question + answer, 12 + len(question)


def _cname(owner: bytes, target: bytes) -> bytes:
    return owner + struct.pack("!HHIH", 5, 1, 60, len(target)) + target


def test_follow_chain_on_hostile_replies_is_bounded() -> None:
    from meshdns.dns.chase import Chain, follow_chain
    from meshdns.dns.reply import ReplyRejected

    # Offsets: the question's name at 0x0c, the record's owner at 0x13, its target at 0x1f.
    # A target pointing back through the owner to the question: "a CNAME a", a loop.
    wire, qend = _reply(_cname(b"\xc0\x0c", b"\xc0\x13"), 1)
    assert follow_chain(wire, qend, (b"a",)) == Chain(1, (b"a",), True, False)
    # Pointers forming a cycle ("b" + pointer back to that "b"), or pointing forwards:
    # rejected after a bounded number of hops, never followed forever.
    for target in (b"\x01b\xc0\x1f", b"\xc0\x30"):
        wire, qend = _reply(_cname(b"\xc0\x0c", target) + b"\x00" * 32, 1)
        with pytest.raises(ReplyRejected):
            follow_chain(wire, qend, (b"a",))
    # 2000 CNAMEs in one loop (a -> n1 -> ... -> n1999 -> a): found, in one pass.
    names = [b"\x01a\x00"] + [b"\x05n%04d\x00" % i for i in range(1, 2000)]
    body = b"".join(_cname(names[i], names[(i + 1) % 2000]) for i in range(2000))
    wire, qend = _reply(body, 2000)
    chain = follow_chain(wire, qend, (b"A",))
    assert chain is not None and chain.loop and chain.links == 2000
    # No CNAME for the question's name: nothing to chase.
    wire, qend = _reply(_cname(b"\x01x\x00", b"\x01y\x00"), 1)
    assert follow_chain(wire, qend, (b"a",)) is None
    # An answer count larger than the records: rejected.
    wire, qend = _reply(_cname(b"\x01a\x00", b"\x01y\x00"), 3)
    with pytest.raises(ReplyRejected):
        follow_chain(wire, qend, (b"a",))


def test_a_loop_and_a_nine_link_chain_are_servfail(server: ServerThread,
                                                    cluster: ClusterDns) -> None:
    # unbound itself hands both on with NOERROR: the SERVFAIL is meshdns's.
    assert cluster.ask("la.default.svc.cluster.local").rcode() == dns.rcode.NOERROR
    assert len(records(cluster.ask("c1.default.svc.cluster.local"))) == 9
    started = time.monotonic()
    for name in ("la.default.svc.cluster.local", "lb.default.svc.cluster.local",
                 "c1.default.svc.cluster.local"):
        reply = query(server, name, timeout=5.0)
        assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer, name
    assert time.monotonic() - started < 15  # generous: answered, not hung until timeouts
    assert server.mesh.forwarder.chase_refused == {"loop": 2, "too_long": 1}
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
        scraped = resp.read().decode()
    assert 'meshdns_forward_chase_refused_total{reason="loop"} 2.0' in scraped
    assert 'meshdns_forward_chase_refused_total{reason="too_long"} 1.0' in scraped
    eight = query(server, "c2.default.svc.cluster.local")  # 8 links: the longest allowed
    assert eight.rcode() == dns.rcode.NOERROR
    assert len(records(eight)) == 9 and records(eight)[-1][2] == "240.0.0.7"
    # A CNAME question is answered with the CNAME, chain or not.
    one = query(server, "la.default.svc.cluster.local", "CNAME")
    assert records(one) == [("la.default.svc.cluster.local.", "CNAME",
                             "lb.default.svc.cluster.local.")]


def test_an_iterating_cluster_dns_negative_answer_is_completed(tmp_path: Path) -> None:
    """A cluster resolver that chases the CNAME itself and fails: CNAME + NXDOMAIN + the
    root's SOA. meshdns replaces the negative part with its own answer."""
    iterating = ClusterDns(tmp_path / "iter", iterate=True).start()
    try:
        bare = iterating.ask("front.default.svc.cluster.local")
        assert bare.rcode() == dns.rcode.NXDOMAIN and len(records(bare)) == 1
        assert [r.name.to_text() for r in bare.authority] == ["."]
        raw = make_config(tmp_path, {"dns": {"upstreams": [iterating.address]}})
        with running_server(raw) as side:
            reply = query(side, "front.default.svc.cluster.local")
            assert reply.rcode() == dns.rcode.NOERROR and reply.authority == []
            assert records(reply) == [
                ("front.default.svc.cluster.local.", "CNAME", "frontend.kong.svc.80.mesh."),
                ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]
    finally:
        iterating.stop()


def test_resolve_explains_the_upstream_cname_then_the_local_target(
        server: ServerThread) -> None:
    doc = call(server.api_url, "GET",
               "/v1/resolve?name=front.default.svc.cluster.local&type=A").json()
    assert doc["rule"] == "forward" and doc["rcode"] == "NOERROR"
    assert doc["authoritative"] is False
    chase = doc["chase"]
    assert chase["upstream"] == [{"name": "front.default.svc.cluster.local.", "type": "CNAME",
                                  "ttl": 300, "data": "frontend.kong.svc.80.mesh."}]
    assert chase["target"] == "frontend.kong.svc.80.mesh."
    assert chase["rule"] == "canonical" and chase["rcode"] == "NOERROR"
    assert chase["service"]["vip"] == "240.0.0.7"
    assert [(r["type"], r["data"]) for r in chase["answer"]] == [("A", "240.0.0.7")]
    assert [(r["type"], r["data"]) for r in doc["answer"]] == [
        ("CNAME", "frontend.kong.svc.80.mesh."), ("A", "240.0.0.7")]
    assert chase["links"] == 1
    schemas = yaml.safe_load((REPO / "meshdns" / "api" / "openapi.yaml").read_text())
    explanation = schemas["components"]["schemas"]["Explanation"]
    assert set(doc) <= set(explanation["properties"])
    assert set(chase) == set(explanation["properties"]["chase"]["required"])
    plain = call(server.api_url, "GET", "/v1/resolve?name=web.default.svc.cluster.local").json()
    assert plain["rule"] == "forward" and plain["chase"] is None
    assert plain["rcode"] == "NOERROR"  # the upstream's answer, as DNS gives it
    assert [(r["name"], r["type"], r["data"]) for r in plain["answer"]] == [
        ("web.default.svc.cluster.local.", "A", "10.96.0.10")]
    # The explanation counts no DNS response.
    assert server.mesh.handler.tally.responses == {}


# ---------------------------------------------------------------- zone-forwarding mode


def test_zone_forwarding_mode_through_unbound_forward_zone(tmp_path: Path) -> None:
    raw = make_config(tmp_path, {"dns": {"listen": ["127.0.0.1:0"]}})  # no upstreams at all
    with running_server(raw) as mesh:
        host, port = mesh.dns_addr()
        resolver = ClusterDns(tmp_path / "cluster", mesh=f"{host}:{port}").start()
        try:
            direct = resolver.ask("frontend.kong.svc.80.mesh")
            assert records(direct) == [("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]
            front = resolver.ask("front.default.svc.cluster.local")
            assert records(front) == [
                ("front.default.svc.cluster.local.", "CNAME", "frontend.kong.svc.80.mesh."),
                ("frontend.kong.svc.80.mesh.", "A", "240.0.0.7")]
            assert resolver.ask("nope.kong.svc.80.mesh").rcode() == dns.rcode.NXDOMAIN
            kuma = resolver.ask("backend_kong_svc_8080.mesh")
            assert records(kuma) == [("backend_kong_svc_8080.mesh.", "A", "240.0.0.8")]
            web = resolver.ask("web.default.svc.cluster.local")
            assert records(web) == [("web.default.svc.cluster.local.", "A", "10.96.0.10")]
            # Only mesh names reached meshdns: it forwards nothing and has no upstream.
            assert mesh.mesh.forwarder is None
            asked = mesh.mesh.handler.snapshot_counts().requests
            assert sum(asked.values()) >= 3
        finally:
            resolver.stop()


# ---------------------------------------------------------------- glibc, in a namespace

SEARCH = "default.svc.cluster.local svc.cluster.local cluster.local"
RESOLV_CONF = f"""\
# written by tests/system/test_cname_chase.py, bind-mounted over /etc/resolv.conf
nameserver 127.0.0.1
search {SEARCH}
options ndots:5 timeout:2 attempts:2
"""


def test_glibc_resolves_the_external_name_by_its_short_name(tmp_path: Path) -> None:
    require_namespaces("getent", "mount")
    results = run_in_namespaces(
        [sys.executable, "-m", "tests.system.test_cname_chase", "--inside", str(tmp_path)], tmp_path,
        timeout=120)
    print(json.dumps(results, indent=1))

    def addresses(label: str) -> list[str]:
        res = results[label]
        assert res["rc"] == 0, res
        return sorted({line.split()[0] for line in res["out"].splitlines()})

    assert addresses("front") == ["240.0.0.7"]
    assert results["front"]["out"].splitlines()[0].split()[-1] == "frontend.kong.svc.80.mesh"
    assert addresses("front.default") == ["240.0.0.7"]
    assert addresses("web") == ["10.96.0.10"]
    assert addresses("web.default") == ["10.96.0.10"]
    assert addresses("mesh") == ["240.0.0.7"]
    assert addresses("front-moved") == ["240.0.0.99"]  # a registry change, same cache
    assert results["front-moved"]["forwarded"] == 0
    assert results["loop"]["rc"] == 2  # SERVFAIL on every search name: not found, no hang


def inside(directory: Path) -> int:
    from meshdns.config import parse_config

    from ..support import ServerThread, make_config

    enter_private_network(directory, {"resolv.conf": RESOLV_CONF,
                                      "nsswitch.conf": "hosts: files dns\n",
                                      "hosts": "127.0.0.1 localhost\n::1 localhost\n"})
    cluster = ClusterDns(directory / "cluster", host="127.0.0.2", port=53).start()
    raw = make_config(directory, {"dns": {"upstreams": [cluster.address],
                                          "upstream_timeout": 2.0}})
    raw["dns"]["listen"] = ["127.0.0.1:53"]  # where glibc looks; the search list is ours
    server = ServerThread(parse_config(raw, {})).start()
    try:
        def forwarded() -> int:
            stats = server.mesh.forwarder.upstream_stats().values()
            return sum(sum(s.requests.values()) for s in stats)

        results: dict[str, Any] = {}

        def getent(label: str, name: str) -> None:
            before = server.call(forwarded)
            run = subprocess.run(["getent", "ahostsv4", name], capture_output=True, text=True,
                                 timeout=60, check=False)
            results[label] = {"name": name, "rc": run.returncode, "out": run.stdout,
                              "forwarded": server.call(forwarded) - before}

        for label, name in (("front", "front"), ("front.default", "front.default"),
                            ("web", "web"), ("web.default", "web.default"),
                            ("mesh", "frontend.kong.svc.80.mesh"), ("loop", "la")):
            getent(label, name)
        reply = call(server.api_url, "PATCH", "/v1/services",
                     {"upsert": [dict(FRONTEND, vip="240.0.0.99")]})
        assert reply.status == 200, reply.body
        getent("front-moved", "front")
        (directory / "results.json").write_text(json.dumps(results))
    finally:
        server.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        sys.exit(inside(Path(sys.argv[2])))
    sys.exit("usage: python -m tests.system.test_cname_chase --inside DIR (run under unshare -n -m)")
