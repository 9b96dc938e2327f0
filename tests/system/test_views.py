"""Views per client (``dns.views``, issue 26): two client addresses get different answers
for the same name, each view's answers are cached apart, a PATCH reaches every view,
``/v1/resolve?client=`` says which view answered, and SIGHUP reloads the views.

Clients send from distinct loopback addresses (each is a different client to the
server); dnspython and dig over UDP and TCP, a real SIGHUP to a real process.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from ..apiclient import ServerProcess, call
from ..support import ServerThread, make_config, run_tool, running_server, tool

A_CLIENT, B_CLIENT, OTHER = "127.0.0.5", "127.0.0.6", "127.0.0.1"
WEB, API = "web.team.svc.80.mesh", "api.team.svc.80.mesh"
SERVICES: list[dict[str, Any]] = [
    {"name": "web", "namespace": "team", "port": 80, "vip": "240.0.9.1", "mesh": "a"},
    {"name": "api", "namespace": "team", "port": 80, "vip": "240.0.9.2", "mesh": "b"},
]
VIEWS = [{"clients": [f"{A_CLIENT}/32"], "select": {"matchLabels": {"mesh": "a"}}},
         {"clients": [f"{B_CLIENT}/32"], "select": {"matchLabels": {"mesh": "b"}}}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, {"dns": {"views": VIEWS}},
                                    services=SERVICES)) as srv:
        yield srv


def ask(addr: tuple[str, int], source: str, name: str, tcp: bool = False
        ) -> tuple[int, list[str]]:
    q = dns.message.make_query(name, "A", use_edns=0)
    if tcp:
        reply = dns.query.tcp(q, addr[0], port=addr[1], timeout=3, source=source)
    else:
        reply = dns.query.udp(q, addr[0], port=addr[1], timeout=3, source=source,
                              ignore_unexpected=True)
    return int(reply.rcode()), [rr.address for rrset in reply.answer for rr in rrset]


@pytest.mark.parametrize("tcp", [False, True])
def test_two_clients_get_different_answers_for_the_same_name(server: ServerThread,
                                                             tcp: bool) -> None:
    addr = server.dns_addr(4)
    assert ask(addr, A_CLIENT, WEB, tcp) == (dns.rcode.NOERROR, ["240.0.9.1"])
    assert ask(addr, B_CLIENT, WEB, tcp) == (dns.rcode.NXDOMAIN, [])
    assert ask(addr, B_CLIENT, API, tcp) == (dns.rcode.NOERROR, ["240.0.9.2"])
    assert ask(addr, A_CLIENT, API, tcp) == (dns.rcode.NXDOMAIN, [])
    # Any other client: the global dns.select (none): every service.
    assert ask(addr, OTHER, WEB, tcp) == (dns.rcode.NOERROR, ["240.0.9.1"])
    assert ask(addr, OTHER, API, tcp) == (dns.rcode.NOERROR, ["240.0.9.2"])


@pytest.mark.parametrize("tcp", [False, True])
def test_a_name_answered_for_one_view_is_never_served_to_another(server: ServerThread,
                                                                 tcp: bool) -> None:
    addr = server.dns_addr(4)
    for _ in range(3):  # the second and third asks are cache hits, each in its own view
        assert ask(addr, A_CLIENT, WEB, tcp)[0] == dns.rcode.NOERROR
        assert ask(addr, B_CLIENT, WEB, tcp)[0] == dns.rcode.NXDOMAIN
        assert ask(addr, OTHER, WEB, tcp)[0] == dns.rcode.NOERROR
    for _ in range(3):  # the other order: view A's cached NXDOMAIN never reaches B
        assert ask(addr, A_CLIENT, API, tcp)[0] == dns.rcode.NXDOMAIN
        assert ask(addr, B_CLIENT, API, tcp)[0] == dns.rcode.NOERROR
        assert ask(addr, OTHER, API, tcp)[0] == dns.rcode.NOERROR


def test_dig_from_two_addresses(server: ServerThread) -> None:
    dig = tool("dig")
    assert dig is not None, "dig is installed by .ci/run"
    host, port = server.dns_addr(4)
    a = run_tool(dig, f"@{host}", "-p", str(port), "-b", A_CLIENT, "+short", WEB).stdout
    b = run_tool(dig, f"@{host}", "-p", str(port), "-b", B_CLIENT, WEB).stdout
    assert a.strip() == "240.0.9.1"
    assert "status: NXDOMAIN" in b


def test_a_patch_reaches_every_view(server: ServerThread) -> None:
    addr = server.dns_addr(4)
    assert ask(addr, A_CLIENT, WEB)[0] == dns.rcode.NOERROR  # cached in view A
    body = {"upsert": [{"name": "web", "namespace": "team", "port": 80, "vip": "240.0.9.1",
                        "mesh": "b"},
                       {"name": "new", "namespace": "team", "port": 80, "vip": "240.0.9.3",
                        "mesh": "a"}]}
    reply = call(server.api_url, "PATCH", "/v1/services", body)
    assert reply.status == 200, reply.body
    assert ask(addr, A_CLIENT, WEB)[0] == dns.rcode.NXDOMAIN  # moved to mesh b
    assert ask(addr, B_CLIENT, WEB) == (dns.rcode.NOERROR, ["240.0.9.1"])
    assert ask(addr, A_CLIENT, "new.team.svc.80.mesh") == (dns.rcode.NOERROR, ["240.0.9.3"])
    assert ask(addr, B_CLIENT, "new.team.svc.80.mesh")[0] == dns.rcode.NXDOMAIN


def test_resolve_says_which_view_answered(server: ServerThread) -> None:
    reply = call(server.api_url, "GET", f"/v1/resolve?name={WEB}&client={B_CLIENT}")
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["view"] == {"index": 2, "select": {"matchLabels": {"mesh": "b"}}}
    assert body["rcode"] == "NXDOMAIN"
    other = call(server.api_url, "GET", f"/v1/resolve?name={WEB}&client={OTHER}").json()
    assert other["view"]["index"] == 0 and other["rcode"] == "NOERROR"
    bad = call(server.api_url, "GET", f"/v1/resolve?name={WEB}&client=nope")
    assert bad.status == 400 and bad.json()["field"] == "client"


def test_sighup_reloads_the_views(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": SERVICES}))
    with ServerProcess(tmp_path / "p", {"registry": {"seed_file": str(seed)},
                                        "dns": {"views": VIEWS}}) as srv:
        addr = srv.dns_addr
        assert ask(addr, A_CLIENT, WEB)[0] == dns.rcode.NOERROR
        assert ask(addr, B_CLIENT, WEB)[0] == dns.rcode.NXDOMAIN
        raw = yaml.safe_load(srv.config_path.read_text())
        raw["dns"]["views"] = [dict(VIEWS[0], clients=[f"{B_CLIENT}/32"])]  # B sees mesh a
        srv.config_path.write_text(yaml.safe_dump(raw))
        seen = srv.log().count("SIGHUP: views")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while srv.log().count("SIGHUP: views") <= seen:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert ask(addr, B_CLIENT, WEB) == (dns.rcode.NOERROR, ["240.0.9.1"])
        assert ask(addr, B_CLIENT, API)[0] == dns.rcode.NXDOMAIN
        assert ask(addr, A_CLIENT, API)[0] == dns.rcode.NOERROR  # A: now the default view


def test_a_views_names_evolved_patch_by_patch_equal_a_fresh_build() -> None:
    """core/answer/_views.py: the view's name table after PATCHes is the one a full build gives."""
    import random

    from meshdns.core.answer import view_names
    from meshdns.core.registry import Registry, RegistryPolicy, ServiceSpec, apply_patch, apply_put

    rng = random.Random(7)
    policy = RegistryPolicy()
    select = (("mesh", "a"),)

    def spec(i: int) -> ServiceSpec:
        return ServiceSpec(f"s{i}", f"ns{i % 3}", 80, None, None, (),
                           mesh=rng.choice(("a", "b")))

    reg = apply_put(Registry.empty(), [spec(i) for i in range(20)], policy, 1.0)
    view = replace_names(reg, view_names(reg, select, policy.domains, None))
    for step in range(40):
        keys = sorted(reg.services)
        deletes = rng.sample(keys, rng.randint(0, 2))
        upserts = [spec(rng.randrange(30)) for _ in range(rng.randint(0, 3))]
        upserts = [u for u in {u.key: u for u in upserts}.values() if u.key not in deletes]
        reg = apply_patch(reg, upserts, deletes, policy, 2.0 + step)
        evolved = view_names(reg, select, policy.domains, view)
        fresh = view_names(reg, select, policy.domains, None)
        assert evolved.hidden == fresh.hidden
        assert dict(evolved.ents) == dict(fresh.ents)
        assert evolved.visible_counts is not None and fresh.visible_counts is not None
        assert [dict(c) for c in evolved.visible_counts] == \
            [dict(c) for c in fresh.visible_counts]
        view = replace_names(reg, evolved)


def replace_names(reg: Any, names: Any) -> Any:
    import dataclasses

    return dataclasses.replace(reg, names=names)
