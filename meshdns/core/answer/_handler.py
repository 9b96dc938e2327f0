"""Bytes in, bytes out: the DNS message handler every transport calls.

The hot path is one dict lookup. A reply is a pure function of the query bytes
after the 2-byte ID (flags, question in its exact case, EDNS shape), the
transport (UDP truncates, TCP does not) and the registry snapshot. So the
encoded reply minus its ID is cached under the query minus its ID, and a hit
costs a slice, a lookup and a concatenation: no parse, no encode.

A miss takes the wire fast path (_fastpath.py: no dnslib objects) for the common
questions and the dnslib path (``Zone.decide`` + ``encode``) for the rest; a name
nothing of the zone can own is handed to the forwarder before either (_owned.py).

A registry change keeps the cached replies it cannot have changed: each entry is
indexed by the name whose owner decides it, and a PATCH (which says which
services it touched) drops only the entries of those services' names plus every
negative answer (their SOA serial is the registry revision). Anything else (a
full PUT, new settings) starts from empty caches. Either way the new state is
built aside and swapped in by one assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import EDNS0, RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord, EDNSOption

from ..registry import MeshService, Selector
from ._fastpath import ROTATING, SERVER_UDP_PAYLOAD, FastPath
from ._outdated import CacheIndex, decision_name, outdated_names
from ._owned import OwnedNames
from ._tally import QTYPE_INVALID, Entry, Forward, Tally
from ._views import view_zone
from ._wire import (
    EDE_NOT_SUPPORTED,
    EDE_PROHIBITED,
    HEADER_LEN,
    MIN_UDP_PAYLOAD,
    OPTION_EDE,
    OPTION_NSID,
    QTYPE_AXFR,
    QTYPE_IXFR,
    QTYPE_OPT,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    FormatError,
    Query,
    error_reply,
    parse_query,
    wire_to_key,
)
from ._zone import FORWARD, Decision, Zone

DEFAULT_ANSWER_CACHE = 100_000
# Sampled admission (MessageHandler._clear): a full UDP cache of at least
# MIN_SAMPLED_CACHE replies of which under 1/REUSE_SHARE were asked twice turns it on.
ADMIT_ONE_IN = 8  # a power of two
REUSE_SHARE = 20
MIN_SAMPLED_CACHE = 256
ZONE_TRANSFERS = (EDE_NOT_SUPPORTED, "zone transfers are not served")
PROHIBITED = (EDE_PROHIBITED, "client not allowed")


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """A query the core does not answer itself: the transport forwards it upstream.

    ``key``: what the forwarder's cache hook (``forward_cached``) returned when it had
    no answer for this very query (its cache key), so the forwarder does not ask its
    cache again; None when the hook was not asked."""

    query: Query
    data: bytes
    udp_limit: int
    key: Any = None


@dataclass
class _State:
    zone: Zone
    fast: FastPath
    udp: dict[bytes, Entry] = field(default_factory=dict)
    tcp: dict[bytes, Entry] = field(default_factory=dict)
    fwd_udp: dict[bytes, Forward] = field(default_factory=dict)
    fwd_tcp: dict[bytes, Forward] = field(default_factory=dict)
    index: dict[str, CacheIndex] = field(
        default_factory=lambda: {k: CacheIndex() for k in ("udp", "tcp", "fwd_udp", "fwd_tcp")})
    owned: OwnedNames = field(init=False)  # the forward shortcut's view of the zone

    def __post_init__(self) -> None:
        self.owned = OwnedNames(self.zone)


def udp_limit(query: Query) -> int:
    """Largest UDP reply the client accepts, capped at what this server advertises."""
    if query.edns is None:
        return MIN_UDP_PAYLOAD
    return max(MIN_UDP_PAYLOAD, min(query.edns.udp_size, SERVER_UDP_PAYLOAD))


def edns_options(query: Query, ede: tuple[int, str] | None,
                 nsid: bytes | None) -> list[EDNSOption]:
    """The options of a reply's OPT: the Extended DNS Error (RFC 8914) if there is one,
    the server's NSID (RFC 5001) if the query asked for it and one is set."""
    opts: list[EDNSOption] = []
    if query.edns is None:
        return opts
    if nsid is not None and query.edns.nsid:
        opts.append(EDNSOption(OPTION_NSID, nsid))
    if ede is not None:
        opts.append(EDNSOption(OPTION_EDE, ede[0].to_bytes(2, "big") + ede[1].encode()))
    return opts


