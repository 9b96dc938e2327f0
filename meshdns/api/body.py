"""Request bodies: content type, size limit while streaming, JSON or YAML decoding."""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
from typing import Any

import yaml
from aiohttp import hdrs, web

from ..core.parse import clip
from ..yamlload import (
    DuplicateKey,
    RepeatedJsonKey,
    json_duplicate,
    json_object_hook,
    load_yaml,
)
from .state import ApiError

JSON_TYPES = frozenset({"application/json"})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})

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
            return loads_in_steps(_utf8_in_steps(data))
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


_DECODER = json.JSONDecoder(object_pairs_hook=json_object_hook())
_WS = frozenset(" \t\n\r")
_SPACE = re.compile(r"[ \t\n\r]*")


def loads_in_steps(text: str) -> Any:
    """``json.loads(text)``, but a top-level object's list values are decoded one
    element at a time.

    json.loads is one C call that holds the GIL throughout: ~70 ms for a
    100k-service body, during which the DNS thread cannot answer. Between the
    elements here the interpreter can switch threads, so a write decoded in a
    worker thread delays DNS by the size of one element instead.

    A repeated key anywhere is refused (DuplicateKey, with its path): the check rides
    on the decoding of each object (``json_object_hook``), at no measurable cost.
    """
    i = _skip(text, 0)
    if text[i:i + 1] != "{":
        doc, i = _value(text, i, "")
        return _end(text, i, doc)
    out: dict[str, Any] = {}
    i = _skip(text, i + 1)
    if text[i:i + 1] == "}":
        return _end(text, i + 1, out)
    while True:
        if text[i:i + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                       text, i)
        key, i = _DECODER.raw_decode(text, i)
        if key in out:
            raise DuplicateKey(key)
        i = _skip(text, i)
        if text[i:i + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
        i = _skip(text, i + 1)
        if text[i:i + 1] == "[":
            out[key], i = _list_in_steps(text, i, key)
        else:
            out[key], i = _value(text, i, key)
        i = _skip(text, i)
        sep = text[i:i + 1]
        if sep == "}":
            return _end(text, i + 1, out)
        if sep != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
        i = _skip(text, i + 1)


def _value(text: str, i: int, path: str) -> tuple[Any, int]:
    """One JSON value at ``text[i]`` (at ``path`` in the document) and where it ends."""
    try:
        return _DECODER.raw_decode(text, i)
    except RepeatedJsonKey:
        raise json_duplicate(text, i, path) from None


def _list_in_steps(text: str, i: int, path: str) -> tuple[list[Any], int]:
    # json.loads shares one string per distinct key across the whole document; one
    # scan per element would give every element its own copies ("name", "port", ...),
    # which at 1M services left ~300 MiB of the heap fragmented after the write.
    keys: dict[str, str] = {}
    decoder = json.JSONDecoder(object_pairs_hook=json_object_hook(keys.setdefault))
    # The C scanner raw_decode wraps, without its Python frame per item.
    scan: Any = json.scanner.make_scanner(decoder)  # type: ignore[arg-type]  # typeshed
    items: list[Any] = []
    append = items.append
    i = _skip(text, i + 1)
    if text[i:i + 1] == "]":
        return items, i + 1
    while True:
        try:
            item, end = scan(text, i)
        except StopIteration as err:
            raise json.JSONDecodeError("Expecting value", text, err.value) from None
        except RepeatedJsonKey:
            raise json_duplicate(text, i, f"{path}[{len(items)}]") from None
        i = end
        append(item)
        sep = text[i:i + 1]
        if sep in _WS:
            i = _skip(text, i)
            sep = text[i:i + 1]
        if sep == ",":
            i += 1
            if text[i:i + 1] in _WS:
                i = _skip(text, i)
            continue
        if sep == "]":
            return items, i + 1
        raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    match = _SPACE.match(text, i)
    return i if match is None else match.end()


def _utf8_in_steps(data: bytes, step: int = 1 << 20) -> str:
    """``data.decode("utf-8")`` a MiB at a time (one call holds the GIL ~5 ms per MiB)."""
    if len(data) <= step:
        return data.decode("utf-8")
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    parts = [decoder.decode(view[i:i + step]) for i in range(0, len(data), step)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _end(text: str, i: int, doc: Any) -> Any:
    i = _skip(text, i)
    if i != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return doc


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
