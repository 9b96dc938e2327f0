"""The one YAML loader (API bodies, config and seed files): plain data, bounded work,
and the one duplicate-key rule, which the JSON readers share.

YAML anchors and aliases let a few hundred bytes describe an exponentially
large document ("billion laughs"); expanding it, or later formatting it into
an error message, stops the process for seconds to hours. meshdns documents
never need them, so this loader refuses an anchor or alias when the composer
meets it, before anything is expanded. Nesting is bounded too (the composer
recurses per level), and so are the digits of a YAML 1.1 number (base-60
"sexagesimal" integers are converted in quadratic time).

libyaml (when PyYAML has it) still scans and parses; composition runs in
PyYAML's Python composer with the checks above, construction in SafeConstructor.

A mapping that names a key twice is refused too (``DuplicateKey``): YAML and JSON
parsers keep the last value without a word, so ``dns: {ttl: 30, ttl: 40}`` would
mean 40 and a second ``registry:`` block would drop the first one's keys. The YAML
constructor checks each mapping it builds; JSON readers pass ``json_object_hook``
to the json module and turn its ``RepeatedJsonKey`` into a ``DuplicateKey`` with
``json_duplicate`` (which finds the path, only once a duplicate was seen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

MAX_DEPTH = 64  # nested collections; a registry document needs 4
MAX_NUMBER_CHARS = 64  # a number scalar longer than this is refused, not converted


class YamlRefused(yaml.YAMLError):
    """Well-formed YAML that meshdns refuses to load (aliases, depth, huge numbers)."""


def _where(node_or_event: Any) -> str:
    mark = getattr(node_or_event, "start_mark", None)
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


class _BoundedComposer(Composer):
    """Composer that never expands an alias and stops at ``MAX_DEPTH`` levels."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()  # type: ignore[attr-defined]  # the parser's, via the MRO
        if isinstance(event, AliasEvent):
            raise YamlRefused(f"YAML aliases are not allowed (alias *{_clip(event.anchor or '')}"
                              f"{_where(event)})")
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise YamlRefused(f"YAML aliases are not allowed (anchor &{_clip(event.anchor)}"
                              f"{_where(event)})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlRefused(f"YAML nested deeper than {MAX_DEPTH} levels{_where(event)}")
            node: Node | None = super().compose_node(parent, index)
            assert node is not None  # compose_node returns None only at stream end
            return node
        finally:
            self._depth -= 1


class _BoundedConstructor(SafeConstructor):
    _document: Node | None = None

    def construct_document(self, node: Node) -> Any:
        self._document = node  # where a duplicate key's path is looked up from
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: MappingNode) -> None:
        seen: dict[Any, Node] = {}
        for key_node, _value in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a mapping as a key is refused by construction itself
            key = self.construct_object(key_node)  # cached: construction reuses it
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue
            if first is not key_node:
                where = _node_path(self._document, node)
                raise DuplicateKey(field_path(where, key), _places(first, key_node))

    def construct_yaml_int(self, node: ScalarNode) -> Any:
        _check_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: ScalarNode) -> Any:
        _check_number(node)
        return super().construct_yaml_float(node)


_BoundedConstructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:int", _BoundedConstructor.construct_yaml_int)
_BoundedConstructor.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:float", _BoundedConstructor.construct_yaml_float)


def _places(first: Node, again: Node) -> str:
    a, b = first.start_mark, again.start_mark
    if a.line == b.line:  # a flow mapping: {ttl: 30, ttl: 40}
        return f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
    return f"lines {a.line + 1} and {b.line + 1}"


_MERGE_TAG = "tag:yaml.org,2002:merge"  # "<<": YAML merge keys override by design


def _node_path(root: Node | None, target: Node) -> str:
    """The key path of ``target`` in the document ``root`` (walked on an error only)."""
    stack: list[tuple[Node, str]] = [] if root is None else [(root, "")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, ScalarNode) else "?"
                stack.append((value_node, field_path(path, key)))
        elif isinstance(node, SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return ""


def _check_number(node: ScalarNode) -> None:
    if len(node.value) > MAX_NUMBER_CHARS:
        raise ConstructorError(None, None, f"number longer than {MAX_NUMBER_CHARS} characters",
                               node.start_mark)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class PurePythonLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,
                       _BoundedComposer, _BoundedConstructor, Resolver):
    def __init__(self, stream: Any) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _BoundedConstructor.__init__(self)
        Resolver.__init__(self)


