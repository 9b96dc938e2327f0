"""Sidecar mode: every name the core does not own is asked upstream, cached, coalesced.

``Forwarder.submit(request, proto, done, ctx)`` is what the transports call for a
:class:`~meshdns.core.answer.ForwardRequest`; ``done(ctx, reply)`` is called once,
at once or when the lookup ends (no task, no future per query). In order:

1. cache hit → the cached reply, TTLs counted down, the client's ID, case, RD,
   CD and EDNS shape patched in (no await, no parse: the benchmarked path); a hit
   in the last 10% of the entry's lifetime also asks upstream in the background,
   once per entry (prefetch, ``dns.prefetch``), and the fresh reply replaces it;
2. the same question already in flight → wait for that one (coalescing);
3. past ``dns.max_inflight`` distinct questions in flight → SERVFAIL at once;
4. else one lookup (lookup.py: callbacks, no task) in the name's forward zone (the
   longest dns.forward zone holding it; "." is dns.upstreams): every upstream in
   health order, each with an equal share of what is left of
   ``dns.upstream_timeout``; UDP from the upstream's pool of random source ports
   (udppool.py), then TCP if the UDP reply had TC=1 (or TCP only for a
   ``protocol: tcp`` zone; reused connections, tcpupstream.py). The first NOERROR/NXDOMAIN wins; when none comes, SERVFAIL (never
   NXDOMAIN), remembered for ``SERVFAIL_TTL`` seconds.

Every reply is parsed whole and scrubbed before it is cached or sent (reply.py):
what does not parse ends that attempt (``malformed``), and a client gets only
the records for its question; the rest is counted in ``scrubbed`` by reason.
The TTLs of what is cached are bounded by ``dns.cache_*_ttl`` (CachePolicy).

An upstream answer whose CNAME chain ends at a name the current zone answers
(an ExternalName service pointing at a mesh name) gets our answer for that name
appended (chase.py). Such an entry is rebuilt from the zone of the moment when
it is served, so it is never memoised: the memo does not look at the registry.

A query that loops back to us (an upstream forwarding to meshdns) finds its own
question in flight and waits on it instead of asking again: no query storm.

``answer_cached(data, query, udp_limit, proto)`` is step 1 alone, synchronous:
the core calls it to answer a cache hit in the same call as a local answer; on a
miss it returns the cache key, which the core puts in the ForwardRequest, so
``submit`` does not ask the cache again.

Counters for the metrics collector (plain numbers, read at scrape time):
``upstream_stats()`` → {"host:port": UpstreamStats} (attempts by result — ok,
truncated, servfail, refused, rcode, timeout, error — plus duration sum, count
and per-bucket counts over ``DURATION_BUCKETS``, not cumulative); ``rejected``
(replies dropped by reason: wrong_id, wrong_question, malformed);
``overloaded``, ``coalesced``, ``len(cache)``, ``inflight``, ``prefetches``,
``scrubbed`` (records dropped from replies, by reason). Replies sent are
counted on the core's Tally as ``response(rcode, "cache" | "upstream")`` and
``truncated``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import DnsConfig, ForwardZone, HostPort, nsid_bytes
from ..core.answer import (
    EDE_NOT_AUTHORITATIVE,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    ForwardRequest,
    Query,
    Tally,
    Zone,
)
from .cache import (
    NO_REACHABLE_UPSTREAM,
    UPSTREAM_NETWORK_ERROR,
    CachedReply,
    CacheKey,
    CachePolicy,
    ReplyCache,
    Served,
    StaleReply,
    _ede,
    nsid_option,
)
from .chase import (
    MAX_LINKS,
    T_CNAME,
    ChasedReply,
    follow_chain,
    local_decision,
    owns,
    total_links,
    upstream_part,
)
from .lookup import Lookup, Timeouts, Waiter
from .reply import ParsedReply, ReplyRejected, question_wire
from .scrub import Owned
from .transport import servfail
from .udppool import LIFETIME, descriptor_budget
from .upstream import (
    DURATION_BUCKETS,
    ERROR,
    MALFORMED_REPLY,
    Upstream,
    UpstreamStats,
)

__all__ = ["DURATION_BUCKETS", "SERVFAIL_TTL", "Forwarder"]

log = logging.getLogger("meshdns.forward")

SERVFAIL_TTL = 1.0  # a failed lookup is remembered this long (RFC 9520: at least 1 s)
UPSTREAM = "upstream"
# Forwarder.on_upstream: (protocol, upstream, query, reply or None, sent ns, reply ns).
UpstreamTap = Callable[[str, HostPort, bytes, bytes | None, int, int], None]
CACHE = "cache"


_CNAME_IN = b"\x00\x05\x00\x01"  # a record's type CNAME and class IN, on the wire
NO_ZONE = _ede(EDE_NOT_AUTHORITATIVE, "not a served name, and no upstream for its zone")


class Route:
    """One forward zone (dns.forward, or "." for dns.upstreams): its upstreams, how."""

    __slots__ = ("labels", "protocol", "upstreams", "zone")

    def __init__(self, zone: ForwardZone, upstreams: list[Upstream]) -> None:
        self.zone = zone.zone
        self.labels = () if zone.zone == "." else tuple(
            label.encode() for label in zone.zone.split("."))
        self.protocol = zone.protocol
        self.upstreams = upstreams

    def covers(self, labels: tuple[bytes, ...]) -> bool:
        """Whether the (lower-case) name is at or below this zone, label by label."""
        n = len(self.labels)
        return n == 0 or (len(labels) >= n and labels[-n:] == self.labels)


def _zones(routes: Sequence[ForwardZone | HostPort]) -> list[ForwardZone]:
    """Forward zones, longest first; bare addresses make up the "." zone."""
    zones = [r for r in routes if isinstance(r, ForwardZone)]
    bare = tuple(r for r in routes if isinstance(r, HostPort))
    if bare:
        zones.append(ForwardZone(".", bare))
    if not zones or not all(z.upstreams for z in zones):
        raise ValueError("a forwarder needs at least one upstream")
    return sorted(zones, key=lambda z: 0 if z.zone == "." else -(z.zone.count(".") + 1))


def cache_key(q: Query) -> CacheKey:
    """The cache's key for a question: what changes what an upstream returns."""
    edns = q.edns
    return (b".".join(q.labels).lower(), q.qtype, q.qclass,
            edns is not None and edns.dnssec_ok, q.cd)


