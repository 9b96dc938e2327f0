"""Validating registry input (JSON/YAML already decoded) into ServiceSpecs, with field paths."""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

from ._service import (
    KEY_FIELDS,
    MAX_ENDPOINTS_PER_SERVICE,
    MAX_HOSTNAMES_PER_SERVICE,
    MAX_PORTS_PER_SERVICE,
    MESH_FIELDS,
    MESH_KINDS,
    SERVICE_FIELDS,
    Endpoint,
    EntryKey,
    EntrySpec,
    Labels,
    MeshKey,
    MeshPort,
    MeshServiceSpec,
    RegistryError,
    Service,
    ServiceKey,
    ServiceSpec,
    bad_request,
    describe,
    make_service,
    make_spec,
)
from ._templates import (
    is_rfc1123_label,
    normalize_hostname,
)
from ._vip import forget_spellings, parse_ip, parse_ip4, parse_ip6

# ---------------------------------------------------------------- quoting input

QUOTE_LIMIT = 80  # characters of an offending value an error message quotes at most


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (marked with "...")."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 3, 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_LIMIT


def quote(value: Any) -> str:
    """``repr(value)`` for an error message: at most ``QUOTE_LIMIT`` characters, and
    bounded work however large ``value`` is (reprlib looks at a few items only)."""
    if type(value) is int and value.bit_length() > 200:
        return f"<integer of {value.bit_length()} bits>"  # repr() is quadratic, or refused
    return clip(_REPR.repr(value))


_KEY_SET = frozenset(KEY_FIELDS)


def _unknown_field(item: Mapping[Any, Any], known: frozenset[str], path: str) -> RegistryError:
    unknown = min(clip(str(k)) for k in item if k not in known)
    return bad_request(f"unknown field {quote(unknown)}", f"{path}.{unknown}")


# ---------------------------------------------------------------- input parsing


def _parse_key_fields(item: Mapping[str, Any], path: str) -> ServiceKey:
    name = item.get("name")
    namespace = item.get("namespace")
    port = item.get("port")
    for fname, value in (("name", name), ("namespace", namespace)):
        if not isinstance(value, str):
            raise bad_request(f"{fname} is required and must be a string", f"{path}.{fname}")
        if not is_rfc1123_label(value):
            raise bad_request(
                f"{fname} must be a lower-case RFC 1123 label (a-z, 0-9, '-', 1..63 chars), "
                f"got {quote(value)}",
                f"{path}.{fname}",
            )
    if isinstance(port, str) and port.isascii() and port.isdigit() and port[:1] != "0":
        port = int(port)  # "80" as a string is accepted; "080", "²" are not
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise bad_request(f"port must be an integer 1..65535, got {quote(port)}", f"{path}.port")
    assert isinstance(name, str) and isinstance(namespace, str)
    return (name, namespace, port)


def _parse_vip(value: Any, version: int, path: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"must be an IPv{version} address string", path)
    if version == 6 and "%" in value:
        # ipaddress keeps a scope id (fe80::1%eth0) that a VIP cannot carry: refused
        # rather than silently dropped.
        raise bad_request(f"must be an IPv6 address without a zone id (%...), got {quote(value)}",
                   path)
    vip = parse_ip(value, version)
    if vip is None:
        raise bad_request(f"must be an IPv{version} address, got {quote(value)}", path)
    return vip


def _parse_wildcard(raw: str, path: str) -> str:
    """``*.<parent>`` (docs/meshservice.md section 5): ``*`` the whole leftmost label,
    once; the parent a host name of at least two labels and no reverse zone (whether it
    is a served domain or above one is checked against the domains, is_wildcard_above)."""
    parent = normalize_hostname(raw[2:])
    if parent is None or len(parent) + 2 > 253:
        raise bad_request(f"a wildcard must be '*.' and a fully qualified domain name, "
                          f"got {quote(raw)}", path)
    if "." not in parent:
        raise bad_request(f"a wildcard's parent needs at least two labels (*.example.com), "
                          f"got {quote(raw)}", path)
    if parent == "arpa" or parent.endswith(".arpa"):
        raise bad_request(f"a wildcard may not lie in a reverse zone, got {quote(raw)}", path)
    return "*." + parent


