"""Watch streams: ``GET /v1/services?since=N&lineage=L&stream=1&wait=S``.

One long-lived response per follower instead of one long-poll per change, as a
Kubernetes watch streams its events. The body is newline-delimited JSON
(``application/x-ndjson``, chunked). Each line is a delta object exactly as a
long-poll answers it (``{"revision", "lineage", "upsert", "delete"}``), and
applies to the revision of the line before it (the first to ``since``). An
empty delta at the revision already reached is a heartbeat: one is sent as soon
as the stream is open, then one every ``api.stream_heartbeat`` seconds in which
nothing changed. The stream ends after ``wait`` seconds (capped as a long-poll's
wait; without ``wait`` it sends what there is and ends), when the server stops,
or when the lineage changes; the follower then asks again from the revision it
reached. A leader that does not know ``stream`` answers the same request as a
long-poll (``application/json``), so a follower needs no second round trip to
find out (meshdns/follower.py).

What a change costs is paid once, not once per stream. The history's hook wakes
one task (``StreamHub``), which reads the change as a long-poll would (coalesced
over ``api.follow_coalesce``), encodes it once, frames it once as an HTTP chunk,
and hands the same bytes to every stream's transport: no request, parse, encode
or task wake-up per stream, one ``write`` each.

Bounded. A stream may hold at most ``api.stream_buffer`` bytes its socket has not
taken. One whose reader does not keep up is cut off (the connection aborted and
its buffer freed) when the next event or heartbeat would go over; its follower
reconnects and catches up from its revision (or re-lists on a 410, if the history
no longer reaches back that far). An event larger than the buffer (a big PUT)
goes to no stream: every stream is ended instead, and each catches up on its own,
paced by its socket as a long-poll answer is. Streams count towards
``api.max_watchers`` with the long-polls.

Joining. The hub's position P is the snapshot of the last event it sent. A new
stream first gets the changes from ``since`` up to P (``ChangeHistory.between``:
as of P, the bytes a long-poll from ``since`` got at P, shared with it through
the delta body cache), written with backpressure; then it joins at P with no
await in between, so it gets every event after P, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..core.registry import Registry
from ..protocol import HEARTBEAT_HEADER, LINEAGE_HEADER
from .follow import check_since, delta_body, gone, why_gone
from .state import ApiError, ApiState

log = logging.getLogger("meshdns.api")

NDJSON = "application/x-ndjson"
PACE = 64 * 1024  # a catch-up is written in slices of this, each once the socket took the last
STREAM_ON = ("1", "true")
STREAM_OFF = ("0", "false")


def wants_stream(request: web.Request, offered: bool) -> bool:
    """Whether to answer with a watch stream: asked for (``stream=1``; 400 for a value
    that is no boolean) and ``offered`` (api.streams; if not, a long-poll answers, as
    from a server that has no streams)."""
    value = request.query.get("stream")
    if value is None or value in STREAM_OFF:
        return False
    if value in STREAM_ON:
        return offered
    raise ApiError(400, f"stream must be 1 or 0 (true or false), got {value[:40]!r}", "stream")


def chunk(line: bytes) -> bytes:
    """``line`` as one HTTP/1.1 chunk, ready for any stream's transport."""
    return b"%x\r\n%s\r\n" % (len(line), line)


class _Stream:
    """One follower's stream: its transport, and how it ended (set by the hub)."""

    __slots__ = ("done", "transport")

    def __init__(self, transport: asyncio.Transport, done: asyncio.Future[str]) -> None:
        self.transport = transport
        self.done = done


def _finish(done: asyncio.Future[str], reason: str) -> None:
    if not done.done():
        done.set_result(reason)


