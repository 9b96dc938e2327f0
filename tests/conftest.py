from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ServerThread, make_config, running_server


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[ServerThread]:
    """meshdns on loopback (port 0, IPv4 and IPv6) with the demo registry, no upstreams."""
    with running_server(make_config(tmp_path)) as server:
        yield server
