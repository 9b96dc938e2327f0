"""Names no entry can own: a forwarded miss without the local answer path.

A query for a name meshdns does not serve (``n7.new.example.com``) used to cost, on a
reply-cache miss, the wire fast path's attempt (parse, lookup key, ``Zone.locate``:
abandoned), the strict parse, ``Zone.decide`` (the key again, ``locate`` again, the
reverse and search-list rules) and ``wire_to_key`` once more: about a quarter of the
core's time per forwarded miss. ``OwnedNames.forwarded`` reads the question once,
asks whether anything of the zone could answer the name, and when nothing can hands
the transport the parsed query and its key: what the strict parser and
``Zone.decide`` would have concluded (FORWARD), with the same ``Query``.

"Could answer" is asked of the zone's own data, never assumed from the served
domains, and errs on the side of the full path (which stays the reference):

- a name at or under a served domain (``Zone.settings.domains``), or under
  ``<domain>.<search suffix>`` (the search-list shortcut);
- any name under ``arpa`` (VIPs' reverse names, the reverse zones of the VIP ranges);
- an explicit host name (``Registry.hostnames``) or a rendered template name
  (``names.generated``) of any service, hidden ones included, and a wildcard host name
  ``*.<suffix>`` written there for any suffix of the name;
- an underscore name while mesh services exist (``_<port>._<proto>.<host>``).

Anything else under a zone that forwards (``settings.forwarding``) is forwarded by
``Zone.decide`` whatever its type or class; the message must still be one the strict
parser reads the same way (a plain query: one question, at most an OPT of version 0,
no trailing bytes, no AXFR/IXFR/OPT question), else None and the full path answers.
``tests/unit/test_core_forward_shortcut.py`` holds this to ``parse_query`` +
``Zone.decide``.
"""

from __future__ import annotations

from ._fastpath import _DOTTED_LOWER, SERVER_UDP_PAYLOAD
from ._wire import MIN_UDP_PAYLOAD, Edns, Query, WireError, check_options, wire_to_key
from ._zone import Zone

_QUESTION_ONLY = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QD=1, AN=NS=AR=0
_QUESTION_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"  # QD=1, AR=1 (an OPT record)
_OPT_HEAD = b"\x00\x00\x29"  # owner: the root; type OPT
_SLOW_QTYPES = frozenset({41, 251, 252})  # OPT (FORMERR), IXFR, AXFR (REFUSED)

# (query, lookup key, UDP reply limit) of a name that is forwarded outright.
Forwarded = tuple[Query, str, int]


class OwnedNames:
    """What of one zone could own a name, read for the forward shortcut."""

    __slots__ = ("_apexes", "_generated", "_hostnames", "_local", "_mesh", "forwarding")

    def __init__(self, zone: Zone) -> None:
        s = zone.settings
        reg = zone.registry
        self.forwarding = s.forwarding
        self._apexes = frozenset(s.domains)
        self._local = (*("." + d for d in s.domains),
                       *("." + d + "." + sfx for d in s.domains for sfx in s.search),
                       "arpa")
        self._hostnames = reg.hostnames
        self._generated = reg.names.generated
        self._mesh = bool(reg.mesh_keys)

    def may_own(self, key: str) -> bool:
        """True when something of the zone could answer ``key`` (a lookup key) itself."""
        if key.endswith(self._local) or key in self._apexes:
            return True
        hostnames, generated = self._hostnames, self._generated
        if key in hostnames or key in generated:
            return True
        if self._mesh and key[:1] == "_":
            return True
        at = key.find(".")
        while at >= 0:  # wildcard host names: *.<any suffix of the name>
            wild = "*" + key[at:]
            if wild in hostnames or wild in generated:
                return True
            at = key.find(".", at + 1)
        return False

    def forwarded(self, data: bytes) -> Forwarded | None:
        """The query ``data`` (a header already known to be a query's) as the strict parser
        reads it, its key and UDP limit, when ``Zone.decide`` would forward it; else None."""
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
                    return None  # a pointer or an unknown label type
                long_label = True
            pos += 1 + length
            count += 1
        if pos > 12 + 254 or not count:
            return None  # over 255 bytes (FORMERR), or the root
        qend = pos + 5
        if qend > end:
            return None
        # The lookup key as wire_to_key writes it (see FastPath.answer): one translate
        # when every label is plain, else label by label.
        labels: tuple[bytes, ...] | None = None
        dotted = b"" if long_label else data[13:pos].translate(_DOTTED_LOWER)
        if long_label or dotted.count(b".") != count - 1:
            labels = _labels(data, pos)
            key = wire_to_key(labels)
        else:
            key = dotted.decode("latin-1")
        if self.may_own(key):
            return None
        qtype = (data[pos + 1] << 8) | data[pos + 2]
        if qtype in _SLOW_QTYPES:
            return None
        edns: Edns | None = None
        limit = MIN_UDP_PAYLOAD
        if opt:
            rdata = qend + 11
            if rdata > end or data[qend : qend + 3] != _OPT_HEAD or data[qend + 6]:
                return None  # not an OPT owned by the root, or EDNS version > 0 (BADVERS)
            if (data[qend + 9] << 8) | data[qend + 10] != end - rdata:
                return None  # trailing bytes, or cut short
            try:
                nsid = check_options(data, rdata, end)
            except WireError:
                return None
            size = (data[qend + 3] << 8) | data[qend + 4]
            edns = Edns(max(size, MIN_UDP_PAYLOAD), 0, bool(data[qend + 7] & 0x80), nsid)
            limit = max(MIN_UDP_PAYLOAD, min(size, SERVER_UDP_PAYLOAD))
        elif qend != end:
            return None
        if labels is None:
            labels = _labels(data, pos)
        query = Query((data[0] << 8) | data[1], (data[2] << 8) | data[3], labels, qtype,
                      (data[pos + 3] << 8) | data[pos + 4], edns)
        return query, key, limit


def _labels(data: bytes, end: int) -> tuple[bytes, ...]:
    """The question's labels (already walked: they end at ``end``)."""
    out = []
    pos = 12
    while pos < end:
        length = data[pos]
        out.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
    return tuple(out)
