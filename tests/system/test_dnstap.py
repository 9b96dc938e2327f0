"""dnstap (log.dnstap) read by real collectors: fstrm_capture writing a file, decoded
with dnstap-ldns and with dnstap-pb, and matched field by field against the queries
this test sent (addresses, ports, message bytes, times).

meshdns runs as its own process (``meshdns serve``); the UDP path it takes is the
batched one unless MESHDNS_UDP_BATCH=0 (the Makefile's second tier runs this module
again that way).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import pytest
from dnstap_pb import dnstap_pb2 as pb
from fstrm import FstrmCodec
from fstrm.fstrm_codec import FSTRM_CONTROL_START, FSTRM_CONTROL_STOP, FSTRM_DATA_FRAME

from meshdns.config import ConfigError, parse_config

from ..apiclient import ServerProcess, call, wait_for
from ..support import DEMO_SERVICES, free_port, recv_exact, stop_process

pytestmark = pytest.mark.skipif(shutil.which("fstrm_capture") is None,
                                reason="fstrm_capture (Debian fstrm-bin) is not installed")

CONTENT_TYPE = "protobuf:dnstap.Dnstap"
MESH_NAME = "frontend.kong.svc.80.mesh"


class Meshdns(ServerProcess):
    """ServerProcess keeping MESHDNS_UDP_BATCH, so the second tier tests the other path."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        if "MESHDNS_UDP_BATCH" in os.environ:
            env["MESHDNS_UDP_BATCH"] = os.environ["MESHDNS_UDP_BATCH"]
        return env


