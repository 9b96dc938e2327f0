"""DNS messages crafted byte by byte for the forwarder's tests (both tiers): record
types, wire names, records, and a parsed client request."""

from __future__ import annotations

import socket
import struct

import dns.message

from meshdns.core.answer import ForwardRequest, parse_query, udp_limit

T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_TXT, T_AAAA = 1, 2, 5, 6, 12, 16, 28


def wire_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def rr(owner: str | bytes, rtype: int, rdata: bytes, ttl: int = 300) -> bytes:
    """One record; ``owner`` as text, or as raw wire bytes (pointers included)."""
    name = owner if isinstance(owner, bytes) else wire_name(owner)
    return name + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def a(addr: str) -> bytes:
    return socket.inet_aton(addr)


def request(name: str, *, edns: int = 0, payload: int = 1232, dnssec: bool = False,
            qid: int = 0x1234, flags: int | None = None) -> ForwardRequest:
    msg = dns.message.make_query(name, "A", use_edns=edns, payload=payload,
                                 want_dnssec=dnssec)
    msg.id = qid
    if flags is not None:
        msg.flags = flags
    data = msg.to_wire()
    q = parse_query(data)
    return ForwardRequest(q, data, udp_limit(q))
