"""The system tier: tests that start servers (meshdns, unbound, etcd, Prometheus), run
real clients (dig, kdig, glibc in a private namespace) or child processes. Every test
here carries the ``system`` marker (``-m "not system"`` leaves them out)."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.system)
