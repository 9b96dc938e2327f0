"""Views (``dns.views``): one registry snapshot answered under another ``dns.select``.

A view's snapshot is the registry's, with a name table built for the view's selector:
the same services, VIPs and names, but what the selector leaves out is hidden (absent,
as ``dns.select`` makes it). Building it costs the registry's size for a full rebuild
and the change's for an incremental PATCH (the view's previous table evolves).
"""

from __future__ import annotations

from dataclasses import replace

from ..registry import NameTable, Registry, Selector, build_names, patch_names
from ._zone import Zone


def view_names(reg: Registry, select: Selector, domains: tuple[str, ...],
               previous: Registry | None) -> NameTable:
    """``reg``'s name table under ``select``; evolved from ``previous`` (this view's
    snapshot of the registry ``reg`` was patched from) when that is known."""
    templates = reg.names.templates
    if previous is not None and previous.names.select == select \
            and previous.names.templates == templates:
        touched = reg.touched_since(previous)
        if touched is not None:
            written, deleted = touched
            removed = [previous.services[k] for k in (*written, *deleted)
                       if k in previous.services]
            upserts = [reg.services[k] for k in written]
            names = patch_names(previous.names, removed, upserts, reg.services,
                                reg.hostnames, domains)
            if names is not None:
                return names
    services = reg.services
    return build_names(services, list(services.items()), {}, reg.hostnames, templates,
                       select, domains, "dns.views")


def view_zone(zone: Zone, select: Selector, previous: Zone | None) -> Zone:
    """``zone`` as the view with ``select`` answers it (``previous``: the view's zone
    before this change, to evolve from)."""
    reg = zone.registry
    names = view_names(reg, select, zone.settings.domains,
                       previous.registry if previous is not None else None)
    return Zone(replace(reg, names=names), zone.settings, loaded=zone.loaded)
