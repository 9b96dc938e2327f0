"""SPEC §4 answer table over real sockets: dnspython for every row, dig and kdig for a subset.

Every row runs over UDP and TCP, to 127.0.0.1 and ::1. Replies are checked
exactly: rcode, header flags (AA set only on authoritative answers, RA clear
since no upstream is configured), header section counts, and every record as
``owner ttl class type rdata`` text, which dnspython, dig and kdig all print
the same way once whitespace is folded.

The server used here is deliberately not the default one: ``dns.ttl`` 42 and
``dns.negative_ttl`` 7 show the values come from the config, ``mesh.local`` is
a second served domain, and ``registry.cidr6: null`` leaves ``backend`` without
an IPv6 VIP (so its AAAA is NODATA). The defaults (30 and 5) and the SOA serial
tracking the registry revision are checked on the demo server.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest

from meshdns.core.registry import parse_services

from ..support import (
    VIAS,
    ServerThread,
    Via,
    make_config,
    recv_exact,
    require_family,
    run_tool,
    running_server,
    tool,
)

TTL = 42
NEG_TTL = 7
# SOA fields the SPEC leaves to the implementation (RFC 6303 style rname, refresh/retry/expire).
SOA_RNAME = "nobody.invalid."
SOA_TIMERS = "3600 1200 604800"

ANSWER_SERVICES = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org", "api.edge.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"},
    {"name": "redis", "namespace": "cache", "port": 6379, "vip": "240.0.1.9",
     "vip6": "fd00:fd00::1:9"},
]
ANSWER_EXTRA = {
    "dns": {"domains": ["mesh", "mesh.local"], "ttl": TTL, "negative_ttl": NEG_TTL,
            "search": ["corp.example"]},
    "registry": {"cidr6": None},
}

F = "frontend.kong.svc.80.mesh."
B = "backend.kong.svc.8080.mesh."
R = "redis.cache.svc.6379.mesh."
FL = "frontend.kong.svc.80.mesh.local."
BL = "backend.kong.svc.8080.mesh.local."


# ---------------------------------------------------------------- transport paths




def exchange(server: ServerThread, wire: bytes, via: Via, timeout: float = 3.0) -> bytes:
    """Send one raw message and return the raw reply (TCP: 2-byte framing)."""
    host, port = server.dns_addr(via.family)
    af = socket.AF_INET6 if via.family == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if via.tcp else socket.SOCK_DGRAM
    with socket.socket(af, kind) as sock:
        sock.settimeout(timeout)
        if not via.tcp:
            sock.connect((host, port))  # connected: datagrams from any other sender dropped
            sock.send(wire)
            return sock.recv(65535)
        sock.connect((host, port))
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        (size,) = struct.unpack("!H", recv_exact(sock, 2))
        return recv_exact(sock, size)


def header_counts(wire: bytes) -> tuple[int, int, int, int]:
    qd, an, ns, ar = struct.unpack("!4H", wire[4:12])
    return qd, an, ns, ar


def ask(server: ServerThread, name: str, rdtype: str, via: Via, *, edns: int | None = 0,
        payload: int = 1232, rdclass: str = "IN") -> tuple[dns.message.Message, bytes]:
    """A dnspython-built query over a raw socket: the parsed reply and its wire bytes."""
    query = dns.message.make_query(name, rdtype, rdclass,
                                   use_edns=-1 if edns is None else edns, payload=payload)
    wire = exchange(server, query.to_wire(), via)
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id
    return reply, wire


def records(section: list[dns.rrset.RRset]) -> list[str]:
    return sorted(" ".join(line.split()) for rrset in section
                  for line in rrset.to_text().splitlines())


# ---------------------------------------------------------------- the table


def rr(owner: str, rtype: str, data: str, ttl: int = TTL) -> str:
    return f"{owner} {ttl} IN {rtype} {data}"


def soa(apex: str, ttl: int, serial: int | str = "{serial}", minimum: int = NEG_TTL) -> str:
    return f"{apex} {ttl} IN SOA {apex} {SOA_RNAME} {serial} {SOA_TIMERS} {minimum}"


def neg_soa(apex: str) -> str:
    """The SOA of a negative answer (NODATA, NXDOMAIN): TTL is the negative TTL (RFC 2308)."""
    return soa(apex, NEG_TTL)


def rev(address: str) -> str:
    return dns.reversename.from_address(address).to_text()


@dataclass(frozen=True)
class Row:
    id: str
    name: str
    rdtype: str
    rcode: str
    aa: bool
    answer: tuple[str, ...] = ()
    authority: tuple[str, ...] = ()
    additional: tuple[str, ...] = ()
    tags: frozenset[str] = field(default_factory=frozenset)

    def expect(self, serial: int) -> tuple[list[str], list[str], list[str]]:
        def fill(rows: tuple[str, ...]) -> list[str]:
            return sorted(r.replace("{serial}", str(serial)) for r in rows)
        return fill(self.answer), fill(self.authority), fill(self.additional)


def ok(id: str, name: str, rdtype: str, answer: tuple[str, ...],
       additional: tuple[str, ...] = (), tool_row: bool = False) -> Row:
    return Row(id, name, rdtype, "NOERROR", True, answer, (), additional,
               frozenset({"tools"} if tool_row else ()))


def nodata(id: str, name: str, rdtype: str, apex: str, tool_row: bool = False) -> Row:
    return Row(id, name, rdtype, "NOERROR", True, (), (neg_soa(apex),), (),
               frozenset({"tools"} if tool_row else ()))


def nxdomain(id: str, name: str, rdtype: str, apex: str, tool_row: bool = False) -> Row:
    return Row(id, name, rdtype, "NXDOMAIN", True, (), (neg_soa(apex),), (),
               frozenset({"tools"} if tool_row else ()))


def refused(id: str, name: str, rdtype: str, tool_row: bool = False) -> Row:
    return Row(id, name, rdtype, "REFUSED", False, tags=frozenset({"tools"} if tool_row else ()))


ROWS: list[Row] = [
    # A of a service name: its VIP.
    ok("a-canonical", F, "A", (rr(F, "A", "240.0.0.7"),), tool_row=True),
    ok("a-canonical-no-vip6", B, "A", (rr(B, "A", "240.0.0.8"),)),
    ok("a-other-namespace", R, "A", (rr(R, "A", "240.0.1.9"),)),
    # AAAA: the vip6, else NODATA with SOA (never NXDOMAIN).
    ok("aaaa-vip6", F, "AAAA", (rr(F, "AAAA", "fd00:fd00::7"),), tool_row=True),
    ok("aaaa-vip6-other", R, "AAAA", (rr(R, "AAAA", "fd00:fd00::1:9"),)),
    nodata("aaaa-no-vip6-nodata", B, "AAAA", "mesh.", tool_row=True),
    # SRV: 0 100 <port> <canonical>., A/AAAA of the target in additional.
    ok("srv-with-vip6", F, "SRV", (rr(F, "SRV", f"0 100 80 {F}"),),
       (rr(F, "A", "240.0.0.7"), rr(F, "AAAA", "fd00:fd00::7")), tool_row=True),
    ok("srv-without-vip6", B, "SRV", (rr(B, "SRV", f"0 100 8080 {B}"),),
       (rr(B, "A", "240.0.0.8"),)),
    # PTR of a VIP's reverse name: the canonical name.
    ok("ptr-in-addr", "7.0.0.240.in-addr.arpa.", "PTR",
       (rr("7.0.0.240.in-addr.arpa.", "PTR", F),), tool_row=True),
    ok("ptr-in-addr-other", "9.1.0.240.in-addr.arpa.", "PTR",
       (rr("9.1.0.240.in-addr.arpa.", "PTR", R),)),
    ok("ptr-ip6", rev("fd00:fd00::7"), "PTR", (rr(rev("fd00:fd00::7"), "PTR", F),),
       tool_row=True),
    ok("ptr-ip6-other", rev("fd00:fd00::1:9"), "PTR", (rr(rev("fd00:fd00::1:9"), "PTR", R),)),
    nodata("ptr-name-other-type", "8.0.0.240.in-addr.arpa.", "A", "240.in-addr.arpa."),
    nxdomain("ptr-unused-vip-nxdomain", "9.9.0.240.in-addr.arpa.", "PTR", "240.in-addr.arpa."),
    nodata("ptr-empty-non-terminal", "0.0.240.in-addr.arpa.", "PTR", "240.in-addr.arpa."),
    ok("soa-reverse-apex", "240.in-addr.arpa.", "SOA", (soa("240.in-addr.arpa.", TTL),)),
    # SOA / NS at an apex, for each served domain.
    ok("soa-apex", "mesh.", "SOA", (soa("mesh.", TTL),), tool_row=True),
    ok("ns-apex", "mesh.", "NS", (rr("mesh.", "NS", "mesh."),), tool_row=True),
    ok("soa-apex-second-domain", "mesh.local.", "SOA", (soa("mesh.local.", TTL),)),
    ok("ns-apex-second-domain", "mesh.local.", "NS", (rr("mesh.local.", "NS", "mesh.local."),)),
    nodata("apex-other-type", "mesh.", "A", "mesh."),
    # Other type of an existing name: NODATA with SOA.
    nodata("other-type-canonical", F, "TXT", "mesh.", tool_row=True),
    nodata("other-type-ptr-on-forward-name", F, "PTR", "mesh."),
    nodata("other-type-kuma", "frontend_kong_svc_80.mesh.", "MX", "mesh."),
    nodata("other-type-hostname", "frontend.mesh.", "TXT", "mesh."),
    nodata("other-type-second-domain", FL, "TXT", "mesh.local."),
    # Empty non-terminals: NODATA (RFC 8020), not NXDOMAIN.
    nodata("ent-namespace", "kong.svc.80.mesh.", "A", "mesh.", tool_row=True),
    nodata("ent-namespace-aaaa", "cache.svc.6379.mesh.", "AAAA", "mesh."),
    nodata("ent-svc", "svc.80.mesh.", "A", "mesh."),
    nodata("ent-port", "80.mesh.", "A", "mesh."),
    nodata("ent-second-domain", "kong.svc.8080.mesh.local.", "A", "mesh.local."),
    nodata("ent-above-hostname", "edge.mesh.", "A", "mesh."),
    # Any other name under a served domain: NXDOMAIN with SOA.
    nxdomain("nxdomain-label", "nope.mesh.", "A", "mesh.", tool_row=True),
    nxdomain("nxdomain-unknown-port-ent", "kong.svc.81.mesh.", "A", "mesh."),
    nxdomain("nxdomain-unknown-port", "frontend.kong.svc.81.mesh.", "A", "mesh."),
    nxdomain("nxdomain-unknown-namespace", "frontend.cache.svc.80.mesh.", "A", "mesh."),
    nxdomain("nxdomain-other-namespace-ent", "default.svc.80.mesh.", "A", "mesh."),
    nxdomain("nxdomain-below-service", "x.frontend.kong.svc.80.mesh.", "A", "mesh."),
    nxdomain("nxdomain-kuma-unknown-port", "frontend_kong_svc_81.mesh.", "A", "mesh."),
    nxdomain("nxdomain-aaaa", "nope.mesh.", "AAAA", "mesh."),
    nxdomain("nxdomain-second-domain", "nope.mesh.local.", "A", "mesh.local."),
    # Kuma tag form.
    ok("kuma-a", "frontend_kong_svc_80.mesh.", "A",
       (rr("frontend_kong_svc_80.mesh.", "A", "240.0.0.7"),), tool_row=True),
    ok("kuma-aaaa", "frontend_kong_svc_80.mesh.", "AAAA",
       (rr("frontend_kong_svc_80.mesh.", "AAAA", "fd00:fd00::7"),)),
    nodata("kuma-aaaa-no-vip6", "backend_kong_svc_8080.mesh.", "AAAA", "mesh."),
    ok("kuma-srv", "backend_kong_svc_8080.mesh.", "SRV",
       (rr("backend_kong_svc_8080.mesh.", "SRV", f"0 100 8080 {B}"),),
       (rr(B, "A", "240.0.0.8"),)),
    # Host names: inside a served domain, and outside (shadowing the upstream).
    ok("hostname-a", "frontend.mesh.", "A", (rr("frontend.mesh.", "A", "240.0.0.7"),),
       tool_row=True),
    ok("hostname-aaaa", "frontend.mesh.", "AAAA",
       (rr("frontend.mesh.", "AAAA", "fd00:fd00::7"),)),
    ok("hostname-deep", "api.edge.mesh.", "A", (rr("api.edge.mesh.", "A", "240.0.0.7"),)),
    ok("hostname-outside-domains", "httpbin.org.", "A",
       (rr("httpbin.org.", "A", "240.0.0.7"),), tool_row=True),
    ok("hostname-srv", "httpbin.org.", "SRV", (rr("httpbin.org.", "SRV", f"0 100 80 {F}"),),
       (rr(F, "A", "240.0.0.7"), rr(F, "AAAA", "fd00:fd00::7"))),
    # SPEC is silent; the code treats an outside host name as its own zone for NODATA.
    nodata("hostname-outside-other-type", "httpbin.org.", "TXT", "httpbin.org."),
    # A second served domain: every form exists there too, SRV targets stay in it.
    ok("second-domain-a", FL, "A", (rr(FL, "A", "240.0.0.7"),), tool_row=True),
    ok("second-domain-aaaa", FL, "AAAA", (rr(FL, "AAAA", "fd00:fd00::7"),)),
    ok("second-domain-srv", FL, "SRV", (rr(FL, "SRV", f"0 100 80 {FL}"),),
       (rr(FL, "A", "240.0.0.7"), rr(FL, "AAAA", "fd00:fd00::7"))),
    ok("second-domain-kuma", "backend_kong_svc_8080.mesh.local.", "A",
       (rr("backend_kong_svc_8080.mesh.local.", "A", "240.0.0.8"),)),
    nodata("second-domain-no-vip6", BL, "AAAA", "mesh.local."),
    # <mesh name>.<search suffix>: answered locally with a CNAME plus the address.
    Row("search-suffix-a", F + "corp.example.", "A", "NOERROR", False,
        (rr(F + "corp.example.", "CNAME", F), rr(F, "A", "240.0.0.7"))),
    Row("search-suffix-aaaa", F + "corp.example.", "AAAA", "NOERROR", False,
        (rr(F + "corp.example.", "CNAME", F), rr(F, "AAAA", "fd00:fd00::7"))),
    # Names outside the served domains: REFUSED, since no upstream is configured.
    refused("outside-refused", "example.com.", "A", tool_row=True),
    refused("outside-parent-of-domain", "local.", "SOA"),
    refused("outside-root", ".", "NS"),
    refused("outside-reverse-not-vip-range", "1.0.0.127.in-addr.arpa.", "PTR"),
    refused("outside-search-suffix-alone", "corp.example.", "A"),
]
ROW_IDS = [r.id for r in ROWS]
TOOL_ROWS = [r for r in ROWS if "tools" in r.tags]


@pytest.fixture(scope="module")
def answers_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp: Path = tmp_path_factory.mktemp("answers")
    with running_server(make_config(tmp, ANSWER_EXTRA, ANSWER_SERVICES)) as server:
        yield server


@pytest.fixture(params=VIAS, ids=str)
def via(request: pytest.FixtureRequest) -> Via:
    v: Via = request.param
    require_family(v.family)
    return v


def expected_flags(row: Row) -> int:
    return dns.flags.QR | dns.flags.RD | (dns.flags.AA if row.aa else 0)


def flag_bits(reply: dns.message.Message) -> int:
    """QR, opcode, AA, TC, RD, RA, Z, AD, CD as sent (the low 4 bits are the rcode)."""
    return int(reply.flags) & 0xFFF0


# ---------------------------------------------------------------- dnspython: every row


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_answer_table_dnspython(answers_server: ServerThread, via: Via, row: Row) -> None:
    serial = answers_server.mesh.store.revision
    reply, wire = ask(answers_server, row.name, row.rdtype, via)
    answer, authority, additional = row.expect(serial)
    assert dns.rcode.to_text(reply.rcode()) == row.rcode
    assert flag_bits(reply) == expected_flags(row), dns.flags.to_text(reply.flags)
    assert records(reply.answer) == answer
    assert records(reply.authority) == authority
    assert records(reply.additional) == additional
    # The query carried EDNS: the reply has exactly one OPT, counted in ADDITIONAL.
    assert reply.edns == 0 and reply.payload == 1232
    assert header_counts(wire) == (1, len(answer), len(authority), len(additional) + 1)
    [question] = reply.question
    assert question.name.to_text() == row.name
    assert dns.rdatatype.to_text(question.rdtype) == row.rdtype


def test_every_answer_row_without_edns(answers_server: ServerThread) -> None:
    """Same table, plain RFC 1035 queries: identical records and no OPT in the reply."""
    via = Via("udp", 4)
    serial = answers_server.mesh.store.revision
    for row in ROWS:
        reply, wire = ask(answers_server, row.name, row.rdtype, via, edns=None)
        answer, authority, additional = row.expect(serial)
        assert dns.rcode.to_text(reply.rcode()) == row.rcode, row.id
        assert flag_bits(reply) == expected_flags(row), row.id
        assert (records(reply.answer), records(reply.authority),
                records(reply.additional)) == (answer, authority, additional), row.id
        assert reply.edns == -1, row.id
        assert header_counts(wire) == (1, len(answer), len(authority), len(additional)), row.id


def test_seed_registry_revision_is_serial(answers_server: ServerThread) -> None:
    """The table's {serial} is the live revision; a freshly seeded registry is revision 1."""
    assert answers_server.mesh.store.revision == 1
    reply, _ = ask(answers_server, "mesh.", "SOA", Via("udp", 4))
    assert reply.answer[0][0].serial == 1


