"""Every relative link in the repository's Markdown resolves inside the repository.

A clone has nothing beside it: a link to ../shared/SPEC.md was dead in every clone.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
