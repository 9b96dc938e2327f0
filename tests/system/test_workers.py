"""dns.workers: several processes on one port (SO_REUSEPORT), one registry, read-your-writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml

from meshdns.dns.reuseport import allowed_cpus

from ..apiclient import read_ports
from ..support import DEMO_SERVICES, connected_udp, pinned, udp_query

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False)
    return [int(p) for p in out.stdout.split()]


def ask(port: int, name: str) -> dns.message.Message:
    return udp_query(dns.message.make_query(name, "A"), "127.0.0.1", port, timeout=3)


def from_every_cpu(port: int, name: str, per_cpu: int = 4) -> list[dns.message.Message]:
    """Ask from each CPU in turn. The processes' UDP sockets are steered by CPU
    (meshdns/dns/reuseport.py): on loopback the sender's CPU picks the process, so
    this reaches every process; on one CPU the kernel's hash spreads fresh ports."""
    answers = []
    for cpu in allowed_cpus():
        with pinned(cpu):
            answers += [ask(port, name) for _ in range(per_cpu)]
    return answers


def ask_with_retry(port: int, name: str) -> dns.message.Message:
    try:
        return udp_query(dns.message.make_query(name, "A"), "127.0.0.1", port, timeout=1.5)
    except dns.exception.Timeout:
        return ask(port, name)


