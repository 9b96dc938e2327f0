"""Optional per-query log (``log.queries: true``): one line per answered message.

The fields of CoreDNS's ``log`` plugin: client ip:port, query ID, type, class,
name, proto, size, DO bit and EDNS buffer size, then the rcode sent, the reply's
flags, its size and the time meshdns took. A forwarded query is logged when its
reply goes out, so the rcode is the upstream's. Text lines look like CoreDNS's::

    127.0.0.1:52622 - 30214 "A IN example.org. udp 29 false 512" NOERROR qr,rd,ra 58 0.000071s

and JSON lines carry each field as a key. It is off by default: the transports
then take their unlogged path (and UDP its recvmmsg batches).
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.answer import WireError, parse_query, qtype_name, rcode_name
from .reply import reply_rcode

log = logging.getLogger("meshdns.query")

_FLAGS = ((2, 0x80, "qr"), (2, 0x04, "aa"), (2, 0x02, "tc"), (2, 0x01, "rd"),
          (3, 0x80, "ra"), (3, 0x20, "ad"), (3, 0x10, "cd"))


def _client(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def _class_name(qclass: int) -> str:
    return {1: "IN", 3: "CH", 4: "HS", 254: "NONE", 255: "ANY"}.get(qclass, f"CLASS{qclass}")


def exchange_fields(proto: str, addr: Any, query: bytes, reply: bytes | None,
                    seconds: float, forwarded: bool) -> dict[str, Any]:
    """The fields of one query and its reply (``reply`` None: dropped, no reply)."""
    fields: dict[str, Any] = {"client": _client(addr), "proto": proto, "size": len(query)}
    try:
        q = parse_query(query)
    except WireError:
        fields.update(id=int.from_bytes(query[:2], "big") if len(query) >= 2 else None,
                      name=None, type=None, **{"class": None}, do=False, bufsize=512)
    else:
        name = (b".".join(q.labels).decode("ascii", "backslashreplace") + ".") if q.labels \
            else "."
        fields.update(id=q.id, name=name, type=qtype_name(q.qtype),
                      **{"class": _class_name(q.qclass)},
                      do=bool(q.edns and q.edns.dnssec_ok),
                      bufsize=q.edns.udp_size if q.edns else 512)
    if reply is None or len(reply) < 4:
        fields.update(rcode="-", rflags="", rsize=0)
    else:
        fields.update(rcode=rcode_name(reply_rcode(reply)),
                      rflags=",".join(n for i, bit, n in _FLAGS if reply[i] & bit),
                      rsize=len(reply))
    fields.update(duration=round(seconds, 6), forwarded=forwarded)
    return fields


class QueryLog:
    """What the transports call once per answered (or dropped) message."""

    def exchange(self, proto: str, addr: Any, query: bytes, reply: bytes | None,
                 seconds: float, forwarded: bool = False) -> None:
        f = exchange_fields(proto, addr, query, reply, seconds, forwarded)
        log.info('%s - %s "%s %s %s %s %d %s %d" %s %s %d %.6fs', f["client"], f["id"],
                 f["type"], f["class"], f["name"], proto, f["size"],
                 "true" if f["do"] else "false", f["bufsize"], f["rcode"], f["rflags"] or "-",
                 f["rsize"], seconds, extra={"fields": f, "fields_in_message": True})
