"""The one YAML loader (API bodies, config and seed files): plain data, bounded work.

YAML anchors and aliases let a few hundred bytes describe an exponentially
large document ("billion laughs"); expanding it, or later formatting it into
an error message, stops the process for seconds to hours. meshdns documents
never need them, so this loader refuses an anchor or alias when the composer
meets it, before anything is expanded. Nesting is bounded too (the composer
recurses per level), and so are the digits of a YAML 1.1 number (base-60
"sexagesimal" integers are converted in quadratic time).

libyaml (when PyYAML has it) still scans and parses; composition runs in
PyYAML's Python composer with the checks above, construction in SafeConstructor.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import Node, ScalarNode
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
