"""Configuration: one YAML file, frozen dataclasses, every key defaulted and checked.

This is the only module that reads YAML config. Errors name the key path and
the reason, e.g. ``dns.ttl: must be an integer 0..86400, got "x"``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

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
)
from .yamlload import DuplicateKey, load_json, load_yaml


class ConfigError(ValueError):
    """Config keys with a bad value, or unknown keys: ``errors`` has one line each."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


@dataclass(frozen=True, order=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


FORWARD_PROTOCOLS = ("udp", "tcp")


@dataclass(frozen=True)
class ForwardZone:
    """dns.forward[i]: names at or below ``zone`` ("." is every name) go to these
    upstreams over ``protocol`` (tcp: reused connections, RFC 7766)."""

    zone: str  # lower case, no trailing dot; "." for the root
    upstreams: tuple[HostPort, ...]
    protocol: str = "udp"


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 15053),)
    domains: tuple[str, ...] = ("mesh",)
    ttl: int = 30
    negative_ttl: int = 5
    upstreams: tuple[HostPort, ...] = ()
    upstream_timeout: float = 2.0
    search: tuple[str, ...] = ()
    cache_size: int = 10000
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1000
    workers: int = 1
    # Additions to SPEC §9 (documented in the README):
    resolv_conf: str = "/etc/resolv.conf"  # where empty upstreams/search come from
    answer_cache_size: int = 100_000  # pre-encoded local replies, per transport
    max_inflight: int = 1000  # upstream queries in flight; past it, SERVFAIL
    worker_steering: str = "auto"  # dns.workers UDP: "cpu", "hash" or auto (cpu on loopback)
    # Names each service answers to (issue 16); the default is the canonical and Kuma forms.
    hostname_templates: tuple[TemplateSource, ...] = DEFAULT_TEMPLATES
    # matchLabels ("mesh"/"zone" match those fields): only these services are answered.
    select: tuple[tuple[str, str], ...] = ()
    # RFC 8767: an expired forwarded answer is served (TTL serve_stale_ttl) for this long
    # when every upstream fails; 0 disables.
    serve_stale: float = 86400.0
    # SIGTERM: /readyz fails at once, DNS goes on answering this many seconds (CoreDNS
    # `health { lameduck }`), then stops taking queries and finishes those in flight.
    lameduck: float = 5.0
    # NSID (RFC 5001) sent to clients that ask (dig +nsid): None is the host name, "" none.
    nsid: str | None = None
    # Access control (dns/policy.py): client networks; None: the listener's default
    # (loopback on a loopback listener, plus the private ranges on any other).
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    allow_recursion: tuple[str, ...] | None = None  # who gets forwarded names; None: allow
    # UDP response rate limiting per /24 or /56: replies per second, 0 off; every
    # rate_limit_slip-th reply over it is sent TC=1; loopback listeners only if told.
    rate_limit: int = 0
    rate_limit_slip: int = 2
    rate_limit_loopback: bool = False
    # Views (first match wins; dns.select for every other client): (client networks,
    # matchLabels) each; each view's answers are cached apart.
    views: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...] = ()
    # Forwarded answers (issue 23): the TTL bounds of positive and negative (NXDOMAIN,
    # NODATA) answers, like CoreDNS cache {success, denial} and unbound's cache-*-ttl;
    # the TTL of a stale answer and how often its name is asked upstream again; prefetch.
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    cache_negative_min_ttl: int = 0
    cache_negative_max_ttl: int = 3600
    serve_stale_ttl: int = 30
    serve_stale_refresh: float = 30.0
    prefetch: bool = True
    # Stub domains (issue 23): longest zone first; dns.upstreams is the "." zone.
    forward: tuple[ForwardZone, ...] = ()
    # UDP source ports in use at once per upstream (RFC 5452), each re-drawn within
    # seconds; bounded by RLIMIT_NOFILE (dns/udppool.py).
    upstream_ports: int = 1024


