"""Follower mode: mirror another meshdns's registry by long-polling its HTTP API.

The first sync is a full read: ``GET <leader>/v1/services``. Its answer is
adopted whole: the leader's VIPs taken as given and its revision kept (so the
follower's SOA serial and ETag match the leader's), persisted to the
follower's own state file, then published to DNS. The answer names the
leader's registry lineage (``X-Meshdns-Lineage``).

From then on the follower asks for deltas: ``GET ?since=<revision>&lineage=
<lineage>&wait=30``. The leader answers what changed after that revision
(upserts with their VIPs, deletes), at once or when something changes within
the wait; the follower applies it with the core's incremental PATCH, so a
one-service change costs O(1) here however big the registry, and takes the
leader's revision. A 410 (the leader's history no longer reaches back that
far, or its lineage changed: it restarted or lost its registry) makes the
follower re-list in full. A leader that sends no lineage (an older meshdns)
is followed as before: full reads with ``If-None-Match``. A follower's own
API serves the same deltas to followers of its own (a relay), with the
leader's revisions and lineage.

Watch streams: once it follows by deltas, the follower asks with ``stream=1``
too (meshdns/api/stream.py). A leader that streams answers with one long-lived
``application/x-ndjson`` response, a delta per line (and a heartbeat, an empty
delta, every few seconds), each applied as a long-poll's answer would be: one
connection for every change, not one request per change. A leader without
streams answers the same request as the long-poll it also is (``wait`` and all,
``application/json``), and a 400 or 404 says the same: the follower applies that
answer and long-polls from then on, until a failure to reach the leader (which
may have restarted as another version) makes it ask again. A stream that ends
(its ``wait`` ran out, the leader stopped or ended it) is asked for again at once
from the revision reached; one that breaks, or stays silent for a few heartbeats,
is a failed poll as any other (backoff, then a catch-up from the revision held).
A ``dns.workers`` process never streams: its main process learns the revision it
serves from each long-poll.

While the leader is unreachable the follower keeps serving what it has and
retries with exponential backoff and jitter (capped at BACKOFF_MAX), so a
fleet of followers does not stampede a leader that comes back. It then asks
for a delta again: the lineage tells whether the leader is still the same.
A leader that answers with an HTTP error (a 503 for ``api.max_watchers``, a
401 for a wrong token) refused the request, nothing more: the follower keeps
its position, waits at least the ``Retry-After`` it was given, and asks for
the same delta again. The backoff grows until a poll settles: a delta that
applied or found nothing new (a full read in between does not count, or a
leader refusing every delta would be re-read in full every 250 ms). A 401 or
403 is a configuration error (``registry.follow_token``): /readyz says so.

Within one lineage the revisions only go up. A leader answering the changes
since revision N with a lower revision, or a full read at a lower revision
than the one held, is refused (the follower keeps serving what it has,
counts it, warns, and /readyz shows ``follow.degraded``); a new lineage (a
leader that restarted or lost its registry) stays the leader's authority.
Each poll has a total deadline (the wait plus READ_SLACK), so a leader that
trickles its answer byte by byte cannot hold it open.

A full read is a large write here as on the leader: decoded in steps and built
under ``gcpause.bulk_write`` (the collector paused, a short switch interval),
so DNS keeps answering while 300k services are adopted, and the heap is handed
back to the system once a much smaller registry replaced a large one.

Fail static across restarts: with ``registry.state_file`` the server loads the
last pulled registry at start (``RegistryStore.load_initial``) and answers from
it at once, revision and all, before this loop has reached the leader. The
first poll after a start is a full read even so: the leader may have lost its
registry and reused the revision number meanwhile, so a 304 for the restored
revision would not prove the copy current. An identical answer is not written
or published again, so that read costs the transfer only. Without a state file
(or before its first pull) a follower has no registry: DNS answers SERVFAIL for
mesh names (``Zone.loaded``) and /readyz says 503 until the leader answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, Metric

from .config import RegistryConfig
from .core.registry import (
    EntryKey,
    EntrySpec,
    Registry,
    RegistryError,
    RegistryPolicy,
    apply_patch,
    parse_deletes,
    parse_entries,
    restore,
)
from .gcpause import bulk_write, gc_paused, release_memory
from .jsonsteps import load_json_in_steps
from .metrics import sync_age_families
from .protocol import HEARTBEAT_HEADER, LINEAGE_HEADER, WORKER_HEADER
from .store import RegistryStore

log = logging.getLogger("meshdns.follower")


class SyncError(Exception):
    """The leader answered, but not with a registry this follower can adopt."""


class LeaderRefused(SyncError):
    """The leader answered an HTTP error: the follower's position still holds."""

    def __init__(self, message: str, status: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RevisionRegression(SyncError):
    """The leader sent a lower revision than the one held, in the same lineage."""


TOKEN_REFUSED = (401, 403)  # the leader does not take registry.follow_token
RETRY_AFTER_MAX = 300.0  # a Retry-After longer than this is read as this
SMALL_DELTA = 65536  # bytes: a delta this small is parsed and applied on the loop's terms
LARGE_BODY = 2 << 20  # bytes: after a body this big the heap is handed back to the system
LARGE_ADOPT = 50_000  # services: and after replacing a registry this big
NDJSON = "application/x-ndjson"  # a watch stream's answer (meshdns/api/stream.py)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), RETRY_AFTER_MAX))


class Follower:
    WAIT = 30.0  # seconds per long-poll; also bounds how stale last_success gets when idle
    STREAM_WAIT = 300.0  # seconds a watch stream is asked to last (less up to 20%, spread)
    HEARTBEAT = 10.0  # a stream's heartbeat interval when the leader names none
    READ_SLACK = 15.0  # on top of WAIT before a silent leader counts as gone
    CONNECT_TIMEOUT = 5.0
    BACKOFF_FIRST = 0.25
    BACKOFF_MAX = 10.0

    def __init__(self, store: RegistryStore, policy: RegistryPolicy, cfg: RegistryConfig,
                 max_bytes: int, worker_id: str | None = None) -> None:
        assert cfg.follow is not None
        self.store = store
        self.worker_id = worker_id  # a dns.workers process following its main process
        self.leader = cfg.follow
        self.url = f"{cfg.follow}/v1/services"
        self.token = cfg.follow_token
        self.max_bytes = max_bytes
        # Every VIP comes from the leader: never allocate one here, not even a vip6
        # the leader has none for (that would answer AAAA the leader does not). Nor hold
        # one: the hold-down is the leader's to keep (a full read carries none), and
        # 300k deleted services held here would keep their memory for vip_hold_seconds.
        self.policy = replace(policy, range6=None, hold_seconds=0.0)
        self.started_at = time.time()
        self.last_success: float | None = None  # wall time of the last 200/304 from the leader
        self.connected = False
        self.last_error: str | None = None
        self.adopted = 0  # whole registries adopted from the leader (full reads)
        self.deltas = 0  # deltas applied (each a 200 that changed something)
        self.relists = 0  # 410s: the leader could not answer a delta, so a full read
        self.failures = 0  # failed polls
        # Failed polls by what went wrong: the leader's HTTP status ("401", "503"),
        # "transport" (no answer: refused, reset, timed out), "invalid" (an answer
        # that does not parse or apply), "regression" (a lower revision, refused).
        self.errors: Counter[str] = Counter()
        # Why /readyz is 503 although a registry is served: the leader refuses the
        # follow token, which no retry will mend. None otherwise.
        self.config_error: str | None = None
        # The leader sent what must not be adopted (a revision lower than the one
        # held, same lineage): still serving, shown in /readyz. None otherwise.
        self.degraded: str | None = None
        # The leader's lineage last adopted in this process (None: not yet, so the
        # first full read is authoritative, as after a restart).
        self.lineage: str | None = None
        self._attempt = 0  # failed polls since the last settled one (the backoff step)
        # The position comes from a full read no delta has followed yet (a 410 now is
        # paced: re-read after re-read must not spin).
        self._fresh = False
        self._replacing = 0  # about the services the write under way replaces
        self._recovery_logged: str | None = None  # the outage whose re-sync was logged
        # The revision this follower restarted with from its state file, before any
        # contact with the leader; None when it started with no registry.
        self.restored_revision: int | None = self.store.revision if self.store.loaded \
            else None
        # None: the first poll reads in full, even after a restore (see the module doc).
        self._etag: str | None = None
        # (lineage, revision) of the leader's registry held now; None: read in full next.
        self._since: tuple[str, int] | None = None
        # Whether the leader offers watch streams: None not known (ask with stream=1 and a
        # long-poll's wait, which a leader without them answers as a long-poll), True, or
        # False (it answered a long-poll: long-poll until it may have changed).
        self.streams: bool | None = None
        self.streamed = 0  # watch streams opened on the leader
        self._task: asyncio.Task[None] | None = None
        self.first_sync = asyncio.Event()  # set once the first registry is adopted

    def start(self, restored_from: str = "") -> None:
        """Start following; ``restored_from`` names what the registry was loaded from."""
        if self.worker_id is None:
            if self.restored_revision is not None:
                log.info("follower: serving revision %d (%d services) from %s until %s "
                         "answers", self.restored_revision, len(self.store.registry),
                         restored_from, self.leader)
            else:
                log.info("follower: no registry yet; mesh names get SERVFAIL until %s "
                         "answers", self.leader)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="meshdns-follower")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------ loop

    def backoff(self, attempt: int) -> float:
        """Equal jitter: half the exponential step, plus up to half again at random."""
        step = min(self.BACKOFF_MAX, self.BACKOFF_FIRST * 2.0 ** min(attempt, 30))
        return step / 2 + random.uniform(0, step / 2)

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers["Accept-Encoding"] = "gzip"  # a full list is ~10x smaller gzipped
        if self.worker_id is not None:
            # A dns.workers process: its If-None-Match tells the main which revision it serves.
            headers[WORKER_HEADER] = self.worker_id
        # total: the whole poll, body included, however the leader paces its bytes.
        timeout = aiohttp.ClientTimeout(total=self.WAIT + self.READ_SLACK,
                                        connect=self.CONNECT_TIMEOUT,
                                        sock_read=self.WAIT + self.READ_SLACK)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                try:
                    if await self.poll(session):
                        self._attempt = 0
                    continue
                except asyncio.CancelledError:
                    raise
                except (aiohttp.ClientError, TimeoutError, OSError, SyncError) as exc:
                    error = str(exc) or type(exc).__name__
                    exc_seen: Exception = exc
                except Exception as exc:  # never let the follower die: log, back off, retry
                    log.exception("follower: unexpected error")
                    error = repr(exc)
                    exc_seen = SyncError(error)
                await asyncio.sleep(self._failed(exc_seen, error))

    def _failed(self, exc: Exception, error: str) -> float:
        """Count and log one failed poll; the seconds to wait before the next."""
        self.failures += 1
        self.errors[_error_code(exc)] += 1
        # Once per outage, and again whenever the reason changes; the rest at debug.
        repeated = self._attempt > 0 and error == self.last_error
        level = logging.DEBUG if repeated else logging.WARNING
        serving = f"still serving revision {self.store.revision}" if self.store.loaded \
            else "no registry yet, mesh names get SERVFAIL"
        delay = self.backoff(self._attempt)
        if isinstance(exc, LeaderRefused) and exc.retry_after is not None:
            # At least what the leader asked for, spread so a refused fleet does not
            # come back all in the same second.
            delay = max(delay, exc.retry_after * random.uniform(1.0, 1.25))
        if isinstance(exc, LeaderRefused) and exc.status in TOKEN_REFUSED:
            self.config_error = (f"the leader {self.leader} refuses this follower's token "
                                 f"(HTTP {exc.status}): check registry.follow_token")
            log.log(logging.DEBUG if repeated else logging.ERROR,
                    "follower: %s; %s, retrying every %.0f s at most", self.config_error,
                    serving, self.BACKOFF_MAX)
        elif isinstance(exc, RevisionRegression):
            self.degraded = f"refused from the leader: {error}"
            log.log(level, "follower: refused what %s sent: %s; %s, retrying with backoff",
                    self.leader, error, serving)
        else:
            log.log(level, "follower: leader %s unavailable (%s); %s, retrying with backoff",
                    self.leader, error, serving)
        self.connected = False
        self.last_error = error
        if not isinstance(exc, (LeaderRefused, RevisionRegression)):
            # No answer, or one that did not apply: the leader may have restarted (as
            # another version: ask again whether it streams).
            self._etag = None
            self.streams = None
            if isinstance(exc, SyncError):
                self._since = None  # what it sent did not apply: start over in full
        self._attempt += 1
        return delay

    async def poll(self, session: aiohttp.ClientSession) -> bool:
        """One long-poll: a delta when the leader's lineage is known, else a full read.

        True when it settled (the backoff starts over): a delta applied or found
        nothing new, or a full read that was not a retry (a retry still has to
        show that the deltas after it work)."""
        if self._since is not None:
            if self.worker_id is None and self.streams is not False:
                return await self._poll_stream(session, *self._since)
            return await self._poll_delta(session, *self._since)
        return await self._poll_full(session)

    async def _poll_full(self, session: aiohttp.ClientSession) -> bool:
        """304 keeps the registry, 200 adopts the leader's."""
        headers = {"If-None-Match": self._etag} if self._etag else {}
        async with session.get(self.url, params={"wait": f"{self.WAIT:g}"},
                               headers=headers) as resp:
            if resp.status == 304:
                return self._success(settled=True)
            if resp.status != 200:
                raise await self._refusal(resp)
            data = await self._read(resp)
            tag = resp.headers.get("ETag")
            lineage = resp.headers.get(LINEAGE_HEADER)
        body = [data]  # dropped once adopted, before the heap is trimmed
        del data
        with bulk_write():  # a whole registry: as a PUT is on the leader
            reg = await self._write(body, lambda base: self.adopt(body[0], base, lineage))
        await self._release_after(body, reg)
        self._etag = tag or f'"{reg.revision}"'
        if lineage:
            self.store.history.adopt_lineage(lineage, reg)  # a relay serves the leader's
            self._since = (lineage, reg.revision)
            self.lineage = lineage
            self._fresh = True
        if self.adopted == 0 or (not self.connected and self._recovery_logged != self.last_error):
            log.info("follower: in sync with %s at revision %d (%d services)", self.leader,
                     reg.revision, len(reg))
            self._recovery_logged = self.last_error
        self.adopted += 1
        self.first_sync.set()
        # A retry (after a failure) settles only once a delta works again, with a
        # leader that sends deltas; an older one is followed by full reads alone.
        return self._success(settled=self._attempt == 0 or not lineage)

    async def _poll_delta(self, session: aiohttp.ClientSession, lineage: str,
                          since: int) -> bool:
        """200 applies what changed after ``since`` (maybe nothing); 410 re-lists."""
        params = {"since": str(since), "lineage": lineage, "wait": f"{self.WAIT:g}"}
        async with session.get(self.url, params=params) as resp:
            if resp.status == 410:
                return await self._gone(resp, since)
            if resp.status != 200:
                raise await self._refusal(resp)
            data = await self._read(resp)
        return await self._apply(data, lineage, since)

    async def _gone(self, resp: aiohttp.ClientResponse, since: int) -> bool:
        """A 410 to a delta or stream: read the registry in full next."""
        log.info("follower: %s cannot send the changes after revision %d (%s); "
                 "reading its registry in full", self.leader, since,
                 (await resp.content.read(300)).decode("utf-8", "replace").strip())
        self._since = self._etag = None
        self.relists += 1
        if self._fresh:
            # Right after a full read: a history that short can be true (writes
            # between the two polls), but a leader answering so every time would
            # have the follower re-read in a loop; pace those re-reads.
            await asyncio.sleep(self.backoff(self._attempt))
            self._attempt += 1
        return False

    async def _poll_stream(self, session: aiohttp.ClientSession, lineage: str,
                           since: int) -> bool:
        """A watch stream: each line a delta, applied in turn, until the stream ends.

        Asked of a leader not known to stream with a long-poll's wait, so that one
        without streams answers as the long-poll it then is."""
        wait = self.STREAM_WAIT * random.uniform(0.8, 1.0) if self.streams else self.WAIT
        params = {"since": str(since), "lineage": lineage, "stream": "1",
                  "wait": f"{wait:.0f}"}
        # No total deadline: a stream lasts; each read has one (_lines).
        timeout = aiohttp.ClientTimeout(total=None, connect=self.CONNECT_TIMEOUT)
        async with session.get(self.url, params=params, timeout=timeout) as resp:
            if resp.status == 410:
                return await self._gone(resp, since)
            if resp.status in (400, 404):
                log.info("follower: %s offers no watch stream (HTTP %d); long-polling",
                         self.leader, resp.status)
                self.streams = False
                return False  # asked again at once, as a long-poll
            if resp.status != 200:
                raise await self._refusal(resp)
            if resp.content_type != NDJSON:
                # A leader without streams: this is its long-poll's answer.
                self.streams = False
                async with asyncio.timeout(self.WAIT + self.READ_SLACK):
                    data = await self._read(resp)
                return await self._apply(data, lineage, since)
            if not self.streams:
                log.info("follower: following %s by a watch stream", self.leader)
            self.streams = True
            self.streamed += 1
            try:
                heartbeat = float(resp.headers.get(HEARTBEAT_HEADER, ""))
            except ValueError:
                heartbeat = self.HEARTBEAT
            # Silent for this long (three heartbeats missed, or a leader that stopped
            # without closing): gone. Never longer than a long-poll may take.
            silence = min(self.WAIT + self.READ_SLACK, 3 * max(heartbeat, 0.05) + 5.0)
            settled = False
            async for line in self._lines(resp, silence):
                assert self._since is not None
                await self._apply(line, lineage, self._since[1])
                if not settled:
                    settled = True
                    self._attempt = 0  # the stream works: a later break backs off from 0
        if not settled:
            raise ConnectionError("the leader's watch stream ended before its first line")
        return True

    async def _lines(self, resp: aiohttp.ClientResponse, silence: float
                     ) -> AsyncIterator[bytes]:
        """The stream's lines as they come, each at most api.max_body_bytes."""
        buf = bytearray()
        scanned = 0  # buf[:scanned] holds no newline
        while True:
            async with asyncio.timeout(silence):
                data = await resp.content.readany()
            if not data:
                if buf:
                    raise ConnectionError("the leader's watch stream ended inside a line")
                return
            buf += data
            while (end := buf.find(b"\n", scanned)) >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                scanned = 0
                if line:
                    yield line
            scanned = len(buf)
            if scanned > self.max_bytes:
                raise SyncError(f"a line of the leader's watch stream is over "
                                f"api.max_body_bytes {self.max_bytes}")

    async def _apply(self, data: bytes, lineage: str, since: int) -> bool:
        """Apply one delta the leader sent as the changes after ``since``."""
        large = len(data) > SMALL_DELTA
        # A large delta is a bulk write from its parse to its publish, as a PUT is on the
        # leader: the collector resumed in between would scan all that the parse made.
        with bulk_write() if large else contextlib.nullcontext():
            if large:
                revision, named, upserts, deletes = await asyncio.to_thread(self.parse_delta,
                                                                            data)
            else:
                revision, named, upserts, deletes = self.parse_delta(data)
            # A leader restarted from its state file answers a delta asked in its previous
            # lineage in its new one, which continues it (history.py, ``parent``).
            answered_in = named or lineage
            self._fresh = False
            if revision < since:
                raise RevisionRegression(f"revision {revision} as the changes since revision "
                                         f"{since} (lineage {lineage}): revisions only go up")
            if revision == since:
                if upserts or deletes:
                    raise SyncError(f"leader answered changes at revision {revision} to "
                                    f"since={since}")
                self._continued(lineage, answered_in, since, self.store.registry)
                return self._success(settled=True)  # nothing changed within the wait
            body, pending = [data], [(revision, upserts, deletes)]
            del data, upserts, deletes  # held in body and pending alone, dropped once applied
            reg = await self._write(body, lambda base: self.apply_delta(base, since,
                                                                        *pending[0]))
            pending.clear()
        await self._release_after(body, reg)
        self._since = (lineage, reg.revision)
        self._continued(lineage, answered_in, since, reg)
        self._etag = f'"{reg.revision}"'
        self.deltas += 1
        return self._success(settled=True)

    def _continued(self, asked: str, answered: str, since: int, reg: Registry) -> None:
        """The leader answered a delta asked in ``asked`` from ``since`` in the lineage
        ``answered``: its lineage continues the one held (history.py, ``parent``), so
        follow that one from now on, and serve it (a relay) with the history kept."""
        if answered == asked:
            return
        log.info("follower: %s continues lineage %s as %s from revision %d", self.leader,
                 asked, answered, since)
        self._since = (answered, reg.revision)
        self.lineage = answered
        self.store.history.adopt_lineage(answered, reg, continues=since)

    async def _write(self, body: list[bytes], compute: Callable[[Registry], Registry]
                     ) -> Registry:
        """Publish what the leader sent. Shielded: stopping the follower mid-write must
        not leave the state file ahead of what DNS serves."""
        self._replacing = max(len(self.store.registry), len(body[0]) // 40)
        return await asyncio.shield(self.store.write(compute, mirror=True))

    async def _release_after(self, body: list[bytes], reg: Registry) -> None:
        """Drop the leader's bytes; after a large write, hand the freed heap back."""
        size = len(body[0]) if body else 0
        body.clear()
        if size > LARGE_BODY or self._replacing > LARGE_ADOPT:
            # What the decode and a replaced large registry occupied is free, but
            # counted in RSS until handed back (300k services: ~400 MB).
            await asyncio.to_thread(release_memory)

    async def _refusal(self, resp: aiohttp.ClientResponse) -> LeaderRefused:
        text = (await resp.content.read(500)).decode("utf-8", "replace")
        return LeaderRefused(f"leader answered HTTP {resp.status}: {text.strip()}", resp.status,
                             retry_after(resp.headers.get("Retry-After")))

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > self.max_bytes:
            raise SyncError(f"leader's registry is {resp.content_length} bytes, over "
                            f"api.max_body_bytes {self.max_bytes}")
        chunks, total = [], 0
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            if total > self.max_bytes:
                raise SyncError(f"leader's registry is over api.max_body_bytes {self.max_bytes}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _success(self, settled: bool) -> bool:
        self.connected = True
        self.last_success = time.time()
        self.config_error = self.degraded = None  # it took the token; what it sent applied
        if settled:
            if self.last_error is not None and self._recovery_logged != self.last_error:
                log.info("follower: %s answers again; in sync at revision %d", self.leader,
                         self.store.revision)
            self.last_error = self._recovery_logged = None
        return settled

    def adopt(self, data: bytes, base: Registry | None = None,
              lineage: str | None = None) -> Registry:
        """The leader's registry as a snapshot of ours (pure; runs in a worker thread).

        Refused when it is older than ``base`` in the lineage already followed."""
        with gc_paused():
            return self._adopt(data, base, lineage)

    def _adopt(self, data: bytes, base: Registry | None, lineage: str | None) -> Registry:
        doc, revision = _leader_document(data, "registry")
        if base is not None and lineage is not None and lineage == self.lineage \
                and revision < base.revision:
            raise RevisionRegression(f"a full registry at revision {revision}, older than the "
                                     f"{base.revision} held (lineage {lineage}): revisions "
                                     "only go up")
        try:
            specs = parse_entries(doc.get("services"), "services", consume=True,
                                  known=self.store.registry.services)
            return restore(revision, specs, {}, self.policy, now=self.store.clock())
        except RegistryError as exc:
            raise SyncError(f"leader's registry does not fit this follower: {exc.field}: "
                            f"{exc.message}") from None

    def parse_delta(self, data: bytes
                    ) -> tuple[int, str | None, list[EntrySpec], list[EntryKey]]:
        """A delta's revision, lineage (None if it names none), upserts (VIPs as the
        leader gave them) and deletes."""
        with gc_paused():
            doc, revision = _leader_document(data, "delta")
            named = doc.get("lineage")
            if not isinstance(named, str) or not named or len(named) > 64:
                named = None
            try:
                upserts = parse_entries(doc.get("upsert"), "upsert", consume=True,
                                        known=self.store.registry.services)
                deletes = parse_deletes(doc.get("delete"), "delete")
            except RegistryError as exc:
                raise SyncError(f"leader's delta does not parse: {exc.field}: "
                                f"{exc.message}") from None
            return revision, named, upserts, deletes

    def apply_delta(self, base: Registry, since: int, revision: int,
                    upserts: list[EntrySpec], deletes: list[EntryKey]) -> Registry:
        """``base`` (the leader's ``since``) with the delta applied, at the leader's
        ``revision`` (pure; runs in a worker thread)."""
        if base.revision != since:
            raise SyncError(f"delta from revision {since} does not apply to revision "
                            f"{base.revision}")
        try:
            new = apply_patch(base, upserts, deletes, self.policy, self.store.clock())
        except RegistryError as exc:
            raise SyncError(f"leader's delta does not apply here: {exc.field}: "
                            f"{exc.message}") from None
        return new if new.revision == revision else replace(new, revision=revision)


def _error_code(exc: Exception) -> str:
    """The ``code`` label of meshdns_follow_errors_total for a failed poll."""
    if isinstance(exc, LeaderRefused):
        return str(exc.status)
    if isinstance(exc, RevisionRegression):
        return "regression"
    if isinstance(exc, SyncError):
        return "invalid"
    return "transport"


def _leader_document(data: bytes, kind: str) -> tuple[dict[str, Any], int]:
    """A leader's JSON object (a ``kind``: registry or delta) and its revision."""
    try:
        # In steps: a 300k-service registry is ~200 ms of json.loads holding the GIL.
        doc: Any = load_json_in_steps(data)
    except (ValueError, RecursionError) as exc:
        raise SyncError(f"leader sent malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SyncError(f"leader sent no {kind} object")
    revision = doc.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise SyncError(f"leader sent a bad revision {revision!r}")
    return doc, revision


class FollowerCollector:
    """meshdns_follow_*: when the follower last pulled from its leader."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        yield from sync_age_families("meshdns_follow", self.follower.last_success,
                                     "of the follower's last successful pull")
        yield CounterMetricFamily("meshdns_follow_full_syncs",
                                  "Whole registries adopted from the leader (full reads).",
                                  value=self.follower.adopted)
        yield CounterMetricFamily("meshdns_follow_deltas",
                                  "Deltas from the leader applied (follow by ?since=).",
                                  value=self.follower.deltas)
        yield CounterMetricFamily("meshdns_follow_streams",
                                  "Watch streams opened on the leader (?stream=1), each "
                                  "carrying any number of deltas.",
                                  value=self.follower.streamed)
        yield CounterMetricFamily("meshdns_follow_relists",
                                  "410 Gone answers to a delta request, each followed by a "
                                  "full read.", value=self.follower.relists)
        errors = CounterMetricFamily(
            "meshdns_follow_errors",
            "Failed polls of the leader by code: its HTTP status (401/403: the follow token "
            "is refused; 503: e.g. api.max_watchers), transport (no answer), invalid (an "
            "answer that does not parse or apply), regression (a lower revision in the "
            "same lineage, refused).", labels=["code"])
        for code, count in sorted(self.follower.errors.items()):
            errors.add_metric([code], count)
        yield errors