def wildcard_over_domain(host: str, domains: Sequence[str]) -> str | None:
    """The served domain that a wildcard ``host`` (``*.<parent>``) would cover whole: its
    parent is that domain or above it (400); None when ``host`` is no such wildcard."""
    if host[:2] != "*.":
        return None
    parent = host[2:]
    for domain in domains:
        if domain == parent or domain.endswith("." + parent):
            return domain
    return None


def _parse_hostnames(raw_hosts: Any, path: str) -> tuple[str, ...]:
    if not isinstance(raw_hosts, list):
        raise bad_request("must be a list of host names", f"{path}.hostnames")
    if len(raw_hosts) > MAX_HOSTNAMES_PER_SERVICE:
        raise bad_request(
            f"at most {MAX_HOSTNAMES_PER_SERVICE} host names per service",
            f"{path}.hostnames",
        )
    hostnames: list[str] = []
    for j, raw in enumerate(raw_hosts):
        host: str | None
        if isinstance(raw, str) and raw[:2] == "*.":
            host = _parse_wildcard(raw, f"{path}.hostnames[{j}]")
        else:
            host = normalize_hostname(raw) if isinstance(raw, str) else None
        if host is None:
            raise bad_request(f"must be a fully qualified domain name, got {quote(raw)}",
                       f"{path}.hostnames[{j}]")
        if host not in hostnames:
            hostnames.append(host)
    return tuple(hostnames)


# Kubernetes label syntax: a key is an optional DNS-subdomain prefix and "/" and a
# name; a name and a value are up to 63 characters of [A-Za-z0-9._-], starting and
# ending alphanumeric (a value may be empty).
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LABEL_PREFIX_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
MAX_LABELS_PER_SERVICE = 64


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label key, or None when it is one."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _LABEL_PREFIX_RE.fullmatch(prefix)):
        return f"label key prefix must be a DNS subdomain, got {quote(key)}"
    if not _LABEL_NAME_RE.fullmatch(name):
        return ("label key must be [prefix/]name, the name 1..63 characters of "
                f"[A-Za-z0-9._-] starting and ending alphanumeric, got {quote(key)}")
    return None


def parse_labels(raw: Any, path: str) -> Labels:
    """Kubernetes labels at ``path`` (an object of label keys to values), sorted."""
    if raw is None:
        return ()
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise bad_request("must be an object of string label keys to string values", path)
    if len(raw) > MAX_LABELS_PER_SERVICE:
        raise bad_request(f"at most {MAX_LABELS_PER_SERVICE} labels per service", path)
    for key, value in raw.items():
        if not isinstance(key, str):
            raise bad_request(f"label keys must be strings, got {quote(key)}", path)
        why = label_key_error(key)
        if why is not None:
            raise bad_request(why, f"{path}.{clip(key)}")
        if not isinstance(value, str) or (value and not _LABEL_NAME_RE.fullmatch(value)):
            raise bad_request("label value must be a string of up to 63 characters of "
                       f"[A-Za-z0-9._-] starting and ending alphanumeric, got {quote(value)}",
                       f"{path}.{clip(key)}")
    return tuple(sorted(raw.items()))


