"""A real full disk under ``registry.state_file``: a 1 MiB tmpfs in a private mount
namespace (``unshare -m``), a meshdns server process writing to it, ``kill -9``.

Issue 11: a failed journal append used to leave a partial line, the next write
after space returned was appended onto it and acknowledged, and every restart
then stopped on a corrupt journal line. Now a failed write is rolled back and
answered 507, DNS keeps the previous registry, the next write is whole, and a
restart holds exactly the acknowledged writes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import dns.rcode
from prometheus_client.parser import text_string_to_metric_families

from ..apiclient import ServerProcess, a_records, call, dns_query

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096  # tmpfs allocates whole pages


class PrivateTmpfs:
    """A tmpfs mounted in a mount namespace of its own, held open by a sleeping
    process; ``nsenter`` runs commands (and the server) inside it. The host never
    sees the mount, and it goes away with the last process in the namespace."""

    def __init__(self, mountpoint: Path, size: str = "1m") -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir()
        script = 'mount -t tmpfs -o "size=$2" tmpfs "$1" && echo mounted && exec sleep 3600'
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
             str(mountpoint), size], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.holder.stdout is not None and self.holder.stderr is not None
        line = self.holder.stdout.readline()  # EOF (b"") if unshare or mount failed
        if line != b"mounted\n":
            self.holder.wait(10)
            raise AssertionError("could not mount a tmpfs in a private mount namespace "
                                 f"(needs root): {self.holder.stderr.read().decode()}")
        assert not os.path.ismount(mountpoint), "the tmpfs leaked into the host namespace"

    def enter(self, cwd: Path) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"-w{cwd}", "--"]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.enter(self.mountpoint), *argv], capture_output=True,
                              check=check, timeout=60)

    def read(self, name: str) -> bytes:
        return self.run("cat", str(self.mountpoint / name)).stdout

    def files(self) -> list[str]:
        return sorted(self.run("ls", "-A", str(self.mountpoint)).stdout.decode().split())

    def free_bytes(self) -> int:
        st = self.run("stat", "-f", "-c", "%a %S", str(self.mountpoint)).stdout.split()
        return int(st[0]) * int(st[1])

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(10)


class NamespacedServer(ServerProcess):
    """The meshdns server process, started inside the tmpfs's mount namespace."""

    disk: PrivateTmpfs

    def command(self) -> list[str]:
        # nsenter execs the server (no fork for a mount namespace): proc is the server,
        # so kill() is a kill -9 of meshdns itself.
        return [*self.disk.enter(self.workdir), *super().command()]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env


def service(i: int) -> dict[str, Any]:
    return {"name": f"s{i}", "namespace": "disk", "port": 80,
            "vip": f"240.4.{i // 250}.{i % 250 + 1}"}


def patch_body(i: int) -> dict[str, Any]:
    """A new service p<i> (with ~1 KiB of hostnames, so lines cross page boundaries)
    and s0 moved to a new address: a failed write is visible on a new and an old name."""
    hostnames = [f"p{i}-alias-{j:02d}.example.org" for j in range(36)]
    return {"upsert": [{"name": f"p{i}", "namespace": "disk", "port": 80,
                        "vip": f"240.5.{i // 250}.{i % 250 + 1}", "hostnames": hostnames},
                       {**service(0), "vip": s0_vip(i)}]}


def s0_vip(i: int) -> str:
    return f"240.6.{i // 250}.{i % 250 + 1}"


def name(svc: str) -> str:
    return f"{svc}.disk.svc.80.mesh"


def metric(server: ServerProcess, family: str) -> float:
    text = call(server.url, "GET", "/metrics").body.decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == family:
                return float(sample.value)
    raise AssertionError(f"{family} not exported")