Loader: Any = PurePythonLoader
try:
    from yaml._yaml import CParser

    class LibyamlLoader(_BoundedComposer, CParser, _BoundedConstructor, Resolver):
        """libyaml's parser (events) under the bounded composer: MRO puts the
        Python composer's methods before CParser's own (which would expand aliases)."""

        def __init__(self, stream: Any) -> None:
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _BoundedConstructor.__init__(self)
            Resolver.__init__(self)

    Loader = LibyamlLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    pass


def load_yaml(data: str | bytes) -> Any:
    """The single document in ``data`` as plain data; yaml.YAMLError (YamlRefused for
    aliases, deep nesting, huge numbers) when it is not acceptable."""
    loader = Loader(data)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ---------------------------------------------------------------- duplicate keys


class DuplicateKey(ValueError):
    """A mapping that names one key twice: refused wherever a document comes in.

    ``path`` is the key, named as meshdns names fields (``dns.ttl``,
    ``services[0].name``); ``reason`` says what is wrong, with where the two are in a
    YAML document (``places``: "lines 3 and 4").
    """

    def __init__(self, path: str, places: str | None = None) -> None:
        self.path = path
        self.reason = "duplicate key" + ("" if places is None else f" ({places})")
        super().__init__(f"{path}: {self.reason}")


def field_path(parent: str, key: Any) -> str:
    """``parent.key``, or ``key`` at the top of a document."""
    name = _clip(str(key), 80)
    return f"{parent}.{name}" if parent else name


class RepeatedJsonKey(Exception):
    """Raised by ``json_object_hook`` inside the json module, which cannot say where:
    catch it and raise ``json_duplicate(...)`` instead."""


JsonObjectHook = Callable[[list[tuple[str, Any]]], dict[str, Any]]


def json_object_hook(share: Callable[[str, str], str] | None = None) -> JsonObjectHook:
    """An ``object_pairs_hook`` for the json module: each object as a dict, or
    RepeatedJsonKey when it names a key twice (the dict would be shorter).

    ``share`` (a ``dict.setdefault``) makes equal keys one string across separately
    decoded values, as one ``json.loads`` does; doing it here costs no second pass.
    """
    if share is None:
        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            obj = dict(pairs)
            if len(obj) != len(pairs):
                raise RepeatedJsonKey
            return obj
        return unique

    def unique_shared(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = {}
        for k, v in pairs:  # a loop: a comprehension costs a frame per object (3.11)
            obj[share(k, k)] = v
        if len(obj) != len(pairs):
            raise RepeatedJsonKey
        return obj
    return unique_shared


class _Pairs(list[tuple[str, Any]]):
    """A JSON object kept as its pairs, repeats included."""


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_Pairs)


def json_duplicate(text: str, start: int = 0, path: str = "") -> DuplicateKey:
    """The first repeated key in the JSON value that starts at ``text[start]`` (found at
    ``path`` in its document). Decodes that value again: called after a hook saw one."""
    doc, _end = _PAIRS_DECODER.raw_decode(text, start)
    stack: list[tuple[Any, str]] = [(doc, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            children = []
            for key, item in value:
                here = field_path(where, key)
                if key in seen:
                    return DuplicateKey(here)
                seen.add(key)
                children.append((item, here))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(item, f"{where}[{i}]") for i, item in enumerate(value)]))
    return DuplicateKey(path or "(document)")  # not reached: the hook saw a repeat


_UNIQUE = json_object_hook()


def load_json(text: str | bytes) -> Any:
    """``json.loads(text)``, refusing a repeated key with DuplicateKey."""
    try:
        return json.loads(text, object_pairs_hook=_UNIQUE)
    except RepeatedJsonKey:
        if isinstance(text, bytes):
            text = text.decode(json.detect_encoding(text))
        start = len(text) - len(text.lstrip(" \t\n\r"))
        raise json_duplicate(text, start) from None
