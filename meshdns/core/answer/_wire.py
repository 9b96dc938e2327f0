"""Strict parsing of DNS queries from wire bytes (RFC 1035, RFC 6891).

Only what answering needs is decoded: the header, the single question with its
labels in their original case, and the OPT record. Every other record is walked
and checked for framing but not decoded. Errors are typed so the caller can
choose between silence (no readable header) and FORMERR (anything else).

Wire names are tuples of raw label bytes, the way they arrive in a query, so the
question's exact case can be echoed back; ``wire_to_key`` turns them into the
lower-case dotted key the registry's names are written in.
"""

from __future__ import annotations

from dataclasses import dataclass

QTYPE_OPT = 41
OPTION_NSID, OPTION_EDE = 3, 15  # EDNS options: NSID (RFC 5001), Extended DNS Error (RFC 8914)
# Extended DNS Error info codes meshdns sends (RFC 8914 section 4).
EDE_STALE_ANSWER, EDE_PROHIBITED, EDE_NOT_READY, EDE_STALE_NXDOMAIN = 3, 18, 14, 19
EDE_NOT_AUTHORITATIVE, EDE_NOT_SUPPORTED, EDE_NO_REACHABLE_AUTHORITY, EDE_NETWORK_ERROR = \
    20, 21, 22, 23
QTYPE_IXFR = 251
QTYPE_AXFR = 252
QTYPE_ANY = 255
QCLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16
RCODE_NAMES = {RCODE_NOERROR: "NOERROR", RCODE_FORMERR: "FORMERR", RCODE_SERVFAIL: "SERVFAIL",
               RCODE_NXDOMAIN: "NXDOMAIN", RCODE_NOTIMP: "NOTIMP", RCODE_REFUSED: "REFUSED",
               RCODE_BADVERS: "BADVERS"}

HEADER_LEN = 12
MAX_WIRE_NAME = 255
MIN_UDP_PAYLOAD = 512


def rcode_name(rcode: int) -> str:
    """The mnemonic of ``rcode`` (its number for one without a name here)."""
    return RCODE_NAMES.get(rcode, str(rcode))


class WireError(Exception):
    """The message cannot be answered as a normal query."""


class ShortHeader(WireError):
    """Fewer than 12 bytes: nothing to echo, so no reply at all."""


class FormatError(WireError):
    """The header is readable but the rest is not: answered with FORMERR."""


class BadQuestionCount(FormatError):
    pass


class BadName(FormatError):
    pass


class Truncated(FormatError):
    pass


class TrailingJunk(FormatError):
    pass


class BadEDNS(FormatError):
    pass


@dataclass(frozen=True, slots=True)
class Edns:
    udp_size: int
    version: int
    dnssec_ok: bool
    nsid: bool = False  # the NSID option (RFC 5001) was sent: the server's id is asked


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int  # the 16 header flag bits as sent
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    edns: Edns | None

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rd(self) -> bool:
        return bool(self.flags & 0x0100)

    @property
    def cd(self) -> bool:
        return bool(self.flags & 0x0010)


def wire_to_key(labels: tuple[bytes, ...]) -> str:
    """Lookup key for wire labels: ASCII-lower-cased, dotted, no trailing dot.

    DNS case-insensitivity is ASCII only, so lower the bytes before decoding.
    A label holding a literal dot is escaped so it can never match a name made
    of two labels.
    """
    parts = []
    for label in labels:
        text = label.lower().decode("latin-1")
        if "." in text or "\\" in text:
            text = text.replace("\\", "\\\\").replace(".", "\\.")
        parts.append(text)
    return ".".join(parts)


def key_to_labels(key: str) -> tuple[bytes, ...]:
    """Wire labels for a normalized name (only for names the core built itself)."""
    if not key:
        return ()
    return tuple(part.encode("ascii") for part in key.split("."))


def read_name(data: bytes, pos: int, allow_pointers: bool) -> tuple[tuple[bytes, ...], int]:
    """Labels of the name at ``pos`` and the offset just past it.

    With ``allow_pointers`` a compression pointer ends the name (its target is
    not followed: only framing matters outside the question).
    """
    labels: list[bytes] = []
    wire_len = 1
    end = len(data)
    while True:
        if pos >= end:
            raise Truncated("name runs past the end of the message")
        length = data[pos]
        if length == 0:
            return tuple(labels), pos + 1
        if length & 0xC0:
            if length & 0xC0 != 0xC0:
                raise BadName("unknown label type")
            if not allow_pointers:
                raise BadName("compression pointer in the question")
            if pos + 2 > end:
                raise Truncated("compression pointer cut short")
            return tuple(labels), pos + 2
        wire_len += length + 1
        if wire_len > MAX_WIRE_NAME:
            raise BadName("name longer than 255 bytes")
        if pos + 1 + length > end:
            raise Truncated("label runs past the end of the message")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length


