"""Crash safety: a real server process killed with SIGKILL under acknowledged ingest.

After each kill the data directory is recovered as a restart would: every acknowledged event
must be applied, and none twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel

from engine import ModelConfig
from engine._server import Server

from .conftest import running_server, server_config

USERS = 40

# httpx leaves a request-body generator to the garbage collector when the server dies
# mid-request (that is the point here); the warning is about the client, not the engine.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object ByteStream:"
        "pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream:ResourceWarning"),
]


def _start(data_dir: Path, config: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--http",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "dashboard and API:" in line:
            return proc, line.split("API:")[1].strip().rstrip("/")
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("server did not start")


async def _produce(url: str, acked: set[int], sent: list[int], stop: trio.Event) -> None:
    """Posts batches of unique events until the server dies; records acknowledged ids."""
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            ids = [next(counter) for _ in range(25)]
            sent.extend(ids)
            events = [
                {"user": f"u{n % USERS}", "item": f"i{n}", "id": n, "type": "click"} for n in ids
            ]
            try:
                r = await client.post("/v1/events", json=events)
            except httpx.HTTPError:
                return
            if r.status_code == 202:
                acked.update(ids)

    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(worker, client)


def _recover(data_dir: Path) -> Server:
    server = Server(server_config(data_dir))
    journal, _ = server._recover()
    journal.close()
    return server


@pytest.mark.parametrize(
    "moment", ["random-1", "random-2", "random-3", "during-snapshot", "during-rotation"]
)
async def test_sigkill_loses_no_acknowledged_event_and_applies_none_twice(
    tmp_path: Path, moment: str
) -> None:
    config = tmp_path / "recstream.toml"
    config.write_text("snapshot_interval = 0.05\nwal_segment_bytes = 8192\n[model]\ndim = 16\n")
    data_dir = tmp_path / "data"
    rng = random.Random(moment)
    acked: set[int] = set()
    sent: list[int] = []
    proc, url = _start(data_dir, config)
    stop = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_produce, url, acked, sent, stop)
            await trio.sleep(0.3)
            if moment == "during-snapshot":
                # The snapshot is written to a temp file, then renamed: kill while it exists.
                with trio.fail_after(30):
                    while not (data_dir / "snapshot.rsnap.tmp").exists():
                        await trio.lowlevel.checkpoint()
            elif moment == "during-rotation":
                wal = data_dir / "wal"
                before = set(wal.glob("wal-*.log"))
                with trio.fail_after(30):
                    while not set(wal.glob("wal-*.log")) - before:
                        await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(rng.uniform(0.1, 1.0))
            os.kill(proc.pid, signal.SIGKILL)
            stop.set()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert len(acked) > 50, "the trial should have acknowledged a fair number of events"

    server = _recover(data_dir)
    model = server.model
    seen: dict[int, str] = {}
    for u in range(USERS):
        for item in model.seen(f"u{u}"):
            seen[int(item[1:])] = f"u{u}"
    missing = acked - seen.keys()
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    assert set(seen) <= set(sent)
    # Every event has its own item, so each application adds exactly one seen item:
    # an event applied twice would make the counter exceed the seen items.
    assert model.stats()["events_applied"] == len(seen)
    for n, user in list(seen.items())[:50]:
        assert user == f"u{n % USERS}"


async def test_restart_applies_the_new_model_settings(tmp_path: Path) -> None:
    """Settings stored in the snapshot give way to the configured ones on restart."""
    data_dir = tmp_path / "data"
    old = ModelConfig(dim=16, seed=5, auto_reindex=False, max_frame_bytes=1 << 20)
    async with running_server(data_dir, model=old) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json={"user": "a", "item": "x", "type": "share"})
            assert r.status_code == 422  # not a configured type yet
            r = await http.post("/v1/events", json={"user": "a", "item": "x", "type": "click"})
            await server.wait_applied(r.json()["seq"])
        # Shutdown takes a snapshot: the restart loads it.
    weights = {**old.event_weights, "share": 5.0}
    new = ModelConfig(
        dim=16,
        seed=5,
        auto_reindex=False,
        event_weights=weights,
        max_frame_bytes=1 << 16,
        decay_half_life=3600.0,
        ef_search=32,
    )
    async with running_server(data_dir, model=new) as server:
        assert server.snapshot_seq > 0
        running = server.model.config()
        assert running["event_weights"] == weights
        assert running["max_frame_bytes"] == 1 << 16
        assert (running["decay_half_life"], running["ef_search"]) == (3600.0, 32)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json={"user": "a", "item": "y", "type": "share"})
            assert r.status_code == 202
            await server.wait_applied(r.json()["seq"])
        assert set(server.model.seen("a")) == {"x", "y"}


def test_a_setting_that_cannot_change_refuses_the_start_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "recstream.toml"
    config.write_text("[model]\ndim = 16\n")
    proc, url = _start(data_dir, config)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/events", json={"user": "a", "item": "x"}).status_code == 202
            assert http.post("/v1/admin/snapshot").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.stdout is not None
        proc.stdout.close()
    config.write_text("[model]\ndim = 24\n")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--config", str(config)]
        + ["--data-dir", str(data_dir), "--http", "127.0.0.1:0", "--forward", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("recstream: ") and "dim is 16 in the snapshot and 24" in last, last
    assert "Traceback" not in done.stderr