class StreamHub:
    """Every open watch stream of one API, and the task that writes each change to all."""

    def __init__(self, state: ApiState) -> None:
        api = state.server.config.api
        self.state = state
        self.history = state.store.history
        self.buffer = api.stream_buffer
        self.heartbeat = api.stream_heartbeat
        self.coalesce = api.follow_coalesce
        self.streams: dict[_Stream, None] = {}
        self.position: Registry | None = None  # the snapshot of the last event sent
        self.lineage: str | None = None  # ... and its lineage
        self.opened = 0  # streams opened
        self.events = 0  # events encoded (once each) and written to every stream
        self.cut = 0  # streams cut off: their reader did not keep up
        self._heartbeat: tuple[str | None, int, bytes] | None = None
        self._dirty = asyncio.Event()
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._dirty = asyncio.Event()
        self._moved = asyncio.Event()
        self.history.listeners.append(self.notify)
        self._sync_position()
        self._task = self._loop.create_task(self._run(), name="meshdns-stream-hub")

    async def stop(self) -> None:
        if self.notify in self.history.listeners:
            self.history.listeners.remove(self.notify)
        self.end_all()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def notify(self) -> None:
        """The history's hook: may be called from another thread (a direct store.put)."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._dirty.set)
            return
        self._dirty.set()

    # ------------------------------------------------------------ the writer task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.heartbeat)
            except TimeoutError:
                if self.streams and self.position is not None:
                    self._broadcast(self._heartbeat_frame())
                continue
            self._dirty.clear()
            try:
                await self._advance()
            except asyncio.CancelledError:
                raise
            except Exception:  # never leave streams behind a hub that stopped
                log.exception("watch streams: writing a change failed; ending every stream")
                self.end_all()
                self._sync_position()

    async def _advance(self) -> None:
        """Send what the history recorded after the position, as one event."""
        history, pos = self.history, self.position
        if pos is None or history.lineage != self.lineage:
            if pos is not None:
                self.end_all()  # their followers get a 410 and re-list
            self._sync_position()
            return
        if history.revision == pos.revision:
            return
        if not self.streams:
            self._sync_position()  # nobody to send it to: a stream joining later catches up
            return
        changes = history.since(pos.revision, self.lineage)
        if changes is not None and self.coalesce > 0 and changes.first_at is not None:
            delay = changes.first_at + self.coalesce - history.clock()
            if delay > 0:
                await asyncio.sleep(delay)  # gather the rest of a burst into this event
                changes = history.since(pos.revision, self.lineage)
        if changes is None:
            self.end_all()  # the history restarted: each stream catches up, or re-lists
            self._sync_position()
            return
        body = await delta_body(self.state, changes, pos.revision)
        if len(body.body) + 1 > self.buffer:
            self.end_all()  # too large for any stream's buffer: each catches up, paced
        else:
            self._broadcast(chunk(body.body + b"\n"))
        self.events += 1
        self._moved_to(changes.registry)
        if history.revision != changes.registry.revision or history.lineage != self.lineage:
            self._dirty.set()

    def _sync_position(self) -> None:
        self.lineage = self.history.lineage
        reg = self.history.registry
        self._moved_to(reg)

    def _moved_to(self, reg: Registry | None) -> None:
        self.position = reg
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def _broadcast(self, frame: bytes) -> None:
        """``frame`` to every stream; one that would hold more than the buffer is cut."""
        limit = self.buffer - len(frame)
        slow = []
        for stream in tuple(self.streams):
            transport = stream.transport
            if transport.is_closing():
                continue  # gone: its handler is about to leave
            if transport.get_write_buffer_size() > limit:
                slow.append(stream)
                continue
            transport.write(frame)
        for stream in slow:
            self._cut(stream)

    def _cut(self, stream: _Stream) -> None:
        self.streams.pop(stream, None)
        self.cut += 1
        stream.transport.abort()  # the unsent bytes go with it
        _finish(stream.done, "cut")

    def end_all(self) -> None:
        """End every stream after what it was sent (each follower asks again)."""
        streams, self.streams = self.streams, {}
        for stream in streams:
            _finish(stream.done, "ended")

    def _heartbeat_frame(self) -> bytes:
        pos = self.position
        revision = -1 if pos is None else pos.revision
        cached = self._heartbeat
        if cached is None or cached[0] != self.lineage or cached[1] != revision:
            line = json.dumps({"revision": revision, "lineage": self.lineage, "upsert": [],
                               "delete": []}, separators=(",", ":")).encode() + b"\n"
            cached = self._heartbeat = (self.lineage, revision, chunk(line))
        return cached[2]

    # ------------------------------------------------------------ one stream

    def admit(self) -> None:
        watch = self.state.watch
        if watch.waiting >= watch.max_watchers:
            raise ApiError(503, f"too many watchers ({watch.max_watchers}, api.max_watchers); "
                           "retry later", None, {"Retry-After": "1"})

    async def serve(self, request: web.Request, since: int, lineage: str,
                    wait: float) -> web.StreamResponse:
        """The stream of one follower, from ``since`` until ``wait`` ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        resp: web.StreamResponse | None = None
        reached = since
        while True:
            pos = self.position
            if pos is None or self.lineage != lineage:
                if resp is None:
                    raise gone(self.state, f"lineage {lineage!r} is not this registry's "
                               f"({self.history.lineage})")
                return await _end(resp)
            if reached == pos.revision:
                break
            if reached > pos.revision:
                # The history has it and the hub is about to send it: join once it did.
                if loop.time() >= deadline:
                    resp = resp or await self._prepare(request, lineage)
                    return await _end(resp)
                await self._wait_moved(deadline)
                continue
            changes = self.history.between(reached, pos, lineage)
            if changes is None:
                if resp is None:
                    raise why_gone(self.state, reached, lineage)
                return await _end(resp)
            body = await delta_body(self.state, changes, reached)
            resp = resp or await self._prepare(request, lineage)
            try:
                await _write_paced(resp, body.body)
            except ConnectionError:  # the client left during its catch-up
                return resp
            reached = pos.revision
        resp = resp or await self._prepare(request, lineage)
        transport = request.transport
        if transport is None or transport.is_closing():
            return resp
        # Joined at the position, with no await since it was checked: every event after it.
        stream = _Stream(transport, loop.create_future())
        transport.write(self._heartbeat_frame())
        self.streams[stream] = None
        timer = loop.call_at(deadline, _finish, stream.done, "wait")
        try:
            reason = await stream.done
        finally:
            timer.cancel()
            self.streams.pop(stream, None)
        return resp if reason == "cut" else await _end(resp)

    async def _prepare(self, request: web.Request, lineage: str) -> web.StreamResponse:
        if request.version < HttpVersion11:
            raise ApiError(400, "a watch stream needs HTTP/1.1 (chunked transfer)", "stream")
        resp = web.StreamResponse(headers={
            hdrs.CONTENT_TYPE: NDJSON, hdrs.CACHE_CONTROL: "no-cache",
            LINEAGE_HEADER: lineage, HEARTBEAT_HEADER: f"{self.heartbeat:g}"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.opened += 1
        self.state.count("delta", 200)  # sync_requests_total: once, when open
        return resp

    async def _wait_moved(self, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), max(0.0, min(remaining, 1.0)))

    def buffered(self) -> int:
        return sum(s.transport.get_write_buffer_size() for s in self.streams)


async def _write_paced(resp: web.StreamResponse, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), PACE):
        await resp.write(view[start:start + PACE])
    await resp.write(b"\n")


