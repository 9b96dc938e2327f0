"""The DNS side's metrics: what the transports, the core's tally and the forwarder count.

Nothing here runs per packet. The core and the transports bump plain ints
(cache-entry hit counts, a Tally, a sampled latency histogram); these
collectors turn them into metric families only when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..core.answer import QTYPE_INVALID, MessageHandler, qtype_name, rcode_name
from .dnstap import DnstapSink
from .forwarder import Forwarder
from .histogram import Histogram
from .policy import PolicyCounts
from .scrub import SCRUB_REASONS
from .transport import BatchedUdp, TcpLimits

PREFIX = "meshdns_"
# BatchUdpServer counter -> meshdns_dns_udp_errors_total reason.
UDP_ERRORS = {"truncated": "oversized", "send_dropped": "send_buffer_full",
              "send_errors": "send_error", "recv_errors": "receive_error",
              "handler_errors": "internal_error"}


def _qtype_label(qtype: int) -> str:
    return "invalid" if qtype == QTYPE_INVALID else qtype_name(qtype)


def histogram_family(hist: Histogram, family: HistogramMetricFamily,
                     labels: tuple[str, ...] = ()) -> HistogramMetricFamily:
    family.add_metric(list(labels), hist.cumulative(), hist.sum)
    return family


class DnsCollector:
    """Requests, responses, TCP connections, latency, the caches and the upstreams."""

    def __init__(self, handler: MessageHandler, tcp: TcpLimits, latency: Histogram | None,
                 udp: Callable[[], Iterable[object]] = tuple,
                 policy: PolicyCounts | None = None,
                 forwarder: Callable[[], Forwarder | None] = lambda: None,
                 dnstap: DnstapSink | None = None) -> None:
        self.handler = handler
        self.tcp = tcp
        self.latency = latency  # None: not sampled (an empty histogram is exported)
        self.udp = udp  # the UDP listeners now open (batched ones count their drops)
        self.policy = policy if policy is not None else PolicyCounts()
        self.forwarder = forwarder  # the forwarder of the moment (None: not forwarding)
        self.dnstap = dnstap  # log.dnstap

    def collect(self) -> Iterator[Metric]:
        counts = self.handler.snapshot_counts()
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
        yield self._udp_errors()
        pc = self.policy
        yield CounterMetricFamily(PREFIX + "dns_acl_refused", "Queries refused by access "
                                  "control (dns.allow / dns.deny), answered REFUSED with EDE 18.",
                                  value=pc.refused)
        yield CounterMetricFamily(PREFIX + "dns_recursion_refused", "Forwarded names refused "
                                  "to clients outside dns.allow_recursion.",
                                  value=counts.recursion_refused)
        rrl = CounterMetricFamily(PREFIX + "dns_rate_limited", "UDP replies over dns.rate_limit"
                                  ": dropped, or sent TC=1 (slipped).", labels=["action"])
        rrl.add_metric(["dropped"], pc.rate_dropped)
        rrl.add_metric(["slipped"], pc.rate_slipped)
        yield rrl
        duration = HistogramMetricFamily(PREFIX + "dns_request_duration_seconds",
                                         "Time to answer a DNS request (sampled, see README).",
                                         labels=[])
        if self.latency is not None:
            histogram_family(self.latency, duration)
        yield duration

        yield GaugeMetricFamily(PREFIX + "dns_tcp_connections", "Open DNS TCP connections.",
                                value=self.tcp.open)
        yield CounterMetricFamily(PREFIX + "dns_tcp_evicted_connections",
                                  "Idle TCP connections closed to admit a new one at "
                                  "dns.tcp_max_connections.", value=self.tcp.evicted)
        entries = GaugeMetricFamily(PREFIX + "cache_entries", "Entries in a cache.",
                                    labels=["cache"])
        entries.add_metric(["answers"], self.handler.cached_answers())
        forwarder = self.forwarder()
        if forwarder is not None:
            entries.add_metric(["upstream"], len(forwarder.cache))
        yield entries
        yield from self._upstream(forwarder)
        if self.dnstap is not None:
            yield from self._dnstap(self.dnstap)

    @staticmethod
    def _dnstap(sink: DnstapSink) -> Iterator[Metric]:
        """log.dnstap: what reached the collector's socket and what was dropped (the
        families are there only with dnstap on)."""
        yield CounterMetricFamily(PREFIX + "dnstap_written", "dnstap messages written to the "
                                  "collector's socket.", value=sink.written)
        dropped = CounterMetricFamily(PREFIX + "dnstap_dropped", "dnstap messages dropped: "
                                      "queue_full (log.dnstap.queue_size entries waiting: the "
                                      "collector is slow or absent), write_failed (the "
                                      "collector went away during the write).",
                                      labels=["reason"])
        for reason, n in sorted(sink.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily(PREFIX + "dnstap_queued", "dnstap messages waiting for the "
                                "writer.", value=sink.queued)
        yield GaugeMetricFamily(PREFIX + "dnstap_connected", "1 while the dnstap collector "
                                "is connected (handshake done).", value=int(sink.connected))
        yield CounterMetricFamily(PREFIX + "dnstap_connections", "Connections to the dnstap "
                                  "collector (handshakes completed).", value=sink.connects)

    def _udp_errors(self) -> Metric:
        """What the batched UDP path (recvmmsg/sendmmsg) dropped or failed, summed over
        its sockets: a full socket buffer drops replies silently otherwise."""
        totals = dict.fromkeys(UDP_ERRORS.values(), 0)
        for listener in self.udp():
            if isinstance(listener, BatchedUdp):
                for attr, reason in UDP_ERRORS.items():
                    totals[reason] += getattr(listener.batch, attr)
        family = CounterMetricFamily(
            PREFIX + "dns_udp_errors", "UDP datagrams the batched path dropped or could not "
            "answer, by reason: oversized (query larger than a slot, dropped), "
            "send_buffer_full (reply dropped), send_error (reply refused by the kernel), "
            "receive_error, internal_error (answered SERVFAIL).", labels=["reason"])
        for reason, n in totals.items():
            family.add_metric([reason], n)
        return family

    @staticmethod
    def _upstream(fwd: Forwarder | None) -> Iterator[Metric]:
        """Upstream attempts and round trips, rejected replies, the in-flight table
        (the families are there, empty, when nothing is forwarded)."""
        stats = sorted(fwd.upstream_stats().items()) if fwd is not None else []
        requests = CounterMetricFamily(PREFIX + "upstream_requests", "Queries sent upstream.",
                                       labels=["upstream", "result"])
        duration = HistogramMetricFamily(PREFIX + "upstream_request_duration_seconds",
                                         "Upstream round-trip time.", labels=["upstream"])
        for upstream, st in stats:
            for result, n in sorted(st.requests.items()):
                requests.add_metric([upstream, result], n)
            histogram_family(st.duration, duration, (upstream,))
        yield requests
        yield duration
        if fwd is None:
            return
        rejected = CounterMetricFamily(PREFIX + "upstream_rejected_replies",
                                       "Upstream replies dropped: wrong ID or question, "
                                       "malformed (does not parse: the attempt fails).",
                                       labels=["reason"])
        for reason, n in sorted(fwd.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(PREFIX + "upstream_overloaded",
                                  "Queries answered SERVFAIL at once: dns.max_inflight reached.",
                                  value=fwd.overloaded)
        yield CounterMetricFamily(PREFIX + "upstream_coalesced",
                                  "Queries that waited on the same question already in flight.",
                                  value=fwd.coalesced)
        yield CounterMetricFamily(PREFIX + "stale_answers",
                                  "Forwarded questions answered from an expired cache entry "
                                  "(TTL dns.serve_stale_ttl) because every upstream failed "
                                  "(RFC 8767).",
                                  value=fwd.stale_answers)
        yield GaugeMetricFamily(PREFIX + "upstream_inflight", "Distinct questions in flight.",
                                value=fwd.inflight)
        yield CounterMetricFamily(PREFIX + "forward_chased",
                                  "Upstream CNAME chains completed with a local answer.",
                                  value=fwd.chased)
        refused = CounterMetricFamily(PREFIX + "forward_chase_refused",
                                      "Upstream CNAME chains into a served name answered "
                                      "SERVFAIL instead.", labels=["reason"])
        for reason, n in sorted(fwd.chase_refused.items()):
            refused.add_metric([reason], n)
        yield refused
        scrubbed = CounterMetricFamily(PREFIX + "forward_scrubbed_records",
                                       "Records dropped from upstream replies before they "
                                       "were cached or sent: not for the question's chain "
                                       "(other_name), of another type (wrong_type), for a "
                                       "name meshdns answers itself (own_name), authority "
                                       "or additional not belonging to the answer.",
                                       labels=["reason"])
        for reason in SCRUB_REASONS:
            scrubbed.add_metric([reason], fwd.scrubbed.get(reason, 0))
        yield scrubbed
        yield CounterMetricFamily(PREFIX + "forward_prefetch",
                                  "Cached forwarded answers refreshed in the background "
                                  "because they were asked in the last 10% of their TTL.",
                                  value=fwd.prefetches)
