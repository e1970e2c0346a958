"""Prometheus metrics of one gateway, fed by a subscriber of the service's event feed.

Counters follow the events; what is a state (mappings and pinholes held, epoch) is read from
the services when scraped, so it is never out of step with their tables. The registry is this
object's own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from igd.events import (
    CommitFailed,
    DatagramDropped,
    ExternalAddressChanged,
    MappingGranted,
    MappingRemoved,
    MappingRenewed,
    PinholeOpened,
    PinholeRefused,
    PinholeRemoved,
    PinholeRenewed,
    RequestRefused,
)
from igd.model import MapRequest, Mechanism, Protocol
from igd.pinhole import Pinhole
from igd.server.service import Service

# The metrics subscriber's queue (events); beyond it the oldest are dropped and counted.
METRICS_QUEUE_BOUND = 4096
# Request latency buckets (seconds): a grant is ~0.2 ms to a few ms, a batched commit more.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _State(Collector):
    """Mappings held by mechanism and protocol, and the epoch, read at scrape time."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.pinholes: Callable[[], Iterable[Pinhole]] | None = None
        """The open IPv6 pinholes, when `[ipv6]` is enabled."""
        self.kernel_restores: Callable[[], dict[str, int]] | None = None
        """Restores per kernel table after another program removed it (docs/nftables.md)."""

    def collect(self) -> Iterator[Metric]:
        held: Tally[tuple[str, str]] = Tally(
            (str(m.owner.mechanism), str(m.key.protocol)) for m in self.service.mappings()
        )
        mappings = GaugeMetricFamily(
            "igd_mappings", "Mappings held now.", labels=["mechanism", "protocol"]
        )
        for mechanism in Mechanism:
            for protocol in Protocol:
                pair = (str(mechanism), str(protocol))
                mappings.add_metric(list(pair), held.get(pair, 0))
        yield mappings
        if self.pinholes is not None:
            open_now: Tally[tuple[str, str]] = Tally(
                (str(h.owner.mechanism), str(h.key.protocol)) for h in self.pinholes()
            )
            pinholes = GaugeMetricFamily(
                "igd_pinholes", "IPv6 pinholes open now.", labels=["mechanism", "protocol"]
            )
            for mechanism in (Mechanism.PCP, Mechanism.UPNP):
                for protocol in Protocol:
                    pair = (str(mechanism), str(protocol))
                    pinholes.add_metric(list(pair), open_now.get(pair, 0))
            yield pinholes
        if self.kernel_restores is not None:
            restores = CounterMetricFamily(
                "igd_kernel_restores",
                "Kernel tables rebuilt after another program removed (part of) them.",
                labels=["table"],
            )
            for table, count in sorted(self.kernel_restores().items()):
                restores.add_metric([table], count)
            yield restores
        upstream = self.service.upstream
        if upstream is not None:
            # Double NAT (docs/upstream.md): read as status() reads them, without its list.
            mirrored, failing = upstream.counts()
            yield GaugeMetricFamily(
                "igd_upstream_mirrored", "Ports held on the upstream gateway.", value=mirrored
            )
            yield GaugeMetricFamily(
                "igd_upstream_failing",
                "Ports not (yet) held upstream: still asking, or refused.",
                value=failing,
            )
            yield GaugeMetricFamily(
                "igd_upstream_up",
                "1 while mirroring and the upstream gateway answers; 0 when it does not, or"
                " mirroring is off (a loop, a public external address).",
                value=int(upstream.active and upstream.reachable),
            )
        yield GaugeMetricFamily(
            "igd_epoch_seconds",
            "Seconds since the mapping state began (NAT-PMP SSSoE, PCP epoch).",
            value=self.service.epoch(),
        )


