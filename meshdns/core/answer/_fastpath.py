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
  the very bytes ``handler.encode`` produces for ``Zone.decide``'s decision.
  ``tests/unit/test_core_fastpath_equivalence.py`` holds it to that;
- SOA records are encoded once per snapshot, SRV targets and PTR names once per
  service (``Zone.encoded``, handed on from snapshot to snapshot), when first asked.

The policy stays ``Zone``'s: the name is looked up by ``Zone.locate``, the one
lookup ``Zone.decide`` makes too, and answered by the same rule
(``SERVICE_ANSWERS``/``VIP_ANSWERS``, ``service_answer`` in _zone.py); this module
is only the other encoder. It hands back None for anything it does not encode
(apex, search-list and forwarded names, other classes, a zone not loaded yet,
malformed or unusual messages, a UDP reply over the client's limit, names with
odd labels). The caller then takes the dnslib path, which stays the reference.
"""

from __future__ import annotations

from ..registry import MeshService, Service
from ._encoded import PTR_TO_QNAME, EncodedName, NegativeSoa, Target, question_labels
from ._wire import RCODE_NOERROR, RCODE_NXDOMAIN, WireError, check_options
from ._zone import (
    ANSWER_A,
    ANSWER_A_AAAA,
    ANSWER_AAAA,
    ANSWER_SRV,
    EMPTY_NAME,
    ENDPOINT,
    NO_NAME,
    NODATA,
    SERVICE_ANSWERS,
    SRV_PORT,
    T_SRV,
    VIP_ANSWERS,
    VIP_NAME,
    WILDCARD,
    Zone,
    endpoint_addresses,
)

SERVER_UDP_PAYLOAD = 1232  # the UDP size this server advertises in its OPT record
_QUESTION_ONLY = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QD=1, AN=NS=AR=0
_QUESTION_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"  # QD=1, AR=1 (the OPT record)
_OPT_HEAD = b"\x00\x00\x29"  # owner: the root; type OPT
# The OPT record this server answers with (RFC 6891): UDP size 1232, the DO bit echoed.
_OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
_OPT_DO = b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
# Wire name to lookup key: length bytes of labels under 45 bytes to ".", A-Z to a-z.
# A backslash becomes a dot too: wire_to_key would escape it, so it must not match.
_DOTTED_LOWER = bytes.maketrans(bytes(range(1, 45)) + b"\\" + bytes(range(65, 91)),
                                b"." * 45 + bytes(range(97, 123)))
_MAX_TARGETS = 1 << 17  # encoded targets kept across snapshots before starting over

_SLOW_QTYPES = frozenset({41, 251, 252})  # OPT (FORMERR), IXFR, AXFR (REFUSED)

# What ``answer`` returns: the reply, its qtype and rcode, and the name whose owner
# decides it (lower case; None for a negative answer: its SOA serial is the registry
# revision, so any change outdates it).
Fast = tuple[bytes, int, int, str | None]
# The name a Fast answer carries when it must not be cached: an address set's
# answer, whose order rotates per query (docs/meshservice.md section 4).
ROTATING = "\x00rotating"


class FastPath:
    """Wire replies for the common questions of one zone (one registry snapshot)."""

    __slots__ = ("_a", "_a_rr", "_aaaa", "_aaaa_rr", "_domain0", "_known",
                 "_known_cap", "_names", "_nodata", "_nxdomain", "_off", "_one", "_ptr_head",
                 "_ra", "_serial", "_soa", "_soa_ttl", "_srv_a", "_srv_aaaa", "_srv_head",
                 "_targets", "_two", "zone")

    def __init__(self, zone: Zone) -> None:
        s = zone.settings
        self.zone = zone
        # Custom hostname templates or dns.select: SRV/PTR targets are the first
        # template's name and some services are hidden, which this path does not
        # model; every miss then takes the strict (dnslib) path.
        self._off = not zone.registry.names.is_default
        ttl = s.ttl.to_bytes(4, "big")
        # A and AAAA records owned by the question's name, up to their RDATA.
        self._a_rr = b"\x00\x01\x00\x01" + ttl + b"\x00\x04"  # type, class, TTL, length
        self._aaaa_rr = b"\x00\x1c\x00\x01" + ttl + b"\x00\x10"
        self._a = PTR_TO_QNAME + self._a_rr
        self._aaaa = PTR_TO_QNAME + self._aaaa_rr
        self._srv_head = PTR_TO_QNAME + b"\x00\x21\x00\x01" + ttl
        self._ptr_head = PTR_TO_QNAME + b"\x00\x0c\x00\x01" + ttl
        self._ra = 0x80 if s.forwarding else 0
        self._serial = zone.registry.revision & 0xFFFFFFFF
        self._soa_ttl = s.negative_ttl
        self._soa: dict[str, NegativeSoa | None] = {}
        # The snapshot's encoded SRV targets / PTR names, by (name, namespace, port, domain).
        self._targets: dict[tuple[str, str, int, str], Target] = zone.encoded
        self._names: dict[str, EncodedName] = {}  # the served domains, encoded
        # Flags and counts after the ID, by shape (RD bit | CD bit | 2 with an OPT):
        # QR, AA, RD copied, opcode QUERY; RA when forwarding, CD copied; QD=1.
        self._one = _headers(self._ra, RCODE_NOERROR, 1, 0)
        self._two = _headers(self._ra, RCODE_NOERROR, 2, 0)
        self._nodata = _headers(self._ra, RCODE_NOERROR, 0, 1)
        self._nxdomain = _headers(self._ra, RCODE_NXDOMAIN, 0, 1)
        self._srv_a = _headers(self._ra, RCODE_NOERROR, 1, 0, 1)
        self._srv_aaaa = _headers(self._ra, RCODE_NOERROR, 1, 0, 2)
        self._domain0 = s.domains[0]
        # Names that found their service in this snapshot (positive answers only, so at
        # most every name the registry serves: bounded by its size, not by the queries).
        # The A RDATA comes first: the most asked, read without touching the service.
        self._known: dict[str, tuple[bytes, Service, str, str]] = {}
        reg = zone.registry
        self._known_cap = 2 * len(s.domains) * len(reg.services) + len(reg.hostnames) + 64

    def answer(self, data: bytes, udp: bool) -> Fast | None:
        """The reply to query ``data`` (a header already known to be a query's), or None.

        One flat function on purpose: on this path every Python call costs.
        """
        if self._off:
            return None
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
        count = 0
        long_label = False
        pos = 12
        while True:
            if pos >= end:
                return None
            length = data[pos]
            if length == 0:
                break
            if length > 44:
                if length > 63:
                    return None  # a pointer or an unknown label type: the strict parser's
                long_label = True
            pos += 1 + length
            count += 1
        if pos > 12 + 254 or not count:
            return None  # over 255 bytes (FORMERR), or the root
        qend = pos + 5
        if qend > end:
            return None
        qtype = (data[pos + 1] << 8) | data[pos + 2]
        if data[pos + 3] or data[pos + 4] != 1 or qtype in _SLOW_QTYPES:
            return None  # not class IN, or AXFR/IXFR/OPT (the strict path refuses those)
        if opt:
            rdata = qend + 11
            if rdata > end or data[qend : qend + 3] != _OPT_HEAD or data[qend + 6]:
                return None  # not an OPT owned by the root, or EDNS version > 0 (BADVERS)
            if end != rdata or data[qend + 9] or data[qend + 10]:  # options, or junk
                if (data[qend + 9] << 8) | data[qend + 10] != end - rdata:
                    return None
                try:
                    if check_options(data, rdata, end):
                        return None  # NSID asked: the dnslib path answers it
                except WireError:
                    return None
            size = (data[qend + 3] << 8) | data[qend + 4]
            limit = 512 if size < 512 else min(size, SERVER_UDP_PAYLOAD)
            tail = _OPT_DO if data[qend + 7] & 0x80 else _OPT
        elif qend != end:
            return None
        else:
            tail = b""
            limit = 512
        # The lookup key (as names.wire_to_key): length bytes to dots, letters to lower
        # case, in one translate. With every label under 45 bytes, every length byte
        # is one the translate turns into a dot, so one dot too many means a label
        # holds an odd byte, a dot or a backslash: then the labels one by one.
        dotted = b""
        if not long_label:
            dotted = data[13:pos].translate(_DOTTED_LOWER)
        if long_label or dotted.count(b".") != count - 1:
            dotted = b".".join(question_labels(data))
            if b"\\" in dotted or dotted.count(b".") != count - 1:
                return None  # a label holding a dot: wire_to_key escapes it, decide() then
            dotted = dotted.lower()
        key = dotted.decode("latin-1")
        # A name that found its service before, in this snapshot, skips Zone.locate:
        # one lookup by the name instead of splitting it and looking up its parts.
        known = self._known.get(key)
        if known is not None:
            a_rdata, svc, apex, target_domain = known
        else:
            where = self.zone.locate(key)
            if where is None:
                return None  # other reverse names, the search list, forwarded: dnslib's
            kind, found, rule, at, target_domain = where
            if rule is WILDCARD:
                return None  # synthesized (RFC 4592): the dnslib path's, cached as negative
            if found is None:
                if kind in (NO_NAME, EMPTY_NAME):  # under the served domain target_domain
                    rcode = RCODE_NXDOMAIN if kind == NO_NAME else RCODE_NOERROR
                    out = self._negative(data, qend, target_domain, rcode, tail)
                    return None if out is None else (out, qtype, rcode, None)
                return None  # a domain's apex, or a zone not loaded yet: dnslib's
            if found.__class__ is not Service:
                # A mesh service's name: A, AAAA, ANY and NODATA of its one VIP are the
                # same bytes as a service's (not remembered in _known); SRV, PTR, the
                # _<port>._<proto> names and a mesh service without an IPv4 VIP are
                # the dnslib path's (_zone.py).
                if isinstance(found, MeshService) and found.endpoints is not None \
                        and (qtype == 1 or qtype == 28) \
                        and kind != VIP_NAME and rule is not SRV_PORT and rule is not ENDPOINT:
                    return self._address_set(data, qend, qtype, found, tail, udp, limit)
                if kind == VIP_NAME or where[2] == SRV_PORT or found.vip is None \
                        or qtype == T_SRV:
                    return None
                assert at is not None
                svc = found  # type: ignore[assignment]
                apex = at
                a_rdata = found.vip.to_bytes(4, "big")
                shape = (data[2] & 0x01) | (data[3] & 0x10) | (2 if opt else 0)
                return self._addresses(data, shape, qend, qtype, svc, a_rdata, apex, tail,
                                       udp, limit, key)
            svc = found
            if kind == VIP_NAME:
                if qtype not in VIP_ANSWERS:  # vip_answer: NODATA
                    return None  # the SOA of the reverse zone: dnslib's
                wire = self._ptr(data, qend, svc, tail)
                if udp and len(wire) > limit:
                    return None
                return wire, qtype, RCODE_NOERROR, key
            assert at is not None
            apex = at
            a_rdata = svc.vip.to_bytes(4, "big")
            if len(self._known) < self._known_cap:
                self._known[key] = (a_rdata, svc, apex, target_domain)
        # Header after the ID: flags and counts, by the RD and CD bits and the OPT.
        shape = (data[2] & 0x01) | (data[3] & 0x10) | (2 if opt else 0)
        answer = SERVICE_ANSWERS[svc.vip6 is not None].get(qtype, NODATA)  # service_answer
        if answer == ANSWER_A:
            wire = b"".join((data[:2], self._one[shape], data[12:qend], self._a, a_rdata,
                             tail))
        elif answer == ANSWER_AAAA:
            assert svc.vip6 is not None
            wire = b"".join((data[:2], self._one[shape], data[12:qend], self._aaaa,
                             svc.vip6.to_bytes(16, "big"), tail))
        elif answer == ANSWER_A_AAAA:
            assert svc.vip6 is not None
            wire = b"".join((data[:2], self._two[shape], data[12:qend], self._a, a_rdata,
                             self._aaaa, svc.vip6.to_bytes(16, "big"), tail))
        elif answer == ANSWER_SRV:
            wire = self._srv(data, shape, qend, svc, target_domain, tail)
        else:
            out = self._negative(data, qend, apex, RCODE_NOERROR, tail)
            return None if out is None else (out, qtype, RCODE_NOERROR, None)
        if udp and len(wire) > limit:
            return None  # the dnslib path truncates, the same way
        return wire, qtype, RCODE_NOERROR, key

    # ------------------------------------------------------------ the rarer replies

    def _addresses(self, data: bytes, shape: int, qend: int, qtype: int, svc: Service,
                   a_rdata: bytes, apex: str, tail: bytes, udp: bool, limit: int,
                   key: str) -> Fast | None:
        """A, AAAA, ANY or NODATA of a name whose VIPs are ``svc``'s (a mesh service's:
        the same rule, SERVICE_ANSWERS, as a service's; SRV is never asked here)."""
        answer = SERVICE_ANSWERS[svc.vip6 is not None].get(qtype, NODATA)
        if answer == ANSWER_A:
            wire = b"".join((data[:2], self._one[shape], data[12:qend], self._a, a_rdata,
                             tail))
        elif answer == ANSWER_AAAA:
            assert svc.vip6 is not None
            wire = b"".join((data[:2], self._one[shape], data[12:qend], self._aaaa,
                             svc.vip6.to_bytes(16, "big"), tail))
        elif answer == ANSWER_A_AAAA:
            assert svc.vip6 is not None
            wire = b"".join((data[:2], self._two[shape], data[12:qend], self._a, a_rdata,
                             self._aaaa, svc.vip6.to_bytes(16, "big"), tail))
        else:
            out = self._negative(data, qend, apex, RCODE_NOERROR, tail)
            return None if out is None else (out, qtype, RCODE_NOERROR, None)
        if udp and len(wire) > limit:
            return None
        return wire, qtype, RCODE_NOERROR, key

    def _address_set(self, data: bytes, qend: int, qtype: int, svc: MeshService,
                     tail: bytes, udp: bool, limit: int) -> Fast | None:
        """A or AAAA of an address set (docs/meshservice.md section 4): every address of
        the family in the rotated order, each record 16 or 28 bytes (the owner a pointer
        to the question); over UDP as many as fit ``limit``, TC=1 when any is left out.
        Named ROTATING: the handler does not cache it (the next answer starts further on)."""
        v4 = qtype == 1
        addresses = endpoint_addresses(svc, 4 if v4 else 6)
        if not addresses:
            return None  # NODATA: the dnslib path's
        head, size = (self._a, 4) if v4 else (self._aaaa, 16)
        records = [head + a.to_bytes(size, "big") for a in addresses]
        fit = len(records)
        if udp:
            fit = min(fit, max(0, (limit - qend - len(tail)) // len(records[0])))
        flags = 0x84 | (data[2] & 0x01) | (0x02 if fit < len(records) else 0)
        header = bytes((flags, self._ra | (data[3] & 0x10), 0, 1, fit >> 8, fit & 0xFF, 0, 0,
                        0, 1 if tail else 0))
        wire = b"".join((data[:2], header, data[12:qend], *records[:fit], tail))
        return wire, qtype, RCODE_NOERROR, ROTATING

    def _srv(self, data: bytes, shape: int, qend: int, svc: Service,
             domain: str, tail: bytes) -> bytes:
        target = self._target(svc, domain)
        head = self._srv_a if svc.vip6 is None else self._srv_aaaa
        if data[12 : qend - 4] == target.name.wire:  # asked for the target, in its case
            same = target.same_case
            if same is None or same[0] is not svc or same[1] != self._srv_head:
                rest = b"".join(self._srv_rest(target, svc, PTR_TO_QNAME, 12, qend))
                same = target.same_case = (svc, self._srv_head, rest)
            return b"".join((data[:2], head[shape], data[12:qend], same[2], tail))
        # The additional records are owned by the target: the first written as
        # dnslib compresses it against the question, the second pointing at it.
        owner, at = target.name.after_question(data, qend)
        return b"".join((data[:2], head[shape], data[12:qend],
                         *self._srv_rest(target, svc, owner, at, qend), tail))

    def _srv_rest(self, target: Target, svc: Service, owner: bytes, at: int,
                  qend: int) -> tuple[bytes, ...]:
        """The SRV record and the target's address records, after the question."""
        if svc.vip6 is None:
            return (self._srv_head, target.srv, owner, self._a_rr, svc.vip.to_bytes(4, "big"))
        if at < 0:
            at = qend + len(self._srv_head) + len(target.srv)  # right after the SRV record
        return (self._srv_head, target.srv, owner, self._a_rr, svc.vip.to_bytes(4, "big"),
                (0xC000 | at).to_bytes(2, "big"), self._aaaa_rr, svc.vip6.to_bytes(16, "big"))

    def _negative(self, data: bytes, qend: int, apex: str, rcode: int,
                  tail: bytes) -> bytes | None:
        """NXDOMAIN or NODATA: the SOA of ``apex`` in the authority section."""
        if apex in self._soa:
            soa = self._soa[apex]
        else:
            # An apex ending in the RNAME's last label would share it: left to dnslib.
            soa = None if apex.rsplit(".", 1)[-1] == "invalid" else \
                NegativeSoa(apex, self._serial, self._soa_ttl)
            self._soa[apex] = soa
        if soa is None:
            return None
        owner, at = soa.owner(data, qend)
        if at < 0:
            at = qend
        shape = (data[2] & 0x01) | (data[3] & 0x10) | (2 if tail else 0)
        return b"".join((data[:2], (self._nxdomain if rcode else self._nodata)[shape],
                         data[12:qend], owner, soa.rest, (0xC000 | at).to_bytes(2, "big"),
                         soa.tail, tail))

    def _ptr(self, data: bytes, qend: int, svc: Service, tail: bytes) -> bytes:
        """The PTR of a VIP (only: other reverse names are the dnslib path's)."""
        target = self._target(svc, self._domain0)
        name, _ = target.name.after_question(data, qend)
        rdata = target.ptr if name is target.name.wire else len(name).to_bytes(2, "big") + name
        shape = (data[2] & 0x01) | (data[3] & 0x10) | (2 if tail else 0)
        return b"".join((data[:2], self._one[shape], data[12:qend], self._ptr_head, rdata,
                         tail))

    def _target(self, svc: Service, domain: str) -> Target:
        tkey = (svc.name, svc.namespace, svc.port, domain)
        target = self._targets.get(tkey)
        if target is None:
            if len(self._targets) > _MAX_TARGETS:
                self._targets.clear()
            dname = self._names.get(domain)
            if dname is None:
                dname = self._names[domain] = EncodedName.of(domain)
            target = self._targets[tkey] = Target(svc, dname)
        return target

    def inherit(self, old: FastPath) -> None:
        """Take over ``old``'s encoded targets: a target is the canonical name and port,
        which no registry change alters (only new settings would)."""
        if old.zone.settings.domains == self.zone.settings.domains and not self._targets:
            self._targets = self.zone.encoded = old._targets


def _headers(ra: int, rcode: int, an: int, ns: int, ar: int = 0) -> list[bytes]:
    """Flags and counts after the ID by shape; ``ar`` additional records plus the OPT."""
    out = []
    for shape in range(32):
        rd, opt, cd = shape & 0x01, (shape >> 1) & 1, shape & 0x10
        out.append(bytes((0x84 | rd, ra | cd | rcode, 0, 1, 0, an, 0, ns, 0, ar + opt)))
    return out
