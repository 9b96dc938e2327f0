"""Reading /etc/resolv.conf (or the file the config names): nameservers and search list."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


MAXNS = 3  # glibc uses the first three nameserver lines and ignores the rest


def parse_resolv_conf(text: str) -> ResolvConf:
    """glibc's rules: the last ``search``/``domain`` line wins; comments with # or ;.

    Nameservers: the first three valid addresses, duplicates dropped. One with an
    IPv6 zone index (``fe80::1%eth0``) is skipped: an upstream address here is a
    plain IP, and a link-local one without its interface reaches nothing.
    """
    nameservers: list[str] = []
    search: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "nameserver" and len(words) > 1:
            if "%" in words[1] or len(nameservers) >= MAXNS:
                continue
            try:
                addr = str(ipaddress.ip_address(words[1]))
            except ValueError:
                continue
            if addr not in nameservers:
                nameservers.append(addr)
        elif words[0] in ("search", "domain"):
            search = [w.lower().rstrip(".") for w in words[1:] if w.strip(".")]
    return ResolvConf(tuple(nameservers), tuple(search))


def read_resolv_conf(path: str) -> ResolvConf:
    try:
        return parse_resolv_conf(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return ResolvConf()