class Metrics:
    """The gateway's metrics in a registry of their own; `follow` keeps the counters."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        registry = self.registry
        self.state = _State(service)
        self.registry.register(self.state)
        self.grants = Counter(
            "igd_grants", "Mappings granted.", ["mechanism", "rule"], registry=registry
        )
        self.renewals = Counter(
            "igd_renewals", "Mappings renewed by their owner.", ["mechanism", "rule"],
            registry=registry,
        )  # fmt: skip
        self.refusals = Counter(
            "igd_refusals", "Map requests refused.", ["mechanism", "reason", "rule"],
            registry=registry,
        )  # fmt: skip
        self.removals = Counter("igd_removals", "Mappings removed.", ["cause"], registry=registry)
        self.dropped = Counter(
            "igd_datagrams_dropped", "NAT-PMP/PCP datagrams dropped unanswered.", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.commit_failures = Counter(
            "igd_commit_failures", "Changes the kernel or the lease store refused.",
            registry=registry,
        )  # fmt: skip
        self.address_changes = Counter(
            "igd_external_address_changes", "External address changes seen.", registry=registry
        )
        self.pinholes_opened = Counter(
            "igd_pinholes_opened", "IPv6 pinholes opened.", ["mechanism", "rule"],
            registry=registry,
        )  # fmt: skip
        self.pinhole_renewals = Counter(
            "igd_pinhole_renewals", "IPv6 pinholes renewed by their owner.", ["mechanism", "rule"],
            registry=registry,
        )  # fmt: skip
        self.pinhole_refusals = Counter(
            "igd_pinhole_refusals", "IPv6 pinhole requests refused.",
            ["mechanism", "reason", "rule"], registry=registry,
        )  # fmt: skip
        self.pinhole_removals = Counter(
            "igd_pinhole_removals", "IPv6 pinholes removed.", ["cause"], registry=registry
        )
        self.lost = Counter(
            "igd_metrics_events_lost", "Events the metrics subscriber fell behind on.",
            registry=registry,
        )  # fmt: skip
        self.requests = Histogram(
            "igd_request_seconds", "Map requests from arrival at the service to the answer.",
            ["mechanism"], buckets=REQUEST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.commits = Histogram(
            "igd_commit_seconds", "Kernel (nftables) and lease-store (SQLite) commit writes.",
            ["stage"], buckets=COMMIT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.started = Gauge(
            "igd_start_time_seconds", "When the daemon started (Unix time).", registry=registry
        )
        self.started.set(time.time())
        for mechanism in Mechanism:
            self.requests.labels(str(mechanism))
        for stage in ("kernel", "store"):
            self.commits.labels(stage)
        self._request_by = {m: self.requests.labels(str(m)) for m in Mechanism}
        self._commit_by = {s: self.commits.labels(s) for s in ("kernel", "store")}

    def attach(self) -> None:
        """Have the service report request and commit durations here (a few ns each)."""
        self.service.observe = self._request_done
        self.service.observe_commits(self._commit_done)

    async def follow(self) -> None:
        """Count the feed's events until cancelled."""
        subscriber = self.service.subscribe("metrics", METRICS_QUEUE_BOUND)
        try:
            while True:
                events, lost = await subscriber.next()
                if lost:
                    self.lost.inc(lost)
                for event in events:
                    self.count(event)
        except asyncio.CancelledError:
            subscriber.close()
            raise

    def count(self, event: object) -> None:
        """Count one event."""
        match event:
            case MappingGranted(mapping=m, rule=rule):
                self.grants.labels(str(m.owner.mechanism), rule).inc()
            case MappingRenewed(mapping=m, rule=rule):
                self.renewals.labels(str(m.owner.mechanism), rule).inc()
            case RequestRefused(request=request, reason=reason, rule=rule):
                self.refusals.labels(str(request.mechanism), str(reason), rule).inc()
            case MappingRemoved(cause=cause):
                self.removals.labels(str(cause)).inc()
            case DatagramDropped(reason=reason):
                self.dropped.labels(str(reason)).inc()
            case CommitFailed():
                self.commit_failures.inc()
            case ExternalAddressChanged():
                self.address_changes.inc()
            case PinholeOpened(pinhole=h, rule=rule):
                self.pinholes_opened.labels(str(h.owner.mechanism), rule).inc()
            case PinholeRenewed(pinhole=h, rule=rule):
                self.pinhole_renewals.labels(str(h.owner.mechanism), rule).inc()
            case PinholeRefused(request=request, refusal=refusal, rule=rule):
                why = refusal.name.lower().replace("_", "-")
                self.pinhole_refusals.labels(str(request.owner.mechanism), why, rule).inc()
            case PinholeRemoved(cause=cause):
                self.pinhole_removals.labels(str(cause)).inc()

    def scrape(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _request_done(self, request: MapRequest, seconds: float) -> None:
        self._request_by[request.mechanism].observe(seconds)

    def _commit_done(self, stage: str, seconds: float) -> None:
        histogram = self._commit_by.get(stage)
        if histogram is not None:
            histogram.observe(seconds)
