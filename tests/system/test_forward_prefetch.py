"""Prefetch (issue 23, like unbound ``prefetch`` and CoreDNS ``cache { prefetch }``).

A name with a 5 s TTL asked 20 times a second for 60 s, from a real unbound:
clients wait on the upstream for the first answer only, and unbound sees about
one query per TTL (its own statistics, read with unbound-control). The
forwarder's clock is moved by hand in steps of 50 ms (fake_upstream.Clock);
after each query the test waits for any background refresh to land, so what
the clock says is all that decides. unbound, the sockets and dnspython are real.
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..fake_upstream import UNBOUND_SERVER, Clock, Unbound, wait_until
from ..support import ServerThread, free_port, make_config, query, run_tool, running_server

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None
                                or shutil.which("unbound-control") is None,
                                reason="unbound not installed")

NAME = "hot.example.test"
TTL = 5
RATE = 20  # queries per (hand-moved) second: 10 in each 0.5 s prefetch window
SECONDS = 60


class CountingUnbound(Unbound):
    """unbound serving ``NAME`` (TTL 5), with unbound-control on loopback for its stats."""

    def write_conf(self, data: list[str]) -> None:
        self.control_port = free_port()
        self.conf.write_text(UNBOUND_SERVER.format(host=self.host, port=self.port,
                                                   dir=self.dir) + f"""\
    statistics-cumulative: yes
    do-not-query-localhost: yes
    local-zone: "." static
    local-zone: "example.test." static
    local-data: "example.test. 3600 IN SOA ns.example.test. host.example.test. 1 2 3 4 30"
    local-data: "{NAME}. {TTL} IN A 192.0.2.80"
remote-control:
    control-enable: yes
    control-interface: 127.0.0.1
    control-port: {self.control_port}
    control-use-cert: no
""")

    def queries(self, name: str = NAME) -> int:
        """Queries unbound answered, by its own count (every query here is for ``name``)."""
        out = run_tool("unbound-control", "-c", str(self.conf), "stats_noreset")
        assert out.returncode == 0, out.stderr
        stats = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
        return int(stats["total.num.queries"])


@pytest.fixture
def unbound(tmp_path: Path) -> Iterator[CountingUnbound]:
    directory = tmp_path / "unbound"
    directory.mkdir()
    with CountingUnbound(directory) as server:
        yield server


def metric(server: ServerThread, family: str) -> dict[tuple[str, ...], float]:
    with urllib.request.urlopen(server.api_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {tuple(s.labels.values()): s.value for s in fam.samples
                    if s.name.endswith("_total")}
    raise AssertionError(f"{family} is not exported")


def hammer(tmp_path: Path, unbound: CountingUnbound, prefetch: bool
           ) -> tuple[dict[tuple[str, ...], float], float, int]:
    """Ask ``NAME`` RATE times a second for SECONDS; return the responses by (rcode,
    source), the prefetch counter and how many queries unbound saw from meshdns."""
    before = unbound.queries()
    raw = make_config(tmp_path, {"dns": {"upstreams": [unbound.address],
                                         "upstream_timeout": 2.0, "prefetch": prefetch}})
    with running_server(raw) as server:
        fwd = server.mesh.forwarder
        assert fwd is not None
        clock = Clock()
        fwd.clock = clock
        for _ in range(RATE * SECONDS):
            reply = query(server, NAME, timeout=5.0)
            assert reply.rcode() == dns.rcode.NOERROR
            assert [r.address for r in reply.answer[0]] == ["192.0.2.80"]
            assert 0 <= reply.answer[0].ttl <= TTL
            wait_until(lambda: fwd.inflight == 0, "the background refresh")
            clock.now += 1 / RATE
        responses = metric(server, "meshdns_dns_responses")
        prefetches = metric(server, "meshdns_forward_prefetch")[()]
    return responses, prefetches, unbound.queries() - before


def test_a_hot_name_never_makes_a_client_wait_after_its_first_answer(
        tmp_path: Path, unbound: CountingUnbound) -> None:
    responses, prefetches, asked = hammer(tmp_path, unbound, prefetch=True)
    # One answer waited on unbound (the first); every other one was a cache hit.
    assert responses == {("NOERROR", "upstream"): 1.0,
                         ("NOERROR", "cache"): RATE * SECONDS - 1.0}
    # unbound sees about one query per TTL: refreshed in the last 10% of each one,
    # so every 4.5 to 5 s, once per entry.
    assert SECONDS / TTL <= asked <= SECONDS / (TTL * 0.9) + 1
    assert prefetches == asked - 1


def test_prefetch_off_lets_entries_expire(tmp_path: Path, unbound: CountingUnbound) -> None:
    responses, prefetches, asked = hammer(tmp_path, unbound, prefetch=False)
    assert prefetches == 0
    # Every expiry makes one client wait: once per TTL, the first answer included.
    waited = responses[("NOERROR", "upstream")]
    assert waited == asked and SECONDS / TTL <= asked <= SECONDS / TTL + 1
    assert responses[("NOERROR", "cache")] == RATE * SECONDS - waited
