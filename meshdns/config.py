"""Configuration: frozen dataclasses, one per section, every key defaulted and checked.

Each key is declared once: its field's metadata (``key(default, check)``) holds the
check its value goes through (and the environment variable that overrides it, if
any). One parser (``_read_section``) walks any section at any depth, from the top
level to ``registry.etcd``, ``log.dnstap`` and each ``dns.forward`` entry: it reports
every bad or unknown key, each with its dotted path and the reason, e.g.
``dns.ttl: must be an integer 0..86400, got "x"`` or ``dns.forward[1].zone: ...``.
Then each section's ``validate()`` checks the rules between its own keys, and, once
the environment is applied, ``Config.validate`` the rules across sections.

The file itself (YAML or JSON to plain data, duplicate keys refused) is read by
configfile.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .configfile import UnreadableConfig, read_config_file
from .core.registry import (
    DEFAULT_TEMPLATES,
    QUOTE_LIMIT,
    TemplateError,
    TemplateSource,
    check_template_items,
    clip,
    label_key_error,
    normalize_domain,
    normalize_hostname,
    quote,
    template_items_raw,
)


class ConfigError(ValueError):
    """Config keys with a bad value, or unknown keys: ``errors`` has one line each."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]

    @classmethod
    def of(cls, errors: list[str]) -> ConfigError:
        return cls("; ".join(errors), errors)


