"""Config (SPEC §9): every key defaulted, unknown keys and bad values stop with path + reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshdns.config import (
    Config,
    ConfigError,
    HostPort,
    defaults_as_dict,
    load_config,
    parse_config,
)

# SPEC §9, verbatim: the keys and their defaults.
SPEC_YAML = """
dns:
  listen: ["127.0.0.1:15053"]   # UDP and TCP on each; "[::1]:15053" for IPv6
  domains: ["mesh"]
  ttl: 30
  negative_ttl: 5
  upstreams: []                 # empty: the nameservers of /etc/resolv.conf
  upstream_timeout: 2.0
  search: []                    # empty: the search list of /etc/resolv.conf
  cache_size: 10000
  tcp_idle_timeout: 10
  tcp_max_connections: 1000
  workers: 1                    # processes sharing the port (SO_REUSEPORT)
api:
  listen: "127.0.0.1:15080"
  token: null                   # env MESHDNS_API_TOKEN overrides
  max_body_bytes: 33554432
registry:
  cidr: "240.0.0.0/4"
  cidr6: "fd00:fd00::/64"       # null: no IPv6 VIPs
  vip_hold_seconds: 300
  state_file: null
  seed_file: null               # same shape as a PUT body, YAML or JSON
  follow: null                  # e.g. "http://10.0.0.5:15080"
  follow_token: null            # bearer token for the leader; env MESHDNS_FOLLOW_TOKEN
log:
  level: info
  format: text                  # or json
  queries: false
