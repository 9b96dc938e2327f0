"""The DNS listeners: UDP and TCP on each dns.listen address, their client policies,
SO_REUSEPORT, and (dns.workers) which process gets a UDP query."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket

from ..config import DnsConfig, HostPort
from ..core.answer import MessageHandler
from .dnstap import DnstapSink
from .histogram import Histogram
from .policy import ClientPolicy, PolicyCounts, listener_policy, packed_address, view_networks
from .querylog import QueryLog
from .reuseport import steer_by_cpu
from .transport import BatchedUdp, Forward, TcpDnsProtocol, TcpLimits, UdpDnsProtocol

log = logging.getLogger("meshdns")

UDP_RCVBUF = 4 * 1024 * 1024


class BindError(OSError):
    """A listen address that cannot be bound, named: "cannot listen on
    127.0.0.1:53/udp: [Errno 98] Address already in use" (errno kept)."""

    def __init__(self, hp: HostPort, proto: str, exc: OSError) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.text = f"cannot listen on {hp}/{proto}: {exc}"

    def __str__(self) -> str:
        return self.text


def _bind(sock: socket.socket, hp: HostPort, proto: str) -> None:
    try:
        sock.bind((hp.host, hp.port))
    except OSError as exc:
        raise BindError(hp, proto, exc) from None


class Listeners:
    """Every listener this process opened: ``await listen(hp)`` each, ``close()`` at stop."""

    def __init__(self, dns: DnsConfig, handler: MessageHandler, forward: Forward,
                 latency: Histogram | None, qlog: QueryLog | None, tap: DnstapSink | None,
                 main_process: bool = True) -> None:
        self.dns = dns
        self.handler = handler
        self.forward = forward
        self.latency = latency
        self.qlog = qlog
        self.tap = tap  # what the listeners put client messages in (None: none wanted)
        self.main_process = main_process  # not a dns.workers process (workers.py)
        self.tcp_limits = TcpLimits(dns.tcp_max_connections, dns.tcp_idle_timeout)
        self.policy_counts = PolicyCounts()
        self.policies: list[ClientPolicy] = []  # access control, rate, views
        self.udp: list[asyncio.BaseTransport | BatchedUdp] = []
        self.tcp: list[asyncio.AbstractServer] = []
        self.addresses: list[HostPort] = []

    def client_view(self, host: str) -> int:
        """The view (dns.views) DNS answers ``host`` from, as its listeners decide."""
        for policy in self.policies:
            return policy.view(packed_address(host)) if policy.views else 0
        return 0

    def set_views(self, dns: DnsConfig) -> bool:
        """New dns.views for every listener; False (nothing changed) unless every
        listener checks its clients already (else dns.views needs a restart)."""
        if len(self.policies) != len(self.addresses):
            return False
        self.handler.set_views([select for _, select in dns.views])
        for policy in self.policies:
            policy.set_views(view_networks(dns))
        return True

    async def listen(self, hp: HostPort) -> None:
        """UDP and TCP on one address; port 0 picks one port free for both."""
        loop = asyncio.get_running_loop()
        dns = self.dns
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        # On a set port, wherever the platform has it: a successor can bind the same port
        # while this process drains (dns/drain.py). Not on port 0: Linux may then hand
        # out a port another reuseport socket of the same user holds, and the two would
        # split each other's queries (dns.workers > 1 shares its ports on purpose).
        reuse_port = hasattr(socket, "SO_REUSEPORT") and (hp.port != 0 or dns.workers > 1)
        policy = listener_policy(dns, hp.host, self.policy_counts)
        if policy is not None:
            self.policies.append(policy)
        for _ in range(50):
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for s in (udp_sock, tcp_sock):
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    if reuse_port:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    s.setblocking(False)
                with contextlib.suppress(OSError):
                    udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _bind(udp_sock, hp, "udp")
                port = udp_sock.getsockname()[1]
                try:
                    _bind(tcp_sock, HostPort(hp.host, port), "tcp")
                except OSError:
                    if hp.port != 0:
                        raise
                    udp_sock.close()
                    tcp_sock.close()
                    continue  # that port is taken for TCP: pick another pair
                tcp_sock.listen(1024)
                if dns.workers > 1:
                    self._steer(udp_sock, hp.host)
            except BaseException:
                udp_sock.close()
                tcp_sock.close()
                raise
            transport: asyncio.BaseTransport | BatchedUdp | None = None
            # The query log takes the one-datagram path: batches are not logged.
            if os.environ.get("MESHDNS_UDP_BATCH", "1") != "0" and self.qlog is None:
                with contextlib.suppress(ImportError):  # not Linux: one datagram per callback
                    transport = BatchedUdp(udp_sock, self.handler, self.forward,
                                           self.latency, policy, self.tap)
            if transport is None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpDnsProtocol(self.handler, self.forward, self.latency,
                                           self.qlog, policy, self.tap),
                    sock=udp_sock)
            server = await loop.create_server(
                lambda: TcpDnsProtocol(self.handler, self.forward, self.tcp_limits,
                                       self.latency, self.qlog, policy, self.tap),
                sock=tcp_sock)
            self.udp.append(transport)
            self.tcp.append(server)
            self.addresses.append(HostPort(hp.host, port))
            return
        raise OSError(f"no port free for both UDP and TCP on {hp.host}")

    def _steer(self, udp_sock: socket.socket, host: str) -> None:
        """dns.workers: which process gets a UDP query (dns.worker_steering, reuseport.py)."""
        mode = self.dns.worker_steering
        if mode == "auto":
            mode = "cpu" if ipaddress.ip_address(host).is_loopback else "hash"
        steered = False
        if mode == "cpu":
            try:
                steered = steer_by_cpu(udp_sock, self.dns.workers)
            except OSError as exc:
                log.warning("dns.workers: cannot steer UDP queries by CPU (%s)", exc)
        if self.main_process:
            log.info("dns.workers: UDP queries on %s go to the process %s", host,
                     "of the CPU they arrive on" if steered
                     else "the kernel's hash of the client address picks")

    async def close(self) -> None:
        """Stop listening, close every TCP connection; the addresses are forgotten."""
        for server in self.tcp:
            server.close()
        for conn in list(self.tcp_limits.connections):
            if conn.transport is not None:
                conn.transport.close()
        for transport in self.udp:
            transport.close()
        for server in self.tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.udp, self.tcp, self.addresses = [], [], []
