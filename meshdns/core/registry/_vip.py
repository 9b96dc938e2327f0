"""Virtual IP ranges: which addresses of a CIDR may be handed out, and handing them out.

Addresses are plain ints (IPv4 and IPv6 alike) so the registry's indexes stay
small and fast; ``ipaddress`` is used only at the edges.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Container, Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class VipRange:
    """The usable addresses of one CIDR, for one address family."""

    network: IPNetwork
    first: int
    last: int

    @classmethod
    def from_cidr(cls, cidr: str | IPNetwork) -> VipRange:
        net = ipaddress.ip_network(cidr, strict=False) if isinstance(cidr, str) else cidr
        lo = int(net.network_address)
        hi = int(net.broadcast_address)
        if net.version == 4 and net.num_addresses > 2:
            # Leave out the network and broadcast addresses, like a DHCP pool would.
            lo, hi = lo + 1, hi - 1
        elif net.version == 6 and net.num_addresses > 1:
            lo += 1  # the subnet-router anycast address is not a host
        return cls(net, lo, hi)

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, vip: object) -> bool:
        return isinstance(vip, int) and self.first <= vip <= self.last

    def allocate(self, start: int, unavailable: Container[int], limit: int) -> int | None:
        """First address at or after ``start`` (wrapping) that is not unavailable.

        ``limit`` bounds the scan (the caller passes how many addresses it knows
        are taken or held inside the range plus one), so an exhausted range is
        reported instead of scanned forever.
        """
        if start < self.first or start > self.last:
            start = self.first
        vip = start
        for _ in range(min(limit, self.size)):
            if vip not in unavailable:
                return vip
            vip = vip + 1 if vip < self.last else self.first
        return None

    def allocate_many(self, start: int, count: int, taken: Container[int],
                      held: Container[int]) -> list[int] | None:
        """``count`` addresses, as :meth:`allocate` would hand them out one by one.

        The first is the first address at or after ``start`` (wrapping) that is
        neither taken nor held, each next one the first free address after the
        previous one. None when one lap of the range does not find that many.
        """
        first, last = self.first, self.last
        vip = start if first <= start <= last else first
        out: list[int] = []
        if count <= 0:
            return out
        for _ in range(self.size):  # one lap: an address handed out is never met again
            if vip not in taken and vip not in held:
                out.append(vip)
                if len(out) == count:
                    return out
            vip = vip + 1 if vip < last else first
        return None


def count_in(vips: Iterable[int], first: int, last: int) -> int:
    """How many of ``vips`` lie in ``first..last`` (one C-level pass; ints only)."""
    return sum(map(range(first, last + 1).__contains__, vips))


def format_ip(vip: int, version: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(vip))
    return str(ipaddress.IPv6Address(vip))


# Fast paths for the common spellings; anything they do not accept goes to
# ``ipaddress``, so the result is exactly what ``ipaddress`` makes of it.
# The octets ipaddress accepts are exactly these: "0".."255", no leading zeros.
_OCTETS = {str(i): i for i in range(256)}
# Up to 8 hex groups of 1..4 digits, colon-separated, none empty.
_HEXTETS = re.compile(r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,7}")
# The groups before "::" as (value, count): VIPs share a few prefixes.
_PREFIXES: dict[str, tuple[int, int]] = {}
_MAX_PREFIXES = 1024


# The first three octets ("240.0.48") as the address's top 24 bits: VIPs share a few.
_NETS24: dict[str, int] = {}
_MAX_NETS24 = 4096


def forget_spellings() -> None:
    """Empty the spelling caches above once a write is parsed.

    Their keys are strings cut from that write, scattered through the allocator's
    arenas among the write's own objects: kept, a few hundred of them pin every arena
    the write used once it is garbage (a follower back from 300k services to 3 kept
    ~200 MiB of RSS). They pay off within one write, where the spellings repeat.
    """
    _NETS24.clear()
    _PREFIXES.clear()


def parse_ip4(text: str) -> int | None:
    """``parse_ip(text, 4)``."""
    head, dot, last = text.rpartition(".")
    d = _OCTETS.get(last)
    if d is not None:
        net = _NETS24.get(head)
        if net is not None:
            return net | d
        parts = head.split(".")
        if len(parts) == 3:
            octet = _OCTETS.get
            a, b, c = octet(parts[0]), octet(parts[1]), octet(parts[2])
            if a is not None and b is not None and c is not None:
                net = a << 24 | b << 16 | c << 8
                if len(_NETS24) < _MAX_NETS24:
                    _NETS24[head] = net
                return net | d
    if not dot:
        return None  # not even one dot: no IPv4 spelling ipaddress takes
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _hextets(text: str) -> tuple[int, int] | None:
    """Colon-separated hex groups as one number and their count; None if not that."""
    if _HEXTETS.fullmatch(text) is None:
        return None
    groups = text.split(":")
    value = 0
    for group in groups:
        value = value << 16 | int(group, 16)
    return value, len(groups)


def _prefix(text: str) -> tuple[int, int] | None:
    got = _PREFIXES.get(text)
    if got is None:
        got = _hextets(text)
        if got is not None and len(_PREFIXES) < _MAX_PREFIXES:
            _PREFIXES[text] = got
    return got


def parse_ip6(text: str) -> int | None:
    """``parse_ip(text, 6)``."""
    head, sep, tail = text.partition("::")
    if sep:  # "::" stands for at least one zero group
        hi = (_PREFIXES.get(head) or _prefix(head)) if head else (0, 0)
        lo: tuple[int, int] | None
        if 0 < len(tail) <= 4 and tail.isalnum() and tail.isascii() and "x" not in tail \
                and "X" not in tail:
            # One group (ASCII letters and digits, no "0x" for int() to skip): int()
            # decides whether it is hex.
            try:
                lo = (int(tail, 16), 1)
            except ValueError:
                lo = None
        else:
            lo = _hextets(tail) if tail else (0, 0)
        if hi is not None and lo is not None and hi[1] + lo[1] <= 7:
            return hi[0] << 16 * (8 - hi[1]) | lo[0]
    else:
        full = _hextets(text)
        if full is not None and full[1] == 8:
            return full[0]
    try:  # a dotted tail, a scope, or not an address: ipaddress decides
        return int(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def parse_ip(text: str, version: int) -> int | None:
    """The int form of ``text`` if it is an address of the given family, else None.

    Accepts exactly what ``ipaddress`` accepts, without its cost on the common
    forms (a dotted quad, hex groups with colons).
    """
    if isinstance(text, str):
        if version == 4:
            return parse_ip4(text)
        if version == 6:
            return parse_ip6(text)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version != version:
        return None
    return int(addr)
