"""Reply scrubbing, as unbound's scrubber does it (``scrub.c``): of a parsed
upstream reply, a client gets only what belongs to its question.

Kept:

- answer: the CNAME chain from the question's name (one CNAME per name, at most
  ``MAX_CHAIN`` names), the records of the question's type (any type for ANY)
  at the names of that chain, their RRSIGs, and DNAMEs above a chain name;
- authority: SOA and NS records of a zone that encloses a chain name (the zone
  of a negative answer or a referral), and the DNSSEC proof records (NSEC, NSEC3,
  DS, RRSIG) inside such a zone;
- additional: glue, the A/AAAA (and RRSIG) of a kept NS target inside the NS's
  zone, or of a kept MX/SRV target (the OPT is cut by reply.py: the client gets ours).

``owned(name)`` (from the forwarder: the names the zone answers itself, mesh
names, host names, VIP PTR names; chase.owns) cuts the chain where it enters
one of our names: the CNAME to it is kept, the upstream's records for it are
not (chase.py appends our answer). Glue for such a name is dropped too.

Everything dropped is counted by reason (``SCRUB_REASONS``). Pure and
synchronous: reply.py walks the wire into ``Record`` tuples and calls ``scrub``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..core.answer import QTYPE_ANY

T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_MX, T_AAAA, T_SRV = 1, 2, 5, 6, 12, 15, 28, 33
T_DNAME, T_DS, T_RRSIG, T_NSEC, T_NSEC3 = 39, 43, 46, 47, 50
MAX_CHAIN = 16  # names in a CNAME chain we follow; a longer one is cut (chase.py: 8 links)
_AUTH_ZONE = (T_SOA, T_NS)
_AUTH_PROOF = (T_NSEC, T_NSEC3, T_DS, T_RRSIG)
_GLUE = (T_A, T_AAAA, T_RRSIG)
# Reasons a record was dropped (meshdns_forward_scrubbed_records_total{reason}).
OTHER_NAME, WRONG_TYPE, OWN_NAME = "other_name", "wrong_type", "own_name"
AUTHORITY, ADDITIONAL = "authority", "additional"
SCRUB_REASONS = (OTHER_NAME, WRONG_TYPE, OWN_NAME, AUTHORITY, ADDITIONAL)

Owned = Callable[[bytes], bool]  # a lower-case wire name -> meshdns answers it itself


def within(name: bytes, zone: bytes) -> bool:
    """``name`` is ``zone`` or below it (lower-case uncompressed wire names)."""
    cut = len(name) - len(zone)
    if cut < 0 or not name.endswith(zone):
        return False
    pos = 0
    while pos < cut:
        pos += name[pos] + 1
    return pos == cut


# One record as walked: (section, start, owner as written and uncompressed, owner in
# lower case, type, TTL, offset of the TTL (type and class before it, rdlength and rdata
# after), end, rdata with its names expanded (types whose rdata holds names, else b""), the
# first name in rdata in lower case (or b"")). Tuples: the walk is on every miss.
Record = tuple[int, int, bytes, bytes, int, int, int, int, bytes, bytes]
SECTION: Final = 0
START: Final = 1
OWNER: Final = 2
KEY: Final = 3
TYPE: Final = 4
TTL: Final = 5
TTL_AT: Final = 6
END: Final = 7
NAMES: Final = 8
TARGET: Final = 9


def scrub(reply: bytes, qname: bytes, qtype: int, records: list[Record],
           owned: Owned | None) -> tuple[list[Record], dict[str, int] | None]:
    """The records to keep (see the module doc) and what was dropped, by reason."""
    for r in records:  # the common case first: records of the question's type, and an
        section = r[SECTION]  # SOA of an enclosing zone (a negative answer)
        if section == 0:
            if r[KEY] != qname or r[TYPE] != qtype:
                break
        elif section > 1 or r[TYPE] != T_SOA or not within(qname, r[KEY]):
            break
    else:
        return records, None
    links: dict[bytes, bytes] = {}
    for r in records:
        if r[SECTION] == 0 and r[TYPE] == T_CNAME and r[KEY] not in links:
            links[r[KEY]] = r[TARGET]
    chain = [qname]
    cut = b""  # the first chain name that is ours
    name = qname
    if qtype != T_CNAME:
        while name in links and len(chain) < MAX_CHAIN:
            name = links[name]
            if name in chain:
                break  # a loop: kept as is, the forwarder answers SERVFAIL (chase.py)
            if owned is not None and owned(name):
                cut = name
                break
            chain.append(name)
    kept: list[Record] = []
    dropped: dict[str, int] | None = None
    zones: list[bytes] = []
    glue: dict[bytes, bytes] = {}  # target -> the zone it must be in (b"\x00": any)
    names = set(chain)
    linked: set[bytes] = set()
    for r in records:
        section, key, rtype = r[SECTION], r[KEY], r[TYPE]
        reason = ""
        if section == 0:
            if key in names:
                if rtype == T_CNAME:
                    # One CNAME per name: the first, which the chain followed.
                    reason = WRONG_TYPE if key in linked else ""
                    linked.add(key)
                elif not (rtype == qtype or qtype == QTYPE_ANY
                          or (rtype == T_RRSIG and _covers(reply, r, qtype))):
                    reason = WRONG_TYPE
            elif key == cut:
                reason = OWN_NAME
            elif rtype == T_DNAME and any(n != key and within(n, key) for n in chain):
                pass
            else:
                reason = OTHER_NAME
            if not reason and rtype in (T_MX, T_SRV):
                glue.setdefault(r[TARGET], b"\x00")
        elif section == 1:
            if rtype in _AUTH_ZONE and any(within(n, key) for n in chain):
                zones.append(key)
                if rtype == T_NS:
                    glue[r[TARGET]] = key
            elif not (rtype in _AUTH_PROOF and any(within(key, z) for z in zones)):
                reason = AUTHORITY
        else:
            zone = glue.get(key)
            if zone is None or rtype not in _GLUE or not within(key, zone):
                reason = ADDITIONAL
            elif owned is not None and owned(key):
                reason = OWN_NAME
        if reason:
            if dropped is None:
                dropped = {}
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            kept.append(r)
    return kept, dropped


def _covers(reply: bytes, rrsig: Record, qtype: int) -> bool:
    """An RRSIG over the question's type or a CNAME of the chain (the type covered is
    the first two bytes of its rdata, six after the TTL)."""
    at = rrsig[TTL_AT] + 6
    return rrsig[END] >= at + 2 and ((reply[at] << 8) | reply[at + 1]) in (qtype, T_CNAME)
