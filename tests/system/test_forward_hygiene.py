"""Reply hygiene (issue 23) against a lying upstream on loopback: what a liar says
reaches clients only as far as it belongs to their question.

``Liar`` is a real UDP and TCP server on 127.0.0.1 that answers each name with
bytes the test crafted by hand (a compression-pointer loop cannot be built with
a DNS library). In ``tcp`` mode it answers UDP with TC=1 and the crafted reply
over TCP, so both of meshdns's upstream paths are attacked. Clients are
dnspython and dig; the forwarder's clock is moved by hand (fake_upstream.Clock).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshdns.dns.forwarder import SERVFAIL_TTL

from ..dnswire import T_A, T_AAAA, T_CNAME, T_NS, T_PTR, T_SOA, T_TXT, a, rr, wire_name
from ..fake_upstream import Clock
from ..support import ServerThread, make_config, query, run_tool, running_server, tool

LOCAL = "127.0.0.1"
EVIL = "6.6.6.6"
MESH = "frontend.kong.svc.80.mesh"  # DEMO_SERVICES: VIP 240.0.0.7, host name httpbin.org


# ---------------------------------------------------------------- crafting replies


def soa(zone: str) -> bytes:
    return wire_name("ns." + zone) + wire_name("host." + zone) + struct.pack("!5I", 1, 2, 3,
                                                                             4, 60)


Craft = Callable[[int, bytes], bytes]  # (query ID, question section) -> reply


def reply(*, rcode: int = 0, an: tuple[bytes, ...] = (), ns: tuple[bytes, ...] = (),
          ar: tuple[bytes, ...] = ()) -> Craft:
    def craft(qid: int, question: bytes) -> bytes:
        header = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(an), len(ns), len(ar))
        return header + question + b"".join(an) + b"".join(ns) + b"".join(ar)
    return craft


def pointer_loop(address: str) -> Craft:
    """An A answer whose owner is ``\\x01a`` then a pointer back to itself: every
    pointer points backwards, yet the name never ends."""
    def craft(qid: int, question: bytes) -> bytes:
        at = 12 + len(question)
        owner = b"\x01a" + bytes((0xC0 | (at >> 8), at & 0xFF))
        return reply(an=(rr(owner, T_A, a(address)),))(qid, question)
    return craft


class Liar:
    """A lying upstream: UDP and TCP on one loopback port, answers from ``answers``."""

    def __init__(self, tcp: bool = False) -> None:
        self.answers: dict[str, Craft] = {}
        self.tcp_mode = tcp  # UDP: TC=1, no records; TCP: the crafted reply
        self.asked: list[tuple[str, str]] = []  # (proto, name)
        self._stop = threading.Event()
        self.udp, self.listener = self._bind_pair()
        self.port = self.udp.getsockname()[1]
        self.udp.settimeout(0.1)
        self.listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """A UDP socket and a TCP listener on the same free loopback port."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((LOCAL, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((LOCAL, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise OSError("no free port pair")

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    def count(self, name: str) -> int:
        """Lookups of ``name`` (each starts over UDP, in tcp mode it goes on over TCP)."""
        return sum(1 for proto, n in self.asked if n == name and proto == "udp")

    def _answer(self, data: bytes, proto: str) -> bytes | None:
        pos = 12
        while data[pos]:
            pos += 1 + data[pos]
        question = data[12:pos + 5]
        name = ".".join(dns.name.from_wire(data, 12)[0].to_text(omit_final_dot=True)
                        .lower().split("."))
        self.asked.append((proto, name))
        craft = self.answers.get(name)
        if craft is None:
            return None
        if self.tcp_mode and proto == "udp":
            return struct.pack("!HHHHHH", int.from_bytes(data[:2], "big"), 0x8380, 1, 0, 0,
                               0) + question
        return craft(int.from_bytes(data[:2], "big"), question)

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            out = self._answer(data, "udp")
            if out is not None:
                self.udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn, contextlib.suppress(OSError, IndexError):
                conn.settimeout(2.0)
                size = int.from_bytes(conn.recv(2, socket.MSG_WAITALL), "big")
                data = conn.recv(size, socket.MSG_WAITALL)
                out = self._answer(data, "tcp")
                if out is not None:
                    conn.sendall(len(out).to_bytes(2, "big") + out)

    def __enter__(self) -> Liar:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.udp.close()
        self.listener.close()


@pytest.fixture(params=["udp", "tcp"])
def liar(request: pytest.FixtureRequest) -> Iterator[Liar]:
    with Liar(tcp=request.param == "tcp") as server:
        yield server