@dataclass(frozen=True)
class ApiConfig:
    listen: HostPort = HostPort("127.0.0.1", 15080)
    token: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_watchers: int = 1000  # concurrent ?wait= long-polls and watch streams
    # Secure by default: a non-loopback API without a token refuses to start unless this
    # says the network in front of it is trusted.
    allow_unauthenticated: bool = False
    # Follow by deltas (?since=): how many revisions of changes are kept in memory, and
    # how long a woken long-poll gathers further changes before it answers.
    follow_history: int = 1000
    follow_coalesce: float = 0.1
    # Watch streams (?since=N&stream=1): offered at all (false: answered as long-polls,
    # e.g. behind a proxy that buffers responses), bytes a stream may have unsent before
    # it is cut off (its follower re-syncs from its revision), seconds between heartbeats.
    streams: bool = True
    stream_buffer: int = 1024 * 1024
    stream_heartbeat: float = 10.0
    # Seconds an idle connection (no request in flight, or one not yet fully sent) is
    # kept open; above a 60 s scrape interval, so a scraper keeps its connection.
    idle_timeout: float = 75.0


@dataclass(frozen=True)
class EtcdConfig:
    """registry.etcd: where the registry lives when it lives in etcd (endpoints set)."""

    endpoints: tuple[str, ...] = ()  # http(s)://host:port of etcd members; () = not in etcd
    prefix: str = "/meshdns/"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None  # env MESHDNS_ETCD_PASSWORD overrides
    dial_timeout: float = 2.0  # connecting to one member, before trying the next
    request_timeout: float = 5.0  # one request to one member
    # etcd's limits on one transaction (its --max-txn-ops, --max-request-bytes, here at
    # etcd's defaults with a margin): a write within them is one transaction, a larger
    # one is staged as a new generation (docs/scaling.md).
    max_txn_ops: int = 128
    max_txn_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class RegistryConfig:
    cidr: str = "240.0.0.0/4"
    cidr6: str | None = "fd00:fd00::/64"
    vip_hold_seconds: float = 300.0
    state_file: str | None = None
    seed_file: str | None = None
    follow: str | None = None
    follow_token: str | None = None
    follow_max_staleness: float = 300.0  # /readyz 503 once the last sync is older
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


@dataclass(frozen=True)
class MetricsConfig:
    # None: /metrics is served on api.listen. An address: /metrics, /healthz and /readyz
    # (all open, read-only) are served there instead, so Prometheus and the kubelet reach
    # a pod while the registry API stays on loopback (CoreDNS's :9153 convention).
    listen: HostPort | None = None


DNSTAP_MESSAGES = ("client_query", "client_response", "forwarder_query", "forwarder_response")


@dataclass(frozen=True)
class DnstapConfig:
    """log.dnstap: where dnstap messages go (exactly one of socket, tcp) and which."""

    socket: str | None = None  # a Unix socket path (fstrm_capture -u PATH)
    tcp: HostPort | None = None  # a collector's host:port (fstrm_capture -a HOST -p PORT)
    identity: str | None = None  # None: dns.nsid, else the host name
    version: str | None = None  # None: "meshdns VERSION"
    messages: tuple[str, ...] = DNSTAP_MESSAGES
    queue_size: int = 10000  # exchanges waiting for the collector; past it, dropped


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"
    queries: bool = False
    dnstap: DnstapConfig | None = None