def patch(api: int, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{api}/v1/services", method="PATCH",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return dict(json.loads(resp.read()))


def wait_for(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, dns.exception.DNSException):
            pass
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@contextlib.contextmanager
def serving(tmp_path: Path, services: list[dict[str, object]], dns_extra: dict[str, object]
            ) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """meshdns serve with dns.workers 2 as a real process; yields once the worker
    process has bound the port beside the main one; SIGTERM (SIGKILL for leftovers)
    after."""
    (tmp_path / "resolv.conf").write_text("# no nameservers\n")
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump({"services": services}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "dns": {"listen": ["127.0.0.1:0"], "workers": 2, "upstreams": [],
                "resolv_conf": str(tmp_path / "resolv.conf"), **dns_extra},
        "api": {"listen": "127.0.0.1:0"},
        "registry": {"seed_file": str(tmp_path / "seed.yaml")},
        "log": {"level": "info"},
    }))
    ports = tmp_path / "ports.json"
    with (tmp_path / "meshdns.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meshdns", "serve", "--config",
                                 str(tmp_path / "config.yaml"), "--ports-file", str(ports)],
                                stdout=log, stderr=log)
    try:
        wait_for(ports.exists)  # written once every listener is bound
        port, api = read_ports(ports)
        # Ready once the worker process exists and has bound the port next to the main one.
        wait_for(lambda: len(children(proc.pid)) == 1 and _udp_owners(port) == 2)
        yield proc, port, api
    finally:
        kids = children(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGKILL)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    with serving(tmp_path, DEMO_SERVICES, {}) as (proc, port, api):
        wait_for(lambda: ask(port, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR)
        yield proc, port, api


def _dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _udp_owners(port: int) -> int:
    """How many sockets are bound to 127.0.0.1:port for UDP (from /proc/net/udp)."""
    hexport = f"{port:04X}"
    rows = Path("/proc/net/udp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1] == f"0100007F:{hexport}")


def test_two_processes_share_the_port_and_every_write_is_seen_by_both(
        two_workers: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, port, api = two_workers
    assert len(children(proc.pid)) == 1
    for i in range(30):
        name = f"rw{i}"
        reply = patch(api, {"upsert": [{"name": name, "namespace": "kong", "port": 80}]})
        assert reply["services"] == len(DEMO_SERVICES) + i + 1
        # Read-your-writes across processes: from every CPU right after the 200.
        for answer in from_every_cpu(port, f"{name}.kong.svc.80.mesh"):
            assert answer.rcode() == dns.rcode.NOERROR, f"round {i}: a process missed the write"
            assert answer.answer


def test_a_killed_worker_is_restarted_and_the_main_keeps_answering(
        two_workers: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, port, api = two_workers
    (worker,) = children(proc.pid)
    os.kill(worker, signal.SIGKILL)
    # A datagram in flight to the dying worker's socket dies with it: seen here as one
    # lost query right at the kill, every later one answered. Clients retry such a loss
    # (glibc, dig: several tries), so the first query after the kill may need a second try.
    # Dead means its socket has left the port too: the leader thread turns zombie before
    # the process's other threads are gone, and the file table (the socket) goes with
    # the last one; until then the kernel may still hand that socket a query.
    wait_for(lambda: _dead(worker) and _udp_owners(port) == 1)
    assert ask_with_retry(port, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR
    for _ in range(20):  # the main process answers meanwhile (its socket stays bound)
        assert ask(port, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR
    wait_for(lambda: len(children(proc.pid)) == 1 and children(proc.pid)[0] != worker)
    wait_for(lambda: _udp_owners(port) == 2)
    patch(api, {"upsert": [{"name": "after", "namespace": "kong", "port": 80}]})
    for answer in from_every_cpu(port, "after.kong.svc.80.mesh"):
        assert answer.rcode() == dns.rcode.NOERROR


def test_sigterm_stops_the_workers_too(
        two_workers: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, port, _ = two_workers
    (worker,) = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    wait_for(lambda: not Path(f"/proc/{worker}").exists(), 20)
    assert _udp_owners(port) == 0


@pytest.mark.skipif(len(allowed_cpus()) < 2, reason="steering by CPU needs 2 CPUs")
def test_udp_queries_are_steered_to_the_process_of_their_cpu(
        two_workers: tuple[subprocess.Popen[bytes], int, int]) -> None:
    # The main process bound first (socket 0 of the group), the worker second (socket 1):
    # CPU number k of this process's allowed CPUs sends to socket k % 2. With the worker
    # stopped, queries from the main's CPU are answered and one from the worker's CPU
    # waits in the worker's socket until it is resumed, answered by it then.
    proc, port, _ = two_workers
    (worker,) = children(proc.pid)
    main_cpu, worker_cpu = allowed_cpus()[:2]
    query = dns.message.make_query("frontend.kong.svc.80.mesh", "A")
    os.kill(worker, signal.SIGSTOP)
    try:
        with pinned(main_cpu):
            for _ in range(5):
                assert ask(port, "frontend.kong.svc.80.mesh").rcode() == dns.rcode.NOERROR
        with connected_udp("127.0.0.1", port) as s:
            with pinned(worker_cpu):
                s.send(query.to_wire())
            s.settimeout(1.0)
            with pytest.raises(TimeoutError):
                s.recv(512)  # the stopped worker holds it
            os.kill(worker, signal.SIGCONT)
            s.settimeout(10)
            reply = dns.message.from_wire(s.recv(512))
            assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    finally:
        os.kill(worker, signal.SIGCONT)


def test_worker_processes_start_with_views_and_answer_each_view(tmp_path: Path) -> None:
    """dns.views with dns.workers: the workers get the config through its plain-data
    form; views did not survive that round trip before, and every worker died at start
    with a config error (the main process kept answering, so only half the queries,
    those steered to a worker, were lost)."""
    services = [
        {"name": "web", "namespace": "team", "port": 80, "vip": "240.0.9.1", "mesh": "a"},
        {"name": "api", "namespace": "team", "port": 80, "vip": "240.0.9.2", "mesh": "b"},
    ]
    views = [{"clients": ["127.0.0.5/32"], "select": {"matchLabels": {"mesh": "a"}}},
             {"clients": ["127.0.0.6/32"], "select": {"matchLabels": {"mesh": "b"}}}]
    with serving(tmp_path, services, {"views": views}) as (proc, port, _):
        def view_answer(source: str, name: str) -> list[tuple[int, list[str]]]:
            out = []
            for cpu in allowed_cpus():
                with pinned(cpu):
                    for _ in range(4):
                        reply = udp_query(dns.message.make_query(name, "A"), "127.0.0.1",
                                          port, timeout=3, source=source)
                        out.append((reply.rcode(), [rr.address for rrset in reply.answer
                                                    for rr in rrset]))
            return out

        assert {(r, tuple(a)) for r, a in view_answer("127.0.0.5", "web.team.svc.80.mesh")} \
            == {(dns.rcode.NOERROR, ("240.0.9.1",))}
        assert {r for r, _ in view_answer("127.0.0.5", "api.team.svc.80.mesh")} \
            == {dns.rcode.NXDOMAIN}
        assert {r for r, _ in view_answer("127.0.0.6", "web.team.svc.80.mesh")} \
            == {dns.rcode.NXDOMAIN}
        (worker,) = children(proc.pid)
        assert not _dead(worker)
        log = (tmp_path / "meshdns.log").read_text()
        errors = [line for line in log.splitlines() if "error" in line.lower()]
        assert errors == []