@contextlib.contextmanager
def forwarding_to(tmp_path: Path, liar: Liar) -> Iterator[tuple[ServerThread, Clock]]:
    raw = make_config(tmp_path, {"dns": {"upstreams": [liar.address],
                                         "upstream_timeout": 1.0}})
    clock = Clock()
    with running_server(raw) as server:
        fwd = server.mesh.forwarder
        assert fwd is not None
        fwd.clock = clock
        yield server, clock


def ask(server: ServerThread, name: str, rdtype: str = "A") -> dns.message.Message:
    return query(server, name, rdtype, timeout=5.0)


def records(section: list[dns.rrset.RRset]) -> list[str]:
    """Each record as "owner TYPE rdata" (no TTL), sorted."""
    return sorted(f"{rrset.name.to_text(omit_final_dot=True).lower()} "
                  f"{dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text().lower()}"
                  for rrset in section for rdata in rrset)


def counters(server: ServerThread, family: str) -> dict[str, float]:
    """label value -> count of one labelled counter family, from /metrics."""
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {next(iter(s.labels.values()), ""): s.value for s in fam.samples
                    if s.name.endswith("_total")}
    raise AssertionError(f"{family} is not exported")


def scrubbed(server: ServerThread) -> dict[str, float]:
    return {k: v for k, v in counters(server, "meshdns_forward_scrubbed_records").items() if v}


# ---------------------------------------------------------------- the lies


def test_compression_loop_is_servfail_counted_and_never_cached(tmp_path: Path,
                                                               liar: Liar) -> None:
    liar.answers["loop.liar.test"] = pointer_loop(EVIL)
    with forwarding_to(tmp_path, liar) as (server, clock):
        assert ask(server, "loop.liar.test").rcode() == dns.rcode.SERVFAIL
        assert counters(server, "meshdns_upstream_rejected_replies") == {"malformed": 1.0}
        host, port = server.dns_addr()
        if tool("dig"):
            clock.now += SERVFAIL_TTL  # the SERVFAIL is remembered 1 s, no longer
            out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5",
                           "loop.liar.test", "A")
            assert "status: SERVFAIL" in out.stdout, out.stdout
            assert "bad compression pointer" not in out.stdout + out.stderr
        # The liar tells the truth now: the loop was never cached for its TTL.
        liar.answers["loop.liar.test"] = reply(an=(rr("loop.liar.test", T_A,
                                                      a("192.0.2.20")),))
        clock.now += SERVFAIL_TTL
        fixed = ask(server, "loop.liar.test")
        assert fixed.rcode() == dns.rcode.NOERROR
        assert records(fixed.answer) == ["loop.liar.test A 192.0.2.20"]


def test_records_for_other_names_are_dropped_and_counted(tmp_path: Path, liar: Liar) -> None:
    liar.answers["www.liar.test"] = reply(
        an=(rr("www.liar.test", T_A, a("192.0.2.10")), rr(MESH, T_A, a(EVIL)),
            rr("other.liar.test", T_A, a(EVIL))),
        ns=(rr("evil", T_NS, wire_name("ns.evil")),),
        ar=(rr("ns.evil", T_A, a(EVIL)),))
    with forwarding_to(tmp_path, liar) as (server, _clock):
        for _ in range(2):  # asked upstream, then from the cache: the same, clean
            got = ask(server, "www.liar.test")
            assert got.rcode() == dns.rcode.NOERROR
            assert records(got.answer) == ["www.liar.test A 192.0.2.10"]
            assert got.authority == [] and got.additional == []
        assert liar.count("www.liar.test") == 1
        assert scrubbed(server) == {"other_name": 2.0, "authority": 1.0, "additional": 1.0}
        assert records(ask(server, MESH).answer) == [f"{MESH} A 240.0.0.7"]  # ours, untouched
        # The names it slipped in were not cached either: asked, they go upstream, where
        # the liar has nothing to say about them now.
        for name in ("other.liar.test", "ns.evil"):
            liar.answers[name] = reply(rcode=3, ns=(rr("liar.test", T_SOA, soa("liar.test")),))
            assert ask(server, name).rcode() == dns.rcode.NXDOMAIN
            assert liar.count(name) == 1


