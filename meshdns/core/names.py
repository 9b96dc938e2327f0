"""Name rules: RFC 1123 labels, the three name forms a service owns, wire names.

Names inside the core are lower-case dotted strings without the trailing dot
(``frontend.kong.svc.80.mesh``). Wire names are tuples of raw label bytes, the
way they arrive in a query, so the question's exact case can be echoed back.
"""

from __future__ import annotations

import re

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


def wire_to_key(labels: tuple[bytes, ...]) -> str:
    """Lookup key for wire labels: ASCII-lower-cased, dotted, no trailing dot.

    DNS case-insensitivity is ASCII only, so lower the bytes before decoding.
    A label holding a literal dot is escaped so it can never match a name made
    of two labels.
    """
    parts = []
    for label in labels:
        text = label.lower().decode("latin-1")
        if "." in text or "\\" in text:
            text = text.replace("\\", "\\\\").replace(".", "\\.")
        parts.append(text)
    return ".".join(parts)


def key_to_labels(key: str) -> tuple[bytes, ...]:
    """Wire labels for a normalized name (only for names the core built itself)."""
    if not key:
        return ()
    return tuple(part.encode("ascii") for part in key.split("."))
