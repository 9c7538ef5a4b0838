"""The log seam (``engine.Log``): the engine runs on any log, not only the local journal.

``SharedLog`` below is a log several engines in one process share (records in a list, as a
stream server would hold them): what one engine appends, every engine applies, and an engine
that starts later catches up before it serves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from connectors import Node
from engine import Appended, Engine, JournalClosed, JournalLog, Log, ModelConfig, json_to_frame
from engine._events import journal_record

from .conftest import server_config


class _Records:
    """The shared storage: payloads in order; waiters wake on every append."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.appended = trio.Event()

    def add(self, payloads: Sequence[bytes]) -> int:
        self.payloads.extend(payloads)
        self.appended.set()
        self.appended = trio.Event()
        return len(self.payloads)


class SharedLog:
    """A :class:`engine.Log` over :class:`_Records` (its seq is the record's index + 1)."""

    replicated = True

    def __init__(self, records: _Records, *, group: int = 1 << 30) -> None:
        self.records = records
        self.group = group  # records per forwarded group
        self.fault: str | None = None
        self.forwarded = 0
        self._forwarded = trio.Event()
        self._closed = trio.Event()
        self.checkpoints: list[int] = []
        self.erased: list[dict[Any, int]] = []

    async def run(
        self,
        output: trio.MemorySendChannel[Appended],
        *,
        after_seq: int,
        after_position: bytes,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.forwarded = after_seq
        async with output:
            await self._forward(output)
            task_status.started()
            while not self._closed.is_set():
                with trio.move_on_after(0.05):
                    await self.records.appended.wait()
                await self._forward(output)

    async def _forward(self, output: trio.MemorySendChannel[Appended]) -> None:
        while new := self.records.payloads[self.forwarded : self.forwarded + self.group]:
            first = self.forwarded + 1
            self.forwarded += len(new)
            await output.send(Appended(first, tuple(new)))
            self._forwarded.set()
            self._forwarded = trio.Event()

    async def append(self, payloads: Sequence[bytes]) -> int:
        if self._closed.is_set():
            raise JournalClosed("closed")
        seq = self.records.add(payloads)
        while self.forwarded < seq:
            await self._forwarded.wait()
        return seq

    async def checkpoint(self, seq: int, position: bytes) -> None:
        self.checkpoints.append(seq)

    async def erase(self, users: Mapping[Any, int]) -> int:
        self.erased.append(dict(users))
        return 0

    async def wait_durable(self, seq: int) -> None:
        pass  # records are forwarded once stored

    def stats(self) -> dict[str, Any]:
        head = len(self.records.payloads)
        return {"log": "shared", "position": b"", "head": head, "lag": head - self.forwarded}

    async def aclose(self) -> None:
        self._closed.set()


def test_both_logs_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(JournalLog(tmp_path / "wal"), Log)
    assert isinstance(SharedLog(_Records()), Log)


async def test_engines_on_a_shared_log_apply_each_others_events(tmp_path: Path) -> None:
    records = _Records()
    first_log, second_log = SharedLog(records), SharedLog(records)
    first = Node(server_config(tmp_path / "a"), log=first_log)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json=[{"user": "u1", "item": "i1"}])
            assert r.status_code == 202 and r.json()["seq"] == 1
        # A second engine starting later catches up before it serves ...
        second = Engine(server_config(tmp_path / "b"), log=second_log)
        await nursery.start(second.run)
        assert second.model.seen("u1") == ["i1"]
        # Replicas solve per record, so their models do not depend on how they grouped it.
        assert second.model.config()["coalesce_records"] is False
        assert Engine(server_config(tmp_path / "c")).model.config()["coalesce_records"] is True
        # ... and applies what the first appends afterwards, and the other way round.
        seq = await second.submit(json_to_frame({"user": "u2", "item": "i2"}, "t", 1)[0], "test")
        assert seq == 2
        with trio.fail_after(10):
            await first.engine.wait_applied(2)
        assert first.engine.model.seen("u2") == ["i2"]
        stats = first.engine.stats()
        assert stats["log"]["log"] == "shared" and stats["wal_seq"] == 2
        assert stats["log"]["position"] == ""  # bytes as hex: /v1/stats is JSON
        async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as http:
            assert (await http.get("/v1/stats")).json()["log"]["head"] == 2
        assert stats["applied_seq"] == 2
        first.shutdown()
        second.shutdown()
    # Shutdown took a snapshot and told the log what it covers.
    assert first_log.checkpoints[-1] == 2 and second_log.checkpoints[-1] == 2


async def test_an_erasure_reaches_the_log(tmp_path: Path) -> None:
    wal = SharedLog(_Records())
    node = Node(server_config(tmp_path / "a"), log=wal)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        async with httpx.AsyncClient(base_url=node.http_url, timeout=10) as http:
            await http.post("/v1/events", json=[{"user": "gone", "item": "i1"}])
            r = await http.delete("/v1/users/gone")
            assert r.status_code == 200 and r.json()["erased"] is True
        assert wal.erased == [{"gone": r.json()["seq"]}]
        node.shutdown()


async def test_the_engine_serves_once_the_catch_up_is_applied_and_links_it_after(
    tmp_path: Path,
) -> None:
    """Serving waits for the model, not for the graph: the caught-up items are linked in the
    background (the exact scan answers meanwhile)."""
    records = _Records()
    frames = [json_to_frame({"user": f"u{n}", "item": f"i{n}"}, "t", 1)[0] for n in range(300)]
    records.add([journal_record(f) for f in frames])
    config = server_config(
        tmp_path / "a", model=ModelConfig(dim=16, seed=5, auto_reindex=False, exact_below=0)
    )
    engine = Engine(config, log=SharedLog(records, group=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert engine.applied_seq == 300
        assert engine.model.stats()["users"] == 300
        with trio.fail_after(10):
            while engine.model.stats()["index_stale"]:  # noqa: ASYNC110 - linked in the background
                await trio.sleep(0.01)
        assert engine.model.stats()["index_size"] == 300
        engine.shutdown()
