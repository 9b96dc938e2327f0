"""Cache policy of forwarded answers (issue 23): TTL bounds for positive and negative
answers and the serve-stale timings, as dns config, checked and acting.

Real meshdns on loopback forwarding to the fault-injecting FakeUpstream; clients
are dnspython; the forwarder's clock is moved by hand (no sleeping).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest

from meshdns.config import ConfigError, DnsConfig, parse_config

from ..fake_upstream import Clock, FakeUpstream, wait_until
from ..support import ServerThread, make_config, query, running_server


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def start(tmp: Path, fake: FakeUpstream, **dns_extra: Any) -> Any:
    """meshdns forwarding to ``fake``; prefetch off (a hit near expiry would ask again:
    test_forward_prefetch.py covers that)."""
    raw = make_config(tmp, {"dns": {"upstreams": [fake.address], "upstream_timeout": 1.0,
                                    "prefetch": False, **dns_extra}})
    return running_server(raw)


def ask(server: ServerThread, name: str) -> dns.message.Message:
    return query(server, name, timeout=5.0)


def moved(server: ServerThread) -> Clock:
    clock = Clock()
    fwd = server.mesh.forwarder
    assert fwd is not None
    fwd.clock = clock
    return clock


# ---------------------------------------------------------------- config


def test_defaults() -> None:
    dns_cfg = parse_config({}).dns
    assert (dns_cfg.cache_min_ttl, dns_cfg.cache_max_ttl) == (0, 86400)
    assert (dns_cfg.cache_negative_min_ttl, dns_cfg.cache_negative_max_ttl) == (0, 3600)
    assert (dns_cfg.serve_stale_ttl, dns_cfg.serve_stale_refresh) == (30, 30.0)
    assert dns_cfg.prefetch is True
    assert dns_cfg == DnsConfig()


@pytest.mark.parametrize(("dns_raw", "message"), [
    ({"cache_min_ttl": 100, "cache_max_ttl": 50},
     "dns.cache_min_ttl: must not exceed dns.cache_max_ttl (50), got 100"),
    ({"cache_negative_min_ttl": 4000},
     "dns.cache_negative_min_ttl: must not exceed dns.cache_negative_max_ttl (3600), got 4000"),
    ({"cache_max_ttl": -1}, "dns.cache_max_ttl: must be an integer 0..86400, got -1"),
    ({"cache_negative_max_ttl": "5m"}, 'dns.cache_negative_max_ttl: must be an integer 0..86400, got "5m"'),
    ({"serve_stale_ttl": 0}, "dns.serve_stale_ttl: must be an integer 1..86400, got 0"),
    ({"serve_stale_refresh": 0.5}, "dns.serve_stale_refresh: must be a number 1..86400, got 0.5"),
    ({"prefetch": "yes"}, 'dns.prefetch: must be true or false, got "yes"'),
])
def test_bad_values_name_the_field(dns_raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"dns": dns_raw})
    assert str(exc.value) == message


# ---------------------------------------------------------------- TTL bounds act


def test_max_ttl_caps_what_is_cached_and_served(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.rule("long.example.test", ttl=300)
    servers = start(tmp_path, fake, cache_max_ttl=10)
    with servers as server:
        clock = moved(server)
        assert ask(server, "long.example.test").answer[0].ttl == 10
        clock.now += 9.5
        assert ask(server, "long.example.test").answer[0].ttl == 1
        assert fake.count("long.example.test") == 1
        clock.now += 1
        assert ask(server, "long.example.test").answer[0].ttl == 10
        assert fake.count("long.example.test") == 2


def test_min_ttl_keeps_short_answers_longer(tmp_path: Path, fake: FakeUpstream) -> None:
    fake.rule("short.example.test", ttl=2)
    servers = start(tmp_path, fake, cache_min_ttl=60)
    with servers as server:
        clock = moved(server)
        assert ask(server, "short.example.test").answer[0].ttl == 60
        clock.now += 30
        assert ask(server, "short.example.test").answer[0].ttl == 30
        assert fake.count("short.example.test") == 1


@pytest.mark.parametrize(("bounds", "served", "cached_for"), [
    ({"cache_negative_max_ttl": 5}, 5, 5),
    ({"cache_negative_min_ttl": 120}, 120, 120),
])
def test_negative_bounds(tmp_path: Path, fake: FakeUpstream, bounds: dict[str, int],
                         served: int, cached_for: int) -> None:
    fake.rule("nx.example.test", "nxdomain", soa_minimum=60)
    servers = start(tmp_path, fake, **bounds)
    with servers as server:
        clock = moved(server)
        first = ask(server, "nx.example.test")
        assert first.rcode() == dns.rcode.NXDOMAIN and first.authority[0].ttl == served
        clock.now += cached_for - 0.5
        assert ask(server, "nx.example.test").rcode() == dns.rcode.NXDOMAIN
        assert fake.count("nx.example.test") == 1
        clock.now += 1
        assert ask(server, "nx.example.test").authority[0].ttl == served
        assert fake.count("nx.example.test") == 2


def test_positive_bounds_leave_negative_answers_alone(tmp_path: Path,
                                                      fake: FakeUpstream) -> None:
    fake.rule("nx2.example.test", "nxdomain", soa_minimum=60)
    servers = start(tmp_path, fake, cache_min_ttl=600, cache_max_ttl=900)
    with servers as server:
        moved(server)
        assert ask(server, "nx2.example.test").authority[0].ttl == 60


# ---------------------------------------------------------------- serve-stale timings act


def test_serve_stale_ttl_and_refresh_come_from_config(tmp_path: Path,
                                                      fake: FakeUpstream) -> None:
    fake.rule("stale.example.test", ttl=5, addresses=["192.0.2.40"])
    servers = start(tmp_path, fake, serve_stale=600, serve_stale_ttl=7,
                       serve_stale_refresh=5)
    with servers as server:
        clock = moved(server)
        assert ask(server, "stale.example.test").answer[0].ttl == 5
        fake.rule("stale.example.test", "refused")
        clock.now += 6  # expired; the upstream refuses: the stale answer, with TTL 7
        stale = ask(server, "stale.example.test")
        assert [r.address for r in stale.answer[0]] == ["192.0.2.40"]
        assert stale.answer[0].ttl == 7
        asked = fake.count("stale.example.test")
        clock.now += 4  # within the 5 s refresh period: the upstream is left alone
        assert ask(server, "stale.example.test").answer[0].ttl == 7
        assert fake.count("stale.example.test") == asked
        clock.now += 2  # past it: answered stale at once, asked again in the background
        assert ask(server, "stale.example.test").answer[0].ttl == 7
        wait_until(lambda: fake.count("stale.example.test") == asked + 1,
                   "the background refresh")
