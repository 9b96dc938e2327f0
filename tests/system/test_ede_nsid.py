"""Extended DNS Errors (RFC 8914) and NSID (RFC 5001) of local answers, as dig and kdig
show them (issue 26), over UDP and TCP.

- 14 Not Ready: no registry loaded yet (a follower whose leader never answered);
- 20 Not Authoritative: a name outside the served ones, with no upstream (REFUSED);
- 21 Not Supported: a class other than IN, a zone transfer (REFUSED);
- none of it to a client that sent no EDNS; NSID only when asked, the host name by
  default, ``dns.nsid`` when set, never with ``dns.nsid: ""``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from ..support import ServerThread, make_config, run_tool, running_server, tool

DIG = tool("dig")
KDIG = tool("kdig")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with running_server(make_config(tmp_path, {"dns": {"nsid": "node-a"}})) as srv:
        yield srv


def dig(srv: ServerThread, *args: str) -> str:
    assert DIG is not None, "dig is installed by .ci/run"
    host, port = srv.dns_addr(4)
    out = run_tool(DIG, f"@{host}", "-p", str(port), "+tries=1", "+time=3", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def kdig(srv: ServerThread, *args: str) -> str:
    assert KDIG is not None, "kdig is installed by .ci/run"
    host, port = srv.dns_addr(4)
    # kdig sends EDNS only when told (+edns; +nsid implies it).
    out = run_tool(KDIG, f"@{host}", "-p", str(port), "+retry=0", "+timeout=3", "+edns",
                   *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_nsid_only_when_asked(server: ServerThread, transport: str) -> None:
    asked = dig(server, transport, "+nsid", "frontend.kong.svc.80.mesh")
    assert "status: NOERROR" in asked and '("node-a")' in asked, asked
    assert "NSID" not in dig(server, transport, "frontend.kong.svc.80.mesh")
    # The answer itself is there as without NSID.
    assert "ANSWER: 1," in asked
    k = kdig(server, transport, "+nsid", "frontend.kong.svc.80.mesh")
    assert "NSID" in k and "node-a" in k, k
    # A cached reply to the plain question never carries it, nor the reverse.
    assert "NSID" not in dig(server, transport, "frontend.kong.svc.80.mesh")
    assert '("node-a")' in dig(server, transport, "+nsid", "frontend.kong.svc.80.mesh")


def test_nsid_defaults_to_the_host_name_and_can_be_off(tmp_path: Path) -> None:
    with running_server(make_config(tmp_path)) as srv:
        assert f'("{socket.gethostname()}")' in dig(srv, "+nsid", "frontend.kong.svc.80.mesh")
    with running_server(make_config(tmp_path, {"dns": {"nsid": ""}})) as srv:
        out = dig(srv, "+nsid", "frontend.kong.svc.80.mesh")
        assert "status: NOERROR" in out and "NSID" not in out


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_refused_outside_without_upstream_is_not_authoritative(server: ServerThread,
                                                              transport: str) -> None:
    out = dig(server, transport, "example.com")
    assert "status: REFUSED" in out
    assert "EDE: 20 (Not Authoritative): (not a served name, and no upstream)" in out, out
    assert "EDE" not in dig(server, transport, "+noedns", "example.com")
    k = kdig(server, transport, "example.com")
    assert "EDE: 20 (Not Authoritative)" in k, k


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_other_classes_are_not_supported(server: ServerThread, transport: str) -> None:
    out = dig(server, transport, "-c", "CH", "frontend.kong.svc.80.mesh", "TXT")
    assert "status: REFUSED" in out
    assert "EDE: 21 (Not Supported): (only class IN is served)" in out, out


def test_zone_transfer_is_not_supported(server: ServerThread) -> None:
    host, port = server.dns_addr(4)
    query = dns.message.make_query("mesh", "AXFR", use_edns=0)
    reply = dns.query.tcp(query, host, port=port, timeout=3)
    assert reply.rcode() == dns.rcode.REFUSED
    ede = [o for o in reply.options if o.otype == dns.edns.EDE]
    assert len(ede) == 1 and ede[0].code == 21, reply.options
    assert ede[0].text == "zone transfers are not served"


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_not_ready_before_a_registry(tmp_path: Path, transport: str) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: the leader refuses
    raw = make_config(tmp_path, {"registry": {"follow": f"http://127.0.0.1:"
                                              f"{dead.getsockname()[1]}/"}}, services=[])
    try:
        with running_server(raw) as srv:
            out = dig(srv, transport, "frontend.kong.svc.80.mesh")
            assert "status: SERVFAIL" in out and " aa" not in out.split("flags:")[1][:20]
            assert "EDE: 14 (Not Ready): (registry not loaded yet)" in out, out
            assert "EDE" not in dig(srv, transport, "+noedns", "frontend.kong.svc.80.mesh")
            k = kdig(srv, transport, "frontend.kong.svc.80.mesh")
            assert "EDE: 14 (Not Ready)" in k, k
    finally:
        dead.close()