def _parse_mesh_or_zone(raw: Any, path: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not is_rfc1123_label(raw):
        raise bad_request("must be a lower-case RFC 1123 label (a-z, 0-9, '-', 1..63 chars), "
                   f"got {quote(raw)}", path)
    return raw


def parse_service(item: Any, path: str) -> ServiceSpec:
    """One service (the legacy form only: an item with ``ports`` is refused, as
    before mesh services; ``parse_entry`` reads both)."""
    return cast(ServiceSpec, _parse_service(item, path, {}))


def parse_entry(item: Any, path: str) -> EntrySpec:
    """One written item of either form: a service, or (with ``ports``) a mesh service."""
    return _parse_service(item, path, {}, entries=True)


def _parse_kind(raw: Any, path: str) -> str:
    if raw is None:
        return "MeshService"
    if raw not in MESH_KINDS:
        raise bad_request(f"kind must be one of {', '.join(MESH_KINDS)}, got {quote(raw)}",
                          path)
    assert isinstance(raw, str)
    return raw


def _parse_ports(raw: Any, path: str) -> tuple[MeshPort, ...]:
    if not isinstance(raw, list):
        raise bad_request("must be a list of {port, name?, appProtocol?}", path)
    if len(raw) > MAX_PORTS_PER_SERVICE:
        raise bad_request(f"at most {MAX_PORTS_PER_SERVICE} ports per service", path)
    ports: list[MeshPort] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    for i, item in enumerate(raw):
        here = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            raise bad_request("must be an object {port, name?, appProtocol?}", here)
        if not item.keys() <= _PORT_FIELDS:
            raise _unknown_field(item, _PORT_FIELDS, here)
        port = item.get("port")
        if type(port) is not int or not 1 <= port <= 65535:
            raise bad_request(f"port must be an integer 1..65535, got {quote(port)}",
                              f"{here}.port")
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not is_rfc1123_label(name)):
            raise bad_request("a port name must be a lower-case RFC 1123 label (a-z, 0-9, "
                              f"'-', 1..63 chars), got {quote(name)}", f"{here}.name")
        protocol = item.get("appProtocol")
        if protocol is None:
            protocol = "tcp"
        elif not isinstance(protocol, str) or label_key_error(protocol) is not None:
            raise bad_request("must be a protocol name such as tcp, http, http2 or grpc, got "
                              f"{quote(protocol)}", f"{here}.appProtocol")
        first = numbers.setdefault((port, protocol), i)
        if first != i:
            raise bad_request(f"port {port}/{protocol} is given twice (also {path}[{first}])",
                              f"{here}.port")
        if name is not None:
            first = names.setdefault(name, i)
            if first != i:
                raise bad_request(f"port name {quote(name)} is given twice (also "
                                  f"{path}[{first}])", f"{here}.name")
        ports.append(MeshPort(port, name, protocol))
    return tuple(ports)


_PORT_FIELDS = frozenset({"port", "name", "appProtocol"})


def _parse_mesh_service(item: Mapping[str, Any], path: str) -> MeshServiceSpec:
    """A written item with ``ports``: a mesh service (docs/meshservice.md section 1)."""
    if "port" in item:
        raise bad_request("give either port (a service) or ports (a mesh service), not both",
                          f"{path}.port")
    if not item.keys() <= MESH_FIELDS:
        raise _unknown_field(item, MESH_FIELDS, path)
    kind = _parse_kind(item.get("kind"), f"{path}.kind")
    name = item.get("name")
    if not isinstance(name, str):
        raise bad_request("name is required and must be a string", f"{path}.name")
    if not is_rfc1123_label(name):
        raise bad_request("name must be a lower-case RFC 1123 label (a-z, 0-9, '-', 1..63 "
                          f"chars), got {quote(name)}", f"{path}.name")
    mesh = _parse_mesh_or_zone(item.get("mesh"), f"{path}.mesh")
    zone = _parse_mesh_or_zone(item.get("zone"), f"{path}.zone")
    namespace = _parse_mesh_or_zone(item.get("namespace"), f"{path}.namespace")
    ports = _parse_ports(item.get("ports"), f"{path}.ports")
    vip = _parse_vip(item.get("vip"), 4, f"{path}.vip")
    vip6 = _parse_vip(item.get("vip6"), 6, f"{path}.vip6")
    raw_hosts = item.get("hostnames")
    hostnames = () if raw_hosts is None else _parse_hostnames(raw_hosts, path)
    labels = parse_labels(item.get("labels"), f"{path}.labels")
    raw_endpoints = item.get("endpoints")
    endpoints = None
    if raw_endpoints is not None:
        if vip is not None or vip6 is not None:
            raise bad_request("an address set (endpoints) has no VIP: give endpoints or "
                              "vip/vip6, not both", f"{path}.endpoints")
        endpoints = parse_endpoints(raw_endpoints, f"{path}.endpoints")
    return MeshServiceSpec(kind, mesh, zone, namespace, name, ports, vip, vip6, hostnames,
                           labels, endpoints)


_ENDPOINT_FIELDS = frozenset({"address", "name"})


