"""Kuma's own service documents, read into typed values (issue 25; design: docs/meshservice.md).

Three kinds: MeshService, MeshExternalService and MeshMultiZoneService, each in
Kubernetes form (``apiVersion: kuma.io/v1alpha1``, ``kind``, ``metadata``, ``spec``,
``status``) or Universal form (``type``, ``name``, ``mesh``, ``labels``, ``spec``,
``status``); one or many per YAML stream (``---``), and the lists that ``kubectl get
... -o yaml`` (``kind: List`` or ``kind: <Kind>List``, ``items``) and ``kumactl get ...
-o yaml`` (``items``, ``total``, ``next``) print; JSON (``-o json``) as well.

Pure: text or decoded documents in, ``KumaService`` values out; no IO, no clock. What
meshdns does not use (selectors, TLS, endpoints of external services, creation times,
``kri``, status conditions...) is dropped without a word. Everything it uses is checked,
and an error names the document, the field and the resource (``KumaDocumentError``, a
RegistryError: the API answers it as 400 with ``field``). Work is bounded like the
registry's own input: counts per list, lengths per string, the YAML loader's depth and
alias rules, at most ``MAX_RESOURCES`` resources per stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

# One place for what this module takes from the registry's input rules (the core is
# being re-packaged: these imports are the only lines that move with it).
from .core.registry import (
    MAX_HOSTNAMES_PER_SERVICE,
    Labels,
    MeshPort,
    RegistryError,
    clip,
    format_ip,
    is_rfc1123_label,
    label_key_error,
    normalize_hostname,
    parse_ip4,
    parse_ip6,
    parse_labels,
    quote,
)
from .yamlload import DuplicateKey, Loader, load_json

__all__ = [
    "API_VERSION", "KINDS", "MAX_PORTS_PER_SERVICE", "MAX_RESOURCES", "MAX_VIPS", "Kind",
    "KumaAddress", "KumaDocumentError", "KumaPort", "KumaService", "load_kuma",
    "looks_like_kuma", "parse_kuma", "parse_kuma_documents",
]

Kind = Literal["MeshService", "MeshExternalService", "MeshMultiZoneService"]
KINDS: tuple[Kind, ...] = ("MeshService", "MeshExternalService", "MeshMultiZoneService")
API_VERSION = "kuma.io/v1alpha1"

MAX_RESOURCES = 1 << 20  # documents plus list items in one stream (empty documents count)
MAX_PORTS_PER_SERVICE = 256
MAX_VIPS = 16  # Kuma writes one (a cluster IP or a Kuma VIP), a headless pod one per family
_MAX_NAME = 253  # a Kuma resource name: a DNS subdomain at most

# Kuma's labels (api/mesh/v1alpha1 in Kuma): where mesh, zone, display name and the
# original namespace of a resource live.
MESH_LABEL = "kuma.io/mesh"
ZONE_LABEL = "kuma.io/zone"
DISPLAY_NAME_LABEL = "kuma.io/display-name"
NAMESPACE_LABEL = "k8s.kuma.io/namespace"
ORIGIN_LABEL = "kuma.io/origin"
DEFAULT_MESH = "default"  # a Kubernetes resource without kuma.io/mesh is in it (Kuma's rule)

_LIST_KIND = "List"


class KumaDocumentError(RegistryError):
    """A Kuma document meshdns cannot read: 400, ``field`` its full path
    (``documents[1].spec.ports[0].port``), ``document`` the index in the stream."""

    def __init__(self, message: str, field: str, document: int) -> None:
        super().__init__(400, message, field)
        self.document = document

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True, slots=True)
class KumaPort:
    port: int
    name: str | None = None
    target_port: int | str | None = None  # read and kept for explain; DNS answers never use it
    app_protocol: str = "tcp"

    @property
    def entry_port(self) -> MeshPort:
        """The port as the registry holds it (its SRV name, transport and JSON form)."""
        return MeshPort(self.port, self.name, self.app_protocol)

    @property
    def transport(self) -> str:
        return self.entry_port.transport

    @property
    def srv_name(self) -> str | None:
        return self.entry_port.srv_name

    def to_json(self) -> dict[str, Any]:
        return self.entry_port.to_json()


@dataclass(frozen=True, slots=True)
class KumaAddress:
    """One entry of ``status.addresses``: a host name Kuma gave the resource."""

    hostname: str
    origin: str | None = None  # "HostnameGenerator" (or "Kubernetes")
    generator: str | None = None  # hostnameGeneratorRef.coreName


@dataclass(frozen=True, slots=True)
class KumaService:
    """One resource, as meshdns uses it. ``key`` is its registry identity."""

    kind: Kind
    name: str  # the display name: kuma.io/display-name, else the resource's own name
    mesh: str
    zone: str | None
    namespace: str | None  # k8s.kuma.io/namespace, else metadata.namespace
    labels: Labels  # every label, sorted (kuma.io/mesh etc. included, as Kuma has them)
    ports: tuple[KumaPort, ...]
    vips: tuple[str, ...]  # status.vips (status.vip of an external service), normalized
    addresses: tuple[KumaAddress, ...]  # status.addresses, duplicates dropped

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.kind, self.mesh, self.zone or "", self.namespace or "", self.name)

    @property
    def origin(self) -> str | None:
        return dict(self.labels).get(ORIGIN_LABEL)

    @property
    def vip(self) -> int | None:
        """The first IPv4 address of ``vips`` (Kuma's names point at the first VIP)."""
        return next((v for v in map(parse_ip4, self.vips) if v is not None), None)

    @property
    def vip6(self) -> int | None:
        return next((v for v in map(parse_ip6, self.vips) if v is not None), None)

    @property
    def hostnames(self) -> tuple[str, ...]:
        return tuple(a.hostname for a in self.addresses)

    def to_json(self) -> dict[str, Any]:
        """The registry entry this resource becomes (docs/meshservice.md, "JSON"):
        VIPs and host names only when Kuma gave them (else allocated and rendered)."""
        out: dict[str, Any] = {"kind": self.kind, "mesh": self.mesh}
        if self.zone is not None:
            out["zone"] = self.zone
        if self.namespace is not None:
            out["namespace"] = self.namespace
        out["name"] = self.name
        out["ports"] = [p.to_json() for p in self.ports]
        vip, vip6 = self.vip, self.vip6
        if vip is not None:
            out["vip"] = format_ip(vip, 4)
        if vip6 is not None:
            out["vip6"] = format_ip(vip6, 6)
        if self.addresses:
            out["hostnames"] = list(self.hostnames)
        if self.labels:
            out["labels"] = dict(self.labels)
        return out


# ---------------------------------------------------------------- reading a stream


def load_kuma(text: str | bytes) -> list[KumaService]:
    """Every resource of a YAML stream, or of a JSON document, in order;
    KumaDocumentError for the first thing that is wrong, naming its document and field.

    JSON (``kubectl get -o json``) goes through the JSON reader: YAML's composer costs
    about 20 times more per resource. Text that only looks like JSON (a YAML flow
    mapping, ``{type: MeshService}``) is read as YAML."""
    head = text.lstrip()[:1]
    if head in ("{", "[", b"{", b"["):
        try:
            doc = load_json(text)
        except DuplicateKey as exc:
            raise KumaDocumentError(exc.reason, _join("documents[0]", exc.path), 0) from None
        except (ValueError, RecursionError):
            pass  # not JSON: YAML says what is wrong with it, if anything
        else:
            return parse_kuma_documents([doc])
    return parse_kuma_documents(_documents(text))


def _documents(text: str | bytes) -> Iterator[Any]:
    """The stream's documents, decoded by meshdns's one YAML loader (no aliases, bounded
    depth, duplicate keys refused) one at a time; errors name the document."""
    loader = Loader(text)
    index = 0
    try:
        while True:
            try:
                if not loader.check_data():
                    return
                doc = loader.get_data()
            except DuplicateKey as exc:
                raise KumaDocumentError(exc.reason, _join(f"documents[{index}]", exc.path),
                                        index) from None
            except (yaml.YAMLError, ValueError, RecursionError) as exc:
                message = clip(" ".join(str(exc).split()), 200)
                raise KumaDocumentError(f"malformed YAML: {message}", f"documents[{index}]",
                                        index) from None
            yield doc
            index += 1
    finally:
        loader.dispose()


def parse_kuma_documents(docs: Iterable[Any]) -> list[KumaService]:
    """The resources of decoded documents (a document may be a list of them); an empty
    document (``---`` with nothing after it) is skipped. The same resource twice is
    refused, naming both places."""
    out: list[KumaService] = []
    seen: dict[tuple[str, ...], str] = {}
    count = 0
    for index, doc in enumerate(docs):
        count += 1
        _count(count, f"documents[{index}]", index)
        for path, svc in _resources(doc, index):
            count += path != f"documents[{index}]"  # a list's items count one each
            _count(count, path, index)
            first = seen.setdefault(svc.key, path)
            if first != path:
                raise KumaDocumentError(f"{_describe(svc)} is given twice (also at {first})",
                                        path, index)
            out.append(svc)
    return out


def _count(count: int, path: str, index: int) -> None:
    if count > MAX_RESOURCES:
        raise KumaDocumentError(f"at most {MAX_RESOURCES} resources per stream", path, index)


def parse_kuma(doc: Any, document: int = 0) -> list[KumaService]:
    """The resources of one decoded document: one, or a list's items."""
    return [svc for _path, svc in _resources(doc, document)]


def looks_like_kuma(doc: Any) -> bool:
    """Whether a decoded document is meant as Kuma's (and not a meshdns ``services``
    document): it has ``apiVersion``/``kind`` or ``type``, or is a list with ``items``.
    What meshdns then reads of it, and refuses, is ``parse_kuma``'s."""
    return isinstance(doc, Mapping) and "services" not in doc and (
        "kind" in doc or "apiVersion" in doc or "type" in doc or "items" in doc)


def _resources(doc: Any, index: int) -> Iterator[tuple[str, KumaService]]:
    where = f"documents[{index}]"
    if doc is None:
        return
    if not isinstance(doc, Mapping):
        raise KumaDocumentError("must be a Kuma resource (apiVersion, kind, metadata, spec) "
                                "or a list of them", where, index)
    if _is_list(doc):
        items = doc.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            raise KumaDocumentError("must be a list of resources", f"{where}.items", index)
        for i, item in enumerate(items):
            path = f"{where}.items[{i}]"
            if isinstance(item, Mapping) and _is_list(item):
                raise KumaDocumentError("a list inside a list is not a Kuma document", path,
                                        index)
            yield path, _resource(item, path, index)
        return
    yield where, _resource(doc, where, index)


def _is_list(doc: Mapping[Any, Any]) -> bool:
    """``kind: List`` / ``kind: <Kind>List`` (kubectl), or ``items`` with neither kind
    nor type (kumactl prints ``items``, ``total``, ``next``)."""
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith(_LIST_KIND):
        return kind == _LIST_KIND or kind[:-len(_LIST_KIND)] in KINDS
    return "items" in doc and "kind" not in doc and "type" not in doc


# ---------------------------------------------------------------- one resource


class _Bad(Exception):
    """A field that cannot be read: its path inside the resource, and why."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason


def _resource(item: Any, where: str, index: int) -> KumaService:
    if not isinstance(item, Mapping):
        raise KumaDocumentError("must be a Kuma resource (an object)", where, index)
    kubernetes = "apiVersion" in item or "kind" in item
    kind_field = "kind" if kubernetes else "type"
    kind = item.get(kind_field)
    if kind is None and not kubernetes:
        raise KumaDocumentError("a Kuma resource needs apiVersion and kind (Kubernetes) or "
                                "type (Universal)", where, index)
    if kind not in KINDS:
        raise KumaDocumentError(
            f"{kind_field} {quote(kind)} is not one meshdns reads: "
            f"{', '.join(KINDS[:-1])} or {KINDS[-1]}", f"{where}.{kind_field}", index)
    own_name = "?"
    try:
        if kubernetes:
            own_name, labels, mesh, namespace = _kubernetes_meta(item)
        else:
            own_name, labels, mesh, namespace = _universal_meta(item)
        label_field = "metadata.labels" if kubernetes else "labels"
        display = labels.get(DISPLAY_NAME_LABEL)
        if display is None:
            name = _label_value(own_name, "metadata.name" if kubernetes else "name")
        else:
            name = _label_value(display, f"{label_field}.{DISPLAY_NAME_LABEL}")
        zone = labels.get(ZONE_LABEL)
        if zone is not None:
            zone = _label_value(zone, f"{label_field}.{ZONE_LABEL}")
        if NAMESPACE_LABEL in labels:  # the original namespace wins (a synced copy's)
            namespace = _label_value(labels[NAMESPACE_LABEL],
                                     f"{label_field}.{NAMESPACE_LABEL}")
        ports, vips, addresses = _spec_and_status(kind, item)
    except _Bad as bad:
        raise KumaDocumentError(f"{kind} {clip(own_name, 63)}: {bad.reason}",
                                _join(where, bad.field), index) from None
    return KumaService(kind, name, mesh, zone, namespace, tuple(sorted(labels.items())),
                       ports, vips, addresses)


def _kubernetes_meta(item: Mapping[Any, Any]) -> tuple[str, dict[str, str], str, str | None]:
    """Name, labels, mesh and namespace of the Kubernetes form."""
    if item.get("apiVersion") != API_VERSION:
        raise _Bad("apiVersion", f"must be {API_VERSION}, got {quote(item.get('apiVersion'))}")
    meta = _mapping(item.get("metadata"), "metadata", required=True)
    own_name = _resource_name(meta.get("name"), "metadata.name")
    labels = _labels(meta.get("labels"), "metadata.labels")
    mesh = _label_value(labels.get(MESH_LABEL, DEFAULT_MESH), f"metadata.labels.{MESH_LABEL}")
    namespace = meta.get("namespace")
    if namespace is not None:
        namespace = _label_value(namespace, "metadata.namespace")
    return own_name, labels, mesh, namespace


def _universal_meta(item: Mapping[Any, Any]) -> tuple[str, dict[str, str], str, str | None]:
    """Name, labels, mesh and namespace (none but the label's) of the Universal form."""
    own_name = _resource_name(item.get("name"), "name")
    labels = _labels(item.get("labels"), "labels")
    mesh = item.get("mesh", labels.get(MESH_LABEL, DEFAULT_MESH))
    if MESH_LABEL in labels and labels[MESH_LABEL] != mesh:
        raise _Bad(f"labels.{MESH_LABEL}", f"says mesh {quote(labels[MESH_LABEL])}, the "
                   f"resource's mesh is {quote(mesh)}")
    return own_name, labels, _label_value(mesh, "mesh"), None


def _spec_and_status(kind: Kind, item: Mapping[Any, Any]
                     ) -> tuple[tuple[KumaPort, ...], tuple[str, ...], tuple[KumaAddress, ...]]:
    """Ports, VIPs and host names: the same in both forms, by kind."""
    spec = _mapping(item.get("spec"), "spec", required=kind == "MeshExternalService")
    status = _mapping(item.get("status"), "status")
    if kind == "MeshExternalService":
        ports: tuple[KumaPort, ...] = (
            _match_port(_mapping(spec.get("match"), "spec.match", required=True)),)
        vip = _mapping(status.get("vip"), "status.vip")
        vips = _vips([vip] if vip else [], "status.vip", single=True)
    else:
        ports = _ports(spec.get("ports"), "spec.ports", kind == "MeshService")
        vips = _vips(status.get("vips"), "status.vips")
    return ports, vips, _addresses(status.get("addresses"), "status.addresses")


def _describe(svc: KumaService) -> str:
    where = "/".join(p for p in (svc.mesh, svc.zone, svc.namespace) if p)
    return f"{svc.kind} {svc.name} ({where})"


def _join(where: str, field: str) -> str:
    if not field:
        return where
    return f"{where}{field}" if field.startswith("[") else f"{where}.{field}"


def _mapping(value: Any, field: str, required: bool = False) -> Mapping[Any, Any]:
    if value is None:
        if required:
            raise _Bad(field, "is required")
        return {}
    if not isinstance(value, Mapping):
        raise _Bad(field, "must be an object")
    return value


def _list(value: Any, field: str, limit: int, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(field, f"must be a list of {what}")
    if len(value) > limit:
        raise _Bad(field, f"at most {limit} {what}")
    return value


def _resource_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(field, "is required and must be a string")
    if len(value) > _MAX_NAME:
        raise _Bad(field, f"must be at most {_MAX_NAME} characters, got {quote(value)}")
    return value


def _label_value(value: Any, field: str) -> str:
    """A mesh, zone, namespace or display name: a lower-case RFC 1123 label, as the
    registry's ``mesh``, ``zone``, ``namespace`` and ``name`` are."""
    if not isinstance(value, str) or not is_rfc1123_label(value):
        raise _Bad(field, "must be a lower-case RFC 1123 label (a-z, 0-9, '-', 1..63 chars), "
                   f"got {quote(value)}")
    return value


def _labels(raw: Any, field: str) -> dict[str, str]:
    """Kubernetes labels, checked by the registry's own rules (its label limit too)."""
    try:
        return dict(parse_labels(raw, field))
    except RegistryError as exc:
        raise _Bad(exc.field or field, exc.message) from None


def _port_number(value: Any, field: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise _Bad(field, f"port must be an integer 1..65535, got {quote(value)}")
    return value


def _app_protocol(value: Any, field: str) -> str:
    if value is None or value == "":
        return "tcp"  # Kuma's default, and what an omitted (omitempty) protocol means
    # IANA service names or domain-prefixed ones ("kubernetes.io/h2c"): label-key syntax.
    if not isinstance(value, str) or label_key_error(value) is not None:
        raise _Bad(field, f"must be a protocol name such as tcp, http, http2 or grpc, got "
                   f"{quote(value)}")
    return value


def _ports(raw: Any, field: str, target_ports: bool) -> tuple[KumaPort, ...]:
    ports: list[KumaPort] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, str], int] = {}
    for i, item in enumerate(_list(raw, field, MAX_PORTS_PER_SERVICE, "ports")):
        here = f"{field}[{i}]"
        item = _mapping(item, here, required=True)
        port = _port_number(item.get("port"), f"{here}.port")
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not is_rfc1123_label(name)):
            raise _Bad(f"{here}.name", "a port name must be a lower-case RFC 1123 label (a-z, "
                       f"0-9, '-', 1..63 chars), got {quote(name)}")
        target: int | str | None = None
        if target_ports:
            target = item.get("targetPort")
            if target is not None and not (
                    (type(target) is int and 1 <= target <= 65535)
                    or (isinstance(target, str) and 0 < len(target) <= 63)):
                raise _Bad(f"{here}.targetPort", "must be a port number 1..65535 or a port "
                           f"name, got {quote(target)}")
        protocol = _app_protocol(item.get("appProtocol"), f"{here}.appProtocol")
        # Kuma keys ports by (port, appProtocol); a name must be unique for its SRV name.
        first = numbers.setdefault((port, protocol), i)
        if first != i:
            raise _Bad(f"{here}.port", f"port {port}/{protocol} is given twice (also "
                       f"{field}[{first}])")
        if name is not None:
            first = names.setdefault(name, i)
            if first != i:
                raise _Bad(f"{here}.name", f"port name {quote(name)} is given twice (also "
                           f"{field}[{first}])")
        ports.append(KumaPort(port, name, target, protocol))
    return tuple(ports)


def _match_port(match: Mapping[Any, Any]) -> KumaPort:
    """A MeshExternalService's one port: ``spec.match`` (``type`` is not used)."""
    port = _port_number(match.get("port"), "spec.match.port")
    return KumaPort(port, None, None, _app_protocol(match.get("protocol"), "spec.match.protocol"))


def _vips(raw: Any, field: str, single: bool = False) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_list(raw, field, MAX_VIPS, "VIPs")):
        here = field if single else f"{field}[{i}]"
        ip = _mapping(item, here, required=True).get("ip")
        if single and ip in (None, ""):
            continue  # an external service without a VIP yet: status.vip: {}
        text = _ip_text(ip)
        if text is None:
            raise _Bad(f"{here}.ip", f"must be an IPv4 or IPv6 address, got {quote(ip)}")
        if text not in out:
            out.append(text)
    return tuple(out)