def encode(query: Query, decision: Decision, limit: int | None, ra: bool,
           nsid: bytes | None = None) -> bytes:
    """Wire reply for ``decision``; TC=1 with question and OPT only if over ``limit``."""
    header = DNSHeader(id=query.id, qr=1, opcode=query.opcode, aa=int(decision.aa),
                       rd=int(query.rd), ra=int(ra), cd=int(query.cd),
                       rcode=decision.rcode & 0xF)
    question = DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass)
    reply = DNSRecord(header, q=question, rr=list(decision.answer),
                      auth=list(decision.authority), ar=list(decision.additional))
    opt: RR | None = None
    if query.edns is not None:
        opt = EDNS0(udp_len=SERVER_UDP_PAYLOAD, ext_rcode=decision.rcode >> 4,
                    flags="do" if query.edns.dnssec_ok else "",
                    opts=edns_options(query, decision.ede, nsid))
        reply.add_ar(opt)
    wire = bytes(reply.pack())
    if limit is None or len(wire) <= limit:
        return wire
    header.tc = 1
    short = DNSRecord(header, q=question, ar=[opt] if opt is not None else [])
    return bytes(short.pack())


def prohibited_reply(data: bytes, nsid: bytes | None = None) -> bytes | None:
    """REFUSED with Extended DNS Error 18 (access control); None for what does not parse
    as a query (dropped, as from anyone)."""
    try:
        query = parse_query(data)
    except FormatError:
        return None
    if data[2] & 0x80:
        return None
    return encode(query, Decision(RCODE_REFUSED, "prohibited", ede=PROHIBITED), None, False,
                  nsid)


def slip_reply(data: bytes) -> bytes | None:
    """An empty TC=1 reply (rate limiting's slip): the client asks again over TCP."""
    try:
        query = parse_query(data)
    except FormatError:
        return None
    if data[2] & 0x80:
        return None
    return encode(query, Decision(RCODE_NOERROR, "slip"), 0, False)


