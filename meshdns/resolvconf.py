"""Reading /etc/resolv.conf (or the file the config names): nameservers and search list."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> ResolvConf:
    """glibc's rules: the last ``search``/``domain`` line wins; comments with # or ;."""
    nameservers: list[str] = []
    search: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "nameserver" and len(words) > 1:
            addr = words[1].split("%", 1)[0]  # drop an IPv6 zone index
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                continue
            nameservers.append(addr)
        elif words[0] in ("search", "domain"):
            search = [w.lower().rstrip(".") for w in words[1:] if w.strip(".")]
    return ResolvConf(tuple(nameservers), tuple(search))


def read_resolv_conf(path: str) -> ResolvConf:
    try:
        return parse_resolv_conf(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ResolvConf()
