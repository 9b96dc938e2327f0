"""A fault-injecting upstream DNS server for the forwarding tests.

UDP and TCP on 127.0.0.1, port 0, its own event loop in a daemon thread. What
it does is chosen per query name (``rules``), else ``default``:

    answer          A records (``addresses``) with ``ttl``; AAAA/other types: NODATA
    nxdomain        NXDOMAIN (with an SOA unless ``soa=False``)
    nodata          NOERROR, no answer, SOA
    refused         REFUSED            servfail   SERVFAIL
    timeout         never answers (UDP and TCP)
    hold            answers once ``release()`` is called (deterministic "slow")
    garbage         7 bytes of junk (then the answer if ``then_answer``)
    wrong_id        the answer with another ID (then the real one if ``then_answer``)
    wrong_question  the answer to another name (then the real one if ``then_answer``)
    other_port      the answer, sent from another source port
    tc              UDP: TC=1 and no records; TCP: the full answer

``delay`` (seconds) postpones any answer. Every query received is recorded
(name, qtype, proto, EDNS payload, DO bit) so tests can count what reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import dns.exception
import dns.message
import dns.query
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, A, DNSRecord

from .support import PortTaken, address_in_use, on_free_ports, stop_process, udp_query

LOCAL = "127.0.0.1"


@dataclass
class Rule:
    action: str = "answer"
    addresses: list[str] = field(default_factory=lambda: ["192.0.2.1"])
    ttl: int = 300
    soa: bool = True
    soa_ttl: int = 3600
    soa_minimum: int = 60
    then_answer: bool = False
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    name: str  # lower case, no trailing dot
    qtype: str
    proto: str
    payload: int | None  # EDNS UDP payload, None without OPT
    dnssec_ok: bool
    id: int
    source_port: int


def _name(record: DNSRecord) -> str:
    return str(record.q.qname).rstrip(".").lower()


class FakeUpstream:
    def __init__(self, default: Rule | None = None) -> None:
        self.default = default or Rule()
        self.rules: dict[str, Rule] = {}
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._release: asyncio.Event | None = None
        self._udp: Any = None
        self._tcp: asyncio.AbstractServer | None = None
        self._side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # for other_port
        self._side.bind((LOCAL, 0))
        self._side.setblocking(False)
        self.port = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self._release = asyncio.Event()
        for _ in range(50):  # one port free for both UDP and TCP
            udp, _ = await self.loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(LOCAL, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, LOCAL, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise OSError("no free port pair")

    def stop(self) -> None:
        """Close both listeners (later queries get ICMP port unreachable / RST)."""
        if not self.loop.is_running():
            return

        async def close() -> None:
            if self._release is not None:
                self._release.set()
            if self._udp is not None:
                self._udp.close()
            if self._tcp is not None:
                self._tcp.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self._side.close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ test API

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    def rule(self, name: str, action: str = "answer", **kw: Any) -> Rule:
        rule = Rule(action, **kw)
        self.rules[name.rstrip(".").lower()] = rule
        return rule

    def release(self) -> None:
        """Let every held (and future ``hold``) query be answered."""
        assert self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)

    def count(self, name: str | None = None, proto: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.received
                       if (name is None or r.name == name.rstrip(".").lower())
                       and (proto is None or r.proto == proto))

    def last(self) -> Received:
        with self._lock:
            return self.received[-1]

    # ------------------------------------------------------------ answering

    def _record(self, query: DNSRecord, proto: str, port: int) -> Rule:
        opt = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
        received = Received(_name(query), QTYPE.get(query.q.qtype), proto,
                            opt[0].rclass if opt else None,
                            bool(opt and opt[0].ttl & 0x8000), query.header.id, port)
        with self._lock:
            self.received.append(received)
        return self.rules.get(received.name, self.default)

    def answer(self, query: DNSRecord, rule: Rule, proto: str, action: str) -> bytes:
        """The reply to ``query`` for ``action`` (answer/nxdomain/nodata/...)."""
        reply = query.reply()
        reply.header.rd = query.header.rd
        name = str(query.q.qname)
        zone = name.split(".", 1)[1] if name.count(".") > 1 else name
        if action in ("refused", "servfail"):
            reply.header.rcode = RCODE.REFUSED if action == "refused" else RCODE.SERVFAIL
        elif action == "tc" and proto == "udp":
            reply.header.tc = 1
        elif action in ("nxdomain", "nodata"):
            if action == "nxdomain":
                reply.header.rcode = RCODE.NXDOMAIN
            if rule.soa:
                reply.add_auth(RR(zone, QTYPE.SOA, ttl=rule.soa_ttl, rdata=SOA(
                    "ns." + zone, "host." + zone, (1, 3600, 600, 86400, rule.soa_minimum))))
        elif query.q.qtype in (QTYPE.A, QTYPE.ANY):
            for addr in rule.addresses:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=rule.ttl, rdata=A(addr)))
        elif rule.soa:
            reply.add_auth(RR(zone, QTYPE.SOA, ttl=rule.soa_ttl, rdata=SOA(
                "ns." + zone, "host." + zone, (1, 3600, 600, 86400, rule.soa_minimum))))
        if any(rr.rtype == QTYPE.OPT for rr in query.ar):
            reply.add_ar(EDNS0(udp_len=1232))
        return bytes(reply.pack())

    def replies(self, data: bytes, proto: str, port: int) -> tuple[Rule, list[bytes]]:
        query = DNSRecord.parse(data)
        rule = self._record(query, proto, port)
        action = rule.action
        if action in ("timeout", "hold"):
            return rule, []
        real = self.answer(query, rule, proto, "answer" if action in (
            "garbage", "wrong_id", "wrong_question", "other_port") else action)
        if action == "garbage":
            bad = b"\x00garbag"
        elif action == "wrong_id":
            bad = bytes(((data[0] + 1) & 0xFF, data[1])) + real[2:]
        elif action == "wrong_question":
            other = DNSRecord.question("spoofed.invalid", "A")
            other.header.id = query.header.id
            bad = self.answer(other, rule, proto, "answer")
        else:
            return rule, [real]
        return rule, [bad, real] if rule.then_answer else [bad]

    async def _hold(self, rule: Rule) -> None:
        if rule.delay:
            await asyncio.sleep(rule.delay)
        if rule.action == "hold":
            assert self._release is not None
            await self._release.wait()

    async def _answer_udp(self, data: bytes, addr: Any) -> None:
        try:
            rule, out = self.replies(data, "udp", addr[1])
        except Exception:
            return
        await self._hold(rule)
        if rule.action == "hold":
            query = DNSRecord.parse(data)
            out = [self.answer(query, rule, "udp", "answer")]
        for reply in out:
            if rule.action == "other_port":
                self._side.sendto(reply, addr)
            elif self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                rule, out = self.replies(data, "tcp", writer.get_extra_info("peername")[1])
                await self._hold(rule)
                if rule.action == "timeout":
                    await asyncio.sleep(3600)
                if rule.action == "hold":
                    out = [self.answer(DNSRecord.parse(data), rule, "tcp", "answer")]
                for reply in out:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.tasks: set[asyncio.Task[None]] = set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        task = asyncio.ensure_future(self.fake._answer_udp(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Clock:
    """A hand-moved clock for the forwarder's cache (``forwarder.clock = Clock()``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll a condition (bounded): used to order events, never to measure time."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def closed_port() -> int:
    """A loopback UDP+TCP port nothing listens on (ICMP unreachable / RST at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- a real unbound on loopback

# The server clause every test unbound starts from: one address on loopback, in
# the foreground, no chroot, pidfile, syslog or privileges to drop, iterator only.
UNBOUND_SERVER = """\
server:
    interface: {host}
    port: {port}
    do-ip6: no
    do-daemonize: no
    chroot: ""
    username: ""
    pidfile: ""
    directory: "{dir}"
    logfile: ""
    use-syslog: no
    verbosity: 0
    num-threads: 1
    so-reuseport: no
    interface-automatic: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
