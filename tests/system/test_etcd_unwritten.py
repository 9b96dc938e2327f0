"""A registry.etcd.prefix nothing was ever written under (issue 22, item 2), and an
exported registry applied back through etcd (item 7).

An unwritten prefix (no ``<prefix>revision`` key, no ``services/`` key: a fresh
install before the control plane's first write, or a mistyped prefix) is no
registry, not an empty one: mesh names get SERVFAIL with AA=0 (never an
authoritative NXDOMAIN that clients would cache), /readyz says 503, and a WARNING
names the prefix, once. The first write through any instance (an empty PUT
included: an operator may mean to serve no services) makes every instance on that
prefix answer. A real etcd on loopback, meshdns processes, dig and dnspython.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.rcode
import pytest
import yaml

from ..apiclient import ServerProcess, call, dns_query, wait_for
from ..etcd_cluster import EtcdCluster
from ..etcd_support import answers, instance, metric, name_of, patch, start_listed, svc, vips
from .test_cli import clean_env, meshdns_cmd
from .test_export_apply import export_and_apply

UNWRITTEN = "nothing was ever written under registry.etcd.prefix"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", 1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def dig(server: ServerProcess, name: str) -> tuple[str, set[str]]:
    """(status, header flags) of one real dig over UDP."""
    host, port = server.dns_addr
    out = subprocess.run(["dig", f"@{host}", "-p", str(port), "+tries=1", "+time=5", name],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    status = re.search(r"status: (\w+)", out.stdout)
    flags = re.search(r";; flags: ([a-z ]*);", out.stdout)
    assert status and flags, out.stdout
    return status.group(1), set(flags.group(1).split())


def assert_no_registry(server: ServerProcess, prefix: str) -> None:
    """SERVFAIL with AA=0 for mesh names (dig and dnspython), /readyz 503 naming the
    prefix, no registry to list."""
    for name in ("frontend.mesh", name_of(svc(1)), "kong.svc.80.mesh"):
        status, flags = dig(server, name)
        assert status == "SERVFAIL" and "aa" not in flags, (name, status, flags)
        reply = dns_query(server.dns_addr, name)
        assert reply.rcode() == dns.rcode.SERVFAIL and not reply.flags & dns.flags.AA
    ready = call(server.url, "GET", "/readyz")
    assert ready.status == 503, ready.body
    reason = ready.json()["reason"]
    assert repr(prefix) in reason and "is the prefix right?" in reason, reason
    assert call(server.url, "GET", "/v1/services").status == 503


def warnings(server: ServerProcess, prefix: str) -> list[str]:
    """The log's "nothing was ever written" lines about ``prefix``."""
    return [line for line in server.log().splitlines()
            if f"{UNWRITTEN} {prefix!r}" in line]