@dataclass(frozen=True)
class Config:
    dns: DnsConfig = field(default_factory=DnsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------- value checks

T = TypeVar("T")


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


def _list_of(item: Callable[[str, Any], T], *, allow_empty: bool = True
             ) -> Callable[[str, Any], tuple[T, ...]]:
    def check(path: str, value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _fail(path, "must be a list", value)
        if not value and not allow_empty:
            raise _fail(path, "must not be empty", value)
        out = tuple(item(f"{path}[{i}]", v) for i, v in enumerate(value))
        if len(set(out)) != len(out):
            raise _fail(path, "must not repeat an entry", value)
        return out
    return check


def _listen(path: str, value: Any) -> HostPort:
    return parse_hostport(value, None, path)


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
    for key, item in labels.items():
        where = f"{path}.matchLabels.{clip(str(key))}"
        if not isinstance(key, str) or label_key_error(key) is not None:
            raise _fail(where, "must be a Kubernetes label key (mesh and zone match "
                        "those fields)", key)
        if not isinstance(item, str):
            raise _fail(where, "must be a string", item)
        out.append((key, item))
    return tuple(sorted(out))


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


_ETCD_FILES = ("ca_file", "cert_file", "key_file")  # read at start (check_files)

_ETCD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "endpoints": _list_of(_etcd_endpoint),
    "prefix": _etcd_prefix,
    "ca_file": _opt_str,
    "cert_file": _opt_str,
    "key_file": _opt_str,
    "username": _opt_str,
    "password": _opt_str,
    "dial_timeout": _number(0.05, 600),
    "request_timeout": _number(0.05, 600),
    "max_txn_ops": _int(8, 1 << 24),
    "max_txn_bytes": _int(64 * 1024, 1 << 31),
}


def _etcd(path: str, value: Any) -> EtcdConfig:
    if value is None:
        return EtcdConfig()
    if not isinstance(value, Mapping):
        raise _fail(path, "must be a mapping", value)
    kwargs = {}
    for key, item in value.items():
        if key not in _ETCD_CHECKS:
            raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(_ETCD_CHECKS)})")
        kwargs[key] = _ETCD_CHECKS[key](f"{path}.{key}", item)
    cfg = EtcdConfig(**kwargs)
    if (cfg.cert_file is None) != (cfg.key_file is None):
        missing = "key_file" if cfg.key_file is None else "cert_file"
        raise ConfigError(f"{path}.{missing}: cert_file and key_file go together (a client "
                          "certificate needs its key)")
    if (cfg.username is None) != (cfg.password is None):
        missing = "password" if cfg.password is None else "username"
        raise ConfigError(f"{path}.{missing}: username and password go together")
    return cfg


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


def nsid_bytes(dns: DnsConfig) -> bytes | None:
    """dns.nsid as sent (RFC 5001): the host name when unset, None when set to ""."""
    nsid = dns.nsid if dns.nsid is not None else socket.gethostname()
    return nsid.encode() if nsid else None


MAX_VIEWS = 16


def _views(path: str, value: Any) -> tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]],
                                           ...]:
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


_FORWARD_KEYS = ("zone", "upstreams", "protocol")


def _forward_zone_name(path: str, value: Any) -> str:
    if value == ".":
        return "."
    name = normalize_hostname(value) if isinstance(value, str) else None
    if name is None:
        raise _fail(path, "must be a domain name like \"cluster.local\" or \".\"", value)
    return name


def _forward(path: str, value: Any) -> tuple[ForwardZone, ...]:
    if not isinstance(value, list):
        raise _fail(path, "must be a list of {zone, upstreams, protocol}", value)
    out: list[ForwardZone] = []
    seen: dict[str, int] = {}
    errors: list[str] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(item, Mapping) or "zone" not in item or "upstreams" not in item:
            errors.append(str(_fail(where, "must be a mapping with zone and upstreams "
                                    "(protocol: udp or tcp, optional)", item)))
            continue
        try:
            for key in item:
                if key not in _FORWARD_KEYS:
                    raise ConfigError(f"{where}.{clip(str(key))}: unknown key (known: "
                                      f"{', '.join(_FORWARD_KEYS)})")
            zone = _forward_zone_name(f"{where}.zone", item["zone"])
            upstreams = _list_of(_upstream, allow_empty=False)(f"{where}.upstreams",
                                                               item["upstreams"])
            protocol = _choice(*FORWARD_PROTOCOLS)(f"{where}.protocol",
                                                   item.get("protocol", "udp"))
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        if zone in seen:
            errors.append(f"{where}.zone: repeats the zone of {path}[{seen[zone]}], got "
                          f"{_got(item['zone'])}")
            continue
        seen[zone] = i
        out.append(ForwardZone(zone, upstreams, protocol))
    if errors:
        raise ConfigError("; ".join(errors), errors)
    return tuple(out)


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


_DNSTAP_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "socket": _opt_str,
    "tcp": _dnstap_tcp,
    "identity": _dnstap_text,
    "version": _dnstap_text,
    "messages": _list_of(_choice(*DNSTAP_MESSAGES), allow_empty=False),
    "queue_size": _int(1, 10_000_000),
}


