"""The names a service can have: RFC 1123 syntax, the canonical and Kuma forms,
and the ``dns.hostname_templates`` that render the others.

Names here are lower-case dotted strings without the trailing dot
(``frontend.kong.svc.80.mesh``). What a snapshot renders from the templates is
its name table (_nametable.py); names as DNS questions carry them (tuples of raw
label bytes) are answering's (``meshdns.core.answer``, _wire.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# RFC 1123 label: letters, digits, hyphen; no hyphen at either end; 1..63 chars.
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A hostname label may also carry underscores (_http._tcp style, Kuma tags).
_HOST_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

MAX_NAME_LENGTH = 253  # presentation form without the trailing dot (255 on the wire)


def is_rfc1123_label(label: str) -> bool:
    if label.isalnum() and label.isascii() and len(label) <= 63:
        # The common shape, no hyphen: letters and digits, the letters lower-case.
        return label.islower() or label.isdigit()
    return bool(_LABEL_RE.fullmatch(label))  # fullmatch: "$" would let "web\n" through


def normalize_hostname(name: str) -> str | None:
    """Lower-case ``name`` without a trailing dot, or None if it is not a valid FQDN."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME_LENGTH:
        return None
    if all(_HOST_LABEL_RE.fullmatch(label) for label in name.split(".")):
        return name
    return None


def normalize_domain(name: str) -> str | None:
    """A served domain: a valid FQDN made of LDH labels."""
    return normalize_hostname(name)


def canonical_name(name: str, namespace: str, port: int, domain: str) -> str:
    return f"{name}.{namespace}.svc.{port}.{domain}"


def kuma_name(name: str, namespace: str, port: int, domain: str) -> str | None:
    """Kuma tag form ``<name>_<ns>_svc_<port>.<domain>``; None when the label exceeds 63."""
    label = f"{name}_{namespace}_svc_{port}"
    if len(label) > 63:
        return None
    return f"{label}.{domain}"


def is_subdomain(name: str, parent: str) -> bool:
    """True when ``name`` equals ``parent`` or lies below it (both normalized)."""
    return name == parent or name.endswith("." + parent)


# ---------------------------------------------------------------- hostname templates
#
# ``dns.hostname_templates``: the names a service answers to, rendered from its
# fields when a snapshot is built (never on the DNS path). The two built-in forms
# are recognized by their exact text and keep being answered by parsing the
# question (no per-name table): the default list reproduces today's names exactly.

CANONICAL_TEMPLATE = "{name}.{namespace}.svc.{port}.{domain}"
KUMA_TEMPLATE = "{name}_{namespace}_svc_{port}.{domain}"
DEFAULT_TEMPLATES = (CANONICAL_TEMPLATE, KUMA_TEMPLATE)
_FIELDS = frozenset({"name", "namespace", "port", "mesh", "zone", "domain", "display_name"})
# What a template's ``kinds`` may name: "Service" is the legacy (name, namespace, port)
# form (kept here, not imported: _service.py's ENTRY_KINDS is the same list).
TEMPLATE_KINDS = ("Service", "MeshService", "MeshExternalService", "MeshMultiZoneService")
Selector = tuple[tuple[str, str], ...]  # matchLabels, sorted; "mesh"/"zone" match the fields


class Selectable(Protocol):
    @property
    def mesh(self) -> str | None: ...
    @property
    def zone(self) -> str | None: ...
    def label(self, key: str) -> str | None: ...


def selects(spec: Selectable, select: Selector) -> bool:
    """Whether ``spec`` matches every (key, value) of the selector (``dns.select``, a
    template's ``matchLabels``): keys ``mesh`` and ``zone`` match those fields."""
    for key, value in select:
        if key == "mesh":
            have = spec.mesh
        elif key == "zone":
            have = spec.zone
        else:
            have = spec.label(key)
        if have != value:
            return False
    return True
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_LITERAL_RE = re.compile(r"[a-z0-9._-]*")
MAX_TEMPLATES = 16


class TemplateError(ValueError):
    """A template that cannot be used, and why."""


