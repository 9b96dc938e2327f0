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
_FIELDS = frozenset({"name", "namespace", "port", "mesh", "zone", "domain"})
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

    @property
    def uses_domain(self) -> bool:
        return ("domain",) in self.parts

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
                "{mesh}, {zone}, {domain} or {label:KEY}")
        pos = m.end()
    if text[pos:]:
        parts.append(text[pos:])
    for part in parts:
        if isinstance(part, str) and not _LITERAL_RE.fullmatch(part):
            raise TemplateError(f"literal text {part[:40]!r} may hold only a-z, 0-9, '.', "
                                "'-' and '_' (and placeholders in braces)")
    if not any(isinstance(p, tuple) and p[0] in ("name", "label") for p in parts):
        raise TemplateError("must use {name} or a {label:KEY}: otherwise every service "
                            "gets the same name")
    builtin = {CANONICAL_TEMPLATE: "canonical", KUMA_TEMPLATE: "kuma"}.get(text)
    return HostnameTemplate(text, tuple(parts), builtin)


def parse_templates(texts: Sequence[str]) -> tuple[HostnameTemplate, ...]:
    """Templates in order; TemplateError prefixed with the index of the bad one."""
    if len(texts) > MAX_TEMPLATES:
        raise TemplateError(f"at most {MAX_TEMPLATES} templates")
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(parse_template(text))
        except TemplateError as exc:
            raise TemplateError(f"[{i}]: {exc}") from None
    return tuple(out)


DEFAULT_HOSTNAME_TEMPLATES = parse_templates(DEFAULT_TEMPLATES)


def is_valid_generated(name: str) -> bool:
    """A rendered name: an RFC 1123 subdomain (LDH labels), at most 253 characters."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return False
    return all(is_rfc1123_label(label) for label in name.split("."))
