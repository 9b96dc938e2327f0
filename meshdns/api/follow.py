"""The delta side of the follow protocol: ``GET /v1/services?since=N&lineage=L&wait=S``.

The answer is what changed after revision N, as ``{"revision", "lineage",
"upsert", "delete"}``: upserts are services as the full GET encodes them (VIPs
included), deletes are ``{name, namespace, port}`` keys. Applied to the
registry at revision N, they give the registry at ``revision`` exactly (the
full GET of both lists the same services). Nothing newer within the wait is a
200 with an empty delta and ``revision`` N; a long-poll woken by a change
first waits until ``api.follow_coalesce`` has passed since the oldest change
it will carry, so a burst of writes goes out as a few deltas. N that the
history (meshdns/history.py) does not reach, N ahead of the registry, or a
lineage other than the server's, is 410 Gone: re-list with a full GET.

Bodies a follower may find big (a full list, a large delta) are gzipped when
the client accepts gzip, once per snapshot or delta however many ask.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from aiohttp import hdrs, web

from ..core.registry import Entry, EntryKey, entry_json, key_json
from ..gcpause import paused
from ..history import Changes
from ..protocol import LINEAGE_HEADER
from ..store import fast_ip4, fast_ip6
from .state import ApiError, ApiState, Encoded, etag

ENCODE_IN_THREAD = 2000  # deltas with more services than this are encoded off the loop


def parse_since(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ApiError(400, f"since must be a revision (an integer >= 0), got {text!r}",
                       "since")
    return int(text)


def accepts_gzip(request: web.Request) -> bool:
    """Whether Accept-Encoding allows gzip (a ``q=0`` refuses it)."""
    for item in request.headers.get(hdrs.ACCEPT_ENCODING, "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower().removeprefix("q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return False
    return False


async def encoded_response(request: web.Request, body: Encoded,
                           headers: dict[str, str]) -> web.Response:
    headers = dict(headers, **{hdrs.VARY: hdrs.ACCEPT_ENCODING})
    if body.compressible and accepts_gzip(request):
        headers[hdrs.CONTENT_ENCODING] = "gzip"
        data = await body.gzipped()
    else:
        data = body.body
    return web.Response(body=data, content_type="application/json", headers=headers)


def _record(s: Entry) -> dict[str, object]:
    return entry_json(s, fast_ip4, fast_ip6)  # as the full GET encodes it


def encode_delta(changes: Changes, keys: Iterable[EntryKey]) -> bytes:
    services = changes.registry.entry_map
    upsert, delete = [], []
    for key in keys:
        svc = services.get(key)
        if svc is None:
            delete.append(key_json(key))
        else:
            upsert.append(_record(svc))
    return json.dumps({"revision": changes.registry.revision, "lineage": changes.lineage,
                       "upsert": upsert, "delete": delete}, separators=(",", ":")).encode()


def gone(st: ApiState, message: str) -> ApiError:
    return ApiError(410, f"{message}: re-list with GET /v1/services (no since)", "since",
                    {LINEAGE_HEADER: st.store.history.lineage})


def check_since(st: ApiState, since: int, lineage: str | None) -> str:
    """410 for a lineage other than the server's (or the one it continues, up to where
    it does) or a revision ahead of its registry; the lineage the answer is in."""
    history = st.store.history
    effective = history.resolve(lineage, since)
    if effective is None:
        raise gone(st, f"lineage {lineage!r} is not this registry's ({history.lineage}): "
                   "its revisions restarted")
    current = history.revision
    if current is not None and since > current:
        raise gone(st, f"revision {since} is ahead of this registry's {current}")
    return effective


async def get_delta(request: web.Request, st: ApiState, since: int, wait: float,
                    coalesce: bool) -> web.Response:
    """The answer to ``?since=``; ``coalesce`` False answers a change at once (a
    dns.workers process, whose main process acknowledges writes only once it serves them)."""
    history = st.store.history
    lineage = check_since(st, since, request.query.get("lineage"))
    current = history.revision
    if wait > 0 and current == since:
        await st.watch.wait_while(
            lambda: history.revision == since and history.lineage == lineage, wait)
    changes = history.since(since, lineage)
    if changes is None:
        raise why_gone(st, since, lineage)
    window = st.server.config.api.follow_coalesce
    if coalesce and window > 0 and changes.first_at is not None:
        delay = changes.first_at + window - history.clock()
        if delay > 0:
            await asyncio.sleep(delay)  # gather the rest of a burst into this answer
            changes = history.since(since, lineage)
            if changes is None:
                raise why_gone(st, since, lineage)
    body = await delta_body(st, changes, since)
    return await encoded_response(request, body, {
        "ETag": etag(changes.registry.revision), "Cache-Control": "no-cache",
        LINEAGE_HEADER: changes.lineage})


def why_gone(st: ApiState, since: int, lineage: str | None) -> ApiError:
    history = st.store.history
    if lineage is not None and lineage != history.lineage:
        return gone(st, f"lineage {lineage!r} is not this registry's ({history.lineage})")
    if not st.store.loaded or history.revision is None:
        return ApiError(503, "no registry loaded yet (no state file, seed file or write)",
                        None, {"Retry-After": "1"})
    return gone(st, f"revision {since} is older than the change history kept "
                f"(from {history.oldest}, api.follow_history)")


async def delta_body(st: ApiState, changes: Changes, since: int) -> Encoded:
    """The delta from ``since`` to ``changes``, encoded once (shared with long-polls)."""
    key = (changes.lineage, since, changes.registry.revision)
    body = st.delta_body(key)
    if body is None:
        keys = sorted(changes.keys)  # a stable order: the same delta, the same bytes
        if len(keys) > ENCODE_IN_THREAD:
            data = await asyncio.to_thread(paused(encode_delta), changes, keys)
        else:
            data = encode_delta(changes, keys)
        body = Encoded(data)
        st.keep_delta_body(key, body)
    return body
