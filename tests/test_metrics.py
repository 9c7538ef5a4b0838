"""Every Prometheus metric the dashboard and operators rely on moves after its action."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from connectors import Node
from engine import ModelConfig
from engine._publisher import Subscription

from .conftest import running_server, websocket, ws_url


def sample(server: Node, name: str, **labels: str) -> float:
    value = server.engine.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _until(predicate: object, seconds: float = 5.0) -> None:
    assert callable(predicate)
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 - polling a metric, no event to wait on
            await trio.sleep(0.01)


async def test_each_metric_moves_after_its_action(tmp_path: Path) -> None:
    # An index kept up to date whatever the catalog's size, so that staleness shows.
    model = ModelConfig(dim=16, seed=5, auto_reindex=False, exact_below=0)
    async with running_server(tmp_path / "data", max_body_bytes=4096, model=model) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            # Events by source and result; WAL sync and model apply latency.
            r = await http.post(
                "/v1/events", json=[{"user": f"u{n}", "item": f"i{n % 7}"} for n in range(30)]
            )
            await server.engine.wait_applied(r.json()["seq"])
            assert sample(server, "recstream_events_total", source="http", result="accepted") == 30
            assert sample(server, "recstream_wal_append_seconds_count") == 1
            assert sample(server, "recstream_model_apply_seconds_count") >= 1
            assert sample(server, "recstream_model_apply_seconds_sum") > 0

            # Rejects by reason.
            bad = await http.post("/v1/events", json={"user": "u", "item": "i", "weight": -1})
            assert bad.status_code == 422
            assert sample(server, "recstream_events_total", source="http", result="rejected") == 1
            assert sample(server, "recstream_rejects_total", reason="invalid_event") == 1
            assert (await http.post("/v1/events", content=b"{nope")).status_code == 400
            assert sample(server, "recstream_rejects_total", reason="bad_request") == 1
            assert (
                await http.post("/v1/events", content=b"[" + b" " * 5000 + b"]")
            ).status_code == 413
            assert sample(server, "recstream_rejects_total", reason="too_large") == 1

            # Index staleness is read at scrape time: items moved and not yet re-linked.
            server.engine.model.ingest(["x1", "x2"], ["fresh1", "fresh2"])
            assert sample(server, "recstream_index_stale_items") >= 2
            await _until(lambda: sample(server, "recstream_index_stale_items") == 0)

            # Subscribers and push latency.
            url = ws_url(server, "/v1/ws/recommendations?user=u1&k=3")
            async with websocket(url) as ws:
                await ws.get_message()
                assert sample(server, "recstream_subscribers") == 1
                await http.post("/v1/events", json={"user": "u1", "item": "i1", "type": "purchase"})
                with trio.fail_after(5):
                    json.loads(await ws.get_message())
                assert sample(server, "recstream_push_latency_seconds_count") >= 1
                assert sample(server, "recstream_pushes_total") >= 1
            await _until(lambda: sample(server, "recstream_subscribers") == 0)

            # Coalesced: a subscriber that does not read gets its unread list replaced.
            assert server.engine.publisher is not None
            sub = Subscription(user="slow", k=3)
            server.engine.publisher.subscribe(sub)
            for n, item in enumerate(["i1", "i2", "i3"]):
                r = await http.post("/v1/events", json={"user": "slow", "item": item})
                await server.engine.wait_applied(r.json()["seq"])
                await _until(
                    lambda n=n: (
                        server.engine.publisher is not None
                        and server.engine.publisher.pushes >= 2 + n
                    )
                )
            assert sample(server, "recstream_pushes_coalesced_total") >= 1

            # Dropped: erasing the user discards the list it never read.
            assert (await http.delete("/v1/users/slow")).status_code == 200
            assert sample(server, "recstream_pushes_dropped_total") == 1
            server.engine.publisher.unsubscribe(sub)
            assert sample(server, "recstream_snapshots_total") >= 1  # the erasure's snapshot

            # The text exposition names every one of them.
            text = (await http.get("/metrics")).text
            for name in (
                "recstream_events_total",
                "recstream_rejects_total",
                "recstream_wal_append_seconds_bucket",
                "recstream_model_apply_seconds_bucket",
                "recstream_index_stale_items",
                "recstream_push_latency_seconds_bucket",
                "recstream_subscribers",
                "recstream_pushes_coalesced_total",
                "recstream_pushes_dropped_total",
            ):
                assert name in text


async def test_stats_rejected_follows_the_rejects_counter(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            bad = [{"user": "a", "item": "x", "type": "no-such-type"}, {"user": "a", "item": "y"}]
            assert (await http.post("/v1/events", json=bad)).status_code == 422
            assert (await http.post("/v1/events", content=b"\x00not json")).status_code == 400
            stats = (await http.get("/v1/stats")).json()
            total = sum(
                sample(server, "recstream_rejects_total", reason=reason)
                for reason in ("invalid_event", "bad_request", "invalid_frame")
            )
            assert total >= 2
            assert stats["rejected"] == total
            text = (await http.get("/metrics")).text
            assert 'recstream_rejects_total{reason="invalid_event"} 1.0' in text


def test_batch_histogram_reads_like_prometheus_histogram() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from engine._metrics import _LATENCY, BatchHistogram

    values = [0.0, 0.00005, 0.00007, 0.001, 0.0049, 0.005, 0.3, 9.9, 10.0, 11.0, 400.0]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("lat_seconds", "doc", _LATENCY, ours)
    plain = Histogram("lat_seconds", "doc", buckets=_LATENCY, registry=theirs)
    batch.observe_many(values[:4])
    batch.observe_many(values[4:])
    for value in values:
        plain.observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
    assert ours.get_sample_value("lat_seconds_bucket", {"le": "0.005"}) == 6  # 0.005 itself in
    assert ours.get_sample_value("lat_seconds_count") == len(values)
