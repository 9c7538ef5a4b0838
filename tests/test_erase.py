"""Erasure end to end: a real server process, an erase over HTTP, SIGKILL, recovery.

After the erase the user must be gone from the model *and* from every byte in the data
directory (journal segments and snapshots), while other users are untouched.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from engine import JournalClosed
from engine._erasure import EraseActor

from .conftest import running_server
from .connectors.test_forward import forward, packed, send_acked
from .test_recovery import _recover, _start

ERASED = "erase-me-7f3a"
KEPT = "keep-me-51c2"


def _bytes_on_disk(data_dir: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(data_dir.rglob("*")) if p.is_file()]


def _events(user: str, items: range, tag: str) -> list[dict[str, object]]:
    return [{"user": user, "item": f"{tag}{n}", "type": "click"} for n in items]


def test_erased_user_survives_nowhere(tmp_path: Path) -> None:
    config = tmp_path / "recstream.toml"
    # Small segments: the user's events span several of them.
    config.write_text("wal_segment_bytes = 2048\n[model]\ndim = 16\n")
    data_dir = tmp_path / "data"
    proc, url = _start(data_dir, config)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            for n in range(6):
                batch = _events(ERASED, range(n * 4, n * 4 + 4), "i")
                batch += _events(KEPT, range(n * 3, n * 3 + 5), "i")
                assert http.post("/v1/events", json=batch).status_code == 202
            assert http.post("/v1/admin/snapshot").status_code == 200
            # Some of the user's events only in the journal after the snapshot, and one
            # mixed frame whose other user's events must survive the rewrite.
            mixed = _events(ERASED, range(40, 43), "i") + _events(KEPT, range(40, 43), "i")
            assert http.post("/v1/events", json=mixed).status_code == 202
            seen_before = http.get(f"/v1/users/{KEPT}/recommendations?k=5").json()
            assert http.delete(f"/v1/users/{ERASED}").status_code == 200
            # Events after the erase by other users keep flowing.
            r = http.post("/v1/events", json=_events(KEPT, range(50, 52), "i"))
            assert r.status_code == 202
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    files = _bytes_on_disk(data_dir)
    assert any(p.name.startswith("wal-") for p, _ in files)
    assert any(p.suffix == ".rsnap" for p, _ in files)
    leaks = [str(p.relative_to(data_dir)) for p, b in files if ERASED.encode() in b]
    assert not leaks, f"the erased user's id is still on disk in {leaks}"
    assert any(KEPT.encode() in b for p, b in files if p.name.startswith("wal-"))

    model = _recover(data_dir).model
    assert model.user_vector(ERASED) is None
    assert model.seen(ERASED) == []
    kept = set(model.seen(KEPT))
    expected = {f"i{n}" for k in range(6) for n in range(k * 3, k * 3 + 5)}
    assert kept == expected | {"i40", "i41", "i42", "i50", "i51"}
    assert model.user_vector(KEPT) is not None
    for rec in model.recommend(KEPT, k=10, explain=True):
        assert ERASED not in rec[2]
    assert seen_before["items"]


async def test_forward_erase_record_is_completed_on_disk(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_server(data_dir) as server:
        recs = _events(ERASED, range(5), "i") + _events(KEPT, range(3, 8), "i")
        seq = await send_acked(server, [packed(recs, chunk="a", members=2)], ["a"])
        await server.engine.wait_applied(seq)
        await server.engine.take_snapshot()
        seq = await send_acked(server, [forward([{"erase_user": ERASED}], chunk="b")], ["b"])
        await server.engine.wait_applied(seq)
        with trio.fail_after(10):
            await server.engine.wait_erased(ERASED)
        assert server.engine.model.seen(ERASED) == []
        assert [p for p, b in _bytes_on_disk(data_dir) if ERASED.encode() in b] == []
        assert set(server.engine.model.seen(KEPT)) == {f"i{n}" for n in range(3, 8)}
    async with running_server(data_dir) as server:
        assert server.engine.model.user_vector(ERASED) is None
        assert set(server.engine.model.seen(KEPT)) == {f"i{n}" for n in range(3, 8)}


async def test_an_interrupted_erasure_is_completed_after_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"

    async def interrupted(self: EraseActor, pending: dict[object, int]) -> None:
        raise JournalClosed("simulated crash before the snapshot and the rewrite")

    with monkeypatch.context() as m:
        m.setattr(EraseActor, "_complete", interrupted)
        async with running_server(data_dir) as server:
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                events = _events(ERASED, range(4), "i") + _events(KEPT, range(4), "i")
                await http.post("/v1/events", json=events)
                assert (await http.post("/v1/admin/snapshot")).status_code == 200
                r = await http.post("/v1/events", json={"erase_user": ERASED})
                await server.engine.wait_applied(r.json()["seq"])
    # The model forgot the user, but the disk still holds them: the erasure is unfinished.
    assert any(ERASED.encode() in b for _, b in _bytes_on_disk(data_dir))

    async with running_server(data_dir) as server:
        with trio.fail_after(10):
            while server.engine.erased_through == 0:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.01)
        assert server.engine.model.user_vector(ERASED) is None
        assert set(server.engine.model.seen(KEPT)) == {f"i{n}" for n in range(4)}
    assert [p for p, b in _bytes_on_disk(data_dir) if ERASED.encode() in b] == []


async def test_erasure_removes_the_users_event_ids_from_the_snapshots(tmp_path: Path) -> None:
    """The redelivery window remembers event ids; the erased user's must go with them."""
    data_dir = tmp_path / "data"
    erased_ids = [f"evt-{ERASED}-{n}" for n in range(4)]
    kept_ids = [f"evt-kept-{n}" for n in range(3)]
    async with running_server(data_dir) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            events = [
                {"user": "u-a", "item": f"i{n}", "id": eid} for n, eid in enumerate(erased_ids)
            ]
            events += [{"user": KEPT, "item": f"i{n}", "id": eid} for n, eid in enumerate(kept_ids)]
            assert (await http.post("/v1/events", json=events)).status_code == 202
            assert (await http.post("/v1/admin/snapshot")).status_code == 200
            r = await http.delete("/v1/users/u-a")
            assert r.status_code == 200 and r.json()["erased"] is True
        snapshots = [b for p, b in _bytes_on_disk(data_dir) if p.suffix == ".rsnap"]
        assert len(snapshots) == 2
        for eid in erased_ids:
            assert not any(eid.encode() in b for b in snapshots), eid
        for eid in kept_ids:
            assert all(eid.encode() in b for b in snapshots), eid


