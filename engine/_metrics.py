"""Prometheus metrics, served at ``/metrics`` and read by the dashboard.

==================================  =========================================================
``recstream_events_total``          events by ``source`` (http, ws, forward, demo) and
                                    ``result`` (accepted, rejected, unavailable)
``recstream_rejects_total``         refusals by ``reason`` (invalid_event, invalid_record,
                                    invalid_frame, bad_request, too_large, auth,
                                    forward_protocol)
``recstream_wal_append_seconds``    append to durable (group commit and fsync)
``recstream_model_apply_seconds``   the model actor's apply time per journal group
``recstream_index_stale_items``     moved items not yet re-linked (read at scrape time)
``recstream_push_latency_seconds``  event accepted to changed list handed to a subscriber
``recstream_subscribers``           live subscriptions (read at scrape time)
``recstream_pushes_total``          lists handed to subscribers
``recstream_pushes_coalesced_total`` lists replaced before a slow subscriber read them
``recstream_pushes_dropped_total``  lists discarded unread (erasure, stuck subscribers)
``recstream_subscribers_dropped_total`` subscribers closed for being stuck
``recstream_snapshots_total``       snapshots written
``recstream_connections``           open connections by ``listener`` (forward, http)
``recstream_connections_refused_total`` connections closed on arrival by ``listener``: the
                                    listener was at its connection limit
``recstream_connections_idle_closed_total`` connections closed for idling by ``listener``
                                    (forward, ws_events)
``recstream_io_errors_total``       write/sync errors by ``what`` (journal, snapshot)
``recstream_storage_fault``         1 while ``what`` (journal, snapshot) is failing, else 0
                                    (read at scrape time; ``/readyz`` says why)
==================================  =========================================================

One registry per server (not the process-global one), so tests can run several servers in one
process without their counters mixing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ._publisher import Push

__all__ = ["BatchHistogram", "Metrics"]

# Latency buckets from 50 µs to 10 s: pushes are meant to take about a millisecond.
_LATENCY = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


class BatchHistogram(Collector):
    """A histogram observed a batch of values at a time, from one thread (the event loop).

    ``prometheus_client``'s :class:`Histogram` takes a lock and walks its buckets in Python for
    every value, about 3 µs: with the counters beside it, the metrics of a push were about
    half the Python of handing a list over to its subscriber. Here a batch costs one C
    bisection per value. Exposed like a ``Histogram`` (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._doc = documentation
        self._bounds = sorted(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # buckets hold value <= bound
            total += value
        self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            running += count
            cumulative.append((_le(bound), running))
        yield HistogramMetricFamily(self._name, self._doc, buckets=cumulative, sum_value=self._sum)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``+Inf``, ``0.05``, ``1.0``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """All of the server's instruments."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter(
            "recstream_events", "Events by source and result", ["source", "result"], registry=r
        )
        self.rejects = Counter(
            "recstream_rejects", "Refused events and frames by reason", ["reason"], registry=r
        )
        self.wal_sync = Histogram(
            "recstream_wal_append_seconds",
            "Time from append to durable",
            buckets=_LATENCY,
            registry=r,
        )
        self.model_update = Histogram(
            "recstream_model_apply_seconds",
            "Time to apply one journal group",
            buckets=_LATENCY,
            registry=r,
        )
        self.index_stale = Gauge(
            "recstream_index_stale_items", "Moved items not yet re-linked in the index", registry=r
        )
        self.push_latency = BatchHistogram(
            "recstream_push_latency_seconds",
            "From accepting an event to handing the changed list to its subscribers",
            buckets=_LATENCY,
            registry=r,
        )
        self.subscribers = Gauge(
            "recstream_subscribers", "Live websocket subscriptions", registry=r
        )
        self.pushes = Counter("recstream_pushes", "Lists handed to subscribers", registry=r)
        self.delivered_at_once = Counter(
            "recstream_pushes_delivered_at_once",
            "Lists written to the subscriber's connection by the task that computed them",
            registry=r,
        )
        self.coalesced = Counter(
            "recstream_pushes_coalesced",
            "Lists replaced before a slow subscriber read them",
            registry=r,
        )
        self.dropped = Counter(
            "recstream_subscribers_dropped", "Subscribers closed for being stuck", registry=r
        )
        self.dropped_pushes = Counter(
            "recstream_pushes_dropped",
            "Lists discarded unread: erased users, stuck subscribers",
            registry=r,
        )
        self.snapshots = Counter("recstream_snapshots", "Snapshots written", registry=r)
        self.connections = Gauge(
            "recstream_connections", "Open connections by listener", ["listener"], registry=r
        )
        self.connections_refused = Counter(
            "recstream_connections_refused",
            "Connections closed on arrival: the listener was at its limit",
            ["listener"],
            registry=r,
        )
        self.idle_closed = Counter(
            "recstream_connections_idle_closed",
            "Connections closed after idling past idle_timeout",
            ["listener"],
            registry=r,
        )

        self.io_errors = Counter(
            "recstream_io_errors", "Write and sync errors by what failed", ["what"], registry=r
        )
        self.storage_fault = Gauge(
            "recstream_storage_fault",
            "1 while the journal or snapshots cannot be written",
            ["what"],
            registry=r,
        )

    def pushed(self, handed: Sequence[tuple[object, Push, bool]], now: float) -> None:
        """Counts lists handed to subscribers together (the publisher's ``on_pushes``) at
        ``now`` (``time.time()``), with their latencies from the events that caused them."""
        self.pushes.inc(len(handed))
        delivered = sum(1 for _, _, at_once in handed if at_once)
        if delivered:
            self.delivered_at_once.inc(delivered)
        self.push_latency.observe_many(
            max(0.0, now - push.cause.accepted_at)
            for _, push, _ in handed
            if push.cause is not None
        )

    def rejected_total(self) -> int:
        """Refusals of every reason so far: the sum of ``recstream_rejects_total``."""
        return int(
            sum(
                sample.value
                for metric in self.rejects.collect()
                for sample in metric.samples
                if sample.name == "recstream_rejects_total"
            )
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