"""
SPEC_DEFAULTS: dict[str, dict[str, Any]] = yaml.safe_load(SPEC_YAML)
SPEC_KEYS = [(section, key) for section, keys in SPEC_DEFAULTS.items() for key in keys]


def parse(raw: Any, env: dict[str, str] | None = None) -> Config:
    return parse_config(raw, {} if env is None else env)


def error_of(raw: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, env)
    return str(info.value)


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize(("section", "key"), SPEC_KEYS, ids=[f"{s}.{k}" for s, k in SPEC_KEYS])
def test_default_of_every_key_is_the_spec_default(section: str, key: str) -> None:
    assert defaults_as_dict()[section][key] == SPEC_DEFAULTS[section][key]


def test_no_config_means_every_default() -> None:
    cfg = parse(None)
    assert cfg == Config()
    assert cfg.dns.listen == (HostPort("127.0.0.1", 15053),)
    assert cfg.dns.domains == ("mesh",)
    assert (cfg.dns.ttl, cfg.dns.negative_ttl) == (30, 5)
    assert cfg.dns.upstreams == () and cfg.dns.search == ()
    assert cfg.dns.upstream_timeout == 2.0
    assert cfg.dns.cache_size == 10000
    assert cfg.dns.tcp_idle_timeout == 10
    assert cfg.dns.tcp_max_connections == 1000
    assert cfg.dns.workers == 1
    assert cfg.api.listen == HostPort("127.0.0.1", 15080)
    assert cfg.api.token is None
    assert cfg.api.max_body_bytes == 32 * 1024 * 1024
    assert cfg.registry.cidr == "240.0.0.0/4"
    assert cfg.registry.cidr6 == "fd00:fd00::/64"
    assert cfg.registry.vip_hold_seconds == 300
    assert cfg.registry.state_file is None and cfg.registry.seed_file is None
    assert cfg.registry.follow is None and cfg.registry.follow_token is None
    assert (cfg.log.level, cfg.log.format, cfg.log.queries) == ("info", "text", False)
    assert cfg.dns.worker_steering == "auto"


def test_the_spec_block_itself_is_a_valid_config_equal_to_the_defaults() -> None:
    assert parse(SPEC_DEFAULTS) == Config()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "dns:\n", "dns: {}\napi: {}\n"])
def test_empty_documents_and_sections_mean_defaults(tmp_path: Path, text: str) -> None:
    path = tmp_path / "meshdns.yaml"
    path.write_text(text)
    assert load_config(path, env={}) == Config()
    assert load_config(None, env={}) == Config()


def test_values_are_read_and_normalized() -> None:
    cfg = parse({
        "dns": {"listen": ["127.0.0.1:53", "[::1]:53", "0.0.0.0:5353"],
                "domains": ["mesh", "Mesh.Local."], "ttl": 0, "negative_ttl": 86400,
                "upstreams": ["1.1.1.1", "10.0.0.10:5353", "[2606:4700::1111]:53", "::1"],
                "upstream_timeout": 1, "search": ["Corp.Example."], "workers": 4},
        "api": {"listen": "[::1]:8080", "token": "s3cret"},
        "registry": {"cidr": "10.96.0.0/12", "cidr6": None, "vip_hold_seconds": 600.5,
                     "follow": "http://10.0.0.5:15080/"},
        "log": {"level": "debug", "format": "json", "queries": True},
    })
    assert cfg.dns.listen == (HostPort("127.0.0.1", 53), HostPort("::1", 53),
                              HostPort("0.0.0.0", 5353))
    assert cfg.dns.domains == ("mesh", "mesh.local")
    assert cfg.dns.upstreams == (HostPort("1.1.1.1", 53), HostPort("10.0.0.10", 5353),
                                 HostPort("2606:4700::1111", 53), HostPort("::1", 53))
    assert cfg.dns.upstream_timeout == 1.0
    assert cfg.dns.search == ("corp.example",)
    assert str(cfg.api.listen) == "[::1]:8080"
    assert cfg.registry.cidr6 is None
    assert cfg.registry.follow == "http://10.0.0.5:15080"
    assert cfg.log.queries is True


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("raw", "message"), [
    ({"dns": {"ttl": "x"}}, 'dns.ttl: must be an integer 0..86400, got "x"'),
    ({"dns": {"ttl": -1}}, "dns.ttl: must be an integer 0..86400, got -1"),
    ({"dns": {"ttl": 86401}}, "dns.ttl: must be an integer 0..86400, got 86401"),
    ({"dns": {"ttl": True}}, "dns.ttl: must be an integer 0..86400, got true"),
    ({"dns": {"ttl": 1.5}}, "dns.ttl: must be an integer 0..86400, got 1.5"),
    ({"dns": {"ttl": None}}, "dns.ttl: must be an integer 0..86400, got null"),
    ({"dns": {"negative_ttl": "5s"}}, 'dns.negative_ttl: must be an integer 0..86400, got "5s"'),
    ({"dns": {"listen": "127.0.0.1:53"}}, 'dns.listen: must be a list, got "127.0.0.1:53"'),
    ({"dns": {"listen": []}}, "dns.listen: must not be empty, got []"),
    ({"dns": {"listen": ["localhost:53"]}},
     'dns.listen[0]: must be an IP address (with an optional :port), got "localhost:53"'),
    ({"dns": {"listen": ["127.0.0.1:53", "127.0.0.1"]}},
     'dns.listen[1]: must include a port, got "127.0.0.1"'),
    ({"dns": {"upstreams": ["1.1.1.1:99999"]}},
     'dns.upstreams[0]: has a port that is not 0..65535, got "1.1.1.1:99999"'),
    ({"dns": {"domains": ["mesh", "bad domain"]}},
     'dns.domains[1]: must be a domain name like "mesh", got "bad domain"'),
    ({"dns": {"domains": []}}, "dns.domains: must not be empty, got []"),
    ({"dns": {"upstream_timeout": 0}}, "dns.upstream_timeout: must be a number 0.05..60, got 0"),
    ({"dns": {"workers": 0}}, "dns.workers: must be an integer 1..64, got 0"),
    ({"api": {"listen": ["127.0.0.1:1"]}},
     'api.listen: must be an address string like "127.0.0.1:15053", got ["127.0.0.1:1"]'),
    ({"api": {"token": ""}}, 'api.token: must be a non-empty string or null, got ""'),
    ({"registry": {"cidr": "fd00::/64"}},
     'registry.cidr: must be an IPv4 network like "240.0.0.0/4", got "fd00::/64"'),
    ({"registry": {"cidr": "10.0.0.0/33"}},
     'registry.cidr: must be an IPv4 network like "240.0.0.0/4", got "10.0.0.0/33"'),
    ({"registry": {"cidr": None}},
     'registry.cidr: must be an IPv4 network like "240.0.0.0/4", got null'),
    ({"registry": {"cidr6": "240.0.0.0/4"}},
     'registry.cidr6: must be an IPv6 network like "fd00:fd00::/64", got "240.0.0.0/4"'),
    ({"registry": {"follow": "ftp://x"}},
     'registry.follow: must be an http:// or https:// URL or null, got "ftp://x"'),
    ({"log": {"level": "loud"}}, 'log.level: must be one of debug, info, warning, error, got "loud"'),
    ({"log": {"format": "xml"}}, 'log.format: must be one of text, json, got "xml"'),
    ({"dns": {"worker_steering": "random"}},
     'dns.worker_steering: must be one of auto, cpu, hash, got "random"'),
    ({"log": {"queries": "yes"}}, 'log.queries: must be true or false, got "yes"'),
    ({"dns": [1]}, "dns: must be a mapping, got [1]"),
    ([1, 2], "config: must be a mapping of sections, got [1, 2]"),
])
def test_bad_value_stops_with_the_key_path_and_reason(raw: Any, message: str) -> None:
    assert error_of(raw) == message


@pytest.mark.parametrize(("raw", "path"), [
    ({"dns": {"bogus": 1}}, "dns.bogus"),
    ({"dns": {"TTL": 30}}, "dns.TTL"),
    ({"api": {"port": 80}}, "api.port"),
    ({"registry": {"cidr4": "10.0.0.0/8"}}, "registry.cidr4"),
    ({"log": {"file": "x"}}, "log.file"),
    ({"bogus": {}}, "bogus"),
    ({"metrics": {"port": 9153}}, "metrics.port"),
    ({"tracing": {}}, "tracing"),
])
def test_unknown_key_stops_with_its_path(raw: Any, path: str) -> None:
    assert error_of(raw).startswith(f"{path}: unknown key")


@pytest.mark.parametrize("raw", [
    {"dns": {"listen": ["127.0.0.1:53", "127.0.0.1:53"]}},
    {"dns": {"domains": ["mesh", "MESH"]}},
    {"registry": {"cidr": "10.0.0.1/8"}},  # host bits set: not a network
    {"registry": {"cidr": "10.0.0.0/31"}},  # too small to hold VIPs
    {"registry": {"vip_hold_seconds": -1}},
    {"registry": {"state_file": 3}},
    {"api": {"max_body_bytes": 10}},
    {"dns": {"tcp_max_connections": 0}},
    {"dns": {"tcp_idle_timeout": "10s"}},
    {"dns": {"cache_size": -1}},
])
def test_other_bad_values_name_their_key(raw: dict[str, Any]) -> None:
    (section, keys), = raw.items()
    (key,) = keys
    assert error_of(raw).startswith(f"{section}.{key}: ")


def test_vip_hold_seconds_must_exceed_the_ttl() -> None:
    assert error_of({"registry": {"vip_hold_seconds": 30}}).startswith(
        "registry.vip_hold_seconds: must exceed dns.ttl (30)")
    assert error_of({"registry": {"vip_hold_seconds": 10}}).startswith(
        "registry.vip_hold_seconds: ")
    # A longer TTL moves the bar: the default hold of 300 s is then too short.
    assert error_of({"dns": {"ttl": 300}}).startswith(
        "registry.vip_hold_seconds: must exceed dns.ttl (300)")
    ok = parse({"dns": {"ttl": 600}, "registry": {"vip_hold_seconds": 601}})
    assert ok.registry.vip_hold_seconds == 601
    assert parse({"registry": {"vip_hold_seconds": 31}}).registry.vip_hold_seconds == 31


# ---------------------------------------------------------------- environment


def test_api_token_env_overrides_the_file() -> None:
    assert parse({"api": {"token": "from-file"}}).api.token == "from-file"
    env = {"MESHDNS_API_TOKEN": "from-env"}
    assert parse({"api": {"token": "from-file"}}, env).api.token == "from-env"
    assert parse(None, env).api.token == "from-env"


def test_api_token_env_is_read_from_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHDNS_API_TOKEN", "t0ken")
    assert parse_config(None).api.token == "t0ken"
    monkeypatch.delenv("MESHDNS_API_TOKEN")
    assert parse_config(None).api.token is None


def test_follow_token_env_overrides_the_file() -> None:
    env = {"MESHDNS_FOLLOW_TOKEN": "leader"}
    assert parse({"registry": {"follow_token": "x"}}, env).registry.follow_token == "leader"
    assert parse({"registry": {"follow_token": "x"}}).registry.follow_token == "x"


# ---------------------------------------------------------------- files


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "meshdns.yaml"
    path.write_text("dns:\n  ttl: 60\n  domains: [mesh, mesh.local]\nlog:\n  format: json\n")
    cfg = load_config(path, env={})
    assert cfg.dns.ttl == 60
    assert cfg.dns.domains == ("mesh", "mesh.local")
    assert cfg.log.format == "json"


def test_load_config_reports_key_errors(tmp_path: Path) -> None:
    path = tmp_path / "meshdns.yaml"
    path.write_text('dns:\n  ttl: "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == 'dns.ttl: must be an integer 0..86400, got "x"'


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("dns: [ttl: 30\n  listen: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


# ---------------------------------------------------------------- registry.etcd


def test_etcd_defaults_and_a_full_section(tmp_path: Path) -> None:
    assert parse(None).registry.etcd.endpoints == ()  # not in etcd unless endpoints are set
    assert parse(None).registry.etcd.prefix == "/meshdns/"
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("x")
    cfg = parse({"registry": {"etcd": {
        "endpoints": ["https://10.0.0.1:2379/", "https://10.0.0.2:2379"],
        "prefix": "/prod/mesh/", "ca_file": str(ca), "cert_file": str(cert),
        "key_file": str(key), "username": "meshdns", "password": "pw",
        "dial_timeout": 1, "request_timeout": 3.5}}})
    etcd = cfg.registry.etcd
    assert etcd.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (etcd.prefix, etcd.ca_file, etcd.username) == ("/prod/mesh/", str(ca), "meshdns")
    assert (etcd.dial_timeout, etcd.request_timeout) == (1.0, 3.5)
    # The round trip dns.workers processes rely on (config_to_raw -> parse_config).
    from meshdns.config import config_to_raw
    assert parse(config_to_raw(cfg)) == cfg


def test_etcd_password_env_overrides_the_file() -> None:
    raw = {"registry": {"etcd": {"endpoints": ["http://127.0.0.1:2379"],
                                 "username": "u", "password": "file"}}}
    assert parse(raw, {"MESHDNS_ETCD_PASSWORD": "env"}).registry.etcd.password == "env"
    assert parse(raw).registry.etcd.password == "file"


ETCD = {"endpoints": ["http://127.0.0.1:2379"]}


@pytest.mark.parametrize(("raw", "message"), [
    ({"registry": {"etcd": {"endpoints": ["127.0.0.1:2379"]}}},
     'registry.etcd.endpoints[0]: must be an http:// or https:// URL of an etcd member, '
     'got "127.0.0.1:2379"'),
    ({"registry": {"etcd": {"endpoints": "http://127.0.0.1:2379"}}},
     'registry.etcd.endpoints: must be a list, got "http://127.0.0.1:2379"'),
    ({"registry": {"etcd": {"endpoints": ["http://"]}}},
     'registry.etcd.endpoints[0]: must be an http:// or https:// URL of an etcd member, '
     'got "http://"'),
    ({"registry": {"etcd": {"prefix": "meshdns"}}},
     'registry.etcd.prefix: must be a key prefix starting and ending with "/", like '
     '"/meshdns/", got "meshdns"'),
    ({"registry": {"etcd": {"prefix": "/"}}},
     'registry.etcd.prefix: must be a key prefix starting and ending with "/", like '
     '"/meshdns/", got "/"'),
    ({"registry": {"etcd": {"request_timeout": 0}}},
     "registry.etcd.request_timeout: must be a number 0.05..600, got 0"),
    ({"registry": {"etcd": {"ca_file": "/nonexistent/ca.pem"}}},
     'registry.etcd.ca_file: must be a readable file, got "/nonexistent/ca.pem"'),
    ({"registry": {"etcd": [1]}}, "registry.etcd: must be a mapping, got [1]"),
    ({"registry": {"etcd": {**ETCD, "username": "u"}}},
     "registry.etcd.password: username and password go together"),
    ({"registry": {"etcd": {**ETCD}, "follow": "http://10.0.0.5:15080"}},
     "registry.follow: cannot be set with registry.etcd.endpoints: an instance either "
     "watches etcd or follows another meshdns, not both"),
    ({"registry": {"etcd": {**ETCD}, "seed_file": "seed.yaml"}},
     "registry.seed_file: cannot be set with registry.etcd.endpoints: the registry is "
     "etcd's; load it with PUT /v1/services instead"),
])
def test_bad_etcd_settings_name_their_key(raw: Any, message: str) -> None:
    assert error_of(raw) == message


def test_unknown_etcd_key_names_its_path() -> None:
    assert error_of({"registry": {"etcd": {"endpoint": ["http://x:1"]}}}).startswith(
        "registry.etcd.endpoint: unknown key")


def test_etcd_client_certificate_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert error_of({"registry": {"etcd": {"cert_file": str(cert)}}}).startswith(
        "registry.etcd.key_file: cert_file and key_file go together")


def test_etcd_tls_files_are_checked_only_with_the_files(tmp_path: Path) -> None:
    """``check_files=False`` (check-config --skip-files): the TLS files are on the machine
    the config is for; their values are still checked."""
    raw = {"registry": {"etcd": {"endpoints": ["https://10.0.0.1:2379"],
                                 "ca_file": "/nonexistent/ca.pem",
                                 "cert_file": "/nonexistent/c.pem",
                                 "key_file": "/nonexistent/k.pem"}}}
    assert parse_config(raw, {}, check_files=False).registry.etcd.ca_file == "/nonexistent/ca.pem"
    with pytest.raises(ConfigError) as info:
        parse_config(raw, {})
    assert info.value.errors == [
        f'registry.etcd.{key}: must be a readable file, got "/nonexistent/{name}"'
        for key, name in (("ca_file", "ca.pem"), ("cert_file", "c.pem"), ("key_file", "k.pem"))]
    with pytest.raises(ConfigError, match=r"registry\.etcd\.ca_file: must be a non-empty string"):
        parse_config({"registry": {"etcd": {"ca_file": ""}}}, {}, check_files=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path, env={}, check_files=False).registry.etcd.key_file == \
        "/nonexistent/k.pem"


def test_the_deploy_placeholder_token_is_refused_and_short_tokens_warned() -> None:
    from meshdns.config import MIN_TOKEN_CHARS, PLACEHOLDER_TOKEN, config_warnings

    assert error_of({"api": {"token": PLACEHOLDER_TOKEN}}).startswith(
        f"api.token: is the placeholder {PLACEHOLDER_TOKEN} (in the config file)")
    assert error_of({}, {"MESHDNS_FOLLOW_TOKEN": PLACEHOLDER_TOKEN}).startswith(
        f"registry.follow_token: is the placeholder {PLACEHOLDER_TOKEN} (from env "
        "MESHDNS_FOLLOW_TOKEN)")
    assert config_warnings(parse({"api": {"token": "x" * MIN_TOKEN_CHARS}})) == []
    assert config_warnings(parse({})) == []
    [warning] = config_warnings(parse({}, {"MESHDNS_FOLLOW_TOKEN": "abc"}))
    assert warning.startswith("registry.follow_token: is only 3 characters long;"), warning


# ---------------------------------------------------------------- one parser, every depth


def errors_of(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, env)
    return info.value.errors


def test_registry_etcd_reports_every_error_like_the_other_sections() -> None:
    """registry.etcd is read by the same parser as every section: each bad or unknown
    key is reported, not only the first one (issue 24, step 5)."""
    assert errors_of({"registry": {"etcd": {"prefix": "meshdns", "request_timeout": 0,
                                            "endpoint": ["http://x:1"]}}}) == [
        'registry.etcd.prefix: must be a key prefix starting and ending with "/", like '
        '"/meshdns/", got "meshdns"',
        "registry.etcd.request_timeout: must be a number 0.05..600, got 0",
        "registry.etcd.endpoint: unknown key (known: endpoints, prefix, ca_file, cert_file, "
        "key_file, username, password, dial_timeout, request_timeout, max_txn_ops, "
        "max_txn_bytes)",
    ]
    # Its own rules (validate) are each said too, once its keys are good.
    with pytest.raises(ConfigError) as info:
        parse_config({"registry": {"etcd": {"cert_file": "/c.pem", "username": "u"}}}, {},
                     check_files=False)
    assert info.value.errors == [
        "registry.etcd.key_file: cert_file and key_file go together (a client certificate "
        "needs its key)",
        "registry.etcd.password: username and password go together",
    ]


def test_an_error_in_a_list_entry_has_the_entry_path_and_every_key_is_checked() -> None:
    assert errors_of({"dns": {"forward": [
        {"zone": "cluster.local", "upstreams": ["10.0.0.1"]},
        {"zone": "a..b", "upstreams": ["10.0.0.1", "10.0.0.1:99999"], "protocol": "quic"},
    ]}}) == [
        'dns.forward[1].zone: must be a domain name like "cluster.local" or ".", got "a..b"',
        'dns.forward[1].upstreams[1]: has a port that is not 0..65535, got "10.0.0.1:99999"',
        'dns.forward[1].protocol: must be one of udp, tcp, got "quic"',
    ]
    # Every bad entry of a list, and of several sections at once.
    assert errors_of({"dns": {"listen": ["localhost:53", "127.0.0.1"]},
                      "log": {"dnstap": {"tcp": "127.0.0.1:0", "queue_size": 0}}}) == [
        'dns.listen[0]: must be an IP address (with an optional :port), got "localhost:53"',
        'dns.listen[1]: must include a port, got "127.0.0.1"',
        "log.dnstap.tcp: must name the collector's port (1..65535), got \"127.0.0.1:0\"",
        "log.dnstap.queue_size: must be an integer 1..10000000, got 0",
    ]


def test_the_rules_between_keys_are_all_reported() -> None:
    assert errors_of({"dns": {"cache_min_ttl": 100, "cache_max_ttl": 50,
                              "upstreams": ["10.0.0.1"],
                              "forward": [{"zone": ".", "upstreams": ["10.0.0.2"]}]},
                      "registry": {"etcd": {"endpoints": ["http://127.0.0.1:2379"]},
                                   "seed_file": "seed.yaml"}}) == [
        "dns.cache_min_ttl: must not exceed dns.cache_max_ttl (50), got 100",
        'dns.forward[0].zone: "." cannot be set with dns.upstreams (they are the same zone): '
        "keep one of them",
        "registry.seed_file: cannot be set with registry.etcd.endpoints: the registry is "
        "etcd's; load it with PUT /v1/services instead",
    ]
    # Across sections, once the environment is applied: each rule broken.
    assert errors_of({"api": {"listen": "0.0.0.0:15080"}, "dns": {"ttl": 600}}) == [
        "api.token: is required when api.listen is not a loopback address (0.0.0.0:15080); "
        "set it or MESHDNS_API_TOKEN (set api.allow_unauthenticated: true to override)",
        "registry.vip_hold_seconds: must exceed dns.ttl (600), got 300.0",
    ]


def test_every_key_declares_its_check_in_its_field() -> None:
    from dataclasses import fields

    from meshdns import config

    sections = [config.Config, *config.Section.__subclasses__()]
    assert {c.__name__ for c in sections} >= {"DnsConfig", "EtcdConfig", "ForwardZone",
                                              "DnstapConfig", "LogConfig"}
    for cls in sections:
        for f in fields(cls):
            assert callable(config.key_of(f).check), f"{cls.__name__}.{f.name}"
    assert not hasattr(config, "_CHECKS")


def test_a_full_config_round_trips_through_plain_data() -> None:
    """config_to_raw -> JSON -> parse_config is how dns.workers processes get their
    config: every key, including views, select and the forward zones, comes back equal."""
    import json

    from meshdns.config import config_to_raw

    cfg = parse({
        "dns": {"upstreams": ["10.0.0.1"], "select": {"matchLabels": {"team": "a"}},
                "views": [{"clients": ["10.1.0.0/16"], "select": {"matchLabels": {"app": "x"}}},
                          {"clients": ["10.2.0.0/16"]}],
                "forward": [{"zone": "cluster.local", "upstreams": ["10.96.0.10"],
                             "protocol": "tcp"}],
                "allow": ["10.0.0.0/8"], "nsid": ""},
        "api": {"token": "t" * 32},
        "registry": {"etcd": {"endpoints": ["http://127.0.0.1:2379"], "username": "u",
                              "password": "p"}},
        "metrics": {"listen": "127.0.0.1:9153"},
        "log": {"dnstap": {"tcp": "127.0.0.1:6000", "messages": ["client_query"]}},
    })
    assert parse(json.loads(json.dumps(config_to_raw(cfg)))) == cfg
    assert parse(json.loads(json.dumps(config_to_raw(Config())))) == Config()


def test_env_overrides_are_declared_on_their_keys() -> None:
    # The etcd password from the environment only where a username is set.
    raw = {"registry": {"etcd": {"endpoints": ["http://127.0.0.1:2379"]}}}
    assert parse(raw, {"MESHDNS_ETCD_PASSWORD": "env"}).registry.etcd.password is None
    # An empty variable overrides nothing.
    assert parse({"api": {"token": "x" * 20}}, {"MESHDNS_API_TOKEN": ""}).api.token == "x" * 20
