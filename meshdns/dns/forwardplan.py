"""Where forwarded queries go: the forwarding-loop policy and the one owner of the forwarder.

:func:`effective_forward` turns the config into forward zones with the upstreams
to use, refusing any upstream that would loop back to meshdns itself.
:class:`Forwarding` holds the forwarder of the moment (None while there are no
upstreams): the transports, the core's cache hook, the metrics and the API all
ask it, so a SIGHUP that starts, changes or stops forwarding changes one place.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config import Config, DnsConfig, ForwardZone, HostPort
from ..core.answer import ForwardRequest, MessageHandler
from ..resolvconf import read_resolv_conf
from .dnstap import DnstapSink
from .transport import servfail

if TYPE_CHECKING:  # imported when forwarding starts: a process that never forwards
    from .forwarder import Forwarder  # does not pay for importing it


def effective_upstreams(config: Config, bound: list[HostPort] | None = None
                        ) -> tuple[list[HostPort], list[str]]:
    """The "." zone's upstreams (see :func:`effective_forward`) and every refusal."""
    routes, refused = effective_forward(config, bound)
    return root_upstreams(routes), refused


def effective_forward(config: Config, bound: list[HostPort] | None = None, *,
                      read_resolv: bool = True) -> tuple[list[ForwardZone], list[str]]:
    """The forward zones (dns.forward, longest first) with the upstreams to use, and
    the reasons any candidate was refused.

    The "." zone is dns.forward's "." entry, else ``dns.upstreams``, else the
    resolv.conf nameservers (not read unless ``read_resolv``). Any upstream that
    reaches meshdns itself would be a forwarding loop and is refused: one of its
    own listen addresses (``bound`` adds the ports actually bound), or any local
    address on the port of a wildcard listener of the same family (0.0.0.0:53
    also receives what is sent to 127.0.0.1:53 or to the host's own addresses;
    the address 0.0.0.0 itself means "this host"). A zone left with no upstream
    is dropped (its names go to the next shorter zone).
    """
    dns = config.dns
    zones: list[tuple[ForwardZone, str]] = [
        (fz, f"dns.forward[{i}].upstreams") for i, fz in enumerate(dns.forward)]
    if not any(fz.zone == "." for fz in dns.forward):
        if dns.upstreams:
            zones.append((ForwardZone(".", dns.upstreams), "dns.upstreams"))
        elif read_resolv:
            path = dns.resolv_conf
            found = tuple(HostPort(ns, 53) for ns in read_resolv_conf(path).nameservers)
            if found:
                zones.append((ForwardZone(".", found), f"nameserver in {path}"))
    own = list(dict.fromkeys([*dns.listen, *(bound or ())]))
    routes: list[ForwardZone] = []
    refused: list[str] = []
    for fz, source in zones:
        kept: list[HostPort] = []
        for hp in fz.upstreams:
            why = _loop_reason(hp, own)
            if why is not None:
                refused.append(f"upstream {hp} ({source}) {why}: forwarding to it would loop "
                               "back to meshdns, refused")
            elif hp not in kept:
                kept.append(hp)
        if kept:
            routes.append(replace(fz, upstreams=tuple(kept)))
    routes.sort(key=lambda fz: 0 if fz.zone == "." else -(fz.zone.count(".") + 1))
    return routes, refused


def root_upstreams(routes: list[ForwardZone]) -> list[HostPort]:
    return next((list(r.upstreams) for r in routes if r.zone == "."), [])


def describe(routes: list[ForwardZone]) -> str:
    """"10.0.0.10:53" for the "." zone alone, else "cluster.local: 10.96.0.10:53/tcp; .: ..."."""
    if len(routes) == 1 and routes[0].zone == "." and routes[0].protocol == "udp":
        return ", ".join(map(str, routes[0].upstreams))
    return "; ".join(f"{r.zone}: " + ", ".join(map(str, r.upstreams))
                     + ("/tcp" if r.protocol == "tcp" else "") for r in routes)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_local_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` belongs to this host: binding to it succeeds (nothing is sent)."""
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


def _loop_reason(hp: HostPort, own: list[HostPort]) -> str | None:
    addr = _ip(hp.host)
    for listen in own:
        if listen.port != hp.port:
            continue  # port 0 (not bound yet) never matches a configured upstream
        laddr = _ip(listen.host)
        if laddr.version != addr.version:
            continue  # IPv6 listeners are V6ONLY
        if laddr == addr:
            return f"is meshdns's own listen address {listen}"
        if addr.is_unspecified and (laddr.is_loopback or laddr.is_unspecified):
            return f"is {addr}, which reaches meshdns's listen address {listen}"
        if laddr.is_unspecified and _is_local_address(addr):
            return f"is a local address served by meshdns's wildcard listen address {listen}"
    return None


class Forwarding:
    """The forwarder of the moment and its routes; the one place that holds them.

    ``start()`` makes the forwarder when there are routes; ``set_routes`` (SIGHUP)
    starts, changes or closes it; ``close()`` (stop) closes it. Each also sets the
    handler's synchronous cache hook, the only other reference to the forwarder.
    """

    def __init__(self, config: DnsConfig, handler: MessageHandler, routes: list[ForwardZone],
                 refusals: list[str], dnstap: DnstapSink | None = None) -> None:
        self.config = config
        self.handler = handler
        self.dnstap = dnstap
        self.routes, self.refusals = routes, refusals  # effective_forward's
        self.forwarder: Forwarder | None = None

    @property
    def upstreams(self) -> list[HostPort]:
        """The "." zone's upstreams (/v1/resolve shows them)."""
        return root_upstreams(self.routes)

    @property
    def inflight(self) -> int:
        return self.forwarder.inflight if self.forwarder is not None else 0

    def current(self) -> Forwarder | None:
        return self.forwarder

    def start(self) -> None:
        if self.routes and self.forwarder is None:
            from .forwarder import Forwarder

            handler = self.handler
            self.forwarder = Forwarder(self.routes, self.config, handler.tally,
                                       current_zone=lambda: handler.zone)
            if self.dnstap is not None and self.dnstap.forwarder:
                self.forwarder.on_upstream = self.dnstap.forwarded  # FORWARDER_* messages
            # Cached upstream answers go back synchronously, like local ones.
            handler.forward_cached = self.forwarder.answer_cached

    async def set_routes(self, routes: list[ForwardZone]) -> None:
        """Ask these zones from now on (an empty list stops forwarding)."""
        self.routes = routes
        if not routes:
            await self.close()
        elif self.forwarder is not None:
            self.forwarder.set_upstreams(routes)
        else:
            self.start()

    def forward(self, req: ForwardRequest, proto: str, done: Callable[[Any, bytes | None], None],
                ctx: Any) -> None:
        """What the transports call for a forwarded query: ``done(ctx, reply)`` once,
        now or when the upstream answers (Forwarder.submit)."""
        fwd = self.forwarder
        if fwd is None:
            done(ctx, servfail(req.data))
            return
        fwd.submit(req, proto, done, ctx)

    async def close(self) -> None:
        fwd, self.forwarder = self.forwarder, None
        self.handler.forward_cached = None
        if fwd is not None:
            await fwd.close()
