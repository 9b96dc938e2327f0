"""The registry store's metrics: size, revision, freshness, VIP pool, failed writes."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..core.registry import (
    ENTRY_KINDS,
    SERVICE_KIND,
    Registry,
    RegistryPolicy,
    free_vips_after,
)
from .store import RegistryStore

PREFIX = "meshdns_"


class StoreCollector:
    def __init__(self, store: RegistryStore, policy: RegistryPolicy) -> None:
        self.store = store
        self.policy = policy
        self._free_cache: tuple[Registry, dict[str, int]] | None = None
        # Kept current change by change (O(change) each) once a scrape has counted it, so
        # a scrape never walks the registry again (see core.registry.free_vips_after).
        store.listeners.append(self._advance)

    def _advance(self, reg: Registry) -> None:
        cached = self._free_cache
        if cached is not None and cached[0] is not reg:
            free = free_vips_after(cached[0], cached[1], reg, self.policy)
            self._free_cache = None if free is None else (reg, free)

    def collect(self) -> Iterator[Metric]:
        store = self.store
        reg = store.registry
        yield GaugeMetricFamily(PREFIX + "registry_services", "Services in the registry.",
                                value=len(reg))
        entries = GaugeMetricFamily(PREFIX + "registry_entries",
                                    "Registry entries by kind: Service (name, namespace, port) "
                                    "and the mesh service kinds.", labels=["kind"])
        kinds = dict.fromkeys(ENTRY_KINDS, 0)
        for key in reg.mesh_keys:
            kinds[key[0]] += 1
        kinds[SERVICE_KIND] = len(reg) - len(reg.mesh_keys)
        for kind, n in kinds.items():
            entries.add_metric([kind], n)
        yield entries
        yield GaugeMetricFamily(PREFIX + "registry_revision", "Registry revision served.",
                                value=reg.revision)
        yield GaugeMetricFamily(PREFIX + "registry_last_update_timestamp_seconds",
                                "Wall time of the last registry change (0: none yet).",
                                value=store.last_update)
        yield GaugeMetricFamily(PREFIX + "registry_loaded", "1 once a registry is loaded.",
                                value=1 if store.loaded else 0)
        free = GaugeMetricFamily(PREFIX + "vip_pool_free", "VIPs still allocatable.",
                                 labels=["family"])
        for family, n in self._free(reg).items():
            free.add_metric([family], n)
        yield free
        yield CounterMetricFamily(PREFIX + "vip_pool_exhausted",
                                  "Writes rejected because a VIP range was exhausted.",
                                  value=store.exhausted)
        yield CounterMetricFamily(PREFIX + "state_write_failures",
                                  "Registry writes refused because the state file could not "
                                  "be written (disk full, I/O error): rolled back, 507.",
                                  value=store.state_write_failures)

    def _free(self, reg: Registry) -> dict[str, int]:
        # Counted in full only when _advance could not carry the count over a change.
        if self._free_cache is None or self._free_cache[0] is not reg:
            self._free_cache = (reg, reg.free_vips(self.policy))
        return self._free_cache[1]
