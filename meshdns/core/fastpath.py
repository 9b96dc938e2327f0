"""The common answers straight to wire: no dnslib objects on the miss path.

A first-time query (a reply-cache miss) used to build dnslib RR and DNSLabel
objects and pack them: ~50-150 µs. The questions a mesh sidecar gets almost all
the time (A, AAAA, SRV, ANY or another type of a service name; an unknown name
or an empty non-terminal under a served domain; the PTR of a VIP) are answered
here from a light parse, a few dict lookups and a bytes join:

- the header and the question are copied from the query (the question keeps
  its exact case, 0x20);
- an owner name that is the question's is a compression pointer to offset 12;
- every other name is written as dnslib writes it (compressed against the
  question's suffixes, byte for byte, including their case), so the reply is
  the very bytes ``resolver.encode`` produces for ``Zone.decide``'s decision.
  ``tests/test_core_fastpath_equivalence.py`` holds it to that;
- names and SOA RDATA are encoded once per snapshot, lazily, when first asked.

The policy stays ``Zone``'s: this module calls the same lookups ``Zone.decide``
does, in the same order, and hands back None for anything it does not handle
(apex, search-list and forwarded names, other classes, a zone not loaded yet,
malformed or unusual messages, a UDP reply over the client's limit, names with
odd labels). The caller then takes the dnslib path, which stays the reference.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from .names import canonical_name
from .registry import Service
from .wire import QTYPE_ANY, RCODE_NOERROR, RCODE_NXDOMAIN, WireError, check_options
from .zone import (
    SOA_EXPIRE,
    SOA_REFRESH,
    SOA_RETRY,
    SOA_RNAME,
    T_A,
    T_AAAA,
    T_PTR,
    T_SRV,
    Zone,
    octet_label,
)

SERVER_UDP_PAYLOAD = 1232  # the UDP size this server advertises in its OPT record
_QUESTION_ONLY = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QD=1, AN=NS=AR=0
_QUESTION_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"  # QD=1, AR=1 (the OPT record)
_OPT_TYPE = b"\x00\x29"
_HEX = "0123456789abcdef"
_TYPE_CLASS = struct.Struct(">HH").pack
_HEADER = struct.Struct(">2sBBHHHH").pack  # ID, flags, QD, AN, NS, AR
_PTR_TO_QNAME = b"\xc0\x0c"

_Reply = tuple[bytes, int, str | None]  # reply, rcode, name (see Fast)

# What ``answer`` returns: the reply, its qtype and rcode, and the name whose owner
# decides it (lower case; None for a negative answer: its SOA serial is the registry
# revision, so any change outdates it).
Fast = tuple[bytes, int, int, str | None]


class _Name:
    """A name the reply writes, pre-encoded: labels, wire form, prefix lengths."""

    __slots__ = ("cut", "labels", "wire")

    def __init__(self, text: str) -> None:
        self.labels = tuple(text.encode("ascii").split(b"."))
        self.wire = b"".join(bytes((len(label),)) + label for label in self.labels) + b"\x00"
        cut = [0]
        for label in self.labels:
            cut.append(cut[-1] + 1 + len(label))
        self.cut = tuple(cut)  # cut[i]: bytes of the first i labels

    def after_question(self, qlabels: Sequence[bytes], qoffsets: Sequence[int]) -> tuple[bytes, int]:
        """This name, written when only the question's name precedes it.

        As dnslib's compressor: the longest suffix equal (byte for byte, so in
        the question's case) to a suffix of the question becomes a pointer. Also
        says where the whole name can then be pointed at (-1: where it is written).
        """
        labels = self.labels
        n, m = len(labels), len(qlabels)
        k = 0
        while k < n and k < m and labels[n - 1 - k] == qlabels[m - 1 - k]:
            k += 1
        if k == 0:
            return self.wire, -1
        at = qoffsets[m - k]
        pointer = (0xC000 | at).to_bytes(2, "big")
        if k == n:
            return pointer, at
        return self.wire[: self.cut[n - k]] + pointer, -1


class _Soa:
    """The SOA of one apex for a negative answer, minus its owner and MNAME."""

    __slots__ = ("name", "rest", "tail")

    def __init__(self, apex: str, serial: int, negative_ttl: int) -> None:
        self.name = _Name(apex)
        rname = _Name(SOA_RNAME).wire
        rdata_len = 2 + len(rname) + 20  # MNAME as a pointer, RNAME, five numbers
        self.rest = (b"\x00\x06\x00\x01" + negative_ttl.to_bytes(4, "big")
                     + rdata_len.to_bytes(2, "big"))
        self.tail = rname + struct.pack(">IIIII", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
                                        negative_ttl)


class _Target:
    """A service's canonical name in one domain: the SRV target and the PTR name."""

    __slots__ = ("name", "srv")

    def __init__(self, svc: Service, domain: str) -> None:
        self.name = _Name(canonical_name(svc.name, svc.namespace, svc.port, domain))
        wire = self.name.wire
        # SRV 0 100 <port> <target>; dnslib writes the target uncompressed (RFC 2782).
        rdata = b"\x00\x00\x00\x64" + svc.port.to_bytes(2, "big") + wire
        self.srv = len(rdata).to_bytes(2, "big") + rdata


