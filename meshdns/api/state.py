"""What the API routes share: their context, the revision watch, counters, error bodies."""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..config import Config, HostPort
from ..core.answer import MessageHandler
from ..core.registry import Registry
from ..dns.drain import DrainState
from ..dns.forwarder import Forwarder
from ..gcpause import paused
from ..store import RegistryStore

MAX_WAIT_SECONDS = 300.0  # a ?wait= above this is capped, so a watcher is always released
GZIP_MIN_BYTES = 1400  # smaller bodies fit one packet as they are: not worth compressing
GZIP_IN_THREAD_BYTES = 256 * 1024  # compress bigger bodies off the event loop
DELTA_BODIES = 16  # delta answers kept encoded: followers at one revision share one
DELTA_BODIES_BYTES = 32 << 20  # ... and at most this much of them (a delta can be big)


class ApiError(Exception):
    """A request answered with ``{"error", "field"}`` and the given status."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status,
                             headers=headers)


def etag(revision: int) -> str:
    return f'"{revision}"'


class RevisionWatch:
    """Long-poll support: wakes every waiter when a new registry is published.

    One Event per revision: publishing sets the current one and swaps in a fresh
    one, so a waiter that wakes never sees a stale "set". The number of waiters
    is bounded (``api.max_watchers``); each is released on a change, on
    shutdown, or when its own timeout runs out, whichever comes first.
    """

    def __init__(self, max_watchers: int) -> None:
        self.max_watchers = max_watchers
        self.waiting = 0
        self.closing = False
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def notify(self, _reg: Registry | None = None) -> None:
        """The store listener: may be called from another thread (a direct store.put)."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.notify)
            return
        event, self._event = self._event, asyncio.Event()
        event.set()

    def close(self) -> None:
        self.closing = True
        self.notify()

    async def wait_while(self, unchanged: Any, timeout: float) -> None:
        """Wait until ``unchanged()`` is false, for at most ``timeout`` seconds.

        Raises 503 when ``max_watchers`` waiters are already parked.
        """
        if self.waiting >= self.max_watchers:
            raise ApiError(503, f"too many watchers ({self.max_watchers}, api.max_watchers); "
                           "retry later", None, {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout, MAX_WAIT_SECONDS)
        self.waiting += 1
        try:
            while unchanged() and not self.closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(self._event.wait(), remaining)
                except TimeoutError:
                    return
        finally:
            self.waiting -= 1


class FollowStatus(Protocol):
    """What /readyz reads of a follower."""

    leader: str
    connected: bool
    started_at: float
    last_success: float | None


class RegistryWriter(Protocol):
    """Where PUT and PATCH go: the local store, or a shared backend (etcd) that commits
    the write elsewhere and returns once this process serves it. RegistryError
    carries the status to answer (the core's 400/409/507; 503 when unreachable).
    ``quick``: a cheaper form of ``compute`` (an incremental PATCH of a few services)
    that may run on the event loop, sparing the thread hops a busy DNS loop delays;
    it returns None when the full computation is needed."""

    async def write(self, compute: Callable[[Registry], Registry], *,
                    check: Callable[[Registry], None] | None = None,
                    quick: Callable[[Registry], Registry | None] | None = None
                    ) -> Registry: ...


class WorkerSync(Protocol):
    """What the registry routes need of ``dns.workers`` processes."""

    def report(self, worker: str, revision: int) -> None: ...

    async def caught_up(self, revision: int) -> None: ...


class Running(Protocol):
    """What of the process starts later or changes while it serves (a SIGHUP changes the
    forwarder and the upstreams; the follower, the etcd writer and the workers start
    once the API runs, as they talk to it). The server is the one owner: each read
    asks it, nothing is copied."""

    @property
    def forwarder(self) -> Forwarder | None: ...  # /v1/resolve asks it, as DNS would

    @property
    def upstreams(self) -> Sequence[HostPort]: ...

    @property
    def follower(self) -> FollowStatus | None: ...

    @property
    def workers(self) -> WorkerSync | None: ...

    @property
    def writer(self) -> RegistryWriter | None: ...  # None: writes go to the store


class NothingRunning:
    """A process with no forwarder, follower, workers or other writer (tests)."""

    forwarder = follower = workers = writer = None
    upstreams: Sequence[HostPort] = ()


@dataclass(frozen=True)
class ApiContext:
    """What the API uses of the process it runs in, built once by the server."""

    config: Config
    store: RegistryStore
    handler: MessageHandler
    metrics: CollectorRegistry | None = None
    drain: DrainState | None = None  # SIGTERM: /readyz fails while DNS drains
    # dns.views: which view a client address gets (0: the default one).
    client_view: Callable[[str], int] = lambda host: 0
    running: Running = field(default_factory=NothingRunning)

    @property
    def forwarder(self) -> Forwarder | None:
        return self.running.forwarder

    @property
    def upstreams(self) -> Sequence[HostPort]:
        return self.running.upstreams

    @property
    def follower(self) -> FollowStatus | None:
        return self.running.follower

    @property
    def workers(self) -> WorkerSync | None:
        return self.running.workers

    @property
    def registry_writer(self) -> RegistryWriter:
        writer = self.running.writer
        return writer if writer is not None else self.store


def not_loaded_reason(server: ApiContext) -> str:
    """Why /readyz says 503 before any registry, in the terms of where it comes from."""
    etcd = server.config.registry.etcd
    if not etcd.endpoints:
        return "no registry loaded yet"
    source = server.follower
    if source is None or source.last_success is None:
        return f"no registry loaded yet: etcd not listed yet ({', '.join(etcd.endpoints)})"
    # Listed, and still nothing: the prefix holds no registry (meshdns/etcd/layout.py).
    return (f"no registry loaded yet: nothing was ever written under registry.etcd.prefix "
            f"{etcd.prefix!r} in etcd; is the prefix right? A first write through any "
            "instance (a PUT, even of no services) makes the registry")


class Encoded:
    """One response body, encoded once, with its gzip form made on first demand."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._gzip: bytes | None = None
        self._lock = asyncio.Lock()

    @property
    def compressible(self) -> bool:
        return len(self.body) >= GZIP_MIN_BYTES

    async def gzipped(self) -> bytes:
        if self._gzip is None:
            async with self._lock:  # however many followers ask at once, compress once
                if self._gzip is None:
                    if len(self.body) >= GZIP_IN_THREAD_BYTES:
                        self._gzip = await asyncio.to_thread(gzip.compress, self.body, 6)
                    else:
                        self._gzip = gzip.compress(self.body, 6)
        return self._gzip


class ApiState:
    """Per-app state, reachable from handlers as ``request.app[STATE_KEY]``."""

    def __init__(self, server: ApiContext) -> None:
        self.server = server
        self.watch = RevisionWatch(server.config.api.max_watchers)
        # sync_requests_total{op,code}: (op, status code as text) -> count. Plain ints,
        # read by the metrics collector at scrape time. op: get|watch|put|patch.
        self.sync_requests: dict[tuple[str, str], int] = {}
        self._body_lock = asyncio.Lock()
        self._body_for: Registry | None = None
        self._body = Encoded(b"")
        # Delta answers by (lineage, since, revision): a change wakes every follower at
        # the same revision, and they all get the one encoding.
        self.delta_bodies: OrderedDict[tuple[str, int, int], Encoded] = OrderedDict()
        server.store.history.depth = server.config.api.follow_history

    @property
    def store(self) -> RegistryStore:
        return self.server.store

    def count(self, op: str, status: int) -> None:
        key = (op, str(status))
        self.sync_requests[key] = self.sync_requests.get(key, 0) + 1

    async def services_body(self, reg: Registry, encode: Any) -> Encoded:
        """The GET body of ``reg``, encoded once per snapshot however many watchers wake
        (and gzipped at most once per snapshot)."""
        async with self._body_lock:
            if self._body_for is not reg:
                self._body = Encoded(await asyncio.to_thread(paused(encode), reg))
                self._body_for = reg
            return self._body

    def delta_body(self, key: tuple[str, int, int]) -> Encoded | None:
        body = self.delta_bodies.get(key)
        if body is not None:
            self.delta_bodies.move_to_end(key)
        return body

    def keep_delta_body(self, key: tuple[str, int, int], body: Encoded) -> None:
        self.delta_bodies[key] = body
        held = sum(len(b.body) for b in self.delta_bodies.values())
        while len(self.delta_bodies) > 1 and (len(self.delta_bodies) > DELTA_BODIES
                                              or held > DELTA_BODIES_BYTES):
            held -= len(self.delta_bodies.popitem(last=False)[1].body)


STATE_KEY = web.AppKey("meshdns_api_state", ApiState)
# What a registry write did, for its audit line: counts set by the handler once the body
# is parsed (request[AUDIT_KEY]); the middleware adds the result and logs it.
AUDIT_KEY = web.RequestKey("meshdns_audit", dict)
