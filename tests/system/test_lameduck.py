"""SIGTERM drains (issue 26): /readyz fails at once, DNS answers for dns.lameduck
seconds, then a successor on the same port takes every new query and nothing is lost.

Real processes on loopback: dnsperf sends a steady stream while a new meshdns starts
on the same port (SO_REUSEPORT) and the old one gets SIGTERM, as a rolling update of
a node's resolver does; and a plain SIGTERM with no successor.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from ..apiclient import ServerProcess, call, wait_for

REPO = Path(__file__).resolve().parents[2]
SEED = str(REPO / "examples" / "services.yaml")
NAMES = ("frontend.kong.svc.80.mesh", "backend.kong.svc.8080.mesh", "nope.mesh")


def ask(addr: tuple[str, int], name: str = NAMES[0]) -> int:
    reply = dns.query.udp(dns.message.make_query(name, "A"), addr[0], port=addr[1],
                          timeout=2, ignore_unexpected=True)
    return int(reply.rcode())


def readyz(server: ServerProcess) -> int:
    try:
        return call(server.url, "GET", "/readyz", timeout=2).status
    except OSError:
        return -1


def requests_served(server: ServerProcess) -> float:
    text = call(server.url, "GET", "/metrics", timeout=5).body.decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r'^meshdns_dns_requests_total\{[^}]*proto="udp"[^}]*\} (\S+)$', text, re.M))


def test_rolling_restart_under_load_loses_no_query(tmp_path: Path) -> None:
    dnsperf = shutil.which("dnsperf")
    assert dnsperf is not None, "dnsperf is installed by .ci/run"
    conf = {"registry": {"seed_file": SEED}, "dns": {"lameduck": 1.5}}
    # A set port, as deployed (SO_REUSEPORT is not used on port 0).
    old = ServerProcess(tmp_path / "old", conf, name="old")
    old.reserve()
    old.start()
    new: ServerProcess | None = None
    perf: subprocess.Popen[str] | None = None
    try:
        queries = tmp_path / "queries.txt"
        queries.write_text("".join(f"{n} A\n" for n in NAMES) * 50)
        perf = subprocess.Popen(
            [dnsperf, "-s", "127.0.0.1", "-p", str(old.dns_port), "-d", str(queries),
             "-l", "8", "-Q", "2000", "-t", "2", "-c", "4"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        new = ServerProcess(tmp_path / "new", {**conf, "dns": {
            "lameduck": 1.5, "listen": [f"127.0.0.1:{old.dns_port}"]}}, name="new").start()
        assert old.proc is not None
        old.proc.send_signal(signal.SIGTERM)
        # Not ready at once, while the old process still answers.
        wait_for(lambda: readyz(old) == 503, 1.0, "the old /readyz to fail")
        assert old.proc.poll() is None
        assert old.proc.wait(15) == 0, old.log()
        assert "drained" in old.log()
        out, _ = perf.communicate(timeout=30)
    finally:
        if perf is not None and perf.poll() is None:
            perf.kill()
            perf.wait()
        old.stop()
        if new is not None:
            served_by_new = requests_served(new) if new.proc and new.proc.poll() is None else 0
            new.stop()
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert sent > 5000, out
    assert lost == 0, out
    assert "SERVFAIL" not in out, out  # only NOERROR and NXDOMAIN in the rcode table
    assert served_by_new > 1000, "the successor took over the port"


def test_sigterm_without_successor_answers_for_the_lameduck_then_exits(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, {"registry": {"seed_file": SEED},
                                      "dns": {"lameduck": 2.0}}).start()
    try:
        assert server.proc is not None
        assert readyz(server) == 200
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz(server) == 503, 1.0, "/readyz to fail")
        body = call(server.url, "GET", "/readyz", timeout=2).json()
        assert body["ready"] is False and "draining" in body["reason"]
        answered = 0
        while time.monotonic() - started < 1.5:
            assert ask(server.dns_addr) == dns.rcode.NOERROR
            answered += 1
            time.sleep(0.1)
        assert answered >= 10
        assert server.proc.wait(15) == 0
        assert time.monotonic() - started >= 2.0  # not before the lameduck period ended
        log = server.log()
        assert "draining" in log and "drained" in log and "Traceback" not in log
    finally:
        server.stop()


def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, {"registry": {"seed_file": SEED},
                                      "dns": {"lameduck": 60}}).start()
    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz(server) == 503, 1.0, "/readyz to fail")
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(10) == 0
        assert "second signal" in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("lameduck", [0])
def test_lameduck_zero_stops_promptly(tmp_path: Path, lameduck: float) -> None:
    server = ServerProcess(tmp_path, {"registry": {"seed_file": SEED},
                                      "dns": {"lameduck": lameduck}}).start()
    try:
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
    finally:
        server.stop()
