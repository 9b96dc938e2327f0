"""Who may ask, and how fast: access control and response rate limiting per listener.

Access control, like unbound's ``access-control`` and CoreDNS ``acl``: a client
address in ``dns.deny`` is refused, else one in ``dns.allow`` is served, else it is
refused. ``dns.allow`` unset means the default of the listener: loopback clients
on a loopback listener; on any other listener also the private ranges a cluster
uses (RFC 1918, RFC 6598 shared space, IPv6 ULA and link-local). A refused query
gets REFUSED with Extended DNS Error 18 (Prohibited). ``dns.allow_recursion``
narrows who gets forwarded names (the rest still get mesh names), like unbound's
``allow_snoop`` against ``refuse``.

Response rate limiting for UDP, like Knot's and BIND's RRL: at most
``dns.rate_limit`` replies per second to one client prefix (/24 for IPv4, /56 for
IPv6). Past it a reply is dropped, except every ``dns.rate_limit_slip``-th one,
which is sent as an empty TC=1 reply so a real client retries over TCP (never
limited). Off by default, as CoreDNS and NodeLocal DNSCache ship; when on, it
leaves loopback listeners alone unless ``dns.rate_limit_loopback``.

Verdicts are remembered per client address (bounded), so the per-datagram cost is
one slice and one dict lookup; a listener with nothing to check has no policy at
all and pays nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import DnsConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                 ipaddress.ip_network("::1/128"))
PRIVATE: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 (shared address space, some CNIs' pod ranges)
    "fc00::/7", "fe80::/10",  # ULA, link-local
))

ALLOW, LOCAL_ONLY, REFUSE, DROP, SLIP = 0, 1, 2, 3, 4
MAX_REMEMBERED = 65_536  # client addresses / prefixes whose verdict is kept


def is_loopback_listener(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def default_allow(listen_host: str) -> tuple[Network, ...]:
    return LOOPBACK if is_loopback_listener(listen_host) else LOOPBACK + PRIVATE


@dataclass
class PolicyCounts:
    """What the policies of every listener did (plain ints, read by /metrics)."""

    refused: int = 0  # queries refused by access control
    rate_dropped: int = 0  # replies dropped by rate limiting
    rate_slipped: int = 0  # replies sent TC=1 instead (slip)


@dataclass
class ClientPolicy:
    """One listener's access control and rate limit."""

    allow: Sequence[Network]
    deny: Sequence[Network] = ()
    allow_recursion: Sequence[Network] | None = None  # None: whoever is allowed
    rate: int = 0  # replies per second per client prefix; 0: no limit
    slip: int = 2
    counts: PolicyCounts = field(default_factory=PolicyCounts)
    # dns.views: the client networks of each view (view i + 1); first match wins.
    views: Sequence[Sequence[Network]] = ()
    clock: Callable[[], float] = time.monotonic
    _verdicts: dict[bytes, int] = field(default_factory=dict, repr=False)
    _view_of: dict[bytes, int] = field(default_factory=dict, repr=False)
    # prefix -> [second, replies in it, replies over the limit in it]
    _buckets: dict[bytes, list[int]] = field(default_factory=dict, repr=False)

    def _verdict(self, packed: bytes) -> int:
        addr = ipaddress.ip_address(packed)
        if any(addr in net for net in self.deny if net.version == addr.version):
            return REFUSE
        if not any(addr in net for net in self.allow if net.version == addr.version):
            return REFUSE
        rec = self.allow_recursion
        if rec is not None and not any(addr in net for net in rec if net.version == addr.version):
            return LOCAL_ONLY
        return ALLOW

    def admit(self, packed: bytes, udp: bool = True, count: bool = True) -> int:
        """ALLOW, LOCAL_ONLY (mesh names only), REFUSE, DROP or SLIP for a query from the
        address ``packed`` (4 or 16 bytes); refusals and rate limiting counted."""
        verdict = self._verdicts.get(packed)
        if verdict is None:
            if len(self._verdicts) >= MAX_REMEMBERED:
                self._verdicts.clear()
            verdict = self._verdicts[packed] = self._verdict(packed)
        if verdict == REFUSE:
            self.counts.refused += count
            return REFUSE
        if self.rate and udp:
            limited = self._limit(packed)
            if limited != ALLOW:
                return limited
        return verdict

    def view(self, packed: bytes) -> int:
        """The view of a client (dns.views: 1, 2, ...; 0: the default, dns.select)."""
        view = self._view_of.get(packed)
        if view is None:
            if len(self._view_of) >= MAX_REMEMBERED:
                self._view_of.clear()
            addr = ipaddress.ip_address(packed)
            view = next((i + 1 for i, nets in enumerate(self.views)
                         if any(addr in net for net in nets if net.version == addr.version)), 0)
            self._view_of[packed] = view
        return view

    def set_views(self, views: Sequence[Sequence[Network]]) -> None:
        self.views = views
        self._view_of.clear()

    def _limit(self, packed: bytes) -> int:
        prefix = packed[:3] if len(packed) == 4 else packed[:7]  # /24, /56
        now = int(self.clock())
        bucket = self._buckets.get(prefix)
        if bucket is None or bucket[0] != now:
            if bucket is None and len(self._buckets) >= MAX_REMEMBERED:
                self._buckets = {p: b for p, b in self._buckets.items() if b[0] == now}
                if len(self._buckets) >= MAX_REMEMBERED:
                    self._buckets.clear()
            bucket = self._buckets[prefix] = [now, 0, 0]
        bucket[1] += 1
        if bucket[1] <= self.rate:
            return ALLOW
        bucket[2] += 1
        if self.slip and bucket[2] % self.slip == 0:
            self.counts.rate_slipped += 1
            return SLIP
        self.counts.rate_dropped += 1
        return DROP


def packed_address(host: str) -> bytes:
    """The 4- or 16-byte form of a textual address (IPv4-mapped IPv6 as IPv4)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


def sockaddr_address(name: memoryview | bytes) -> bytes:
    """The address bytes of a raw ``sockaddr_in``/``sockaddr_in6`` (as recvmmsg wrote it)."""
    if int.from_bytes(name[0:2], sys.byteorder) == socket.AF_INET:
        return bytes(name[4:8])
    raw = bytes(name[8:24])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return raw[12:]
    return raw


def listener_policy(dns: DnsConfig, listen_host: str, counts: PolicyCounts
                    ) -> ClientPolicy | None:
    """The policy of one listener; None when it has nothing to check (a loopback
    listener with the default access control and no rate limit on it)."""
    loopback = is_loopback_listener(listen_host)
    rate = dns.rate_limit if (not loopback or dns.rate_limit_loopback) else 0
    if (loopback and dns.allow is None and not dns.deny and dns.allow_recursion is None
            and not rate and not dns.views):
        return None
    allow = default_allow(listen_host) if dns.allow is None else \
        tuple(ipaddress.ip_network(n) for n in dns.allow)
    recursion = None if dns.allow_recursion is None else \
        tuple(ipaddress.ip_network(n) for n in dns.allow_recursion)
    return ClientPolicy(allow, tuple(ipaddress.ip_network(n) for n in dns.deny), recursion,
                        rate, dns.rate_limit_slip, counts, views=view_networks(dns))


def view_networks(dns: DnsConfig) -> tuple[tuple[Network, ...], ...]:
    return tuple(tuple(ipaddress.ip_network(n) for n in clients) for clients, _ in dns.views)
