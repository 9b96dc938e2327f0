"""Wildcard host names over real sockets (issue 25; docs/meshservice.md section 5).

dig against a server whose upstream is unbound on loopback (NXDOMAIN for what it does
not serve): ``*.example.com`` owned by a mesh service answers ``a.example.com`` (and
``b.a.example.com``) authoritatively with its VIP, while ``example.com`` itself and
``x.api.example.com`` (below a name another entry owns) are forwarded. ``/v1/resolve``
names the wildcard and the closest encloser; a bad or doubly owned wildcard is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..apiclient import call
from ..support import ServerThread, make_config, run_tool, running_server
from .test_cname_chase import ClusterDns, cluster  # noqa: F401 (cluster: a fixture)

EXT = {"kind": "MeshExternalService", "mesh": "default", "name": "ext",
       "ports": [{"port": 443, "name": "https", "appProtocol": "http"}],
       "vip": "242.0.0.10", "hostnames": ["*.example.com", "*.shop.mesh"]}
API = {"name": "api", "namespace": "shop", "port": 80, "vip": "240.0.0.11",
       "hostnames": ["api.example.com"]}


def dig(server: ServerThread, name: str, *args: str) -> tuple[str, list[str], list[list[str]]]:
    """(status, header flags, answer records' fields) of one dig query."""
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", name, *args)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    status = text.split("status: ")[1].split(",")[0]
    flags = text.split(";; flags: ")[1].split(";")[0].split()
    answer: list[list[str]] = []
    if ";; ANSWER SECTION:" in text:
        section = text.split(";; ANSWER SECTION:\n")[1].split("\n\n")[0]
        answer = [line.split() for line in section.splitlines() if line.strip()]
    return status, flags, answer


@pytest.fixture
def server(tmp_path: Path, cluster: ClusterDns) -> Iterator[ServerThread]:  # noqa: F811
    raw = make_config(tmp_path, {"dns": {"upstreams": [cluster.address],
                                         "upstream_timeout": 2.0}})
    with running_server(raw) as s:
        reply = call(s.api_url, "PATCH", "/v1/services", {"upsert": [EXT, API]})
        assert reply.status == 200, reply.body
        yield s


def test_a_wildcard_matches_below_its_parent_only(server: ServerThread) -> None:
    for name in ("a.example.com", "b.a.example.com", "A.Example.Com"):
        for args in ((), ("+tcp",)):
            status, flags, answer = dig(server, name, "A", *args)
            assert status == "NOERROR" and "aa" in flags, (name, args)
            assert [(r[0], r[3], r[4]) for r in answer] == [(name + ".", "A", "242.0.0.10")]
    # The SRV at a synthesized name lists every port; AAAA is NODATA (no IPv6 VIP).
    assert [r[4:] for r in dig(server, "a.example.com", "SRV")[2]] == \
        [["0", "100", "443", "a.example.com."]]
    status, flags, answer = dig(server, "a.example.com", "AAAA")
    assert (status, answer) == ("NOERROR", []) and "aa" in flags
    # Not the parent itself, not below a node that exists: forwarded (unbound: NXDOMAIN).
    for name in ("example.com", "x.api.example.com"):
        status, flags, answer = dig(server, name, "A")
        assert (status, answer) == ("NXDOMAIN", []) and "aa" not in flags, name
    assert [r[4] for r in dig(server, "api.example.com", "A")[2]] == ["240.0.0.11"]
    # Inside a served domain: the parent is an empty non-terminal (NODATA).
    assert [r[4] for r in dig(server, "db.shop.mesh", "A")[2]] == ["242.0.0.10"]
    assert dig(server, "shop.mesh", "A")[:1] == ("NOERROR",)
    # The built-in names below shop.mesh's siblings are untouched.
    assert [r[4] for r in dig(server, "api.shop.svc.80.mesh", "A")[2]] == ["240.0.0.11"]


def test_resolve_names_the_wildcard(server: ServerThread) -> None:
    reply = call(server.api_url, "GET", "/v1/resolve?name=b.a.example.com&type=A")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.json()
    assert body["rule"] == "wildcard"
    assert body["wildcard"] == {"name": "*.example.com", "closest_encloser": "example.com"}
    assert body["service"]["name"] == "ext"
    assert "242.0.0.10" in str(body["answer"])
    reply = call(server.api_url, "GET", "/v1/resolve?name=x.api.example.com&type=A")
    assert reply.json()["rule"] != "wildcard"


@pytest.mark.parametrize(("host", "status"), [
    ("*.mesh", 400), ("*.com", 400), ("*.1.240.in-addr.arpa", 400), ("a.*.example.com", 400),
    ("*.example.com", 409),
])
def test_a_bad_or_taken_wildcard_is_refused(server: ServerThread, host: str,
                                            status: int) -> None:
    item = dict(API, name="other", vip="240.0.0.12", hostnames=[host])
    reply = call(server.api_url, "PATCH", "/v1/services", {"upsert": [item]})
    assert reply.status == status, reply.body
    assert dig(server, "a.example.com", "A")[2][0][4] == "242.0.0.10"  # nothing changed
