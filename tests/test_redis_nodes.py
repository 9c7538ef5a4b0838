"""Replica nodes on one Redis Streams log: ``recstream serve --log`` processes, real Redis.

Every test sends events with unique ids and checks at the end that every node applied each
acknowledged event exactly once: ``events_applied`` equals the number of distinct events on
every node (a lost acknowledged event makes it smaller, a double apply larger), whatever
faults happened in between. Producers resend what was not acknowledged, as a real one does.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from bench._common import ServerProcess
from connectors.client import ForwardProducer

from .redis_harness import RedisServer, redis_server, require_redis, start_cluster

__all__ = ["redis_server"]  # the fixture, imported for pytest

# Snapshots every second, so restarts begin from a snapshot plus a stretch of the log.
NODE_CONFIG: dict[str, Any] = {"snapshot_interval": 1.0}


def paced_producers(targets: list[ServerProcess]) -> list[Producer]:
    """One started producer per node: 1500 events each, 25 a batch, 50 ms apart (~3 s)."""
    producers = [Producer(n, f"p{i}", 1500, 25, 0.05) for i, n in enumerate(targets)]
    for p in producers:
        p.start()
    return producers


def agreement(nodes_: list[ServerProcess]) -> tuple[int, float]:
    """Over 100 users: how many top-10 lists all nodes serve identically, and the mean share
    of node 0's items in each other node's list."""
    users = [f"u{k}" for k in range(100)]
    lists = [[top10(n, u) for n in nodes_] for u in users]
    identical = sum(1 for ls in lists if all(x == ls[0] for x in ls))
    shares = [len(set(ls[0]) & set(x)) / 10 for ls in lists for x in ls[1:]]
    return identical, sum(shares) / len(shares)


def start_node(tmp_path: Path, name: str, log_url: str, *extra: str) -> ServerProcess:
    node = ServerProcess(
        NODE_CONFIG, data_dir=tmp_path / name, args=["--log", log_url, *extra], startup_timeout=60
    )
    return node.__enter__()


@contextmanager
def nodes(tmp_path: Path, log_url: str, n: int = 3) -> Iterator[list[ServerProcess]]:
    with ExitStack() as stack:
        running = []
        for i in range(n):
            node = start_node(tmp_path, f"node{i}", log_url)
            stack.callback(node.__exit__, None, None, None)
            running.append(node)
        yield running


def events(tag: str, first: int, n: int) -> list[dict[str, Any]]:
    """``n`` interactions with ids ``first ..``, over 100 users and 300 items."""
    return [
        {"user": f"u{k % 100}", "item": f"i{(k * 7 + k // 100) % 300}", "id": f"{tag}-{k}"}
        for k in range(first, first + n)
    ]


def post_until_acked(node: ServerProcess, batch: list[dict[str, Any]], tag: str) -> int:
    """POSTs ``batch`` until the node answers 202; returns the attempts it took."""
    body = json.dumps(batch).encode()
    for attempt in range(1, 400):
        request = urllib.request.Request(
            f"{node.http_url}/v1/events?tag={tag}",
            data=body,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status == 202:
                    return attempt
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass  # refused (5xx), unreachable or slow: not acknowledged, so send again
        time.sleep(0.05)
    raise AssertionError(f"{tag}: never acknowledged")


class Producer(threading.Thread):
    """Sends ``total`` events in batches over HTTP to a node, resending each batch until
    acknowledged, with ``interval`` seconds between batches (so a fault meets it mid-way)."""

    def __init__(
        self, target: ServerProcess, tag: str, total: int, batch: int = 50, interval: float = 0.0
    ) -> None:
        super().__init__(daemon=True)
        self.target, self.tag, self.total, self.batch = target, tag, total, batch
        self.interval = interval
        self.acked = 0
        self.resends = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for first in range(0, self.total, self.batch):
                batch = events(self.tag, first, self.batch)
                self.resends += post_until_acked(self.target, batch, self.tag) - 1
                self.acked += self.batch
                time.sleep(self.interval)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.tag} still sending"
        if self.error is not None:
            raise self.error


def forward_send(node: ServerProcess, tag: str, first: int, n: int) -> None:
    """Sends events over Fluent Forward and returns once all are acknowledged."""

    async def send() -> None:
        host, port = node.forward_address
        async with ForwardProducer(host, port, tag=tag, connect_timeout=10) as producer:
            for start in range(first, first + n, 100):
                await producer.send(events(tag, start, min(100, first + n - start)))
            await producer.flush()

    trio.run(send)


def converge(nodes_: list[ServerProcess], total: int, timeout: float = 60) -> list[dict[str, Any]]:
    """Waits until every node applied ``total`` events and everything it read, at the same
    log position with no lag; returns stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [n.stats() for n in nodes_]
        if all(
            s["events_applied"] >= total
            and s["log"]["lag"] == 0
            and s["applied_seq"] == s["wal_seq"]
            for s in stats
        ):
            positions = {json.dumps(s["log"]["position"], sort_keys=True) for s in stats}
            if len(positions) == 1:
                return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"no convergence on {total} events: {stats}")
        time.sleep(0.2)