def test_full_disk_rolls_back_answers_507_and_a_restart_holds_every_acknowledged_write(
        tmp_path: Path) -> None:
    disk = PrivateTmpfs(tmp_path / "disk")
    state = disk.mountpoint / "state.json"
    server = NamespacedServer(tmp_path / "run", {"registry": {"state_file": str(state)}})
    server.disk = disk
    try:
        server.start(ready=False)
        put = call(server.url, "PUT", "/v1/services",
                   {"services": [service(i) for i in range(1500)]})
        assert put.status == 200, put.body
        acked: dict[int, int] = {}  # PATCH number -> revision acknowledged
        reply = call(server.url, "PATCH", "/v1/services", patch_body(0))
        assert reply.status == 200, reply.body
        acked[0] = reply.json()["revision"]
        assert disk.read("state.json.journal").endswith(b"\n")

        # Fill the disk: what is left is the slack in the journal's last page.
        fill = disk.run("dd", "if=/dev/zero", f"of={disk.mountpoint / 'fill'}", "bs=4k",
                        check=False)
        assert fill.returncode != 0 and b"No space left on device" in fill.stderr
        assert disk.free_bytes() == 0

        failed: list[int] = []
        for i in range(1, 60):  # PATCH until the disk refuses one
            reply = call(server.url, "PATCH", "/v1/services", patch_body(i))
            if reply.status != 200:
                failed.append(i)
                break
            acked[i] = reply.json()["revision"]
        assert failed, "the full disk never refused a write"
        last = max(acked)
        journal_before = disk.read("state.json.journal")
        journal_len = len(journal_before)
        # The refused line did not fit in the page's slack, so the kernel took part of
        # it before ENOSPC: a torn line was written, and has been cut off again.
        assert journal_len % PAGE != 0
        assert reply.status == 507, reply.body
        error = reply.json()
        assert set(error) == {"error", "field"} and error["field"] is None
        assert "state file" in error["error"] and "No space left on device" in error["error"]
        assert "rolled back" in error["error"]

        # Nothing of it is served: DNS answers the previous registry.
        assert dns_query(server.dns_addr, name(f"p{failed[0]}")).rcode() == dns.rcode.NXDOMAIN
        assert a_records(server.dns_addr, name("s0")) == [s0_vip(last)]
        assert a_records(server.dns_addr, name(f"p{last}")) == [f"240.5.0.{last + 1}"]
        listed = call(server.url, "GET", "/v1/services").json()
        assert listed["revision"] == acked[last]

        # More writes while full: each refused, both a journal line and a snapshot (a
        # PUT that changes every service); no partial line, no temp file left behind.
        for i in range(last + 2, last + 5):
            reply = call(server.url, "PATCH", "/v1/services", patch_body(i))
            assert reply.status == 507, reply.body
            failed.append(i)
        moved = [{**service(i), "vip": f"240.7.{i // 250}.{i % 250 + 1}"} for i in range(1500)]
        reply = call(server.url, "PUT", "/v1/services", {"services": moved})
        assert reply.status == 507 and "No space left" in reply.json()["error"], reply.body
        assert a_records(server.dns_addr, name("s7")) == ["240.4.0.8"]
        assert disk.files() == ["fill", "state.json", "state.json.journal"]
        journal = disk.read("state.json.journal")
        assert len(journal) == journal_len and journal.endswith(b"\n")
        assert metric(server, "meshdns_state_write_failures_total") == len(failed) + 1

        # Space returns: the next write is whole and acknowledged.
        disk.run("rm", str(disk.mountpoint / "fill"))
        after = last + 10
        reply = call(server.url, "PATCH", "/v1/services", patch_body(after))
        assert reply.status == 200, reply.body
        acked[after] = reply.json()["revision"]
        assert acked[after] == acked[last] + 1  # refused writes took no revision
        journal = disk.read("state.json.journal")
        assert journal.startswith(journal_before) and journal.endswith(b"\n")
        (line,) = journal[journal_len:].splitlines()  # one whole line, nothing torn before it
        assert json.loads(line)["revision"] == acked[after]

        server.kill()  # kill -9
        server.start()  # same tmpfs, same namespace
        listed = call(server.url, "GET", "/v1/services").json()
        assert listed["revision"] == acked[after]
        by_name = {s["name"]: s for s in listed["services"]}
        assert [i for i in acked if f"p{i}" not in by_name] == []  # every acknowledged one
        assert [i for i in failed if f"p{i}" in by_name] == []  # none of the refused ones
        assert len(by_name) == 1500 + len(acked)
        assert by_name["s0"]["vip"] == s0_vip(after)
        assert by_name["s7"]["vip"] == "240.4.0.8"  # the refused PUT is not there either
        assert len(by_name[f"p{last}"]["hostnames"]) == 36
        assert a_records(server.dns_addr, name(f"p{after}")) == [f"240.5.0.{after + 1}"]
        assert a_records(server.dns_addr, name("s0")) == [s0_vip(after)]
        assert dns_query(server.dns_addr, name(f"p{failed[0]}")).rcode() == dns.rcode.NXDOMAIN
        assert "is corrupt" not in server.log()
    finally:
        server.stop()
        disk.close()
