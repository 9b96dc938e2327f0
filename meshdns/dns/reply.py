"""Upstream queries and replies on the wire: build, check (RFC 5452), walk for TTLs.

Only what forwarding and caching need is decoded. A reply is walked record by
record for framing; we keep the offset of every TTL (to count them down when
the cached reply is served later), the cacheable lifetime (RFC 2308 for
negative answers) and the reply with its OPT record removed (the client gets
an OPT of our own, or none when it sent none).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..core.wire import (
    HEADER_LEN,
    QTYPE_OPT,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    Query,
    WireError,
    read_name,
)

UPSTREAM_UDP_PAYLOAD = 1232  # what we advertise upstream (DNS flag day 2020)
MAX_CACHE_TTL = 86400  # like unbound's cache-max-ttl
T_SOA = 6

_OPT_UPSTREAM = struct.pack("!BHHBBHH", 0, QTYPE_OPT, UPSTREAM_UDP_PAYLOAD, 0, 0, 0, 0)
_OPT_UPSTREAM_DO = struct.pack("!BHHBBHH", 0, QTYPE_OPT, UPSTREAM_UDP_PAYLOAD, 0, 0, 0x8000, 0)


class ReplyRejected(Exception):
    """A datagram that is not the answer to our query: dropped and counted by ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


WRONG_ID, WRONG_QUESTION, MALFORMED = "wrong_id", "wrong_question", "malformed"


def question_wire(query: Query) -> bytes:
    """The question section exactly as the client sent it (name, type, class)."""
    out = bytearray()
    for label in query.labels:
        out.append(len(label))
        out += label
    out += b"\x00"
    out += struct.pack("!HH", query.qtype, query.qclass)
    return bytes(out)


def build_query(question: bytes, qid: int, cd: bool, dnssec_ok: bool) -> bytes:
    """An upstream query: RD=1, the client's CD, one question, OPT with a 1232 payload."""
    flags = 0x0100 | (0x0010 if cd else 0)
    return (struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1) + question
            + (_OPT_UPSTREAM_DO if dnssec_ok else _OPT_UPSTREAM))


def check_reply(reply: bytes, sent: bytes, question: bytes) -> None:
    """Raise ReplyRejected unless ``reply`` answers ``sent`` (same ID and question).

    The source address and port are checked by the kernel: every upstream query
    uses its own connected socket, which only receives from the upstream's address.
    A reply with an error rcode and no question is accepted (it carries no data,
    only the signal to try the next upstream).
    """
    if len(reply) < HEADER_LEN:
        raise ReplyRejected(MALFORMED)
    if reply[0] != sent[0] or reply[1] != sent[1]:
        raise ReplyRejected(WRONG_ID)
    if not reply[2] & 0x80 or (reply[2] >> 3) & 0xF:
        raise ReplyRejected(MALFORMED)  # not a response, or another opcode
    qdcount = (reply[4] << 8) | reply[5]
    if qdcount == 0 and reply[3] & 0xF not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        return
    # The name may come back in another case (0x20); type and class must be ours byte
    # for byte: case-folding them would take type 97 ("a") for 65 ("A", HTTPS).
    name_end = HEADER_LEN + len(question) - 4
    if (qdcount != 1 or reply[HEADER_LEN:name_end].lower() != question[:-4].lower()
            or reply[name_end:name_end + 4] != question[-4:]):
        raise ReplyRejected(WRONG_QUESTION)


def reply_rcode(reply: bytes) -> int:
    return reply[3] & 0xF


@dataclass(slots=True)
class ParsedReply:
    """An upstream reply minus its OPT, with what caching needs to know about it."""

    wire: bytes  # header + question + records, OPT removed, ARCOUNT adjusted
    rcode: int  # including the extended bits from OPT
    qend: int  # offset just past the question
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    lifetime: int  # seconds it may be served from cache; 0 means not at all