def readyz(node: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"{node.http_url}/readyz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def top10(node: ServerProcess, user: str) -> list[str]:
    body = json.loads(node.get(f"/v1/users/{user}/recommendations?k=10"))
    return [r["item"] for r in body["items"]]


def assert_exactly_once(stats: list[dict[str, Any]], total: int) -> None:
    for s in stats:
        assert s["events_applied"] == total, s
        assert s["rejected"] == 0, s


# --- convergence ----------------------------------------------------------------------------


def test_three_nodes_apply_the_same_events_and_serve_the_same_lists(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with nodes(tmp_path, redis_server.url) as (a, b, c):
        # Forward into a and c, HTTP into b, at the same time.
        http = Producer(b, "web", 1500)
        http.start()
        forward_send(a, "app", 0, 1500)
        forward_send(c, "jobs", 0, 1500)
        http.finish()
        stats = converge([a, b, c], 4500)
        assert_exactly_once(stats, 4500)
        assert len({(s["users"], s["items"]) for s in stats}) == 1
        # A producer that lost its acks resends everything, to another node: nothing twice.
        forward_send(b, "app", 0, 1500)
        stats = converge([a, b, c], 4500)
        assert_exactly_once(stats, 4500)
        for s in stats:
            assert s["duplicates"] == 1500
        identical, overlap = agreement([a, b, c])
        # An erasure on one node travels the log: every node forgets the user.
        request = urllib.request.Request(f"{a.http_url}/v1/users/u5", method="DELETE")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["erased"] is True
        deadline = time.monotonic() + 30
        while any(n.stats()["users"] != 99 for n in (a, b, c)):
            assert time.monotonic() < deadline, [n.stats()["users"] for n in (a, b, c)]
            time.sleep(0.1)
    with capsys.disabled():
        print(
            f"\n[redis nodes] top-10 lists of 100 users on 3 nodes, one partition: "
            f"{identical} identical, mean overlap with node 0 {overlap:.3f}"
        )
    # One partition: one total order, applied by the same model on every node.
    assert identical == 100


# --- faults ---------------------------------------------------------------------------------


def test_a_node_killed_during_ingest_restarts_from_its_snapshot_and_the_log(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with nodes(tmp_path, redis_server.url) as (a, b, c):
        # Paced over 6 s or more, so the kill below meets them mid-way.
        producers = [Producer(a, "pa", 3000, interval=0.1), Producer(c, "pc", 3000, interval=0.1)]
        for p in producers:
            p.start()
        # Killed once its first snapshot (taken every second) is on disk, during ingest.
        deadline = time.monotonic() + 30
        while not (tmp_path / "node1" / "snapshot.rsnap").exists():
            assert time.monotonic() < deadline, "node1 wrote no snapshot"
            time.sleep(0.05)
        assert any(p.is_alive() for p in producers), "ingest ended before the kill"
        b.kill()
        b.__exit__(None, None, None)
        time.sleep(0.5)
        b2 = start_node(tmp_path, "node1", redis_server.url)
        try:
            for p in producers:
                p.finish()
            stats = converge([a, b2, c], 6000)
            assert_exactly_once(stats, 6000)
        finally:
            b2.__exit__(None, None, None)


def test_a_wiped_node_rejoins_from_a_peers_snapshot(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with nodes(tmp_path, redis_server.url) as (a, b, c):
        producer = Producer(a, "pa", 3000)
        producer.start()
        time.sleep(1.0)
        c.kill()
        c.__exit__(None, None, None)
        shutil.rmtree(tmp_path / "node2")
        c2 = start_node(tmp_path, "node2", redis_server.url, "--join", a.http_url)
        try:
            producer.finish()
            stats = converge([a, b, c2], 3000)
            assert_exactly_once(stats, 3000)
            assert (tmp_path / "node2" / "snapshot.rsnap").exists()
        finally:
            c2.__exit__(None, None, None)


def test_a_paused_redis_never_yields_a_false_ack(tmp_path: Path, redis_server: RedisServer) -> None:
    with nodes(tmp_path, redis_server.url) as (a, b, c):
        producers = paced_producers([a, b])
        time.sleep(0.5)
        redis_server.pause()
        time.sleep(5)
        stuck = [p.acked for p in producers]
        # While Redis is stopped a node refuses or holds writes, says why, and is not ready;
        # reads go on.
        faults = [n.stats()["log"]["fault"] for n in (a, b)]
        ready = [readyz(n) for n in (a, b)]
        redis_server.resume()
        for p in producers:
            p.finish()
        stats = converge([a, b, c], 3000)
        assert_exactly_once(stats, 3000)
        assert any(f is not None for f in faults), faults
        assert 503 in ready, ready
        assert sum(p.resends for p in producers) > 0
        assert all(s < 1500 for s in stuck)


def test_redis_killed_during_ingest_restarts_on_its_aof_and_loses_no_ack(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with nodes(tmp_path, redis_server.url) as (a, b, c):
        producers = paced_producers([a, c])
        time.sleep(0.7)
        redis_server.kill()
        time.sleep(1.0)
        redis_server.start()
        for p in producers:
            p.finish()
        stats = converge([a, b, c], 3000)
        assert_exactly_once(stats, 3000)
        assert sum(p.resends for p in producers) > 0


# --- cluster --------------------------------------------------------------------------------


def test_three_nodes_on_a_three_master_cluster_converge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_redis()
    servers = start_cluster(tmp_path / "cluster")
    try:
        url = f"redis+cluster://127.0.0.1:{servers[0].port}"
        with nodes(tmp_path, url) as (a, b, c):
            assert a.stats()["log"]["partitions"] == 3
            producers = [Producer(n, f"tag{i}", 900) for i, n in enumerate((a, b, c))]
            for p in producers:
                p.start()
            forward_send(a, "fwd", 0, 900)
            for p in producers:
                p.finish()
            stats = converge([a, b, c], 3600)
            assert_exactly_once(stats, 3600)
            # Partitions spread over the masters: each master holds entries.
            lengths = [s.client().dbsize() for s in servers]
            assert all(n >= 1 for n in lengths), lengths
            identical, overlap = agreement([a, b, c])
        with capsys.disabled():
            print(
                f"\n[redis cluster] top-10 lists of 100 users on 3 nodes, 3 partitions "
                f"merged in read order: {identical} identical, mean overlap {overlap:.3f}"
            )
        assert overlap > 0.8
    finally:
        for s in servers:
            s.stop()
