"""Answer policy: which records a question gets, from one registry snapshot.

One lookup and one rule, with two encoders:

- ``Zone.locate(name)`` says what a name is in this snapshot (a service's name, an
  empty non-terminal, no name, a domain's apex, a VIP's reverse name) and whose;
- ``service_answer(service, qtype)`` (and ``vip_answer(qtype)``) say which records
  a service's name answers a question type with;
- ``Zone.decide`` turns that into a :class:`Decision` of dnslib records (the
  reference: ``handler.encode`` packs it, ``/v1/resolve`` shows it as JSON), and
  the wire fast path (_fastpath.py) writes the same answer straight to bytes for
  the common questions. Neither looks a name up any other way.

Names are parsed structurally rather than looked up in a table of every name:
``<name>.<ns>.svc.<port>.<domain>`` is split into the service key, so a
registry swap never has to build per-name strings for every service. Names from
other ``dns.hostname_templates`` come from the snapshot's name table (_nametable.py,
rendered when the snapshot was built); services ``dns.select`` hides are absent.
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, CNAME, NS, PTR, QTYPE, RR, SOA, SRV, A, DNSLabel

from ..registry import (
    Entry,
    EntryKey,
    MeshPort,
    MeshService,
    Registry,
    Service,
    VipRange,
    ents_above,
    evolve,
    format_ip,
    mesh_primary_name,
    primary_name,
)
from ._wire import (
    EDE_NOT_AUTHORITATIVE,
    EDE_NOT_READY,
    EDE_NOT_SUPPORTED,
    QCLASS_IN,
    QTYPE_ANY,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    key_to_labels,
    wire_to_key,
)

T_A, T_NS, T_CNAME, T_SOA, T_PTR, T_AAAA, T_SRV = 1, 2, 5, 6, 12, 28, 33
SOA_RNAME = "nobody.invalid"  # RFC 6303 locally served zones
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 1200, 604800

# Decision rules, as shown by /v1/resolve.
CANONICAL, KUMA, HOSTNAME, TEMPLATE = "canonical", "kuma", "hostname", "template"
SRV_PORT = "srv-port"  # _<portname>._<proto>.<name> of a mesh service (one port)
WILDCARD = "wildcard"  # a name synthesized from an owned *.<parent> (RFC 4592)
ENDPOINT = "endpoint"  # <endpoint>.<name> of an address set: that endpoint's address
PTR_RULE, APEX, ENT = "ptr", "apex", "empty-non-terminal"
# The Extended DNS Errors of local answers (the forwarder adds its own).
NOT_READY = (EDE_NOT_READY, "registry not loaded yet")
ONLY_CLASS_IN = (EDE_NOT_SUPPORTED, "only class IN is served")
NO_UPSTREAM = (EDE_NOT_AUTHORITATIVE, "not a served name, and no upstream")
NXDOMAIN, SEARCH, FORWARD, REFUSED = "nxdomain", "search", "forward", "refused"
NOT_LOADED = "not-loaded"
SERVICE_RULES = frozenset({CANONICAL, KUMA, HOSTNAME, TEMPLATE, SRV_PORT, WILDCARD, ENDPOINT})

# What a name is (the first field of a Location, see Zone.locate). The first two are a
# service's: a name under a served domain, or a host (or rendered) name outside them,
# which is its own tiny zone.
SERVICE_NAME, HOST_NAME, VIP_NAME, EMPTY_NAME, NO_NAME, APEX_NAME, UNLOADED_NAME = range(7)
IN_DOMAIN = frozenset({SERVICE_NAME, EMPTY_NAME, NO_NAME, APEX_NAME, UNLOADED_NAME})
# (kind, service or None, rule, apex, domain): ``apex`` is the zone whose SOA a
# negative answer carries (the served domain; a host name itself; None for a VIP's
# reverse name: the reverse zone, found when needed); ``domain`` is the one SRV
# targets and PTR names are written in.
Location = tuple[int, Entry | None, str, str | None, str]

# Which records a service's name answers a question type with: the one answer rule
# both encoders follow (Zone._service_records as dnslib records, FastPath as bytes).
# Anything else is NODATA (the SOA of the name's zone).
NODATA, ANSWER_A, ANSWER_AAAA, ANSWER_A_AAAA, ANSWER_SRV, ANSWER_PTR = range(6)
# As tables, so the wire path reads them without a call: SERVICE_ANSWERS[has an IPv6
# VIP][qtype], VIP_ANSWERS[qtype]; a qtype not in a table is NODATA.
SERVICE_ANSWERS = (
    {T_A: ANSWER_A, QTYPE_ANY: ANSWER_A, T_SRV: ANSWER_SRV},
    {T_A: ANSWER_A, T_AAAA: ANSWER_AAAA, QTYPE_ANY: ANSWER_A_AAAA, T_SRV: ANSWER_SRV},
)
VIP_ANSWERS = {T_PTR: ANSWER_PTR, QTYPE_ANY: ANSWER_PTR}


def service_answer(svc: Service, qtype: int) -> int:
    """What ``svc``'s name answers ``qtype`` with: its A, its AAAA, both (ANY), its SRV
    (with the target's addresses), or NODATA (also AAAA with no IPv6 VIP)."""
    return SERVICE_ANSWERS[svc.vip6 is not None].get(qtype, NODATA)


# Rotation of address sets (docs/meshservice.md section 4): one counter per entry and
# family in this process, shared by its names, both transports and both encoders.
_ROTATION: dict[tuple[EntryKey, int], int] = {}
_MAX_ROTATION = 1 << 16  # counters kept before starting over (entries come and go)


def rotation(key: EntryKey, version: int, count: int) -> int:
    """Where this answer of ``count`` addresses starts: the k-th answer at the k-th
    address (a cyclic shift), then the counter moves on."""
    if count <= 1:
        return 0
    k = (key, version)
    n = _ROTATION.get(k, 0)
    if n == 0 and len(_ROTATION) >= _MAX_ROTATION:
        _ROTATION.clear()
    _ROTATION[k] = n + 1
    return n % count


def endpoint_addresses(svc: MeshService, version: int) -> list[int]:
    """The address set's addresses of one family, in this answer's rotated order."""
    found = [e.address for e in svc.endpoints or () if e.version == version]
    start = rotation(svc.key, version, len(found))
    return found[start:] + found[:start]


def vip_answer(qtype: int) -> int:
    """What a VIP's reverse name answers ``qtype`` with: its PTR, or NODATA."""
    return VIP_ANSWERS.get(qtype, NODATA)


@dataclass(frozen=True)
class ZoneSettings:
    domains: tuple[str, ...] = ("mesh",)
    ttl: int = 30
    negative_ttl: int = 5
    search: tuple[str, ...] = ()
    range4: VipRange | None = None
    range6: VipRange | None = None
    forwarding: bool = False  # an upstream exists: forward, and say RA=1


@dataclass(frozen=True)
class Decision:
    rcode: int
    rule: str
    aa: bool = False
    answer: Sequence[RR] = ()
    authority: Sequence[RR] = ()
    additional: Sequence[RR] = ()
    service: Entry | None = None
    zone: str | None = None
    # Extended DNS Error (RFC 8914) for clients that sent EDNS: (info code, short text).
    ede: tuple[int, str] | None = None

    @property
    def forward(self) -> bool:
        return self.rule == FORWARD


@dataclass(frozen=True)
class _ReverseZone:
    apex: str
    version: int
    prefix: int  # address bits above the zone cut, as an int
    labels: int  # address labels (octets or nibbles) the apex holds


_OCTETS = {str(i): i for i in range(256)}  # exactly the labels octet_label reads
_HEX = "0123456789abcdef"


def ipv4_of_reverse_name(key: str) -> int | None:
    """The address of ``d.c.b.a.in-addr.arpa`` (a name with that suffix), its labels read
    as octet_label reads them; None for any other name."""
    parts = key.split(".")
    if len(parts) != 6:
        return None
    get = _OCTETS.get
    a, b, c, d = get(parts[0]), get(parts[1]), get(parts[2]), get(parts[3])
    if a is None or b is None or c is None or d is None:
        return None
    return (d << 24) | (c << 16) | (b << 8) | a


def ipv6_of_reverse_name(key: str) -> int | None:
    """The address of a full 32-nibble ``….ip6.arpa`` name (a name with that suffix), its
    labels read as _nibble reads them; None for any other name."""
    parts = key.split(".")
    if len(parts) != 34:
        return None
    digits = "".join(parts[31::-1])
    if len(digits) != 32 or digits.strip(_HEX):
        return None  # a label longer than one character, or not a lower-case hex digit
    return int(digits, 16)


def octet_label(label: str) -> int | None:
    if label.isascii() and label.isdigit() and (label == "0" or label[0] != "0"):
        value = int(label)
        if value <= 255:
            return value
    return None


def _nibble(label: str) -> int | None:
    if len(label) == 1 and label in "0123456789abcdef":
        return int(label, 16)
    return None


_PORT_LABELS: dict[str, int] = {}  # valid port labels seen so far (at most 65535)


def _port(label: str) -> int | None:
    if label.isascii() and label.isdigit() and label[0] != "0" and len(label) <= 5:
        value = int(label)
        if value <= 65535:
            _PORT_LABELS[label] = value
            return value
    return None


def reverse_zones(rng: VipRange | None) -> list[_ReverseZone]:
    """The octet- or nibble-aligned zones that cover a VIP range (at most 256)."""
    if rng is None:
        return []
    net = rng.network
    step = 8 if net.version == 4 else 4
    total = 32 if net.version == 4 else 128
    cut = -(-net.prefixlen // step) * step  # round the prefix up to a label boundary
    count = 1 << (cut - net.prefixlen)
    base = int(net.network_address) >> (total - cut)
    zones = []
    for i in range(count):
        prefix = base + i
        digits = [(prefix >> (cut - step * (j + 1))) & ((1 << step) - 1) for j in range(cut // step)]
        if net.version == 4:
            apex = ".".join(str(d) for d in reversed(digits)) + ".in-addr.arpa"
        else:
            apex = ".".join(format(d, "x") for d in reversed(digits)) + ".ip6.arpa"
        zones.append(_ReverseZone(apex.lstrip("."), net.version, prefix, cut // step))
    return zones


@dataclass
class Zone:
    """One registry snapshot under one set of DNS settings.

    ``loaded=False`` is the zone of a server that has no registry yet (a follower
    whose leader has not answered, a leader before its first write): it does not
    know which mesh names exist, so it must not deny any. Every name it would
    answer itself gets SERVFAIL (never an authoritative NXDOMAIN a client would
    cache); names it forwards are forwarded as usual.
    """

    registry: Registry
    settings: ZoneSettings
    loaded: bool = True
    _domains: tuple[str, ...] = field(init=False)
    _dotted: tuple[tuple[str, str], ...] = field(init=False)  # (domain, "." + domain)
    _domain0: str = field(init=False)
    _generated: Mapping[str, tuple[EntryKey, int]] = field(init=False, repr=False)
    _hidden: Container[EntryKey] = field(init=False, repr=False)
    _reverse: dict[str, _ReverseZone] = field(init=False)
    # Empty non-terminals above the explicit host names of visible services, each with
    # how many host names lie below it: built on first use, or evolved from the zone
    # this one replaces (``inherit``), so a PATCH costs O(change) here, not O(hosts).
    _host_ents: Mapping[str, int] | None = field(init=False, default=None, repr=False,
                                                 compare=False)
    # Wildcard host names (docs/meshservice.md section 5): parent -> owner of
    # "*.<parent>", built on the first exact miss (evolved by ``inherit``), and the
    # nodes that exist above owned names (for the closest encloser), built when a
    # question first falls below a wildcard.
    _wild: Mapping[str, EntryKey] | None = field(init=False, default=None, repr=False,
                                                 compare=False)
    _wild_ents: frozenset[str] | None = field(init=False, default=None, repr=False,
                                              compare=False)
    # Named endpoints' reverse index (section 4): built on first use.
    _ptrs: Mapping[tuple[int, int], tuple[tuple[str, EntryKey], ...]] | None = field(
        init=False, default=None, repr=False, compare=False)
    _builtins: frozenset[str] = field(init=False)
    _sorted4: list[int] | None = field(init=False, default=None)
    _sorted6: list[int] | None = field(init=False, default=None)
    # Names the wire fast path (_fastpath.py) encoded for this snapshot, filled as
    # asked; handed on to the next snapshot under the same domains.
    encoded: dict[Any, Any] = field(init=False, default_factory=dict, repr=False,
                                    compare=False)

    def __post_init__(self) -> None:
        s = self.settings
        self._domains = tuple(sorted(s.domains, key=len, reverse=True))  # longest match wins
        self._dotted = tuple((d, "." + d) for d in self._domains)
        self._domain0 = s.domains[0]  # the domain outside names' SRV and PTR targets use
        names = self.registry.names
        self._generated, self._hidden = names.generated, names.hidden
        self._reverse = {z.apex: z for z in reverse_zones(s.range4) + reverse_zones(s.range6)}
        self._builtins = self.registry.names.builtins

    def host_ents(self) -> Mapping[str, int]:
        """The empty non-terminals above visible services' explicit host names."""
        ents = self._host_ents
        if ents is None:
            reg = self.registry
            hidden = reg.names.hidden
            counts: dict[str, int] = {}
            for host, owner in reg.hostnames.items():
                if owner not in hidden:
                    for ent in ents_above(host, self._domains):
                        counts[ent] = counts.get(ent, 0) + 1
            ents = self._host_ents = counts
        return ents

    def inherit(self, old: Zone) -> None:
        """Take over what ``old`` (the zone this one replaces) built that is still true.

        After one incremental PATCH under the same domains, the host-name empty
        non-terminals are ``old``'s evolved by the services the PATCH touched. Those
        ``old`` never needed stay unbuilt: the first question that needs them builds
        them (once per full rebuild; every PATCH after it evolves them).
        """
        reg, base = self.registry, old.registry
        touched = reg.touched_since(base)
        if touched is None:
            return
        wild = old._wild
        if self._wild is None and wild is not None:
            gone_wild: set[str] = set()
            put_wild: dict[str, EntryKey] = {}
            for key in {*touched[0], *touched[1]}:
                for snap, out in ((base, None), (reg, put_wild)):
                    entry = snap.entry_map.get(key)
                    for host in entry.hostnames if entry is not None else ():
                        if host[:2] == "*." and snap.hostnames.get(host) == key:
                            if out is None:
                                gone_wild.add(host[2:])
                            else:
                                out[host[2:]] = key
            if gone_wild or put_wild:
                new_wild = dict(wild)
                for parent in gone_wild:
                    new_wild.pop(parent, None)
                new_wild.update(put_wild)
                wild = new_wild
            self._wild = wild
        before = old._host_ents
        if self._host_ents is not None or before is None or old._domains != self._domains:
            return
        counts: dict[str, int] = {}
        for key in {*touched[0], *touched[1]}:
            for zone, step in ((old, -1), (self, 1)):
                snap = zone.registry
                svc = snap.services.get(key)
                if svc is None or key in snap.names.hidden:
                    continue
                for host in svc.hostnames:
                    if snap.hostnames.get(host) == key:
                        for ent in ents_above(host, self._domains):
                            counts[ent] = counts.get(ent, 0) + step
        gone = [ent for ent, n in counts.items() if n and before.get(ent, 0) + n == 0]
        put = [(ent, before.get(ent, 0) + n) for ent, n in counts.items()
               if n and before.get(ent, 0) + n]
        self._host_ents = evolve(before, gone, put)

    # ------------------------------------------------------------ records

    def mesh_ports(self, key: str, svc: MeshService, rule: str) -> tuple[MeshPort, ...]:
        """The ports the name ``key`` of a mesh service stands for: one port for a
        per-port name (a built-in one, a template with {port}, ``_<portname>._<proto>``),
        else all of them."""
        port: int | None = None
        if rule == SRV_PORT:
            wanted = ".".join(key.split(".", 2)[:2])
            return tuple(p for p in svc.ports if p.srv_name == wanted)[:1]
        if rule == CANONICAL:
            port = _port(key.split(".", 5)[3])
        elif rule == KUMA:
            port = _port(key.split(".", 1)[0].rsplit("_", 1)[1])
        elif rule == TEMPLATE:
            port = self.registry.names.ported.get(key)
        if port is None:
            return svc.ports
        return tuple(p for p in svc.ports if p.port == port)

    def _mesh_records(self, owner: DNSLabel, key: str, svc: MeshService, qtype: int,
                      rule: str, apex: str, domain: str) -> Decision:
        """A mesh service's name (docs/meshservice.md sections 2, 3): A/AAAA of its one
        VIP (none at ``_<portname>._<proto>`` names), SRV of the ports the name stands
        for, targets its canonical name with that name's addresses in additional."""
        ttl = self.settings.ttl
        answer: list[RR] = []
        additional: list[RR] = []
        addresses = rule != SRV_PORT
        if rule == ENDPOINT:  # one endpoint alone (section 4)
            wanted = key.split(".", 1)[0]
            for e in svc.endpoints or ():
                if e.name == wanted and qtype in ((T_A, QTYPE_ANY) if e.version == 4
                                                  else (T_AAAA, QTYPE_ANY)):
                    answer.append(RR(owner, T_A, ttl=ttl, rdata=A(format_ip(e.address, 4)))
                                  if e.version == 4 else
                                  RR(owner, T_AAAA, ttl=ttl,
                                     rdata=AAAA(format_ip(e.address, 6))))
            addresses = False
        if addresses and svc.endpoints is not None:  # an address set (section 4)
            if qtype in (T_A, QTYPE_ANY):
                answer += [RR(owner, T_A, ttl=ttl, rdata=A(format_ip(a, 4)))
                           for a in endpoint_addresses(svc, 4)]
            if qtype in (T_AAAA, QTYPE_ANY):
                answer += [RR(owner, T_AAAA, ttl=ttl, rdata=AAAA(format_ip(a, 6)))
                           for a in endpoint_addresses(svc, 6)]
        if addresses and qtype in (T_A, QTYPE_ANY) and svc.vip is not None:
            answer.append(RR(owner, T_A, ttl=ttl, rdata=A(format_ip(svc.vip, 4))))
        if addresses and qtype in (T_AAAA, QTYPE_ANY) and svc.vip6 is not None:
            answer.append(RR(owner, T_AAAA, ttl=ttl, rdata=AAAA(format_ip(svc.vip6, 6))))
        if qtype == T_SRV:
            canonical = mesh_primary_name(svc, self.registry.names.templates, domain)
            target = key + "." if canonical is None else canonical + "."
            for port in dict.fromkeys(p.port for p in self.mesh_ports(key, svc, rule)):
                answer.append(RR(owner, T_SRV, ttl=ttl, rdata=SRV(0, 100, port, target)))
            if answer:
                if svc.vip is not None:
                    additional.append(RR(target, T_A, ttl=ttl, rdata=A(format_ip(svc.vip, 4))))
                if svc.vip6 is not None:
                    additional.append(RR(target, T_AAAA, ttl=ttl,
                                         rdata=AAAA(format_ip(svc.vip6, 6))))
        if not answer:
            return self._nodata(rule, apex, svc)
        return Decision(RCODE_NOERROR, rule, True, answer, (), additional, svc, apex)

    def _srv_owner(self, key: str, hidden: Container[EntryKey]) -> tuple[int, Entry | None]:
        """``_<portname>._<proto>.H`` or ``_<proto>.H`` below a port-less name ``H`` of a
        visible mesh service: (SERVICE_NAME, the service) for a port it has, (EMPTY_NAME,
        None) for ``_<proto>.H`` when a named port of it uses that protocol, else
        (NO_NAME, None). Only asked once an exact lookup missed."""
        first, _, rest = key.partition(".")
        if first in ("_tcp", "_udp"):
            svc = self._portless_owner(rest, hidden)
            if svc is not None and any(
                    p.srv_name is not None and p.srv_name.endswith("." + first)
                    for p in svc.ports):
                return EMPTY_NAME, None
            return NO_NAME, None
        second, _, host = rest.partition(".")
        if second in ("_tcp", "_udp"):
            svc = self._portless_owner(host, hidden)
            wanted = f"{first}.{second}"
            if svc is not None and any(p.srv_name == wanted for p in svc.ports):
                return SERVICE_NAME, svc
        return NO_NAME, None

    def _portless_owner(self, host: str, hidden: Container[EntryKey]) -> MeshService | None:
        """The visible mesh service whose port-less name (explicit, or rendered from a
        template without {port}) ``host`` is."""
        reg = self.registry
        owner: EntryKey | None = reg.hostnames.get(host)
        if owner is None:
            generated = self._generated.get(host)
            if generated is None or host in reg.names.ported:
                return None
            owner = generated[0]
        if len(owner) != 5 or owner in hidden:
            return None
        svc = reg.entry_map[owner]
        return svc if isinstance(svc, MeshService) else None

    def _endpoint_owner(self, key: str, hidden: Container[EntryKey]) -> MeshService | None:
        """The address set whose endpoint ``<endpoint>.H`` (``H`` a port-less name of it)
        ``key`` is; only asked once an exact lookup missed."""
        first, _, host = key.partition(".")
        if not host:
            return None
        svc = self._portless_owner(host, hidden)
        if svc is None or svc.endpoints is None or host[:2] == "*.":
            return None
        for e in svc.endpoints:
            if e.name == first:
                return svc
        return None

    def endpoint_ptrs(self) -> Mapping[tuple[int, int], tuple[tuple[str, EntryKey], ...]]:
        """(version, address) -> the sorted ``(<endpoint>.<canonical name>, owner)`` of
        every named endpoint at that address (visible entries): built on first use."""
        ptrs = self._ptrs
        if ptrs is None:
            reg = self.registry
            hidden = self._hidden
            found: dict[tuple[int, int], list[tuple[str, EntryKey]]] = {}
            templates = reg.names.templates
            for mkey in reg.mesh_keys:
                svc = reg.entry_map[mkey]
                if not isinstance(svc, MeshService) or svc.endpoints is None or \
                        mkey in hidden:
                    continue
                canonical = mesh_primary_name(svc, templates, self._domain0)
                if canonical is None:
                    continue
                for e in svc.endpoints:
                    if e.name is not None:
                        found.setdefault((e.version, e.address), []).append(
                            (f"{e.name}.{canonical}", mkey))
            ptrs = self._ptrs = {k: tuple(sorted(v)) for k, v in found.items()}
        return ptrs

    def wildcards(self) -> Mapping[str, EntryKey]:
        """Parent -> owner of every wildcard host name ``*.<parent>`` (docs/meshservice.md
        section 5): scanned once per snapshot line, then evolved by ``inherit``."""
        wild = self._wild
        if wild is None:
            wild = self._wild = {host[2:]: owner for host, owner in
                                 self.registry.hostnames.items() if host[:2] == "*."}
        return wild

    def _exists_below_wildcard(self) -> frozenset[str]:
        """The nodes strictly below some wildcard's parent that exist because an owned
        host or rendered name is them or lies below them (the other sorts of names are
        parsed, ``_exists``)."""
        nodes = self._wild_ents
        if nodes is None:
            wild = self.wildcards()
            out: set[str] = set()
            for name in (*self.registry.hostnames, *self._generated):
                below = [name]
                cut = name.find(".")
                while cut != -1:
                    below.append(name[cut + 1:])
                    cut = name.find(".", cut + 1)
                # Up to (not including) the shortest wildcard parent above the name.
                for i in range(len(below) - 1, 0, -1):
                    if below[i] in wild:
                        out.update(below[:i])
                        break
            nodes = self._wild_ents = frozenset(out)
        return nodes

    def wildcard_match(self, key: str, hidden: Container[EntryKey] = ()
                       ) -> tuple[str, str, EntryKey] | None:
        """RFC 4592 for a name no entry owns: (wildcard, closest encloser, its owner)
        when the closest encloser of ``key`` has an owned ``*`` child, else None."""
        wild = self.wildcards()
        if not wild:
            return None
        # The longest wildcard parent ``key`` lies strictly below.
        cut = key.find(".")
        parent = None
        while cut != -1:
            if key[cut + 1:] in wild:
                parent = key[cut + 1:]
                break
            cut = key.find(".", cut + 1)
        if parent is None:
            return None
        nodes = self._exists_below_wildcard()
        if key in nodes:
            return None  # an empty non-terminal itself: it exists, no wildcard answers it
        cut = key.find(".")
        while True:
            node = key[cut + 1:]
            if node == parent:
                break
            if node in nodes or self._exists(node, hidden is not self._hidden):
                return None  # the closest encloser is below the wildcard's parent
            cut = key.find(".", cut + 1)
        owner = wild[parent]
        if hidden and owner in hidden:
            return None
        return "*." + parent, parent, owner

    def _exists(self, node: str, include_hidden: bool) -> bool:
        """Whether ``node`` exists without wildcards: owned, or an empty non-terminal."""
        where = self.locate(node, include_hidden, wild=False)
        return where is not None and where[0] in _EXISTING

    def soa(self, apex: str, ttl: int | None = None) -> RR:
        s = self.settings
        serial = self.registry.revision & 0xFFFFFFFF
        return RR(apex + ".", T_SOA, ttl=s.negative_ttl if ttl is None else ttl,
                  rdata=SOA(apex + ".", SOA_RNAME + ".",
                            (serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, s.negative_ttl)))

    def _nodata(self, rule: str, apex: str, svc: Entry | None = None, aa: bool = True) -> Decision:
        return Decision(RCODE_NOERROR, rule, aa, (), (self.soa(apex),), (), svc, apex)

    def _service_records(self, owner: DNSLabel, svc: Service, qtype: int, rule: str,
                         apex: str, domain: str) -> Decision:
        """service_answer's records, as dnslib records (_fastpath.py writes the same)."""
        shape = service_answer(svc, qtype)
        if shape == NODATA:
            return self._nodata(rule, apex, svc)
        ttl = self.settings.ttl
        answer: list[RR] = []
        additional: list[RR] = []
        if shape in (ANSWER_A, ANSWER_A_AAAA):
            answer.append(RR(owner, T_A, ttl=ttl, rdata=A(format_ip(svc.vip, 4))))
        if shape in (ANSWER_AAAA, ANSWER_A_AAAA) and svc.vip6 is not None:
            answer.append(RR(owner, T_AAAA, ttl=ttl, rdata=AAAA(format_ip(svc.vip6, 6))))
        if shape == ANSWER_SRV:
            target = primary_name(svc, self.registry.names.templates, domain) + "."
            answer.append(RR(owner, T_SRV, ttl=ttl, rdata=SRV(0, 100, svc.port, target)))
            additional.append(RR(target, T_A, ttl=ttl, rdata=A(format_ip(svc.vip, 4))))
            if svc.vip6 is not None:
                additional.append(RR(target, T_AAAA, ttl=ttl, rdata=AAAA(format_ip(svc.vip6, 6))))
        return Decision(RCODE_NOERROR, rule, True, answer, (), additional, svc, apex)

    # ------------------------------------------------------------ policy

    def locate(self, key: str, include_hidden: bool = False, wild: bool = True
               ) -> Location | None:
        """What ``key`` (a lookup key: wire_to_key's form) is in this snapshot, and whose:
        the one lookup behind every local answer, on the dnslib path and the wire path.

        In Zone.decide's order: a name under a served domain (the longest that
        matches), then a visible service's host name or rendered name outside them,
        then a visible VIP's reverse name. None: none of those (another reverse name,
        a search-list or forwarded name: decide's to tell). Services ``dns.select``
        hides are absent, unless ``include_hidden`` (what /v1/resolve explains).

        Names are parsed, not looked up in a table of every name: ``<name>.<ns>.svc.
        <port>.<domain>`` and the Kuma form are split into the service key.
        """
        reg = self.registry
        hidden = () if include_hidden else self._hidden
        for domain, dot_domain in self._dotted:
            if key.endswith(dot_domain):
                if not self.loaded:
                    return UNLOADED_NAME, None, NOT_LOADED, domain, domain
                rest = key[: -len(dot_domain)].split(".")
                svc_key: tuple[str, str, int] | None = None
                rule = CANONICAL
                if len(rest) == 4 and rest[2] == "svc" and "canonical" in self._builtins:
                    port = _PORT_LABELS.get(rest[3]) or _port(rest[3])
                    if port is not None:
                        svc_key = (rest[0], rest[1], port)
                elif len(rest) == 1 and rest[0].count("_") == 3 and "kuma" in self._builtins:
                    name, ns, svc_label, port_label = rest[0].split("_")
                    port = _port(port_label)
                    if svc_label == "svc" and port is not None:
                        svc_key, rule = (name, ns, port), KUMA
                if svc_key is not None:
                    svc = reg.services.get(svc_key)
                    if svc is not None and svc_key not in hidden:
                        return SERVICE_NAME, svc, rule, domain, domain
                    if svc is None and reg.mesh_ports:  # a mesh service's per-port name
                        mesh_owner = reg.mesh_ports.get((rule, *svc_key))
                        if mesh_owner is not None and mesh_owner not in hidden:
                            return SERVICE_NAME, reg.entry_map[mesh_owner], rule, domain, \
                                domain
                host_owner = reg.hostnames.get(key)
                if host_owner is not None:
                    if host_owner not in hidden:
                        return SERVICE_NAME, reg.entry_map[host_owner], HOSTNAME, domain, domain
                else:
                    generated = self._generated.get(key)
                    if generated is not None and generated[0] not in hidden:
                        return SERVICE_NAME, reg.entry_map[generated[0]], TEMPLATE, domain, \
                            domain
                if reg.mesh_keys and key[:1] == "_":
                    found, mesh_svc = self._srv_owner(key, hidden)
                    if found == SERVICE_NAME:
                        return SERVICE_NAME, mesh_svc, SRV_PORT, domain, domain
                    if found == EMPTY_NAME:
                        return EMPTY_NAME, None, ENT, domain, domain
                if reg.mesh_keys:
                    found_ep = self._endpoint_owner(key, hidden)
                    if found_ep is not None:
                        return SERVICE_NAME, found_ep, ENDPOINT, domain, domain
                if self.is_ent(key, domain):
                    return EMPTY_NAME, None, ENT, domain, domain
                if wild:
                    match = self.wildcard_match(key, hidden)
                    if match is not None:
                        return SERVICE_NAME, reg.entry_map[match[2]], WILDCARD, domain, domain
                return NO_NAME, None, NXDOMAIN, domain, domain
            if key == domain:
                if not self.loaded:
                    return UNLOADED_NAME, None, NOT_LOADED, domain, domain
                return APEX_NAME, None, APEX, domain, domain
        # Outside them: a host name or a rendered name is its own tiny zone.
        owner = reg.hostnames.get(key)
        if owner is not None:
            if owner in hidden:
                return None
            return HOST_NAME, reg.entry_map[owner], HOSTNAME, key, self._domain0
        if self._generated:
            generated = self._generated.get(key)
            if generated is not None:
                if generated[0] in hidden:
                    return None
                return HOST_NAME, reg.entry_map[generated[0]], TEMPLATE, key, self._domain0
        if reg.mesh_keys and key[:1] == "_":
            found, mesh_svc = self._srv_owner(key, hidden)
            if found != NO_NAME:
                parent = key.split(".", 2)[-1] if found == SERVICE_NAME \
                    else key.split(".", 1)[-1]
                if found == SERVICE_NAME:
                    return HOST_NAME, mesh_svc, SRV_PORT, parent, self._domain0
                return EMPTY_NAME, None, ENT, parent, parent
        if reg.mesh_keys:
            found_ep = self._endpoint_owner(key, hidden)
            if found_ep is not None:
                return HOST_NAME, found_ep, ENDPOINT, key.split(".", 1)[1], self._domain0
        if wild and not key.endswith(".arpa"):
            match = self.wildcard_match(key, hidden)
            if match is not None:
                return HOST_NAME, reg.entry_map[match[2]], WILDCARD, key, self._domain0
        if key.endswith(".in-addr.arpa"):
            vip, by_vip = ipv4_of_reverse_name(key), reg.by_vip4
        elif key.endswith(".ip6.arpa"):
            vip, by_vip = ipv6_of_reverse_name(key), reg.by_vip6
        else:
            return None
        if vip is not None:
            owner = by_vip.get(vip)
            if owner is not None and (not hidden or owner not in hidden):
                return VIP_NAME, reg.entry_map[owner], PTR_RULE, None, self._domain0
            if reg.mesh_keys and owner is None:
                ptrs = self.endpoint_ptrs().get((4 if by_vip is reg.by_vip4 else 6, vip))
                if ptrs is not None:
                    return VIP_NAME, reg.entry_map[ptrs[0][1]], ENDPOINT, None, self._domain0
        return None

    def decide(self, labels: tuple[bytes, ...], qtype: int, qclass: int) -> Decision:
        """The answer to one question; ``labels`` keep the question's case."""
        key = wire_to_key(labels)
        where = self.locate(key)
        if where is not None:
            kind = where[0]
            if qclass != QCLASS_IN:
                return Decision(RCODE_REFUSED, REFUSED, ede=ONLY_CLASS_IN,
                                zone=where[3] if kind in IN_DOMAIN else None)
            return self._records(DNSLabel(labels), key, where, qtype)
        if key.endswith(".arpa"):
            reverse = self._in_reverse(labels, key, qtype, qclass)
            if reverse is not None:
                return reverse
        for suffix in self.settings.search:
            if key.endswith("." + suffix):
                found = self._search(labels, key, suffix, qtype, qclass)
                if found is not None:
                    return found
        if self.settings.forwarding:
            return Decision(RCODE_NOERROR, FORWARD)
        return Decision(RCODE_REFUSED, REFUSED, ede=NO_UPSTREAM)

    def _records(self, owner: DNSLabel, key: str, where: Location, qtype: int) -> Decision:
        """The dnslib encoder: the decision for a located name (of class IN)."""
        kind, svc, rule, apex, domain = where
        if svc is not None:
            if kind == VIP_NAME and rule == ENDPOINT:  # a named endpoint's address
                reverse = self._reverse_zone(key)
                v4 = key.endswith(".in-addr.arpa")
                address = ipv4_of_reverse_name(key) if v4 else ipv6_of_reverse_name(key)
                ptrs = self.endpoint_ptrs().get((4 if v4 else 6, address or 0), ())
                if vip_answer(qtype) == NODATA or not ptrs:
                    return self._nodata(PTR_RULE, reverse.apex if reverse else key, svc)
                return Decision(RCODE_NOERROR, ENDPOINT, True, tuple(
                    RR(owner, T_PTR, ttl=self.settings.ttl, rdata=PTR(name + "."))
                    for name, _ in ptrs), service=svc,
                    zone=reverse.apex if reverse else None)
            if kind == VIP_NAME:
                reverse = self._reverse_zone(key)
                templates = self.registry.names.templates
                name = mesh_primary_name(svc, templates, domain) \
                    if isinstance(svc, MeshService) else primary_name(svc, templates, domain)
                if vip_answer(qtype) == NODATA or name is None:
                    return self._nodata(PTR_RULE, reverse.apex if reverse else key, svc)
                target = name + "."
                return Decision(RCODE_NOERROR, PTR_RULE, True,
                                (RR(owner, T_PTR, ttl=self.settings.ttl, rdata=PTR(target)),),
                                service=svc, zone=reverse.apex if reverse else None)
            assert apex is not None
            if isinstance(svc, MeshService):
                return self._mesh_records(owner, key, svc, qtype, rule, apex, domain)
            return self._service_records(owner, svc, qtype, rule, apex, domain)
        if kind == UNLOADED_NAME:
            return Decision(RCODE_SERVFAIL, NOT_LOADED, zone=domain, ede=NOT_READY)
        if kind == APEX_NAME:
            return self._apex(owner, domain, qtype)
        if kind == EMPTY_NAME:
            return self._nodata(ENT, apex or domain)
        return Decision(RCODE_NXDOMAIN, NXDOMAIN, True, (), (self.soa(domain),), zone=domain)

    def served_domain(self, key: str) -> str | None:
        for domain in self._domains:
            if key == domain or key.endswith("." + domain):
                return domain
        return None

    def is_ent(self, key: str, domain: str) -> bool:
        reg = self.registry
        ns_ports, ports = reg.names.visible_counts or (reg.ns_ports, reg.ports)
        rest = key[: -len(domain) - 1].split(".")
        if "canonical" not in self._builtins:
            pass  # the <ns>.svc.<port> nodes exist only above canonical names
        elif len(rest) == 3 and rest[1] == "svc":
            port = _port(rest[2])
            if port is not None and (rest[0], port) in ns_ports:
                return True
        elif (len(rest) == 2 and rest[0] == "svc") or len(rest) == 1:
            port = _port(rest[-1])
            if port is not None and port in ports:
                return True
        return key in self.host_ents() or key in reg.names.ents

    def _apex(self, owner: DNSLabel, apex: str, qtype: int) -> Decision:
        """A zone's apex (a served domain, a reverse zone): its SOA and NS, else NODATA."""
        if qtype in (T_SOA, QTYPE_ANY):
            return Decision(RCODE_NOERROR, APEX, True, (self._soa_answer(owner, apex),),
                            zone=apex)
        if qtype == T_NS:
            return Decision(RCODE_NOERROR, APEX, True,
                            (RR(owner, T_NS, ttl=self.settings.ttl, rdata=NS(apex + ".")),),
                            zone=apex)
        return self._nodata(APEX, apex)

    def _soa_answer(self, owner: DNSLabel, apex: str) -> RR:
        rr = self.soa(apex, self.settings.ttl)
        rr.rname = owner  # echo the question's case
        return rr

    # ------------------------------------------------------------ reverse names

    def _reverse_zone(self, key: str) -> _ReverseZone | None:
        """The reverse zone of a VIP range that ``key`` (a reverse name) lies in."""
        return self._reverse_parts(key)[0]

    def _reverse_parts(self, key: str) -> tuple[_ReverseZone | None, list[int | None]]:
        """The reverse zone ``key`` lies in, and its address labels read as digits (most
        significant first; None: not a digit)."""
        v4 = key.endswith(".in-addr.arpa")
        parts = key.split(".")[:-2]
        full, parse = (4, octet_label) if v4 else (32, _nibble)
        digits = [parse(p) for p in reversed(parts)]
        for depth in range(1, min(len(digits), full) + 1):
            if any(d is None for d in digits[:depth]):
                break
            apex = ".".join(parts[len(parts) - depth :]) + (".in-addr.arpa" if v4 else ".ip6.arpa")
            zone = self._reverse.get(apex)
            if zone is not None:
                return zone, digits
        return None, digits

    def _in_reverse(self, labels: tuple[bytes, ...], key: str, qtype: int,
                    qclass: int) -> Decision | None:
        """A reverse name that is no visible VIP's (those are located): the apex of a
        VIP range's reverse zone, an empty non-terminal above VIPs, or no name."""
        v4 = key.endswith(".in-addr.arpa")
        if not v4 and not key.endswith(".ip6.arpa"):
            return None
        zone, digits = self._reverse_parts(key)
        if zone is None:
            return None
        if qclass != QCLASS_IN:
            return Decision(RCODE_REFUSED, REFUSED, ede=ONLY_CLASS_IN)
        if not self.loaded:
            return Decision(RCODE_SERVFAIL, NOT_LOADED, zone=zone.apex, ede=NOT_READY)
        full, step = (4, 8) if v4 else (32, 4)
        depth = len(digits)
        if depth == zone.labels:
            return self._apex(DNSLabel(labels), zone.apex, qtype)
        if depth < full and all(d is not None for d in digits):
            # An empty non-terminal when some VIP lies below it (RFC 8020).
            prefix = 0
            for d in digits:
                assert d is not None
                prefix = (prefix << step) | d
            shift = (full - depth) * step
            lo, hi = prefix << shift, ((prefix + 1) << shift) - 1
            vips = self._sorted_vips(v4)
            i = bisect.bisect_left(vips, lo)
            if i < len(vips) and vips[i] <= hi:
                return self._nodata(ENT, zone.apex)
        return Decision(RCODE_NXDOMAIN, NXDOMAIN, True, (), (self.soa(zone.apex),), zone=zone.apex)

    def _sorted_vips(self, v4: bool) -> list[int]:
        hidden = self.registry.names.hidden
        if v4:
            if self._sorted4 is None:
                self._sorted4 = sorted(v for v, k in self.registry.by_vip4.items()
                                       if k not in hidden) if hidden \
                    else sorted(self.registry.by_vip4)
            return self._sorted4
        if self._sorted6 is None:
            self._sorted6 = sorted(v for v, k in self.registry.by_vip6.items()
                                   if k not in hidden) if hidden \
                else sorted(self.registry.by_vip6)
        return self._sorted6

    # ------------------------------------------------------------ search list

    def _search(self, labels: tuple[bytes, ...], key: str, suffix: str, qtype: int,
                qclass: int) -> Decision | None:
        """``<mesh name>.<search suffix>``: answered here, never forwarded."""
        inner_labels = labels[: len(labels) - len(key_to_labels(suffix))]
        inner_key = key[: -len(suffix) - 1]
        domain = self.served_domain(inner_key)
        if domain is None or inner_key == domain:
            return None
        if qclass != QCLASS_IN:
            return Decision(RCODE_REFUSED, REFUSED, ede=ONLY_CLASS_IN)
        if not self.loaded:
            return Decision(RCODE_SERVFAIL, NOT_LOADED, zone=domain, ede=NOT_READY)
        where = self.locate(inner_key)  # under ``domain``, which is loaded: never None
        assert where is not None
        inner = self._records(DNSLabel(inner_labels), inner_key, where, qtype)
        if inner.rule == ENT:
            # Names exist below it: NODATA, not NXDOMAIN (RFC 8020), as for the mesh name.
            return Decision(RCODE_NOERROR, SEARCH, False, (), inner.authority, zone=domain)
        if inner.rule not in SERVICE_RULES:
            return Decision(RCODE_NXDOMAIN, SEARCH, False, (), (self.soa(domain),),
                            zone=domain)
        cname = RR(DNSLabel(labels), T_CNAME, ttl=self.settings.ttl,
                   rdata=CNAME(DNSLabel(inner_labels)))
        answer = (cname,) if qtype == T_CNAME else (cname, *inner.answer)
        return Decision(RCODE_NOERROR, SEARCH, False, answer, inner.authority,
                        inner.additional, inner.service, domain)


_EXISTING = frozenset({SERVICE_NAME, HOST_NAME, EMPTY_NAME, APEX_NAME, VIP_NAME})


def qtype_name(qtype: int) -> str:
    name = QTYPE.forward.get(qtype)
    return str(name) if name is not None else f"TYPE{qtype}"  # RFC 3597 form