def parse_reply(reply: bytes, question_len: int) -> ParsedReply:
    """Walk an already checked reply. Raises ReplyRejected(MALFORMED) on bad framing."""
    try:
        return _parse(reply, question_len)
    except (WireError, IndexError, struct.error):
        raise ReplyRejected(MALFORMED) from None


def _parse(reply: bytes, question_len: int) -> ParsedReply:
    ancount, nscount, arcount = struct.unpack_from("!HHH", reply, 6)
    qdcount = (reply[4] << 8) | reply[5]
    pos = HEADER_LEN + (question_len if qdcount else 0)
    qend = pos
    if pos > len(reply):
        raise ReplyRejected(MALFORMED)
    rcode = reply[3] & 0xF
    offsets: list[int] = []
    ttls: list[int] = []
    bounding: list[int] = []  # answer + authority TTLs: a positive answer's lifetime
    answer_ttls: list[int] = []
    soa_ttl: int | None = None
    soa_offset = -1
    opt: tuple[int, int] | None = None
    for section, count in ((0, ancount), (1, nscount), (2, arcount)):
        for _ in range(count):
            start = pos
            _, pos = read_name(reply, pos, allow_pointers=True)
            rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", reply, pos)
            ttl_at = pos + 4
            pos += 10 + rdlen
            if pos > len(reply):
                raise ReplyRejected(MALFORMED)
            if rtype == QTYPE_OPT:
                if section != 2 or opt is not None:
                    raise ReplyRejected(MALFORMED)
                opt = (start, pos)
                rcode |= reply[ttl_at] << 4  # extended rcode bits
                continue
            ttl = 0 if ttl & 0x80000000 else min(ttl, MAX_CACHE_TTL)  # RFC 2181 §8
            offsets.append(ttl_at)
            ttls.append(ttl)
            if section < 2:
                bounding.append(ttl)
            if section == 0:
                answer_ttls.append(ttl)
            if section == 1 and rtype == T_SOA and soa_ttl is None and rdlen >= 22:
                minimum = struct.unpack_from("!I", reply, pos - 4)[0]
                soa_ttl = min(ttl, minimum)
                soa_offset = len(ttls) - 1
    if pos != len(reply):
        raise ReplyRejected(MALFORMED)
    wire = reply
    if opt is not None:
        if opt[1] != len(reply):
            # Servers put OPT last (only TSIG may follow). Cutting a record from the
            # middle would move what later compression pointers point to, so this
            # rare case pays for a re-encode without the OPT, then a fresh walk.
            again = _parse(_reencode_without_opt(reply), question_len)
            if rcode != again.rcode:
                again.rcode, again.lifetime = rcode, 0
            return again
        # Cutting the last record moves nothing a pointer could point to.
        cut = bytearray(reply[: opt[0]])
        struct.pack_into("!H", cut, 10, arcount - 1)
        wire = bytes(cut)
    negative = rcode == RCODE_NXDOMAIN or (rcode == RCODE_NOERROR and ancount == 0)
    if rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        lifetime = 0  # failures are cached by the forwarder, briefly, not here
    elif negative:
        # RFC 2308 §5: min(SOA TTL, SOA MINIMUM), and the SOA is served with that
        # TTL; a CNAME chain in front of it bounds it too. No SOA: not cached.
        lifetime = min([soa_ttl, *answer_ttls]) if soa_ttl is not None else 0
        if soa_ttl is not None:
            ttls[soa_offset] = soa_ttl
    else:
        lifetime = min(bounding) if bounding else 0
    return ParsedReply(wire, rcode, qend, tuple(offsets), tuple(ttls), lifetime)


def _reencode_without_opt(reply: bytes) -> bytes:
    from dnslib import DNSRecord

    try:
        record = DNSRecord.parse(reply)
        record.ar = [rr for rr in record.ar if rr.rtype != QTYPE_OPT]
        return bytes(record.pack())
    except Exception:  # dnslib raises several types on bad input
        raise ReplyRejected(MALFORMED) from None