class MessageHandler:
    """Turns query bytes into reply bytes for one registry snapshot at a time."""

    def __init__(self, zone: Zone, answer_cache_size: int = DEFAULT_ANSWER_CACHE,
                 forward_memo_size: int | None = None, nsid: bytes | None = None) -> None:
        self._state = _State(zone, FastPath(zone))
        self.nsid = nsid  # dns.nsid: sent to clients that ask (RFC 5001); None: never
        self.view_selects: tuple[Selector, ...] = ()
        self._views: list[_State] = []  # dns.views, each with its own caches
        self.cache_limit = answer_cache_size
        # Forwarded queries remembered per transport: bounded like the forwarder's
        # cache (dns.cache_size), not like local answers, since every distinct
        # outside name lands here; 0 remembers none.
        self.forward_limit = answer_cache_size if forward_memo_size is None \
            else forward_memo_size
        self.tally = Tally()
        # Admission: every wire-path reply is cached unless the last full UDP cache
        # showed that almost none was asked twice (see _clear).
        self.sampling = False
        self.skipped = 0
        self.unadmitted: dict[tuple[int, int], int] = {}  # (qtype, rcode) -> UDP replies
        # Set by the forwarder: its cached reply to a forwarded query (bytes),
        # synchronously, or else a key of its own for the ForwardRequest (the
        # transport then hands the query to the forwarder).
        self.forward_cached: Callable[[bytes, Query, int, str], Any] | None = None

    @property
    def zone(self) -> Zone:
        return self._state.zone

    def set_zone(self, zone: Zone) -> None:
        """Serve from ``zone`` from now on, with the cached replies it leaves as they were
        (and each view from ``zone`` under its selector, _views.py).

        Runs on the thread that answers DNS (the event loop), between two queries: no
        miss can be running on the old state, so the kept replies stay in the same
        dicts and only the outdated ones are taken out (O(change), not O(cache)).
        """
        self._state = self._swap(self._state, zone)
        self._views = [self._swap(old, view_zone(zone, select, old.zone))
                       for old, select in zip(self._views, self.view_selects, strict=True)]

    def set_views(self, selects: Sequence[Selector]) -> None:
        """Answer views with these selectors from now on (SIGHUP): their caches start
        empty; view i is asked with ``view=i + 1``."""
        for old in self._views:
            self._fold_all(old)
        zone = self._state.zone
        self.view_selects = tuple(selects)
        self._views = [_State(z, FastPath(z)) for z in
                       (view_zone(zone, select, None) for select in self.view_selects)]

    def _fold_all(self, old: _State) -> None:
        # Caches that go: their hits move to the totals, so none is lost.
        self.tally.fold("udp", old.udp)
        self.tally.fold("tcp", old.tcp)
        self.tally.fold_forwards("udp", old.fwd_udp)
        self.tally.fold_forwards("tcp", old.fwd_tcp)

    def _swap(self, old: _State, zone: Zone) -> _State:
        zone.inherit(old.zone)
        new = _State(zone, FastPath(zone))
        new.fast.inherit(old.fast)
        names = outdated_names(old.zone, zone)
        if names is None:
            self._fold_all(old)
            return new
        # Kept entries go on counting their hits; only the dropped ones are folded into
        # the totals.
        dropped: dict[str, dict[bytes, Any]] = {}
        for kind in ("udp", "tcp", "fwd_udp", "fwd_tcp"):
            entries: dict[bytes, Any] = getattr(old, kind)
            index = new.index[kind] = old.index[kind]
            gone = dropped[kind] = {}
            for key in index.take(names):
                entry = entries.pop(key, None)
                if entry is not None:
                    gone[key] = entry
            setattr(new, kind, entries)
        self.tally.fold("udp", dropped["udp"])
        self.tally.fold("tcp", dropped["tcp"])
        self.tally.fold_forwards("udp", dropped["fwd_udp"])
        self.tally.fold_forwards("tcp", dropped["fwd_tcp"])
        return new

    def cached_answers(self) -> int:
        return sum(len(st.udp) + len(st.tcp) for st in (self._state, *self._views))

    def snapshot_counts(self) -> Tally:
        """Totals including hits not yet folded (for a scrape; the cache is untouched)."""
        st = self._state
        out = self.tally.copy()
        for (qtype, rcode), n in self.unadmitted.items():
            out.request("udp", qtype, n)
            out.response(rcode, "local", n)
        for state in (st, *self._views):
            out.fold("udp", state.udp, reset=False)
            out.fold("tcp", state.tcp, reset=False)
            out.fold_forwards("udp", state.fwd_udp, reset=False)
            out.fold_forwards("tcp", state.fwd_tcp, reset=False)
        return out

    # The two entry points the transports call, per datagram / per framed message.

    def handle_udp(self, data: bytes) -> bytes | ForwardRequest | None:
        tail = data[2:]
        entry = self._state.udp.get(tail)
        if entry is not None:
            entry[1] += 1
            cached: bytes = entry[0]
            return data[:2] + cached
        return self._miss(data, tail, "udp")

    def handle_tcp(self, data: bytes) -> bytes | ForwardRequest | None:
        tail = data[2:]
        entry = self._state.tcp.get(tail)
        if entry is not None:
            entry[1] += 1
            cached: bytes = entry[0]
            return data[:2] + cached
        return self._miss(data, tail, "tcp")

    def handle_view(self, data: bytes, proto: str, view: int
                    ) -> bytes | ForwardRequest | None:
        """``handle_udp``/``handle_tcp`` for a client of view ``view`` (dns.views; 0: the
        default), from that view's own caches."""
        st = self._views[view - 1] if view else self._state
        tail = data[2:]
        entry = (st.udp if proto == "udp" else st.tcp).get(tail)
        if entry is not None:
            entry[1] += 1
            cached: bytes = entry[0]
            return data[:2] + cached
        return self._miss(data, tail, proto, st=st)

    def handle_local(self, data: bytes, proto: str, view: int = 0) -> bytes | None:
        """``handle_udp``/``handle_tcp`` for a client that may not have names forwarded
        (dns.allow_recursion): those get REFUSED with EDE 18, counted."""
        st = self._views[view - 1] if view else self._state
        tail = data[2:]
        entry = (st.udp if proto == "udp" else st.tcp).get(tail)
        if entry is not None:
            entry[1] += 1
            cached: bytes = entry[0]
            return data[:2] + cached
        out = self._miss(data, tail, proto, local_only=True, st=st)
        if isinstance(out, ForwardRequest):
            self.tally.recursion_refused += 1
            self.tally.response(RCODE_REFUSED, "local")
            return prohibited_reply(data, self.nsid)
        return out

    def _miss(self, data: bytes, tail: bytes, proto: str, local_only: bool = False,
              st: _State | None = None) -> bytes | ForwardRequest | None:
        # ``tail`` is data[2:], the cache key: one object, so its hash is computed once.
        if st is None:
            st = self._state
        forwards = st.fwd_udp if proto == "udp" else st.fwd_tcp
        fwd = forwards.get(tail)
        if fwd is not None and local_only:
            fwd.hits += 1  # the request is counted; handle_local counts the REFUSED
            return ForwardRequest(fwd.query, data, fwd.limit)
        if fwd is not None:
            # Seen before and forwarded: no parse, no policy; maybe the forwarder's cache.
            fwd.hits += 1
            hook = self.forward_cached
            if hook is not None:
                cached = hook(data, fwd.query, fwd.limit, proto)
                if cached.__class__ is bytes:
                    return cached
                return ForwardRequest(fwd.query, data, fwd.limit, cached)
            return ForwardRequest(fwd.query, data, fwd.limit)
        tally = self.tally
        if len(data) < HEADER_LEN or data[2] & 0x80:
            tally.dropped += 1  # no header to echo, or a response: never answer those
            tally.request(proto, QTYPE_INVALID)
            return None
        owned = st.owned
        if owned.forwarding:
            # A name nothing here can own: forwarded after one read of the question, no
            # fast-path attempt, no second parse, no Zone.decide (_owned.py).
            outright = owned.forwarded(data)
            if outright is not None:
                query, key, limit = outright
                tally.request(proto, query.qtype)
                return self._forward(st, proto, tail, data, query, limit, key, local_only,
                                     forwards)
        fast = st.fast.answer(data, proto == "udp")
        if fast is not None:
            wire, qtype, rcode, name = fast
            if name is ROTATING:  # an address set's rotated order: never cached
                self._uncached(qtype, rcode)
                if wire[2] & 0x02:
                    self.tally.truncated += 1
                return wire
            if self.sampling and proto == "udp":
                self.skipped += 1
                if self.skipped & (ADMIT_ONE_IN - 1):
                    self._uncached(qtype, rcode)
                    return wire
            cache = st.udp if proto == "udp" else st.tcp
            if len(cache) >= self.cache_limit:
                self._clear(st, proto)
            # Counted as a hit: folded into the request and response totals like one.
            cache[tail] = [wire[2:], 1, qtype, rcode]
            st.index[proto].add(tail, name)
            return wire
        ra = st.zone.settings.forwarding
        try:
            query = parse_query(data)
        except FormatError:
            tally.request(proto, QTYPE_INVALID)
            if (data[2] >> 3) & 0xF:
                # An opcode we do not implement, in a message we cannot fully parse.
                tally.response(RCODE_NOTIMP, "local")
                return error_reply(data, RCODE_NOTIMP, echo_question=True)
            tally.response(RCODE_FORMERR, "local")
            return error_reply(data, RCODE_FORMERR, echo_question=False)
        tally.request(proto, query.qtype)
        if query.opcode:
            tally.response(RCODE_NOTIMP, "local")  # with OPT when the query had one
            return encode(query, Decision(RCODE_NOTIMP, "notimp"), None, ra, self.nsid)
        limit = udp_limit(query)
        if query.edns is not None and query.edns.version > 0:
            tally.response(RCODE_BADVERS, "local")
            return encode(query, Decision(RCODE_BADVERS, "badvers"), None, ra, self.nsid)
        if query.qtype == QTYPE_OPT:
            # RFC 6891 §6.1.1: OPT is a pseudo-RR, not a type one can ask for; BIND and
            # unbound answer FORMERR, for our names and for forwarded ones alike.
            tally.response(RCODE_FORMERR, "local")
            return encode(query, Decision(RCODE_FORMERR, "formerr"), None, ra, self.nsid)
        if query.qtype in (QTYPE_AXFR, QTYPE_IXFR):
            tally.response(RCODE_REFUSED, "local")
            return encode(query, Decision(RCODE_REFUSED, "refused", ede=ZONE_TRANSFERS),
                          None, ra, self.nsid)
        decision = st.zone.decide(query.labels, query.qtype, query.qclass)
        key = wire_to_key(query.labels)
        if decision.rule == FORWARD:
            return self._forward(st, proto, tail, data, query, limit, key, local_only,
                                 forwards)
        wire = encode(query, decision, limit if proto == "udp" else None, ra, self.nsid)
        tally.response(decision.rcode, "local")
        service = decision.service
        if service.__class__ is MeshService and service.endpoints is not None:
            if wire[2] & 0x02:  # an address set's rotated order (or SRV additionals):
                tally.truncated += 1  # not cached
            return wire
        self._store(st, proto, tail, wire, query.qtype, decision.rcode,
                    decision_name(key, decision))
        return wire

    def _forward(self, st: _State, proto: str, tail: bytes, data: bytes, query: Query,
                 limit: int, key: str, local_only: bool, forwards: dict[bytes, Forward]
                 ) -> bytes | ForwardRequest:
        """A query to forward, remembered (``forwards``: its transport's memo) so the next
        time it costs one lookup; the forwarder's cached reply when it has one."""
        if len(forwards) >= self.forward_limit:
            self.tally.fold_forwards(proto, forwards)
            forwards.clear()
            st.index["fwd_" + proto] = CacheIndex()
        if self.forward_limit:
            forwards[tail] = Forward(query, limit)
            st.index["fwd_" + proto].add(tail, key)
        hook = None if local_only else self.forward_cached
        if hook is not None:
            cached = hook(data, query, limit, proto)
            if cached.__class__ is bytes:
                return cached
            return ForwardRequest(query, data, limit, cached)  # the forwarder counts
        return ForwardRequest(query, data, limit)  # its reply

    def _uncached(self, qtype: int, rcode: int) -> None:
        """Count a wire-path reply that is not cached (one count for request and reply,
        folded into the totals like a hit's)."""
        counts = self.unadmitted
        counts[qtype, rcode] = counts.get((qtype, rcode), 0) + 1

    def _store(self, st: _State, proto: str, tail: bytes, wire: bytes, qtype: int, rcode: int,
               name: str | None) -> None:
        """Cache a local reply, indexed by the name that decides it (None: negative)."""
        if wire[2] & 0x02:
            self.tally.truncated += 1
        cache = st.udp if proto == "udp" else st.tcp
        if len(cache) >= self.cache_limit:
            self._clear(st, proto)
        cache[tail] = [wire[2:], 0, qtype, rcode]
        st.index[proto].add(tail, name)

    def _clear(self, st: _State, proto: str) -> None:
        """Empty a full reply cache: a flood of distinct names cannot grow memory.

        A cache that filled up with replies hardly ever asked again (a scan over
        more names than it holds, or 0x20-randomized letter case) was all cost:
        until the next one fills, only one wire-path reply in ADMIT_ONE_IN goes in.
        A name asked again and again still gets in after a few misses, and the
        next full cache, full of such names, switches admission back to all.
        """
        cache = st.udp if proto == "udp" else st.tcp
        reused = self.tally.fold(proto, cache)
        if proto == "udp" and len(cache) >= MIN_SAMPLED_CACHE:
            self.sampling = reused * REUSE_SHARE < len(cache)
        cache.clear()
        st.index[proto] = CacheIndex()

    def explain(self, labels: tuple[bytes, ...], qtype: int, qclass: int = 1,
                view: int = 0) -> Decision:
        """The decision for a question, by the same code that answers DNS."""
        return self.view_zone(view).decide(labels, qtype, qclass)

    def view_zone(self, view: int = 0) -> Zone:
        """The zone view ``view`` answers from (0: the default one)."""
        return self._views[view - 1].zone if view else self._state.zone