def parse_endpoints(raw: Any, path: str) -> tuple[Endpoint, ...]:
    """``endpoints: [{address, name?}]`` (docs/meshservice.md section 4): addresses and
    names unique in the entry, at most MAX_ENDPOINTS_PER_SERVICE."""
    if not isinstance(raw, list):
        raise bad_request("must be a list of {address, name?}", path)
    if len(raw) > MAX_ENDPOINTS_PER_SERVICE:
        raise bad_request(f"at most {MAX_ENDPOINTS_PER_SERVICE} endpoints per service", path)
    out: list[Endpoint] = []
    addresses: dict[tuple[int, int], int] = {}
    names: dict[str, int] = {}
    for i, item in enumerate(raw):
        here = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise bad_request("must be an object {address, name?}", here)
        if not item.keys() <= _ENDPOINT_FIELDS:
            raise _unknown_field(item, _ENDPOINT_FIELDS, here)
        value = item.get("address")
        address: int | None = None
        version = 4
        if isinstance(value, str):
            version = 6 if ":" in value else 4
            address = parse_ip(value, version) if "%" not in value else None
        if address is None:
            raise bad_request(f"must be an IPv4 or IPv6 address, got {quote(value)}",
                              f"{here}.address")
        first = addresses.setdefault((version, address), i)
        if first != i:
            raise bad_request(f"address {quote(value)} is given twice (also {path}[{first}])",
                              f"{here}.address")
        name = item.get("name")
        if name is not None:
            if not isinstance(name, str) or not is_rfc1123_label(name):
                raise bad_request("an endpoint name must be a lower-case RFC 1123 label, "
                                  f"got {quote(name)}", f"{here}.name")
            first = names.setdefault(name, i)
            if first != i:
                raise bad_request(f"endpoint name {quote(name)} is given twice (also "
                                  f"{path}[{first}])", f"{here}.name")
        out.append(Endpoint(address, version, name))
    return tuple(out)


_NO_SERVICES: Mapping[ServiceKey, Service] = {}


def _parse_service(item: Any, path: str, namespaces: dict[str, str],
                   known: Mapping[ServiceKey, Service] = _NO_SERVICES,
                   entries: bool = False) -> EntrySpec:
    """``parse_service``; ``namespaces`` holds namespaces already found valid (they repeat),
    and every service of a namespace shares one string object for it (JSON decoding
    makes one per occurrence: a million services would otherwise hold a million).
    ``known``: services already served; one written again unchanged, both VIPs given,
    is returned as that very object (see ``parse_services``)."""
    if type(item) is not dict and not isinstance(item, Mapping):
        raise bad_request("must be an object with name, namespace and port", path)
    if not item.keys() <= SERVICE_FIELDS:
        if entries and "ports" in item:
            return _parse_mesh_service(item, path)
        raise _unknown_field(item, SERVICE_FIELDS, path)
    get = item.get
    name = get("name")
    namespace = get("namespace")
    port = get("port")
    # The common shape in one test; anything else (a port given as a string, or
    # a field to reject with its path) takes the long way.
    if not (type(port) is int and 0 < port < 65536 and type(name) is str
            and is_rfc1123_label(name) and type(namespace) is str
            and (namespace in namespaces or is_rfc1123_label(namespace))):
        name, namespace, port = _parse_key_fields(item, path)
    namespace = namespaces.setdefault(namespace, namespace)
    vip = get("vip")
    if vip is not None:
        vip = parse_ip4(vip) if type(vip) is str else None
        if vip is None:
            vip = _parse_vip(get("vip"), 4, f"{path}.vip")
    vip6 = get("vip6")
    if vip6 is not None:
        vip6 = parse_ip6(vip6) if type(vip6) is str and "%" not in vip6 else None
        if vip6 is None:
            vip6 = _parse_vip(get("vip6"), 6, f"{path}.vip6")
    raw_hosts = get("hostnames")
    hostnames = () if raw_hosts is None else _parse_hostnames(raw_hosts, path)
    labels: Labels = ()
    mesh = zone = None
    if len(item) > 3 and ("labels" in item or "mesh" in item or "zone" in item):
        labels = parse_labels(get("labels"), f"{path}.labels")
        mesh = _parse_mesh_or_zone(get("mesh"), f"{path}.mesh")
        zone = _parse_mesh_or_zone(get("zone"), f"{path}.zone")
    if vip is not None and vip6 is not None:
        # Both VIPs given (a control plane that allocates them): already the Service the
        # registry keeps, unless the write is rejected.
        if known:
            prev = known.get((name, namespace, port))
            if prev is not None and ((prev.vip == vip and not prev.vip_given)
                                     or (prev.vip6 == vip6 and not prev.vip6_given)):
                # The address it has, allocated here: whether it stays allocated is the
                # core's to say, against the registry the write applies to (vips_given).
                return make_spec(name, namespace, port, vip, vip6, hostnames, labels, mesh,
                                  zone)
            if (prev is not None and prev.vip == vip and prev.vip6 == vip6
                    and prev.hostnames == hostnames and prev.vip_given and prev.vip6_given
                    and prev.labels == labels and prev.mesh == mesh and prev.zone == zone):
                return prev
        return make_service(name, namespace, port, vip, vip6, hostnames, True, True,
                             labels, mesh, zone)
    return make_spec(name, namespace, port, vip, vip6, hostnames, labels, mesh, zone)


