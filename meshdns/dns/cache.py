"""The cache of upstream replies: wire bytes with their TTLs counted down on the way out.

An entry keeps the upstream reply (OPT removed) and the offset of every TTL in
it. Serving it copies the bytes once per client and patches the ID, the flags
and the question (the client's case, RFC 5452 / 0x20). TTLs are re-patched only
when the entry's age in whole seconds changes, so a hit costs a dict lookup,
one bytearray copy and a few slice assignments: no parse, no encode.

Keys are ``(lower-cased name, qtype, qclass, DO, CD)``: the bits that change
what an upstream returns. Bounded by ``dns.cache_size`` (least recently used
entry evicted first); an expired entry is dropped when it is next looked up,
unless serve-stale (RFC 8767, ``dns.serve_stale``) keeps it: a NOERROR or
NXDOMAIN answer stays until that long after it expired, not served as a hit
but there for ``get_stale`` when every upstream fails (see :class:`StaleReply`).

:class:`CachePolicy` is the cache's slice of the dns config: the TTL bounds an
upstream reply gets before it is cached (``bound``), the serve-stale timings and
prefetch. Prefetch (unbound ``prefetch``, CoreDNS ``cache { prefetch }``): an
entry asked again in the last ``PREFETCH_SHARE`` of its lifetime is asked
upstream again in the background, once per entry (``CachedReply.prefetch_at``);
the hit stays a hit.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, replace

from ..config import DnsConfig
from ..core.answer import (
    EDE_NETWORK_ERROR,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_STALE_ANSWER,
    EDE_STALE_NXDOMAIN,
    OPTION_EDE,
    OPTION_NSID,
    RCODE_NXDOMAIN,
)
from .reply import MAX_CACHE_TTL, ParsedReply

CacheKey = tuple[bytes, int, int, bool, bool]

HEADER_LEN = 12
SERVER_UDP_PAYLOAD = 1232  # the OPT we send clients, like the local answers
_OPT = struct.pack("!BHHBBHH", 0, 41, SERVER_UDP_PAYLOAD, 0, 0, 0, 0)
_OPT_DO = struct.pack("!BHHBBHH", 0, 41, SERVER_UDP_PAYLOAD, 0, 0, 0x8000, 0)
_pack_ttl = struct.Struct("!I").pack_into
_ANSWER_RCODES = (0, 3)  # NOERROR, NXDOMAIN: bounded, served stale, prefetched
PREFETCH_SHARE = 0.1  # prefetched when asked in the last 10% of the lifetime (as unbound)
_NEVER = float("inf")


def _ede(code: int, text: str) -> bytes:
    body = code.to_bytes(2, "big") + text.encode()
    return OPTION_EDE.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


# The Extended DNS Errors (RFC 8914) of forwarded answers.
STALE = _ede(EDE_STALE_ANSWER, "stale answer: every upstream failed")
STALE_NXDOMAIN = _ede(EDE_STALE_NXDOMAIN, "stale answer: every upstream failed")
NO_REACHABLE_UPSTREAM = _ede(EDE_NO_REACHABLE_AUTHORITY, "no upstream answered")
UPSTREAM_NETWORK_ERROR = _ede(EDE_NETWORK_ERROR, "network error reaching the upstreams")


def opt_record(dnssec_ok: bool, options: bytes = b"") -> bytes:
    """The OPT record sent to an EDNS client, with ``options`` (NSID, EDE) if any."""
    if not options:
        return _OPT_DO if dnssec_ok else _OPT
    return struct.pack("!BHHBBHH", 0, 41, SERVER_UDP_PAYLOAD, 0, 0,
                       0x8000 if dnssec_ok else 0, len(options)) + options


def nsid_option(nsid: bytes | None) -> bytes:
    """The NSID option (RFC 5001) with this server's id; b"" when it has none."""
    if not nsid:
        return b""
    return OPTION_NSID.to_bytes(2, "big") + len(nsid).to_bytes(2, "big") + nsid


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How forwarded replies are kept: the cache's part of ``dns``."""

    min_ttl: int = 0  # dns.cache_min_ttl / cache_max_ttl: positive answers
    max_ttl: int = 86400
    negative_min_ttl: int = 0  # dns.cache_negative_*: NXDOMAIN and NODATA with an SOA
    negative_max_ttl: int = 3600
    stale: float = 86400.0  # dns.serve_stale: how long past expiry; 0 disables
    stale_ttl: int = 30  # dns.serve_stale_ttl: the TTL of a stale answer (RFC 8767 §4)
    stale_refresh: float = 30.0  # dns.serve_stale_refresh: ask again at most this often
    prefetch: bool = True  # dns.prefetch

    @classmethod
    def from_config(cls, dns: DnsConfig) -> CachePolicy:
        return cls(dns.cache_min_ttl, dns.cache_max_ttl, dns.cache_negative_min_ttl,
                   dns.cache_negative_max_ttl, dns.serve_stale, dns.serve_stale_ttl,
                   dns.serve_stale_refresh, dns.prefetch)

    def bound(self, parsed: ParsedReply) -> ParsedReply:
        """``parsed`` with its lifetime and every TTL within the bounds for its kind.

        Only cacheable answers are touched: a negative answer without an SOA (not
        cached, RFC 2308) and failures stay as they are. TTLs are bounded as served
        too, so a client never keeps an answer longer than we would."""
        if parsed.rcode not in _ANSWER_RCODES or (
                parsed.lifetime <= 0 and (parsed.negative or not parsed.ttls)):
            return parsed
        low, high = (self.negative_min_ttl, self.negative_max_ttl) if parsed.negative \
            else (self.min_ttl, self.max_ttl)
        if low == 0 and high >= MAX_CACHE_TTL:
            return parsed  # parse_reply's own ceiling is no higher: the default, for free
        lifetime = min(max(parsed.lifetime, low), high)
        ttls = tuple(min(max(ttl, low), high) for ttl in parsed.ttls)
        if lifetime == parsed.lifetime and ttls == parsed.ttls:
            return parsed
        return replace(parsed, lifetime=lifetime, ttls=ttls,
                       ttls_on_wire=parsed.ttls_on_wire and ttls == parsed.ttls)


