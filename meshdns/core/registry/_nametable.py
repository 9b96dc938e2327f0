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
from typing import TypeVar

from ._layered import evolve
from ._service import RegistryError, ServiceKey, ServiceSpec, describe
from ._templates import (
    DEFAULT_HOSTNAME_TEMPLATES,
    HostnameTemplate,
    canonical_name,
    is_subdomain,
    is_valid_generated,
    kuma_name,
)

Selector = tuple[tuple[str, str], ...]  # matchLabels, sorted; "mesh"/"zone" match the fields
Counts = tuple[Mapping[tuple[str, int], int], Mapping[int, int]]
_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class NameTable:
    """What a snapshot was named and filtered with, and the results."""

    templates: tuple[HostnameTemplate, ...] = DEFAULT_HOSTNAME_TEMPLATES
    select: Selector = ()
    # Rendered names -> (owner, index of the template that first produced it).
    generated: Mapping[str, tuple[ServiceKey, int]] = field(default_factory=dict)
    # Empty non-terminals above the generated names of visible services, each with
    # how many names lie below it (so a PATCH can update them in place).
    ents: Mapping[str, int] = field(default_factory=dict)
    hidden: frozenset[ServiceKey] = frozenset()  # services dns.select leaves out
    # (ns, port) and port counts of the visible services; None: all are visible.
    visible_counts: Counts | None = None

    @property
    def builtins(self) -> frozenset[str]:
        return frozenset(t.builtin for t in self.templates if t.builtin is not None)

    @property
    def is_default(self) -> bool:
        return self.templates == DEFAULT_HOSTNAME_TEMPLATES and not self.select


DEFAULT_NAMES = NameTable()


def selects(spec: ServiceSpec, select: Selector) -> bool:
    """Whether ``spec`` matches every (key, value) of the selector."""
    for key, value in select:
        if key == "mesh":
            have = spec.mesh
        elif key == "zone":
            have = spec.zone
        else:
            have = spec.label(key)
        if have != value:
            return False
    return True


def builtin_owner(host: str, keys: Container[ServiceKey],
                  domains: Sequence[str], builtins: frozenset[str]) -> ServiceKey | None:
    """The service whose canonical or Kuma name (if those forms are on) ``host`` is."""
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
        if key is not None and key in keys and (
            canonical_name(*key, domain) == host or kuma_name(*key, domain) == host
        ):
            return key
    return None


def _conflict(message: str, path: str, index: int) -> RegistryError:
    return RegistryError(409, message, f"{path}[{index}]" if index >= 0 else None)


Rendered = Sequence[tuple[int, HostnameTemplate]]


def _rendered(templates: tuple[HostnameTemplate, ...]) -> list[tuple[int, HostnameTemplate]]:
    return [(i, t) for i, t in enumerate(templates) if t.builtin is None]


def _names_of(spec: ServiceSpec, rendered: Rendered, domains: tuple[str, ...]
              ) -> Iterator[tuple[str, int, HostnameTemplate]]:
    """(name, template index, template) for every name the templates give ``spec``."""
    values = {"name": spec.name, "namespace": spec.namespace, "port": str(spec.port),
              "mesh": spec.mesh, "zone": spec.zone}
    labels = dict(spec.labels)
    for i, template in rendered:
        for domain in domains if template.uses_domain else domains[:1]:
            name = template.render(values, labels, domain)
            if name is not None:  # None: a field it uses is not set for this service
                yield name, i, template


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


