"""The state file's vocabulary: service records, addresses, errors, directory fsync.

Shared by the snapshot (statefile.py) and the journal (journal.py).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from ..core.registry import entry_json, format_ip

STATE_FORMAT = 1


class StateError(RuntimeError):
    """The state file exists but cannot be trusted: start-up stops."""


# The storage itself failed (full, over quota, file too large, I/O error): 507, a
# condition the operator fixes on the volume, unlike a wrong path or mode (500).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


class StateWriteError(OSError):
    """A write could not be made durable. Nothing changed: what was half-written was
    rolled back, the write is not acknowledged and DNS keeps the previous registry."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code or errno.EIO, message)
        self.message = message

    @property
    def status(self) -> int:
        return 507 if self.errno in STORAGE_ERRNOS else 500


# Addresses go through socket rather than ipaddress: ~10x faster, which matters
# when a 100k-service registry is serialised on every write and every GET.


def fast_ip4(vip: int) -> str:
    return socket.inet_ntoa(vip.to_bytes(4, "big"))


def fast_ip6(vip: int) -> str:
    if vip >> 48 == 0:  # ::/80 (IPv4-mapped, -compatible): glibc prints a dotted tail
        return format_ip(vip, 6)
    return socket.inet_ntop(socket.AF_INET6, vip.to_bytes(16, "big"))


def service_record(s: Any) -> dict[str, Any]:
    """A service in the state file, the journal and etcd: with whether each VIP was
    given (kept as given) or allocated (re-checked against the range on load)."""
    return entry_json(s, fast_ip4, fast_ip6, given=True)


def fsync_dir(path: Path) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
