"""Address sets over real sockets (issue 25; docs/meshservice.md section 4).

dig against a running server: a headless mesh service with 5 endpoint addresses answers
A with all 5 in an order that rotates per query (a cyclic shift), per-endpoint names
``<endpoint>.H`` answer one address and the PTR of each endpoint address names
``<endpoint>.C.``; a set too large for 512 bytes comes truncated to what fits (TC=1)
over UDP and whole over TCP. The JSON record carries the endpoints and no VIP.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import dns.message
import pytest
from dnslib import DNSRecord

from ..apiclient import ServerProcess, call, wait_for
from ..support import ServerThread, make_config, run_tool, running_server
from .test_follow_delta import (  # noqa: F401 (procs: a fixture)
    leader_process,
    listing,
    metric,
    procs,
    start,
)

ADDRESSES = [f"10.1.0.{i}" for i in range(1, 6)]
DB = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "db",
      "ports": [{"port": 5432, "name": "postgres"}], "hostnames": ["db.shop.mesh"],
      "endpoints": [{"address": a, "name": f"db-{i}"} for i, a in enumerate(ADDRESSES)]
      + [{"address": "fd00:1::7"}]}
# 40 addresses: 40 A records of 16 bytes do not fit 512 bytes.
BIG = {"kind": "MeshService", "namespace": "shop", "name": "big", "ports": [],
       "hostnames": ["big.shop.mesh"],
       "endpoints": [{"address": f"10.2.0.{i}"} for i in range(1, 41)]}


def dig(server: ServerThread, name: str, *args: str) -> tuple[list[str], list[list[str]]]:
    """(header flags, answer records' fields) of one dig query."""
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", "+ignore",
                   name, *args)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "status: NOERROR" in text, text
    flags = text.split(";; flags: ")[1].split(";")[0].split()
    answer: list[list[str]] = []
    if ";; ANSWER SECTION:" in text:
        section = text.split(";; ANSWER SECTION:\n")[1].split("\n\n")[0]
        answer = [line.split() for line in section.splitlines() if line.strip()]
    return flags, answer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, services=[])) as s:
        reply = call(s.api_url, "PATCH", "/v1/services", {"upsert": [DB, BIG]})
        assert reply.status == 200, reply.body
        yield s


def test_the_record_has_endpoints_and_no_vip(server: ServerThread) -> None:
    listing: dict[str, Any] = call(server.api_url, "GET", "/v1/services").json()
    db = next(s for s in listing["services"] if s.get("name") == "db")
    assert db["vip"] is None and db["vip6"] is None
    assert db["endpoints"] == DB["endpoints"]


def test_five_addresses_rotate_per_query(server: ServerThread) -> None:
    orders = []
    for _ in range(6):
        for args in ((), ("+tcp",)):  # one counter for both transports
            flags, answer = dig(server, "db.shop.mesh", "A", *args)
            assert "aa" in flags and "tc" not in flags
            orders.append([r[4] for r in answer])
    # Every answer holds all 5; each is the one before it shifted by one.
    assert all(sorted(o) == ADDRESSES for o in orders)
    for before, after in pairwise(orders):
        assert after == before[1:] + before[:1], orders
    assert {o[0] for o in orders[:5]} == set(ADDRESSES)
    assert [r[4] for r in dig(server, "db.shop.mesh", "AAAA")[1]] == ["fd00:1::7"]


def test_per_endpoint_names_and_ptr(server: ServerThread) -> None:
    for i, address in enumerate(ADDRESSES):
        assert [r[4] for r in dig(server, f"db-{i}.db.shop.mesh", "A")[1]] == [address]
        assert [r[4] for r in dig(server, "-x", address)[1]] == [f"db-{i}.db.shop.mesh."]
    assert dig(server, "db-0.db.shop.mesh", "AAAA")[1] == []  # NODATA
    host, port = server.dns_addr()
    out = run_tool("dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5",
                   "db-9.db.shop.mesh", "A")
    assert "status: NXDOMAIN" in out.stdout


def test_udp_truncates_to_what_fits_tcp_is_whole(server: ServerThread) -> None:
    flags, answer = dig(server, "big.shop.mesh", "A", "+notcp", "+bufsize=512")
    assert "tc" in flags
    assert 20 <= len(answer) < 40  # whole records, as many as fit 512 bytes
    first = [r[4] for r in answer]
    flags, answer = dig(server, "big.shop.mesh", "A", "+tcp")
    assert "tc" not in flags and len(answer) == 40
    whole = [r[4] for r in answer]
    assert sorted(whole) == sorted(f"10.2.0.{i}" for i in range(1, 41))
    assert whole[0] != first[0]  # the rotation moved on between the two answers
    flags, answer = dig(server, "big.shop.mesh", "A", "+notcp", "+noedns")
    assert "tc" in flags and len(answer) == (512 - 12 - 19) // 16