class CachedReply:
    """One upstream reply, ready to be served to any client asking the same question."""

    __slots__ = ("ad", "age", "base", "ede", "expires", "offsets", "prefetch_at", "qend",
                 "rcode", "rendered", "stale_until", "stored", "ttls", "upstream")

    def __init__(self, parsed: ParsedReply, stored: float, lifetime: float) -> None:
        self.base = parsed.wire
        self.offsets = parsed.ttl_offsets
        self.ttls = parsed.ttls
        self.qend = parsed.qend
        self.rcode = parsed.rcode
        self.ad = parsed.wire[3] & 0x20
        self.stored = stored
        self.expires = stored + lifetime
        self.stale_until = self.expires  # kept (not served) until then: see ReplyCache.put
        self.prefetch_at = _NEVER  # set by ReplyCache.put when dns.prefetch is on
        self.age = -1
        self.rendered = parsed.wire
        self.ede = b""  # an Extended DNS Error option (RFC 8914) for EDNS clients
        self.upstream: str | None = None  # the upstream ("host:port") that gave it
        if parsed.ttls_on_wire:
            self.age = 0  # the wire as it came is the reply at age 0: no copy
        else:
            self.render(0)

    def render(self, age: int) -> bytes:
        """The reply with every TTL lowered by ``age`` seconds (memoised per age)."""
        if age != self.age:
            buf = bytearray(self.base)
            for offset, ttl in zip(self.offsets, self.ttls, strict=True):
                _pack_ttl(buf, offset, ttl - age if ttl > age else 0)
            self.rendered = bytes(buf)
            self.age = age
        return self.rendered

    def reply_for(self, data: bytes, dnssec_ok: bool, edns: bool, limit: int | None,
                  now: float, nsid: bytes = b"") -> tuple[bytes, bool]:
        """The reply for the client query ``data``; True when it had to be truncated.

        ``limit`` is the client's UDP payload limit (None over TCP). The question
        in ``data`` starts at offset 12 with no compression, and matches ours but
        for case, so it has the same length and is copied over ours.
        """
        age = int(now - self.stored)
        out = bytearray(self.rendered if age == self.age else self.render(age))
        qend = self.qend
        out[0:2] = data[0:2]
        # QR, opcode QUERY, the client's RD; AA=0: a forwarder is not the authority
        # (and a cached answer must not claim to be, RFC 1035 §6.1).
        out[2] = 0x80 | (data[2] & 0x01)
        # RA; AD only to a client that asked for it with DO or AD (RFC 6840 §5.8); its CD.
        out[3] = 0x80 | (self.ad if dnssec_ok or data[3] & 0x20 else 0) | (data[3] & 0x10) \
            | self.rcode
        out[HEADER_LEN:qend] = data[HEADER_LEN:qend]
        opt = b""
        if edns:
            opt = opt_record(dnssec_ok, nsid + self.ede)
            out += opt
            out[10:12] = (((out[10] << 8) | out[11]) + 1).to_bytes(2, "big")  # ARCOUNT
        if limit is None or len(out) <= limit:
            return bytes(out), False
        # Too big for the client's UDP limit: question (and OPT) only, TC=1; it retries on TCP.
        short = out[:qend]
        short[2] |= 0x02
        short[6:12] = b"\x00\x00\x00\x00\x00\x01" if edns else b"\x00" * 6
        short += opt
        return bytes(short), True




