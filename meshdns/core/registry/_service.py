"""Services as written and as served, their identity, and the one error type of writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar

from ._vip import format_ip

ServiceKey = tuple[str, str, int]  # (name, namespace, port)
K = TypeVar("K")
V = TypeVar("V")

MAX_HOSTNAMES_PER_SERVICE = 256
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


def describe(key: ServiceKey) -> str:
    return f"{key[0]}.{key[1]}:{key[2]}"

