"""Names pre-encoded for the wire fast path (_fastpath.py), written as dnslib writes them.

dnslib compresses a name against every suffix of the names it wrote before,
byte for byte (so in the question's letter case). In the replies the fast path
writes, those are the question's name and nothing else (an SRV target goes out
uncompressed and is not remembered), except that the second additional record
of an SRV reply points at the first one's owner. So compressing against the
question's suffixes is all there is to it.
"""

from __future__ import annotations

import struct

from ..registry import Service
from ._zone import SOA_EXPIRE, SOA_REFRESH, SOA_RETRY, SOA_RNAME

PTR_TO_QNAME = b"\xc0\x0c"  # a compression pointer to the question's name


class EncodedName:
    """A name the reply writes, pre-encoded: its labels and its wire form."""

    __slots__ = ("labels", "wire")

    def __init__(self, labels: tuple[bytes, ...], wire: bytes) -> None:
        self.labels = labels
        self.wire = wire

    @classmethod
    def of(cls, text: str) -> EncodedName:
        labels = tuple(text.encode("ascii").split(b"."))
        return cls(labels, b"".join([bytes((len(label),)) + label for label in labels]) + b"\x00")

    def after_question(self, data: bytes, qend: int) -> tuple[bytes, int]:
        """This name, written when only the question's name precedes it.

        As dnslib's compressor: the longest suffix equal (byte for byte, so in
        the question's case) to a suffix of the question becomes a pointer. Also
        says where the whole name can then be pointed at (-1: where it is written).
        """
        if data[12 : qend - 4] == self.wire:
            return PTR_TO_QNAME, 12  # the question's name itself, in the same case
        last = self.labels[-1]
        if data[qend - 5 - len(last) : qend - 5] != last:
            return self.wire, -1  # the last labels differ: nothing in common
        qlabels = question_labels(data)
        labels = self.labels
        n, m = len(labels), len(qlabels)
        k = 0
        while k < n and k < m and labels[n - 1 - k] == qlabels[m - 1 - k]:
            k += 1
        if k == 0:
            return self.wire, -1
        at = 12 + (m - k) + sum(map(len, qlabels[: m - k]))  # that suffix, in the question
        pointer = (0xC000 | at).to_bytes(2, "big")
        if k == n:
            return pointer, at
        head = (n - k) + sum(map(len, labels[: n - k]))
        return self.wire[:head] + pointer, -1

    def suffixes(self) -> list[tuple[bytes, int]]:
        """(wire form of each suffix, bytes before it), longest first."""
        out = []
        head = 0
        for label in self.labels:
            out.append((self.wire[head:], head))
            head += 1 + len(label)
        return out


def question_labels(data: bytes) -> list[bytes]:
    """The labels of the question's name (a name the caller already walked)."""
    labels = []
    pos = 12
    length = data[pos]
    while length:
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
        length = data[pos]
    return labels


class NegativeSoa:
    """The SOA of one apex for a negative answer, minus its owner and MNAME."""

    __slots__ = ("name", "rest", "suffixes", "tail")

    def __init__(self, apex: str, serial: int, negative_ttl: int) -> None:
        self.name = EncodedName.of(apex)
        self.suffixes = self.name.suffixes()
        rname = EncodedName.of(SOA_RNAME).wire
        rdata_len = 2 + len(rname) + 20  # MNAME as a pointer, RNAME, five numbers
        self.rest = (b"\x00\x06\x00\x01" + negative_ttl.to_bytes(4, "big")
                     + rdata_len.to_bytes(2, "big"))
        self.tail = rname + struct.pack(">IIIII", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE,
                                        negative_ttl)

    def owner(self, data: bytes, qend: int) -> tuple[bytes, int]:
        """The apex as ``EncodedName.after_question`` writes it. The question's name ends in
        the apex, letter case aside, so its last labels have the apex's lengths:
        comparing the bytes at its end with an apex suffix compares whole labels."""
        qname_end = qend - 4
        for suffix, head in self.suffixes:
            if data.startswith(suffix, qname_end - len(suffix)):
                at = qname_end - len(suffix)
                pointer = (0xC000 | at).to_bytes(2, "big")
                return (pointer, at) if head == 0 else (self.name.wire[:head] + pointer, -1)
        return self.name.wire, -1


class Target:
    """A service's canonical name in one domain: the SRV target and the PTR name."""

    __slots__ = ("name", "ptr", "same_case", "srv")

    def __init__(self, svc: Service, domain: EncodedName) -> None:
        # canonical_name(svc.name, svc.namespace, svc.port, domain), as labels.
        name, ns = svc.name.encode("ascii"), svc.namespace.encode("ascii")
        port = b"%d" % svc.port
        wire = (b"%c%s%c%s\x03svc%c%s" % (len(name), name, len(ns), ns, len(port), port)
                + domain.wire)
        self.name = EncodedName((name, ns, b"svc", port, *domain.labels), wire)
        # SRV 0 100 <port> <target>; dnslib writes the target uncompressed (RFC 2782).
        rdata = b"\x00\x00\x00\x64" + svc.port.to_bytes(2, "big") + wire
        self.srv = len(rdata).to_bytes(2, "big") + rdata
        # PTR RDATA (length + name) when nothing of it compresses against the question.
        self.ptr = len(wire).to_bytes(2, "big") + wire
        # The SRV reply after the question when the question is this very name, in
        # this case (the common SRV question), for one service object and one record
        # head (TTL): (service, head, bytes). Set by the fast path when first needed.
        self.same_case: tuple[Service, bytes, bytes] | None = None
