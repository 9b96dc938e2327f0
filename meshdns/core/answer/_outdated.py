"""What a registry change outdates in the reply caches (see _handler.py).

Every cached reply is indexed by the name whose owner decides it, or listed as
negative (it carries the SOA, whose serial is the registry revision). A PATCH
says which services it wrote or deleted; only the names those services owned or
own can have a new answer, so only their replies and the negative ones go.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..registry import (
    Entry,
    HostnameTemplate,
    MeshService,
    Service,
    canonical_name,
    kuma_name,
    mesh_builtin_ports,
)
from ._wire import wire_to_key
from ._zone import APEX, NOT_LOADED, SEARCH, WILDCARD, Decision, Zone

# A PATCH touching more services than this empties the caches instead: working out
# what it outdated would cost more than answering the names again.
SELECTIVE_DROP_LIMIT = 1000


class CacheIndex:
    """Which cache keys a registry change can outdate: by name, and the negative ones.

    A name asked one way only (the common case) maps to its one key, not a list.
    """

    __slots__ = ("names", "negative")

    def __init__(self) -> None:
        self.names: dict[str, bytes | list[bytes]] = {}  # lower-case name -> cache key(s)
        self.negative: list[bytes] = []  # replies carrying the SOA (serial = revision)

    def add(self, key: bytes, name: str | None) -> None:
        if name is None:
            self.negative.append(key)
            return
        keys = self.names.setdefault(name, key)
        if keys is not key:
            if isinstance(keys, bytes):
                self.names[name] = [keys, key]
            else:
                keys.append(key)

    def take(self, names: set[str]) -> list[bytes]:
        """Remove and return the keys of ``names`` and every negative answer's."""
        out = self.negative
        self.negative = []
        for name in names:
            keys = self.names.pop(name, None)
            if isinstance(keys, bytes):
                out.append(keys)
            elif keys is not None:
                out += keys
        return out


def decision_name(key: str, decision: Decision) -> str | None:
    """The name whose owner decides a cached dnslib-path reply (None: a negative answer).

    A search-list answer is decided by the mesh name its CNAME points at; a wildcard
    answer is kept as a negative one (a new name anywhere may change its closest
    encloser).
    """
    if decision.authority or decision.rule in (APEX, NOT_LOADED, WILDCARD):
        return None  # WILDCARD: any new name can change the closest encloser
    if decision.rule == SEARCH and decision.answer:
        return wire_to_key(tuple(decision.answer[0].rdata.label.label))
    return key


def service_names(svc: Service, domains: Iterable[str]) -> list[str]:
    """Every name whose answer ``svc`` decides or could take over: its two forms in
    each served domain, its host names, the reverse names of its VIPs."""
    out = list(svc.hostnames)
    for domain in domains:
        out.append(canonical_name(svc.name, svc.namespace, svc.port, domain))
        kuma = kuma_name(svc.name, svc.namespace, svc.port, domain)
        if kuma is not None:
            out.append(kuma)
    out.append(".".join(str((svc.vip >> shift) & 0xFF) for shift in (0, 8, 16, 24))
               + ".in-addr.arpa")
    if svc.vip6 is not None:
        out.append(".".join(reversed(f"{svc.vip6:032x}")) + ".ip6.arpa")
    return out


def _reverse_names(vip: int | None, vip6: int | None) -> list[str]:
    out = []
    if vip is not None:
        out.append(".".join(str((vip >> shift) & 0xFF) for shift in (0, 8, 16, 24))
                   + ".in-addr.arpa")
    if vip6 is not None:
        out.append(".".join(reversed(f"{vip6:032x}")) + ".ip6.arpa")
    return out


def mesh_service_names(svc: MeshService, domains: Iterable[str],
                       templates: Sequence[HostnameTemplate]) -> list[str]:
    """``service_names`` of a mesh service (under the default names): its host names and
    their SRV owner names, its built-in per-port names, the reverse names of its VIPs."""
    out = list(svc.hostnames)
    for host in svc.hostnames:
        for port in svc.ports:
            if port.srv_name is not None:
                out.append(f"{port.srv_name}.{host}")
                out.append(f"_{port.transport}.{host}")
    for domain in domains:
        for builtin, name, namespace, port_number in mesh_builtin_ports(svc, templates):
            own = canonical_name(name, namespace, port_number, domain) \
                if builtin == "canonical" else kuma_name(name, namespace, port_number, domain)
            if own is not None:
                out.append(own)
    for endpoint in svc.endpoints or ():  # per-endpoint names, their PTRs (section 4)
        if endpoint.name is not None:
            out += [f"{endpoint.name}.{host}" for host in svc.hostnames]
            out += _reverse_names(*((endpoint.address, None) if endpoint.version == 4
                                    else (None, endpoint.address)))
    return out + _reverse_names(svc.vip, svc.vip6)


def _entry_names(svc: Entry, domains: Iterable[str],
                 templates: Sequence[HostnameTemplate]) -> list[str]:
    if isinstance(svc, MeshService):
        return mesh_service_names(svc, domains, templates)
    return service_names(svc, domains)


def outdated_names(old: Zone, new: Zone) -> set[str] | None:
    """The names whose cached replies ``new`` may answer differently from ``old``
    (negative answers aside: those always go), or None when that is not known.

    Known only for an incremental PATCH of the very snapshot ``old`` serves, under
    the same settings: it says which services it wrote or deleted. Every name such
    a service owned or owns (in every domain, host names, reverse names) can have a
    new answer, a new owner, or none; no other name can.
    """
    if old.settings != new.settings or old.loaded != new.loaded:
        return None
    base, reg = old.registry, new.registry
    if reg is base:
        return set()
    if not (base.names.is_default and reg.names.is_default):
        # Rendered template names and dns.select are not listed per service here:
        # empty everything (correct, if slower to warm again).
        return None
    touched = reg.touched_since(base)
    if touched is None:
        return None
    keys = (*touched[0], *touched[1])
    if len(keys) > SELECTIVE_DROP_LIMIT:
        return None
    names: set[str] = set()
    templates = reg.names.templates
    for key in keys:
        for svc in (base.entry_map.get(key), reg.entry_map.get(key)):
            if svc is not None:
                names.update(_entry_names(svc, new.settings.domains, templates))
    return names
