"""I/O faults in the journal and snapshot paths: refused, reported, survived, recovered.

Faults are injected through ``FaultyFileOps`` at the k-th write or sync (EIO, ENOSPC), and one
through the real snapshot writer (its temporary file's path is taken by a directory). What must
hold: nothing unpersisted is acknowledged, reads keep working, ``/readyz`` and ``/metrics``
report the fault, and once it clears new events are acknowledged again.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from connectors import Node
from engine import Model, recover
from engine._exceptions import JournalFailed
from engine._journal import FaultyFileOps, Journal

from .conftest import server_config

ERRORS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}


def _event(n: int) -> dict[str, Any]:
    return {"user": f"u{n % 7}", "item": f"i{n}", "id": n, "type": "click"}


def _metric(text: str, name: str, what: str) -> float:
    m = re.search(rf'^{name}{{what="{what}"}} (\S+)$', text, re.M)
    assert m is not None, f"{name}{{what={what}}} missing from /metrics"
    return float(m.group(1))


def _seen_items(model: Model) -> set[int]:
    return {int(item[1:]) for u in range(7) for item in model.seen(f"u{u}")}


async def _wait_ready(http: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        while (await http.get("/readyz")).status_code != 200:  # noqa: ASYNC110 - polling
            await trio.sleep(0.05)


# --- the journal alone ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["write", "sync"])
def test_journal_cuts_unsynced_records_after_a_fault_and_resumes(tmp_path: Path, kind: str) -> None:
    ops = FaultyFileOps(scope=tmp_path)
    journal, _ = Journal.open(tmp_path, ops=ops, segment_bytes=200)
    journal.append([b"a" * 40, b"b" * 40])
    journal.sync()
    kept_files = journal.segment_files()
    # The next batch crosses a rollover: the fault may land on the old or the new segment.
    ops.fail_at[kind] = ops.calls[kind] + 2
    with pytest.raises(OSError) as info:
        journal.append([b"c" * 40] * 6)
        journal.sync()
    assert info.value.errno == errno.EIO
    assert journal.fault is not None
    journal.append([b"d" * 40])  # repairs first: cut back to seq 2, then seq 3 is "d"
    assert journal.repairs == 1 and journal.fault is None
    journal.sync()
    assert journal.last_seq == 3
    journal.close()

    journal, report = Journal.open(tmp_path)
    assert report.reason is None
    assert [p for _, p in journal.replay()] == [b"a" * 40, b"b" * 40, b"d" * 40]
    assert journal.segment_files()[: len(kept_files)] == kept_files
    journal.close()


def test_journal_refuses_writes_while_the_repair_fails(tmp_path: Path) -> None:
    ops = FaultyFileOps(scope=tmp_path, fail_at={"sync": 2}, error=errno.ENOSPC, sticky=True)
    journal, _ = Journal.open(tmp_path, ops=ops)
    journal.append([b"kept"])
    journal.sync()  # sync #1
    journal.append([b"lost"])
    for _ in range(3):  # the sync, then repairs that need a sync themselves
        with pytest.raises(OSError) as info:
            journal.append([b"x"]) if journal.fault else journal.sync()
        assert info.value.errno == errno.ENOSPC
    ops.clear()
    journal.append([b"after"])
    journal.sync()
    assert [p for _, p in journal.replay()] == [b"kept", b"after"]
    journal.close()


# --- a live server ---------------------------------------------------------------------------


@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
@pytest.mark.parametrize(
    ("kind", "apply_before_sync"), [("write", True), ("write", False), ("sync", False)]
)
@pytest.mark.parametrize("k", [1, 3])
async def test_journal_fault_is_refused_reported_and_recovered(
    tmp_path: Path, kind: str, apply_before_sync: bool, error: str, k: int
) -> None:
    """A write fault, or a sync fault in the strict order: nothing reached the model yet."""
    data_dir = tmp_path / "data"
    ops = FaultyFileOps(scope=data_dir / "wal", error=ERRORS[error], sticky=True)
    server = Node(server_config(data_dir, apply_before_sync=apply_before_sync), file_ops=ops)
    acked: set[int] = set()
    refused: set[int] = set()
    n = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:

            async def post() -> int:
                nonlocal n
                ids = [n, n + 1]
                n += 2
                r = await http.post("/v1/events", json=[_event(i) for i in ids])
                (acked if r.status_code == 202 else refused).update(ids)
                return r.status_code

            assert await post() == 202
            ops.fail_at[kind] = ops.calls.get(kind, 0) + k
            statuses = [await post() for _ in range(k + 1)]
            assert statuses[-1] == 503, statuses
            assert 202 not in statuses[statuses.index(503) :]
            r = await http.post("/v1/events", json=[_event(10_000)])
            assert r.status_code == 503 and error in r.json()["error"]

            # Reads keep working; the fault is reported.
            assert (await http.get("/v1/users/u1/recommendations")).status_code == 200
            assert (await http.get("/v1/stats")).status_code == 200
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and f"journal {error}" in ready.text
            metrics = (await http.get("/metrics")).text
            assert _metric(metrics, "recstream_storage_fault", "journal") == 1
            assert _metric(metrics, "recstream_io_errors_total", "journal") >= 1

            ops.clear()
            await _wait_ready(http)  # the actor retries the repair on its own
            assert await post() == 202
            metrics = (await http.get("/metrics")).text
            assert _metric(metrics, "recstream_storage_fault", "journal") == 0
            await server.engine.wait_applied(server.engine.stats()["wal_seq"])
            assert acked <= _seen_items(server.engine.model)
            assert not refused & _seen_items(server.engine.model)
        server.shutdown()

    # What a restart recovers: every acknowledged event, none of the refused ones.
    restarted = recover(server_config(data_dir)).model
    assert _seen_items(restarted) == acked
    assert restarted.stats()["events_applied"] == len(acked)


@pytest.mark.parametrize(("error", "sticky"), [("EIO", False), ("ENOSPC", True)])
async def test_sync_fault_after_apply_stops_the_node_and_recovers_the_durable_records(
    tmp_path: Path, error: str, sticky: bool
) -> None:
    """Applied before its sync failed: the model holds what the log cuts, so the node stops
    (``run`` raises) instead of serving it, and a restart holds every acknowledged event
    once; the snapshot taken before the fault covers only durable records. The refused
    events are cut before the node stops when the disk allows it (a one-off fault); when
    it refuses the cut too, a restart may replay them (never acknowledged, never twice)."""
    data_dir = tmp_path / "data"
    ops = FaultyFileOps(scope=data_dir / "wal", error=ERRORS[error], sticky=sticky)
    server = Node(server_config(data_dir, apply_before_sync=True), file_ops=ops)
    acked: set[int] = set()
    refused: set[int] = set()
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                for n in range(0, 20, 2):
                    r = await http.post("/v1/events", json=[_event(n), _event(n + 1)])
                    assert r.status_code == 202
                    acked.update((n, n + 1))
                last_acked = r.json()["seq"]
                assert await server.engine.take_snapshot() == last_acked
                ops.fail_at["sync"] = ops.calls.get("sync", 0) + 1
                try:
                    r = await http.post("/v1/events", json=[_event(100), _event(101)])
                    assert r.status_code == 503, r.text
                except httpx.TransportError:
                    pass  # the node stopped before it answered
                refused.update((100, 101))
                with trio.fail_after(10):
                    await trio.sleep_forever()  # run() must raise
    assert info.value.subgroup(JournalFailed) is not None, info.value
    assert server.engine.snapshot_seq == last_acked

    ops.clear()
    restarted = recover(server_config(data_dir)).model
    seen = _seen_items(restarted)
    if sticky:
        assert acked <= seen <= acked | refused
    else:
        assert seen == acked
    assert restarted.stats()["events_applied"] == len(seen)


async def test_snapshot_fault_keeps_the_journal_and_clears(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ops = FaultyFileOps(scope=data_dir, fail_at={"snapshot": 1}, sticky=True)
    server = Node(server_config(data_dir, snapshot_interval=0.05), file_ops=ops)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json=[_event(i) for i in range(5)])
            assert r.status_code == 202
            with trio.fail_after(10):
                while server.engine.snapshot_fault is None:  # noqa: ASYNC110 - no event to wait on
                    await trio.sleep(0.02)
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "snapshot" in ready.text
            metrics = (await http.get("/metrics")).text
            assert _metric(metrics, "recstream_storage_fault", "snapshot") == 1
            # Ingest goes on: the journal holds everything the snapshot would have.
            r = await http.post("/v1/events", json=[_event(i) for i in range(5, 9)])
            assert r.status_code == 202
            assert server.engine.snapshot_seq == 0
            ops.clear()
            await _wait_ready(http)
            assert server.engine.snapshot_seq > 0
        server.shutdown()


async def test_real_snapshot_writer_failure_is_survived(tmp_path: Path) -> None:
    """The extension's own writer fails for real: its temporary file's path is a directory."""
    data_dir = tmp_path / "data"
    async with (
        trio.open_nursery() as nursery,
    ):
        server = Node(server_config(data_dir))
        await nursery.start(server.run)
        blocker = data_dir / "snapshot.rsnap.tmp"
        blocker.mkdir()
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            assert (await http.post("/v1/events", json=[_event(1)])).status_code == 202
            r = await http.post("/v1/admin/snapshot")
            assert r.status_code >= 500
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "snapshot" in ready.text
            assert (await http.get("/v1/users/u1/recommendations")).status_code == 200
            blocker.rmdir()
            await server.engine.take_snapshot()
            assert (await http.get("/readyz")).status_code == 200
        server.shutdown()
