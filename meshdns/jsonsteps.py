"""JSON decoding that lets other threads run: a big body decoded in a worker thread.

``json.loads`` is one C call that holds the GIL from the first byte to the last
(~70 ms for a 100k-service body, ~200 ms for 300k), and ``bytes.decode`` is
another (~5 ms per MiB); ``json.dumps`` likewise. They are done here in steps, so
the event loop thread (DNS) gets the GIL back between them. The API's request
bodies and a follower's full read of its leader's registry decode through here;
the state file is encoded here. A key repeated in one object is refused
(``DuplicateKey`` naming its path), as every reader of meshdns documents does.
"""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
from typing import Any

from .yamlload import DuplicateKey, RepeatedJsonKey, json_duplicate, json_object_hook

_COMPACT = (",", ":")
DUMP_STEP = 250  # list elements per json.dumps call: ~1 ms each for service records


def dumps_in_steps(doc: Any) -> str:
    """``json.dumps(doc, separators=(",", ":"))``, the same text, but a long list (at
    any depth inside dicts) is encoded DUMP_STEP elements per call: one json.dumps of
    a 300k-service state document holds the GIL for ~0.3 s."""
    parts: list[str] = []
    _dump(doc, parts.append)
    return "".join(parts)


def _dump(value: Any, out: Any) -> None:
    if value.__class__ is dict and all(key.__class__ is str for key in value):
        out("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out(",")
            out(json.dumps(key))
            out(":")
            _dump(item, out)
        out("}")
    elif value.__class__ is list and len(value) > DUMP_STEP:
        out("[")
        for i in range(0, len(value), DUMP_STEP):
            if i:
                out(",")
            out(json.dumps(value[i:i + DUMP_STEP], separators=_COMPACT)[1:-1])
        out("]")
    else:
        out(json.dumps(value, separators=_COMPACT))


def load_json_in_steps(data: bytes) -> Any:
    """``json.loads(data)`` (UTF-8), decoded in steps; ValueError when malformed."""
    return loads_in_steps(utf8_in_steps(data))


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


def utf8_in_steps(data: bytes, step: int = 1 << 20) -> str:
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