async def test_erasing_an_unknown_user_is_404_and_writes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_server(data_dir) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json=_events(KEPT, range(3), "i"))
            await server.engine.wait_applied(r.json()["seq"])
            await server.engine.take_snapshot()
            before = _bytes_on_disk(data_dir)
            snapshots_taken = server.engine.metrics.registry.get_sample_value(
                "recstream_snapshots_total"
            )
            r = await http.delete("/v1/users/never-seen-42")
            assert r.status_code == 404
            assert r.json()["erased"] is False and r.json()["user"] == "never-seen-42"
            assert _bytes_on_disk(data_dir) == before
            assert (
                server.engine.metrics.registry.get_sample_value("recstream_snapshots_total")
                == snapshots_taken
            )
            # A known user is still erased as before.
            r = await http.delete(f"/v1/users/{KEPT}")
            assert r.status_code == 200 and r.json()["erased"] is True


async def test_a_forward_erase_of_an_unknown_user_rewrites_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as server:
        snapshots = server.engine.metrics.registry.get_sample_value("recstream_snapshots_total")
        seq = await send_acked(server, [forward([{"erase_user": "nobody-9"}], chunk="e")], ["e"])
        await server.engine.wait_applied(seq)
        # The applied group was reported before wait_applied returned: an erasure would be
        # queued or under way now.
        assert server.engine.erasure is not None
        assert server.engine.erasure.queued("nobody-9") == 0
        assert server.engine.erased_through == 0
        assert (
            server.engine.metrics.registry.get_sample_value("recstream_snapshots_total")
            == snapshots
        )
