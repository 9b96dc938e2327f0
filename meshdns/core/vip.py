"""Virtual IP ranges: which addresses of a CIDR may be handed out, and handing them out.

Addresses are plain ints (IPv4 and IPv6 alike) so the registry's indexes stay
small and fast; ``ipaddress`` is used only at the edges.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container
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


def format_ip(vip: int, version: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(vip))
    return str(ipaddress.IPv6Address(vip))


def parse_ip(text: str, version: int) -> int | None:
    """The int form of ``text`` if it is an address of the given family, else None."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version != version:
        return None
    return int(addr)