class Capture:
    """fstrm_capture on a Unix socket (or TCP port), writing a Frame Streams file."""

    def __init__(self, workdir: Path, name: str = "capture", tcp_port: int | None = None
                 ) -> None:
        self.path = workdir / f"{name}.fstrm"
        self.socket = workdir / "dnstap.sock"
        self.tcp_port = tcp_port
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        where = (["-a", "127.0.0.1", "-p", str(self.tcp_port)] if self.tcp_port is not None
                 else ["-u", str(self.socket)])
        if self.tcp_port is None:
            self.socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["fstrm_capture", "-t", CONTENT_TYPE, *where,
                                          "-w", str(self.path), "-d"],
                                         stdout=log, stderr=subprocess.STDOUT)
        if self.tcp_port is None:
            wait_for(self.socket.exists, 10, "fstrm_capture's socket")
        else:
            wait_for(lambda: "opening TCP socket" in self.log(), 10, "fstrm_capture's port")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM: fstrm_capture closes its file (and says how many frames it wrote)."""
        stop_process(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def read_capture(path: Path) -> list[Any]:
    """The dnstap messages of a Frame Streams file (START, data frames, STOP)."""
    codec = FstrmCodec()
    codec.append(path.read_bytes())
    out: list[Any] = []
    controls: list[int] = []
    while codec.process():
        kind, types, payload = codec.decode()
        if kind == FSTRM_DATA_FRAME:
            frame = pb.Dnstap()
            frame.ParseFromString(payload)
            out.append(frame)
        else:
            controls.append(kind)
            if kind == FSTRM_CONTROL_START:
                assert types == [CONTENT_TYPE.encode()]
    assert controls == [FSTRM_CONTROL_START, FSTRM_CONTROL_STOP], controls
    return out


@dataclass
class Sent:
    """One query this test sent and the reply it got, as the client saw them."""

    proto: int  # dnstap SocketProtocol: 1 UDP, 2 TCP
    client: tuple[str, int]
    query: bytes
    reply: bytes
    sent_ns: int
    received_ns: int


def ask(server: tuple[str, int], name: str, tcp: bool = False, qid: int = 0) -> Sent:
    """One query from a socket of our own, so its source address and port are known."""
    msg = dns.message.make_query(name, "A", use_edns=0)
    msg.id = qid or msg.id
    wire = msg.to_wire()
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(5)
        sock.bind(("127.0.0.1", 0))
        sock.connect(server)
        sent = time.time_ns()
        if tcp:
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", recv_exact(sock, 2))[0]
            reply = recv_exact(sock, size)
        else:
            sock.send(wire)
            reply = sock.recv(65535)
        received = time.time_ns()
        client = sock.getsockname()
    assert reply[:2] == wire[:2]
    return Sent(2 if tcp else 1, client, wire, reply, sent, received)


def metrics(server: ServerProcess) -> str:
    return call(server.url, "GET", "/metrics").body.decode()


def value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m is not None, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def accounted(text: str) -> float:
    """Every message meshdns made: written, dropped (both reasons), or still queued."""
    return (value(text, "meshdns_dnstap_written_total")
            + value(text, "meshdns_dnstap_dropped_total", '{reason="queue_full"}')
            + value(text, "meshdns_dnstap_dropped_total", '{reason="write_failed"}')
            + value(text, "meshdns_dnstap_queued"))


def meshdns_with_dnstap(workdir: Path, dnstap: dict[str, Any],
                        dns_extra: dict[str, Any] | None = None) -> Meshdns:
    import yaml

    seed = workdir / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    return Meshdns(workdir, {"log": {"dnstap": dnstap}, "registry": {"seed_file": str(seed)},
                             "dns": dns_extra or {}})


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # A Unix socket path must stay under 108 bytes: pytest's tmp_path can be longer.
    short = Path(f"/tmp/dnstap-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    short.mkdir()
    yield short
    shutil.rmtree(short, ignore_errors=True)


def check_client_messages(frames: list[Any], sent: list[Sent], dns_port: int,
                          identity: bytes, version: bytes) -> None:
    """Two messages per query, in order, each field equal to what the client saw."""
    assert len(frames) == 2 * len(sent)
    for i, s in enumerate(sent):
        for frame, mtype in ((frames[2 * i], pb.Message.CLIENT_QUERY),
                             (frames[2 * i + 1], pb.Message.CLIENT_RESPONSE)):
            assert frame.type == pb.Dnstap.MESSAGE
            assert frame.identity == identity and frame.version == version
            m = frame.message
            assert m.type == mtype
            assert m.socket_family == pb.INET and m.socket_protocol == s.proto
            assert m.query_address == socket.inet_aton(s.client[0])
            assert m.query_port == s.client[1]
            assert m.response_address == socket.inet_aton("127.0.0.1")
            assert m.response_port == dns_port
            query_ns = m.query_time_sec * 1_000_000_000 + m.query_time_nsec
            assert s.sent_ns <= query_ns <= s.received_ns
            if mtype == pb.Message.CLIENT_QUERY:
                assert m.query_message == s.query
                assert not m.HasField("response_message")
            else:
                assert m.query_message == s.query and m.response_message == s.reply
                response_ns = m.response_time_sec * 1_000_000_000 + m.response_time_nsec
                assert query_ns <= response_ns <= s.received_ns


def test_client_messages_reach_fstrm_capture_field_by_field(workdir: Path) -> None:
    capture = Capture(workdir).start()
    server = meshdns_with_dnstap(workdir, {"socket": str(capture.socket),
                                           "identity": "node-a", "version": "test 1"})
    try:
        server.start()
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_connected") == 1, 10,
                 "the collector's handshake")
        sent = [ask(server.dns_addr, MESH_NAME), ask(server.dns_addr, MESH_NAME, tcp=True),
                ask(server.dns_addr, "nothing.kong.svc.80.mesh"),  # NXDOMAIN
                ask(server.dns_addr, "www.example.org")]  # REFUSED: no upstreams
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_written_total") == 8, 10,
                 "8 messages written")
    finally:
        server.stop()  # SIGTERM: the writer sends STOP and waits for FINISH
        capture.stop()
    assert "wrote 10 frames" in capture.log()  # START, 8 messages, STOP
    frames = read_capture(capture.path)
    check_client_messages(frames, sent, server.dns_port, b"node-a", b"test 1")

    # dnstap-ldns reads the same file: one line per message, client address, protocol,
    # size and question as sent.
    if shutil.which("dnstap-ldns") is None:
        pytest.skip("dnstap-ldns (Debian dnstap-ldns) is not installed")
    text = subprocess.run(["dnstap-ldns", "-r", str(capture.path)], capture_output=True,
                          text=True, timeout=20, check=True).stdout
    lines = text.splitlines()
    assert len(lines) == 8
    for i, s in enumerate(sent):
        name = dns.message.from_wire(s.query).question[0].name.to_text()
        proto = "UDP" if s.proto == 1 else "TCP"
        assert re.search(rf" CQ 127\.0\.0\.1 {proto} {len(s.query)}b \"{re.escape(name)}\" IN A$",
                         lines[2 * i]), lines[2 * i]
        assert re.search(rf" CR 127\.0\.0\.1 {proto} {len(s.reply)}b \"{re.escape(name)}\" IN A$",
                         lines[2 * i + 1]), lines[2 * i + 1]


def test_tcp_collector_and_default_identity(workdir: Path) -> None:
    port = free_port()
    capture = Capture(workdir, tcp_port=port).start()
    server = meshdns_with_dnstap(workdir, {"tcp": f"127.0.0.1:{port}",
                                           "messages": ["client_response"]},
                                 {"nsid": "replica-7"})
    try:
        server.start()
        sent = [ask(server.dns_addr, MESH_NAME) for _ in range(3)]
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_written_total") == 3, 10,
                 "3 messages written")
    finally:
        server.stop()
        capture.stop()
    frames = read_capture(capture.path)
    # Only the responses, as asked; identity is dns.nsid, version meshdns's.
    assert [f.message.type for f in frames] == [pb.Message.CLIENT_RESPONSE] * 3
    from meshdns import __version__

    for frame, s in zip(frames, sent, strict=True):
        assert frame.identity == b"replica-7"
        assert frame.version == f"meshdns {__version__}".encode()
        assert frame.message.query_port == s.client[1]
        assert frame.message.response_message == s.reply


def test_collector_killed_mid_run_dns_unaffected_drops_counted(workdir: Path) -> None:
    queue = 50
    capture = Capture(workdir).start()
    server = meshdns_with_dnstap(workdir, {"socket": str(capture.socket),
                                           "queue_size": queue})
    try:
        server.start()
        for _ in range(20):
            ask(server.dns_addr, MESH_NAME)
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_written_total") == 40, 10,
                 "40 messages written")
        capture.kill()  # SIGKILL: gone at once, nothing said
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_connected") == 0, 10,
                 "meshdns to notice the collector is gone")
        # Every query is still answered while nothing reads dnstap.
        after = 300
        for i in range(after):
            s = ask(server.dns_addr, MESH_NAME)
            assert dns.message.from_wire(s.reply).answer, i
        text = metrics(server)
        total = 2 * (20 + after)
        assert accounted(text) == total  # nothing is lost without being counted
        # The queue holds its bound; the rest of what came after the collector died
        # is dropped and counted.
        assert value(text, "meshdns_dnstap_queued") == 2 * queue
        assert value(text, "meshdns_dnstap_dropped_total", '{reason="queue_full"}') \
            == 2 * (after - queue)
        assert value(text, "meshdns_dnstap_written_total") == 40

        # A collector back on the same socket gets what waited in the queue (backoff
        # retries reach it), and everything after. The queue is still full when the
        # handshake is counted: a query then would be dropped (queue_full, rightly),
        # so the last query is sent once the queue has gone to the new collector.
        again = Capture(workdir, name="again").start()

        def written(expected: float, what: str) -> None:
            try:
                wait_for(lambda: value(metrics(server), "meshdns_dnstap_written_total")
                         == expected, 15, what)
            except AssertionError as exc:  # say what meshdns and the collector saw
                seen = "\n".join(line for line in metrics(server).splitlines()
                                 if line.startswith("meshdns_dnstap"))
                raise AssertionError(f"{exc}\n{seen}\ncollector: {again.log()[-2000:]}\n"
                                     f"meshdns: {server.log()[-4000:]}") from None

        try:
            wait_for(lambda: value(metrics(server), "meshdns_dnstap_connections_total") == 2,
                     15, "a reconnection")
            written(40 + 2 * queue, "the queue written to the new collector")
            text = metrics(server)
            assert value(text, "meshdns_dnstap_queued") == 0
            assert value(text, "meshdns_dnstap_dropped_total", '{reason="queue_full"}') \
                == 2 * (after - queue)  # nothing more dropped on the way
            last = ask(server.dns_addr, MESH_NAME, tcp=True)
            written(40 + 2 * queue + 2, "the last query written")
            assert accounted(metrics(server)) == total + 2
        finally:
            server.stop()
            again.stop()
        frames = read_capture(again.path)
        assert len(frames) == 2 * queue + 2
        assert frames[-1].message.response_message == last.reply
        assert frames[-1].message.socket_protocol == pb.TCP
    finally:
        server.stop()
        capture.stop()


def test_stalled_collector_never_slows_dns(workdir: Path) -> None:
    """A collector that stops reading (SIGSTOP) fills the socket, then the queue:
    queries are answered all along, the surplus is dropped and counted, and once it
    reads again the stream goes on on the same connection."""
    capture = Capture(workdir).start()
    server = meshdns_with_dnstap(workdir, {"socket": str(capture.socket), "queue_size": 100})
    assert capture.proc is not None
    try:
        server.start()
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_connected") == 1, 10,
                 "the collector's handshake")
        capture.proc.send_signal(signal.SIGSTOP)
        n = 0
        try:
            # Bounded: past a few MB of socket buffers the queue overflows.
            for n in range(1, 20001):
                s = ask(server.dns_addr, MESH_NAME)
                assert dns.message.from_wire(s.reply).answer
                if n % 500 == 0 and value(metrics(server), "meshdns_dnstap_dropped_total",
                                          '{reason="queue_full"}') > 0:
                    break
            text = metrics(server)
            assert value(text, "meshdns_dnstap_dropped_total", '{reason="queue_full"}') > 0
            assert value(text, "meshdns_dnstap_connected") == 1  # slow, not gone
            assert accounted(text) == 2 * n
        finally:
            capture.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: value(metrics(server), "meshdns_dnstap_queued") == 0, 15,
                 "the queue to drain")
        text = metrics(server)
        assert value(text, "meshdns_dnstap_connections_total") == 1
        written = value(text, "meshdns_dnstap_written_total")
    finally:
        server.stop()
        capture.stop()
    assert len(read_capture(capture.path)) == written


# Peers as the transports give them, with the (family, address, port) dnstap must carry.
PEERS: list[tuple[Any, tuple[int, bytes, int]]] = [
    (("127.0.0.1", 5353), (pb.INET, socket.inet_aton("127.0.0.1"), 5353)),
    (("10.1.2.3", 53), (pb.INET, socket.inet_aton("10.1.2.3"), 53)),
    (("fd00::7", 40000, 0, 0), (pb.INET6, socket.inet_pton(socket.AF_INET6, "fd00::7"), 40000)),
    (("::ffff:10.0.0.9", 999, 0, 0), (pb.INET, socket.inet_aton("10.0.0.9"), 999)),
    (struct.pack("=H", socket.AF_INET) + struct.pack("!H", 1234) + socket.inet_aton("127.0.0.5")
     + bytes(20), (pb.INET, socket.inet_aton("127.0.0.5"), 1234)),  # a raw sockaddr_in
    (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 65535, 0)
     + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + bytes(4),
     (pb.INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 65535)),
]


def reference_frames(entries: list[Any], identity: bytes, version: bytes,
                     messages: tuple[str, ...], known: dict[Any, tuple[int, bytes, int]]
                     ) -> tuple[bytes, int]:
    """The frames protobuf's own serializer makes of ``entries``: each Dnstap message
    built field by field with dnstap-pb (what meshdns's Encoder must equal, byte for byte)."""
    from meshdns.dns.dnstap import EXCHANGE, FORWARDED, QUERY, RESPONSE

    T = pb.Message
    kinds = {EXCHANGE: ("client_query", "client_response"), QUERY: ("client_query", None),
             RESPONSE: (None, "client_response"),
             FORWARDED: ("forwarder_query", "forwarder_response")}
    out, n = b"", 0
    for kind, proto, peer, local, query, reply, t_query, t_reply in entries:
        for side, name in enumerate(kinds[kind]):
            if name is None or name not in messages or (side == 1 and reply is None):
                continue
            frame = pb.Dnstap(identity=identity, version=version, type=pb.Dnstap.MESSAGE)
            m = frame.message
            m.type = T.Type.Value(name.upper())
            m.socket_protocol = proto
            client, server = (local, peer) if kind == FORWARDED else (peer, local)
            if client is not None:
                m.socket_family, m.query_address, m.query_port = known[client]
            if server is not None:
                m.socket_family, m.response_address, m.response_port = known[server]
            m.query_time_sec, m.query_time_nsec = divmod(t_query, 10**9)
            m.query_message = query
            if side == 1:
                m.response_time_sec, m.response_time_nsec = divmod(t_reply, 10**9)
                m.response_message = reply
            data = frame.SerializeToString()
            out += struct.pack("!I", len(data)) + data
            n += 1
    return out, n


@pytest.mark.parametrize("messages", [
    ("client_query", "client_response", "forwarder_query", "forwarder_response"),
    ("client_response",), ("client_query", "forwarder_response")])
def test_encoder_bytes_equal_protobufs_own_serialization(messages: tuple[str, ...]) -> None:
    """The writer joins pre-encoded fields instead of serializing a message object per
    message: every entry kind, address form and length (varints of 1, 2 and 3 bytes)
    gives the very bytes protobuf gives."""
    import random

    from meshdns.dns.dnstap import EXCHANGE, FORWARDED, QUERY, RESPONSE, TCP, UDP, Encoder

    rng = random.Random(26)
    sizes = [0, 1, 12, 60, 127, 128, 200, 1232, 4095, 4096, 16383, 16384, 65535]
    known = dict(PEERS)
    peers = [peer for peer, _ in PEERS]
    for _ in range(200):  # clients from many addresses, a new port (1 to 3 varint bytes) each
        port = rng.choice([rng.randrange(128), rng.randrange(128, 16384),
                           rng.randrange(16384, 65536)])
        if rng.random() < 0.5:
            raw = socket.inet_aton(f"10.{rng.randrange(4)}.{rng.randrange(4)}.{rng.randrange(256)}")
            peer = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + raw + bytes(20)
            known[peer] = (pb.INET, raw, port)
        else:
            raw = socket.inet_pton(socket.AF_INET6, f"fd00::{rng.randrange(1, 9):x}")
            peer = (socket.inet_ntop(socket.AF_INET6, raw), port, 0, 0)
            known[peer] = (pb.INET6, raw, port)
        peers.append(peer)
    entries = []
    for i in range(600):
        kind = rng.choice([EXCHANGE, QUERY, RESPONSE, FORWARDED])
        t = 1_700_000_000 * 10**9 + rng.randrange(10**12)
        entries.append((kind, rng.choice([UDP, TCP]), rng.choice(peers),
                        rng.choice([None, PEERS[0][0], PEERS[2][0]]),
                        rng.randbytes(rng.choice(sizes[:8])),
                        None if kind == QUERY or i % 9 == 0 else rng.randbytes(rng.choice(sizes)),
                        t, t + rng.randrange(3 * 10**9)))
    encoder = Encoder(b"node-a", b"meshdns test", messages)
    got = encoder.encode(entries)
    assert got == reference_frames(entries, b"node-a", b"meshdns test", messages, known)
    assert got[1] == sum(encoder.count(e) for e in entries)  # what the queue counts


def test_encoder_caches_stay_bounded_with_a_new_port_per_query() -> None:
    from meshdns.dns.dnstap import EXCHANGE, MAX_ADDRESSES, UDP, Encoder

    encoder = Encoder(b"a", b"b", ("client_response",))
    t = time.time_ns()
    for n in range(0, 3 * MAX_ADDRESSES, 500):
        entries = [(EXCHANGE, UDP, struct.pack("=H", socket.AF_INET) + struct.pack("!H", p % 65536)
                    + bytes([10, 0, p // 256 % 256, p % 256]) + bytes(20), ("10.0.0.1", 53),
                    b"q", b"r", t, t) for p in range(n, n + 500)]
        assert encoder.encode(entries)[1] == 500
        assert len(encoder._fields) <= MAX_ADDRESSES + 1
        assert len(encoder._hosts) <= MAX_ADDRESSES


@pytest.mark.parametrize(("raw", "error"), [
    ({}, "log.dnstap: set exactly one of socket"),
    ({"socket": "/x.sock", "tcp": "127.0.0.1:6000"}, "log.dnstap: set exactly one of socket"),
    ({"tcp": "127.0.0.1"}, "log.dnstap.tcp: must include a port"),
    ({"tcp": "127.0.0.1:0"}, "log.dnstap.tcp: must name the collector's port"),
    ({"tcp": "collector:6000"}, "log.dnstap.tcp: must be an IP address"),
    ({"socket": "/x.sock", "messages": []}, "log.dnstap.messages: must not be empty"),
    ({"socket": "/x.sock", "messages": ["auth_query"]}, "log.dnstap.messages[0]: must be one"),
    ({"socket": "/x.sock", "queue_size": 0}, "log.dnstap.queue_size: must be an integer"),
    ({"socket": "/x.sock", "identity": "a\nb"}, "log.dnstap.identity: at most 256 bytes"),
    ({"socket": "/x.sock", "format": "json"}, "log.dnstap.format: unknown key"),
    ("on", "log.dnstap: must be a mapping"),
])
def test_bad_dnstap_config_names_the_field(raw: Any, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"log": {"dnstap": raw}}, {})
    assert str(exc.value).startswith(error), str(exc.value)


def test_forwarded_names_have_forwarder_messages_from_a_real_unbound(workdir: Path) -> None:
    """A forwarded query: CLIENT_QUERY, FORWARDER_QUERY and FORWARDER_RESPONSE for each
    upstream exchange (UDP; for a truncated reply UDP then TCP), CLIENT_RESPONSE, with
    the upstream's address and the messages as they went over the wire."""
    if shutil.which("unbound") is None:
        pytest.skip("unbound is not installed")
    from ..fake_upstream import Unbound

    (workdir / "unbound").mkdir()
    capture = Capture(workdir).start()
    with Unbound(workdir / "unbound") as unbound:
        server = meshdns_with_dnstap(workdir, {"socket": str(capture.socket)},
                                     {"upstreams": [unbound.address]})
        try:
            server.start()
            small = ask(server.dns_addr, "www.example.test")
            big = ask(server.dns_addr, "big.example.test", tcp=True)  # > 1232 bytes: TC
            wait_for(lambda: value(metrics(server), "meshdns_dnstap_written_total") == 4 + 6,
                     10, "10 messages written")
        finally:
            server.stop()
            capture.stop()
    frames = read_capture(capture.path)
    T = pb.Message
    assert [f.message.type for f in frames] == [
        T.CLIENT_QUERY, T.FORWARDER_QUERY, T.FORWARDER_RESPONSE, T.CLIENT_RESPONSE,
        T.CLIENT_QUERY, T.FORWARDER_QUERY, T.FORWARDER_RESPONSE,  # UDP: truncated
        T.FORWARDER_QUERY, T.FORWARDER_RESPONSE, T.CLIENT_RESPONSE]  # then TCP
    check_client_messages([frames[0], frames[3]], [small], server.dns_port,
                          socket.gethostname().encode(),
                          f"meshdns {__import__('meshdns').__version__}".encode())
    assert frames[9].message.response_message == big.reply
    assert frames[4].message.query_message == big.query

    def ns(sec: int, nsec: int) -> int:
        return sec * 1_000_000_000 + nsec

    for (fq, fr), client, proto, name in (
            ((frames[1], frames[2]), small, pb.UDP, "www.example.test."),
            ((frames[5], frames[6]), big, pb.UDP, "big.example.test."),
            ((frames[7], frames[8]), big, pb.TCP, "big.example.test.")):
        for m in (fq.message, fr.message):
            assert m.socket_family == pb.INET and m.socket_protocol == proto
            assert m.response_address == socket.inet_aton("127.0.0.1")
            assert m.response_port == unbound.port
        sent = dns.message.from_wire(fq.message.query_message)
        assert sent.question[0].name.to_text() == name
        assert fr.message.query_message == fq.message.query_message
        got = dns.message.from_wire(fr.message.response_message)
        assert got.id == sent.id and got.question == sent.question
        if proto == pb.UDP and name.startswith("big"):
            assert got.flags & dns.flags.TC
        else:
            assert len(got.answer[0]) == (1 if name.startswith("www") else 100)
        t_sent = ns(fq.message.query_time_sec, fq.message.query_time_nsec)
        t_got = ns(fr.message.response_time_sec, fr.message.response_time_nsec)
        assert client.sent_ns <= t_sent <= t_got <= client.received_ns
    assert dns.message.from_wire(small.reply).answer[0][0].address == "192.0.2.10"