def test_an_unwritten_prefix_is_servfail_and_not_ready_until_the_first_put(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    prefix = "/empty/"
    a = instance(tmp_path, "a", etcd.endpoints, etcd={"prefix": prefix})
    b = instance(tmp_path, "b", etcd.endpoints, etcd={"prefix": prefix})
    late: ServerProcess | None = None
    try:
        for server in (a, b):
            start_listed(server)
            assert_no_registry(server, prefix)
        # It stays so over several heartbeats (2 s each), and says so once, naming the
        # prefix and the revision key it looked for (a reminder at most every 5 minutes).
        time.sleep(5)
        for server in (a, b):
            assert_no_registry(server, prefix)
            [line] = warnings(server, prefix)
            assert "WARNING" in line and "'/empty/'" in line and "/empty/revision" in line
            assert "is the prefix right?" in line and "SERVFAIL" in line
        assert etcd.keys(prefix) == {}

        # The first write, an empty PUT: the operator means to serve no services. It
        # commits the revision key alone, and both instances now answer for the zone.
        put = call(a.url, "PUT", "/v1/services", {"services": []})
        assert put.status == 200, put.body
        assert put.json()["changed"] is True and put.json()["services"] == 0
        revision = put.json()["revision"]
        assert revision > 0
        assert list(etcd.keys(prefix)) == [prefix + "revision"]
        wait_for(lambda: call(b.url, "GET", "/readyz").status == 200, 20,
                 "b to see the first write")
        for server in (a, b):
            assert call(server.url, "GET", "/readyz").json()["revision"] == revision
            status, flags = dig(server, "frontend.mesh")
            assert status == "NXDOMAIN" and "aa" in flags
            assert call(server.url, "GET", "/v1/services").json() == {
                "revision": revision, "services": []}
        # Written now: the same empty PUT again changes nothing.
        again = call(b.url, "PUT", "/v1/services", {"services": []})
        assert again.status == 200 and again.json() == {
            "revision": revision, "services": 0, "changed": False}

        # Services written through the other instance are answered by both; an instance
        # started now is ready from its first listing.
        assert patch(b, [svc(1, hostnames=["frontend.mesh"])]).status == 200
        vip = vips(b)[("s1", "shop", 80)][0]
        wait_for(lambda: answers(a, "frontend.mesh") == [vip], 20, "a to answer s1")
        late = instance(tmp_path, "late", etcd.endpoints, etcd={"prefix": prefix}).start()
        assert answers(late, name_of(svc(1))) == [vip]
        assert warnings(late, prefix) == []
    finally:
        for server in (a, b, late):
            if server is not None:
                server.stop()


def test_the_first_write_through_the_api_is_a_put_of_services_too(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    """Not only an empty PUT: a first PATCH of services makes the prefix written, and the
    instance that took it answers at once (read-your-writes)."""
    a = start_listed(instance(tmp_path, "a", etcd.endpoints, etcd={"prefix": "/fresh/"}))
    try:
        assert_no_registry(a, "/fresh/")
        assert patch(a, [svc(1)]).status == 200
        vip = vips(a)[("s1", "shop", 80)][0]
        assert answers(a, name_of(svc(1))) == [vip]
        assert call(a.url, "GET", "/readyz").status == 200
    finally:
        a.stop()


def test_a_mistyped_prefix_is_servfail_and_the_warning_names_it(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    """The registry lives under /meshdns/prod/. An instance told /meshdns/ (a prefix of
    it) or /meshnds/prod/ (a typo) finds no registry: SERVFAIL, not NXDOMAIN, and the log
    names the prefix; for /meshdns/ it also says what else is under it. (Without its
    trailing slash, /meshdns/prod is refused by check-config: test_config.)"""
    writer = start_listed(instance(tmp_path, "writer", etcd.endpoints,
                              etcd={"prefix": "/meshdns/prod/"}))
    readers: list[ServerProcess] = []
    try:
        assert patch(writer, [svc(1)]).status == 200
        assert answers(writer, name_of(svc(1))) == [vips(writer)[("s1", "shop", 80)][0]]
        for i, prefix in enumerate(("/meshdns/", "/meshnds/prod/")):
            reader = start_listed(instance(tmp_path, f"reader{i}", etcd.endpoints,
                                      etcd={"prefix": prefix}))
            readers.append(reader)
            assert_no_registry(reader, prefix)
            assert len(warnings(reader, prefix)) == 1
        [parent] = warnings(readers[0], "/meshdns/")
        assert "other keys are under it (e.g. /meshdns/prod/" in parent
        assert "is the registry under a longer prefix?" in parent
        assert "other keys" not in warnings(readers[1], "/meshnds/prod/")[0]
        # Writes through the writer go on reaching nobody but its own prefix.
        assert patch(writer, [svc(2)]).status == 200
        for reader in readers:
            assert_no_registry(reader, reader.config["registry"]["etcd"]["prefix"])
    finally:
        writer.stop()
        for reader in readers:
            reader.stop()


def test_a_copy_from_the_state_file_on_an_unwritten_prefix(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    """Restarted with its state file on a prefix nothing was written under (the prefix
    changed in its config): it keeps answering from the copy it had, and says so. The
    first write there replaces that copy with what etcd holds, and nothing of the copy
    leaks into etcd."""
    x = start_listed(instance(tmp_path, "x", etcd.endpoints))
    try:
        assert patch(x, [svc(1)]).status == 200
        vip1 = vips(x)[("s1", "shop", 80)][0]
    finally:
        x.stop()
    # Ready at once from its state file (a first start's log line is in the log already).
    moved = instance(tmp_path, "x", etcd.endpoints, etcd={"prefix": "/other/"}).start()
    try:
        [line] = wait_for(lambda: warnings(moved, "/other/"), 20, "the listing of /other/")
        assert answers(moved, name_of(svc(1))) == [vip1]
        assert call(moved.url, "GET", "/readyz").status == 200
        assert "keeps serving the copy it had" in line
        assert patch(moved, [svc(2)]).status == 200
        assert ("s1", "shop", 80) not in vips(moved)
        status, flags = dig(moved, name_of(svc(1)))
        assert status == "NXDOMAIN" and "aa" in flags
        assert answers(moved, name_of(svc(2))) == [vips(moved)[("s2", "shop", 80)][0]]
        assert sorted(etcd.keys("/other/services/")) == ["/other/services/shop/s2/80"]
    finally:
        moved.stop()


# ------------------------------------------------------------------ item 7 through etcd


def test_an_export_applied_back_through_etcd_commits_nothing(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    a = start_listed(instance(tmp_path, "a", etcd.endpoints))
    try:
        services: list[dict[str, Any]] = [svc(i) for i in range(3)] + [
            svc(9, vip="240.0.9.9")]
        seed = tmp_path / "services.yaml"
        seed.write_text(yaml.safe_dump(services))
        applied = subprocess.run(meshdns_cmd("apply", "-f", str(seed), "--server", a.url),
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                 env=clean_env(), check=False)
        assert applied.returncode == 0, applied.stderr
        before = call(a.url, "GET", "/v1/services").json()
        commits = metric(a, "meshdns_etcd_write_commits_total")
        stored = etcd.keys("/meshdns/services/")

        again = export_and_apply(a, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.decode() == (f"applied 4 services: unchanged, revision "
                                         f"{before['revision']}, 4 in the registry\n")
        assert call(a.url, "GET", "/v1/services").json() == before
        assert metric(a, "meshdns_etcd_write_commits_total") == commits
        assert etcd.keys("/meshdns/services/") == stored
        given = {json.loads(v)["name"]: json.loads(v)["vip_given"] for v in stored.values()}
        assert given == {"s0": False, "s1": False, "s2": False, "s9": True}
    finally:
        a.stop()