"""

UNBOUND_CONF = UNBOUND_SERVER + """\
    do-not-query-localhost: yes
    # Local data only. "." static makes every other name NXDOMAIN from unbound
    # itself: it never iterates, so it never contacts any address at all.
    local-zone: "." static
    local-zone: "example.test." static
{data}
remote-control:
    control-enable: no
"""

UNBOUND_DATA = [
    "example.test. 3600 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 30",
    "example.test. 3600 IN NS ns.example.test.",
    "www.example.test. 300 IN A 192.0.2.10",
    "www.example.test. 300 IN AAAA 2001:db8::10",
    "api.example.test. 300 IN A 192.0.2.11",
    "alias.example.test. 300 IN CNAME www.example.test.",
    "txt.example.test. 300 IN TXT served-by-the-test-unbound",
] + [f"big.example.test. 300 IN A 192.0.2.{i}" for i in range(1, 101)]  # > 1232 bytes


class Unbound:
    """unbound serving ``UNBOUND_DATA`` on 127.0.0.1:<free port>, in the foreground.

    unbound cannot bind port 0, so without ``port`` it is given a free port and, should
    another process take that port first, a new one (:func:`on_free_ports`). Whatever
    goes wrong while it starts, the process is stopped before the error goes on.

    Subclasses (a cluster's DNS in test_cname_chase.py) write their own config
    (:meth:`write_conf`) and say when they are up (:meth:`ready`)."""

    def __init__(self, directory: Path, binary: str = "unbound", port: int | None = None,
                 data: list[str] | None = None, host: str = LOCAL) -> None:
        self.dir = Path(directory)
        self.binary = binary
        self.host = host
        self.fixed_port = port
        self.port = port or 0  # known once started, unless given
        self.data = data or UNBOUND_DATA
        self.conf = self.dir / "unbound.conf"
        self.log = self.dir / "unbound.log"
        self.proc: Any = None

    def write_conf(self, data: list[str]) -> None:
        lines = "\n".join(f'    local-data: "{rr}"' for rr in data)
        self.conf.write_text(UNBOUND_CONF.format(host=self.host, port=self.port, dir=self.dir,
                                                 data=lines))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def ask(self, name: str, rdtype: str = "A", timeout: float = 3.0) -> dns.message.Message:
        return udp_query(dns.message.make_query(name, rdtype), self.host, self.port, timeout)

    def ready(self) -> bool:
        """Up: it answers (any answer) within 0.2 s."""
        self.ask("www.example.test", timeout=0.2)
        return True

    def start(self, wait: float = 15.0) -> Self:
        if self.fixed_port is not None:
            return self._start_on(self.fixed_port, wait)
        return on_free_ports(1, lambda ports: self._start_on(ports[0], wait))

    def _start_on(self, port: int, wait: float) -> Self:
        self.port = port
        self.write_conf(self.data)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([self.binary, "-d", "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(wait)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if address_in_use(text) and self.fixed_port is None:
                    raise PortTaken(text)
                raise RuntimeError(f"unbound exited: {text}")
            try:
                if self.ready():
                    return
            except (OSError, dns.exception.Timeout):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("unbound did not answer in time: " + self.log.read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