class StaleReply(CachedReply):
    """An expired answer served again because every upstream failed (RFC 8767).

    Every TTL is ``dns.serve_stale_ttl`` and stays so (it does not count down). It is
    a cache hit for ``dns.serve_stale_refresh`` seconds (the upstreams are not asked in
    that time); afterwards it is answered at once while the upstreams are asked in
    the background. It lives no longer than ``dns.serve_stale`` after the original
    answer expired.
    """

    __slots__ = ()

    def __init__(self, expired: CachedReply, now: float, policy: CachePolicy) -> None:
        ttl = policy.stale_ttl
        ttls = (ttl,) * len(expired.ttls)
        super().__init__(ParsedReply(expired.base, expired.rcode, expired.qend,
                                     expired.offsets, ttls, ttl), now, policy.stale_refresh)
        self.ad = expired.ad
        self.stale_until = expired.stale_until
        self.ede = STALE_NXDOMAIN if expired.rcode == RCODE_NXDOMAIN else STALE

    def render(self, age: int) -> bytes:
        return super().render(0) if self.age != 0 else self.rendered


class Served:
    """A reply as served to one exact query (minus its ID), valid until ``until``.

    Until then the entry has neither expired nor aged by a whole second, so the
    same query gets the very same bytes; the counter key is precomputed too.
    """

    __slots__ = ("count_key", "tail", "truncated", "until")

    def __init__(self, until: float, tail: bytes, count_key: tuple[int, str],
                 truncated: bool) -> None:
        self.until = until
        self.tail = tail
        self.count_key = count_key
        self.truncated = truncated


class ReplyCache:
    """LRU map of CacheKey -> CachedReply, bounded by entry count; callers pass the time."""

    def __init__(self, size: int, policy: CachePolicy | None = None) -> None:
        self.size = size
        # policy.stale: dns.serve_stale seconds; 0 (the default here): an expired entry
        # is dropped. policy.prefetch: entries get a prefetch_at.
        self.policy = policy or CachePolicy(stale=0.0, prefetch=False)
        self._entries: OrderedDict[CacheKey, CachedReply] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> CachedReply | None:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            if now >= entry.stale_until:
                del entries[key]
                self.expired += 1
            return None
        entries.move_to_end(key)
        return entry

    def peek(self, key: CacheKey) -> CachedReply | None:
        """The entry for ``key`` as it is (expired or not), its place in the LRU kept."""
        return self._entries.get(key)

    def get_stale(self, key: CacheKey, now: float) -> CachedReply | None:
        """An expired entry still within ``dns.serve_stale``, else None."""
        entry = self._entries.get(key)
        if entry is None or now < entry.expires or now >= entry.stale_until:
            return None
        return entry

    def put(self, key: CacheKey, entry: CachedReply) -> None:
        if self.size <= 0 or entry.expires <= entry.stored:
            return
        policy = self.policy
        if type(entry) is not StaleReply and entry.rcode in _ANSWER_RCODES:
            if policy.stale > 0 and type(entry) is CachedReply:
                entry.stale_until = entry.expires + policy.stale
            if policy.prefetch:
                entry.prefetch_at = entry.expires - (entry.expires - entry.stored) \
                    * PREFETCH_SHARE
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
            self.evicted += 1

    def discard(self, key: CacheKey) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