class FastPath:
    """Wire replies for the common questions of one zone (one registry snapshot)."""

    __slots__ = ("_a", "_aaaa", "_ptr_head", "_ra", "_serial", "_served", "_soa", "_soa_ttl",
                 "_srv_head", "_targets", "zone")

    def __init__(self, zone: Zone) -> None:
        s = zone.settings
        self.zone = zone
        ttl = s.ttl.to_bytes(4, "big")
        self._a = b"\x00\x01\x00\x01" + ttl + b"\x00\x04"
        self._aaaa = b"\x00\x1c\x00\x01" + ttl + b"\x00\x10"
        self._srv_head = _PTR_TO_QNAME + b"\x00\x21\x00\x01" + ttl
        self._ptr_head = _PTR_TO_QNAME + b"\x00\x0c\x00\x01" + ttl
        self._ra = 0x80 if s.forwarding else 0
        self._serial = zone.registry.revision & 0xFFFFFFFF
        self._soa_ttl = s.negative_ttl
        self._soa: dict[str, _Soa | None] = {}
        self._targets: dict[tuple[str, str, int, str], _Target] = {}
        self._served: Callable[[str], str | None] = zone.served_domain

    # ------------------------------------------------------------ entry point

    def answer(self, data: bytes, udp: bool) -> Fast | None:
        """The reply to query ``data`` (a header already known to be a query's), or None."""
        counts = data[4:12]
        if counts == _QUESTION_ONLY:
            opt = False
        elif counts == _QUESTION_OPT:
            opt = True
        else:
            return None
        if data[2] & 0x78:
            return None  # an opcode other than QUERY
        end = len(data)
        labels: list[bytes] = []
        offsets: list[int] = []
        pos = 12
        while True:
            if pos >= end:
                return None
            length = data[pos]
            if length == 0:
                break
            if length > 63:
                return None  # a pointer or an unknown label type: the strict parser decides
            offsets.append(pos)
            labels.append(data[pos + 1 : pos + 1 + length])
            pos += 1 + length
        if pos > 12 + 254 or not labels:
            return None  # over 255 bytes (FORMERR), or the root
        qend = pos + 5
        if qend > end:
            return None
        qtype = (data[pos + 1] << 8) | data[pos + 2]
        if data[pos + 3 : qend] != b"\x00\x01" or qtype in (251, 252):
            return None  # not class IN, or AXFR/IXFR
        limit = 512
        if opt:
            rdata = qend + 11
            if (rdata > end or data[qend] != 0 or data[qend + 1 : qend + 3] != _OPT_TYPE
                    or data[qend + 6] != 0):
                return None  # not an OPT owned by the root, or EDNS version > 0 (BADVERS)
            if (data[qend + 9] << 8) | data[qend + 10] != end - rdata:
                return None
            if rdata != end:
                try:
                    check_options(data, rdata, end)
                except WireError:
                    return None
            size = (data[qend + 3] << 8) | data[qend + 4]
            limit = max(512, min(size, SERVER_UDP_PAYLOAD))
            tail = (b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00" if data[qend + 7] & 0x80
                    else b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00")
        elif qend != end:
            return None
        else:
            tail = b""
        joined = b".".join(labels)
        if b"\\" in joined or joined.count(b".") != len(labels) - 1:
            return None  # a label holding a dot: wire_to_key escapes it, leave it to decide()
        key = joined.lower().decode("latin-1")
        out = self._decide(data, labels, offsets, qend, qtype, key, tail)
        if out is None or (udp and len(out[0]) > limit):
            return None  # the dnslib path truncates, the same way
        return out[0], qtype, out[1], out[2]

    # ------------------------------------------------------------ policy (Zone's order)

    def _decide(self, data: bytes, labels: list[bytes], offsets: list[int], qend: int,
                qtype: int, key: str, tail: bytes) -> _Reply | None:
        zone = self.zone
        domain = self._served(key)
        if domain is not None:
            if key == domain or not zone.loaded:
                return None
            found = zone.find_service(key, domain)
            if found is not None:
                return self._service(data, labels, offsets, qend, qtype, key, found[0],
                                     domain, domain, tail)
            rcode = RCODE_NOERROR if zone.is_ent(key, domain) else RCODE_NXDOMAIN
            return self._negative(data, labels, offsets, qend, domain, rcode, tail)
        reg = zone.registry
        svc_key = reg.hostnames.get(key)
        if svc_key is not None:
            # A host name outside the served domains is its own tiny zone.
            return self._service(data, labels, offsets, qend, qtype, key,
                                 reg.services[svc_key], key, zone.settings.domains[0], tail)
        if qtype in (T_PTR, QTYPE_ANY):
            if key.endswith(".in-addr.arpa"):
                return self._ptr(data, labels, offsets, qend, key, _ipv4(key), True, tail)
            if key.endswith(".ip6.arpa"):
                return self._ptr(data, labels, offsets, qend, key, _ipv6(key), False, tail)
        return None

    # ------------------------------------------------------------ replies

    def _header(self, data: bytes, rcode: int, an: int, ns: int, ar: int) -> bytes:
        # QR, AA, RD copied; RA when forwarding; CD copied; opcode is QUERY (0).
        return _HEADER(data[:2], 0x84 | (data[2] & 0x01), self._ra | (data[3] & 0x10) | rcode,
                       1, an, ns, ar)

    def _service(self, data: bytes, labels: list[bytes], offsets: list[int], qend: int,
                 qtype: int, key: str, svc: Service, apex: str, domain: str,
                 tail: bytes) -> _Reply | None:
        ar = 1 if tail else 0
        if qtype == T_A:
            return (b"".join((self._header(data, 0, 1, 0, ar), data[12:qend], _PTR_TO_QNAME,
                              self._a, svc.vip.to_bytes(4, "big"), tail)), 0, key)
        vip6 = svc.vip6
        if qtype == T_AAAA and vip6 is not None:
            return (b"".join((self._header(data, 0, 1, 0, ar), data[12:qend], _PTR_TO_QNAME,
                              self._aaaa, vip6.to_bytes(16, "big"), tail)), 0, key)
        if qtype == QTYPE_ANY:
            if vip6 is None:
                return (b"".join((self._header(data, 0, 1, 0, ar), data[12:qend],
                                  _PTR_TO_QNAME, self._a, svc.vip.to_bytes(4, "big"), tail)),
                        0, key)
            return (b"".join((self._header(data, 0, 2, 0, ar), data[12:qend], _PTR_TO_QNAME,
                              self._a, svc.vip.to_bytes(4, "big"), _PTR_TO_QNAME, self._aaaa,
                              vip6.to_bytes(16, "big"), tail)), 0, key)
        if qtype == T_SRV:
            target = self._target(svc, domain)
            # The additional records are owned by the target: the first written as
            # dnslib compresses it against the question, the second pointing at it.
            owner, at = target.name.after_question(labels, offsets)
            if at < 0:
                # Where the first additional record starts: right after the SRV record.
                at = qend + len(self._srv_head) + len(target.srv)
            parts = [self._header(data, 0, 1, 0, (2 if vip6 is not None else 1) + ar),
                     data[12:qend], self._srv_head, target.srv, owner, self._a,
                     svc.vip.to_bytes(4, "big")]
            if vip6 is not None:
                parts += ((0xC000 | at).to_bytes(2, "big"), self._aaaa, vip6.to_bytes(16, "big"))
            parts.append(tail)
            return b"".join(parts), 0, key
        return self._negative(data, labels, offsets, qend, apex, RCODE_NOERROR, tail)

    def _negative(self, data: bytes, labels: list[bytes], offsets: list[int], qend: int,
                  apex: str, rcode: int, tail: bytes) -> _Reply | None:
        if apex in self._soa:
            soa = self._soa[apex]
        else:
            # An apex ending in the RNAME's last label would share it: left to dnslib.
            soa = None if apex.rsplit(".", 1)[-1] == "invalid" else \
                _Soa(apex, self._serial, self._soa_ttl)
            self._soa[apex] = soa
        if soa is None:
            return None
        owner, at = soa.name.after_question(labels, offsets)
        if at < 0:
            at = qend
        return (b"".join((self._header(data, rcode, 0, 1, 1 if tail else 0), data[12:qend],
                          owner, soa.rest, (0xC000 | at).to_bytes(2, "big"), soa.tail, tail)),
                rcode, None)

    def _ptr(self, data: bytes, labels: list[bytes], offsets: list[int], qend: int, key: str,
             address: int | None, v4: bool, tail: bytes) -> _Reply | None:
        if address is None:
            return None
        reg = self.zone.registry
        svc_key = (reg.by_vip4 if v4 else reg.by_vip6).get(address)
        if svc_key is None:
            return None
        target = self._target(reg.services[svc_key], self.zone.settings.domains[0])
        name, _ = target.name.after_question(labels, offsets)
        return (b"".join((self._header(data, 0, 1, 0, 1 if tail else 0), data[12:qend],
                          self._ptr_head, len(name).to_bytes(2, "big"), name, tail)), 0, key)

    def _target(self, svc: Service, domain: str) -> _Target:
        tkey = (svc.name, svc.namespace, svc.port, domain)
        target = self._targets.get(tkey)
        if target is None:
            target = self._targets[tkey] = _Target(svc, domain)
        return target


def _ipv4(key: str) -> int | None:
    """The address of ``d.c.b.a.in-addr.arpa`` (strict octets, as Zone reads them)."""
    parts = key.split(".")
    if len(parts) != 6:
        return None
    address = 0
    for part in parts[3::-1]:
        octet = octet_label(part)
        if octet is None:
            return None
        address = (address << 8) | octet
    return address


def _ipv6(key: str) -> int | None:
    """The address of a full 32-nibble ``….ip6.arpa`` name."""
    parts = key.split(".")
    if len(parts) != 34:
        return None
    digits = "".join(parts[31::-1])
    if len(digits) != 32 or digits.strip(_HEX):
        return None  # a label longer than one character, or not a lower-case hex digit
    return int(digits, 16)
