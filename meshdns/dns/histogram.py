"""A latency histogram as plain numbers, for paths that run per query.

``observe`` is a bisect and three adds: no lock, no label lookup (what a
prometheus_client Histogram costs per call). The metrics collectors turn it
into a histogram family only when /metrics is scraped.
"""

from __future__ import annotations

import bisect

# dns_request_duration_seconds: a local answer takes microseconds, a forward milliseconds.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf), their sum and count."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound counts in that bucket (Prometheus "le").
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, as exposition wants them."""
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        return out
