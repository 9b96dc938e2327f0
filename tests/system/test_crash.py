"""Crash safety of registry.state_file, with a real server process and SIGKILL.

An acknowledged write must survive ``kill -9`` at any moment; a state file that
cannot be trusted must stop start-up (exit code 1, clear message) and be left
exactly as it was for the operator to inspect.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from meshdns.core.registry import Registry, RegistryPolicy, apply_put, parse_services
from meshdns.store import StateError, read_state, write_state

from ..apiclient import ServerProcess, a_records, call, wait_for
from ..support import make_config, running_server


class PatchStream(threading.Thread):
    """PATCHes one new service after another until the server goes away; records the acks."""

    def __init__(self, url: str, start: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.next = start
        self.acked: list[tuple[int, int]] = []  # (service number, revision acknowledged)

    def run(self) -> None:
        while True:
            i = self.next
            body = {"upsert": [{"name": f"s{i}", "namespace": "crash", "port": 80,
                                "vip": vip(i), "hostnames": [f"s{i}.example.org"]}]}
            try:
                reply = call(self.url, "PATCH", "/v1/services", body, timeout=10)
            except OSError:
                return  # the server is gone
            if reply.status != 200:
                return
            self.acked.append((i, reply.json()["revision"]))
            self.next += 1


def vip(i: int) -> str:
    return f"240.3.{i // 250}.{i % 250 + 1}"


def test_kill_9_mid_stream_loses_no_acknowledged_write(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    server = ServerProcess(tmp_path, {"registry": {"state_file": str(state)}})
    acked: list[tuple[int, int]] = []
    next_i = 0
    try:
        server.start(ready=False)
        assert call(server.url, "PUT", "/v1/services", {"services": []}).status == 200
        for round_ in range(3):
            stream = PatchStream(server.url, next_i)
            stream.start()
            wait_for(lambda s=stream: len(s.acked) >= 25, 30, "25 acknowledged PATCHes")
            server.kill()  # while the stream keeps writing
            stream.join(30)
            assert not stream.is_alive()
            acked += stream.acked
            next_i = stream.next + 1

            # The state file is whole, and with its journal (what start-up reads: the
            # snapshot plus the appended changes) holds every acknowledged write.
            assert json.loads(state.read_bytes())["format"] == 1
            saved = read_state(state, RegistryPolicy(), 0.0)
            assert saved.revision >= acked[-1][1]
            assert all((f"s{i}", "crash", 80) in saved.services for i, _ in acked)
            server.start()
            listed = call(server.url, "GET", "/v1/services").json()
            assert listed["revision"] >= acked[-1][1]
            by_name = {s["name"]: s for s in listed["services"]}
            missing = [i for i, _ in acked if f"s{i}" not in by_name]
            assert not missing, f"round {round_}: acknowledged writes lost: {missing}"
            assert all(by_name[f"s{i}"]["vip"] == vip(i) for i, _ in acked)
            last = acked[-1][0]
            assert a_records(server.dns_addr, f"s{last}.crash.svc.80.mesh") == [vip(last)]
            assert not list(tmp_path.glob(".state.json.*.tmp")), "temp files not cleaned up"
    finally:
        server.stop()


def _valid_state(path: Path) -> bytes:
    specs = parse_services([{"name": "a", "namespace": "b", "port": 1},
                            {"name": "c", "namespace": "d", "port": 2, "vip": "240.0.0.9"}])
    write_state(path, apply_put(Registry.empty(), specs, RegistryPolicy(), 0.0))
    read_state(path, RegistryPolicy(), 0.0)  # the untouched file is fine
    return path.read_bytes()


DAMAGE = {
    "half": (lambda data: data[: len(data) // 2], "truncated or corrupt"),
    "last-byte-cut": (lambda data: data[:-1], "truncated or corrupt"),
    "empty": (lambda data: b"", "is empty"),
    "zeros": (lambda data: b"\x00" * 64, "truncated or corrupt"),
    "no-services": (lambda data: b'{"format": 1}', "is corrupt"),
    "future-format": (lambda data: b'{"format": 99, "revision": 1, "services": []}',
                      "unknown format"),
    "bad-vip": (lambda data: data.replace(b'"240.0.0.9"', b'"240.0.0.999"'), "does not fit"),
    "not-an-object": (lambda data: b"[]", "is corrupt"),
    "service-not-an-object": (lambda data: b'{"format": 1, "revision": 1, "services": [1]}',
                              "is corrupt"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_state_file_stops_start_up(tmp_path: Path, kind: str) -> None:
    """In-process, every kind of damage: start() raises StateError, the file is untouched."""
    damage, message = DAMAGE[kind]
    state = tmp_path / "state.json"
    bad = damage(_valid_state(state))
    state.write_bytes(bad)
    extra = {"registry": {"state_file": str(state)}}
    with pytest.raises(StateError) as info, running_server(make_config(tmp_path, extra)):
        pass
    assert str(state) in str(info.value) and message in str(info.value)
    assert state.read_bytes() == bad, "the damaged file must be left for the operator"


@pytest.mark.parametrize("kind", ["half", "empty"])
def test_the_server_process_exits_non_zero_on_a_damaged_state_file(tmp_path: Path,
                                                                    kind: str) -> None:
    damage, message = DAMAGE[kind]
    state = tmp_path / "state.json"
    bad = damage(_valid_state(state))
    state.write_bytes(bad)
    server = ServerProcess(tmp_path, {"registry": {"state_file": str(state),
                                                   "seed_file": str(_seed(tmp_path))}})
    proc = server.spawn()
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        pytest.fail(f"server started on a damaged state file:\n{server.log()}")
    log = server.log()
    assert code == 1
    lines = [line for line in log.splitlines() if "cannot start" in line]
    assert len(lines) == 1, log  # one line an operator can grep for
    assert str(state) in lines[0] and message in lines[0]
    assert "refusing to start with an empty registry: fix or remove it" in lines[0]
    assert state.read_bytes() == bad, "the damaged file must be left for the operator"


def _seed(tmp: Path) -> Path:
    seed = tmp / "seed.yaml"
    seed.write_text("services: [{name: seeded, namespace: x, port: 1}]\n")
    return seed