@dataclass(frozen=True, order=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---------------------------------------------------------------- how a key is declared

T = TypeVar("T")
Check = Callable[[str, Any], Any]  # (dotted path, value as read) -> value; raises ConfigError


@dataclass(frozen=True)
class Key:
    """What a config field declares in its metadata (``key()`` builds the field)."""

    check: Check
    env: str | None = None  # a non-empty value of this variable replaces the file's
    env_with: str | None = None  # ... only when this key of the section is set
    file: bool = False  # a file read at start: must be readable (unless check_files off)
    raw: Callable[[Any], Any] | None = None  # the value as plain data, when not the obvious


_KEY = "meshdns.config"  # the metadata entry holding a field's Key


def key(default: Any, check: Check, *, env: str | None = None, env_with: str | None = None,
        file: bool = False, raw: Callable[[Any], Any] | None = None) -> Any:
    """A config field: its default (``MISSING``: the key is required), its check, and
    the rest of ``Key``. The default may be a section class: then a fresh one each time."""
    spec = {_KEY: Key(check, env, env_with, file, raw)}
    if isinstance(default, type):
        return field(default_factory=default, metadata=spec)
    return field(default=default, metadata=spec)


def key_of(f: Field[Any]) -> Key:
    spec = f.metadata[_KEY]
    assert isinstance(spec, Key)
    return spec


class Section:
    """A config section (a frozen dataclass of ``key()`` fields): ``validate`` says what
    its keys cannot be together, one line per rule broken, under ``path`` (its own)."""

    def validate(self, path: str) -> list[str]:
        return []


# Off for `check-config --skip-files`: the files a config names are on another machine.
_CHECK_FILES: ContextVar[bool] = ContextVar("meshdns_config_check_files", default=True)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _read_fields(cls: type[Any], path: str, raw: Mapping[Any, Any]
                 ) -> tuple[dict[str, Any], list[str], list[str]]:
    """Each key of ``raw`` through its field's check: the values, every bad or unknown
    key, and every file (a key declared ``file``) that cannot be read."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    errors: list[str] = []
    unreadable: list[str] = []
    for name, value in raw.items():
        f = known.get(name) if isinstance(name, str) else None
        if f is None:
            errors.append(f"{_at(path, clip(str(name)))}: unknown key (known: "
                          f"{', '.join(known)})")
            continue
        spec, where = key_of(f), _at(path, name)
        try:
            values[name] = spec.check(where, value)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        if spec.file and values[name] is not None and _CHECK_FILES.get() \
                and not os.access(values[name], os.R_OK):
            unreadable.append(str(_fail(where, "must be a readable file", value)))
    return values, errors, unreadable


S = TypeVar("S", bound=Section)


def _read_section(cls: type[S], path: str, raw: Mapping[Any, Any]) -> S:
    """The one section parser: every key checked, then (if all are good) the section's
    ``validate``; every error raised at once."""
    values, errors, unreadable = _read_fields(cls, path, raw)
    if errors:
        raise ConfigError.of(errors + unreadable)
    out = cls(**values)
    errors = out.validate(path) + unreadable
    if errors:
        raise ConfigError.of(errors)
    return out


def section(cls: type[S], shape: str = "must be a mapping", *, optional: bool = False
            ) -> Callable[[str, Any], S | None]:
    """The check of a key whose value is a section: a mapping of its keys (every key
    without a default named), else ``shape``; null is the defaults, or None if
    ``optional``."""
    required = [f.name for f in fields(cls)  # type: ignore[arg-type]  # a dataclass
                if f.default is MISSING and f.default_factory is MISSING]

    def check(path: str, value: Any) -> S | None:
        if value is None:
            return None if optional else cls()
        if not isinstance(value, Mapping) or any(name not in value for name in required):
            raise _fail(path, shape, value)
        return _read_section(cls, path, value)
    return check


# ---------------------------------------------------------------- value checks


def _got(value: Any) -> str:
    """The offending value as an error message quotes it: JSON when it is short,
    else abbreviated; at most QUOTE_LIMIT characters, bounded work at any size."""
    short = quote(value)  # looks at a few items and characters only
    if len(short) < QUOTE_LIMIT - 3 and "..." not in short:  # small: JSON is cheap
        try:
            return clip(json.dumps(value))
        except (TypeError, ValueError):
            pass
    return short


def _fail(path: str, reason: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: {reason}, got {_got(value)}")


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _fail(path, f"must be an integer {lo}..{hi}", value)
        return value
    return check


def _number(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise _fail(path, f"must be a number {lo:g}..{hi:g}", value)
        return float(value)
    return check


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false", value)
    return value


def _opt_str(path: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(path, "must be a non-empty string or null", value)
    return value


def _str(path: str, value: Any) -> str:
    if value is None:
        raise _fail(path, "must be a non-empty string", value)
    text = _opt_str(path, value)
    assert text is not None
    return text


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(path: str, value: Any) -> str:
        if value not in options:
            raise _fail(path, "must be one of " + ", ".join(options), value)
        assert isinstance(value, str)
        return value
    return check


def parse_hostport(text: Any, default_port: int | None, path: str) -> HostPort:
    """``1.2.3.4``, ``1.2.3.4:53``, ``::1``, ``[::1]:53`` (IP literals only)."""
    if not isinstance(text, str) or not text:
        raise _fail(path, "must be an address string like \"127.0.0.1:15053\"", text)
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise _fail(path, "has an unclosed '['", text)
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _fail(path, "must be [IPv6]:port", text)
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _fail(path, "must be an IP address (with an optional :port)", text) from None
    if port_text is None:
        if default_port is None:
            raise _fail(path, "must include a port", text)
        return HostPort(host, default_port)
    if not port_text.isdigit() or int(port_text) > 65535:
        raise _fail(path, "has a port that is not 0..65535", text)
    return HostPort(host, int(port_text))


def _list_of(item: Callable[[str, Any], T], *, allow_empty: bool = True,
             shape: str = "must be a list", unique: str | None = None
             ) -> Callable[[str, Any], tuple[T, ...]]:
    """A list, each entry through ``item`` (every bad entry reported); no entry twice,
    or, with ``unique``, no two entries with the same value of that key."""
    def check(path: str, value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _fail(path, shape, value)
        if not value and not allow_empty:
            raise _fail(path, "must not be empty", value)
        out: list[T] = []
        errors: list[str] = []
        seen: dict[Any, int] = {}
        for i, raw in enumerate(value):
            where = f"{path}[{i}]"
            try:
                entry = item(where, raw)
            except ConfigError as exc:
                errors.extend(exc.errors)
                continue
            if unique is not None:
                if (name := getattr(entry, unique)) in seen:
                    errors.append(f"{where}.{unique}: repeats the {unique} of "
                                  f"{path}[{seen[name]}], got {_got(raw[unique])}")
                    continue
                seen[name] = i
            out.append(entry)
        if errors:
            raise ConfigError.of(errors)
        if unique is None and len(set(out)) != len(out):
            raise _fail(path, "must not repeat an entry", value)
        return tuple(out)
    return check


def _listen(path: str, value: Any) -> HostPort:
    return parse_hostport(value, None, path)


def _opt_listen(path: str, value: Any) -> HostPort | None:
    return None if value is None else _listen(path, value)


def _upstream(path: str, value: Any) -> HostPort:
    return parse_hostport(value, 53, path)


def _domain(path: str, value: Any) -> str:
    name = normalize_domain(value) if isinstance(value, str) else None
    if name is None:
        raise _fail(path, "must be a domain name like \"mesh\"", value)
    return name


def _suffix(path: str, value: Any) -> str:
    name = normalize_hostname(value) if isinstance(value, str) else None
    if name is None:
        raise _fail(path, "must be a domain name", value)
    return name


def _cidr(version: int) -> Callable[[str, Any], str | None]:
    def check(path: str, value: Any) -> str | None:
        if value is None and version == 6:
            return None
        try:
            net = ipaddress.ip_network(value, strict=True) if isinstance(value, str) else None
        except ValueError:
            net = None
        if net is None or net.version != version:
            raise _fail(path, f"must be an IPv{version} network like "
                        + ("\"240.0.0.0/4\"" if version == 4 else "\"fd00:fd00::/64\""), value)
        if net.num_addresses < 4:
            raise _fail(path, "is too small to hold VIPs", value)
        return str(net)
    return check


def _templates(path: str, value: Any) -> tuple[TemplateSource, ...]:
    try:
        return check_template_items(value)
    except TemplateError as exc:
        text = str(exc)
        if text.startswith("["):
            index, _, reason = text.partition(": ")
            item = value[int(index[1:index.index("]")])]
            raise ConfigError(f"{path}{index}: {reason}, got {_got(item)}") from None
        raise _fail(path, text, value) from None


def _select(path: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None or value == {}:
        return ()
    if not isinstance(value, Mapping) or set(value) != {"matchLabels"}:
        raise _fail(path, "must be a mapping with one key, matchLabels", value)
    labels = value["matchLabels"]
    if not isinstance(labels, Mapping):
        raise _fail(f"{path}.matchLabels", "must be a mapping of label keys to values", labels)
    out = []
    for label, item in labels.items():
        where = f"{path}.matchLabels.{clip(str(label))}"
        if not isinstance(label, str) or label_key_error(label) is not None:
            raise _fail(where, "must be a Kubernetes label key (mesh and zone match "
                        "those fields)", label)
        if not isinstance(item, str):
            raise _fail(where, "must be a string", item)
        out.append((label, item))
    return tuple(sorted(out))


def _select_raw(value: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {"matchLabels": dict(value)} if value else {}


def _follow_url(path: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise _fail(path, "must be an http:// or https:// URL or null", value)
    return value.rstrip("/")


def _etcd_endpoint(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")) \
            or "://" not in value or not value.split("://", 1)[1].strip("/"):
        raise _fail(path, "must be an http:// or https:// URL of an etcd member", value)
    return value.rstrip("/")


def _etcd_prefix(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.endswith("/") \
            or len(value) < 2 or not value.isascii() or not value.isprintable():
        raise _fail(path, "must be a key prefix starting and ending with \"/\", like "
                    "\"/meshdns/\"", value)
    return value


def _network(path: str, value: Any) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True) if isinstance(value, str) else None
    except ValueError as exc:
        raise _fail(path, f"must be a network like \"10.0.0.0/8\" or \"fd00::/8\" ({exc})",
                    value) from None
    if net is None:
        raise _fail(path, "must be a network like \"10.0.0.0/8\" or \"fd00::/8\"", value)
    return str(net)


def _opt_networks(path: str, value: Any) -> tuple[str, ...] | None:
    return None if value is None else _list_of(_network)(path, value)


MAX_VIEWS = 16

View = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]  # (client networks, matchLabels)


def _views(path: str, value: Any) -> tuple[View, ...]:
    if not isinstance(value, list):
        raise _fail(path, "must be a list of {clients: [networks], select: {matchLabels}}",
                    value)
    if len(value) > MAX_VIEWS:
        raise _fail(path, f"must have at most {MAX_VIEWS} views", f"{len(value)} views")
    out = []
    for i, view in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(view, Mapping) or not set(view) <= {"clients", "select"} \
                or "clients" not in view:
            raise _fail(where, "must be a mapping with clients (a list of networks) and "
                        "select (matchLabels)", view)
        clients = _list_of(_network, allow_empty=False)(f"{where}.clients", view["clients"])
        out.append((clients, _select(f"{where}.select", view.get("select"))))
    return tuple(out)


def _views_raw(value: tuple[View, ...]) -> list[dict[str, Any]]:
    return [{"clients": list(clients), "select": _select_raw(select)}
            for clients, select in value]


def _forward_zone_name(path: str, value: Any) -> str:
    if value == ".":
        return "."
    name = normalize_hostname(value) if isinstance(value, str) else None
    if name is None:
        raise _fail(path, "must be a domain name like \"cluster.local\" or \".\"", value)
    return name


def _nsid(path: str, value: Any) -> str | None:
    if value == "":
        return ""  # no NSID at all
    text = _opt_str(path, value)
    if text is not None and (len(text.encode()) > 128 or not text.isprintable()):
        raise ConfigError(f"{path}: at most 128 bytes of printable text, got {value!r}")
    return text


def _dnstap_tcp(path: str, value: Any) -> HostPort | None:
    if value is None:
        return None
    hp = parse_hostport(value, None, path)
    if hp.port == 0:
        raise _fail(path, "must name the collector's port (1..65535)", value)
    return hp


def _dnstap_text(path: str, value: Any) -> str | None:
    text = _opt_str(path, value)
    if text is not None and (len(text.encode()) > 256 or not text.isprintable()):
        raise ConfigError(f"{path}: at most 256 bytes of printable text, got {value!r}")
    return text


# ---------------------------------------------------------------- the sections

FORWARD_PROTOCOLS = ("udp", "tcp")


@dataclass(frozen=True)
class ForwardZone(Section):
    """dns.forward[i]: names at or below ``zone`` ("." is every name) go to these
    upstreams over ``protocol`` (tcp: reused connections, RFC 7766)."""

    zone: str = key(MISSING, _forward_zone_name)  # lower case, no trailing dot; "." the root
    upstreams: tuple[HostPort, ...] = key(MISSING, _list_of(_upstream, allow_empty=False))
    protocol: str = key("udp", _choice(*FORWARD_PROTOCOLS))


@dataclass(frozen=True)
class DnsConfig(Section):
    listen: tuple[HostPort, ...] = key((HostPort("127.0.0.1", 15053),),
                                       _list_of(_listen, allow_empty=False))
    domains: tuple[str, ...] = key(("mesh",), _list_of(_domain, allow_empty=False))
    ttl: int = key(30, _int(0, 86400))
    negative_ttl: int = key(5, _int(0, 86400))
    upstreams: tuple[HostPort, ...] = key((), _list_of(_upstream))
    upstream_timeout: float = key(2.0, _number(0.05, 60))
    search: tuple[str, ...] = key((), _list_of(_suffix))
    cache_size: int = key(10000, _int(0, 10_000_000))
    tcp_idle_timeout: float = key(10.0, _number(0.1, 3600))
    tcp_max_connections: int = key(1000, _int(1, 1_000_000))
    workers: int = key(1, _int(1, 64))
    # Additions to SPEC §9 (documented in the README):
    resolv_conf: str = key("/etc/resolv.conf", _str)  # where empty upstreams/search come from
    # pre-encoded local replies, per transport
    answer_cache_size: int = key(100_000, _int(16, 10_000_000))
    max_inflight: int = key(1000, _int(1, 1_000_000))  # upstream queries in flight; past it, SERVFAIL
    # dns.workers UDP: "cpu", "hash" or auto (cpu on loopback)
    worker_steering: str = key("auto", _choice("auto", "cpu", "hash"))
    # Names each service answers to (issue 16); the default is the canonical and Kuma forms.
    hostname_templates: tuple[TemplateSource, ...] = key(DEFAULT_TEMPLATES, _templates,
                                                         raw=template_items_raw)
    # matchLabels ("mesh"/"zone" match those fields): only these services are answered.
    select: tuple[tuple[str, str], ...] = key((), _select, raw=_select_raw)
    # RFC 8767: an expired forwarded answer is served (TTL serve_stale_ttl) for this long
    # when every upstream fails; 0 disables.
    serve_stale: float = key(86400.0, _number(0, 86400 * 7))
    # SIGTERM: /readyz fails at once, DNS goes on answering this many seconds (CoreDNS
    # `health { lameduck }`), then stops taking queries and finishes those in flight.
    lameduck: float = key(5.0, _number(0, 3600))
    # NSID (RFC 5001) sent to clients that ask (dig +nsid): None is the host name, "" none.
    nsid: str | None = key(None, _nsid)
    # Access control (dns/policy.py): client networks; None: the listener's default
    # (loopback on a loopback listener, plus the private ranges on any other).
    allow: tuple[str, ...] | None = key(None, _opt_networks)
    deny: tuple[str, ...] = key((), _list_of(_network))
    # who gets forwarded names; None: allow
    allow_recursion: tuple[str, ...] | None = key(None, _opt_networks)
    # UDP response rate limiting per /24 or /56: replies per second, 0 off; every
    # rate_limit_slip-th reply over it is sent TC=1; loopback listeners only if told.
    rate_limit: int = key(0, _int(0, 10_000_000))
    rate_limit_slip: int = key(2, _int(0, 100))
    rate_limit_loopback: bool = key(False, _bool)
    # Views (first match wins; dns.select for every other client): (client networks,
    # matchLabels) each; each view's answers are cached apart.
    views: tuple[View, ...] = key((), _views, raw=_views_raw)
    # Forwarded answers (issue 23): the TTL bounds of positive and negative (NXDOMAIN,
    # NODATA) answers, like CoreDNS cache {success, denial} and unbound's cache-*-ttl;
    # the TTL of a stale answer and how often its name is asked upstream again; prefetch.
    cache_min_ttl: int = key(0, _int(0, 86400))
    cache_max_ttl: int = key(86400, _int(0, 86400))
    cache_negative_min_ttl: int = key(0, _int(0, 86400))
    cache_negative_max_ttl: int = key(3600, _int(0, 86400))
    serve_stale_ttl: int = key(30, _int(1, 86400))
    serve_stale_refresh: float = key(30.0, _number(1, 86400))
    prefetch: bool = key(True, _bool)
    # Stub domains (issue 23): longest zone first; dns.upstreams is the "." zone.
    forward: tuple[ForwardZone, ...] = key((), _list_of(
        section(ForwardZone, "must be a mapping with zone and upstreams (protocol: udp or "
                "tcp, optional)"),
        shape="must be a list of {zone, upstreams, protocol}", unique="zone"))
    # UDP source ports in use at once per upstream (RFC 5452), each re-drawn within
    # seconds; bounded by RLIMIT_NOFILE (dns/udppool.py).
    upstream_ports: int = key(1024, _int(1, 65536))

    def validate(self, path: str) -> list[str]:
        errors = []
        # Each TTL floor at most its ceiling (said with the key to change).
        for low, high in (("cache_min_ttl", "cache_max_ttl"),
                          ("cache_negative_min_ttl", "cache_negative_max_ttl")):
            if getattr(self, low) > getattr(self, high):
                errors.append(f"{path}.{low}: must not exceed {path}.{high} "
                              f"({getattr(self, high)}), got {_got(getattr(self, low))}")
        # dns.upstreams is the "." zone: it cannot be given twice.
        for i, fz in enumerate(self.forward):
            if fz.zone == "." and self.upstreams:
                errors.append(f"{path}.forward[{i}].zone: \".\" cannot be set with "
                              f"{path}.upstreams (they are the same zone): keep one of them")
        return errors


@dataclass(frozen=True)
class ApiConfig(Section):
    listen: HostPort = key(HostPort("127.0.0.1", 15080), _listen)
    token: str | None = key(None, _opt_str, env="MESHDNS_API_TOKEN")
    max_body_bytes: int = key(32 * 1024 * 1024, _int(1024, 1 << 34))
    # concurrent ?wait= long-polls and watch streams
    max_watchers: int = key(1000, _int(1, 1_000_000))
    # Secure by default: a non-loopback API without a token refuses to start unless this
    # says the network in front of it is trusted (Config.validate).
    allow_unauthenticated: bool = key(False, _bool)
    # Follow by deltas (?since=): how many revisions of changes are kept in memory, and
    # how long a woken long-poll gathers further changes before it answers.
    follow_history: int = key(1000, _int(1, 1_000_000))
    follow_coalesce: float = key(0.1, _number(0, 10))
    # Watch streams (?since=N&stream=1): offered at all (false: answered as long-polls,
    # e.g. behind a proxy that buffers responses), bytes a stream may have unsent before
    # it is cut off (its follower re-syncs from its revision), seconds between heartbeats.
    streams: bool = key(True, _bool)
    stream_buffer: int = key(1024 * 1024, _int(4096, 1 << 30))
    stream_heartbeat: float = key(10.0, _number(0.05, 300))
    # Seconds an idle connection (no request in flight, or one not yet fully sent) is
    # kept open; above a 60 s scrape interval, so a scraper keeps its connection.
    idle_timeout: float = key(75.0, _number(0.5, 86400))


@dataclass(frozen=True)
class EtcdConfig(Section):
    """registry.etcd: where the registry lives when it lives in etcd (endpoints set)."""

    # http(s)://host:port of etcd members; () = not in etcd
    endpoints: tuple[str, ...] = key((), _list_of(_etcd_endpoint))
    prefix: str = key("/meshdns/", _etcd_prefix)
    ca_file: str | None = key(None, _opt_str, file=True)  # the TLS files, read at start
    cert_file: str | None = key(None, _opt_str, file=True)
    key_file: str | None = key(None, _opt_str, file=True)
    username: str | None = key(None, _opt_str)
    password: str | None = key(None, _opt_str, env="MESHDNS_ETCD_PASSWORD", env_with="username")
    # connecting to one member, before trying the next
    dial_timeout: float = key(2.0, _number(0.05, 600))
    request_timeout: float = key(5.0, _number(0.05, 600))  # one request to one member
    # etcd's limits on one transaction (its --max-txn-ops, --max-request-bytes, here at
    # etcd's defaults with a margin): a write within them is one transaction, a larger
    # one is staged as a new generation (docs/scaling.md).
    max_txn_ops: int = key(128, _int(8, 1 << 24))
    max_txn_bytes: int = key(1024 * 1024, _int(64 * 1024, 1 << 31))

    def validate(self, path: str) -> list[str]:
        errors = []
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            errors.append(f"{path}.{missing}: cert_file and key_file go together (a client "
                          "certificate needs its key)")
        if (self.username is None) != (self.password is None):
            missing = "password" if self.password is None else "username"
            errors.append(f"{path}.{missing}: username and password go together")
        return errors


@dataclass(frozen=True)
class RegistryConfig(Section):
    cidr: str = key("240.0.0.0/4", _cidr(4))
    cidr6: str | None = key("fd00:fd00::/64", _cidr(6))
    vip_hold_seconds: float = key(300.0, _number(0, 86400 * 365))  # above dns.ttl
    state_file: str | None = key(None, _opt_str)
    seed_file: str | None = key(None, _opt_str)
    follow: str | None = key(None, _follow_url)
    follow_token: str | None = key(None, _opt_str, env="MESHDNS_FOLLOW_TOKEN")
    # /readyz 503 once the last sync is older
    follow_max_staleness: float = key(300.0, _number(1, 86400 * 365))
    etcd: EtcdConfig = key(EtcdConfig, section(EtcdConfig))

    def validate(self, path: str) -> list[str]:
        """What a registry in etcd cannot be combined with, said with the key to change."""
        if not self.etcd.endpoints:
            return []
        errors = []
        if self.follow:
            errors.append(f"{path}.follow: cannot be set with {path}.etcd.endpoints: an "
                          "instance either watches etcd or follows another meshdns, not both")
        if self.seed_file:
            errors.append(f"{path}.seed_file: cannot be set with {path}.etcd.endpoints: "
                          "the registry is etcd's; load it with PUT /v1/services instead")
        return errors


@dataclass(frozen=True)
class MetricsConfig(Section):
    # None: /metrics is served on api.listen. An address: /metrics, /healthz and /readyz
    # (all open, read-only) are served there instead, so Prometheus and the kubelet reach
    # a pod while the registry API stays on loopback (CoreDNS's :9153 convention).
    listen: HostPort | None = key(None, _opt_listen)


DNSTAP_MESSAGES = ("client_query", "client_response", "forwarder_query", "forwarder_response")


@dataclass(frozen=True)
class DnstapConfig(Section):
    """log.dnstap: where dnstap messages go (exactly one of socket, tcp) and which."""

    socket: str | None = key(None, _opt_str)  # a Unix socket path (fstrm_capture -u PATH)
    # a collector's host:port (fstrm_capture -a HOST -p PORT)
    tcp: HostPort | None = key(None, _dnstap_tcp)
    identity: str | None = key(None, _dnstap_text)  # None: dns.nsid, else the host name
    version: str | None = key(None, _dnstap_text)  # None: "meshdns VERSION"
    messages: tuple[str, ...] = key(DNSTAP_MESSAGES, _list_of(_choice(*DNSTAP_MESSAGES),
                                                              allow_empty=False))
    # exchanges waiting for the collector; past it, dropped
    queue_size: int = key(10000, _int(1, 10_000_000))

    def validate(self, path: str) -> list[str]:
        if (self.socket is None) == (self.tcp is None):
            return [f"{path}: set exactly one of socket (a Unix socket path) and tcp "
                    "(host:port) for the collector"]
        return []


@dataclass(frozen=True)
class LogConfig(Section):
    level: str = key("info", _choice("debug", "info", "warning", "error"))
    format: str = key("text", _choice("text", "json"))
    queries: bool = key(False, _bool)
    dnstap: DnstapConfig | None = key(None, section(
        DnstapConfig, "must be a mapping like {socket: /run/dnstap.sock} or "
        "{tcp: \"127.0.0.1:6000\"}", optional=True))


# The token value the Secrets under deploy/ shipped with until they left the applied
# folders (issue 22), to be replaced before use: such Secrets may still be in clusters,
# and a server started with one would accept any client that read the manifests.
PLACEHOLDER_TOKEN = "REPLACE-WITH-A-RANDOM-TOKEN"
MIN_TOKEN_CHARS = 16  # below this check-config warns (and serve logs a warning)


@dataclass(frozen=True)
class Config:
    dns: DnsConfig = key(DnsConfig, section(DnsConfig))
    api: ApiConfig = key(ApiConfig, section(ApiConfig))
    registry: RegistryConfig = key(RegistryConfig, section(RegistryConfig))
    metrics: MetricsConfig = key(MetricsConfig, section(MetricsConfig))
    log: LogConfig = key(LogConfig, section(LogConfig))

    def validate(self, env: Mapping[str, str]) -> list[str]:
        """The rules across sections and on values the environment may have set (each
        section's own ran as it was read)."""
        errors = []
        for name, token, var in _tokens(self):
            if token == PLACEHOLDER_TOKEN:
                source = f"from env {var}" if env.get(var) else "in the config file"
                errors.append(f"{name}: is the placeholder {PLACEHOLDER_TOKEN} ({source}) of "
                              "meshdns's example Secrets: set a random token, e.g. "
                              "`openssl rand -hex 32`")
        api = self.api
        if not api.token and not api.allow_unauthenticated and not is_loopback(api.listen.host):
            errors.append(f"api.token: is required when api.listen is not a loopback address "
                          f"({api.listen}); set it or {_env_of(ApiConfig, 'token')} (set "
                          "api.allow_unauthenticated: true to override)")
        if self.registry.vip_hold_seconds <= self.dns.ttl:
            errors.append(f"registry.vip_hold_seconds: must exceed dns.ttl ({self.dns.ttl}), "
                          f"got {_got(self.registry.vip_hold_seconds)}")
        return errors


def _tokens(cfg: Config) -> list[tuple[str, str | None, str]]:
    """The bearer tokens: (key, value, the environment variable that overrides it)."""
    return [("api.token", cfg.api.token, _env_of(ApiConfig, "token")),
            ("registry.follow_token", cfg.registry.follow_token,
             _env_of(RegistryConfig, "follow_token"))]


def _env_of(cls: type[Any], name: str) -> str:
    env = next(key_of(f).env for f in fields(cls) if f.name == name)
    assert env is not None
    return env


def _with_env(section_: T, env: Mapping[str, str]) -> T:
    """``section_`` with each key that declares an environment variable set to its
    non-empty value (its ``env_with`` key set, if it names one), at every depth."""
    changes: dict[str, Any] = {}
    for f in fields(section_):  # type: ignore[arg-type]  # a dataclass
        spec, value = key_of(f), getattr(section_, f.name)
        if isinstance(value, Section):
            if (new := _with_env(value, env)) is not value:
                changes[f.name] = new
        elif spec.env and env.get(spec.env) \
                and (spec.env_with is None or getattr(section_, spec.env_with) is not None):
            changes[f.name] = env[spec.env]
    return replace(section_, **changes) if changes else section_  # type: ignore[type-var]


def parse_config(raw: Any, env: Mapping[str, str] | None = None, *,
                 check_files: bool = True) -> Config:
    """A checked Config from the parsed YAML document (``None`` means all defaults).

    Every bad key is reported (``ConfigError.errors``), then, if none, every rule of
    ``Config.validate`` broken once the environment overrides are applied.

    ``check_files``: the files read at start (the etcd TLS files) must be readable
    here; off for a config meant for another machine (``check-config --skip-files``).
    """
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: must be a mapping of sections, got {_got(raw)}")
    token = _CHECK_FILES.set(check_files)
    try:
        sections, errors, unreadable = _read_fields(Config, "", raw)
    finally:
        _CHECK_FILES.reset(token)
    if errors or unreadable:
        raise ConfigError.of(errors + unreadable)
    cfg = _with_env(Config(**sections), env)
    errors = cfg.validate(env)
    if errors:
        raise ConfigError.of(errors)
    return cfg


def config_warnings(cfg: Config) -> list[str]:
    """What a valid config should still not do (check-config prints these, serve logs them):
    a bearer token shorter than MIN_TOKEN_CHARS characters. The token is never quoted."""
    out = []
    for name, token, var in _tokens(cfg):
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            out.append(f"{name}: is only {len(token)} character{'s' * (len(token) != 1)} "
                       f"long; a bearer token needs at least {MIN_TOKEN_CHARS} random "
                       f"characters, e.g. `openssl rand -hex 32` (here or in env {var})")
    return out


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1 (a wildcard address is not: it reaches every interface)."""
    return ipaddress.ip_address(host).is_loopback


def nsid_bytes(dns: DnsConfig) -> bytes | None:
    """dns.nsid as sent (RFC 5001): the host name when unset, None when set to ""."""
    nsid = dns.nsid if dns.nsid is not None else socket.gethostname()
    return nsid.encode() if nsid else None


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None, *,
                check_files: bool = True) -> Config:
    """The config file at ``path`` (None: every default), read by configfile.py."""
    if path is None:
        return parse_config(None, env, check_files=check_files)
    try:
        raw = read_config_file(path)
    except UnreadableConfig as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(raw, env, check_files=check_files)


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return _raw_section(value)
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _raw_section(section_: Any) -> dict[str, Any]:
    out = {}
    for f in fields(section_):
        spec, value = key_of(f), getattr(section_, f.name)
        out[f.name] = spec.raw(value) if spec.raw is not None else _plain(value)
    return out


def config_to_raw(cfg: Config) -> dict[str, dict[str, Any]]:
    """``cfg`` as plain data that parse_config reads back to an equal Config."""
    return _raw_section(cfg)


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    """The default config as plain data (for docs and `meshdns check-config`)."""
    return config_to_raw(Config())
