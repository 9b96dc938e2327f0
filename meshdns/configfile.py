"""Reading the documents meshdns is given as files: a config file, a seed file, the
body of ``meshdns apply -f``. YAML or JSON to plain data (yamlload.py: no aliases,
bounded nesting, a key named twice refused), each failure said with the file's name.

What the data means is config.py's (the config) and the registry's (services).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .core.registry import clip
from .yamlload import DuplicateKey, load_json, load_yaml


class UnreadableConfig(ValueError):
    """A config file that cannot be read, or is not YAML: the message names the file
    (or, for a key named twice, the key's path and both lines)."""


def read_config_file(path: str | Path) -> Any:
    """The YAML document of the config file at ``path``, as plain data."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UnreadableConfig(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        return load_yaml(text)  # plain data only; no anchors/aliases, bounded nesting
    except DuplicateKey as exc:  # "dns.ttl: duplicate key (lines 3 and 4)"
        raise UnreadableConfig(str(exc)) from None
    except yaml.YAMLError as exc:
        raise UnreadableConfig(f"{path}: not valid YAML: {clip(str(exc), 300)}") from None


def parse_document(text: str | bytes) -> Any:
    """A YAML or JSON document (JSON is YAML, but json.loads is much faster).
    ValueError when it is neither; DuplicateKey (a ValueError) for a key named twice."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "[", b"{", b"["):
        try:
            return load_json(text)
        except DuplicateKey:
            raise
        except ValueError:
            pass  # not JSON after all: let YAML say what is wrong
    try:
        return load_yaml(text)  # plain data only; no anchors/aliases, bounded nesting
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML or JSON: {clip(str(exc), 300)}") from None


def load_document(path: str | Path) -> Any:
    """A YAML or JSON file (seed files share this reader)."""
    return parse_document(Path(path).read_text(encoding="utf-8"))
