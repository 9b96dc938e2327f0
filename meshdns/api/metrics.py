"""The registry API's metrics: sync requests by operation and status code."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from .state import ApiState


class ApiCollector:
    def __init__(self, state: ApiState) -> None:
        self.state = state


    def collect(self) -> Iterator[Metric]:
        sync = CounterMetricFamily("meshdns_sync_requests", "Registry API requests.",
                                   labels=["op", "code"])
        for (op, code), n in sorted(self.state.sync_requests.items()):
            sync.add_metric([op, code], n)
        yield sync
