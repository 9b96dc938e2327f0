"""The Prometheus registry every subsystem's collector joins, and its exposition.

Each subsystem exports its own families (as each CoreDNS plugin has its
metrics.go): ``dns/metrics.py`` (requests, responses, latency, caches,
upstreams), ``store/metrics.py`` (registry, VIP pool, state writes),
``api/metrics.py`` (sync requests), ``follower.py`` (sync age). Here: the
registry they are added to, build information and the process collector.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from . import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BuildInfo:
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("meshdns_build_info", "meshdns build information.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


def sync_age_families(prefix: str, last: float | None, what: str) -> Iterator[Metric]:
    """``<prefix>_last_sync_timestamp_seconds`` and ``<prefix>_sync_age_seconds`` for a
    copy of the registry kept current from elsewhere (+Inf age before the first sync)."""
    stamp = last or 0.0
    yield GaugeMetricFamily(f"{prefix}_last_sync_timestamp_seconds",
                            f"Wall time {what}.", value=stamp)
    yield GaugeMetricFamily(f"{prefix}_sync_age_seconds", f"Seconds since {what}.",
                            value=time.time() - stamp if stamp else float("inf"))


def new_metrics_registry() -> CollectorRegistry:
    """A Prometheus registry with build info and process metrics; subsystems register
    theirs (anything with ``collect()``; families are built at scrape time, so none is
    described up front)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BuildInfo())
    ProcessCollector(namespace="meshdns", registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
