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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

# Latency buckets from 50 µs to 10 s: pushes are meant to take about a millisecond.
_LATENCY = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 10.0,
)  # fmt: skip


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
        self.push_latency = Histogram(
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
