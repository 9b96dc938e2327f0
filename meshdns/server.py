"""Wires config, registry, core, DNS listeners, forwarder and HTTP API together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from . import __version__, logs
from .api.state import ApiContext
from .config import Config, ConfigError, ForwardZone, HostPort, nsid_bytes
from .core.answer import ForwardRequest, MessageHandler, Zone, ZoneSettings
from .core.registry import (
    Registry,
    RegistryError,
    RegistryPolicy,
    VipRange,
    apply_put,
    parse_templates,
)
from .dns.dnstap import DnstapSink
from .dns.drain import DrainState, drain
from .dns.histogram import Histogram
from .dns.metrics import DnsCollector
from .dns.policy import (
    ClientPolicy,
    PolicyCounts,
    listener_policy,
    packed_address,
    view_networks,
)
from .dns.querylog import QueryLog
from .dns.reuseport import steer_by_cpu
from .dns.transport import (
    BatchedUdp,
    Forward,
    TcpDnsProtocol,
    TcpLimits,
    UdpDnsProtocol,
    servfail,
)
from .gcpause import gc_paused
from .metrics import new_metrics_registry
from .resolvconf import read_resolv_conf
from .store import RegistryStore, StateError, load_seed
from .store.metrics import StoreCollector

if TYPE_CHECKING:  # imported when started: a process that never forwards, follows or
    # forks workers does not pay for importing them
    from .api.app import ApiServer
    from .dns.forwarder import Forwarder
    from .etcd.backend import EtcdRegistry
    from .follower import Follower
    from .workers import WorkerPool

log = logging.getLogger("meshdns")

UDP_RCVBUF = 4 * 1024 * 1024


@dataclass
class Listeners:
    udp: list[asyncio.BaseTransport | BatchedUdp] = field(default_factory=list)
    tcp: list[asyncio.AbstractServer] = field(default_factory=list)
    addresses: list[HostPort] = field(default_factory=list)


def dnstap_sink(config: Config) -> DnstapSink | None:
    """log.dnstap's sink (not started); identity: log.dnstap.identity, else dns.nsid,
    else the host name."""
    cfg = config.log.dnstap
    if cfg is None:
        return None
    identity = cfg.identity.encode() if cfg.identity else (nsid_bytes(config.dns)
                                                           or socket.gethostname().encode())
    version = cfg.version if cfg.version is not None else f"meshdns {__version__}"
    return DnstapSink(cfg, identity, version.encode())


def registry_policy(config: Config) -> RegistryPolicy:
    reg = config.registry
    return RegistryPolicy(
        domains=config.dns.domains,
        range4=VipRange.from_cidr(reg.cidr),
        range6=VipRange.from_cidr(reg.cidr6) if reg.cidr6 else None,
        hold_seconds=reg.vip_hold_seconds,
        templates=parse_templates(config.dns.hostname_templates),
        select=config.dns.select,
    )


def effective_upstreams(config: Config, bound: list[HostPort] | None = None
                        ) -> tuple[list[HostPort], list[str]]:
    """The "." zone's upstreams (see :func:`effective_forward`) and every refusal."""
    routes, refused = effective_forward(config, bound)
    root = next((list(r.upstreams) for r in routes if r.zone == "."), [])
    return root, refused


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


def zone_settings(config: Config, forwarding: bool) -> ZoneSettings:
    dns = config.dns
    search = dns.search or read_resolv_conf(dns.resolv_conf).search
    policy = registry_policy(config)
    return ZoneSettings(
        domains=dns.domains, ttl=dns.ttl, negative_ttl=dns.negative_ttl,
        search=tuple(s for s in search if s not in dns.domains),
        range4=policy.range4, range6=policy.range6, forwarding=forwarding,
    )


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


