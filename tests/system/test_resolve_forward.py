"""``/v1/resolve`` and ``meshdns resolve`` for a forwarded name: the upstream's rcode
and records, as the forwarder got them (from its cache, else one upstream lookup, which
is counted and cached as a DNS query's would be). A real unbound upstream on loopback,
a real server, the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..apiclient import call
from ..fake_upstream import Unbound
from ..support import ServerThread, make_config, query, running_server
from .test_cli import clean_env, meshdns_cmd

pytestmark = pytest.mark.skipif(shutil.which("unbound") is None, reason="unbound not installed")


@pytest.fixture
def forwarding(tmp_path: Path) -> Iterator[tuple[ServerThread, Unbound]]:
    (tmp_path / "unbound").mkdir()
    with Unbound(tmp_path / "unbound") as unbound, running_server(make_config(
            tmp_path, {"dns": {"upstreams": [unbound.address], "upstream_timeout": 2.0}})
    ) as server:
        yield server, unbound


def upstream_requests(server: ServerThread) -> float:
    """meshdns_upstream_requests_total, every label summed."""
    text = call(server.api_url, "GET", "/metrics").body.decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "meshdns_upstream_requests_total")


def resolve(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshdns_cmd("resolve", *args, "--server", server.api_url),
                          capture_output=True, text=True, timeout=60, env=clean_env(),
                          check=False)


def test_resolve_returns_the_upstreams_answer_and_counts_one_lookup(
        forwarding: tuple[ServerThread, Unbound]) -> None:
    server, unbound = forwarding
    before = upstream_requests(server)
    proc = resolve(server, "www.example.test", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["rule"] == "forward" and doc["upstreams"] == [unbound.address]
    assert doc["rcode"] == "NOERROR" and doc["authoritative"] is True  # unbound's local-data
    [record] = doc["answer"]
    assert (record["name"], record["type"], record["data"]) == (
        "www.example.test.", "A", "192.0.2.10")
    assert 0 < record["ttl"] <= 300
    assert upstream_requests(server) == before + 1  # one live lookup, as DNS makes

    # Then DNS and a second resolve are answered from the forwarder's cache.
    reply = query(server, "www.example.test")
    assert [rr.address for rr in reply.answer[0]] == ["192.0.2.10"]
    again = json.loads(resolve(server, "www.example.test", "-o", "json").stdout)
    assert again["rcode"] == "NOERROR" and [r["data"] for r in again["answer"]] == [
        "192.0.2.10"]
    assert upstream_requests(server) == before + 1
    # The explanation counts no DNS response: only the one dnspython query above.
    assert sum(server.mesh.handler.snapshot_counts().requests.values()) == 1


def test_resolve_text_output_and_an_upstream_nxdomain(
        forwarding: tuple[ServerThread, Unbound]) -> None:
    server, unbound = forwarding
    proc = resolve(server, "www.example.test", "AAAA")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (f";; www.example.test AAAA: NOERROR, authoritative from the upstream "
                        f"(forwarded to {unbound.address}, rule forward)")
    assert lines[1].split()[::2] == ["www.example.test.", "AAAA"]
    assert lines[1].split()[3] == "2001:db8::10"

    doc = json.loads(resolve(server, "nope.example.test", "-o", "json").stdout)
    assert doc["rcode"] == "NXDOMAIN" and doc["answer"] == []
    assert [(r["name"], r["type"]) for r in doc["authority"]] == [("example.test.", "SOA")]
