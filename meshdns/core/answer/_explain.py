"""What ``/v1/resolve`` adds to a decision: which template named a service, or
which ``dns.select`` selector hid it (never on the DNS path)."""

from __future__ import annotations

from typing import Any

from ..registry import EntryKey, EntrySpec, MeshService, NameTable, selects
from ._wire import wire_to_key
from ._zone import (
    CANONICAL,
    ENDPOINT,
    KUMA,
    NXDOMAIN,
    SRV_PORT,
    TEMPLATE,
    WILDCARD,
    Decision,
    Zone,
)


def _template(names: NameTable, index: int) -> dict[str, Any]:
    return {"index": index, "text": names.templates[index].text}


def _builtin_index(names: NameTable, builtin: str) -> int | None:
    for i, template in enumerate(names.templates):
        if template.builtin == builtin:
            return i
    return None


def _mismatch(spec: EntrySpec, names: NameTable) -> list[str]:
    return [key for key, value in names.select if not selects(spec, ((key, value),))]


def explain_names(zone: Zone, labels: tuple[bytes, ...], decision: Decision) -> dict[str, Any]:
    """``{"template": {index, text} | None, "hidden": {...} | None}`` for one question."""
    names = zone.registry.names
    key = wire_to_key(labels)
    out: dict[str, Any] = {"template": None, "hidden": None}
    rule = decision.rule
    index: int | None = None
    if rule == CANONICAL:
        index = _builtin_index(names, "canonical")
    elif rule == KUMA:
        index = _builtin_index(names, "kuma")
    elif rule == TEMPLATE and key in names.generated:
        index = names.generated[key][1]
    if index is not None:
        out["template"] = _template(names, index)
    if rule == ENDPOINT and isinstance(decision.service, MeshService):  # section 4
        first = key.split(".", 1)[0]
        for endpoint in decision.service.endpoints or ():
            if endpoint.name == first:
                out["endpoint"] = endpoint.to_json()
    if rule == WILDCARD:  # docs/meshservice.md section 5
        match = zone.wildcard_match(key)
        if match is not None:
            out["wildcard"] = {"name": match[0], "closest_encloser": match[1]}
    svc = decision.service
    if isinstance(svc, MeshService) and (rule in (CANONICAL, KUMA, SRV_PORT) or (
            rule == TEMPLATE and key in names.ported)):
        # The port a per-port name of a mesh service stands for (docs/meshservice.md §8).
        ports = zone.mesh_ports(key, svc, rule)
        out["port"] = ports[0].to_json() if ports else None
    if not names.hidden or decision.service is not None:
        return out
    found = None
    domains = sorted(zone.settings.domains, key=len, reverse=True)
    domain = next((d for d in domains if key.endswith("." + d)), None)
    if domain is not None and rule == NXDOMAIN:
        where = zone.locate(key, include_hidden=True)
        if where is not None and where[1] is not None:
            found = where[1], where[2]
    elif domain is None:
        owner: EntryKey | None = zone.registry.hostnames.get(key)
        if owner is None and key in names.generated:
            owner = names.generated[key][0]
        if owner is not None:
            found = zone.registry.entry_map[owner], "hostname"
    if found is not None and found[0].key in names.hidden:
        svc, how = found
        hidden: dict[str, Any] = {
            "by": "dns.select", "select": {"matchLabels": dict(names.select)},
            "mismatch": _mismatch(svc, names), "service": svc.to_json(), "rule": how,
        }
        if how == TEMPLATE:
            hidden["template"] = _template(names, names.generated[key][1])
        out["hidden"] = hidden
    return out