class MeshServer:
    """One meshdns process: ``await start()``, serve, ``await stop()``."""

    def __init__(self, config: Config, worker_id: str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id  # set in a dns.workers process (see workers.py)
        self.workers: WorkerPool | None = None
        self.policy = registry_policy(config)
        self.routes, self.loop_refusals = effective_forward(config)
        self.upstreams = _root(self.routes)
        self.settings = zone_settings(config, forwarding=bool(self.routes))
        self.handler = MessageHandler(Zone(Registry.empty(), self.settings),
                                      config.dns.answer_cache_size, config.dns.cache_size,
                                      nsid_bytes(config.dns))
        self.store = RegistryStore(self.policy, self.settings, self.handler,
                                   config.registry.state_file)
        self.tcp_limits = TcpLimits(config.dns.tcp_max_connections, config.dns.tcp_idle_timeout)
        self.listeners = Listeners()
        self.latency = Histogram()
        self.qlog = QueryLog() if config.log.queries else None
        self.dnstap = dnstap_sink(config)
        # What the listeners put client messages in (None: no client message wanted).
        self.tap = self.dnstap if self.dnstap is not None and self.dnstap.client else None
        self.metrics = new_metrics_registry()
        self.policy_counts = PolicyCounts()
        self.listener_policies: list[ClientPolicy] = []  # access control, rate, views
        if config.dns.views:
            self.handler.set_views([select for _, select in config.dns.views])
        self.dns_metrics = DnsCollector(self.handler, self.tcp_limits, self.latency,
                                        lambda: self.listeners.udp, self.policy_counts)
        self.dns_metrics.dnstap = self.dnstap
        self.metrics.register(self.dns_metrics)
        self.metrics.register(StoreCollector(self.store, self.policy))
        self.forwarder: Forwarder | None = None
        self.api: ApiServer | None = None
        self.follower: Follower | None = None
        self.etcd: EtcdRegistry | None = None
        self.drain_state = DrainState(config.dns.lameduck)
        self.context = ApiContext(config, self.store, self.handler, self.upstreams,
                                  self.metrics, drain=self.drain_state,
                                  client_view=self.client_view)
        self.loaded_from = ""
        self._stopped = asyncio.Event()

    def client_view(self, host: str) -> int:
        """The view (dns.views) DNS answers ``host`` from, as its listeners decide."""
        for policy in self.listener_policies:
            return policy.view(packed_address(host)) if policy.views else 0
        return 0

    @property
    def dns_addresses(self) -> list[HostPort]:
        return self.listeners.addresses

    @property
    def api_address(self) -> HostPort | None:
        return self.api.address if self.api is not None else None

    async def start(self) -> None:
        for reason in self.loop_refusals:
            log.error("%s", reason)
        with gc_paused():
            self.loaded_from = self.store.load_initial(
                self.config.registry.seed_file,
                replica=bool(self.config.registry.follow or self.config.registry.etcd.endpoints))
        # The loaded registry is long-lived and acyclic: keep full collections from
        # rescanning it (with many identical followers they would otherwise all pause at
        # once). Objects allocated from here on are collected as usual.
        gc.freeze()
        if self.dnstap is not None:
            self.dnstap.start()
        if self.routes:
            self._start_forwarder()
        try:
            if self.worker_id is not None:
                # A worker answers nothing before its first registry from the main process:
                # with SO_REUSEPORT the kernel would otherwise hand it queries it gets wrong.
                self.follower = self._new_follower()
                self.follower.start()
                await self.follower.first_sync.wait()
                self._following(self.follower)
            # Imported before binding: once a socket joins the SO_REUSEPORT group the
            # kernel hands it queries, and a worker busy importing would sit on them.
            from .api.app import ApiServer

            for hp in self.config.dns.listen:
                await self._listen(hp)
            self.api = ApiServer(self.context)
            await self.api.start()
            if self.config.registry.follow and self.follower is None:
                self.follower = self._new_follower()
                self.follower.start(self.loaded_from)
                self._following(self.follower)
            if self.config.registry.etcd.endpoints and self.worker_id is None:
                self._start_etcd()
            if self.config.dns.workers > 1 and self.worker_id is None:
                from .workers import WorkerPool

                assert self.api.address is not None
                self.workers = WorkerPool(self.config, self.config.dns.workers)
                await self.workers.start(self.dns_addresses, self.api.address)
                self.context.workers = self.workers
        except BaseException:
            await self.stop()
            raise
        if self.worker_id is not None:
            log.debug("DNS worker %s serving on %s", self.worker_id,
                      ", ".join(map(str, self.dns_addresses)))
            return
        log.info(
            "meshdns %s serving DNS on %s (udp+tcp, %d process%s), API on %s; domains %s; "
            "registry: %d services, revision %d, from %s; upstreams: %s",
            __version__, ", ".join(map(str, self.dns_addresses)), self.config.dns.workers,
            "es" if self.config.dns.workers > 1 else "", self.api_address,
            ", ".join(self.config.dns.domains), len(self.store.registry),
            self.store.revision, self.loaded_from,
            _describe(self.routes) or "none (non-mesh names REFUSED)",
        )

    def _start_forwarder(self) -> None:
        from .dns.forwarder import Forwarder

        self.forwarder = Forwarder(self.routes, self.config.dns, self.handler.tally,
                                   current_zone=lambda: self.handler.zone)
        self.dns_metrics.forwarder = self.context.forwarder = self.forwarder
        if self.dnstap is not None and self.dnstap.forwarder:
            self.forwarder.on_upstream = self.dnstap.forwarded  # FORWARDER_* messages
        # Cached upstream answers go back synchronously, like local ones.
        self.handler.forward_cached = self.forwarder.answer_cached

    def _new_follower(self) -> Follower:
        from .follower import Follower

        return Follower(self.store, self.policy, self.config.registry,
                        self.config.api.max_body_bytes, self.worker_id)

    def _start_etcd(self) -> None:
        """The registry lives in etcd: watch it into the store, send writes to it."""
        from .etcd.backend import EtcdCollector, EtcdRegistry

        self.etcd = EtcdRegistry(self.store, self.policy, self.config.registry)
        self.etcd.start(self.loaded_from)
        self.context.writer = self.etcd
        self.context.follower = self.etcd.mirror  # /readyz: how old the copy is
        self.metrics.register(EtcdCollector(self.etcd))

    def _following(self, follower: Follower) -> None:
        from .follower import FollowerCollector

        self.context.follower = follower
        self.metrics.register(FollowerCollector(follower))

    async def _listen(self, hp: HostPort) -> None:
        """UDP and TCP on one address; port 0 picks one port free for both."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        # On a set port, wherever the platform has it: a successor can bind the same port
        # while this process drains (dns/drain.py). Not on port 0: Linux may then hand
        # out a port another reuseport socket of the same user holds, and the two would
        # split each other's queries (dns.workers > 1 shares its ports on purpose).
        reuse_port = hasattr(socket, "SO_REUSEPORT") and (
            hp.port != 0 or self.config.dns.workers > 1)
        policy = listener_policy(self.config.dns, hp.host, self.policy_counts)
        if policy is not None:
            self.listener_policies.append(policy)
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
                if self.config.dns.workers > 1:
                    self._steer(udp_sock, hp.host)
            except BaseException:
                udp_sock.close()
                tcp_sock.close()
                raise
            transport: asyncio.BaseTransport | BatchedUdp | None = None
            # The query log takes the one-datagram path: batches are not logged.
            if os.environ.get("MESHDNS_UDP_BATCH", "1") != "0" and self.qlog is None:
                with contextlib.suppress(ImportError):  # not Linux: one datagram per callback
                    transport = BatchedUdp(udp_sock, self.handler, self._forward_fn(),
                                           self.latency, policy, self.tap)
            if transport is None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpDnsProtocol(self.handler, self._forward_fn(), self.latency,
                                           self.qlog, policy, self.tap),
                    sock=udp_sock)
            server = await loop.create_server(
                lambda: TcpDnsProtocol(self.handler, self._forward_fn(), self.tcp_limits,
                                       self.latency, self.qlog, policy, self.tap),
                sock=tcp_sock)
            self.listeners.udp.append(transport)
            self.listeners.tcp.append(server)
            self.listeners.addresses.append(HostPort(hp.host, port))
            return
        raise OSError(f"no port free for both UDP and TCP on {hp.host}")

    def _steer(self, udp_sock: socket.socket, host: str) -> None:
        """dns.workers: which process gets a UDP query (dns.worker_steering, reuseport.py)."""
        mode = self.config.dns.worker_steering
        if mode == "auto":
            mode = "cpu" if ipaddress.ip_address(host).is_loopback else "hash"
        steered = False
        if mode == "cpu":
            try:
                steered = steer_by_cpu(udp_sock, self.config.dns.workers)
            except OSError as exc:
                log.warning("dns.workers: cannot steer UDP queries by CPU (%s)", exc)
        if self.worker_id is None:
            log.info("dns.workers: UDP queries on %s go to the process %s", host,
                     "of the CPU they arrive on" if steered
                     else "the kernel's hash of the client address picks")

    def _forward_fn(self) -> Forward:
        return self._forward

    async def _forward(self, req: ForwardRequest, proto: str) -> bytes | None:
        """What the transports await for a forwarded query: the forwarder of the moment
        (a SIGHUP may start, change or keep it)."""
        fwd = self.forwarder
        if fwd is None:
            return servfail(req.data)
        return await fwd.resolve(req, proto)

    async def stop(self) -> None:
        if self.workers is not None:
            await self.workers.stop()
            self.workers = self.context.workers = None
        if self.follower is not None:
            await self.follower.stop()
            self.follower = self.context.follower = None
        if self.etcd is not None:
            await self.etcd.stop()
            self.etcd = self.context.follower = self.context.writer = None
        if self.api is not None:
            await self.api.stop()
            self.api = None
        for server in self.listeners.tcp:
            server.close()
        for conn in list(self.tcp_limits.connections):
            if conn.transport is not None:
                conn.transport.close()
        for transport in self.listeners.udp:
            transport.close()
        for server in self.listeners.tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self.listeners = Listeners()
        if self.forwarder is not None:
            await self.forwarder.close()
            self.forwarder = self.dns_metrics.forwarder = self.context.forwarder = None
        if self.dnstap is not None:
            await self.dnstap.close()  # after the last answer: its messages go out too
        self._stopped.set()

    async def serve_until_signal(self, reload: Callable[[], Config] | None = None,
                                 started: Callable[[MeshServer], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP re-reads the config through ``reload``.
        ``started`` is called once every listener is bound (``serve --ports-file``)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: _spawn(self.reload_from(reload)))
        else:  # a worker: its main process restarts it with the new config
            loop.add_signal_handler(signal.SIGHUP, lambda: None)
        await self.start()
        if started is not None:
            started(self)
        await stop.wait()
        stop.clear()
        draining = asyncio.ensure_future(self.drain())
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait([draining, signalled], return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            log.info("second signal: stopping without draining")
        for task in (draining, signalled):
            task.cancel()
        log.info("shutting down")
        await self.stop()

    async def drain(self) -> None:
        """SIGTERM's lameduck period and drain (dns/drain.py)."""
        fwd = self.forwarder
        await drain(self.drain_state, list(self.listeners.udp), list(self.listeners.tcp),
                    self.tcp_limits, (lambda: fwd.inflight) if fwd is not None else (lambda: 0),
                    finish_within=max(5.0, 2 * self.config.dns.upstream_timeout))

    async def reload_from(self, load: Callable[[], Config]) -> None:
        """SIGHUP: apply what can change safely; a bad file keeps the running config."""
        try:
            await self.reload(load())
        except (ConfigError, StateError, RegistryError, OSError) as exc:
            log.error("SIGHUP: config not reloaded, the running one is kept: %s", exc)

    async def reload(self, new: Config) -> list[str]:
        """Apply ``new``'s log settings, upstreams, search list and (with no state file)
        seed file while serving; log each change, and each other change as needing a
        restart. Returns what was applied."""
        old = self.config
        applied: list[str] = []
        # The seed file only seeds a registry nothing else keeps (no state file, not a
        # follower); read first, so a bad one changes nothing at all.
        specs = None
        if (new.registry.seed_file != old.registry.seed_file and old.registry.state_file is None
                and old.registry.follow is None and new.registry.seed_file is not None):
            specs = load_seed(new.registry.seed_file)
        if (new.log.level, new.log.format) != (old.log.level, old.log.format):
            logs.setup_logging(new.log.level, new.log.format)
            applied.append(f"log {old.log.level}/{old.log.format} -> "
                           f"{new.log.level}/{new.log.format}")
        dns = replace(old.dns, upstreams=new.dns.upstreams, forward=new.dns.forward,
                      search=new.dns.search, resolv_conf=new.dns.resolv_conf)
        candidate = replace(old, dns=dns)
        routes, refusals = effective_forward(candidate, self.dns_addresses)
        settings = zone_settings(candidate, forwarding=bool(routes))
        if routes != self.routes:
            for reason in refusals:
                log.error("%s", reason)
            applied.append("upstreams " + (_describe(self.routes) or "none")
                           + " -> " + (_describe(routes) or "none"))
            self.routes = routes
            self.upstreams = self.context.upstreams = _root(routes)
            if self.forwarder is not None and routes:
                self.forwarder.set_upstreams(routes)
            elif routes:
                self._start_forwarder()
            elif self.forwarder is not None:
                fwd, self.forwarder = self.forwarder, None
                self.handler.forward_cached = None
                self.dns_metrics.forwarder = self.context.forwarder = None
                await fwd.close()
        if settings != self.settings:
            if settings.search != self.settings.search:
                applied.append("search list " + (" ".join(self.settings.search) or "(none)")
                               + " -> " + (" ".join(settings.search) or "(none)"))
            self.settings = settings
            self.store.reconfigure(settings)
        if new.dns.views != old.dns.views and (
                len(self.listener_policies) == len(self.listeners.addresses)):
            # Every listener checks its clients already: the new views apply at once
            # (their caches start empty); else dns.views needs a restart.
            self.handler.set_views([select for _, select in new.dns.views])
            for policy in self.listener_policies:
                policy.set_views(view_networks(new.dns))
            dns = replace(dns, views=new.dns.views)
            applied.append(f"views: {len(old.dns.views)} -> {len(new.dns.views)}")
        registry = old.registry
        if specs is not None:
            reg = await self.store.write(lambda base: apply_put(base, specs, self.policy,
                                                                self.store.clock()))
            registry = replace(old.registry, seed_file=new.registry.seed_file)
            applied.append(f"seed file {old.registry.seed_file} -> {new.registry.seed_file} "
                           f"(revision {reg.revision}, {len(reg)} services)")
        self.config = replace(old, dns=dns, registry=registry,
                              log=replace(old.log, level=new.log.level, format=new.log.format))
        kept = _restart_only_changes(self.config, new)
        for change in applied:
            log.info("SIGHUP: %s", change)
        if kept:
            log.warning("SIGHUP: not applied, needs a restart: %s", ", ".join(kept))
        if not applied and not kept:
            log.info("SIGHUP: config unchanged")
        if self.workers is not None and applied:
            await self.workers.reload(self.config)
        return applied


def _root(routes: list[ForwardZone]) -> list[HostPort]:
    return next((list(r.upstreams) for r in routes if r.zone == "."), [])


def _describe(routes: list[ForwardZone]) -> str:
    """"10.0.0.10:53" for the "." zone alone, else "cluster.local: 10.96.0.10:53/tcp; .: ..."."""
    if len(routes) == 1 and routes[0].zone == "." and routes[0].protocol == "udp":
        return ", ".join(map(str, routes[0].upstreams))
    return "; ".join(f"{r.zone}: " + ", ".join(map(str, r.upstreams))
                     + ("/tcp" if r.protocol == "tcp" else "") for r in routes)


def _restart_only_changes(running: Config, new: Config) -> list[str]:
    """Keys whose new value differs from the running one after a reload."""
    out: list[str] = []
    for section in fields(running):
        old_sec, new_sec = getattr(running, section.name), getattr(new, section.name)
        for f in fields(old_sec):
            if getattr(old_sec, f.name) != getattr(new_sec, f.name):
                out.append(f"{section.name}.{f.name}")
    return out


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _RELOADS.add(task)
    task.add_done_callback(_RELOADS.discard)


_RELOADS: set[asyncio.Future[None]] = set()
