"""SIGHUP: the running config against the new one, section by section.

Each section's function applies what of it can change while serving and says what
it applied; every other difference is named as needing a restart. A file that
cannot be read (a bad seed file) changes nothing at all: it is read first.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Protocol

from . import logs
from .config import Config, DnsConfig, LogConfig, RegistryConfig
from .core.registry import RegistryPolicy, ServiceSpec, apply_put
from .dns.forwardplan import Forwarding, describe, effective_forward
from .dns.listen import Listeners
from .settings import zone_settings
from .store import RegistryStore, load_seed

if TYPE_CHECKING:
    from .workers import WorkerPool

log = logging.getLogger("meshdns")


class Serving(Protocol):
    """What a reload changes of a running server (server.MeshServer)."""

    config: Config
    store: RegistryStore
    policy: RegistryPolicy
    forwarding: Forwarding
    listeners: Listeners
    workers: WorkerPool | None


async def reload(server: Serving, new: Config) -> list[str]:
    """Apply ``new``'s log settings, upstreams, search list, views and (with no state
    file) seed file while serving; log each change, and each other change as needing
    a restart. Returns what was applied."""
    old = server.config
    applied: list[str] = []
    specs = _seed_specs(old.registry, new.registry)
    log_cfg = _log(old.log, new.log, applied)
    dns = await _dns(server, new.dns, applied)
    registry = await _registry(server, specs, new.registry, applied)
    server.config = replace(old, dns=dns, registry=registry, log=log_cfg)
    kept = restart_only_changes(server.config, new)
    for change in applied:
        log.info("SIGHUP: %s", change)
    if kept:
        log.warning("SIGHUP: not applied, needs a restart: %s", ", ".join(kept))
    if not applied and not kept:
        log.info("SIGHUP: config unchanged")
    if server.workers is not None and applied:
        await server.workers.reload(server.config)
    return applied


def _log(old: LogConfig, new: LogConfig, applied: list[str]) -> LogConfig:
    """log.level and log.format."""
    if (new.level, new.format) == (old.level, old.format):
        return old
    logs.setup_logging(new.level, new.format)
    applied.append(f"log {old.level}/{old.format} -> {new.level}/{new.format}")
    return replace(old, level=new.level, format=new.format)


async def _dns(server: Serving, new: DnsConfig, applied: list[str]) -> DnsConfig:
    """Where queries are forwarded (dns.upstreams, dns.forward, and resolv.conf), the
    search list (dns.search, resolv.conf) and dns.views."""
    dns = replace(server.config.dns, upstreams=new.upstreams, forward=new.forward,
                  search=new.search, resolv_conf=new.resolv_conf)
    candidate = replace(server.config, dns=dns)
    forwarding = server.forwarding
    routes, refusals = effective_forward(candidate, server.listeners.addresses)
    if routes != forwarding.routes:
        for reason in refusals:
            log.error("%s", reason)
        applied.append("upstreams " + (describe(forwarding.routes) or "none")
                       + " -> " + (describe(routes) or "none"))
        await forwarding.set_routes(routes)
    settings, running = zone_settings(candidate, forwarding=bool(routes)), server.store.settings
    if settings != running:
        if settings.search != running.search:
            applied.append("search list " + (" ".join(running.search) or "(none)")
                           + " -> " + (" ".join(settings.search) or "(none)"))
        server.store.reconfigure(settings)
    # The new views apply at once (their caches start empty) when every listener
    # checks its clients already; else dns.views needs a restart.
    if new.views != dns.views and server.listeners.set_views(new):
        applied.append(f"views: {len(dns.views)} -> {len(new.views)}")
        dns = replace(dns, views=new.views)
    return dns


def _seed_specs(old: RegistryConfig, new: RegistryConfig) -> list[ServiceSpec] | None:
    """The new seed file's services, when it seeds a registry nothing else keeps (no
    state file, not a follower)."""
    if (new.seed_file != old.seed_file and old.state_file is None and old.follow is None
            and new.seed_file is not None):
        return load_seed(new.seed_file)
    return None


async def _registry(server: Serving, specs: list[ServiceSpec] | None, new: RegistryConfig,
                    applied: list[str]) -> RegistryConfig:
    """registry.seed_file (read by :func:`_seed_specs`)."""
    old = server.config.registry
    if specs is None:
        return old
    store, policy = server.store, server.policy
    reg = await store.write(lambda base: apply_put(base, specs, policy, store.clock()))
    applied.append(f"seed file {old.seed_file} -> {new.seed_file} "
                   f"(revision {reg.revision}, {len(reg)} services)")
    return replace(old, seed_file=new.seed_file)


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """Keys whose new value differs from the running one after a reload."""
    out: list[str] = []
    for section in fields(running):
        old_sec, new_sec = getattr(running, section.name), getattr(new, section.name)
        for f in fields(old_sec):
            if getattr(old_sec, f.name) != getattr(new_sec, f.name):
                out.append(f"{section.name}.{f.name}")
    return out
