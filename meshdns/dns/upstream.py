"""One upstream resolver: how to ask it (UDP, TCP), how healthy it is, what it cost.

UDP queries go out from the upstream's pool of connected sockets on random ports
(udppool.py, RFC 5452), which draws each query's random ID; the kernel drops
datagrams from any other address or port. A reply counts only if ID and question
match too; anything else is dropped, counted, and the wait goes on until the
attempt's deadline. A reply that matches but does not parse (reply.py: bad
framing, a compression loop) ends the attempt as ``malformed``: the upstream
lies or is broken, the next one is asked. TCP goes over the upstream's reused,
pipelined connections (tcpupstream.py).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..config import HostPort
from ..core.answer import RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_REFUSED, RCODE_SERVFAIL
from .histogram import Histogram
from .reply import MALFORMED, ParsedReply, ReplyRejected, parse_reply
from .scrub import Owned
from .tcpupstream import CannotConnect, ConnectionDied, TcpPool
from .udppool import DEFAULT_PORTS, UdpPorts

# Results of one attempt, the `result` label of upstream_requests_total.
OK, TRUNCATED, SERVFAIL, REFUSED, RCODE = "ok", "truncated", "servfail", "refused", "rcode"
TIMEOUT, ERROR, MALFORMED_REPLY = "timeout", "error", "malformed"
RESULTS = (OK, TRUNCATED, SERVFAIL, REFUSED, RCODE, TIMEOUT, ERROR, MALFORMED_REPLY)
UNHEALTHY = frozenset({REFUSED, RCODE, TIMEOUT, ERROR, MALFORMED_REPLY})  # SERVFAIL may be the name's fault

# upstream_request_duration_seconds buckets (upper bounds; one more for +Inf).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

BACKOFF_FIRST = 5.0  # seconds an upstream is moved to the back after a failure
BACKOFF_MAX = 60.0  # doubling per consecutive failure, up to this

Reject = Callable[[str], None]


class UpstreamStats:
    """Plain counters for the metrics collector to read at scrape time."""

    __slots__ = ("duration", "requests")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # result -> attempts
        self.duration = Histogram(DURATION_BUCKETS)

    def observe(self, result: str, seconds: float) -> None:
        self.requests[result] = self.requests.get(result, 0) + 1
        self.duration.observe(seconds)


class Upstream:
    """An upstream address with its health: consecutive failures push it to the back."""

    __slots__ = ("address", "down_until", "failures", "family", "label", "ports", "sockaddr",
                 "stats", "tcp", "udp")

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self.label = str(address)
        self.family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.sockaddr = (address.host, address.port)
        self.failures = 0
        self.down_until = 0.0
        self.stats = UpstreamStats()
        self.tcp: TcpPool | None = None  # its reused TCP connections, once TCP is used
        self.udp: UdpPorts | None = None  # its UDP source ports, once UDP is used
        self.ports = DEFAULT_PORTS  # how many (the forwarder sets it: dns.upstream_ports)

    def retire(self) -> None:
        """No longer configured: close its sockets once nothing is in flight on them."""
        if self.tcp is not None:
            self.tcp.retire()
        if self.udp is not None:
            self.udp.retire()

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.udp is not None:
            self.udp.close()

    def record(self, result: str, seconds: float, now: float) -> str | None:
        """Count one attempt; "down" or "up" when the upstream's health just changed."""
        self.stats.observe(result, seconds)
        if result in UNHEALTHY:
            self.failures += 1
            self.down_until = now + min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
            return "down" if self.failures == 1 else None
        if result != TRUNCATED and self.failures:
            self.failures = 0
            self.down_until = 0.0
            return "up"
        return None


def try_order(upstreams: list[Upstream], now: float, probe_hold: float) -> list[Upstream]:
    """Healthy upstreams in configured order, then the resting ones, soonest back first.

    A resting upstream whose backoff is over is probed by one query: it takes its
    configured place again for this query only (others keep it at the back for
    ``probe_hold``) until an answer proves it healthy.
    """
    healthy: list[Upstream] = []
    resting: list[Upstream] = []
    for up in upstreams:
        if up.failures == 0:
            healthy.append(up)
        elif up.down_until <= now:
            up.down_until = now + probe_hold
            healthy.append(up)
        else:
            resting.append(up)
    resting.sort(key=lambda u: u.down_until)
    return healthy + resting


@dataclass(slots=True)
class Attempt:
    result: str
    reply: ParsedReply | None = None
    data: bytes | None = None  # the reply as the upstream sent it (for log.dnstap)
    sent: bytes | None = None  # the query as sent over TCP (the connection may give
    # it another ID, one not in flight on it)


def classify(parsed: ParsedReply, tc: bool) -> str:
    if tc:
        return TRUNCATED
    if parsed.rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
        return OK
    if parsed.rcode == RCODE_SERVFAIL:
        return SERVFAIL
    if parsed.rcode == RCODE_REFUSED:
        return REFUSED
    return RCODE


async def query_tcp(up: Upstream, wire: bytes, question: bytes, deadline: float,
                    reject: Reject, owned: Owned | None = None) -> Attempt:
    """One query on the upstream's reused TCP connections (tcpupstream.py)."""
    pool = up.tcp
    if pool is None:
        pool = up.tcp = TcpPool(up.address.host, up.address.port, reject)
    try:
        sent, data = await pool.query(wire, question, deadline)
    except TimeoutError:
        return Attempt(TIMEOUT)
    except (OSError, CannotConnect, ConnectionDied):
        return Attempt(ERROR)
    except ReplyRejected as exc:
        reject(exc.reason)
        return Attempt(ERROR)
    attempt = _parsed(data, question, owned, reject, False)
    attempt.sent = sent
    return attempt


def judge(data: bytes, question_len: int, owned: Owned | None, reject: Reject,
          tc: bool) -> tuple[str, ParsedReply | None]:
    """The result of an attempt whose reply to our query is ``data``, and the reply
    parsed whole and scrubbed; ``malformed`` (counted as a rejected reply) when any of it
    does not parse. A truncated reply is not used (TCP is asked next), so it need not
    parse."""
    if tc:
        return TRUNCATED, None
    try:
        parsed = parse_reply(data, question_len, owned)
    except ReplyRejected:
        reject(MALFORMED)
        return MALFORMED_REPLY, None
    return classify(parsed, False), parsed


def _parsed(data: bytes, question: bytes, owned: Owned | None, reject: Reject,
            tc: bool) -> Attempt:
    result, parsed = judge(data, len(question), owned, reject, tc)
    return Attempt(result, parsed, data)
