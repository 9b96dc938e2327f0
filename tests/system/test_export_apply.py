"""An exported registry applied back changes nothing (issue 22, item 7).

``meshdns get services -o yaml | meshdns apply -f -`` writes every service with the
VIPs it has. That must keep the revision, persist and publish nothing, and leave
allocated VIPs allocated: they still move into a new ``registry.cidr``, where pinned
(given) ones stay. Real CLI subprocesses, piped, against a real server subprocess.
(The same through etcd: tests/system/test_etcd_unwritten.py.)
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ..apiclient import ServerProcess, call
from .test_cli import clean_env, meshdns_cmd

CIDR, CIDR6 = "240.1.0.0/24", "fd00:1::/64"
MOVED, MOVED6 = "240.2.0.0/24", "fd00:2::/64"
PINNED = "240.1.0.200"
SERVICES: list[dict[str, Any]] = [
    {"name": "frontend", "namespace": "kong", "port": 80, "hostnames": ["frontend.mesh"]},
    {"name": "backend", "namespace": "kong", "port": 8080, "labels": {"app": "backend"}},
    {"name": "redis", "namespace": "cache", "port": 6379, "mesh": "default"},
    {"name": "pinned", "namespace": "kong", "port": 80, "vip": PINNED},
]


def cli(server: ServerProcess, *args: str, stdin: str | None = None,
        cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(meshdns_cmd(*args, "--server", server.url), capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=clean_env(), input=stdin,
                          check=False)


def export_and_apply(server: ServerProcess, *apply_args: str,
                     cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """``meshdns get services -o yaml | meshdns apply -f - [apply_args]``, a real pipe."""
    flags = ["--server", server.url]
    get = subprocess.Popen(meshdns_cmd("get", "services", "-o", "yaml", *flags), cwd=cwd,
                           env=clean_env(), stdout=subprocess.PIPE)
    try:
        assert get.stdout is not None
        applied = subprocess.run(meshdns_cmd("apply", "-f", "-", *apply_args, *flags),
                                 stdin=get.stdout, capture_output=True, timeout=60, cwd=cwd,
                                 env=clean_env(), check=False)
        get.stdout.close()
        assert get.wait(60) == 0
    finally:
        if get.poll() is None:
            get.kill()
            get.wait(10)
    return applied


def listed(server: ServerProcess) -> dict[str, Any]:
    reply = call(server.url, "GET", "/v1/services")
    assert reply.status == 200, reply.body
    doc: dict[str, Any] = reply.json()
    return doc


def vips(doc: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {s["name"]: (s["vip"], s["vip6"]) for s in doc["services"]}


def metric(server: ServerProcess, name: str) -> float:
    for line in call(server.url, "GET", "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name}")


def files(state: Path) -> dict[str, bytes]:
    """The state file and its journal, as they are on disk."""
    return {p.name: p.read_bytes() for p in sorted(state.parent.glob(state.name + "*"))}


def server_on(workdir: Path, state: Path, cidr: str, cidr6: str) -> ServerProcess:
    return ServerProcess(workdir, {"registry": {"cidr": cidr, "cidr6": cidr6,
                                                "state_file": str(state)}})


def test_export_applied_back_keeps_the_revision_and_the_vips_allocated(tmp_path: Path) -> None:
    state = tmp_path / "state" / "state.json"
    state.parent.mkdir()
    server = server_on(tmp_path / "server", state, CIDR, CIDR6)
    server.start(ready=False)
    try:
        seed = tmp_path / "services.yaml"
        seed.write_text(yaml.safe_dump(SERVICES))
        first = cli(server, "apply", "-f", str(seed), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        before = listed(server)
        revision = before["revision"]
        on_disk = files(state)
        updated = metric(server, "meshdns_registry_last_update_timestamp_seconds")

        # Upserted back (PATCH) and replaced back (PUT, --prune): nothing changes.
        for args, verb in (((), "applied"), (("--prune",), "replaced the registry with")):
            applied = export_and_apply(server, *args, cwd=tmp_path)
            assert applied.returncode == 0, applied.stderr
            assert applied.stdout.decode() == (f"{verb} 4 services: unchanged, revision "
                                               f"{revision}, 4 in the registry\n")
            assert listed(server) == before
            assert call(server.url, "GET", "/v1/services").etag == f'"{revision}"'
            assert files(state) == on_disk  # nothing persisted
            assert metric(server, "meshdns_registry_last_update_timestamp_seconds") == updated

        # A genuine change in the export still bumps the revision (once), and the
        # changed service's VIP, written back as it was, stays allocated too.
        exported = yaml.safe_load(cli(server, "get", "services", "-o", "yaml",
                                      cwd=tmp_path).stdout)
        for s in exported["services"]:
            if s["name"] == "frontend":
                s["hostnames"].append("www.frontend.mesh")
        changed = cli(server, "apply", "-f", "-", stdin=yaml.safe_dump(exported), cwd=tmp_path)
        assert changed.returncode == 0, changed.stderr
        assert changed.stdout == f"applied 4 services: revision {revision + 1}, 4 in the registry\n"
        after = listed(server)
        assert after["revision"] == revision + 1
        assert vips(after) == vips(before)
    finally:
        server.stop()

    # What was allocated is still allocated: restarted on other ranges, those VIPs move
    # into the new ones; the pinned VIP stays as it was given.
    moved = server_on(tmp_path / "moved", state, MOVED, MOVED6)
    moved.start()
    try:
        now = vips(listed(moved))
        assert now["pinned"][0] == PINNED
        for name in ("frontend", "backend", "redis"):
            v4, v6 = now[name]
            assert ipaddress.ip_address(v4) in ipaddress.ip_network(MOVED), (name, v4)
            assert v6 is not None and ipaddress.ip_address(v6) in ipaddress.ip_network(MOVED6)
    finally:
        moved.stop()


def test_an_export_restored_into_an_empty_registry_keeps_every_vip(tmp_path: Path) -> None:
    """Backup and restore: the export applied to a server with no registry gives every
    service the VIP it had (there they count as given: kept even outside a new CIDR)."""
    origin = server_on(tmp_path / "origin", tmp_path / "origin.json", CIDR, CIDR6)
    # Another range than the origin's, so a VIP allocated anew would show.
    restored = server_on(tmp_path / "restored", tmp_path / "restored.json", MOVED, MOVED6)
    origin.start(ready=False)
    restored.start(ready=False)
    try:
        seed = tmp_path / "services.yaml"
        seed.write_text(yaml.safe_dump(SERVICES))
        assert cli(origin, "apply", "-f", str(seed), cwd=tmp_path).returncode == 0
        backup = cli(origin, "get", "services", "-o", "yaml", cwd=tmp_path)
        assert backup.returncode == 0, backup.stderr
        put = cli(restored, "apply", "--prune", "-f", "-", stdin=backup.stdout, cwd=tmp_path)
        assert put.returncode == 0, put.stderr
        assert vips(listed(restored)) == vips(listed(origin))
        # And that restored registry, exported and applied back, is a no-op there too.
        revision = listed(restored)["revision"]
        again = export_and_apply(restored, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert b"unchanged" in again.stdout
        assert listed(restored)["revision"] == revision
    finally:
        origin.stop()
        restored.stop()
