"""CNAME chasing into the names meshdns serves itself.

A cluster resolver answers an ExternalName service with a bare CNAME to a mesh
name (``front.default.svc.cluster.local CNAME frontend.kong.svc.80.mesh.``):
it does not know the mesh names. A client without a CNAME-chasing resolver of
its own (glibc) then finds no address. So when a forwarded answer's chain ends
at a name the current zone answers (a mesh name, a ``hostnames`` entry, a VIP's
PTR) and the upstream gave no records for it, meshdns appends its own answer
for that name: A/AAAA (or whatever the question asks), or the negative answer
with its SOA. AA stays 0: part of the answer is someone else's.

Rules:

- the chain is followed from the question's name through the answer section's
  CNAMEs only; a loop makes the whole answer SERVFAIL, wherever it ends (a
  looping chain can never resolve, and passing it on makes clients loop);
- a chain ending locally may have at most ``MAX_LINKS`` links, counting the
  one a search-list name adds locally; past that, SERVFAIL;
- a CNAME question gets the upstream's CNAME only, as before; so do classes
  other than IN;
- the local part is derived from a zone; the forwarder re-derives it when the
  zone (the registry) changes, so a cached chased answer never outlives it;
- the upstream's own records for one of our names never pass: ``owns`` is what
  the reply scrubber (reply.py) asks, and it cuts the chain where it enters our
  names (a CNAME to a mesh name bringing its own A: the A goes, ours comes).

Everything here is synchronous and does no IO: the forwarder calls it on the
miss path after an upstream reply, and again from its cache when the registry
moved on since the entry was built.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

from dnslib import RR, DNSHeader, DNSQuestion, DNSRecord

from ..core.answer import FORWARD, QCLASS_IN, REFUSED, SEARCH, T_A, Decision, WireError, Zone
from .cache import CachedReply, CacheKey
from .reply import ParsedReply, ReplyRejected, parse_reply

MAX_LINKS = 8  # CNAME links from the question to the local answer (like many resolvers)
T_CNAME = 5
_MAX_POINTERS = 64  # compression pointers followed per name (a name has at most 127 labels)


@dataclass(frozen=True, slots=True)
class Chain:
    """Where the answer section's CNAME chain from the question's name leads."""

    links: int  # CNAME records followed
    target: tuple[bytes, ...]  # the last name, spelled as the upstream wrote it
    loop: bool  # the chain came back to a name it had passed
    has_records: bool  # the answer holds some other record owned by ``target``


def _name(wire: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    """The full name at ``pos`` (pointers followed, backwards only) and the offset past it."""
    labels: list[bytes] = []
    end: int | None = None
    hops = 0
    while True:
        length = wire[pos]
        if length == 0:
            return tuple(labels), (pos + 1 if end is None else end)
        if length & 0xC0 == 0xC0:
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if end is None:
                end = pos + 2
            hops += 1
            if target >= pos or hops > _MAX_POINTERS:
                raise ReplyRejected("malformed")  # forward or endless pointers
            pos = target
            continue
        if length & 0xC0:
            raise ReplyRejected("malformed")
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += 1 + length


def _key(labels: tuple[bytes, ...]) -> tuple[bytes, ...]:
    return tuple(label.lower() for label in labels)


def follow_chain(wire: bytes, qend: int, qname: tuple[bytes, ...]) -> Chain | None:
    """The CNAME chain from ``qname`` in a parsed reply's answer section; None when the
    question's name has no CNAME there (the common case: nothing to chase)."""
    ancount = (wire[6] << 8) | wire[7]
    if not ancount:
        return None
    cnames: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    owners: set[tuple[bytes, ...]] = set()
    pos = qend
    try:
        for _ in range(ancount):
            owner, pos = _name(wire, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", wire, pos)
            pos += 10
            if rtype == T_CNAME:
                target, _ = _name(wire, pos)
                cnames.setdefault(_key(owner), target)
            else:
                owners.add(_key(owner))
            pos += rdlen
    except (IndexError, struct.error, WireError):
        raise ReplyRejected("malformed") from None
    name = _key(qname)
    if name not in cnames:
        return None
    seen = {name}
    links = 0
    target = qname
    # Bounded: every step adds a name to ``seen`` or stops, and there are len(cnames).
    while name in cnames:
        target = cnames[name]
        links += 1
        name = _key(target)
        if name in seen:
            return Chain(links, target, True, False)
        seen.add(name)
    return Chain(links, target, False, name in owners)


def owns(zone: Zone, name: bytes) -> bool:
    """The zone answers ``name`` (a lower-case uncompressed wire name) itself: a mesh
    name, a host name, a VIP's PTR name, a search-list form of one of them."""
    labels: list[bytes] = []
    pos = 0
    while name[pos]:
        labels.append(name[pos + 1:pos + 1 + name[pos]])
        pos += 1 + name[pos]
    return zone.decide(tuple(labels), T_A, QCLASS_IN).rule not in (FORWARD, REFUSED)


def local_decision(zone: Zone, chain: Chain, qtype: int, qclass: int) -> Decision | None:
    """The zone's own answer for the chain's target, or None when the zone would forward
    that name (or refuse it): then the upstream's answer stands as it is."""
    if qtype == T_CNAME or qclass != QCLASS_IN or chain.loop or chain.has_records:
        return None
    decision = zone.decide(chain.target, qtype, qclass)
    if decision.rule in (FORWARD, REFUSED):
        return None
    return decision


def total_links(chain: Chain, decision: Decision) -> int:
    # A search-list target (``<mesh name>.<suffix>``) answers with one more CNAME.
    return chain.links + (1 if decision.rule == SEARCH else 0)


@dataclass(frozen=True, slots=True)
class UpstreamPart:
    """What the upstream said, kept to rebuild the answer when the registry changes."""

    question: DNSQuestion
    answer: tuple[RR, ...]  # the upstream's answer section (the chain, maybe its RRSIGs)
    received: float  # when it arrived (the forwarder's clock)
    expires: float  # when the upstream's part runs out
    question_len: int
    chain: Chain


def upstream_part(parsed: ParsedReply, question_len: int, chain: Chain,
                  now: float) -> UpstreamPart | None:
    """The upstream answer section as records; None if dnslib cannot read it."""
    try:
        record = DNSRecord.parse(parsed.wire)
    except Exception:  # dnslib raises several types on input it does not like
        return None
    return UpstreamPart(record.q, tuple(record.rr), now, now + parsed.lifetime, question_len,
                        chain)


def build_reply(part: UpstreamPart, decision: Decision, now: float) -> ParsedReply:
    """The upstream's chain (TTLs counted down to ``now``) followed by the local answer.

    The local answer brings its rcode (NXDOMAIN for an unknown mesh name) and its
    authority (the SOA of a negative answer); the upstream's authority and
    additional sections were about a name it does not serve, so they go.
    """
    age = int(now - part.received)
    chain = [RR(rr.rname, rr.rtype, rr.rclass, rr.ttl - age if rr.ttl > age else 0, rr.rdata)
             for rr in part.answer]
    header = DNSHeader(id=0, qr=1, rd=1, ra=1, rcode=decision.rcode & 0xF)
    message = DNSRecord(header, q=part.question, rr=[*chain, *decision.answer],
                       auth=list(decision.authority), ar=list(decision.additional))
    return parse_reply(bytes(message.pack()), part.question_len)


class ChasedReply(CachedReply):
    """A cached reply whose tail is meshdns's own answer, valid for one zone only.

    ``zone`` is a weak reference: a cached answer must not keep an old registry
    snapshot alive. When the forwarder's current zone is another object, the
    entry is rebuilt from ``part`` (no upstream query) before it is served.
    """

    __slots__ = ("decision", "key", "part", "zone")

    def __init__(self, key: CacheKey, part: UpstreamPart, zone: Zone, decision: Decision,
                 now: float) -> None:
        parsed = build_reply(part, decision, now)
        super().__init__(parsed, now, max(0.0, min(parsed.lifetime, part.expires - now)))
        self.key = key
        self.part = part
        self.zone = weakref.ref(zone)
        self.decision = decision

    def current(self, zone: Zone) -> bool:
        return self.zone() is zone
