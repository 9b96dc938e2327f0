"""Prometheus exposition: one custom collector that reads plain counters at scrape time.

Nothing here runs per packet. The core and the transports bump plain ints
(cache-entry hit counts, a Tally, a sampled latency histogram); this collector
turns them into metric families only when /metrics is scraped.
"""

from __future__ import annotations

import bisect
import platform
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .core.resolver import QTYPE_INVALID
from .core.zone import qtype_name

if TYPE_CHECKING:
    from .server import MeshServer

PREFIX = "meshdns_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
               5: "REFUSED", 16: "BADVERS"}


class Histogram:
    """A latency histogram as plain numbers: ``observe`` is a bisect and two adds."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def family(self, name: str, doc: str, labels: dict[str, str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
        labels = labels or {}
        fam = family or HistogramMetricFamily(name, doc, labels=list(labels))
        cumulative, acc = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += n
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        fam.add_metric(list(labels.values()), cumulative, self.sum)
        return fam


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, str(rcode))


def _qtype_label(qtype: int) -> str:
    return "invalid" if qtype == QTYPE_INVALID else qtype_name(qtype)


class MeshCollector:
    def __init__(self, server: MeshServer) -> None:
        self.server = server
        self._free_cache: tuple[Any, dict[str, int]] | None = None

    def describe(self) -> list[Metric]:
        return []  # families are built at scrape time; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        server = self.server
        counts = server.resolver.snapshot_counts()
        forwarder = server.forwarder
        if forwarder is not None and hasattr(forwarder, "add_counts"):
            forwarder.add_counts(counts)

        requests = CounterMetricFamily(PREFIX + "dns_requests", "DNS requests received.",
                                       labels=["proto", "qtype"])
        for (proto, qtype), n in sorted(counts.requests.items()):
            requests.add_metric([proto, _qtype_label(qtype)], n)
        yield requests

        responses = CounterMetricFamily(PREFIX + "dns_responses", "DNS responses sent.",
                                        labels=["rcode", "source"])
        for (rcode, source), n in sorted(counts.responses.items()):
            responses.add_metric([rcode_name(rcode), source], n)
        yield responses

        yield CounterMetricFamily(PREFIX + "dns_dropped", "Messages dropped without a reply "
                                  "(shorter than a header, or QR=1).", value=counts.dropped)
        yield CounterMetricFamily(PREFIX + "dns_truncated", "UDP replies sent with TC=1.",
                                  value=counts.truncated)
        yield server.latency.family(PREFIX + "dns_request_duration_seconds",
                                    "Time to answer a DNS request (sampled, see README).")

        tcp = server.tcp_limits
        yield GaugeMetricFamily(PREFIX + "dns_tcp_connections", "Open DNS TCP connections.",
                                value=tcp.open)
        yield CounterMetricFamily(PREFIX + "dns_tcp_refused_connections",
                                  "TCP connections closed at once: over tcp_max_connections.",
                                  value=tcp.refused)

        store = server.store
        reg = store.registry
        yield GaugeMetricFamily(PREFIX + "registry_services", "Services in the registry.",
                                value=len(reg))
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

        sync = CounterMetricFamily(PREFIX + "sync_requests", "Registry API requests.",
                                   labels=["op", "code"])
        api = server.api
        for (op, code), n in sorted(getattr(api, "sync_counts", {}).items()):
            sync.add_metric([op, str(code)], n)
        yield sync

        follower = server.follower
        if follower is not None:
            last = getattr(follower, "last_success", 0.0) or 0.0
            yield GaugeMetricFamily(PREFIX + "follow_last_sync_timestamp_seconds",
                                    "Wall time of the follower's last successful pull.",
                                    value=last)
            yield GaugeMetricFamily(PREFIX + "follow_sync_age_seconds",
                                    "Seconds since the follower's last successful pull.",
                                    value=time.time() - last if last else float("inf"))

        up_req = CounterMetricFamily(PREFIX + "upstream_requests", "Queries sent upstream.",
                                     labels=["upstream", "result"])
        up_dur = HistogramMetricFamily(PREFIX + "upstream_request_duration_seconds",
                                       "Upstream round-trip time.", labels=["upstream"])
        entries = GaugeMetricFamily(PREFIX + "cache_entries", "Entries in a cache.",
                                    labels=["cache"])
        entries.add_metric(["answers"], server.resolver.cached_answers())
        if forwarder is not None:
            from .dns.upstream import DURATION_BUCKETS

            for upstream, stats in sorted(forwarder.upstream_stats().items()):
                for result, n in sorted(stats.requests.items()):
                    up_req.add_metric([upstream, result], n)
                cumulative, acc = [], 0
                for bound, n in zip((*DURATION_BUCKETS, float("inf")), stats.buckets,
                                    strict=True):
                    acc += n
                    cumulative.append(("+Inf" if bound == float("inf") else repr(bound), acc))
                up_dur.add_metric([upstream], cumulative, stats.duration_sum)
            entries.add_metric(["upstream"], len(forwarder.cache))
        yield up_req
        yield up_dur
        yield entries

        info = GaugeMetricFamily(PREFIX + "build_info", "meshdns build information.",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

    def _free(self, reg: Any) -> dict[str, int]:
        # Counting free VIPs walks the registry: do it once per revision, not per scrape.
        if self._free_cache is None or self._free_cache[0] is not reg:
            self._free_cache = (reg, reg.free_vips(self.server.policy))
        return self._free_cache[1]


def make_registry(server: MeshServer) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(server))  # type: ignore[arg-type]
    ProcessCollector(namespace="meshdns", registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