def _ip_text(ip: Any) -> str | None:
    """``ip`` in its normal spelling, or None when it is not an address (a zone id,
    ``fe80::1%eth0``, is not one: a VIP cannot carry it)."""
    if not isinstance(ip, str):
        return None
    v4 = parse_ip4(ip)
    if v4 is not None:
        return format_ip(v4, 4)
    v6 = parse_ip6(ip) if "%" not in ip else None
    return None if v6 is None else format_ip(v6, 6)


def _addresses(raw: Any, field: str) -> tuple[KumaAddress, ...]:
    out: dict[str, KumaAddress] = {}
    for i, item in enumerate(_list(raw, field, MAX_HOSTNAMES_PER_SERVICE, "addresses")):
        here = f"{field}[{i}]"
        item = _mapping(item, here, required=True)
        raw_host = item.get("hostname")
        host = normalize_hostname(raw_host) if isinstance(raw_host, str) else None
        if host is None:
            raise _Bad(f"{here}.hostname", "must be a fully qualified domain name, got "
                       f"{quote(raw_host)}")
        origin = _short_text(item.get("origin"), f"{here}.origin")
        ref = _mapping(item.get("hostnameGeneratorRef"), f"{here}.hostnameGeneratorRef")
        generator = _short_text(ref.get("coreName"), f"{here}.hostnameGeneratorRef.coreName")
        out.setdefault(host, KumaAddress(host, origin, generator))
    return tuple(out.values())


def _short_text(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_NAME:
        raise _Bad(field, f"must be a string of at most {_MAX_NAME} characters, got "
                   f"{quote(value)}")
    return value