def test_records_of_the_wrong_type_give_an_empty_answer(tmp_path: Path, liar: Liar) -> None:
    liar.answers["typed.liar.test"] = reply(
        an=(rr("typed.liar.test", T_AAAA, socket.inet_pton(socket.AF_INET6, "2001:db8::6")),
            rr("typed.liar.test", T_TXT, b"\x04evil")),
        ns=(rr("liar.test", T_SOA, soa("liar.test")),))
    with forwarding_to(tmp_path, liar) as (server, _clock):
        for _ in range(2):  # NODATA with its SOA: cached as that, and only that
            got = ask(server, "typed.liar.test")
            assert got.rcode() == dns.rcode.NOERROR and got.answer == []
            assert records(got.authority) == [
                "liar.test SOA ns.liar.test. host.liar.test. 1 2 3 4 60"]
        assert liar.count("typed.liar.test") == 1
        assert scrubbed(server) == {"wrong_type": 2.0}


@pytest.mark.parametrize(("ours", "rdtype", "lie", "truth"), [
    (MESH, "A", rr(MESH, T_A, a(EVIL)), f"{MESH} A 240.0.0.7"),
    ("httpbin.org", "A", rr("httpbin.org", T_A, a(EVIL)), "httpbin.org A 240.0.0.7"),
    ("7.0.0.240.in-addr.arpa", "PTR", rr("7.0.0.240.in-addr.arpa", T_PTR, wire_name("evil")),
     f"7.0.0.240.in-addr.arpa PTR {MESH}."),
], ids=["mesh-name", "host-name", "vip-ptr"])
def test_cname_to_our_name_gets_our_answer_not_the_upstreams(
        tmp_path: Path, liar: Liar, ours: str, rdtype: str, lie: bytes, truth: str) -> None:
    liar.answers["ext.liar.test"] = reply(an=(rr("ext.liar.test", T_CNAME, wire_name(ours)),
                                              lie))
    with forwarding_to(tmp_path, liar) as (server, _clock):
        for _ in range(2):
            got = ask(server, "ext.liar.test", rdtype)
            assert got.rcode() == dns.rcode.NOERROR
            assert records(got.answer) == sorted([f"ext.liar.test CNAME {ours}.", truth])
        assert liar.count("ext.liar.test") == 1
        assert scrubbed(server) == {"own_name": 1.0}


def test_a_chain_through_our_name_is_cut_there(tmp_path: Path, liar: Liar) -> None:
    liar.answers["via.liar.test"] = reply(an=(
        rr("via.liar.test", T_CNAME, wire_name(MESH)),
        rr(MESH, T_CNAME, wire_name("evil.liar.test")),
        rr("evil.liar.test", T_A, a(EVIL))))
    with forwarding_to(tmp_path, liar) as (server, _clock):
        got = ask(server, "via.liar.test")
        assert records(got.answer) == [f"{MESH} A 240.0.0.7", f"via.liar.test CNAME {MESH}."]
        assert scrubbed(server) == {"own_name": 1.0, "other_name": 1.0}


# ---------------------------------------------------------------- what belongs stays


def test_authority_and_glue_of_an_enclosing_zone_are_kept(tmp_path: Path, liar: Liar) -> None:
    liar.answers["nx.liar.test"] = reply(rcode=3, ns=(
        rr("liar.test", T_SOA, soa("liar.test")), rr("evil", T_SOA, soa("evil"))))
    liar.answers["web.liar.test"] = reply(
        an=(rr("web.liar.test", T_CNAME, wire_name("cdn.liar.test")),
            rr("cdn.liar.test", T_A, a("192.0.2.30"))),
        ns=(rr("liar.test", T_NS, wire_name("ns1.liar.test")),
            rr("liar.test", T_NS, wire_name("ns.evil"))),
        ar=(rr("ns1.liar.test", T_A, a("192.0.2.53")), rr("ns.evil", T_A, a(EVIL)),
            rr(MESH, T_A, a(EVIL))))
    with forwarding_to(tmp_path, liar) as (server, _clock):
        nx = ask(server, "nx.liar.test")
        assert nx.rcode() == dns.rcode.NXDOMAIN and nx.answer == []
        assert records(nx.authority) == ["liar.test SOA ns.liar.test. host.liar.test. 1 2 3 4 60"]
        web = ask(server, "web.liar.test")
        assert records(web.answer) == ["cdn.liar.test A 192.0.2.30",
                                       "web.liar.test CNAME cdn.liar.test."]
        assert records(web.authority) == ["liar.test NS ns.evil.", "liar.test NS ns1.liar.test."]
        # Glue inside the NS's zone only: ns.evil's is out of bailiwick, the mesh name's
        # is no glue at all.
        assert records(web.additional) == ["ns1.liar.test A 192.0.2.53"]
        assert scrubbed(server) == {"authority": 1.0, "additional": 2.0}