def _dnstap(path: str, value: Any) -> DnstapConfig | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(path, "must be a mapping like {socket: /run/dnstap.sock} or "
                    "{tcp: \"127.0.0.1:6000\"}", value)
    kwargs = {}
    for key, item in value.items():
        if key not in _DNSTAP_CHECKS:
            raise ConfigError(f"{path}.{clip(str(key))}: unknown key (known: "
                              f"{', '.join(_DNSTAP_CHECKS)})")
        kwargs[key] = _DNSTAP_CHECKS[key](f"{path}.{key}", item)
    cfg = DnstapConfig(**kwargs)
    if (cfg.socket is None) == (cfg.tcp is None):
        raise ConfigError(f"{path}: set exactly one of socket (a Unix socket path) and tcp "
                          "(host:port) for the collector")
    return cfg


_CHECKS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "dns": {
        "listen": _list_of(_listen, allow_empty=False),
        "domains": _list_of(_domain, allow_empty=False),
        "ttl": _int(0, 86400),
        "negative_ttl": _int(0, 86400),
        "upstreams": _list_of(_upstream),
        "upstream_timeout": _number(0.05, 60),
        "search": _list_of(_suffix),
        "cache_size": _int(0, 10_000_000),
        "tcp_idle_timeout": _number(0.1, 3600),
        "tcp_max_connections": _int(1, 1_000_000),
        "workers": _int(1, 64),
        "resolv_conf": lambda p, v: _opt_str(p, v) or _fail_none(p, v),
        "answer_cache_size": _int(16, 10_000_000),
        "max_inflight": _int(1, 1_000_000),
        "worker_steering": _choice("auto", "cpu", "hash"),
        "hostname_templates": _templates,
        "select": _select,
        "serve_stale": _number(0, 86400 * 7),
        "lameduck": _number(0, 3600),
        "nsid": _nsid,
        "allow": _opt_networks,
        "deny": _list_of(_network),
        "allow_recursion": _opt_networks,
        "rate_limit": _int(0, 10_000_000),
        "rate_limit_slip": _int(0, 100),
        "rate_limit_loopback": _bool,
        "views": _views,
        "cache_min_ttl": _int(0, 86400),
        "cache_max_ttl": _int(0, 86400),
        "cache_negative_min_ttl": _int(0, 86400),
        "cache_negative_max_ttl": _int(0, 86400),
        "serve_stale_ttl": _int(1, 86400),
        "serve_stale_refresh": _number(1, 86400),
        "prefetch": _bool,
        "forward": _forward,
        "upstream_ports": _int(1, 65536),
    },
    "api": {
        "listen": _listen,
        "token": _opt_str,
        "max_body_bytes": _int(1024, 1 << 34),
        "max_watchers": _int(1, 1_000_000),
        "allow_unauthenticated": _bool,
        "follow_history": _int(1, 1_000_000),
        "follow_coalesce": _number(0, 10),
        "streams": _bool,
        "stream_buffer": _int(4096, 1 << 30),
        "stream_heartbeat": _number(0.05, 300),
        "idle_timeout": _number(0.5, 86400),
    },
    "registry": {
        "cidr": _cidr(4),
        "cidr6": _cidr(6),
        "vip_hold_seconds": _number(0, 86400 * 365),
        "state_file": _opt_str,
        "seed_file": _opt_str,
        "follow": _follow_url,
        "follow_token": _opt_str,
        "follow_max_staleness": _number(1, 86400 * 365),
        "etcd": _etcd,
    },
    "metrics": {
        "listen": lambda p, v: None if v is None else _listen(p, v),
    },
    "log": {
        "level": _choice("debug", "info", "warning", "error"),
        "format": _choice("text", "json"),
        "queries": _bool,
        "dnstap": _dnstap,
    },
}


def _fail_none(path: str, value: Any) -> str:
    raise _fail(path, "must be a non-empty string", value)


