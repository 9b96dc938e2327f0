"""The registry model: validated writes in, immutable snapshots out.

This file is the package's face: everything a caller may use is exported here,
and every module behind it is private (``_name.py``, checked by `make lint`).

- a write: ``parse_services``/``parse_deletes`` (input validation, _parse.py), then
  ``apply_put`` (a full rebuild, _rebuild.py) or ``apply_patch`` (an incremental
  PATCH, _patch.py), VIPs allocated by _allocate.py; a rejected write raises
  :class:`RegistryError`;
- the result: a :class:`Registry` snapshot (_snapshot.py) of :class:`Service` values
  (_service.py), with its VIP indexes (_vip.py), tables evolved as layered maps
  (_layered.py), and the names its hostname templates render (_nametable.py) under
  the name rules (_templates.py).

It answers no DNS question: ``meshdns.core.answer`` reads its snapshots.
"""

from ._allocate import in_release_order
from ._layered import LayeredMap, evolve
from ._nametable import (
    NameTable,
    Selector,
    build_names,
    ents_above,
    patch_names,
    primary_name,
    selects,
)
from ._parse import (
    MAX_LABELS_PER_SERVICE,
    QUOTE_LIMIT,
    clip,
    label_key_error,
    parse_deletes,
    parse_labels,
    parse_service,
    parse_services,
    quote,
)
from ._patch import apply_patch, check_disjoint, patch_incremental
from ._rebuild import apply_put, restore
from ._service import (
    MAX_HOSTNAMES_PER_SERVICE,
    Labels,
    RegistryError,
    Service,
    ServiceKey,
    ServiceSpec,
    describe,
    service_json,
)
from ._snapshot import Held, Registry, RegistryPolicy, free_vips_after
from ._templates import (
    CANONICAL_TEMPLATE,
    DEFAULT_HOSTNAME_TEMPLATES,
    DEFAULT_TEMPLATES,
    KUMA_TEMPLATE,
    HostnameTemplate,
    TemplateError,
    canonical_name,
    is_rfc1123_label,
    is_subdomain,
    kuma_name,
    normalize_domain,
    normalize_hostname,
    parse_template,
    parse_templates,
)
from ._vip import VipRange, count_in, format_ip, parse_ip, parse_ip4, parse_ip6

__all__ = [
    "CANONICAL_TEMPLATE",
    "DEFAULT_HOSTNAME_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "KUMA_TEMPLATE",
    "MAX_HOSTNAMES_PER_SERVICE",
    "MAX_LABELS_PER_SERVICE",
    "QUOTE_LIMIT",
    "Held",
    "HostnameTemplate",
    "Labels",
    "LayeredMap",
    "NameTable",
    "Registry",
    "RegistryError",
    "RegistryPolicy",
    "Selector",
    "Service",
    "ServiceKey",
    "ServiceSpec",
    "TemplateError",
    "VipRange",
    "apply_patch",
    "apply_put",
    "build_names",
    "canonical_name",
    "check_disjoint",
    "clip",
    "count_in",
    "describe",
    "ents_above",
    "evolve",
    "format_ip",
    "free_vips_after",
    "in_release_order",
    "is_rfc1123_label",
    "is_subdomain",
    "kuma_name",
    "label_key_error",
    "normalize_domain",
    "normalize_hostname",
    "parse_deletes",
    "parse_ip",
    "parse_ip4",
    "parse_ip6",
    "parse_labels",
    "parse_service",
    "parse_services",
    "parse_template",
    "parse_templates",
    "patch_incremental",
    "patch_names",
    "primary_name",
    "quote",
    "restore",
    "selects",
    "service_json",
]