def _resolve_future(future: asyncio.Future[Any], entry: Any) -> None:
    """A /v1/resolve waiter's ``done``: the entry (None: shutting down, or a bug)."""
    if not future.done():
        future.set_result(entry)


def failure_ede(results: Sequence[str]) -> bytes:
    """The Extended DNS Error of a SERVFAIL after every upstream failed: 23 (Network
    Error) when one could not be talked to (ICMP, socket error, a malformed reply), else
    22 (No Reachable Authority: timeouts, or errors they answered)."""
    if any(r in (ERROR, MALFORMED_REPLY) for r in results):
        return UPSTREAM_NETWORK_ERROR
    return NO_REACHABLE_UPSTREAM


class Forwarder:
    """Asks the upstreams for what the core forwards; one per server."""

    def __init__(self, routes: Sequence[ForwardZone | HostPort], config: DnsConfig,
                 tally: Tally, *, clock: Callable[[], float] = time.monotonic,
                 current_zone: Callable[[], Zone] | None = None) -> None:
        self.routes: list[Route] = []
        self.upstreams: list[Upstream] = []  # of every zone, each address once
        self._ports_wanted = config.upstream_ports
        self.set_upstreams(routes)
        self.budget = config.upstream_timeout
        self.max_inflight = config.max_inflight
        self.tally = tally
        self.clock = clock  # the cache's clock (tests move it instead of sleeping)
        self.policy = CachePolicy.from_config(config)
        self.cache = ReplyCache(config.cache_size, self.policy)
        self.prefetches = 0  # background refreshes of entries asked near their expiry
        self.scrubbed: dict[str, int] = {}  # records dropped from upstream replies
        self.stale_answers = 0  # answers served stale (RFC 8767)
        self.rejected: dict[str, int] = {}
        self.overloaded = 0
        self.coalesced = 0
        self._inflight: dict[CacheKey, Lookup] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first lookup
        self.timeouts: Timeouts | None = None  # the UDP attempts' deadlines (lookup.py)
        self._served_udp: dict[bytes, Served] = {}
        self._served_tcp: dict[bytes, Served] = {}
        self._memo_limit = config.cache_size  # each memo, like the cache it serves from
        self._ids = random.SystemRandom()
        self.nsid = nsid_option(nsid_bytes(config))
        self._closed = False
        # The current zone (registry snapshot), for chasing CNAMEs into our own names
        # (chase.py); None: answers are passed on as the upstream gave them.
        self._zone = current_zone
        self.chased = 0  # upstream answers completed with a local answer
        self.chase_refused: dict[str, int] = {}  # SERVFAIL instead, by reason: loop, too_long
        # Called with each exchange with an upstream (log.dnstap's FORWARDER messages):
        # protocol ("udp", "tcp"), upstream, query sent, reply got (None: none), and the
        # time.time_ns() of the send and of the reply (or of giving up).
        self.on_upstream: UpstreamTap | None = None
        # The scrubber's question (one bound method for every lookup, no per-miss object).
        self._owned: Owned | None = None if current_zone is None else self._owns_now

    def set_upstreams(self, routes: Sequence[ForwardZone | HostPort]) -> None:
        """Ask these zones' upstreams from now on (SIGHUP; bare addresses are the "."
        zone); an upstream kept keeps its health and counters.

        Lookups in flight finish with the upstreams they started with; cached replies
        stay (they are answers, whoever gave them)."""
        zones = _zones(routes)
        known = {up.address: up for up in self.upstreams}
        used: dict[HostPort, Upstream] = {}
        self.routes = []
        for zone in zones:
            ups = []
            for hp in dict.fromkeys(zone.upstreams):
                up = used.get(hp) or known.pop(hp, None) or Upstream(hp)
                used[hp] = up
                ups.append(up)
            self.routes.append(Route(zone, ups))
        self.upstreams = list(used.values())
        for gone in known.values():
            gone.retire()
        self._size_port_pools()

    def _size_port_pools(self) -> None:
        """dns.upstream_ports source ports per upstream, as RLIMIT_NOFILE allows."""
        wanted = self._ports_wanted
        n = len(self.upstreams)
        each = max(1, descriptor_budget(wanted * n) // n)
        for up in self.upstreams:
            if up.udp is None:
                up.ports = each
        bits = math.log2(each) + 16
        if each < wanted:
            log.warning("upstream UDP: only %d source ports per upstream (dns.upstream_ports "
                        "%d; RLIMIT_NOFILE is too low for %d upstreams): %.1f bits of port "
                        "and ID entropy per query instead of %.1f", each, wanted, n, bits,
                        math.log2(wanted) + 16)
        else:
            log.debug("upstream UDP: %d source ports per upstream, each re-drawn within "
                      "%g s: %.1f bits of port and ID entropy per query", each, LIFETIME, bits)

    def route_for(self, labels: tuple[bytes, ...]) -> Route | None:
        """The longest forward zone the name is in (None: no zone, REFUSED)."""
        routes = self.routes
        if len(routes) == 1 and not routes[0].labels:
            return routes[0]
        lower = tuple(label.lower() for label in labels)
        for route in routes:
            if route.covers(lower):
                return route
        return None

    def answered_by(self, q: Query) -> str | None:
        """The upstream ("host:port") whose answer the cache holds for ``q``, if known."""
        entry = self.cache.peek(cache_key(q))
        return entry.upstream if entry is not None else None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def upstream_stats(self) -> dict[str, UpstreamStats]:
        """Per-upstream counters keyed by "host:port" (for the metrics collector)."""
        return {up.label: up.stats for up in self.upstreams}

    # ---------------------------------------------------------------- entry point

    def submit(self, req: ForwardRequest, proto: str, done: Callable[[Any, bytes | None], None],
               ctx: Any) -> None:
        """Answer a forwarded query: ``done(ctx, reply)`` is called once, now (a cache hit,
        SERVFAIL when overloaded) or when the lookup ends; the reply is None only while
        shutting down. No task, no future: the lookup (lookup.py) calls back."""
        data = req.data
        q = req.query
        key = req.key
        if key is None:  # the core's hook did not ask the cache for this very query
            out = self.answer_cached(data, q, req.udp_limit, proto)
            if isinstance(out, bytes):
                done(ctx, out)
                return
            key = out
        if self._closed:
            done(ctx, None)
            return
        lookup = self._inflight.get(key)
        waiter = (req, proto, done, ctx)
        if lookup is not None:
            self.coalesced += 1
            lookup.waiters.append(waiter)
            return
        if len(self._inflight) >= self.max_inflight:
            self.overloaded += 1
            self._deliver(self._servfail(q, self.clock()), [waiter])
            return
        # The question as the client sent it (uncompressed, parse_query checked it):
        # a slice of the query, not built again from the labels.
        labels = q.labels
        question = data[12:17 + len(labels) + sum(map(len, labels))]
        lookup = self._begin(key, q, None, question)
        if lookup is None:  # in no forward zone
            self._deliver(self._error(q, self.clock(), RCODE_REFUSED, NO_ZONE), [waiter])
            return
        lookup.waiters.append(waiter)
        lookup.start()

    def _deliver(self, entry: CachedReply | None, waiters: list[Waiter]) -> None:
        """Each waiter's reply from ``entry`` (None: a bug settled the lookup, SERVFAIL),
        counted as an upstream answer."""
        now = self.clock()
        for req, proto, done, ctx in waiters:
            out: Any
            try:
                if req is None:  # /v1/resolve's waiter: the entry itself
                    out = entry
                elif entry is None:
                    out = servfail(req.data)
                    self._count(RCODE_SERVFAIL, UPSTREAM, False)
                else:
                    q = req.query
                    edns = q.edns
                    out, truncated = entry.reply_for(
                        req.data, edns is not None and edns.dnssec_ok, edns is not None,
                        req.udp_limit if proto == "udp" else None, now, self._nsid(q))
                    if type(entry) is StaleReply:
                        self.stale_answers += 1
                    self._count(entry.rcode, UPSTREAM, truncated)
            except Exception:
                log.exception("forwarded lookup: the reply to a client failed")
                out = servfail(req.data) if req is not None else None
            try:
                done(ctx, out)
            except Exception:
                log.exception("forwarded lookup: a waiter failed")

    def answer_cached(self, data: bytes, q: Query, udp_limit: int, proto: str
                      ) -> bytes | CacheKey:
        """The cached reply to ``data`` if there is one; else the query's cache key, for
        :meth:`submit` (``ForwardRequest.key``: the cache is not asked twice).
        Synchronous, never asks upstream.

        The rendered reply minus its ID is memoised under the query minus its ID
        (which fixes the case, flags and EDNS shape, hence every patched byte)
        until the entry's age in whole seconds changes or it expires. A repeated
        query then costs a lookup, a clock read and a concatenation.
        """
        served = (self._served_udp if proto == "udp" else self._served_tcp).get(data[2:])
        if served is not None and self.clock() < served.until:
            return self._serve_memo(data, served)
        key = cache_key(q)
        out = self._from_cache(data, q, udp_limit, proto, key)
        return key if out is None else out

    def _serve_memo(self, data: bytes, served: Served) -> bytes:
        responses = self.tally.responses
        key = served.count_key
        responses[key] = responses.get(key, 0) + 1
        if served.truncated:
            self.tally.truncated += 1
        return data[:2] + served.tail

    def _from_cache(self, data: bytes, q: Query, udp_limit: int, proto: str, key: CacheKey
                    ) -> bytes | None:
        now = self.clock()
        edns = q.edns
        dnssec_ok = key[3]
        entry = self.cache.get(key, now)
        if entry is None or type(entry) is StaleReply:
            return self._serve_stale(key, q, data, dnssec_ok, edns is not None,
                                     udp_limit if proto == "udp" else None, now, entry)
        if now >= entry.prefetch_at:
            self._prefetch(key, q, entry)
        if type(entry) is ChasedReply:
            return self._serve_chased(entry, data, dnssec_ok, edns is not None,
                                      udp_limit if proto == "udp" else None, now,
                                      self._nsid(q))
        out, truncated = entry.reply_for(data, dnssec_ok, edns is not None,
                                         udp_limit if proto == "udp" else None, now,
                                         self._nsid(q))
        memo = self._served_udp if proto == "udp" else self._served_tcp
        if len(memo) >= self._memo_limit:
            memo.clear()  # bounded; rebuilt from the cache on the next hits
        age = int(now - entry.stored)
        # Same TTLs until then; and the first hit past prefetch_at must reach this code.
        until = min(entry.expires, entry.stored + age + 1, entry.prefetch_at)
        memo[data[2:]] = Served(until, out[2:], (entry.rcode, CACHE), truncated)
        self._count(entry.rcode, CACHE, truncated)
        return out

    def _serve_stale(self, key: CacheKey, q: Query, data: bytes, dnssec_ok: bool,
                     edns: bool, limit: int | None, now: float,
                     entry: CachedReply | None) -> bytes | None:
        """A stale answer (RFC 8767) when the upstreams are known to fail, else None.

        ``entry``: a stale answer within its refresh period (answered, the upstreams
        left alone), or None: an expired stale answer is answered at once and the
        upstreams asked in the background. Never memoised: each answer is counted."""
        if entry is None:
            entry = self.cache.get_stale(key, now)
            if type(entry) is not StaleReply:
                return None  # no stale answer, or one never tried again: ask first
            self._refresh(key, q)
        out, truncated = entry.reply_for(data, dnssec_ok, edns, limit, now, self._nsid(q))
        self.stale_answers += 1
        self._count(entry.rcode, CACHE, truncated)
        return out

    def _prefetch(self, key: CacheKey, q: Query, entry: CachedReply) -> None:
        """A hit in the last 10% of ``entry``'s lifetime: refresh it in the background,
        once (an entry is prefetched at most once; the fresh one gets its own turn)."""
        entry.prefetch_at = float("inf")
        if self._refresh(key, q, entry):
            self.prefetches += 1

    def _refresh(self, key: CacheKey, q: Query, keep: CachedReply | None = None) -> bool:
        """Ask the upstreams for ``key`` in the background (one lookup at a time);
        ``keep``: the entry that stays if they all fail (a prefetch). False: not asked
        (already in flight, dns.max_inflight reached, shutting down)."""
        if key in self._inflight or len(self._inflight) >= self.max_inflight or self._closed:
            return False
        lookup = self._begin(key, q, keep)
        if lookup is None:
            return False
        lookup.start()
        return True

    def _count(self, rcode: int, source: str, truncated: bool) -> None:
        self.tally.response(rcode, source)
        if truncated:
            self.tally.truncated += 1

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    # ---------------------------------------------------------------- one lookup

    def _begin(self, key: CacheKey, q: Query, keep: CachedReply | None = None,
               question: bytes | None = None) -> Lookup | None:
        """A lookup for ``key`` (registered as in flight, not started: Lookup.start);
        None when the name is in no forward zone. ``keep`` (a prefetch): the cached
        entry, left as it is if every upstream fails. ``question``: the question's wire
        form if the caller has it (else built from ``q``)."""
        route = self.route_for(q.labels)
        if route is None:  # stub zones only, and the name is in none of them
            return None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self.timeouts = Timeouts(loop)
        lookup = Lookup(self, key, q, question or question_wire(q), route.upstreams,
                        route.protocol, self.budget, self._owned, keep, loop)
        self._inflight[key] = lookup
        return lookup

    def _settle(self, lookup: Lookup, parsed: ParsedReply | None) -> CachedReply:
        """A lookup is over: cache and return what to answer (maybe SERVFAIL)."""
        key, q, keep = lookup.key, lookup.q, lookup.keep
        if self._inflight.get(key) is lookup:
            del self._inflight[key]
        now = self.clock()
        if parsed is None and keep is not None and keep.expires > now:
            return keep  # a failed prefetch: the entry stays (expired: as any failure)
        if parsed is None:
            expired = self.cache.get_stale(key, now)
            # Every upstream failed: an expired answer within dns.serve_stale, with TTL
            # dns.serve_stale_ttl.
            entry = StaleReply(expired, now, self.policy) if expired is not None else \
                self._servfail(q, now, failure_ede(lookup.results))
            self.cache.put(key, entry)
            return entry
        if parsed.dropped:
            scrubbed = self.scrubbed
            for reason, n in parsed.dropped.items():
                scrubbed[reason] = scrubbed.get(reason, 0) + n
        parsed = self.policy.bound(parsed)
        entry = self._chase(key, q, parsed, len(lookup.question), now) \
            or CachedReply(parsed, now, parsed.lifetime)
        self.cache.put(key, entry)
        entry.upstream = lookup.order[lookup.index].label  # for /v1/resolve
        return entry

    def _owns_now(self, name: bytes) -> bool:
        """What the reply scrubber asks (``_owned``): is this name one the current zone
        answers? The zone of the moment the reply is scrubbed, not a snapshot kept."""
        assert self._zone is not None
        return owns(self._zone(), name)

    @staticmethod
    def _health(up: Upstream, change: str | None, result: str) -> None:
        # One line per change of state, never one per query.
        if change == "down":
            log.warning("upstream %s failing (%s): asked last until it answers again",
                        up.label, result)
        elif change == "up":
            log.info("upstream %s answers again", up.label)

    def _servfail(self, q: Query, now: float, ede: bytes = b"") -> CachedReply:
        return self._error(q, now, RCODE_SERVFAIL, ede)

    @staticmethod
    def _error(q: Query, now: float, rcode: int, ede: bytes) -> CachedReply:
        question = question_wire(q)
        header = bytes((0, 0, 0x80, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 0))
        parsed = ParsedReply(header + question, rcode, 12 + len(question), (), (), 0)
        entry = CachedReply(parsed, now, SERVFAIL_TTL)
        entry.ede = ede
        return entry

    def _nsid(self, q: Query) -> bytes:
        """The NSID option for a client that asked for it (RFC 5001), else nothing."""
        return self.nsid if q.edns is not None and q.edns.nsid else b""

    # ---------------------------------------------------------------- CNAME chasing

    def _chase(self, key: CacheKey, q: Query, parsed: ParsedReply, question_len: int,
               now: float) -> CachedReply | None:
        """The entry for an answer whose CNAME chain ends at one of our names (or
        SERVFAIL for a loop or a chain too long); None: cache the reply as it is."""
        if q.qtype == T_CNAME or parsed.wire.find(_CNAME_IN, parsed.qend) < 0:
            return None  # no CNAME record anywhere after the question: nothing to follow
        try:
            chain = follow_chain(parsed.wire, parsed.qend, q.labels)
        except ReplyRejected:
            return None  # a name we cannot follow in a reply parse_reply accepted: as is
        if chain is None or q.qtype == T_CNAME:
            return None
        if chain.loop:
            return self._chase_refused("loop", q, now)
        if self._zone is None:
            return None
        zone = self._zone()
        decision = local_decision(zone, chain, q.qtype, q.qclass)
        if decision is None:
            return None
        if total_links(chain, decision) > MAX_LINKS:
            return self._chase_refused("too_long", q, now)
        part = upstream_part(parsed, question_len, chain, now)
        if part is None:
            return None
        self.chased += 1
        return ChasedReply(key, part, zone, decision, now)

    def _chase_refused(self, reason: str, q: Query, now: float) -> CachedReply:
        self.chase_refused[reason] = self.chase_refused.get(reason, 0) + 1
        log.debug("CNAME chain of %s: %s, SERVFAIL", b".".join(q.labels).decode("latin-1"),
                  reason)
        return self._servfail(q, now)

    def _current(self, entry: ChasedReply, now: float) -> ChasedReply | None:
        """``entry`` as of the current zone: rebuilt from its upstream part when the
        registry changed since it was built; None when the target is no longer ours
        (the entry is dropped and the upstream asked again)."""
        assert self._zone is not None  # a chased entry exists only with a zone
        zone = self._zone()
        if entry.current(zone):
            return entry
        key, part = entry.key, entry.part
        decision = local_decision(zone, part.chain, key[1], key[2])
        fresh = None
        if decision is not None and total_links(part.chain, decision) <= MAX_LINKS:
            fresh = ChasedReply(key, part, zone, decision, now)
        if fresh is None or fresh.expires <= now:
            self.cache.discard(key)
            return None
        fresh.upstream = entry.upstream
        self.cache.put(key, fresh)
        return fresh

    def _serve_chased(self, entry: ChasedReply, data: bytes, dnssec_ok: bool, edns: bool,
                      limit: int | None, now: float, nsid: bytes = b"") -> bytes | None:
        # Never memoised in _served_*: that path does not look at the registry.
        current = self._current(entry, now)
        if current is None:
            return None
        out, truncated = current.reply_for(data, dnssec_ok, edns, limit, now, nsid)
        self._count(current.rcode, CACHE, truncated)
        return out

    async def entry_for(self, q: Query) -> CachedReply | None:
        """What DNS answers ``q`` from: the cache, else one (coalesced) lookup. Counts
        no response (for /v1/resolve); None while shutting down or overloaded."""
        key = cache_key(q)
        now = self.clock()
        entry = self.cache.get(key, now)
        if type(entry) is ChasedReply:
            entry = self._current(entry, now)
        if entry is not None:
            return entry
        if self._closed:
            return None
        lookup = self._inflight.get(key)
        fresh = lookup is None
        if lookup is None:
            if len(self._inflight) >= self.max_inflight:
                return None
            lookup = self._begin(key, q)
            if lookup is None:
                return self._error(q, now, RCODE_REFUSED, NO_ZONE)
        future: asyncio.Future[CachedReply | None] = asyncio.get_running_loop().create_future()
        lookup.waiters.append((None, "", _resolve_future, future))
        if fresh:
            lookup.start()
        return await future

    # ---------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Cancel every lookup in flight; waiting clients get no reply."""
        self._closed = True
        lookups = list(self._inflight.values())
        self._inflight.clear()
        tasks = [lk.task for lk in lookups if lk.task is not None]
        for lookup in lookups:
            lookup.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.timeouts is not None:
            self.timeouts.close()
        for up in self.upstreams:
            up.close()
        self.cache.clear()
        self._served_udp.clear()
        self._served_tcp.clear()
