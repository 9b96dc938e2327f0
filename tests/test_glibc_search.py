"""glibc's search list meets meshdns: one query for a mesh name, forwarding for the rest.

A Kubernetes pod's resolv.conf says ``search default.svc.cluster.local`` and
``options ndots:5``, so glibc asks ``frontend.kong.svc.80.mesh`` first as
``frontend.kong.svc.80.mesh.default.svc.cluster.local``. meshdns answers that
in one round trip (CNAME to the mesh name plus its A record), so exactly one
query reaches it; a name of the loopback unbound goes through forwarding.

glibc only talks to port 53, so this runs in private network and mount
namespaces (``unshare -n -m``): only a loopback interface, the test's
resolv.conf, nsswitch.conf and hosts bind-mounted over /etc, meshdns on
127.0.0.1:53 and unbound (local data only) on another loopback port. This file
is also the program run inside (``python -m tests.test_glibc_search --inside
DIR``): it starts both servers, counts the queries meshdns receives around each
``getent`` through its tally, and writes the results as JSON.

Skips, printing why, only when unshare is not permitted; with CI=true it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SEARCH = "default.svc.cluster.local"
RESOLV_CONF = f"""\
# written by tests/test_glibc_search.py, bind-mounted over /etc/resolv.conf
nameserver 127.0.0.1
search {SEARCH}
options ndots:5 timeout:2 attempts:2
"""
NSSWITCH = "hosts: files dns\n"
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"
LOOKUPS = {
    "mesh": "frontend.kong.svc.80.mesh",
    "hostname": "frontend.mesh",
    "unknown_mesh": "nope.kong.svc.80.mesh",
    "forwarded": "www.example.test",
}


def _namespaces_usable() -> str | None:
    """None when ``unshare -n -m`` works here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    try:
        probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n -m failed: {exc}"
    if probe.returncode != 0:
        return f"unshare -n -m is not permitted here: {probe.stderr.strip()}"
    return None


def test_search_list_mesh_name_takes_one_query_and_other_names_forward(tmp_path: Path) -> None:
    missing = _namespaces_usable()
    for tool in ("ip", "getent", "unbound", "mount"):
        if missing is None and shutil.which(tool) is None:
            missing = f"{tool} is not installed"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so this must run: {missing}")
        print(f"skipping glibc search-list test: {missing}")
        pytest.skip(missing)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        ["unshare", "-n", "-m", sys.executable, "-m", "tests.test_glibc_search", "--inside",
         str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 0, f"inside the namespace:\n{run.stdout}\n{run.stderr}"
    results = json.loads((tmp_path / "results.json").read_text())
    print(json.dumps(results, indent=1))

    mesh = results["mesh"]
    assert mesh["rc"] == 0 and "240.0.0.7" in mesh["out"], mesh
    assert mesh["queries"] == 1, mesh  # the search-list name, answered with CNAME + A
    assert mesh["forwarded"] == 0, mesh

    hostname = results["hostname"]
    assert hostname["rc"] == 0 and "240.0.0.7" in hostname["out"], hostname
    assert hostname["queries"] == 1 and hostname["forwarded"] == 0, hostname

    unknown = results["unknown_mesh"]
    assert unknown["rc"] == 2, unknown  # not found: NXDOMAIN for the searched and bare name
    assert unknown["forwarded"] == 0, unknown  # a mesh name is never asked upstream

    forwarded = results["forwarded"]
    assert forwarded["rc"] == 0 and "192.0.2.10" in forwarded["out"], forwarded
    assert forwarded["forwarded"] >= 1, forwarded


# ---------------------------------------------------------------- inside the namespaces


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=20)


def inside(directory: Path) -> int:
    from meshdns.config import parse_config

    from .fake_upstream import Unbound
    from .support import ServerThread, make_config

    _sh("ip", "link", "set", "lo", "up")
    # getent ahosts* passes AI_ADDRCONFIG: glibc then wants an address other than
    # 127.0.0.1/::1 configured. A documentation address on lo is local to this
    # namespace; nothing is ever sent anywhere.
    _sh("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
    for name, text in (("resolv.conf", RESOLV_CONF), ("nsswitch.conf", NSSWITCH),
                       ("hosts", HOSTS)):
        (directory / name).write_text(text)
        _sh("mount", "--bind", str(directory / name), f"/etc/{name}")

    (directory / "unbound").mkdir(exist_ok=True)
    unbound = Unbound(directory / "unbound").start()
    raw = make_config(directory, {"dns": {"upstreams": [unbound.address],
                                          "upstream_timeout": 2.0}})
    raw["dns"]["listen"] = ["127.0.0.1:53"]  # where glibc looks; resolv.conf search is ours
    server = ServerThread(parse_config(raw, {})).start()
    try:
        mesh = server.mesh
        assert mesh.settings.search == (SEARCH,), mesh.settings.search

        def received() -> int:
            return sum(mesh.handler.snapshot_counts().requests.values())

        def forwarded() -> int:
            stats = mesh.forwarder.upstream_stats().values()
            return sum(sum(s.requests.values()) for s in stats)

        results: dict[str, Any] = {}
        for label, name in LOOKUPS.items():
            before, fwd_before = server.call(received), server.call(forwarded)
            run = subprocess.run(["getent", "ahostsv4", name], capture_output=True, text=True,
                                 timeout=30, check=False)
            results[label] = {
                "name": name, "rc": run.returncode, "out": run.stdout,
                "queries": server.call(received) - before,
                "forwarded": server.call(forwarded) - fwd_before,
            }
        (directory / "results.json").write_text(json.dumps(results))
    finally:
        server.stop()
        unbound.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        sys.exit(inside(Path(sys.argv[2])))
    sys.exit("usage: python -m tests.test_glibc_search --inside DIR (run under unshare -n -m)")