def parse_services(value: Any, path: str = "services", *, consume: bool = False,
                   known: Mapping[Any, Any] | None = None) -> list[ServiceSpec]:
    """``parse_entries`` for the legacy form only (an item with ``ports`` is an
    unknown field, as before mesh services): what the etcd layout reads."""
    return cast("list[ServiceSpec]", _parse_all(value, path, consume, known, False))


def parse_entries(value: Any, path: str = "services", *, consume: bool = False,
                  known: Mapping[Any, Any] | None = None) -> list[EntrySpec]:
    """The written items of both forms: services, and (items with ``ports``) mesh
    services (docs/meshservice.md section 1)."""
    return _parse_all(value, path, consume, known, True)


def _parse_all(value: Any, path: str, consume: bool, known: Mapping[Any, Any] | None,
               entries: bool) -> list[EntrySpec]:
    """The services of a decoded ``value`` (a list), or RegistryError naming the field.

    With ``consume``, each item of ``value`` is replaced by None once parsed, so
    the decoded objects (a dict per service, several times the size of what is
    kept) are freed as parsing goes instead of all at the end: the caller's
    document is used up, and the peak memory of a 1M-service write drops.

    ``known`` (the services being served): an item equal to one of them, both VIPs
    given, comes back as that object. A control plane re-sending its whole snapshot
    then allocates nothing that lives on, and the write finds it unchanged at once.
    """
    known = known or _NO_SERVICES
    if not isinstance(value, list):
        raise bad_request("must be a list of services", path)
    namespaces: dict[str, str] = {}
    out: list[EntrySpec] = []
    append = out.append
    for i, item in enumerate(value):
        try:
            # Without the item's path: formatting 100k of them costs more than a bad
            # item's second parse below, which raises the same error with its path.
            append(_parse_service(item, "", namespaces, known, entries))
        except RegistryError:
            _parse_service(item, f"{path}[{i}]", namespaces, entries=entries)
            raise  # pragma: no cover - the failing item fails again, with its path
        if consume:
            value[i] = None
    forget_spellings()  # kept, they would pin this write's memory (see there)
    return out


_MESH_KEY_FIELDS = frozenset({"kind", "mesh", "zone", "namespace", "name"})


def _parse_mesh_key(item: Mapping[str, Any], path: str) -> MeshKey:
    if not item.keys() <= _MESH_KEY_FIELDS:
        raise _unknown_field(item, _MESH_KEY_FIELDS, path)
    kind = _parse_kind(item.get("kind"), f"{path}.kind")
    name = item.get("name")
    if not isinstance(name, str) or not is_rfc1123_label(name):
        raise bad_request("name is required and must be a lower-case RFC 1123 label, got "
                          f"{quote(name)}", f"{path}.name")
    parts = [_parse_mesh_or_zone(item.get(f), f"{path}.{f}") or ""
             for f in ("mesh", "zone", "namespace")]
    return (kind, parts[0], parts[1], parts[2], name)


def parse_deletes(value: Any, path: str = "delete") -> list[EntryKey]:
    """Keys to delete: ``{name, namespace, port}`` (a service) or ``{kind, mesh?, zone?,
    namespace?, name}`` (a mesh service: an item without ``port`` that names a ``kind``,
    ``mesh`` or ``zone``)."""
    if not isinstance(value, list):
        raise bad_request("must be a list of {name, namespace, port}", path)
    keys: list[EntryKey] = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise bad_request("must be an object with name, namespace and port", f"{path}[{i}]")
        if "port" not in item and ("kind" in item or "mesh" in item or "zone" in item):
            keys.append(_parse_mesh_key(item, f"{path}[{i}]"))
            continue
        if not item.keys() <= _KEY_SET:
            raise _unknown_field(item, _KEY_SET, f"{path}[{i}]")
        keys.append(_parse_key_fields(item, f"{path}[{i}]"))
    return keys