_SECTIONS: dict[str, type[Any]] = {
    "dns": DnsConfig, "api": ApiConfig, "registry": RegistryConfig, "metrics": MetricsConfig,
    "log": LogConfig,
}


def parse_config(raw: Any, env: Mapping[str, str] | None = None, *,
                 check_files: bool = True) -> Config:
    """A checked Config from the parsed YAML document (``None`` means all defaults).

    ``check_files``: the files read at start (the etcd TLS files) must be readable
    here; off for a config meant for another machine (``check-config --skip-files``).
    """
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: must be a mapping of sections, got {_got(raw)}")
    sections: dict[str, Any] = {}
    errors: list[str] = []  # every bad key is reported, not just the first one
    for name, value in raw.items():
        if name not in _SECTIONS:
            errors.append(f"{clip(str(name))}: unknown key (known: {', '.join(_SECTIONS)})")
            continue
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            errors.append(str(_fail(name, "must be a mapping", value)))
            continue
        checks = _CHECKS[name]
        kwargs = {}
        for key, item in value.items():
            if key not in checks:
                errors.append(f"{name}.{clip(str(key))}: unknown key (known: "
                              f"{', '.join(checks)})")
                continue
            try:
                kwargs[key] = checks[key](f"{name}.{key}", item)
            except ConfigError as exc:
                errors.extend(exc.errors)
        sections[name] = _SECTIONS[name](**kwargs)
    if check_files and "registry" in sections:
        errors.extend(_unreadable_files("registry.etcd", sections["registry"].etcd))
    if errors:
        raise ConfigError("; ".join(errors), errors)
    cfg = Config(**sections)
    if env.get("MESHDNS_API_TOKEN"):
        cfg = replace(cfg, api=replace(cfg.api, token=env["MESHDNS_API_TOKEN"]))
    if env.get("MESHDNS_FOLLOW_TOKEN"):
        cfg = replace(cfg, registry=replace(cfg.registry, follow_token=env["MESHDNS_FOLLOW_TOKEN"]))
    if env.get("MESHDNS_ETCD_PASSWORD") and cfg.registry.etcd.username:
        etcd = replace(cfg.registry.etcd, password=env["MESHDNS_ETCD_PASSWORD"])
        cfg = replace(cfg, registry=replace(cfg.registry, etcd=etcd))
    _check_etcd_combinations(cfg)
    _check_dns_cache_bounds(cfg.dns)
    _check_forward_root(cfg.dns)
    _refuse_placeholder_tokens(cfg, env)
    api = cfg.api
    if not api.token and not api.allow_unauthenticated and not is_loopback(api.listen.host):
        raise ConfigError(f"api.token: is required when api.listen is not a loopback address "
                          f"({api.listen}); set it or MESHDNS_API_TOKEN (set "
                          "api.allow_unauthenticated: true to override)")
    if cfg.registry.vip_hold_seconds <= cfg.dns.ttl:
        raise ConfigError(f"registry.vip_hold_seconds: must exceed dns.ttl ({cfg.dns.ttl}), "
                          f"got {_got(cfg.registry.vip_hold_seconds)}")
    return cfg


def _unreadable_files(path: str, etcd: EtcdConfig) -> list[str]:
    return [str(_fail(f"{path}.{key}", "must be a readable file", value))
            for key in _ETCD_FILES
            if (value := getattr(etcd, key)) is not None and not os.access(value, os.R_OK)]


# The token value the Secrets under deploy/ shipped with until they left the applied
# folders (issue 22), to be replaced before use: such Secrets may still be in clusters,
# and a server started with one would accept any client that read the manifests.
PLACEHOLDER_TOKEN = "REPLACE-WITH-A-RANDOM-TOKEN"
MIN_TOKEN_CHARS = 16  # below this check-config warns (and serve logs a warning)
_TOKENS = (("api.token", "MESHDNS_API_TOKEN"), ("registry.follow_token", "MESHDNS_FOLLOW_TOKEN"))


def _token(cfg: Config, key: str) -> str | None:
    return cfg.api.token if key == "api.token" else cfg.registry.follow_token


