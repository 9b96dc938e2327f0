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
is also the program run inside (``python -m tests.system.test_glibc_search --inside
DIR``): it starts both servers, counts the queries meshdns receives around each
``getent`` through its tally, and writes the results as JSON.

Skips, printing why, only when unshare is not permitted; with CI=true it fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..netns import enter_private_network, require_namespaces, run_in_namespaces

SEARCH = "default.svc.cluster.local"
RESOLV_CONF = f"""\
# written by tests/system/test_glibc_search.py, bind-mounted over /etc/resolv.conf
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


def test_search_list_mesh_name_takes_one_query_and_other_names_forward(tmp_path: Path) -> None:
    require_namespaces("getent", "unbound", "mount")
    results = run_in_namespaces(
        [sys.executable, "-m", "tests.system.test_glibc_search", "--inside", str(tmp_path)], tmp_path)
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


def inside(directory: Path) -> int:
    from meshdns.config import parse_config

    from ..fake_upstream import Unbound
    from ..support import ServerThread, make_config

    enter_private_network(directory, {"resolv.conf": RESOLV_CONF, "nsswitch.conf": NSSWITCH,
                                      "hosts": HOSTS})
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
    sys.exit("usage: python -m tests.system.test_glibc_search --inside DIR (run under unshare -n -m)")
