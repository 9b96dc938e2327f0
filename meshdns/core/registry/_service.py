"""Services as written and as served, their identity, and the one error type of writes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar, cast

from ._vip import format_ip

ServiceKey = tuple[str, str, int]  # (name, namespace, port)
# A mesh service's identity (docs/meshservice.md section 1): (kind, mesh, zone, namespace,
# name), "" for an absent part. A 5-tuple never equals a 3-tuple: both live in one map.
MeshKey = tuple[str, str, str, str, str]
K = TypeVar("K")
V = TypeVar("V")

MAX_HOSTNAMES_PER_SERVICE = 256
MAX_PORTS_PER_SERVICE = 256  # ports of one mesh service (Kuma documents: the same limit)
MESH_KINDS = ("MeshService", "MeshExternalService", "MeshMultiZoneService")
SERVICE_KIND = "Service"  # the legacy form, as template selectors (``kinds``) name it
ENTRY_KINDS = (SERVICE_KIND, *MESH_KINDS)
DISPLAY_NAME_LABEL = "kuma.io/display-name"
MESH_FIELDS = frozenset({"kind", "mesh", "zone", "namespace", "name", "ports", "vip", "vip6",
                         "hostnames", "labels", "endpoints"})
MAX_ENDPOINTS_PER_SERVICE = 1000  # a Kubernetes Endpoints object's limit
SERVICE_FIELDS = frozenset({"name", "namespace", "port", "vip", "vip6", "hostnames",
                             "labels", "mesh", "zone"})
Labels = tuple[tuple[str, str], ...]  # (key, value) pairs sorted by key: hashable, comparable
KEY_FIELDS = ("name", "namespace", "port")
NS_PORT_OF = itemgetter(1, 2)  # key -> (namespace, port)
PORT_OF = itemgetter(2)


class RegistryError(Exception):
    """A write rejected whole. ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def bad_request(message: str, field: str) -> RegistryError:
    return RegistryError(400, message, field)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A service as written by a client: VIPs may still be missing."""

    name: str
    namespace: str
    port: int
    vip: int | None = None
    vip6: int | None = None
    hostnames: tuple[str, ...] = ()
    # Keyword-only so that they come last in __init__: positional construction
    # (name, namespace, port, vip, vip6, hostnames[, vip_given, vip6_given]) stays.
    labels: Labels = field(default=(), kw_only=True)
    mesh: str | None = field(default=None, kw_only=True)
    zone: str | None = field(default=None, kw_only=True)

    @property
    def key(self) -> ServiceKey:
        return (self.name, self.namespace, self.port)

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Service(ServiceSpec):
    """A service as served: its IPv4 VIP is always known.

    A subclass of ServiceSpec so that input naming both VIPs can be parsed
    straight into the object the registry keeps (no spec to copy from later).
    """

    vip: int = 0  # a default only because the base's fields before it have one
    # Whether the VIPs were given by the control plane (kept as they are, even
    # outside the CIDR) or allocated here (re-allocated when the CIDR moves away).
    vip_given: bool = False
    vip6_given: bool = False

    def to_spec(self) -> ServiceSpec:
        """The write that would reproduce this service, allocated VIPs left open."""
        return ServiceSpec(self.name, self.namespace, self.port,
                           self.vip if self.vip_given else None,
                           self.vip6 if self.vip6_given else None, self.hostnames,
                           labels=self.labels, mesh=self.mesh, zone=self.zone)

    def to_json(self) -> dict[str, Any]:
        return service_json(self, _ip4, _ip6)


def _ip4(vip: int) -> str:
    return format_ip(vip, 4)


def _ip6(vip: int) -> str:
    return format_ip(vip, 6)


def service_json(s: Service, ip4: Callable[[int], str], ip6: Callable[[int], str], *,
                 given: bool = False) -> dict[str, Any]:
    """A service as every JSON document carries it (the API, follow deltas, the state
    file, etcd): the address formatters are the caller's (the IO layers use faster
    socket-based ones); ``given`` adds whether each VIP was given or allocated."""
    out: dict[str, Any] = {
        "name": s.name, "namespace": s.namespace, "port": s.port, "vip": ip4(s.vip),
        "vip6": None if s.vip6 is None else ip6(s.vip6), "hostnames": list(s.hostnames)}
    if given:
        out["vip_given"] = s.vip_given
        out["vip6_given"] = s.vip6_given
    return add_meta(out, s)


def add_meta(out: dict[str, Any], s: ServiceSpec) -> dict[str, Any]:
    """Labels, mesh and zone into a service's JSON record, each only when set: the
    records of services without them stay exactly as they were."""
    if s.labels:
        out["labels"] = dict(s.labels)
    if s.mesh is not None:
        out["mesh"] = s.mesh
    if s.zone is not None:
        out["zone"] = s.zone
    return out


# Building a frozen dataclass runs object.__setattr__ once per field; filling the
# slots straight through their descriptors makes the same object 2-3x faster,
# which counts when a write builds 100k of them. Only for the hot paths below.
_new_object = object.__new__
_SPEC_SLOTS = tuple(getattr(ServiceSpec, f).__set__ for f in (
    "name", "namespace", "port", "vip", "vip6", "hostnames", "labels", "mesh", "zone"))
_SERVICE_SLOTS = tuple(getattr(Service, f).__set__ for f in (
    "name", "namespace", "port", "vip", "vip6", "hostnames", "vip_given", "vip6_given",
    "labels", "mesh", "zone"))


def make_spec(name: str, namespace: str, port: int, vip: int | None, vip6: int | None,
               hostnames: tuple[str, ...], labels: Labels = (), mesh: str | None = None,
               zone: str | None = None) -> ServiceSpec:
    """``ServiceSpec(...)``, faster."""
    spec: ServiceSpec = _new_object(ServiceSpec)
    (s_name, s_namespace, s_port, s_vip, s_vip6, s_hostnames, s_labels, s_mesh,
     s_zone) = _SPEC_SLOTS
    s_name(spec, name)
    s_namespace(spec, namespace)
    s_port(spec, port)
    s_vip(spec, vip)
    s_vip6(spec, vip6)
    s_hostnames(spec, hostnames)
    s_labels(spec, labels)
    s_mesh(spec, mesh)
    s_zone(spec, zone)
    return spec


def make_service(name: str, namespace: str, port: int, vip: int, vip6: int | None,
                  hostnames: tuple[str, ...], vip_given: bool, vip6_given: bool,
                  labels: Labels = (), mesh: str | None = None,
                  zone: str | None = None) -> Service:
    """``Service(...)``, faster."""
    svc: Service = _new_object(Service)
    (s_name, s_namespace, s_port, s_vip, s_vip6, s_hostnames, s_given,
     s_given6, s_labels, s_mesh, s_zone) = _SERVICE_SLOTS
    s_name(svc, name)
    s_namespace(svc, namespace)
    s_port(svc, port)
    s_vip(svc, vip)
    s_vip6(svc, vip6)
    s_hostnames(svc, hostnames)
    s_given(svc, vip_given)
    s_given6(svc, vip6_given)
    s_labels(svc, labels)
    s_mesh(svc, mesh)
    s_zone(svc, zone)
    return svc


def describe(key: ServiceKey | MeshKey) -> str:
    """An entry's key as error messages name it: ``frontend.kong:80`` for a service,
    ``MeshService frontend (default/kong)`` for a mesh service."""
    if len(key) == 5:
        kind, mesh, zone, namespace, name = key
        where = "/".join(p for p in (mesh, zone, namespace) if p)
        return f"{kind} {name} ({where})" if where else f"{kind} {name}"
    return f"{key[0]}.{key[1]}:{key[2]}"


def key_json(key: ServiceKey | MeshKey) -> dict[str, Any]:
    """A key as a JSON object (PATCH ``delete`` items, follow deltas)."""
    if len(key) == 5:
        out: dict[str, Any] = {"kind": key[0]}
        for fname, value in zip(("mesh", "zone", "namespace"), key[1:4], strict=True):
            if value:
                out[fname] = value
        out["name"] = key[4]
        return out
    return {"name": key[0], "namespace": key[1], "port": key[2]}


def key_of_list(raw: Any) -> ServiceKey | MeshKey:
    """A key from its list form (journal ``delete``, ``held`` rows): 3 or 5 items."""
    if len(raw) == 5:
        return (str(raw[0]), str(raw[1]), str(raw[2]), str(raw[3]), str(raw[4]))
    return (str(raw[0]), str(raw[1]), int(raw[2]))


def key_of_record(record: Mapping[str, Any]) -> ServiceKey | MeshKey:
    """The key of a JSON record of either form (a record with ``ports`` is a mesh
    service's)."""
    if "ports" in record:
        return (record.get("kind") or "MeshService", record.get("mesh") or "",
                record.get("zone") or "", record.get("namespace") or "", record["name"])
    return (record["name"], record["namespace"], record["port"])


# ---------------------------------------------------------------- mesh services


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of an address set (docs/meshservice.md section 4): ``{address, name?}``.
    ``version`` is 4 or 6; the address is never claimed (it may repeat across entries)."""

    address: int
    version: int
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": _ip4(self.address) if self.version == 4
                               else _ip6(self.address)}
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class MeshPort:
    """One port of a mesh service: ``{port, name?, appProtocol?}``."""

    port: int
    name: str | None = None
    app_protocol: str = "tcp"

    @property
    def transport(self) -> str:
        """The SRV protocol label: ``udp`` for the app protocol ``udp``, else ``tcp``."""
        return "udp" if self.app_protocol.lower() == "udp" else "tcp"

    @property
    def srv_name(self) -> str | None:
        """``_<name>._<proto>`` for a named port (a name of digits only is no name:
        Kuma names an unnamed Kubernetes port by its number)."""
        if self.name is None or self.name.isdigit():
            return None
        return f"_{self.name}._{self.transport}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port}
        if self.name is not None:
            out["name"] = self.name
        out["appProtocol"] = self.app_protocol
        return out


@dataclass(frozen=True, slots=True)
class MeshServiceSpec:
    """A mesh service as written (docs/meshservice.md section 1): one entry for all of
    its ports, with at most one VIP and one vip6. VIPs are all given or all allocated."""

    kind: str
    mesh: str | None
    zone: str | None
    namespace: str | None
    name: str
    ports: tuple[MeshPort, ...] = ()
    vip: int | None = None
    vip6: int | None = None
    hostnames: tuple[str, ...] = ()
    labels: Labels = ()
    # An address set instead of VIPs (section 4); None: none (the entry has VIPs).
    endpoints: tuple[Endpoint, ...] | None = None

    @property
    def key(self) -> MeshKey:
        return (self.kind, self.mesh or "", self.zone or "", self.namespace or "", self.name)

    @property
    def allocates(self) -> bool:
        """Whether missing VIPs are allocated: only when neither is given (and the entry
        is no address set)."""
        return self.vip is None and self.vip6 is None and self.endpoints is None

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None

    @property
    def display_name(self) -> str:
        return self.label(DISPLAY_NAME_LABEL) or self.name


@dataclass(frozen=True, slots=True)
class MeshService(MeshServiceSpec):
    """A mesh service as served: whether each VIP was given or allocated here."""

    vip_given: bool = False
    vip6_given: bool = False

    def to_spec(self) -> MeshServiceSpec:
        """The write that would reproduce it, allocated VIPs left open."""
        return MeshServiceSpec(self.kind, self.mesh, self.zone, self.namespace, self.name,
                               self.ports, self.vip if self.vip_given else None,
                               self.vip6 if self.vip6_given else None, self.hostnames,
                               self.labels, self.endpoints)

    def to_json(self) -> dict[str, Any]:
        return mesh_json(self, _ip4, _ip6)


def mesh_json(s: MeshService, ip4: Callable[[int], str], ip6: Callable[[int], str], *,
              given: bool = False) -> dict[str, Any]:
    """A mesh service's JSON record (docs/meshservice.md section 7)."""
    out: dict[str, Any] = {"kind": s.kind}
    if s.mesh is not None:
        out["mesh"] = s.mesh
    if s.zone is not None:
        out["zone"] = s.zone
    if s.namespace is not None:
        out["namespace"] = s.namespace
    out["name"] = s.name
    out["ports"] = [p.to_json() for p in s.ports]
    out["vip"] = None if s.vip is None else ip4(s.vip)
    out["vip6"] = None if s.vip6 is None else ip6(s.vip6)
    if s.hostnames:
        out["hostnames"] = list(s.hostnames)
    if s.labels:
        out["labels"] = dict(s.labels)
    if s.endpoints is not None:
        out["endpoints"] = [e.to_json() for e in s.endpoints]
    if given:
        out["vip_given"] = s.vip_given
        out["vip6_given"] = s.vip6_given
    return out


Entry = Service | MeshService
EntrySpec = ServiceSpec | MeshServiceSpec
EntryKey = ServiceKey | MeshKey


def entry_json(s: Entry, ip4: Callable[[int], str], ip6: Callable[[int], str], *,
               given: bool = False) -> dict[str, Any]:
    """The JSON record of an entry of either form."""
    if s.__class__ is Service:
        return service_json(s, ip4, ip6, given=given)
    return mesh_json(cast(MeshService, s), ip4, ip6, given=given)


def entry_kind(spec: EntrySpec) -> str:
    return spec.kind if isinstance(spec, MeshServiceSpec) else SERVICE_KIND