def parse_query(data: bytes) -> Query:
    """Decode a query. Raises ShortHeader or a FormatError subclass."""
    if len(data) < HEADER_LEN:
        raise ShortHeader("message shorter than a DNS header")
    qid = (data[0] << 8) | data[1]
    flags = (data[2] << 8) | data[3]
    qdcount = (data[4] << 8) | data[5]
    ancount = (data[6] << 8) | data[7]
    nscount = (data[8] << 8) | data[9]
    arcount = (data[10] << 8) | data[11]
    if qdcount != 1:
        raise BadQuestionCount(f"QDCOUNT is {qdcount}, not 1")
    labels, pos = read_name(data, HEADER_LEN, allow_pointers=False)
    if pos + 4 > len(data):
        raise Truncated("question type and class cut short")
    qtype = (data[pos] << 8) | data[pos + 1]
    qclass = (data[pos + 2] << 8) | data[pos + 3]
    pos += 4
    edns: Edns | None = None
    for section, count in ((0, ancount), (1, nscount), (2, arcount)):
        for _ in range(count):
            owner_at = pos
            owner, pos = read_name(data, pos, allow_pointers=True)
            if pos + 10 > len(data):
                raise Truncated("record header cut short")
            rtype = (data[pos] << 8) | data[pos + 1]
            rclass = (data[pos + 2] << 8) | data[pos + 3]
            rdlen = (data[pos + 8] << 8) | data[pos + 9]
            rdata_at = pos + 10
            pos = rdata_at + rdlen
            if pos > len(data):
                raise Truncated("record data cut short")
            if rtype != QTYPE_OPT:
                continue
            if section != 2 or edns is not None or owner or pos - rdlen - 10 != owner_at + 1:
                raise BadEDNS("OPT must be one record, owned by the root, in the additional section")
            nsid = check_options(data, rdata_at, pos)
            edns = Edns(
                udp_size=max(rclass, MIN_UDP_PAYLOAD),
                version=data[rdata_at - 5],
                dnssec_ok=bool(data[rdata_at - 4] & 0x80),
                nsid=nsid,
            )
    if pos != len(data):
        raise TrailingJunk(f"{len(data) - pos} bytes after the last record")
    return Query(qid, flags, labels, qtype, qclass, edns)


def check_options(data: bytes, pos: int, end: int) -> bool:
    """Raise BadEDNS unless the OPT RDATA in data[pos:end] is a clean run of options;
    True when one of them is NSID (RFC 5001)."""
    nsid = False
    while pos < end:
        if pos + 4 > end:
            raise BadEDNS("EDNS option header cut short")
        if data[pos] == 0 and data[pos + 1] == OPTION_NSID:
            nsid = True
        length = (data[pos + 2] << 8) | data[pos + 3]
        pos += 4 + length
        if pos > end:
            raise BadEDNS("EDNS option runs past the OPT record")
    return nsid


def question_end(data: bytes) -> int | None:
    """Offset just past the first question, if it parses (for echoing it in errors)."""
    try:
        _, pos = read_name(data, HEADER_LEN, allow_pointers=False)
    except WireError:
        return None
    return pos + 4 if pos + 4 <= len(data) else None


def error_reply(data: bytes, rcode: int, echo_question: bool) -> bytes:
    """A header-only (or header + question) reply with ``rcode``, echoing ID, opcode, RD, CD.

    Used for FORMERR and NOTIMP, where the message could not be fully decoded.
    """
    flags_hi = 0x80 | (data[2] & 0x79)  # QR + opcode + RD
    flags_lo = (data[3] & 0x10) | (rcode & 0x0F)  # CD + rcode
    qd_end = question_end(data) if echo_question and data[4:6] == b"\x00\x01" else None
    if qd_end is None:
        return data[:2] + bytes((flags_hi, flags_lo)) + b"\x00" * 8
    return (data[:2] + bytes((flags_hi, flags_lo)) + b"\x00\x01" + b"\x00" * 6
            + data[HEADER_LEN:qd_end])