# ---------------------------------------------------------------- defaults, SOA serial


def test_defaults_ttl_30_negative_ttl_5_and_serial_follows_revision(
        demo_server: ServerThread) -> None:
    via = Via("udp", 4)
    store = demo_server.mesh.store
    rev1 = store.revision
    reply, _ = ask(demo_server, F, "A", via)
    assert records(reply.answer) == [f"{F} 30 IN A 240.0.0.7"]
    reply, _ = ask(demo_server, "mesh.", "SOA", via)
    assert records(reply.answer) == [soa("mesh.", 30, rev1, 5)]
    reply, _ = ask(demo_server, "nope.mesh.", "A", via)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert records(reply.authority) == [soa("mesh.", 5, rev1, 5)]
    # With the default cidr6 the ip6.arpa zone is served too: an unused address is NXDOMAIN.
    unused = rev("fd00:fd00::ffff")
    reply, _ = ask(demo_server, unused, "PTR", via)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA
    [auth] = reply.authority
    assert auth.rdtype == dns.rdatatype.SOA and auth[0].serial == rev1 and auth[0].minimum == 5
    assert unused.endswith("." + auth.name.to_text())

    # A write moves the revision; the very next answers carry it as the serial.
    demo_server.call(store.put, parse_services([
        {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
         "vip6": "fd00:fd00::7"},
        {"name": "payments", "namespace": "shop", "port": 443, "vip": "240.0.0.99"},
    ]))
    rev2 = store.revision
    assert rev2 == rev1 + 1
    for name, rdtype, section in (("mesh.", "SOA", "answer"), ("nope.mesh.", "A", "authority"),
                                  (F, "TXT", "authority")):
        reply, _ = ask(demo_server, name, rdtype, via)
        [rrset] = getattr(reply, section)
        assert rrset[0].serial == rev2, (name, rdtype)
    reply, _ = ask(demo_server, "payments.shop.svc.443.mesh.", "A", via)
    assert records(reply.answer) == ["payments.shop.svc.443.mesh. 30 IN A 240.0.0.99"]
    reply, _ = ask(demo_server, "backend.kong.svc.8080.mesh.", "A", via)
    assert reply.rcode() == dns.rcode.NXDOMAIN


