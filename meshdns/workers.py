"""``dns.workers: N``: N-1 extra processes answering DNS on the same ports (SO_REUSEPORT).

The main process owns the registry, the API and the state file. Each worker is a
follower of the main process's API on loopback: it long-polls
``/v1/services`` like any follower, and binds its DNS sockets only after its
first sync, so the kernel never hands a query to a worker with an empty
registry. A worker names itself in the ``X-Meshdns-Worker`` header of its
long-polls; the ``If-None-Match`` it sends tells the main process which
revision that worker serves. A write is acknowledged once every live worker
serves it (read-your-writes across processes, bounded by CATCH_UP_TIMEOUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import replace

from .config import Config, EtcdConfig, HostPort, MetricsConfig, config_to_raw

log = logging.getLogger("meshdns.workers")

WORKER_ENV = "MESHDNS_WORKER_CONFIG"
CATCH_UP_TIMEOUT = 5.0
RESPAWN_DELAY = 1.0


def worker_config(main: Config, dns: list[HostPort], api: HostPort) -> Config:
    """A worker's config: the main's DNS settings on the bound ports, following the main."""
    host = api.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url_host = f"[{host}]" if ":" in host else host
    return replace(
        main,
        # The main process keeps the lameduck period for all; a worker stopped after it
        # only detaches its sockets and finishes what it has (dns/drain.py).
        dns=replace(main.dns, listen=tuple(dns), lameduck=0.0),
        api=replace(main.api, listen=HostPort("127.0.0.1", 0)),
        metrics=MetricsConfig(),  # the main process serves /metrics (and the probes)
        registry=replace(main.registry, state_file=None, seed_file=None,
                         follow=f"http://{url_host}:{api.port}",
                         follow_token=main.api.token,
                         etcd=EtcdConfig()),  # the main process watches etcd, not workers
    )


class WorkerRevisions:
    """Which revision each worker serves, as told by its long-polls; waits on them."""

    def __init__(self) -> None:
        self.revisions: dict[str, int] = {}
        self.live: set[str] = set()
        self._changed = asyncio.Event()

    def report(self, worker: str, revision: int) -> None:
        # A worker is live from its first report (it binds DNS right before it) until
        # its process exits; writes wait only for live workers.
        self.live.add(worker)
        if self.revisions.get(worker) != revision:
            self.revisions[worker] = revision
            self._changed.set()
            self._changed = asyncio.Event()

    def behind(self, revision: int) -> list[str]:
        return sorted(w for w in self.live if self.revisions.get(w, -1) < revision)

    async def caught_up(self, revision: int, timeout: float = CATCH_UP_TIMEOUT) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.behind(revision):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True


class WorkerPool:
    """Starts, watches and stops the worker processes of one main process."""

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.revisions = WorkerRevisions()
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._restarting: set[str] = set()
        self._dns: list[HostPort] = []
        self._api = HostPort("127.0.0.1", 0)

    async def start(self, dns: list[HostPort], api: HostPort) -> None:
        """Spawn the workers: they serve ``dns`` (the bound ports) and follow ``api``."""
        self._dns, self._api = dns, api
        cfg = worker_config(self.config, dns, api)
        self._env = dict(os.environ, **{WORKER_ENV: json.dumps(config_to_raw(cfg))})
        for i in range(1, self.count):
            worker = f"w{i}"
            self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(worker)))

    async def reload(self, config: Config) -> None:
        """SIGHUP: workers take their config at spawn, so each is restarted with the new
        one (one at a time: the others keep answering its share meanwhile)."""
        self.config = config
        cfg = worker_config(config, self._dns, self._api)
        self._env = dict(os.environ, **{WORKER_ENV: json.dumps(config_to_raw(cfg))})
        for worker, proc in list(self.procs.items()):
            if proc.returncode is not None:
                continue
            self._restarting.add(worker)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + CATCH_UP_TIMEOUT + RESPAWN_DELAY
            while worker not in self.revisions.live and loop.time() < deadline:
                await asyncio.sleep(0.05)

    async def _supervise(self, worker: str) -> None:
        while not self._stopping:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshdns", "worker", worker, env=self._env,
                stdin=asyncio.subprocess.DEVNULL)
            self.procs[worker] = proc
            code = await proc.wait()
            if self._stopping:
                return
            # Not live until it reports again: writes do not wait for a dead worker.
            self.revisions.live.discard(worker)
            self.revisions.revisions.pop(worker, None)
            if worker in self._restarting:  # a reload: back at once, with the new config
                self._restarting.discard(worker)
                continue
            log.error("DNS worker %s exited with %s; restarting it in %.0f s", worker, code,
                      RESPAWN_DELAY)
            await asyncio.sleep(RESPAWN_DELAY)

    async def stop(self) -> None:
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def report(self, worker: str, revision: int) -> None:
        self.revisions.report(worker, revision)

    async def caught_up(self, revision: int) -> None:
        if not await self.revisions.caught_up(revision):
            log.warning("workers %s did not reach revision %d within %.0f s; acknowledging "
                        "the write anyway", ", ".join(self.revisions.behind(revision)),
                        revision, CATCH_UP_TIMEOUT)
