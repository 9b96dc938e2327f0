"""What the core is built from, derived from the config: the registry policy (domains,
VIP ranges, hold, templates) and the zone settings (TTLs, search list, forwarding)."""

from __future__ import annotations

from .config import Config
from .core.answer import ZoneSettings
from .core.registry import RegistryPolicy, VipRange, parse_templates
from .resolvconf import read_resolv_conf


def registry_policy(config: Config) -> RegistryPolicy:
    reg = config.registry
    return RegistryPolicy(
        domains=config.dns.domains,
        range4=VipRange.from_cidr(reg.cidr),
        range6=VipRange.from_cidr(reg.cidr6) if reg.cidr6 else None,
        hold_seconds=reg.vip_hold_seconds,
        templates=parse_templates(config.dns.hostname_templates),
        select=config.dns.select,
    )


def zone_settings(config: Config, forwarding: bool) -> ZoneSettings:
    dns = config.dns
    search = dns.search or read_resolv_conf(dns.resolv_conf).search
    policy = registry_policy(config)
    return ZoneSettings(
        domains=dns.domains, ttl=dns.ttl, negative_ttl=dns.negative_ttl,
        search=tuple(s for s in search if s not in dns.domains),
        range4=policy.range4, range6=policy.range6, forwarding=forwarding,
    )