# ---------------------------------------------------------------- dig and kdig


@dataclass
class ToolReply:
    status: str
    flags: set[str]
    counts: dict[str, int]
    sections: dict[str, list[str]]
    udp_size: int | None


def parse_tool_output(text: str) -> ToolReply:
    """dig's or kdig's default presentation output (the two differ only in punctuation)."""
    status = re.search(r"status: ([A-Z]+)", text)
    flags = re.search(r";; [Ff]lags: ([a-z ]*);", text)
    assert status and flags, text
    counts = {k: int(v) for k, v in
              re.findall(r"(QUERY|ANSWER|AUTHORITY|ADDITIONAL): (\d+)", text)}
    size = re.search(r"(?:udp:|UDP size:) (\d+)", text)
    sections: dict[str, list[str]] = {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r";; ([A-Z]+) SECTION:", line)
        if heading:
            current = heading.group(1)
            continue
        if not line.strip():
            current = None
            continue
        if line.startswith(";"):
            continue
        if current in sections:
            sections[current].append(" ".join(line.split()))
    return ToolReply(status.group(1), set(flags.group(1).split()), counts,
                     {k: sorted(v) for k, v in sections.items()},
                     int(size.group(1)) if size else None)


def dig(server: ServerThread, via: Via, *args: str) -> ToolReply:
    host, port = server.dns_addr(via.family)
    proc = run_tool("dig", f"@{host}", "-p", str(port), "+tcp" if via.tcp else "+notcp",
                    "+nosearch", "+tries=1", "+time=3", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_tool_output(proc.stdout)


def kdig(server: ServerThread, via: Via, *args: str) -> ToolReply:
    host, port = server.dns_addr(via.family)
    proc = run_tool("kdig", f"@{host}", "-p", str(port), "+tcp" if via.tcp else "+notcp",
                    "+timeout=3", "+retry=0", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return parse_tool_output(proc.stdout)


@pytest.fixture(params=["dig", "kdig"])
def client(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if tool(name) is None:
        pytest.skip(f"{name} is not installed")
    return name


@pytest.mark.parametrize("row", TOOL_ROWS, ids=[r.id for r in TOOL_ROWS])
def test_answer_table_dig_kdig(answers_server: ServerThread, via: Via, client: str,
                               row: Row) -> None:
    """dig sends EDNS by default and kdig does not: both shapes are covered."""
    serial = answers_server.mesh.store.revision
    if client == "dig":
        out, edns = dig(answers_server, via, row.name, row.rdtype), True
    else:
        out, edns = kdig(answers_server, via, row.name, row.rdtype), False
    answer, authority, additional = row.expect(serial)
    assert out.status == row.rcode
    assert out.flags == {"qr", "rd"} | ({"aa"} if row.aa else set())
    assert out.sections == {"ANSWER": answer, "AUTHORITY": authority, "ADDITIONAL": additional}
    assert out.counts == {"QUERY": 1, "ANSWER": len(answer), "AUTHORITY": len(authority),
                          "ADDITIONAL": len(additional) + (1 if edns else 0)}
    assert out.udp_size == (1232 if edns else None)


def test_dig_short_forms(answers_server: ServerThread, via: Via) -> None:
    """The everyday operator commands: `dig +short` and `dig -x`."""
    def short(*args: str) -> list[str]:
        host, port = answers_server.dns_addr(via.family)
        proc = run_tool("dig", f"@{host}", "-p", str(port), "+tcp" if via.tcp else "+notcp",
                        "+nosearch", "+tries=1", "+time=3", "+short", *args)
        assert proc.returncode == 0, proc.stderr
        return sorted(proc.stdout.split("\n")[:-1])

    if tool("dig") is None:
        pytest.skip("dig is not installed")
    assert short("frontend.kong.svc.80.mesh", "A") == ["240.0.0.7"]
    assert short("frontend_kong_svc_80.mesh", "AAAA") == ["fd00:fd00::7"]
    assert short("backend.kong.svc.8080.mesh", "SRV") == [f"0 100 8080 {B}"]
    assert short("-x", "240.0.0.8") == [B]
    assert short("-x", "fd00:fd00::1:9") == [R]
    assert short("frontend.kong.svc.80.mesh.local", "A") == ["240.0.0.7"]
    assert short("backend.kong.svc.8080.mesh", "AAAA") == []
    assert short("nope.mesh", "A") == []
