"""``/v1/services``: read (ETag, If-None-Match, ``?wait=``, ``?since=`` deltas), PUT, PATCH.

A write is validated whole (body, then the core's checks) before anything
changes; it is answered only once the store made it durable and DNS answers
from it. Parsing, computing and persisting run in worker threads, so a
100k-service push does not stop DNS answers meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import hdrs, web

from ..core.registry import (
    EndpointPatch,
    EntryKey,
    EntrySpec,
    MeshServiceSpec,
    Registry,
    RegistryError,
    apply_patch,
    apply_put,
    check_disjoint,
    clip,
    entry_json,
    parse_deletes,
    parse_endpoint_patches,
    parse_entries,
    patch_incremental,
    with_endpoint_patches,
)
from ..gcpause import bulk_write
from ..protocol import LINEAGE_HEADER, WORKER_HEADER
from ..store import StateWriteError, fast_ip4, fast_ip6
from .body import decode_services, object_with, read_body
from .follow import encoded_response, get_delta, parse_since
from .state import AUDIT_KEY, MAX_WAIT_SECONDS, STATE_KEY, ApiError, ApiState, etag
from .stream import STREAM_KEY, get_stream, wants_stream

log = logging.getLogger("meshdns.api")
# PATCH bodies up to this size are parsed and applied on the event loop (an
# incremental PATCH of a few dozen services: well under a millisecond).
SMALL_PATCH_BYTES = 16 * 1024
T = TypeVar("T")


# ---------------------------------------------------------------- revisions


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def _bare(tag: str) -> str:
    return tag if tag.startswith('"') else f'"{tag}"'  # a bare 7 is taken as "7"


def none_match(header: str, revision: int) -> bool:
    """If-None-Match uses the weak comparison: W/"7" matches "7" (RFC 9110 13.1.2)."""
    current = etag(revision)
    return any(tag == "*" or _bare(tag.removeprefix("W/")) == current for tag in _tags(header))


def require_match(header: str, revision: int) -> None:
    """If-Match uses the strong comparison; a miss is 412 (RFC 9110 13.1.1)."""
    current = etag(revision)
    if not any(tag == "*" or (not tag.startswith("W/") and _bare(tag) == current)
               for tag in _tags(header)):
        raise ApiError(412, f"If-Match {clip(repr(header.strip()))} does not match the current "
                       f"revision {current}: the registry changed, re-read and retry",
                       None, {"ETag": current})


def parse_wait(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ApiError(400, f"wait must be a number of seconds >= 0, got {clip(repr(text))}", "wait")
    return min(value, MAX_WAIT_SECONDS)


# ---------------------------------------------------------------- encoding


def encode_registry(reg: Registry) -> bytes:
    """The GET body; the same shape as ``Registry.to_json``, built ~5x faster (socket's
    address formatting instead of ipaddress's)."""
    services = [entry_json(s, fast_ip4, fast_ip6) for s in reg.entries()]
    return json.dumps({"revision": reg.revision, "services": services},
                      separators=(",", ":")).encode()


def parse_put(data: bytes, kind: str,
              known: Mapping[Any, Any] | None = None) -> list[EntrySpec]:
    """The PUT body's services; ``known`` (those served now) lets unchanged ones be reused."""
    doc = object_with(_core_parse(lambda: decode_services(data, kind, "services")),
                      ("services",), ("services",))
    return _core_parse(lambda: parse_entries(doc["services"], "services", consume=True,
                                             known=known))


def parse_patch(data: bytes, kind: str, known: Mapping[Any, Any] | None = None
                ) -> tuple[list[EntrySpec], list[EntryKey], list[EndpointPatch]]:
    doc = object_with(_core_parse(lambda: decode_services(data, kind, "upsert")),
                      ("upsert", "delete", "endpoints"))
    upserts = _core_parse(lambda: parse_entries(doc.get("upsert", []), "upsert",
                                                consume=True, known=known))
    deletes = _core_parse(lambda: parse_deletes(doc.get("delete", []), "delete"))
    _core_parse(lambda: check_disjoint(upserts, deletes))
    endpoints = _core_parse(lambda: parse_endpoint_patches(doc.get("endpoints", [])))
    return upserts, deletes, endpoints


def _refuse_address_sets_in_etcd(st: ApiState, upserts: Sequence[EntrySpec],
                                 endpoints: Sequence[EndpointPatch] = ()) -> None:
    """501 for an address set (a mesh service with ``endpoints``, or an endpoint patch)
    written to a registry kept in etcd: the etcd endpoint keys (docs/meshservice.md
    section 7) are not built yet. Mesh services with VIPs are stored in etcd like
    services (meshdns/etcd)."""
    if not st.server.config.registry.etcd.endpoints:
        return
    if endpoints or any(isinstance(spec, MeshServiceSpec) and spec.endpoints is not None
                        for spec in upserts):
        raise ApiError(501, "mesh services with address sets (endpoints) cannot be "
                       "stored in etcd yet: give the mesh service a VIP instead, or "
                       "write it to a registry without registry.etcd")


def _core_parse(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RegistryError as exc:
        raise ApiError(exc.status, exc.message, exc.field) from None
    except ValueError as exc:  # the core should only raise RegistryError; never a 500
        raise ApiError(400, f"invalid service: {clip(str(exc))}") from None


# ---------------------------------------------------------------- handlers


async def get_services(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE_KEY]
    store = st.store
    wait = parse_wait(request.query.get("wait"))
    since_text = request.query.get("since")
    since = None if since_text is None else parse_since(since_text)
    stream = wants_stream(request, st.server.config.api.streams)  # (a bad value: 400)
    inm = request.headers.get(hdrs.IF_NONE_MATCH)
    reg = store.registry
    pool = st.server.workers
    worker = request.headers.get(WORKER_HEADER)
    if pool is not None and worker:
        # The revision a worker serves: the one its delta starts from, or its ETag.
        tags = _tags(inm or "")
        served = str(since) if since is not None else \
            tags[0].removeprefix("W/").strip('"') if tags else ""
        if served.isdigit():
            pool.report(worker, int(served))
    just_loaded = not store.loaded
    if just_loaded:
        # A leader with no registry yet: a follower must not copy "empty" as if it were
        # the truth, so this waits for the first load (or says 503, like /readyz).
        if wait > 0:
            await st.watch.wait_while(lambda: not store.loaded, wait)
            reg = store.registry
        if not store.loaded:
            raise ApiError(503, "no registry loaded yet (no state file, seed file or write)",
                           None, {"Retry-After": "1"})
    if since is not None:
        if stream:
            return await get_stream(request, st, request.app[STREAM_KEY], since, wait)
        return await get_delta(request, st, since, wait, coalesce=not worker)
    if not just_loaded and inm is not None and none_match(inm, reg.revision):
        if wait > 0:
            seen = reg.revision
            await st.watch.wait_while(lambda: store.revision == seen, wait)
            reg = store.registry
        if none_match(inm, reg.revision):
            return web.Response(status=304, headers={"ETag": etag(reg.revision)})
    lineage = store.history.lineage
    body = await st.services_body(reg, encode_registry)
    return await encoded_response(request, body, {
        "ETag": etag(reg.revision), "Cache-Control": "no-cache", LINEAGE_HEADER: lineage})


def refuse_if_follower(st: ApiState) -> None:
    leader = st.server.config.registry.follow
    if leader:
        raise ApiError(409, f"read-only follower of {leader}: send registry writes to the "
                       "leader")


async def put_services(request: web.Request) -> web.Response:
    st = request.app[STATE_KEY]
    refuse_if_follower(st)
    data, kind = await read_body(request, st.server.config.api.max_body_bytes)
    with bulk_write():
        specs = await asyncio.to_thread(parse_put, data, kind, st.store.registry.services)
        del data
        _refuse_address_sets_in_etcd(st, specs)
        request[AUDIT_KEY] = {"services": len(specs)}
        store = st.store

        def compute(base: Registry) -> Registry:
            return apply_put(base, specs, store.policy, store.clock())

        return await _write(request, st, compute)


async def patch_services(request: web.Request) -> web.Response:
    st = request.app[STATE_KEY]
    refuse_if_follower(st)
    data, kind = await read_body(request, st.server.config.api.max_body_bytes)
    # A small PATCH (the common one: a few services) is parsed and applied on the
    # loop: it costs well under a millisecond, where each hop to a worker thread
    # waits for the GIL and a loop turn behind a saturating DNS load.
    small = len(data) <= SMALL_PATCH_BYTES
    with bulk_write():
        if small:
            upserts, deletes, endpoints = parse_patch(data, kind, st.store.registry.services)
        else:
            upserts, deletes, endpoints = await asyncio.to_thread(
                parse_patch, data, kind, st.store.registry.services)
        del data
        _refuse_address_sets_in_etcd(st, upserts, endpoints)
        request[AUDIT_KEY] = {"upserted": len(upserts), "deleted": len(deletes)}
        store = st.store

        # An endpoint patch rewrites its entry from the base the write is computed on
        # (atomic with the body's upsert and delete; docs/meshservice.md section 4).
        def compute(base: Registry) -> Registry:
            ups = with_endpoint_patches(base.entry_map, upserts, deletes, endpoints)
            return apply_patch(base, ups, deletes, store.policy, store.clock())

        def quick(base: Registry) -> Registry | None:
            ups = with_endpoint_patches(base.entry_map, upserts, deletes, endpoints)
            return patch_incremental(base, ups, deletes, store.policy, store.clock())

        return await _write(request, st, compute, quick if small else None)


async def _write(request: web.Request, st: ApiState,
                 compute: Callable[[Registry], Registry],
                 quick: Callable[[Registry], Registry | None] | None = None
                 ) -> web.Response:
    if_match = request.headers.get(hdrs.IF_MATCH)
    check = None if if_match is None else lambda base: require_match(if_match, base.revision)
    # The revision each computation started from (a writer may compute again on a newer
    # base): the write changed nothing when the registry it answers with is still there.
    based_on: list[int] = []

    def counted(base: Registry) -> Registry:
        based_on.append(base.revision)
        return compute(base)

    def counted_quick(base: Registry) -> Registry | None:
        assert quick is not None
        new = quick(base)
        if new is not None:
            based_on.append(base.revision)
        return new

    was_loaded = st.store.loaded
    # Shielded: a client hanging up mid-write must not leave the state file ahead of
    # what DNS serves. The write completes (or fails) whatever the client does.
    task = asyncio.ensure_future(st.server.registry_writer.write(
        counted, check=check, quick=None if quick is None else counted_quick))
    task.add_done_callback(_retrieve)
    try:
        reg: Registry = await asyncio.shield(task)
    except RegistryError as exc:
        raise ApiError(exc.status, exc.message, exc.field) from None
    except StateWriteError as exc:  # rolled back: 507 for a full disk or EIO
        log.error("registry write not persisted, nothing changed: %s", exc.message)
        raise ApiError(exc.status, exc.message) from None
    except OSError as exc:
        log.error("registry write not persisted, nothing changed: %s", exc)
        raise ApiError(500, f"the state file could not be written ({exc}); nothing "
                       "changed") from None
    if st.server.workers is not None:
        await st.server.workers.caught_up(reg.revision)  # every DNS process serves it
    # Unchanged: the same revision, nothing persisted or published (an export applied back).
    changed = not was_loaded or not based_on or reg.revision != based_on[-1]
    audit = request.setdefault(AUDIT_KEY, {})
    audit["revision"] = reg.revision
    audit["changed"] = changed
    return web.json_response({"revision": reg.revision, "services": len(reg),
                              "changed": changed}, headers={"ETag": etag(reg.revision)})


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # consumed here when the handler was cancelled before it
