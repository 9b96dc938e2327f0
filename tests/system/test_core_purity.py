"""meshdns.core stays pure: standard library and dnslib only, no IO, no clock.

Two checks: every import statement of every module under meshdns/core (read with
``ast``, so an import hidden in a function counts too), and what importing the
whole package really adds to ``sys.modules`` in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import meshdns.core

CORE = Path(meshdns.core.__file__).resolve().parent
CORE_FILES = sorted(CORE.rglob("*.py"))

# IO, event loops, threads, processes, clocks, and the non-core dependencies.
FORBIDDEN = frozenset({
    "asyncio", "socket", "socketserver", "selectors", "select", "ssl", "threading",
    "_thread", "multiprocessing", "concurrent", "subprocess", "signal", "os", "shutil",
    "tempfile", "pathlib", "time", "datetime", "sched", "http", "urllib", "email", "logging",
    "aiohttp", "yaml", "prometheus_client", "uvloop", "requests", "dns",
})
# Third-party packages core may use: the standard library and dnslib only (the pure core
# of the README's Design map: bytes in, bytes out, no IO).
THIRD_PARTY_ALLOWED = frozenset({"dnslib"})


def package_of(path: Path) -> str:
    return ".".join(["meshdns", "core", *path.parent.relative_to(CORE).parts])


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, a module of ``package``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            out.append((node.lineno, "__import__()"))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            out.append((node.lineno, "importlib.import_module()"))
    return out


def test_core_has_modules_to_check() -> None:
    names = {p.name for p in CORE_FILES}
    assert {"_templates.py", "_vip.py", "_rebuild.py", "_wire.py", "_zone.py", "_handler.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_module_imports_only_pure_modules(path: Path) -> None:
    bad = []
    for line, name in imported_modules(path, package_of(path)):
        top = name.split(".")[0]
        if name in ("__import__()", "importlib.import_module()") or top == "importlib":
            bad.append(f"{path.name}:{line}: dynamic import")
        elif top == "meshdns":
            if not (name == "meshdns.core" or name.startswith("meshdns.core.")):
                bad.append(f"{path.name}:{line}: {name} (core must not import the IO layers)")
        elif top in FORBIDDEN:
            bad.append(f"{path.name}:{line}: {name}")
        elif top not in sys.stdlib_module_names and top not in THIRD_PARTY_ALLOWED \
                and top != "__future__":
            bad.append(f"{path.name}:{line}: {name} (third-party, not dnslib)")
    assert not bad, "meshdns.core must stay pure:\n" + "\n".join(bad)


def test_importing_core_pulls_in_no_io_module() -> None:
    """In a fresh interpreter: what ``import meshdns.core.*`` adds beyond dnslib."""
    modules = sorted("meshdns.core." + ".".join(p.relative_to(CORE).with_suffix("").parts)
                     for p in CORE_FILES if p.name != "__init__.py")
    script = f"""
import json, sys
import dnslib  # the one allowed dependency; it imports socket itself, which is not ours
before = set(sys.modules)
import importlib
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          timeout=60, check=False, cwd=str(CORE.parent.parent))
    assert proc.returncode == 0, proc.stderr
    added = json.loads(proc.stdout)
    assert "meshdns.core.answer._handler" in added
    forbidden = sorted(m for m in added if m.split(".")[0] in FORBIDDEN)
    assert not forbidden, f"importing meshdns.core loaded {forbidden}"
    others = sorted(m for m in added if m.split(".")[0] == "meshdns"
                    and not m.startswith("meshdns.core") and m != "meshdns")
    assert not others, f"importing meshdns.core loaded {others}"


def test_the_checker_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import json\nfrom time import monotonic\n\ndef f():\n"
                     "    import asyncio.events\n    from ..server import MeshServer\n"
                     "    from . import wire\n    __import__('socket')\n")
    names = {name for _, name in imported_modules(probe, "meshdns.core")}
    assert names == {"json", "time", "asyncio.events", "meshdns.server", "meshdns.core",
                     "__import__()"}


def test_core_is_two_packages_behind_their_faces() -> None:
    """core/ holds registry/ and answer/ only, and every module behind each one's
    __init__ is private (``_name.py``): the import-linter contract "private modules are
    imported only inside their package" (pyproject.toml, `make lint`) then keeps every
    caller on what the __init__ exports."""
    import meshdns.core.answer
    import meshdns.core.registry

    top = sorted(p.name for p in CORE.iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "answer", "registry"]
    public = sorted(str(p.relative_to(CORE)) for p in CORE_FILES
                    if p.parent != CORE and not p.name.startswith("_"))
    assert public == []
    for face in (meshdns.core.registry, meshdns.core.answer):
        missing = [name for name in face.__all__ if not hasattr(face, name)]
        assert not missing, (face.__name__, missing)