def test_resolve_names_the_endpoint(server: ServerThread) -> None:
    body = call(server.api_url, "GET", "/v1/resolve?name=db-2.db.shop.mesh&type=A").json()
    assert body["rule"] == "endpoint"
    assert body["endpoint"] == {"address": "10.1.0.3", "name": "db-2"}
    assert body["service"]["name"] == "db"


# ---------------------------------------------------------------- follower


def test_an_address_set_moves_through_a_follower_by_delta(
        tmp_path: Path, procs: list[ServerProcess]) -> None:  # noqa: F811
    leader = start(procs, leader_process(tmp_path))
    follower = start(procs, ServerProcess(tmp_path / "follower",
                                          {"registry": {"follow": leader.url}},
                                          name="follower"))
    wait_for(lambda: listing(follower.url)[0] == listing(leader.url)[0], 30, "first sync")
    key = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "db"}
    for body in ({"upsert": [DB]},
                 {"upsert": [dict(DB, endpoints=DB["endpoints"][1:])]},  # one endpoint gone
                 {"endpoints": [{"service": key, "delete": [{"address": "10.1.0.3"}],
                                 "upsert": [{"address": "10.1.0.3"}]}]}):  # unnamed now
        assert call(leader.url, "PATCH", "/v1/services", body).status == 200
        revision = call(leader.url, "GET", "/v1/services").json()["revision"]
        wait_for(lambda rev=revision: call(follower.url, "GET", "/v1/services").json()[
            "revision"] == rev, 30, "the delta")
        assert call(follower.url, "GET", "/v1/services").json() == \
            call(leader.url, "GET", "/v1/services").json()
    assert metric(follower.url, "meshdns_follow_full_syncs_total") == 1
    out = run_tool("dig", "@127.0.0.1", "-p", str(follower.dns_addr[1]), "+short",
                   "db.shop.mesh", "A")
    assert sorted(out.stdout.split()) == ADDRESSES[1:]
    for gone in ("db-0", "db-2"):  # removed, and renamed to no name by the endpoint patch
        out = run_tool("dig", "@127.0.0.1", "-p", str(follower.dns_addr[1]), "+short",
                       f"{gone}.db.shop.mesh", "A")
        assert out.stdout.split() == []


def test_a_patch_changes_one_endpoint(server: ServerThread) -> None:
    key = {"kind": "MeshService", "mesh": "default", "namespace": "shop", "name": "db"}
    body = {"endpoints": [{"service": key, "upsert": [{"address": "10.1.0.9", "name": "db-9"},
                                                      {"address": "10.1.0.2",
                                                       "name": "db-renamed"}],
                           "delete": [{"address": "10.1.0.1"}]}]}
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == 200, reply.body
    db = next(s for s in call(server.api_url, "GET", "/v1/services").json()["services"]
              if s.get("name") == "db")
    assert db["endpoints"] == [
        {"address": "10.1.0.2", "name": "db-renamed"}, *DB["endpoints"][2:],
        {"address": "10.1.0.9", "name": "db-9"}]
    assert [r[4] for r in dig(server, "db-9.db.shop.mesh", "A")[1]] == ["10.1.0.9"]
    assert [r[4] for r in dig(server, "-x", "10.1.0.2")[1]] == ["db-renamed.db.shop.mesh."]
    assert sorted(r[4] for r in dig(server, "db.shop.mesh", "A")[1]) == \
        sorted(["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.9"])
    # An entry that does not exist: 409 naming it; nothing changed.
    missing = dict(key, name="nope")
    reply = call(server.api_url, "PATCH", "/v1/services",
                 {"endpoints": [{"service": missing, "upsert": [{"address": "10.9.9.9"}]}]})
    assert reply.status == 409 and b"nope" in reply.body
    reply = call(server.api_url, "PATCH", "/v1/services",
                 {"endpoints": [{"service": key, "delete": [{"address": "nope"}]}]})
    assert reply.status == 400


@pytest.mark.parametrize("edns", [None, 0])
def test_the_same_query_bytes_again_get_the_next_order(server: ServerThread,
                                                       edns: int | None) -> None:
    """The reply cache keys on the query's bytes: a stub that sends the very same
    query (same ID, no cookie; glibc and musl do between tries) must still see the set
    rotate, so an address set's answer is never cached (fast path and dnslib path)."""
    query = dns.message.make_query("db.shop.mesh", "A", use_edns=edns)
    query.id = 4242
    wire = query.to_wire()
    host, port = server.dns_addr()
    orders = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.connect((host, port))
        for _ in range(5):
            sock.send(wire)
            # dnslib keeps the records in wire order (dnspython's rdatasets do not)
            orders.append([str(rr.rdata) for rr in DNSRecord.parse(sock.recv(4096)).rr])
    assert all(sorted(o) == ADDRESSES for o in orders)
    assert {o[0] for o in orders} == set(ADDRESSES), orders
