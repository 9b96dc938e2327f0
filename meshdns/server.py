"""Wires config, registry, core, DNS listeners, forwarder and HTTP API together, and
orders their start and stop. Listening is dns/listen.py, where forwarded queries go
dns/forwardplan.py, SIGHUP reload.py."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import __version__
from .api.state import ApiContext, FollowStatus, RegistryWriter
from .config import Config, ConfigError, HostPort, nsid_bytes
from .core.answer import MessageHandler, Zone, ZoneSettings
from .core.registry import Registry, RegistryError
from .dns.dnstap import dnstap_sink
from .dns.drain import DrainState, drain
from .dns.forwardplan import Forwarding, describe, effective_forward
from .dns.histogram import Histogram
from .dns.listen import Listeners
from .dns.metrics import DnsCollector
from .dns.querylog import QueryLog
from .dns.transport import TcpLimits
from .gcpause import gc_paused
from .metrics import new_metrics_registry
from .reload import reload as reload_config
from .settings import registry_policy, zone_settings
from .store import RegistryStore, StateError
from .store.metrics import StoreCollector

if TYPE_CHECKING:  # imported when started: a process that never follows or forks
    # workers does not pay for importing them
    from .api.app import ApiServer
    from .dns.forwarder import Forwarder
    from .etcd.backend import EtcdRegistry
    from .follower import Follower
    from .workers import WorkerPool

log = logging.getLogger("meshdns")


class MeshServer:
    """One meshdns process: ``await start()``, serve, ``await stop()``.

    Each piece is held here once; what starts later or changes on SIGHUP (the
    forwarder, follower, etcd writer, workers) is read from here when needed (the
    API through :class:`~meshdns.api.state.Running`), never copied into others."""

    def __init__(self, config: Config, worker_id: str | None = None) -> None:
        self.config = config
        self.worker_id = worker_id  # set in a dns.workers process (see workers.py)
        self.workers: WorkerPool | None = None
        self.follower: Follower | None = None
        self.etcd: EtcdRegistry | None = None
        self.api: ApiServer | None = None
        self.policy = registry_policy(config)
        self.dnstap = dnstap_sink(config)
        dns = config.dns
        routes, refusals = effective_forward(config)
        settings = zone_settings(config, forwarding=bool(routes))
        self.handler = MessageHandler(Zone(Registry.empty(), settings), dns.answer_cache_size,
                                      dns.cache_size, nsid_bytes(dns))
        self.forwarding = Forwarding(dns, self.handler, routes, refusals, self.dnstap)
        self.store = RegistryStore(self.policy, settings, self.handler,
                                   config.registry.state_file)
        if dns.views:
            self.handler.set_views([select for _, select in dns.views])
        self.latency = Histogram()
        tap = self.dnstap if self.dnstap is not None and self.dnstap.client else None
        self.listeners = Listeners(dns, self.handler, self.forwarding.forward, self.latency,
                                   QueryLog() if config.log.queries else None, tap,
                                   main_process=worker_id is None)
        self.metrics = new_metrics_registry()
        self.metrics.register(DnsCollector(
            self.handler, self.listeners.tcp_limits, self.latency, lambda: self.listeners.udp,
            self.listeners.policy_counts, self.forwarding.current, self.dnstap))
        self.metrics.register(StoreCollector(self.store, self.policy))
        self.drain_state = DrainState(dns.lameduck)
        self.context = ApiContext(config, self.store, self.handler, self.metrics,
                                  self.drain_state, self.listeners.client_view, _Running(self))
        self.loaded_from = ""

    @property
    def forwarder(self) -> Forwarder | None:
        return self.forwarding.forwarder

    @property
    def upstreams(self) -> list[HostPort]:
        return self.forwarding.upstreams

    @property
    def settings(self) -> ZoneSettings:
        return self.store.settings

    @property
    def tcp_limits(self) -> TcpLimits:
        return self.listeners.tcp_limits

    @property
    def dns_addresses(self) -> list[HostPort]:
        return self.listeners.addresses

    @property
    def api_address(self) -> HostPort | None:
        return self.api.address if self.api is not None else None

    async def start(self) -> None:
        for reason in self.forwarding.refusals:
            log.error("%s", reason)
        registry = self.config.registry
        with gc_paused():
            self.loaded_from = self.store.load_initial(
                registry.seed_file, replica=bool(registry.follow or registry.etcd.endpoints))
        # The loaded registry is long-lived and acyclic: keep full collections from
        # rescanning it (with many identical followers they would otherwise all pause at
        # once). Objects allocated from here on are collected as usual.
        gc.freeze()
        if self.dnstap is not None:
            self.dnstap.start()
        self.forwarding.start()
        try:
            if self.worker_id is not None:
                # A worker answers nothing before its first registry from the main process:
                # with SO_REUSEPORT the kernel would otherwise hand it queries it gets wrong.
                await self._follow().first_sync.wait()
            # Imported before binding: once a socket joins the SO_REUSEPORT group the
            # kernel hands it queries, and a worker busy importing would sit on them.
            from .api.app import ApiServer

            for hp in self.config.dns.listen:
                await self.listeners.listen(hp)
            self.api = ApiServer(self.context)
            await self.api.start()
            if registry.follow and self.follower is None:
                self._follow(self.loaded_from)
            if registry.etcd.endpoints and self.worker_id is None:
                self._start_etcd()
            if self.config.dns.workers > 1 and self.worker_id is None:
                from .workers import WorkerPool

                assert self.api.address is not None
                self.workers = WorkerPool(self.config, self.config.dns.workers)
                await self.workers.start(self.dns_addresses, self.api.address)
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
            describe(self.forwarding.routes) or "none (non-mesh names REFUSED)",
        )

    def _follow(self, restored_from: str = "") -> Follower:
        from .follower import Follower, FollowerCollector

        self.follower = Follower(self.store, self.policy, self.config.registry,
                                 self.config.api.max_body_bytes, self.worker_id)
        self.follower.start(restored_from)
        self.metrics.register(FollowerCollector(self.follower))
        return self.follower

    def _start_etcd(self) -> None:
        """The registry lives in etcd: watch it into the store, send writes to it."""
        from .etcd.backend import EtcdCollector, EtcdRegistry

        self.etcd = EtcdRegistry(self.store, self.policy, self.config.registry)
        self.etcd.start(self.loaded_from)
        self.metrics.register(EtcdCollector(self.etcd))

    async def stop(self) -> None:
        """Stop in the reverse order of start: what talks to the API, the API, the
        listeners, then the forwarder (its cache goes with it) and dnstap."""
        if self.workers is not None:
            workers, self.workers = self.workers, None
            await workers.stop()
        if self.follower is not None:
            follower, self.follower = self.follower, None
            await follower.stop()
        if self.etcd is not None:
            etcd, self.etcd = self.etcd, None
            await etcd.stop()
        if self.api is not None:
            await self.api.stop()
            self.api = None
        await self.listeners.close()
        await self.forwarding.close()
        if self.dnstap is not None:
            await self.dnstap.close()  # after the last answer: its messages go out too

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
        listeners = self.listeners
        await drain(self.drain_state, list(listeners.udp), list(listeners.tcp),
                    listeners.tcp_limits, lambda: self.forwarding.inflight,
                    finish_within=max(5.0, 2 * self.config.dns.upstream_timeout))

    async def reload_from(self, load: Callable[[], Config]) -> None:
        """SIGHUP: apply what can change safely; a bad file keeps the running config."""
        try:
            await self.reload(load())
        except (ConfigError, StateError, RegistryError, OSError) as exc:
            log.error("SIGHUP: config not reloaded, the running one is kept: %s", exc)

    async def reload(self, new: Config) -> list[str]:
        """SIGHUP's changes, section by section (reload.py); returns what was applied."""
        return await reload_config(self, new)


class _Running:
    """The API's view of what the server runs now (api.state.Running): each read asks
    the server, so a SIGHUP or a stop is seen at once."""

    def __init__(self, server: MeshServer) -> None:
        self._server = server

    @property
    def forwarder(self) -> Forwarder | None:
        return self._server.forwarding.forwarder

    @property
    def upstreams(self) -> list[HostPort]:
        return self._server.forwarding.upstreams

    @property
    def follower(self) -> FollowStatus | None:
        server = self._server
        if server.follower is not None:
            return server.follower
        return server.etcd.mirror if server.etcd is not None else None  # how old the copy is

    @property
    def workers(self) -> WorkerPool | None:
        return self._server.workers

    @property
    def writer(self) -> RegistryWriter | None:
        return self._server.etcd


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    _RELOADS.add(task)
    task.add_done_callback(_RELOADS.discard)


_RELOADS: set[asyncio.Future[None]] = set()
