"""Optional per-query log (``log.queries: true``): one line per message, off by default.

It wraps the resolver's entry points, so when it is off the hot path does not
even test a flag.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..core.names import wire_to_key
from ..core.resolver import ForwardRequest
from ..core.wire import WireError, parse_query
from ..core.zone import qtype_name

log = logging.getLogger("meshdns.query")
Handle = Callable[[bytes], bytes | ForwardRequest | None]
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


def describe(data: bytes) -> str:
    try:
        q = parse_query(data)
    except WireError:
        return f"unparsable message of {len(data)} bytes"
    return f"id={q.id} {wire_to_key(q.labels) or '.'} {qtype_name(q.qtype)}"


def wrap(handle: Handle, proto: str) -> Handle:
    def logged(data: bytes) -> bytes | ForwardRequest | None:
        out = handle(data)
        if out is None:
            outcome = "dropped"
        elif isinstance(out, ForwardRequest):
            outcome = "forwarded"
        else:
            rcode = out[3] & 0x0F
            outcome = RCODES[rcode] if rcode < len(RCODES) else str(rcode)
            if out[2] & 0x02:
                outcome += " TC"
        log.info("%s %s -> %s", proto, describe(data), outcome)
        return out
    return logged
