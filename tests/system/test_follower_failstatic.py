"""Fail static for followers (issue 11 item 4).

A follower with ``registry.state_file`` restarts serving what it last pulled
while its leader is down, at the revision it had, and catches up when the leader
returns. A follower with nothing yet (no state, leader down) answers SERVFAIL
for mesh names, never an authoritative NXDOMAIN, and still forwards other names.

Leader and follower run as real ``python -m meshdns serve`` processes, killed
with SIGKILL; DNS is asked over UDP with dnspython.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import yaml

from meshdns.core.answer import (
    FORWARD,
    NOT_LOADED,
    RCODE_SERVFAIL,
    ForwardRequest,
    MessageHandler,
    Zone,
    ZoneSettings,
    key_to_labels,
)
from meshdns.core.registry import Registry, VipRange
from meshdns.store import journal_path, replay_journal

from ..apiclient import ServerProcess, a_records, call, dns_query, wait_for
from ..fake_upstream import FakeUpstream
from ..support import DEMO_SERVICES

SEARCH = "demo.svc.cluster.local"


def leader_process(tmp: Path) -> ServerProcess:
    seed = tmp / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    return ServerProcess(tmp / "leader", {"registry": {
        "seed_file": str(seed), "state_file": str(tmp / "leader" / "state.json")}},
        name="leader")


def follower_process(tmp: Path, leader_url: str, **extra: Any) -> ServerProcess:
    config: dict[str, Any] = {"registry": {
        "follow": leader_url, "state_file": str(tmp / "follower" / "state.json")}}
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return ServerProcess(tmp / "follower", config, name="follower")


def state_doc(path: Path) -> Any:
    """The state file as start-up reads it: the snapshot with its journal replayed (a
    follower journals the deltas it applies, like a leader its PATCHes)."""
    doc = json.loads(path.read_bytes())
    replay_journal(doc, journal_path(path))
    return doc


def soa_serial(addr: tuple[str, int]) -> int:
    reply = dns_query(addr, "mesh", "SOA")
    assert reply.rcode() == dns.rcode.NOERROR
    return int(reply.answer[0][0].serial)


def readyz(proc: ServerProcess) -> tuple[int, Any]:
    reply = call(proc.url, "GET", "/readyz", timeout=5)
    return reply.status, reply.json()


# ------------------------------------------------------------------ the pure rule

def test_a_zone_with_no_registry_denies_nothing() -> None:
    """Every name the zone would answer itself is SERVFAIL; the rest is forwarded."""
    settings = ZoneSettings(domains=("mesh",), search=(SEARCH,),
                            range4=VipRange.from_cidr("240.0.0.0/4"), forwarding=True)
    unloaded = Zone(Registry.empty(), settings, loaded=False)
    for name, qtype in [("frontend.kong.svc.80.mesh", 1), ("nope.mesh", 28), ("mesh", 6),
                        ("mesh", 2), ("frontend_kong_svc_80.mesh", 1),
                        (f"frontend.kong.svc.80.mesh.{SEARCH}", 1),
                        ("7.0.0.240.in-addr.arpa", 12), ("240.in-addr.arpa", 6)]:
        decision = unloaded.decide(key_to_labels(name), qtype, 1)
        assert (decision.rcode, decision.rule, decision.aa, decision.answer) == \
            (RCODE_SERVFAIL, NOT_LOADED, False, ()), name
    for name in ["example.org", "1.0.0.10.in-addr.arpa", f"web.{SEARCH}", SEARCH]:
        assert unloaded.decide(key_to_labels(name), 1, 1).rule == FORWARD, name
    # The same zone once loaded (an empty registry that is the truth): NXDOMAIN, AA.
    loaded = Zone(Registry.empty(), settings)
    decision = loaded.decide(key_to_labels("nope.mesh"), 1, 1)
    assert (decision.rcode, decision.aa) == (dns.rcode.NXDOMAIN, True)

    # Through the resolver: the SERVFAIL is not kept past the swap to a loaded zone.
    resolver = MessageHandler(unloaded)
    query = dns.message.make_query("nope.mesh", "A").to_wire()
    reply = resolver.handle_udp(query)
    assert isinstance(reply, bytes)
    assert dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    assert isinstance(resolver.handle_udp(dns.message.make_query("example.org", "A").to_wire()),
                      ForwardRequest)
    resolver.set_zone(loaded)
    reply = resolver.handle_udp(query)
    assert isinstance(reply, bytes)
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN


# ------------------------------------------------------------------ real processes

def test_follower_restarted_while_the_leader_is_down_serves_its_state_file(
        tmp_path: Path) -> None:
    leader = leader_process(tmp_path)
    follower = follower_process(tmp_path, leader.url)
    state = tmp_path / "follower" / "state.json"
    try:
        leader.start()
        follower.start()
        assert call(leader.url, "PATCH", "/v1/services", {"upsert": [
            {"name": "one", "namespace": "ns", "port": 1, "vip": "240.0.5.1"}]}).status == 200
        wait_for(lambda: a_records(follower.dns_addr, "one.ns.svc.1.mesh") == ["240.0.5.1"],
                 20, "the follower to sync revision 2")
        # The allocated VIP of redis is the leader's: remember it for after the restart.
        redis = a_records(leader.dns_addr, "redis.cache.svc.6379.mesh")
        assert len(redis) == 1 and a_records(follower.dns_addr, "redis.cache.svc.6379.mesh") \
            == redis
        listing = call(follower.url, "GET", "/v1/services").json()
        # What it pulled is on its disk, as a mirror of the leader's revision 2.
        doc = state_doc(state)
        assert doc["revision"] == 2 and doc["mirror"] is True
        assert {(s["name"], s["vip"]) for s in doc["services"]} == \
            {(s["name"], s["vip"]) for s in listing["services"]}

        # Both die without any shutdown code; only the follower comes back.
        leader.kill()
        follower.kill()
        follower.start()  # waits for /readyz 200: ready at once, from its own state file
        status, body = readyz(follower)
        assert status == 200 and body["revision"] == 2 and body["services"] == 4
        assert a_records(follower.dns_addr, "frontend.kong.svc.80.mesh") == ["240.0.0.7"]
        assert a_records(follower.dns_addr, "one.ns.svc.1.mesh") == ["240.0.5.1"]
        assert a_records(follower.dns_addr, "redis.cache.svc.6379.mesh") == redis
        reply = dns_query(follower.dns_addr, "nope.mesh")
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA
        assert soa_serial(follower.dns_addr) == 2
        restored = call(follower.url, "GET", "/v1/services")
        assert restored.etag == '"2"' and restored.json() == listing
        assert "serving revision 2 (4 services) from state file" in follower.log()
        # It has tried the leader and failed, and keeps serving all the same.
        wait_for(lambda: "leader http://127.0.0.1" in follower.log()
                 and "unavailable" in follower.log(), 20, "a failed poll logged")
        assert readyz(follower)[1]["follow"]["connected"] is False
        assert a_records(follower.dns_addr, "one.ns.svc.1.mesh") == ["240.0.5.1"]

        # The leader returns (its own state file, same port) and changes something.
        leader.start()
        assert call(leader.url, "PATCH", "/v1/services", {"upsert": [
            {"name": "two", "namespace": "ns", "port": 2, "vip": "240.0.5.2"}],
            "delete": [{"name": "one", "namespace": "ns", "port": 1}]}).status == 200
        wait_for(lambda: a_records(follower.dns_addr, "two.ns.svc.2.mesh") == ["240.0.5.2"],
                 30, "the follower to catch up with revision 3")
        assert dns_query(follower.dns_addr, "one.ns.svc.1.mesh").rcode() == dns.rcode.NXDOMAIN
        assert soa_serial(follower.dns_addr) == 3
        assert call(follower.url, "GET", "/v1/services").json() == \
            call(leader.url, "GET", "/v1/services").json()
        assert state_doc(state)["revision"] == 3
        wait_for(lambda: readyz(follower)[1]["follow"]["connected"] is True, 20,
                 "the follower to report the leader connected")

        # Restarted with the leader up and nothing new: its first (full) read finds the
        # same registry, which is neither written to disk again nor republished.
        before = state.stat()
        follower.kill()
        follower.start()
        wait_for(lambda: readyz(follower)[1]["follow"]["connected"] is True, 20,
                 "the restarted follower to reach the leader")
        after = state.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert a_records(follower.dns_addr, "two.ns.svc.2.mesh") == ["240.0.5.2"]
        assert soa_serial(follower.dns_addr) == 3
    finally:
        follower.stop()
        leader.stop()


def test_a_fresh_follower_with_the_leader_down_answers_servfail_and_forwards(
        tmp_path: Path) -> None:
    leader = leader_process(tmp_path)  # not started yet: its port is the follow URL
    with FakeUpstream() as upstream:
        upstream.rule("example.org", addresses=["192.0.2.44"])
        follower = follower_process(tmp_path, leader.url,
                                    dns={"upstreams": [upstream.address], "search": [SEARCH]})
        try:
            follower.start(ready=False)
            assert not (tmp_path / "follower" / "state.json").exists()
            status, body = readyz(follower)
            assert status == 503 and body["reason"] == "no registry loaded yet"
            assert call(follower.url, "GET", "/healthz").status == 200

            for name, rdtype in [("frontend.kong.svc.80.mesh", "A"), ("nope.mesh", "AAAA"),
                                 ("mesh", "SOA"), (f"frontend.kong.svc.80.mesh.{SEARCH}", "A"),
                                 (dns.reversename.from_address("240.0.0.7").to_text(), "PTR")]:
                reply = dns_query(follower.dns_addr, name, rdtype)
                assert reply.rcode() == dns.rcode.SERVFAIL, (name, reply)
                assert not reply.flags & dns.flags.AA and not reply.answer, name
            assert upstream.count() == 0  # mesh names are never sent upstream

            reply = dns_query(follower.dns_addr, "example.org")
            assert reply.rcode() == dns.rcode.NOERROR
            assert [rr.address for rr in reply.answer[0]] == ["192.0.2.44"]
            assert upstream.count("example.org") == 1
            explained = call(follower.url, "GET", "/v1/resolve?name=nope.mesh").json()
            assert (explained["rule"], explained["rcode"], explained["authoritative"]) == \
                ("not-loaded", "SERVFAIL", False)
            assert "no registry yet; mesh names get SERVFAIL" in follower.log()

            # The leader comes up: the follower loads, persists and answers for real.
            leader.start()
            wait_for(lambda: a_records(follower.dns_addr, "frontend.kong.svc.80.mesh")
                     == ["240.0.0.7"], 30, "the first sync")
            reply = dns_query(follower.dns_addr, "nope.mesh")
            assert reply.rcode() == dns.rcode.NXDOMAIN and reply.flags & dns.flags.AA
            assert readyz(follower)[0] == 200
            assert state_doc(tmp_path / "follower" / "state.json")["revision"] == 1
        finally:
            follower.stop()
            leader.stop()


def test_a_follower_with_an_unusable_state_file_starts_without_it(tmp_path: Path) -> None:
    """A leader refuses to start on a corrupt state file (it holds the only copy); a
    follower's is a copy of the leader's, so it is moved aside instead: a sidecar in a
    restart loop would keep its app from starting."""
    leader = leader_process(tmp_path)  # not started yet
    follower = follower_process(tmp_path, leader.url)
    state = tmp_path / "follower" / "state.json"
    torn = b'{"format": 1, "revision": 7, "services": [{"name": "fro'
    state.write_bytes(torn)
    try:
        follower.start(ready=False)
        assert readyz(follower)[0] == 503
        assert dns_query(follower.dns_addr, "frontend.kong.svc.80.mesh").rcode() == \
            dns.rcode.SERVFAIL
        assert (tmp_path / "follower" / "state.json.bad").read_bytes() == torn
        assert not state.exists()
        assert "is truncated or corrupt" in follower.log() and "moved aside" in follower.log()

        leader.start()
        wait_for(lambda: a_records(follower.dns_addr, "frontend.kong.svc.80.mesh")
                 == ["240.0.0.7"], 30, "the first sync")
        assert state_doc(state)["revision"] == 1 and state_doc(state)["mirror"] is True
    finally:
        follower.stop()
        leader.stop()
