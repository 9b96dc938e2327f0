"""A snapshot's name table: the names it answers for beyond the built-in forms
(rendered from the templates of _templates.py), and the services it hides.

Built when a snapshot is built (in the write's worker thread, never on the DNS
path): every non-built-in ``dns.hostname_templates`` entry is rendered for
every service, each name checked (a valid RFC 1123 subdomain, owned by one
service only), and the ``dns.select`` selector decides which services this
instance answers for. With the default templates and no selector there is
nothing to build: the table is empty and costs nothing.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from ._layered import evolve
from ._service import (
    DISPLAY_NAME_LABEL,
    SERVICE_KIND,
    EntryKey,
    EntrySpec,
    MeshKey,
    MeshServiceSpec,
    RegistryError,
    ServiceKey,
    ServiceSpec,
    describe,
)
from ._templates import (
    DEFAULT_HOSTNAME_TEMPLATES,
    HostnameTemplate,
    Selector,
    canonical_name,
    is_subdomain,
    is_valid_generated,
    kuma_name,
    selects,
)

Counts = tuple[Mapping[tuple[str, int], int], Mapping[int, int]]
# Built-in per-port names of mesh services: (builtin, name, namespace, port) -> owner.
MeshPorts = Mapping[tuple[str, str, str, int], MeshKey]
_NO_MESH_PORTS: MeshPorts = {}
_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class NameTable:
    """What a snapshot was named and filtered with, and the results."""

    templates: tuple[HostnameTemplate, ...] = DEFAULT_HOSTNAME_TEMPLATES
    select: Selector = ()
    # Rendered names -> (owner, index of the template that first produced it).
    generated: Mapping[str, tuple[EntryKey, int]] = field(default_factory=dict)
    # Empty non-terminals above the generated names of visible services, each with
    # how many names lie below it (so a PATCH can update them in place).
    ents: Mapping[str, int] = field(default_factory=dict)
    hidden: frozenset[EntryKey] = frozenset()  # services dns.select leaves out
    # (ns, port) and port counts of the visible services; None: all are visible.
    visible_counts: Counts | None = None
    # Rendered names of mesh services from a template with {port}: name -> that port.
    ported: Mapping[str, int] = field(default_factory=dict)

    @property
    def builtins(self) -> frozenset[str]:
        return frozenset(t.builtin for t in self.templates if t.builtin is not None)

    @property
    def is_default(self) -> bool:
        return self.templates == DEFAULT_HOSTNAME_TEMPLATES and not self.select


DEFAULT_NAMES = NameTable()


def builtin_owner(host: str, keys: Container[EntryKey],
                  domains: Sequence[str], builtins: frozenset[str],
                  mesh_ports: MeshPorts = _NO_MESH_PORTS) -> EntryKey | None:
    """The entry whose canonical or Kuma name (if those forms are on) ``host`` is: a
    service, or a mesh service that owns that per-port name."""
    for domain in domains:
        if not is_subdomain(host, domain) or host == domain:
            continue
        rest = host[: -len(domain) - 1].split(".")
        key: ServiceKey | None = None
        if len(rest) == 4 and rest[2] == "svc" and rest[3].isdigit():
            if "canonical" in builtins:
                key = (rest[0], rest[1], int(rest[3]))
        elif len(rest) == 1 and rest[0].count("_") == 3 and "kuma" in builtins:
            n, ns, svc, port = rest[0].split("_")
            if svc == "svc" and port.isdigit():
                key = (n, ns, int(port))
        if key is not None and (
            canonical_name(*key, domain) == host or kuma_name(*key, domain) == host
        ):
            if key in keys:
                return key
            if mesh_ports:
                rule = "canonical" if len(rest) == 4 else "kuma"
                owner = mesh_ports.get((rule, *key))
                if owner is not None:
                    return owner
    return None


def mesh_builtin_ports(spec: MeshServiceSpec, templates: Sequence[HostnameTemplate]
                       ) -> Iterator[tuple[str, str, str, int]]:
    """(builtin, name, namespace, port) for every built-in per-port name a mesh service
    owns: each port, under each built-in template that selects it (it needs a namespace)."""
    if spec.namespace is None or not spec.ports:
        return
    for template in templates:
        if template.builtin is not None and template.applies(spec.kind, spec):
            for port in dict.fromkeys(p.port for p in spec.ports):
                yield template.builtin, spec.name, spec.namespace, port


def _conflict(message: str, path: str, index: int) -> RegistryError:
    return RegistryError(409, message, f"{path}[{index}]" if index >= 0 else None)


Rendered = Sequence[tuple[int, HostnameTemplate]]


def _rendered(templates: tuple[HostnameTemplate, ...]) -> list[tuple[int, HostnameTemplate]]:
    return [(i, t) for i, t in enumerate(templates) if t.builtin is None]


def _names_of(spec: EntrySpec, rendered: Rendered, domains: tuple[str, ...]
              ) -> Iterator[tuple[str, int, HostnameTemplate]]:
    """(name, template index, template) for every name the templates give ``spec``."""
    if isinstance(spec, MeshServiceSpec):
        for rendered_name, i, template, _ in mesh_names(spec, rendered, domains):
            yield rendered_name, i, template
        return
    labels = dict(spec.labels)
    values: dict[str, str | None] = {
        "name": spec.name, "namespace": spec.namespace, "port": str(spec.port),
        "mesh": spec.mesh, "zone": spec.zone,
        "display_name": labels.get(DISPLAY_NAME_LABEL) or spec.name}
    for i, template in rendered:
        if (template.kinds is not None or template.match) and \
                not template.applies(SERVICE_KIND, spec):
            continue
        for domain in domains if template.uses_domain else domains[:1]:
            name = template.render(values, labels, domain)
            if name is not None:  # None: a field it uses is not set for this service
                yield name, i, template


def mesh_names(spec: MeshServiceSpec, rendered: Rendered, domains: tuple[str, ...]
               ) -> Iterator[tuple[str, int, HostnameTemplate, int | None]]:
    """(name, template index, template, port or None) for every name the rendered
    templates give a mesh service: none when it has explicit host names; a template
    with ``{port}`` once per port, one without it once."""
    if spec.hostnames:
        return
    labels = dict(spec.labels)
    values: dict[str, str | None] = {
        "name": spec.name, "namespace": spec.namespace, "mesh": spec.mesh, "zone": spec.zone,
        "display_name": labels.get(DISPLAY_NAME_LABEL) or spec.name, "port": None}
    for i, template in rendered:
        if not template.applies(spec.kind, spec):
            continue
        ports: Iterable[int | None] = dict.fromkeys(p.port for p in spec.ports) \
            if template.uses_port else (None,)
        for port in ports:
            values["port"] = None if port is None else str(port)
            for domain in domains if template.uses_domain else domains[:1]:
                name = template.render(values, labels, domain)
                if name is not None:
                    yield name, i, template, port


def mesh_primary_name(spec: MeshServiceSpec, templates: Sequence[HostnameTemplate],
                      domain: str) -> str | None:
    """A mesh service's canonical name (docs/meshservice.md section 2): its first explicit
    host name that is no wildcard; else the first template without {port} that names
    it; else the first with {port} (a built-in included), for its first port; else None."""
    for host in spec.hostnames:
        if not host.startswith("*."):
            return host
    labels = dict(spec.labels)
    values: dict[str, str | None] = {
        "name": spec.name, "namespace": spec.namespace, "mesh": spec.mesh, "zone": spec.zone,
        "display_name": labels.get(DISPLAY_NAME_LABEL) or spec.name, "port": None}
    if not spec.hostnames:
        for template in templates:
            if template.builtin is None and not template.uses_port and \
                    template.applies(spec.kind, spec):
                name = template.render(values, labels, domain)
                if name is not None:
                    return name
    if not spec.ports:
        return None
    port = spec.ports[0].port
    values["port"] = str(port)
    for template in templates:
        if not template.uses_port or not template.applies(spec.kind, spec):
            continue
        if template.builtin is not None:
            if spec.namespace is None:
                continue
            if template.builtin == "canonical":
                return canonical_name(spec.name, spec.namespace, port, domain)
            kuma = kuma_name(spec.name, spec.namespace, port, domain)
            if kuma is not None:
                return kuma
        elif not spec.hostnames:
            name = template.render(values, labels, domain)
            if name is not None:
                return name
    return None


def ents_above(name: str, domains: tuple[str, ...]) -> Iterator[str]:
    """The names between ``name`` and the served domain it lies in (none if outside)."""
    for domain in domains:
        if is_subdomain(name, domain):
            cut = name.find(".")
            while cut != -1 and name[cut + 1:] != domain:
                yield name[cut + 1:]
                cut = name.find(".", cut + 1)
            return


def _count(counts: dict[_T, int], item: _T, step: int) -> None:
    n = counts.get(item, 0) + step
    if n:
        counts[item] = n
    else:
        del counts[item]


def build_names(specs: Mapping[Any, EntrySpec],
                stored_first: Iterable[tuple[EntryKey, EntrySpec]],
                where: Mapping[EntryKey, int], hostnames: Mapping[str, EntryKey],
                templates: tuple[HostnameTemplate, ...], select: Selector,
                domains: tuple[str, ...], path: str,
                mesh_ports: MeshPorts = _NO_MESH_PORTS) -> NameTable:
    """The name table of the registry holding ``specs``; RegistryError 409 naming the
    service (and the other owner) when a rendered name is invalid or taken."""
    rendered = _rendered(templates)
    if not rendered and not select:
        return DEFAULT_NAMES if templates == DEFAULT_HOSTNAME_TEMPLATES else \
            NameTable(templates)
    hidden = frozenset(k for k, s in specs.items() if not selects(s, select)) \
        if select else frozenset()
    builtins = frozenset(t.builtin for t in templates if t.builtin is not None)
    generated: dict[str, tuple[EntryKey, int]] = {}
    ported: dict[str, int] = {}
    for key, spec in stored_first if rendered else ():
        for name, i, template, port in _entry_names(spec, rendered, domains):
            if not is_valid_generated(name) or name in domains:
                raise _conflict(
                    f"hostname template {template.text!r} gives {describe(key)} the name "
                    f"{name[:80]!r}, which is not a valid DNS name (RFC 1123 subdomain, "
                    "not a served domain apex)", path, where.get(key, -1))
            owner = generated.get(name)
            other = owner[0] if owner is not None else hostnames.get(name) or \
                builtin_owner(name, specs, domains, builtins, mesh_ports)
            if other is not None and other != key:
                raise _conflict(
                    f"hostname template {template.text!r} gives {describe(key)} the name "
                    f"{name!r}, which is already a name of {describe(other)}",
                    path, where.get(key, -1) if where.get(key, -1) >= 0
                    else where.get(other, -1))
            if owner is None:
                generated[name] = (key, i)
                if port is not None:
                    ported[name] = port
    ents: dict[str, int] = {}
    for name, (key, _) in generated.items():
        if key not in hidden:
            for ent in ents_above(name, domains):
                ents[ent] = ents.get(ent, 0) + 1
    visible: Counts | None = None
    if select:
        ns_ports: dict[tuple[str, int], int] = {}
        ports: dict[int, int] = {}
        for key, spec in specs.items():
            if key in hidden:
                continue
            if isinstance(spec, MeshServiceSpec):
                for builtin, _, ns, port in mesh_builtin_ports(spec, templates):
                    if builtin == "canonical":
                        ns_ports[ns, port] = ns_ports.get((ns, port), 0) + 1
                        ports[port] = ports.get(port, 0) + 1
                continue
            _, ns, port = cast(ServiceKey, key)
            ns_ports[ns, port] = ns_ports.get((ns, port), 0) + 1
            ports[port] = ports.get(port, 0) + 1
        visible = (ns_ports, ports)
    return NameTable(templates, select, generated, ents, hidden, visible, ported)


def _entry_names(spec: EntrySpec, rendered: Rendered, domains: tuple[str, ...]
                 ) -> Iterator[tuple[str, int, HostnameTemplate, int | None]]:
    if isinstance(spec, MeshServiceSpec):
        yield from mesh_names(spec, rendered, domains)
        return
    for name, i, template in _names_of(spec, rendered, domains):
        yield name, i, template, None





def patch_names(old: NameTable, removed: Sequence[EntrySpec], upserts: Sequence[EntrySpec],
                services: Container[EntryKey], hostnames: Mapping[str, EntryKey],
                domains: tuple[str, ...], mesh_ports: MeshPorts = _NO_MESH_PORTS
                ) -> NameTable | None:
    """``build_names`` for a PATCH: ``old`` less what ``removed`` (deleted or rewritten
    services) had, plus the ``upserts``; None when a name is invalid or taken (the full
    rebuild then names the error). Costs the size of the patch: the rendered-name table
    evolves as a layered map; the small tables it changes (ENT counts) are copied."""
    templates, select = old.templates, old.select
    rendered = _rendered(templates)
    if not rendered and not select:
        return old
    hidden = old.hidden
    if select:
        still = set(hidden)
        still.difference_update(svc.key for svc in removed)
        still.update(spec.key for spec in upserts if not selects(spec, select))
        hidden = frozenset(still)
    generated = base = old.generated
    ents = old.ents
    if rendered:
        # The rendered-name table holds every service's names: rather than copying it,
        # collect what this patch deletes and writes and evolve it once (_layered.py).
        gone: set[str] = set()
        put: dict[str, tuple[EntryKey, int]] = {}

        def owner_of(name: str) -> tuple[EntryKey, int] | None:
            if name in put:
                return put[name]
            return None if name in gone else base.get(name)

        ents = dict(old.ents)
        for svc in removed:
            for name, _, _ in _names_of(svc, rendered, domains):
                owner = owner_of(name)
                if owner is not None and owner[0] == svc.key:
                    gone.add(name)  # removals come first: nothing of this patch's in put
                    if svc.key not in old.hidden:
                        for ent in ents_above(name, domains):
                            _count(ents, ent, -1)
        builtins = old.builtins
        for spec in upserts:
            key = spec.key
            for name, i, _ in _names_of(spec, rendered, domains):
                if not is_valid_generated(name) or name in domains:
                    return None
                owner = owner_of(name)
                other = owner[0] if owner is not None else hostnames.get(name) or \
                    builtin_owner(name, services, domains, builtins, mesh_ports)
                if other is not None and other != key:
                    return None
                if owner is None:
                    put[name] = (key, i)
                    if key not in hidden:
                        for ent in ents_above(name, domains):
                            _count(ents, ent, 1)
        for spec in upserts:  # its other names against the names others were given
            key = spec.key
            own: list[str | None] = list(spec.hostnames)
            if isinstance(spec, MeshServiceSpec):
                own += [canonical_name(n, ns, p, domain) if b == "canonical"
                        else kuma_name(n, ns, p, domain)
                        for b, n, ns, p in mesh_builtin_ports(spec, templates)
                        for domain in domains]
            else:
                for domain in domains:
                    if "canonical" in builtins:
                        own.append(canonical_name(spec.name, spec.namespace, spec.port, domain))
                    if "kuma" in builtins:
                        own.append(kuma_name(spec.name, spec.namespace, spec.port, domain))
            for alias in own:
                owner = None if alias is None else owner_of(alias)
                if owner is not None and owner[0] != key:
                    return None
        generated = evolve(base, gone, put.items())
    visible = old.visible_counts
    if select:
        assert visible is not None
        ns_ports, ports = dict(visible[0]), dict(visible[1])
        for step, entries, hidden_then in ((-1, removed, old.hidden), (1, upserts, hidden)):
            for spec in entries:
                if spec.key in hidden_then:
                    continue
                if isinstance(spec, MeshServiceSpec):
                    for builtin, _, ns, port in mesh_builtin_ports(spec, templates):
                        if builtin == "canonical":
                            _count(ns_ports, (ns, port), step)
                            _count(ports, port, step)
                else:
                    _count(ns_ports, (spec.namespace, spec.port), step)
                    _count(ports, spec.port, step)
        visible = (ns_ports, ports)
    return NameTable(templates, select, generated, ents, hidden, visible, old.ported)


def primary_name(spec: ServiceSpec, templates: Sequence[HostnameTemplate],
                 domain: str) -> str:
    """The name PTR and SRV records point at: the first template that names the
    service (rendered under ``domain``), else the canonical form."""
    values = {"name": spec.name, "namespace": spec.namespace, "port": str(spec.port),
              "mesh": spec.mesh, "zone": spec.zone,
              "display_name": spec.label(DISPLAY_NAME_LABEL) or spec.name}
    for template in templates:
        if (template.kinds is not None or template.match) and \
                not template.applies(SERVICE_KIND, spec):
            continue
        if template.builtin == "canonical":
            break
        if template.builtin == "kuma":
            name = kuma_name(spec.name, spec.namespace, spec.port, domain)
        else:
            name = template.render(values, dict(spec.labels), domain)
        if name is not None:
            return name
    return canonical_name(spec.name, spec.namespace, spec.port, domain)
