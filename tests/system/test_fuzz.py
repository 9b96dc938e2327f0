"""Malformed input: a seeded mutator and hypothesis against the core, then the live server.

Invariants for every packet (SPEC §4 protocol rules):
- no exception escapes ``MessageHandler.handle_udp`` / ``handle_tcp``;
- no reply only when the packet is shorter than 12 bytes or has QR=1;
- every reply parses with dnspython, has QR=1 and carries the query's ID;
- a reply to a query that parses echoes its question in the exact case;
- over UDP a reply never exceeds 512 bytes unless the query carried EDNS, and
  never exceeds the advertised/accepted size when it did.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshdns.core.answer import (
    FormatError,
    ForwardRequest,
    MessageHandler,
    Query,
    Zone,
    ZoneSettings,
    parse_query,
)
from meshdns.core.registry import Registry, RegistryPolicy, VipRange, apply_put, parse_services

from ..support import connected_udp, make_config, query, running_server

SEED = 0x6D657368  # "mesh"
MUTATIONS = 100_000
LIVE_PACKETS = 2_000

SERVICES: list[dict[str, Any]] = [
    {"name": "frontend", "namespace": "kong", "port": 80, "vip": "240.0.0.7",
     "vip6": "fd00:fd00::7", "hostnames": ["frontend.mesh", "httpbin.org", "a.b.c.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "vip": "240.0.0.8"},
    {"name": "redis", "namespace": "cache", "port": 6379},
    {"name": "n" * 63, "namespace": "s" * 63, "port": 65535,
     "hostnames": ["x" * 60 + ".mesh.local"]},
]
NAMES = [
    "frontend.kong.svc.80.mesh", "FrOnTeNd.KoNg.SvC.80.MeSh", "frontend_kong_svc_80.mesh",
    "frontend.mesh", "httpbin.org", "a.b.c.mesh", "b.c.mesh", "kong.svc.80.mesh", "80.mesh",
    "nope.mesh", "mesh", "mesh.local", "backend.kong.svc.8080.mesh.local",
    "redis.cache.svc.6379.mesh", f"{'n' * 63}.{'s' * 63}.svc.65535.mesh.local".upper(),
    "7.0.0.240.in-addr.arpa", "0.240.in-addr.arpa", "240.in-addr.arpa", "255.in-addr.arpa",
    "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa",
    "0.0.0.0.0.0.0.0.0.0.d.f.0.0.d.f.ip6.arpa",
    "frontend.kong.svc.80.mesh.corp.example", "nope.mesh.corp.example", "www.corp.example",
    "example.com", ".", "in-addr.arpa",
]
TYPES = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "TXT", "ANY", "CNAME", "AXFR", "IXFR", "MX",
         65280]


def build_resolver(forwarding: bool, cache: int = 256) -> MessageHandler:
    policy = RegistryPolicy(domains=("mesh", "mesh.local"))
    reg = apply_put(Registry.empty(), parse_services(SERVICES), policy, 0.0)
    zs = ZoneSettings(domains=("mesh", "mesh.local"), search=("corp.example",),
                      range4=VipRange.from_cidr("240.0.0.0/4"),
                      range6=VipRange.from_cidr("fd00:fd00::/64"), forwarding=forwarding)
    return MessageHandler(Zone(reg, zs), cache)


def build_corpus() -> list[bytes]:
    rng = random.Random(SEED)
    out: list[bytes] = []
    for name in NAMES:
        for rdtype in TYPES:
            out.append(dns.message.make_query(name, rdtype, use_edns=-1).to_wire())
        for edns, payload, dnssec, options in [
            (0, 1232, False, None),
            (0, 4096, True, [dns.edns.GenericOption(10, rng.randbytes(8))]),
            (0, 512, False, [dns.edns.GenericOption(12, b"\x00" * 20)]),  # padding
            (0, 1400, False, [dns.edns.ECSOption("10.0.0.0", 24)]),
            (1, 1232, True, None),
            (0, 100, False, [dns.edns.GenericOption(65001, b""),
                             dns.edns.GenericOption(65002, b"xyz")]),
        ]:
            q = dns.message.make_query(name, rng.choice(TYPES[:8]), use_edns=edns,
                                       payload=payload, want_dnssec=dnssec, options=options)
            out.append(q.to_wire())
    for rdclass in ("CH", "HS", "ANY", "NONE"):
        out.append(dns.message.make_query("frontend.kong.svc.80.mesh", "A", rdclass).to_wire())
    # Other opcodes, a query with an answer record (like a NOTIFY), CD and no RD.
    notify = dns.message.make_query("mesh", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    out.append(notify.to_wire())
    status = bytearray(out[0])
    status[2] = (status[2] & 0x87) | (2 << 3)
    out.append(bytes(status))
    with_answer = bytearray(out[0])
    with_answer[7] = 1
    out.append(bytes(with_answer) + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4)
               + b"\x0a\x00\x00\x01")
    cd = dns.message.make_query("frontend.mesh", "A")
    cd.flags = dns.flags.CD
    out.append(cd.to_wire())
    return out


CORPUS = build_corpus()


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(10)
        if op == 0 and buf:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:  # delete a range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 5 and len(buf) >= 12:  # change a count field
            field = 4 + 2 * rng.randrange(4)
            buf[field : field + 2] = struct.pack(
                "!H", rng.choice((0, 1, 2, 3, rng.randrange(65536), 0xFFFF)))
        elif op == 6 and len(buf) > 12:  # mangle a label length byte in the question
            i = rng.randrange(12, len(buf))
            buf[i] = rng.choice((0x00, 0x3F, 0x40, 0x80, 0xC0, 0xFF, rng.randrange(64)))
        elif op == 7:  # splice with another corpus packet
            other = rng.choice(CORPUS)
            i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + bytearray(other[j:])
        elif op == 8 and len(buf) >= 4:  # header flags: QR, opcode, TC, Z, rcode
            buf[2] = rng.randrange(256) if rng.random() < 0.5 else buf[2] & 0x7F
            buf[3] = rng.randrange(256)
        else:  # append junk / OPT-shaped tail
            tail = rng.choice((rng.randbytes(rng.randint(1, 32)),
                               b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x08"))
            buf += tail
    return bytes(buf)


def random_packet(rng: random.Random) -> bytes:
    size = rng.choice((rng.randrange(12), rng.randrange(12, 40), rng.randrange(600)))
    data = bytearray(rng.randbytes(size))
    if len(data) >= 12 and rng.random() < 0.7:
        data[2] &= 0x7F  # mostly queries, so the parser is reached
        data[4:6] = b"\x00\x01"
    return bytes(data)


def parse_reply(reply: bytes) -> dns.message.Message:
    data = reply
    if (reply[2] >> 3) & 0xF == dns.opcode.UPDATE:
        # dnspython parses UPDATE messages with stricter zone-section rules than a
        # NOTIMP echo needs to follow; read it as a QUERY-shaped message instead.
        data = reply[:2] + bytes((reply[2] & 0x87,)) + reply[3:]
    return dns.message.from_wire(data)


_PARSED: dict[bytes, tuple[bool, int, tuple[bytes, ...] | None]] = {}


def parsed(reply: bytes) -> tuple[bool, int, tuple[bytes, ...] | None]:
    """(QR, rcode, question labels) of a reply, parsed by dnspython.

    Memoized on the bytes after the ID: the same bytes parse the same way, and the
    ID is checked byte for byte by the caller.
    """
    tail = reply[2:]
    hit = _PARSED.get(tail)
    if hit is None:
        msg = parse_reply(reply)
        labels = msg.question[0].name.labels[:-1] if msg.question else None
        hit = (bool(msg.flags & dns.flags.QR), msg.rcode(), labels)
        if len(_PARSED) > 200_000:
            _PARSED.clear()
        _PARSED[tail] = hit
    return hit


def check(handle: Callable[[bytes], Any], packet: bytes, udp: bool) -> None:
    out = handle(packet)
    if out is None:
        assert len(packet) < 12 or packet[2] & 0x80, f"no reply to {packet!r}"
        return
    assert len(packet) >= 12 and not packet[2] & 0x80, f"replied to {packet!r}"
    if isinstance(out, ForwardRequest):
        assert out.data == packet
        return
    assert isinstance(out, bytes)
    assert out[:2] == packet[:2], f"ID not echoed for {packet!r}"
    qr, rcode, labels = parsed(out)
    assert qr
    q: Query | None
    try:
        q = parse_query(packet)
    except FormatError:
        q = None
    if udp:
        limit = 512
        if q is not None and q.edns is not None:
            limit = max(512, min(q.edns.udp_size, 1232))
        assert len(out) <= limit, f"{len(out)} bytes over UDP for {packet!r}"
    if q is not None and rcode != dns.rcode.FORMERR and labels is not None:
        assert labels == q.labels, packet


def feed(resolvers: list[MessageHandler], packet: bytes, i: int = 0) -> None:
    """UDP to the no-upstream resolver always; TCP to it or UDP to the forwarding one."""
    local, other = resolvers
    check(local.handle_udp, packet, True)
    if i % 2:
        check(other.handle_udp, packet, True)
    else:
        check(local.handle_tcp, packet, False)


# ---------------------------------------------------------------- core, seeded


def test_corpus_queries_are_valid_and_answered() -> None:
    r = build_resolver(forwarding=False)
    assert len(CORPUS) > 300
    for packet in CORPUS:
        check(r.handle_udp, packet, True)
        check(r.handle_tcp, packet, False)


def test_seeded_mutations_never_break_the_core() -> None:
    rng = random.Random(SEED)
    resolvers = [build_resolver(forwarding=False), build_resolver(forwarding=True, cache=10_000)]
    for i in range(MUTATIONS):
        packet = random_packet(rng) if i % 10 == 9 else mutate(rng, rng.choice(CORPUS))
        feed(resolvers, packet, i)
        if i % 5000 == 0:  # a registry swap in the middle of the storm
            resolvers[0].set_zone(resolvers[0].zone)
    # Still correct afterwards.
    reply = resolvers[0].handle_udp(CORPUS[0])
    assert isinstance(reply, bytes)
    msg = dns.message.from_wire(reply)
    assert [r.address for r in msg.answer[0]] == ["240.0.0.7"]
    counts = resolvers[0].snapshot_counts()
    assert sum(counts.requests.values()) == MUTATIONS + MUTATIONS // 2 + 1


def test_every_prefix_and_every_single_byte_value_of_a_query() -> None:
    r = build_resolver(forwarding=True)
    base = dns.message.make_query("frontend.kong.svc.80.mesh", "SRV", use_edns=0,
                                  options=[dns.edns.GenericOption(10, b"cookie!!")]).to_wire()
    n = 0
    for size in range(len(base) + 1):
        feed([r, r], base[:size], n)
        n += 1
    # Every value in the header; in the rest, every label length and every value with
    # the label-type bits set (0x40, 0x80, 0xC0), plus a few others.
    interesting = sorted({*range(0, 70), *range(0x3E, 0x43), 0x7F, 0x80, 0x81, 0xBF, 0xC0,
                          0xC1, 0xFE, 0xFF})
    for i in range(len(base)):
        for value in range(256) if i < 12 else interesting:
            feed([r, r], base[:i] + bytes((value,)) + base[i + 1 :], n)
            n += 1


# ---------------------------------------------------------------- core, hypothesis

FUZZ_SETTINGS = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow])
_SHARED = [build_resolver(forwarding=False, cache=64), build_resolver(forwarding=True)]


@FUZZ_SETTINGS
@given(st.binary(max_size=700))
def test_hypothesis_random_bytes(packet: bytes) -> None:
    feed(_SHARED, packet)


labels_st = st.lists(st.one_of(st.sampled_from([b"mesh", b"svc", b"kong", b"80", b"frontend",
                                                b"in-addr", b"arpa", b"240", b"MeSh"]),
                               st.binary(min_size=1, max_size=63)), max_size=8)


@FUZZ_SETTINGS
@given(qid=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFFFF), labels=labels_st,
       qtype=st.one_of(st.sampled_from([1, 2, 5, 6, 12, 28, 33, 41, 251, 252, 255]),
                       st.integers(0, 0xFFFF)),
       qclass=st.one_of(st.just(1), st.integers(0, 0xFFFF)),
       opt=st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
                                          st.binary(max_size=40))),
       tail=st.binary(max_size=8))
def test_hypothesis_structured_queries(qid: int, flags: int, labels: list[bytes], qtype: int,
                                       qclass: int, opt: tuple[int, int, bytes] | None,
                                       tail: bytes) -> None:
    name = b"".join(bytes((len(x),)) + x for x in labels) + b"\x00"
    body = name + struct.pack("!HH", qtype, qclass)
    arcount = 0
    if opt is not None:
        udp, ttl, rdata = opt
        body += b"\x00" + struct.pack("!HHIH", 41, udp, ttl, len(rdata)) + rdata
        arcount = 1
    packet = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, arcount) + body + tail
    feed(_SHARED, packet)


@FUZZ_SETTINGS
@given(index=st.integers(0, len(CORPUS) - 1), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_mutated_corpus(index: int, seed: int) -> None:
    rng = random.Random(seed)
    feed(_SHARED, mutate(rng, CORPUS[index]))


# ---------------------------------------------------------------- the live server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("fuzz-live")
    with running_server(make_config(tmp)) as server:
        yield server


def assert_answers(server: Any) -> None:
    for tcp in (False, True):
        reply = query(server, "frontend.kong.svc.80.mesh", "A", tcp=tcp, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.address for r in reply.answer[0]] == ["240.0.0.7"]


def test_live_udp_server_survives_mutated_packets(live: Any) -> None:
    host, port = live.dns_addr(4)
    assert host == "127.0.0.1"
    rng = random.Random(SEED + 1)
    replies: dict[int, bytes] = {}
    sent: dict[int, bytes] = {}
    # Connected: the kernel drops datagrams from any sender but the server, so a stray
    # one from another process on the host is not taken for a reply.
    with connected_udp(host, port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(0.0)

        def drain() -> None:
            while True:
                try:
                    data = sock.recv(65535)
                except (BlockingIOError, InterruptedError):
                    return
                if len(data) >= 2:
                    replies[struct.unpack("!H", data[:2])[0]] = data

        for i in range(LIVE_PACKETS):
            packet = mutate(rng, rng.choice(CORPUS)) if i % 4 else random_packet(rng)
            if len(packet) >= 2:
                packet = struct.pack("!H", i) + packet[2:]  # a unique ID to pair replies
                sent[i] = packet
            sock.send(packet)
            if i % 50 == 49:
                drain()
            if i % 500 == 499:
                assert_answers(live)  # other clients keep being answered mid-storm
        sock.settimeout(0.5)
        try:
            while True:
                data = sock.recv(65535)
                replies[struct.unpack("!H", data[:2])[0]] = data
        except (TimeoutError, BlockingIOError):
            pass
    assert replies, "the server answered none of the packets"
    for qid, data in replies.items():
        assert qid in sent
        assert len(data) <= 1232
        msg = parse_reply(data)
        assert msg.id == qid and msg.flags & dns.flags.QR
    assert_answers(live)


def _read_until_eof(sock: socket.socket, sink: list[int]) -> None:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sink[0] += len(data)
    except OSError:
        return


def test_live_tcp_server_survives_a_megabyte_of_garbage(live: Any) -> None:
    host, port = live.dns_addr(4)
    rng = random.Random(SEED + 2)
    junk = rng.randbytes(1 << 20)
    received = [0]
    with socket.create_connection((host, port), timeout=15) as sock:
        reader = threading.Thread(target=_read_until_eof, args=(sock, received), daemon=True)
        reader.start()
        try:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on us: that is allowed, crashing is not
        reader.join(20)
        assert not reader.is_alive()
    assert_answers(live)


def test_live_tcp_server_survives_a_frame_of_small_junk_messages(live: Any) -> None:
    host, port = live.dns_addr(4)
    rng = random.Random(SEED + 3)
    frames = []
    total = 0
    while total < 1 << 20:
        msg = rng.randbytes(rng.randint(12, 40))
        msg = msg[:2] + bytes((msg[2] & 0x7F,)) + msg[3:]
        frames.append(struct.pack("!H", len(msg)) + msg)
        total += len(frames[-1])
    received = [0]
    with socket.create_connection((host, port), timeout=15) as sock:
        reader = threading.Thread(target=_read_until_eof, args=(sock, received), daemon=True)
        reader.start()
        try:
            sock.sendall(b"".join(frames))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(30)
        assert not reader.is_alive()
    assert received[0] > 0  # FORMERR replies came back on the same connection
    assert_answers(live)


def test_live_tcp_frame_claiming_65535_bytes_then_closing(live: Any) -> None:
    host, port = live.dns_addr(4)
    for body in (b"", b"\x12\x34" + b"\x00" * 100, b"\x00" * 65534):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"\xff\xff" + body)
        assert_answers(live)
    # And a frame that claims more than it sends, on a connection left open.
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"\xff\xff" + b"\x00" * 1000)
        assert_answers(live)
