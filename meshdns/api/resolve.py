"""``/v1/resolve``: how a name resolves, by the very code path DNS answers with."""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web
from dnslib import CLASS, QTYPE, RR, DNSLabel, DNSRecord

from ..core.answer import RCODE_SERVFAIL, Query, explain_names, rcode_name
from ..dns.chase import ChasedReply
from ..dns.forwarder import Forwarder
from .state import STATE_KEY, ApiError

MAX_WIRE_NAME = 255


def _mnemonic(table: Any, value: int, prefix: str) -> str:
    name = table.forward.get(value)
    return name if isinstance(name, str) else f"{prefix}{value}"


def parse_code(text: str, table: Any, prefix: str, field: str) -> int:
    """``AAAA``, ``aaaa``, ``28`` or ``TYPE28`` (RFC 3597) -> 28; else 400."""
    upper = text.strip().upper()
    value = table.reverse.get(upper)
    if value is None:
        digits = upper.removeprefix(prefix)
        if digits.isascii() and digits.isdigit() and len(digits) <= 5:
            value = int(digits)
    if value is None or not 0 <= value <= 0xFFFF:
        raise ApiError(400, f"{field} must be a record {field} like "
                       + ("A, AAAA, SRV or TYPE65" if field == "type" else "IN or CH")
                       + f", got {text!r}", field)
    return int(value)


def parse_name(text: str | None) -> tuple[bytes, ...]:
    if not text:
        raise ApiError(400, "name is required, e.g. name=frontend.kong.svc.80.mesh", "name")
    if not text.isascii():
        raise ApiError(400, "name must be ASCII (use the IDNA xn-- form)", "name")
    name = text[:-1] if text.endswith(".") else text
    if not name:
        return ()
    labels = tuple(label.encode() for label in name.split("."))
    if any(not 1 <= len(label) <= 63 for label in labels):
        raise ApiError(400, "name has an empty label or one longer than 63 bytes", "name")
    if sum(len(label) + 1 for label in labels) + 1 > MAX_WIRE_NAME:
        raise ApiError(400, "name is longer than 255 bytes on the wire", "name")
    return labels


def record(rr: RR) -> dict[str, Any]:
    return {"name": str(rr.rname), "type": _mnemonic(QTYPE, rr.rtype, "TYPE"),
            "ttl": rr.ttl, "data": str(rr.rdata)}


async def resolve(request: web.Request) -> web.Response:
    st = request.app[STATE_KEY]
    server = st.server
    labels = parse_name(request.query.get("name"))
    qtype = parse_code(request.query.get("type", "A"), QTYPE, "TYPE", "type")
    qclass = parse_code(request.query.get("class", "IN"), CLASS, "CLASS", "class")
    handler = server.handler
    client = request.query.get("client")
    view = 0
    if client is not None:
        try:
            ipaddress.ip_address(client)
        except ValueError:
            raise ApiError(400, f"client must be an IP address, got {client[:64]!r}",
                           "client") from None
        view = server.client_view(client)
    zone = handler.view_zone(view)
    revision = zone.registry.revision
    decision = handler.explain(labels, qtype, qclass, view)
    forwarded = decision.forward
    out: dict[str, Any] = {
        "name": request.query["name"],
        "type": _mnemonic(QTYPE, qtype, "TYPE"),
        "class": _mnemonic(CLASS, qclass, "CLASS"),
        "revision": revision,
        "rule": decision.rule,
        # A forwarded name's rcode is the upstream's: filled in below once it is asked.
        "rcode": None if forwarded else rcode_name(decision.rcode),
        "authoritative": decision.aa,
        "zone": decision.zone,
        "service": decision.service.to_json() if decision.service is not None else None,
        "answer": [record(rr) for rr in decision.answer],
        "authority": [record(rr) for rr in decision.authority],
        "additional": [record(rr) for rr in decision.additional],
    }
    if client is not None:
        # Which view answers this client (dns.views, first match; 0: dns.select).
        out["client"] = client
        out["view"] = {"index": view, "select": {"matchLabels": dict(
            zone.registry.names.select)}}
    # Which hostname template named the service, or which dns.select hid it.
    out.update(explain_names(zone, labels, decision))
    if forwarded:
        out["upstreams"] = [str(hp) for hp in server.upstreams]
        out["chase"] = None
        if server.forwarder is None:  # between SIGHUPs only: DNS answers SERVFAIL too
            out["rcode"] = rcode_name(RCODE_SERVFAIL)
        else:
            await _explain_forward(server.forwarder, labels, qtype, qclass, out)
    return web.json_response(out)


async def _explain_forward(forwarder: Forwarder, labels: tuple[bytes, ...], qtype: int,
                           qclass: int, out: dict[str, Any]) -> None:
    """What DNS answers a forwarded name with: the forwarder's cached reply, else one
    upstream lookup (counted in meshdns_upstream_requests_total, as DNS's would be, and
    cached for DNS; no DNS response is counted). The upstream's rcode, AA flag and
    records as the forwarder got them (TTLs aged as DNS serves them); for an answer that
    ends at one of our names, the upstream's CNAME chain, then our answer (``chase``)."""
    query = Query(id=0, flags=0x0100, labels=labels, qtype=qtype, qclass=qclass, edns=None)
    route = forwarder.route_for(labels)
    # Which dns.forward zone the name is in, and which of its upstreams gave the answer.
    out["forward"] = None if route is None else {
        "zone": route.zone, "protocol": route.protocol,
        "upstreams": [up.label for up in route.upstreams], "answered_by": None}
    if route is not None:
        out["upstreams"] = out["forward"]["upstreams"]
    entry = await forwarder.entry_for(query)
    if route is not None:
        out["forward"]["answered_by"] = forwarder.answered_by(query)
    if entry is None:
        out["rcode"] = rcode_name(RCODE_SERVFAIL)  # overloaded or shutting down, as DNS
        return
    if not isinstance(entry, ChasedReply):
        age = max(0, int(forwarder.clock() - entry.stored))
        reply = DNSRecord.parse(entry.render(age))
        out.update(rcode=rcode_name(entry.rcode), authoritative=bool(reply.header.aa),
                   answer=[record(rr) for rr in reply.rr],
                   authority=[record(rr) for rr in reply.auth],
                   additional=[record(rr) for rr in reply.ar if rr.rtype != QTYPE.OPT])
        return
    part, local = entry.part, entry.decision
    upstream = [record(rr) for rr in part.answer]
    mine = {
        "answer": [record(rr) for rr in local.answer],
        "authority": [record(rr) for rr in local.authority],
        "additional": [record(rr) for rr in local.additional],
    }
    service = local.service.to_json() if local.service is not None else None
    out.update(rcode=rcode_name(entry.rcode), service=service,
               answer=upstream + mine["answer"], authority=mine["authority"],
               additional=mine["additional"])
    out["chase"] = {
        "upstream": upstream,
        "links": part.chain.links,
        "target": str(DNSLabel(part.chain.target)),
        "rule": local.rule,
        "rcode": rcode_name(local.rcode),
        "zone": local.zone,
        "service": service,
        **mine,
    }
