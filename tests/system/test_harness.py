"""The test harness itself: whatever fails while a server starts, the process it
started is stopped; raw UDP reads see the server's replies only; servers bind port 0
and report the port they got."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from ..apiclient import ServerProcess
from ..fake_upstream import Unbound
from ..support import DEMO_SERVICES, connected_udp, on_free_ports, udp_query


def running(pattern: str) -> list[str]:
    """The pids of processes whose command line holds ``pattern`` (a unique path)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                         check=False)
    return out.stdout.split()


class UnexpectedUnbound(Unbound):
    """An unbound whose readiness probe meets an error of a type the harness does not
    expect (dnspython's UnexpectedSource, from a stray datagram, is one)."""

    def ready(self) -> bool:
        raise dns.query.UnexpectedSource("a reply from 127.0.0.9:53")


@pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound")
def test_unbound_that_fails_to_start_for_any_reason_is_stopped(tmp_path: Path) -> None:
    unbound = UnexpectedUnbound(tmp_path)
    with pytest.raises(dns.query.UnexpectedSource):
        unbound.start()
    assert unbound.proc is not None and unbound.proc.poll() is not None
    assert running(str(unbound.conf)) == []


@pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound")
def test_unbound_reports_the_port_it_got_and_answers_there(tmp_path: Path) -> None:
    with Unbound(tmp_path) as unbound:
        assert unbound.port > 0 and f"port: {unbound.port}" in unbound.conf.read_text()
        assert unbound.ask("www.example.test").rcode() == dns.rcode.NOERROR
    assert running(str(unbound.conf)) == []


def test_a_meshdns_process_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    # A follower of a leader that does not exist: it serves, but is never ready.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
        server = ServerProcess(tmp_path, {"registry": {"follow": nowhere}})
        with pytest.raises(AssertionError, match="timed out"):
            server.start(ready=True, timeout=3)
    assert server.proc is not None and server.proc.poll() is not None
    assert running(str(server.config_path)) == []


def test_a_meshdns_process_binds_port_0_and_reports_its_ports(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump({"services": DEMO_SERVICES}))
    with ServerProcess(tmp_path, {"registry": {"seed_file": str(seed)}}) as server:
        doc = json.loads(server.ports_path.read_text())
        assert server.proc is not None and doc["pid"] == server.proc.pid
        assert doc["dns"] == [f"127.0.0.1:{server.dns_port}"]
        assert doc["api"] == f"127.0.0.1:{server.api_port}"
        assert doc["metrics"] is None
        assert "127.0.0.1:0" in server.config_path.read_text()  # the kernel chose
        first = server.dns_port, server.api_port
        server.kill()
        server.start()  # a restart binds the same ports again (a leader's URL stays)
        assert (server.dns_port, server.api_port) == first
        reply = udp_query(dns.message.make_query("frontend.kong.svc.80.mesh", "A"),
                          *server.dns_addr)
        assert [rr.address for rr in reply.answer[0]] == ["240.0.0.7"]


def test_a_stray_datagram_is_not_taken_for_the_reply(tmp_path: Path) -> None:
    """Another process on the host sends to our ephemeral port before the server
    replies: dnspython (ignore_unexpected) and a connected raw socket both skip it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stray:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        stray.bind(("127.0.0.1", 0))
        query = dns.message.make_query("www.example.test", "A")
        reply = dns.message.make_response(query)

        def serve_once() -> None:
            data, client = server.recvfrom(512)
            stray.sendto(dns.message.make_response(dns.message.from_wire(data)).to_wire(),
                         client)  # right ID, wrong sender
            server.sendto(reply.to_wire(), client)

        t = threading.Thread(target=serve_once)
        t.start()
        got = udp_query(query, *server.getsockname(), timeout=5)
        t.join(5)
        assert got.id == query.id
        with connected_udp(*server.getsockname()) as sock:
            sock.settimeout(5)
            t = threading.Thread(target=serve_once)
            t.start()
            sock.send(query.to_wire())
            data = sock.recv(512)
            t.join(5)
        assert data == reply.to_wire()
        # Without either, the stray datagram is what a test reads.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            plain.settimeout(5)
            t = threading.Thread(target=serve_once)
            t.start()
            plain.sendto(query.to_wire(), server.getsockname())
            _, sender = plain.recvfrom(512)
            plain.recvfrom(512)
            t.join(5)
        assert sender == stray.getsockname()


def test_make_test_runs_both_tiers_and_fails_if_either_failed(tmp_path: Path) -> None:
    """A failure in the first tier (every test) neither skips nor hides the second (the
    unbatched UDP path, MESHDNS_UDP_BATCH=0): both run, both are reported."""
    repo = Path(__file__).resolve().parents[2]
    failing, passing = tmp_path / "test_first_tier.py", tmp_path / "test_second_tier.py"
    failing.write_text("def test_fails():\n    assert False\n")
    passing.write_text("import os\n\n\ndef test_unbatched():\n"
                       "    assert os.environ['MESHDNS_UDP_BATCH'] == '0'\n")
    bin_dir = Path(sys.executable).parent
    for first, second in [(failing, passing), (passing, failing)]:
        env = {k: v for k, v in os.environ.items() if k != "MESHDNS_UDP_BATCH"}
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # two tiny files: no plugins needed
        if first is passing:
            env["MESHDNS_UDP_BATCH"] = "0"  # what the passing file checks
        proc = subprocess.run(
            ["make", "-s", "-C", str(repo), "-o", "install-test", "test", f"BIN={bin_dir}",
             f"TESTS={first}", f"UNBATCHED_TESTS={second}", "WORKERS=0"],
            capture_output=True, text=True, timeout=120, env=env, check=False)
        out = proc.stdout
        assert proc.returncode != 0, out + proc.stderr
        verdict = {failing: "FAILED (pytest exit 1)", passing: "passed"}
        assert f"make test: every test: {verdict[first]}" in out, out
        assert (f"make test: the unbatched UDP path (MESHDNS_UDP_BATCH=0): "
                f"{verdict[second]}") in out, out
        assert out.count(" passed") + out.count(" failed") >= 2  # two pytest summaries


@pytest.mark.skipif(shutil.which("unbound") is None, reason="needs unbound")
def test_unbound_on_a_port_another_process_took_starts_again_on_a_new_one(
        tmp_path: Path) -> None:
    """The race free_port() leaves open, made certain: the first port picked is taken
    (UDP and TCP) before unbound binds it; it is started again on a fresh port."""
    unbound = Unbound(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        udp.bind(("127.0.0.1", 0))
        taken = udp.getsockname()[1]
        tcp.bind(("127.0.0.1", taken))
        tcp.listen()
        attempts: list[int] = []

        def start(ports: list[int]) -> Unbound:
            attempts.append(ports[0])
            return unbound._start_on(ports[0], 15.0)

        try:
            on_free_ports(1, start, first=[taken])
            assert attempts[0] == taken and len(attempts) == 2 and unbound.port != taken
            assert unbound.ask("www.example.test").rcode() == dns.rcode.NOERROR
        finally:
            unbound.stop()
