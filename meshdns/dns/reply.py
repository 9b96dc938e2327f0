"""Upstream queries and replies on the wire: build, check (RFC 5452), parse and scrub.

A reply is parsed whole before anything is cached or sent: every name, owner
and in rdata (compression pointers followed, backwards only, a bounded number of
hops), every record's framing. What does not parse is ``ReplyRejected(MALFORMED)``.

Then it is scrubbed (scrub.py: the question's chain, of its type, and what
belongs to it in authority and additional; ``owned`` cuts the chain at our own
names); what was dropped is counted by reason in ``ParsedReply.dropped``.

A clean reply (the common case: nothing dropped, OPT last) keeps its bytes; one
with drops is re-encoded without compression. The commonest of all, a NOERROR
whose every answer record sits at a pointer to the question's name with the
question's type and no names in its rdata, nothing in authority, at most the OPT
in additional (``_plain``), is read in one pass without record tuples or the
scrub walk: it checks the same framing, and scrubbing would keep all of it. We keep the offset of every TTL
(to count them down when the cached reply is served later) and the cacheable
lifetime (RFC 2308 for negative answers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..core.answer import HEADER_LEN, QTYPE_OPT, RCODE_NOERROR, RCODE_NXDOMAIN, Query, WireError
from .scrub import (
    END,
    START,
    T_CNAME,
    T_DNAME,
    T_MX,
    T_NS,
    T_PTR,
    T_SOA,
    T_SRV,
    TTL_AT,
    Owned,
    Record,
    scrub,
)

UPSTREAM_UDP_PAYLOAD = 1232  # what we advertise upstream (DNS flag day 2020)
MAX_CACHE_TTL = 86400  # like unbound's cache-max-ttl
_MAX_HOPS = 127  # compression pointers followed per name (a name has at most 127 labels)
# Types whose rdata holds names a server may compress (RFC 3597 §4; SRV by habit):
# bytes before the first name, names, fixed bytes after them.
_NAMES_IN_RDATA = {T_NS: (0, 1, 0), T_CNAME: (0, 1, 0), T_PTR: (0, 1, 0),
                   T_DNAME: (0, 1, 0), T_MX: (2, 1, 0), T_SRV: (6, 1, 0), T_SOA: (0, 2, 20)}

_OPT_UPSTREAM = struct.pack("!BHHBBHH", 0, QTYPE_OPT, UPSTREAM_UDP_PAYLOAD, 0, 0, 0, 0)
_OPT_UPSTREAM_DO = struct.pack("!BHHBBHH", 0, QTYPE_OPT, UPSTREAM_UDP_PAYLOAD, 0, 0, 0x8000, 0)
# A query's header after the ID, by CD: flags RD (and CD), one question, one OPT.
_HEADS = {cd: struct.pack("!HHHHH", 0x0100 | (0x0010 if cd else 0), 1, 0, 0, 1)
          for cd in (False, True)}


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


def query_tail(question: bytes, cd: bool, dnssec_ok: bool) -> bytes:
    """An upstream query after its ID: RD=1, the client's CD, one question, OPT with a
    1232 payload (the pool socket puts a random ID in front)."""
    return _HEADS[cd] + question + (_OPT_UPSTREAM_DO if dnssec_ok else _OPT_UPSTREAM)


def build_query(question: bytes, qid: int, cd: bool, dnssec_ok: bool) -> bytes:
    """An upstream query with ID ``qid`` (see :func:`query_tail`)."""
    return qid.to_bytes(2, "big") + query_tail(question, cd, dnssec_ok)


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
    """An upstream reply, scrubbed, minus its OPT, with what caching needs to know."""

    wire: bytes  # header + question + kept records, OPT removed, counts adjusted
    rcode: int  # including the extended bits from OPT
    qend: int  # offset just past the question
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    lifetime: int  # seconds it may be served from cache; 0 means not at all
    negative: bool = False  # NXDOMAIN or NODATA (bounded by dns.cache_negative_*)
    dropped: dict[str, int] | None = None  # records scrubbed away, by reason
    # ``wire`` already carries ``ttls`` at ``ttl_offsets`` (no TTL was capped or set from
    # the SOA): the cache serves it at age 0 without writing them in again.
    ttls_on_wire: bool = False


def parse_reply(reply: bytes, question_len: int, owned: Owned | None = None) -> ParsedReply:
    """Parse and scrub an already checked reply. Raises ReplyRejected(MALFORMED) when
    any part of it does not parse (bad framing, bad or looping compression pointers)."""
    try:
        return _parse(reply, question_len, owned)
    except (WireError, IndexError, struct.error):
        raise ReplyRejected(MALFORMED) from None


def _expand(wire: bytes, pos: int, memo: dict[int, tuple[bytes, int]]) -> tuple[bytes, int]:
    """The name at ``pos`` uncompressed (its case kept) and the offset just past it.

    Pointers must point backwards and are followed at most ``_MAX_HOPS`` times, so a
    loop ends. ``memo`` maps offsets already expanded to (name, end): a pointer to
    one of them (the question, a name before) costs a dict lookup."""
    start = pos
    parts: list[bytes] = []
    end = -1
    hops = 0
    size = 1  # the name's length so far, with its final zero
    while True:
        length = wire[pos]
        if length >= 0xC0:
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if end < 0:
                end = pos + 2
            hops += 1
            if target >= pos or hops > _MAX_HOPS:
                raise ReplyRejected(MALFORMED)  # a forward pointer, or a loop
            known = memo.get(target)
            if known is not None:
                parts.append(known[0])
                break
            pos = target
            continue
        if length == 0:
            parts.append(b"\x00")
            if end < 0:
                end = pos + 1
            break
        if length & 0xC0:
            raise ReplyRejected(MALFORMED)  # unknown label type
        nxt = pos + 1 + length
        size += 1 + length
        if nxt > len(wire) or size > 255:
            raise ReplyRejected(MALFORMED)  # past the end, or longer than a name can be
        parts.append(wire[pos:nxt])
        pos = nxt
    name = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(name) > 255:  # a known suffix made it too long
        raise ReplyRejected(MALFORMED)
    memo[start] = (name, end)
    return name, end


def _parse(reply: bytes, question_len: int, owned: Owned | None) -> ParsedReply:
    ancount, nscount, arcount = struct.unpack_from("!HHH", reply, 6)
    qdcount = (reply[4] << 8) | reply[5]
    pos = HEADER_LEN + (question_len if qdcount else 0)
    qend = pos
    size = len(reply)
    if pos > size:
        raise ReplyRejected(MALFORMED)
    rcode = reply[3] & 0xF
    if qdcount and ancount and not nscount and arcount <= 1 and not rcode:
        plain = _plain(reply, qend, ancount, arcount)
        if plain is not None:
            return plain
    memo: dict[int, tuple[bytes, int]] = {}
    qname = reply[HEADER_LEN:qend - 4]
    qkey = qname.lower()
    # Names a pointer may point to, already expanded: (as written, lower case).
    # Most owners are a pointer to the question, or to the target of a CNAME.
    pointed: dict[int, tuple[bytes, bytes]] = {}
    if qdcount:  # checked by check_reply: our question, uncompressed; and its suffixes
        pointed[HEADER_LEN] = (qname, qkey)
        at = 0
        while qname[at]:
            memo[HEADER_LEN + at] = (qname[at:], qend - 4)
            at += 1 + qname[at]
    records: list[Record] = []
    opt: Record | None = None
    unpack = struct.unpack_from
    layouts = _NAMES_IN_RDATA
    for section, count in ((0, ancount), (1, nscount), (2, arcount)):
        for _ in range(count):
            start = pos
            first = reply[pos]
            known = pointed.get(((first & 0x3F) << 8) | reply[pos + 1]) \
                if first >= 0xC0 else None
            if known is not None:
                owner, key = known
                pos += 2
            elif first == 0:
                owner = key = b"\x00"
                pos += 1
            else:
                owner, pos = _expand(reply, pos, memo)
                key = owner.lower()
            rtype, ttl, rdlen = unpack("!H2xIH", reply, pos)
            rstart = pos + 10
            end = rstart + rdlen
            if end > size:
                raise ReplyRejected(MALFORMED)
            names = target = b""
            layout = layouts.get(rtype)
            if layout is not None:
                before, count_names, after = layout
                at = rstart + before
                parts = [reply[rstart:at]]
                for _n in range(count_names):
                    name_at = at
                    name, at = _expand(reply, at, memo)
                    parts.append(name)
                    if not target:
                        target = name.lower()
                        pointed[name_at] = (name, target)
                if at + after != end:
                    raise ReplyRejected(MALFORMED)
                parts.append(reply[at:end])
                names = b"".join(parts)
            record = (section, start, owner, key, rtype, ttl, pos + 4, end, names, target)
            pos = end
            if rtype == QTYPE_OPT:
                if section != 2 or opt is not None or owner != b"\x00":
                    raise ReplyRejected(MALFORMED)
                opt = record
                rcode |= reply[pos - rdlen - 6] << 4  # extended rcode bits
                continue
            records.append(record)
    if pos != size:
        raise ReplyRejected(MALFORMED)
    qtype = (reply[qend - 4] << 8) | reply[qend - 3]
    kept, dropped = scrub(reply, qkey, qtype, records, owned) if qdcount else (records, None)
    if dropped is None and (opt is None or opt[END] == size):
        wire = reply
        if opt is not None:
            # Only the OPT goes, and it is last: cutting it moves nothing a pointer
            # could point to. The common case, and it costs a slice.
            wire = b"".join((reply[:10], (arcount - 1).to_bytes(2, "big"),
                             reply[12:opt[START]]))
        offsets = [r[TTL_AT] for r in kept]
    else:
        wire, offsets = _rebuild(reply, qend, kept)
    return _lifetimes(wire, rcode, qend, kept, offsets, dropped, reply)


_RR_AT_QNAME = struct.Struct("!HHHIH")  # owner (a pointer), type, class, TTL, rdlength


def _plain(reply: bytes, qend: int, ancount: int, arcount: int) -> ParsedReply | None:
    """The common reply, read in one pass: NOERROR, every answer record owned by a
    pointer to the question's name and of the question's type (one whose rdata holds
    no names), nothing in authority, at most the OPT in additional, last. Scrubbing
    keeps all of it, so it is the reply minus its OPT. None: anything else (the full
    walk decides, and rejects what is malformed)."""
    qtype = (reply[qend - 4] << 8) | reply[qend - 3]
    if qtype in _NAMES_IN_RDATA or qtype == QTYPE_OPT:
        return None
    size = len(reply)
    unpack = _RR_AT_QNAME.unpack_from
    pos = qend
    offsets: list[int] = []
    ttls: list[int] = []
    lifetime = MAX_CACHE_TTL
    on_wire = True
    try:
        for _ in range(ancount):
            owner, rtype, _rclass, ttl, rdlen = unpack(reply, pos)
            if owner != 0xC00C or rtype != qtype:
                return None
            offsets.append(pos + 6)
            pos += 12 + rdlen
            if ttl >= MAX_CACHE_TTL:
                ttl = 0 if ttl & 0x80000000 else MAX_CACHE_TTL  # RFC 2181 §8
                on_wire = False
            ttls.append(ttl)
            if ttl < lifetime:
                lifetime = ttl
        if arcount:
            # The OPT: root owner, type 41, its rdata ending the message; no extended rcode.
            if (pos + 11 > size or reply[pos] or reply[pos + 1] or reply[pos + 2] != QTYPE_OPT
                    or reply[pos + 5] or pos + 11 + ((reply[pos + 9] << 8) | reply[pos + 10])
                    != size):
                return None
            wire = b"".join((reply[:10], b"\x00\x00", reply[12:pos]))
        elif pos == size:
            wire = reply
        else:
            return None
    except struct.error:
        return None
    if pos > size:
        return None
    return ParsedReply(wire, RCODE_NOERROR, qend, tuple(offsets), tuple(ttls), lifetime,
                       False, None, on_wire)


def _rebuild(reply: bytes, qend: int, kept: list[Record]) -> tuple[bytes, list[int]]:
    """Header, question and ``kept`` without compression; the counts set to match."""
    out = bytearray(reply[:qend])
    counts = [0, 0, 0]
    offsets: list[int] = []
    for section, _start, owner, _key, _type, _ttl, ttl_at, end, names, _target in kept:
        counts[section] += 1
        rdata = names or reply[ttl_at + 6:end]
        out += owner
        offsets.append(len(out) + 4)
        out += reply[ttl_at - 4:ttl_at + 4]  # type, class, TTL as written
        out += len(rdata).to_bytes(2, "big") + rdata
    if len(out) > 65535:
        raise ReplyRejected(MALFORMED)
    struct.pack_into("!HHH", out, 6, *counts)
    return bytes(out), offsets


def _lifetimes(wire: bytes, rcode: int, qend: int, kept: list[Record], offsets: list[int],
               dropped: dict[str, int] | None, reply: bytes) -> ParsedReply:
    ttls: list[int] = []
    lifetime = MAX_CACHE_TTL  # answer + authority TTLs bound a positive answer's lifetime
    answer_ttl = MAX_CACHE_TTL  # and a negative one's, with the SOA
    answers = 0
    soa_ttl = -1
    soa_index = -1
    on_wire = True
    for section, _start, _owner, _key, rtype, ttl, ttl_at, end, _names, _target in kept:
        if ttl >= MAX_CACHE_TTL:
            ttl = 0 if ttl & 0x80000000 else MAX_CACHE_TTL  # RFC 2181 §8
            on_wire = False
        ttls.append(ttl)
        if section == 0:
            answers += 1
            if ttl < answer_ttl:
                answer_ttl = ttl
        if section < 2 and ttl < lifetime:
            lifetime = ttl
        if section == 1 and rtype == T_SOA and soa_ttl < 0 and end - ttl_at >= 28:
            minimum = struct.unpack_from("!I", reply, end - 4)[0]
            soa_ttl = min(ttl, minimum)
            soa_index = len(ttls) - 1
    negative = rcode == RCODE_NXDOMAIN or (rcode == RCODE_NOERROR and answers == 0)
    if rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        lifetime = 0  # failures are cached by the forwarder, briefly, not here
    elif negative:
        # RFC 2308 §5: min(SOA TTL, SOA MINIMUM), and the SOA is served with that
        # TTL; a CNAME chain in front of it bounds it too. No SOA: not cached.
        lifetime = min(soa_ttl, answer_ttl) if soa_ttl >= 0 else 0
        if soa_ttl >= 0 and ttls[soa_index] != soa_ttl:
            ttls[soa_index] = soa_ttl
            on_wire = False
    return ParsedReply(wire, rcode, qend, tuple(offsets), tuple(ttls), lifetime, negative,
                       dropped, on_wire)
