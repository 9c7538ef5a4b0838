"""connectors.redis_streams against a real redis-server (and a real three-master cluster)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import trio
from redis.cluster import RedisCluster

from connectors.redis_streams import (
    Appended,
    LogGap,
    RedisLogConfig,
    RedisStreamsLog,
    decode_position,
    encode_position,
    parse_id,
    parse_log_url,
    partition_keys,
    partition_of,
)
from engine._events import journal_record
from engine._exceptions import JournalClosed, JournalFailed

from .redis_harness import RedisServer, redis_server, require_redis, start_cluster

__all__ = ["redis_server"]  # the fixture, imported for pytest


def record(tag: str, n: int) -> bytes:
    """A journal record holding one interaction with event id ``n``."""
    frame = msgpack.packb([tag, [[1_700_000_000, {"user": n % 7, "item": n, "id": n}]]])
    return journal_record(frame, accepted_at=1_700_000_000.0)


def event_id(payload: bytes) -> tuple[str, int]:
    _, frame = msgpack.unpackb(payload, raw=False)
    tag, entries = msgpack.unpackb(frame, raw=False)
    return tag, entries[0][1]["id"]


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    return redis_server


class Node:
    """A log with a task that collects what it forwards, as the model actor would."""

    def __init__(self, log: RedisStreamsLog) -> None:
        self.log = log
        self.groups: list[Appended] = []
        self.closed = trio.Event()
        self._changed = trio.Event()

    @property
    def payloads(self) -> list[bytes]:
        return [p for g in self.groups for p in g.payloads]

    @property
    def seqs(self) -> list[int]:
        return [g.first_seq + i for g in self.groups for i in range(len(g.payloads))]

    async def collect(self, inbox: trio.MemoryReceiveChannel[Appended]) -> None:
        async for group in inbox:
            self.groups.append(group)
            self._changed.set()
            self._changed = trio.Event()
        self.closed.set()

    async def wait_for(self, n: int) -> None:
        """Waits (at most 10 s) until ``n`` records arrived."""
        with trio.fail_after(10):
            while len(self.payloads) < n:
                await self._changed.wait()


async def start_node(
    nursery: trio.Nursery,
    config: RedisLogConfig,
    *,
    seq: int = 0,
    position: bytes = b"",
    node_id: str | None = None,
) -> Node:
    node = Node(RedisStreamsLog(config, node_id=node_id))
    send, receive = trio.open_memory_channel[Appended](8)
    nursery.start_soon(node.collect, receive)
    await nursery.start(
        lambda task_status: node.log.run(
            send, after_seq=seq, after_position=position, task_status=task_status
        )
    )
    return node


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


# --- pure parts ---------------------------------------------------------------------------


def test_log_urls_parse_and_bad_ones_are_refused() -> None:
    c = parse_log_url("redis://:s%40cret@10.0.0.5:6380/3?name=shop", partitions=2)
    assert (c.cluster, c.host, c.port, c.db, c.password, c.name, c.partitions) == (
        False, "10.0.0.5", 6380, 3, "s@cret", "shop", 2,
    )  # fmt: skip
    c = parse_log_url("redis+cluster://127.0.0.1:7000")
    assert (c.cluster, c.port, c.db, c.partitions) == (True, 7000, 0, None)
    assert (c.keep, c.liveness) == (10_000, 3600.0)
    c = parse_log_url("redis://h:1?keep=100000&liveness=86400")
    assert (c.keep, c.liveness) == (100_000, 86_400.0)
    for bad in [
        "http://x:1",
        "redis://",
        "redis://h:1/x",
        "redis://h:99999",
        "redis+cluster://h:1/2",
        "redis://h:1?nmae=x",
        "redis://h:1?name=a:b",
        "redis://h:1?keep=many",
        "redis://h:1?keep=-1",
        "redis://h:1?liveness=0",
    ]:
        with pytest.raises(ValueError):
            parse_log_url(bad)
    with pytest.raises(ValueError):
        parse_log_url("redis://h:1", partitions=0)


def test_partition_keys_spread_over_the_slot_ranges_and_are_stable() -> None:
    from redis.crc import key_slot

    keys = partition_keys("log", 3)
    assert keys == partition_keys("log", 3)
    assert [k.rsplit(":", 1)[1] for k in keys] == ["p0", "p1", "p2"]
    slots = [key_slot(k.encode()) for k in keys]
    assert [s * 3 // 16384 for s in slots] == [0, 1, 2], slots
    assert partition_keys("log", 1)[0].startswith("recstream:{log-")
    # A producer's records all land in one partition; different tags spread.
    assert len({partition_of(record("a", n), 3) for n in range(20)}) == 1
    assert len({partition_of(record(f"t{t}", 0), 3) for t in range(30)}) == 3
    with pytest.raises(ValueError):
        partition_of(b"\x01garbage", 3)


def test_positions_round_trip_and_garbage_is_refused() -> None:
    p = {"recstream:{a-0}:p0": (1_700_000_000_000, 5), "recstream:{a-1}:p1": (0, 0)}
    assert decode_position(encode_position(p)) == p
    assert decode_position(b"") == {}
    for bad in [
        b"\xc1",
        msgpack.packb([1]),
        msgpack.packb({"k": "12-x"}),
        msgpack.packb({1: "1-1"}),
    ]:
        with pytest.raises(ValueError):
            decode_position(bad)


# --- one server -----------------------------------------------------------------------------


async def test_two_nodes_forward_the_same_sequence_and_acks_carry_the_local_seq(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url)
    a = await start_node(nursery, config)
    b = await start_node(nursery, config)
    acked: dict[tuple[str, int], int] = {}

    async def produce(node: Node, tag: str) -> None:
        for n in range(0, 200, 4):
            batch = [record(tag, n + i) for i in range(4)]
            last = await node.log.append(batch)
            acked[(tag, n + 3)] = last

    async with trio.open_nursery() as producers:
        producers.start_soon(produce, a, "web")
        producers.start_soon(produce, b, "app")
        producers.start_soon(produce, a, "jobs")
    await a.wait_for(600)
    await b.wait_for(600)
    assert a.payloads == b.payloads  # one partition: one total order
    assert a.seqs == list(range(1, 601))
    ids = [event_id(p) for p in a.payloads]
    assert len(set(ids)) == 600
    # Within a producer, log order is the order of its appends.
    for tag in ("web", "app", "jobs"):
        mine = [n for t, n in ids if t == tag]
        assert mine == sorted(mine)
    # The seq an append returned is where its last record sits in the node's own numbering.
    for node, tags in ((a, ("web", "jobs")), (b, ("app",))):
        where = {event_id(p): s for p, s in zip(node.payloads, node.seqs, strict=True)}
        for (tag, n), seq in acked.items():
            if tag in tags:
                assert where[(tag, n)] == seq
    assert a.log.stats()["log"] == "redis"
    await a.log.aclose()
    with pytest.raises(JournalClosed):
        await a.log.append([record("web", 9999)])
    with trio.fail_after(5):
        await a.closed.wait()


async def test_restart_replays_only_after_the_snapshot_position(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url)
    a = await start_node(nursery, config, node_id="a")
    for n in range(50):
        await a.log.append([record("p", n)])
    await a.wait_for(50)
    cut = a.groups[len(a.groups) // 2]
    cut_seq = cut.first_seq + len(cut.payloads) - 1
    for n in range(50, 80):
        await a.log.append([record("p", n)])
    await a.wait_for(80)
    await a.log.aclose()
    # A restart from the snapshot at `cut` gets exactly the records after it, numbered on.
    again = await start_node(nursery, config, seq=cut_seq, position=cut.position, node_id="a")
    assert again.seqs[0] == cut_seq + 1  # the backlog was forwarded before run started
    assert again.payloads == a.payloads[cut_seq:]
    assert again.seqs[-1] == 80
    assert again.log.stats()["lag"] == 0
    await again.log.aclose()


async def test_redis_down_fails_appends_and_recovery_clears_the_fault(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url, op_timeout=0.5, retry_interval=0.1)
    a = await start_node(nursery, config)
    await a.log.append([record("p", 0)])
    server.kill()
    with pytest.raises(JournalFailed):
        await a.log.append([record("p", 1)])
    assert a.log.fault is not None
    server.start()  # same port, same AOF
    with trio.fail_after(10):
        while True:
            try:
                await a.log.append([record("p", 2)])
                break
            except JournalFailed:
                await trio.sleep(0.1)
    assert a.log.fault is None
    await a.wait_for(2)
    # The acknowledged records survived the kill -9 (AOF, fsync always).
    assert [event_id(p)[1] for p in a.payloads] == [0, 2]


async def test_a_paused_redis_times_out_appends_instead_of_acknowledging(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url, op_timeout=0.3, retry_interval=0.1)
    a = await start_node(nursery, config)
    server.pause()
    try:
        with pytest.raises(JournalFailed):
            await a.log.append([record("p", 1)])
    finally:
        server.resume()
    with trio.fail_after(10):
        while True:
            try:
                seq = await a.log.append([record("p", 2)])
                break
            except JournalFailed:
                await trio.sleep(0.1)
    await a.wait_for(seq)
    # The timed-out append may have landed after all; it was never acknowledged.
    assert event_id(a.payloads[-1]) == ("p", 2)


async def test_checkpoints_trim_below_the_oldest_live_node_and_a_stale_node_must_rejoin(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    clock = [time.time()]
    config = parse_log_url(server.url, keep=5, liveness=60)
    a = await start_node(nursery, config, node_id="a")
    a.log._now = lambda: clock[0]
    b = await start_node(nursery, config, node_id="b")
    b.log._now = lambda: clock[0]
    for n in range(40):
        await a.log.append([record("p", n)])
    await a.wait_for(40)
    await b.wait_for(40)
    key = a.log.keys[0]
    r = server.client()
    lo, hi = a.groups[len(a.groups) // 4], a.groups[len(a.groups) // 2]
    lo_seq, hi_seq = lo.first_seq + len(lo.payloads) - 1, hi.first_seq + len(hi.payloads) - 1
    await a.log.checkpoint(hi_seq, hi.position)
    await b.log.checkpoint(lo_seq, lo.position)
    # b is the oldest live node: the entry at its position and all after it stay.
    assert r.xlen(key) == 40 - lo_seq + 1
    oldest: Any = r.xrange(key, count=1)
    assert decode_position(lo.position)[key] == parse_id(oldest[0][0])
    # b goes silent past the liveness window: a's position rules, minus the `keep` newest.
    clock[0] += 120
    await a.log.checkpoint(hi_seq, hi.position)
    assert r.xlen(key) == max(40 - hi_seq + 1, 5)
    await b.log.aclose()
    with pytest.raises(LogGap):
        await start_node(nursery, config, seq=lo_seq, position=lo.position, node_id="b")


# --- cluster --------------------------------------------------------------------------------


async def test_cluster_partitions_sit_on_different_masters_and_every_record_arrives(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    require_redis()
    servers = start_cluster(tmp_path / "cluster")
    try:
        config = parse_log_url(f"redis+cluster://127.0.0.1:{servers[0].port}")
        a = await start_node(nursery, config)
        b = await start_node(nursery, config)
        assert len(a.log.keys) == 3
        rc = RedisCluster(host="127.0.0.1", port=servers[0].port)
        owners = {rc.get_node_from_key(k).port for k in a.log.keys}
        assert owners == {s.port for s in servers}

        async def produce(node: Node, tag: str) -> None:
            for n in range(60):
                await node.log.append([record(tag, n)])

        async with trio.open_nursery() as producers:
            for t in range(6):
                producers.start_soon(produce, (a, b)[t % 2], f"tag{t}")
        await a.wait_for(360)
        await b.wait_for(360)
        for node in (a, b):
            ids = [event_id(p) for p in node.payloads]
            assert sorted(ids) == sorted((f"tag{t}", n) for t in range(6) for n in range(60))
            for t in range(6):  # each producer's order survives the merge
                assert [n for tag, n in ids if tag == f"tag{t}"] == list(range(60))
        positions = decode_position(a.groups[-1].position)
        assert set(positions) == set(a.log.keys)
        assert sum(rc.xlen(k) for k in a.log.keys) == 360
        assert all(rc.xlen(k) > 0 for k in a.log.keys)
        rc.close()
        await a.log.aclose()
        await b.log.aclose()
    finally:
        for s in servers:
            s.stop()


def test_harness_server_is_real(server: RedisServer) -> None:
    c = server.client()
    assert c.config_get("appendfsync") == {"appendfsync": "always"}
    assert c.config_get("appendonly") == {"appendonly": "yes"}
    assert isinstance(c, redis.Redis)


def frame_record(tag: str, records: list[dict[str, Any]]) -> bytes:
    frame = msgpack.packb([tag, [[1_700_000_000, r] for r in records]])
    return journal_record(frame, accepted_at=1_700_000_000.0)


async def test_erasure_deletes_the_entries_of_the_erased_user_up_to_the_erase_record(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url)
    a = await start_node(nursery, config)
    b = await start_node(nursery, config)
    ann = {"user": "ann", "item": "x", "id": 1}
    bob = {"user": "bob", "item": "x", "id": 2}
    await a.log.append([frame_record("p", [ann]), frame_record("p", [bob])])
    await b.log.append([frame_record("q", [{**ann, "id": 3}])])
    await a.log.append([frame_record("p", [{**ann, "id": 4}, {**bob, "id": 5}])])  # mixed
    erase_seq = await a.log.append([frame_record("p", [{"erase_user": "ann"}])])
    later = await a.log.append([frame_record("p", [{**ann, "id": 6}])])  # new data after E
    await b.wait_for(later)
    key = a.log.keys[0]
    r = server.client()
    assert r.xlen(key) == 6
    # A node that did not append the erase record leaves the deletion to the one that did.
    assert await b.log.erase({"ann": erase_seq}) == 0
    assert await a.log.erase({"ann": erase_seq}) == 3  # ann's two frames and the erase record
    left: Any = r.xrange(key)
    users = [
        [rec["user"] for _, rec in msgpack.unpackb(msgpack.unpackb(f[b"r"])[1])[1]] for _, f in left
    ]
    assert users == [["bob"], ["ann", "bob"], ["ann"]]


async def test_start_up_catches_up_even_when_the_newest_entry_was_deleted(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url, block=0.2)
    a = await start_node(nursery, config)
    for n in range(3):
        await a.log.append([record("p", n)])
    key = a.log.keys[0]
    r = server.client()
    newest: Any = r.xrevrange(key, count=1)
    r.xdel(key, newest[0][0])
    with trio.fail_after(5):
        b = await start_node(nursery, config)
    assert [event_id(p)[1] for p in b.payloads] == [0, 1]


async def test_several_partitions_on_one_server_keep_each_producers_order(
    server: RedisServer, nursery: trio.Nursery
) -> None:
    config = parse_log_url(server.url, partitions=3)
    a = await start_node(nursery, config)
    b = await start_node(nursery, config)
    assert len(a.log.keys) == 3

    async def produce(node: Node, tag: str) -> None:
        for n in range(40):
            await node.log.append([record(tag, n)])

    async with trio.open_nursery() as producers:
        for t in range(6):
            producers.start_soon(produce, (a, b)[t % 2], f"tag{t}")
    for node in (a, b):
        await node.wait_for(240)
        ids = [event_id(p) for p in node.payloads]
        for t in range(6):
            assert [n for tag, n in ids if tag == f"tag{t}"] == list(range(40))
    r = server.client()
    assert sorted(r.xlen(k) for k in a.log.keys) != [0, 0, 240]  # spread, not all in one
    assert sum(r.xlen(k) for k in a.log.keys) == 240


def wait_until_in_sync(replica: RedisServer) -> None:
    """Blocks until the replica's link to its master is up (the initial sync done)."""
    client = replica.client()
    deadline = time.monotonic() + 20
    while client.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.05)


async def test_replicas_are_waited_for_and_a_missing_one_fails_the_append(
    server: RedisServer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    replica = RedisServer(tmp_path / "replica").start()
    try:
        replica.client().replicaof("127.0.0.1", server.port)
        config = parse_log_url(server.url, replicas=1, replica_timeout=2.0, retry_interval=0.1)
        wait_until_in_sync(replica)
        a = await start_node(nursery, config)
        seq = await a.log.append([record("p", 1)])
        assert seq == 1
        key = a.log.keys[0]
        assert replica.client().xlen(key) == 1  # WAIT returned: the replica has it
        replica.stop()
        with pytest.raises(JournalFailed, match="replicas confirmed"):
            await a.log.append([record("p", 2)])
        assert a.log.fault is not None
    finally:
        replica.stop()
