"""The unit tier: pure tests of the core, config, journal and document readers. No
network socket and no child process: a test here that opens one fails (it belongs in
tests/system/). ``make test-unit`` runs this tier alone."""
from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class NotAUnitTest(AssertionError):
    """A unit test reached for the network or a child process."""


@pytest.fixture(autouse=True)
def _no_network_no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_init = socket.socket.__init__

    def guarded_init(self: socket.socket, family: Any = -1, type: Any = -1,
                     proto: Any = -1, fileno: Any = None) -> None:
        # asyncio's self-pipe (socketpair, AF_UNIX) and wrapping an existing fd are fine
        if fileno is None and family != socket.AF_UNIX:
            raise NotAUnitTest("a network socket in a unit test: move it to tests/system/")
        real_init(self, family, type, proto, fileno)

    def no_popen(*args: Any, **kwargs: Any) -> None:
        raise NotAUnitTest("a child process in a unit test: move it to tests/system/")

    monkeypatch.setattr(socket.socket, "__init__", guarded_init)
    monkeypatch.setattr(subprocess.Popen, "__init__", no_popen)
    yield