def _refuse_placeholder_tokens(cfg: Config, env: Mapping[str, str]) -> None:
    for key, var in _TOKENS:
        if _token(cfg, key) == PLACEHOLDER_TOKEN:
            source = f"from env {var}" if env.get(var) else "in the config file"
            raise ConfigError(f"{key}: is the placeholder {PLACEHOLDER_TOKEN} ({source}) of "
                              "meshdns's example Secrets: set a random token, e.g. "
                              "`openssl rand -hex 32`")


def config_warnings(cfg: Config) -> list[str]:
    """What a valid config should still not do (check-config prints these, serve logs them):
    a bearer token shorter than MIN_TOKEN_CHARS characters. The token is never quoted."""
    out = []
    for key, var in _TOKENS:
        token = _token(cfg, key)
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            out.append(f"{key}: is only {len(token)} character{'s' * (len(token) != 1)} "
                       f"long; a bearer token needs at least {MIN_TOKEN_CHARS} random "
                       f"characters, e.g. `openssl rand -hex 32` (here or in env {var})")
    return out


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1 (a wildcard address is not: it reaches every interface)."""
    return ipaddress.ip_address(host).is_loopback


def _check_dns_cache_bounds(dns: DnsConfig) -> None:
    """Each TTL floor at most its ceiling (said with the key to change)."""
    for low, high in (("cache_min_ttl", "cache_max_ttl"),
                      ("cache_negative_min_ttl", "cache_negative_max_ttl")):
        if getattr(dns, low) > getattr(dns, high):
            raise ConfigError(f"dns.{low}: must not exceed dns.{high} ({getattr(dns, high)}), "
                              f"got {_got(getattr(dns, low))}")


def _check_forward_root(dns: DnsConfig) -> None:
    """dns.upstreams is the "." zone: it cannot be given twice."""
    for i, fz in enumerate(dns.forward):
        if fz.zone == "." and dns.upstreams:
            raise ConfigError(f"dns.forward[{i}].zone: \".\" cannot be set with "
                              "dns.upstreams (they are the same zone): keep one of them")


def _check_etcd_combinations(cfg: Config) -> None:
    """What a registry in etcd cannot be combined with, said with the key to change."""
    if not cfg.registry.etcd.endpoints:
        return
    if cfg.registry.follow:
        raise ConfigError("registry.follow: cannot be set with registry.etcd.endpoints: an "
                          "instance either watches etcd or follows another meshdns, not both")
    if cfg.registry.seed_file:
        raise ConfigError("registry.seed_file: cannot be set with registry.etcd.endpoints: "
                          "the registry is etcd's; load it with PUT /v1/services instead")


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None, *,
                check_files: bool = True) -> Config:
    if path is None:
        return parse_config(None, env, check_files=check_files)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        raw = load_yaml(text)  # plain data only; no anchors/aliases, bounded nesting
    except DuplicateKey as exc:  # "dns.ttl: duplicate key (lines 3 and 4)"
        raise ConfigError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {clip(str(exc), 300)}") from None
    return parse_config(raw, env, check_files=check_files)


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


def config_to_raw(cfg: Config) -> dict[str, dict[str, Any]]:
    """``cfg`` as plain data that parse_config reads back to an equal Config."""
    out: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        section = getattr(cfg, name)
        out[name] = {}
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name == "select":
                value = {"matchLabels": dict(value)} if value else {}
            elif isinstance(value, HostPort):
                value = str(value)
            elif isinstance(value, EtcdConfig):
                value = {f2.name: list(v) if isinstance(v := getattr(value, f2.name), tuple)
                         else v for f2 in fields(value)}
            elif isinstance(value, DnstapConfig):
                value = {f2.name: list(v) if isinstance(v := getattr(value, f2.name), tuple)
                         else str(v) if isinstance(v, HostPort) else v for f2 in fields(value)}
            elif f.name == "forward":
                value = [{"zone": fz.zone, "upstreams": [str(hp) for hp in fz.upstreams],
                          "protocol": fz.protocol} for fz in value]
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, HostPort) else v for v in value]
            out[name][f.name] = value
    return out


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    """The default config as plain data (for docs and `meshdns check-config`)."""
    return config_to_raw(Config())