def build_names(specs: Mapping[ServiceKey, ServiceSpec],
                stored_first: Iterable[tuple[ServiceKey, ServiceSpec]],
                where: Mapping[ServiceKey, int], hostnames: Mapping[str, ServiceKey],
                templates: tuple[HostnameTemplate, ...], select: Selector,
                domains: tuple[str, ...], path: str) -> NameTable:
    """The name table of the registry holding ``specs``; RegistryError 409 naming the
    service (and the other owner) when a rendered name is invalid or taken."""
    rendered = _rendered(templates)
    if not rendered and not select:
        return DEFAULT_NAMES if templates == DEFAULT_HOSTNAME_TEMPLATES else \
            NameTable(templates)
    hidden = frozenset(k for k, s in specs.items() if not selects(s, select)) \
        if select else frozenset()
    builtins = frozenset(t.builtin for t in templates if t.builtin is not None)
    generated: dict[str, tuple[ServiceKey, int]] = {}
    for key, spec in stored_first if rendered else ():
        for name, i, template in _names_of(spec, rendered, domains):
            if not is_valid_generated(name) or name in domains:
                raise _conflict(
                    f"hostname template {template.text!r} gives {describe(key)} the name "
                    f"{name[:80]!r}, which is not a valid DNS name (RFC 1123 subdomain, "
                    "not a served domain apex)", path, where.get(key, -1))
            owner = generated.get(name)
            other = owner[0] if owner is not None else hostnames.get(name) or \
                builtin_owner(name, specs, domains, builtins)
            if other is not None and other != key:
                raise _conflict(
                    f"hostname template {template.text!r} gives {describe(key)} the name "
                    f"{name!r}, which is already a name of {describe(other)}",
                    path, where.get(key, -1) if where.get(key, -1) >= 0
                    else where.get(other, -1))
            if owner is None:
                generated[name] = (key, i)
    ents: dict[str, int] = {}
    for name, (key, _) in generated.items():
        if key not in hidden:
            for ent in ents_above(name, domains):
                ents[ent] = ents.get(ent, 0) + 1
    visible: Counts | None = None
    if select:
        ns_ports: dict[tuple[str, int], int] = {}
        ports: dict[int, int] = {}
        for key in specs:
            if key not in hidden:
                ns_ports[key[1], key[2]] = ns_ports.get((key[1], key[2]), 0) + 1
                ports[key[2]] = ports.get(key[2], 0) + 1
        visible = (ns_ports, ports)
    return NameTable(templates, select, generated, ents, hidden, visible)


def patch_names(old: NameTable, removed: Sequence[ServiceSpec], upserts: Sequence[ServiceSpec],
                services: Container[ServiceKey], hostnames: Mapping[str, ServiceKey],
                domains: tuple[str, ...]) -> NameTable | None:
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
        put: dict[str, tuple[ServiceKey, int]] = {}

        def owner_of(name: str) -> tuple[ServiceKey, int] | None:
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
                    builtin_owner(name, services, domains, builtins)
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
            for domain in domains:
                if "canonical" in builtins:
                    own.append(canonical_name(*key, domain))
                if "kuma" in builtins:
                    own.append(kuma_name(*key, domain))
            for alias in own:
                owner = None if alias is None else owner_of(alias)
                if owner is not None and owner[0] != key:
                    return None
        generated = evolve(base, gone, put.items())
    visible = old.visible_counts
    if select:
        assert visible is not None
        ns_ports, ports = dict(visible[0]), dict(visible[1])
        for svc in removed:
            if svc.key not in old.hidden:
                _count(ns_ports, (svc.namespace, svc.port), -1)
                _count(ports, svc.port, -1)
        for spec in upserts:
            if spec.key not in hidden:
                _count(ns_ports, (spec.namespace, spec.port), 1)
                _count(ports, spec.port, 1)
        visible = (ns_ports, ports)
    return NameTable(templates, select, generated, ents, hidden, visible)


def primary_name(spec: ServiceSpec, templates: Sequence[HostnameTemplate],
                 domain: str) -> str:
    """The name PTR and SRV records point at: the first template that names the
    service (rendered under ``domain``), else the canonical form."""
    values = {"name": spec.name, "namespace": spec.namespace, "port": str(spec.port),
              "mesh": spec.mesh, "zone": spec.zone}
    for template in templates:
        if template.builtin == "canonical":
            break
        if template.builtin == "kuma":
            name = kuma_name(spec.name, spec.namespace, spec.port, domain)
        else:
            name = template.render(values, dict(spec.labels), domain)
        if name is not None:
            return name
    return canonical_name(spec.name, spec.namespace, spec.port, domain)