# (entry key, endpoints to upsert, addresses to delete as (version, address))
EndpointPatch = tuple[MeshKey, tuple[Endpoint, ...], tuple[tuple[int, int], ...]]
_ENDPOINT_PATCH_FIELDS = frozenset({"service", "upsert", "delete"})


def parse_endpoint_patches(value: Any, path: str = "endpoints") -> list[EndpointPatch]:
    """A PATCH's ``endpoints: [{service, upsert?, delete?}]`` (docs/meshservice.md
    section 4): ``service`` a mesh service's key object, ``upsert`` endpoints
    ``{address, name?}``, ``delete`` ``{address}`` (an endpoint's identity is its address)."""
    if not isinstance(value, list):
        raise bad_request("must be a list of {service, upsert, delete}", path)
    out: list[EndpointPatch] = []
    seen: dict[MeshKey, int] = {}
    for i, item in enumerate(value):
        here = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise bad_request("must be an object {service, upsert?, delete?}", here)
        if not item.keys() <= _ENDPOINT_PATCH_FIELDS:
            raise _unknown_field(item, _ENDPOINT_PATCH_FIELDS, here)
        raw_key = item.get("service")
        if not isinstance(raw_key, Mapping) or "port" in raw_key:
            raise bad_request("must be a mesh service's key {kind?, mesh?, zone?, namespace?, "
                              "name}", f"{here}.service")
        key = _parse_mesh_key(dict(raw_key, kind=raw_key.get("kind", "MeshService")),
                              f"{here}.service")
        first = seen.setdefault(key, i)
        if first != i:
            raise bad_request(f"{describe(key)} is given twice (also {path}[{first}])",
                              f"{here}.service")
        upsert = parse_endpoints(item.get("upsert", []), f"{here}.upsert")
        raw_delete = item.get("delete", [])
        if not isinstance(raw_delete, list) or any(
                not isinstance(d, dict) or d.keys() != {"address"} for d in raw_delete):
            raise bad_request("must be a list of {address}", f"{here}.delete")
        delete = parse_endpoints(raw_delete, f"{here}.delete")
        out.append((key, upsert, tuple((e.version, e.address) for e in delete)))
    return out


def with_endpoint_patches(entries: Mapping[EntryKey, Any], upserts: list[EntrySpec],
                          deletes: Sequence[EntryKey], patches: Sequence[EndpointPatch]
                          ) -> list[EntrySpec]:
    """``upserts`` with each patched address set rewritten (the entry as this body
    upserts it, else as ``entries`` serve it): its endpoints less the deleted addresses,
    the upserted ones replacing those at the same address, new ones appended. 409 for
    an entry that does not exist, is deleted by the body, or is no address set."""
    if not patches:
        return upserts
    out = list(upserts)
    where = {spec.key: i for i, spec in enumerate(out)}
    for j, (key, upsert, delete) in enumerate(patches):
        i = where.get(key)
        spec = out[i] if i is not None else entries.get(key)
        if spec is None or key in deletes:
            raise RegistryError(409, f"endpoints of {describe(key)}, which does not exist",
                                f"endpoints[{j}].service")
        if not isinstance(spec, MeshServiceSpec) or spec.endpoints is None:
            raise RegistryError(409, f"{describe(key)} is not an address set (it has no "
                                "endpoints)", f"endpoints[{j}].service")
        current = spec.endpoints
        if i is None and hasattr(spec, "to_spec"):
            spec = spec.to_spec()
        gone = set(delete)
        new = {(e.version, e.address): e for e in upsert}
        kept = [new.pop((e.version, e.address), e) for e in current
                if (e.version, e.address) not in gone]
        endpoints = (*kept, *new.values())
        names = [e.name for e in endpoints if e.name is not None]
        if len(names) != len(set(names)):
            raise bad_request(f"an endpoint name of {describe(key)} would be given twice",
                              f"endpoints[{j}].upsert")
        if len(endpoints) > MAX_ENDPOINTS_PER_SERVICE:
            raise bad_request(f"at most {MAX_ENDPOINTS_PER_SERVICE} endpoints per service",
                              f"endpoints[{j}].upsert")
        patched = replace(spec, endpoints=tuple(endpoints))
        if i is None:
            where[key] = len(out)
            out.append(patched)
        else:
            out[i] = patched
    return out