@dataclass(frozen=True, slots=True)
class HostnameTemplate:
    text: str
    # Literal text and placeholders in order: a str is literal, a tuple
    # (field,) or ("label", key) a placeholder.
    parts: tuple[str | tuple[str, ...], ...]
    builtin: str | None  # "canonical" / "kuma": answered by parsing the question
    # The object form's selector: the entry kinds it names (None: every kind) and its
    # matchLabels (docs/meshservice.md section 2).
    kinds: frozenset[str] | None = None
    match: Selector = ()

    @property
    def uses_domain(self) -> bool:
        return ("domain",) in self.parts

    @property
    def uses_port(self) -> bool:
        return ("port",) in self.parts

    def applies(self, kind: str, spec: Selectable) -> bool:
        """Whether the template names an entry of ``kind`` (``Service`` for the legacy
        form) with these fields and labels."""
        return (self.kinds is None or kind in self.kinds) and \
            (not self.match or selects(spec, self.match))

    def render(self, values: Mapping[str, str | None], labels: Mapping[str, str],
               domain: str) -> str | None:
        """The name for one service (lower-case), None when a field it uses is not set."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif part[0] == "label":
                value = labels.get(part[1])
                if value is None:
                    return None
                out.append(value)
            elif part[0] == "domain":
                out.append(domain)
            else:
                field_value = values.get(part[0])
                if field_value is None:
                    return None
                out.append(field_value)
        return "".join(out).lower()


def parse_template(text: str) -> HostnameTemplate:
    """A template from its text, or TemplateError saying what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise TemplateError("must be a non-empty string")
    parts: list[str | tuple[str, ...]] = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(text):
        literal = text[pos:m.start()]
        if literal:
            parts.append(literal)
        inner = m.group(1)
        if inner.startswith("label:"):
            key = inner[len("label:"):]
            if not key or not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9._-]{1,63}", key):
                raise TemplateError(f"{{{inner}}}: a label placeholder needs a label key")
            parts.append(("label", key))
        elif inner in _FIELDS:
            parts.append((inner,))
        else:
            raise TemplateError(
                f"unknown placeholder {{{inner[:40]}}}: use {{name}}, {{namespace}}, {{port}}, "
                "{mesh}, {zone}, {domain}, {display_name} or {label:KEY}")
        pos = m.end()
    if text[pos:]:
        parts.append(text[pos:])
    for part in parts:
        if isinstance(part, str) and not _LITERAL_RE.fullmatch(part):
            raise TemplateError(f"literal text {part[:40]!r} may hold only a-z, 0-9, '.', "
                                "'-' and '_' (and placeholders in braces)")
    if not any(isinstance(p, tuple) and p[0] in ("name", "label", "display_name")
               for p in parts):
        raise TemplateError("must use {name} or a {label:KEY}: otherwise every service "
                            "gets the same name")
    builtin = {CANONICAL_TEMPLATE: "canonical", KUMA_TEMPLATE: "kuma"}.get(text)
    return HostnameTemplate(text, tuple(parts), builtin)


@dataclass(frozen=True, slots=True)
class TemplateItem:
    """A ``dns.hostname_templates`` item in object form: ``{template, kinds?,
    matchLabels?}`` (a plain string is a template for every entry)."""

    template: str
    kinds: tuple[str, ...] | None = None
    match_labels: Selector = ()


TemplateSource = str | TemplateItem
_ITEM_FIELDS = frozenset({"template", "kinds", "matchLabels"})


def template_item(raw: Any) -> TemplateSource:
    """One configured item, checked: a string, or a mapping made a TemplateItem;
    TemplateError (its text may start with ``.field: ``) when it is neither."""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, Mapping):
        raise TemplateError("must be a string or an object {template, kinds?, matchLabels?}")
    unknown = sorted(str(k) for k in raw if k not in _ITEM_FIELDS)
    if unknown:
        raise TemplateError(f"unknown field {unknown[0][:40]!r}: use template, kinds, "
                            "matchLabels")
    text = raw.get("template")
    if not isinstance(text, str):
        raise TemplateError(".template: must be a string")
    kinds = raw.get("kinds")
    if kinds is not None:
        if not isinstance(kinds, list) or not kinds or not all(
                k in TEMPLATE_KINDS for k in kinds):
            raise TemplateError(f".kinds: must be a non-empty list of {', '.join(TEMPLATE_KINDS)}")
        kinds = tuple(dict.fromkeys(kinds))
    match = raw.get("matchLabels", {})
    if not isinstance(match, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in match.items()):
        raise TemplateError(".matchLabels: must be an object of label keys to string values "
                            '(quote "true"/"false")')
    return TemplateItem(text, kinds, tuple(sorted(match.items())))


def template_items_raw(items: Sequence[TemplateSource]) -> list[Any]:
    """Checked items back as plain data (what ``check_template_items`` reads again)."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, TemplateItem):
            raw: dict[str, Any] = {"template": item.template}
            if item.kinds is not None:
                raw["kinds"] = list(item.kinds)
            if item.match_labels:
                raw["matchLabels"] = dict(item.match_labels)
            out.append(raw)
        else:
            out.append(item)
    return out


def check_template_items(value: Any) -> tuple[TemplateSource, ...]:
    """``dns.hostname_templates`` checked (config.py's validation): a non-empty list of
    items, none repeated, each a usable template; TemplateError (``[i]: why`` for an
    item) otherwise."""
    if not isinstance(value, list) or not value:
        raise TemplateError("must be a non-empty list of templates")
    items = []
    for i, raw in enumerate(value):
        try:
            items.append(template_item(raw))
        except TemplateError as exc:
            text = str(exc)
            raise TemplateError(f"[{i}]{'' if text.startswith('.') else ': '}{text}") from None
    if len(set(items)) != len(items):
        raise TemplateError("must not repeat an entry")
    parse_templates(items)
    return tuple(items)


def parse_templates(texts: Sequence[TemplateSource]) -> tuple[HostnameTemplate, ...]:
    """Templates in order; TemplateError prefixed with the index of the bad one."""
    if len(texts) > MAX_TEMPLATES:
        raise TemplateError(f"at most {MAX_TEMPLATES} templates")
    out = []
    for i, item in enumerate(texts):
        try:
            if isinstance(item, TemplateItem):
                t = parse_template(item.template)
                kinds = None if item.kinds is None else frozenset(item.kinds)
                out.append(HostnameTemplate(t.text, t.parts, t.builtin, kinds,
                                            item.match_labels))
            else:
                out.append(parse_template(item))
        except TemplateError as exc:
            raise TemplateError(f"[{i}]: {exc}") from None
    return tuple(out)


DEFAULT_HOSTNAME_TEMPLATES = parse_templates(DEFAULT_TEMPLATES)


def is_valid_generated(name: str) -> bool:
    """A rendered name: an RFC 1123 subdomain (LDH labels), at most 253 characters."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return False
    return all(is_rfc1123_label(label) for label in name.split("."))
