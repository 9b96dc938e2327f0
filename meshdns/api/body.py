"""Request bodies: content type, size limit while streaming, JSON or YAML decoding."""

from __future__ import annotations

from typing import Any

import yaml
from aiohttp import hdrs, web

from ..core.registry import clip
from ..jsonsteps import load_json_in_steps
from ..kuma import load_kuma, looks_like_kuma, parse_kuma_documents
from ..yamlload import DuplicateKey, load_yaml
from .state import ApiError

JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})

__all__ = ["decode", "decode_services", "object_with", "read_body"]

async def read_body(request: web.Request, limit: int) -> tuple[bytes, str]:
    """The raw body and its kind ("json" or "yaml"); never buffers more than ``limit``.

    415 for a missing or unknown content type (checked before reading anything),
    413 when Content-Length announces more than ``limit`` or the stream turns out
    longer (chunked bodies have no Content-Length to trust).
    """
    if hdrs.CONTENT_TYPE not in request.headers:
        raise ApiError(415, "Content-Type is required: application/json or application/yaml")
    mime = request.content_type.lower()
    if mime in JSON_TYPES:
        kind = "json"
    elif mime in YAML_TYPES:
        kind = "yaml"
    else:
        raise ApiError(415, f"unsupported Content-Type {clip(repr(mime))}: send application/json or "
                       "application/yaml")
    charset = request.charset
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ApiError(415, f"unsupported charset {clip(repr(charset))}: bodies are UTF-8")
    too_big = ApiError(413, f"body larger than {limit} bytes (api.max_body_bytes)")
    length = request.content_length
    if length is not None and length > limit:
        raise too_big
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks), kind


def decode(data: bytes, kind: str) -> Any:
    """The document in ``data``, or 400 (a repeated key names its path in ``field``).
    Pure and CPU-bound: callers run it in a thread."""
    if kind == "json":
        try:
            return load_json_in_steps(data)
        except DuplicateKey as exc:
            raise ApiError(400, exc.reason, exc.path) from None
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"malformed JSON body: {clip(str(exc), 200)}") from None
    try:
        # No anchors or aliases, bounded nesting: a few hundred bytes must not
        # expand into gigabytes (see meshdns.yamlload).
        return load_yaml(data)
    except DuplicateKey as exc:
        raise ApiError(400, exc.reason, exc.path) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        message = clip(" ".join(str(exc).split()), 200)
        raise ApiError(400, f"malformed YAML body: {message}") from None


def decode_services(data: bytes, kind: str, field: str) -> Any:
    """``decode`` for a ``/v1/services`` PUT or PATCH body, which may also be Kuma's own
    documents (docs/meshservice.md section 6): a YAML stream of several documents, or a
    document that ``looks_like_kuma``, becomes ``{field: [mesh service items]}``
    (``services`` for a PUT, ``upsert`` for a PATCH). Errors keep their ``field``
    (``documents[...]``)."""
    try:
        doc = decode(data, kind)
    except ApiError as exc:
        if kind != "yaml" or "single document" not in exc.message:
            raise
        resources = load_kuma(data)  # a stream of several documents
    else:
        if not looks_like_kuma(doc):
            return doc
        resources = parse_kuma_documents([doc])
    return {field: [svc.to_json() for svc in resources]}


def object_with(doc: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``doc`` as a mapping with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(doc, dict):
        raise ApiError(400, "body must be an object with " + " and ".join(
            f'"{k}"' for k in allowed))
    for key in doc:
        if key not in allowed:
            raise ApiError(400, f"unknown field {clip(repr(key))} (known: "
                           f"{', '.join(allowed)})", clip(str(key)))
    for key in required:
        if key not in doc:
            raise ApiError(400, f"{key} is required", key)
    return doc
