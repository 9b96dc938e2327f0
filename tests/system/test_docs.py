"""Every relative link in the repository's Markdown resolves inside the repository.

A clone has nothing beside it: a link to ../shared/SPEC.md was dead in every clone.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(p for p in REPO.rglob("*.md") if not skip & set(p.relative_to(REPO).parts))


def test_relative_links_resolve_inside_the_repository() -> None:
    dead: list[str] = []
    for md in markdown_files():
        for target in LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(REPO) or not path.exists():
                dead.append(f"{md.relative_to(REPO)}: {target}")
    assert not dead, dead


def test_the_contract_ships_in_the_repository() -> None:
    spec = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    assert spec.startswith("# meshdns — external contract")
    assert "docs/spec.md" in (REPO / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ metrics in the README

README = REPO / "README.md"
FAMILY = re.compile(r"^# TYPE (\S+) \S+$", re.MULTILINE)


def exported_families(tmp: Path) -> dict[str, set[str]]:
    """Family name -> the roles that export it, scraped from real processes: a leader
    forwarding to a real unbound (with dnstap on), a follower of it, and an instance
    whose registry is in a real etcd (every collector yields its families at each
    scrape, samples or not)."""
    from ..apiclient import ServerProcess, call, wait_for
    from ..etcd_cluster import EtcdCluster
    from ..fake_upstream import Unbound

    out: dict[str, set[str]] = {}
    etcd = EtcdCluster(tmp / "etcd", 1)
    (tmp / "unbound").mkdir()
    with contextlib.ExitStack() as stack:
        unbound = stack.enter_context(Unbound(tmp / "unbound"))
        stack.callback(etcd.stop)
        # With log.dnstap too (its families are exported with or without a collector).
        leader = ServerProcess(tmp / "leader", {"dns": {"upstreams": [unbound.address]},
                                                "log": {"dnstap": {"socket": "/nonexistent"}}},
                               name="leader")
        stack.callback(leader.stop)
        leader.start(ready=False)
        follower = ServerProcess(tmp / "follower", {"registry": {"follow": leader.url}},
                                 name="follower")
        stack.callback(follower.stop)
        follower.start(ready=False)
        etcd.start()
        in_etcd = ServerProcess(tmp / "in-etcd", {"registry": {"etcd": {
            "endpoints": etcd.endpoints}}}, name="in-etcd")
        stack.callback(in_etcd.stop)
        in_etcd.start(ready=False)
        # A write, so that the follower has something to follow and every path ran once.
        assert call(leader.url, "PUT", "/v1/services", {"services": [
            {"name": "a", "namespace": "b", "port": 80}]}).status == 200
        wait_for(lambda: call(follower.url, "GET", "/readyz").status == 200, 30,
                 "the follower to sync")
        for role, server in (("leader", leader), ("follower", follower),
                             ("etcd", in_etcd)):
            body = call(server.url, "GET", "/metrics").body.decode()
            for name in FAMILY.findall(body):
                out.setdefault(name, set()).add(role)
    return out


def documented_metrics() -> list[str]:
    """The metric names in the first column of the README's metrics table, with the
    ``meshdns_`` prefix (the table leaves it out) and without label lists."""
    section = README.read_text(encoding="utf-8").split("\n## Metrics and logs\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for name in re.findall(r"`([a-z_:]+)(?:\{[^`]*\})?`", first):
                names.append(name if name.startswith("meshdns_") else f"meshdns_{name}")
    return names


@pytest.mark.skipif(shutil.which("unbound") is None or shutil.which("etcd") is None,
                    reason="unbound and etcd are started for real (.ci/run installs them)")
def test_every_exported_metric_family_is_in_the_readme_once(tmp_path: Path) -> None:
    """Scraped from real processes, so a family added to a collector without a row in
    the README's table fails here, as does a row for a family nothing exports, or a
    family named twice (the stale repeated paragraph this table replaced)."""
    exported = exported_families(tmp_path)
    assert {"meshdns_dns_requests_total", "meshdns_follow_sync_age_seconds",
            "meshdns_etcd_connected", "meshdns_process_resident_memory_bytes"} <= exported.keys()
    documented = documented_metrics()
    twice = sorted({n for n in documented if documented.count(n) > 1})
    assert not twice, f"named more than once in the README's metrics table: {twice}"
    missing = sorted(exported.keys() - set(documented))
    assert not missing, f"exported, missing from the README's metrics table: {missing}"
    stale = sorted(set(documented) - exported.keys())
    assert not stale, f"in the README's metrics table, exported by no meshdns: {stale}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_contents_list_every_section_in_order() -> None:
    text = README.read_text(encoding="utf-8")
    heads = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert heads[0] == "Contents", "the table of contents comes first"
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)$", contents, re.MULTILINE)
    assert listed == [(h, github_anchor(h)) for h in heads[1:]]
    # The reference before the numbers: configuration precedes performance.
    assert heads.index("Configuration") < heads.index("Performance")