async def _end(resp: web.StreamResponse) -> web.StreamResponse:
    with contextlib.suppress(ConnectionError, RuntimeError):  # the client already left
        await resp.write_eof()
    return resp


async def get_stream(request: web.Request, st: ApiState, hub: StreamHub, since: int,
                     wait: float) -> web.StreamResponse:
    """The answer to ``?since=N&stream=1``: the checks of a long-poll, then the stream."""
    lineage = check_since(st, since, request.query.get("lineage"))
    hub.admit()
    st.watch.waiting += 1  # api.max_watchers counts streams and long-polls together
    try:
        return await hub.serve(request, since, lineage, wait)
    finally:
        st.watch.waiting -= 1


class StreamCollector:
    """meshdns_api_stream*: the watch streams of this API."""

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        yield GaugeMetricFamily("meshdns_api_watchers",
                                "Long-polls parked and watch streams open, together "
                                "(api.max_watchers bounds them).",
                                value=hub.state.watch.waiting)
        yield GaugeMetricFamily("meshdns_api_streams", "Watch streams open (?stream=1).",
                                value=len(hub.streams))
        yield GaugeMetricFamily("meshdns_api_stream_buffered_bytes",
                                "Bytes written to watch streams that their sockets have not "
                                "taken yet, over all streams (each at most api.stream_buffer).",
                                value=hub.buffered())
        yield CounterMetricFamily("meshdns_api_stream_events",
                                  "Changes encoded once and written to every watch stream.",
                                  value=hub.events)
        yield CounterMetricFamily("meshdns_api_stream_cutoffs",
                                  "Watch streams cut off because their reader did not keep up "
                                  "(over api.stream_buffer).", value=hub.cut)


STREAM_KEY = web.AppKey("meshdns_stream_hub", StreamHub)
