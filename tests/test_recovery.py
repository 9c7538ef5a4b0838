"""Crash safety: a real server process killed with SIGKILL under acknowledged ingest.

After each kill the data directory is recovered as a restart would: every acknowledged event
must be applied, and none twice. The trial itself is the one the reliability benchmark runs
thirty times (``bench._reliability.kill_trial``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench._reliability import kill_trial
from bench._reliability import start_server as _start
from engine import ModelConfig, Recovered, recover

from .conftest import running_server, server_config

__all__ = ["_recover", "_start"]  # shared with tests/test_erase.py

# httpx leaves a request-body generator to the garbage collector when the server dies
# mid-request (that is the point here); the warning is about the client, not the engine.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <async_generator object ByteStream:"
        "pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.ByteStream:ResourceWarning"),
]


def _recover(data_dir: Path) -> Recovered:
    """What a restart on ``data_dir`` would recover (the model, the journal's report)."""
    return recover(server_config(data_dir))


@pytest.mark.parametrize(
    ("moment", "seed"),
    [
        ("random", 1),
        ("random", 2),
        ("random", 3),
        ("during-snapshot", 4),
        ("during-rotation", 5),
    ],
)
async def test_sigkill_loses_no_acknowledged_event_and_applies_none_twice(
    tmp_path: Path, moment: str, seed: int
) -> None:
    trial = await kill_trial(tmp_path, moment, seed)
    assert trial.acked > 50, "the trial should have acknowledged a fair number of events"
    assert trial.lost == 0, f"{trial.lost} acknowledged events lost"
    assert trial.applied_twice == 0
    assert trial.foreign == 0, "recovered events that were never sent, or under another user"


async def test_restart_applies_the_new_model_settings(tmp_path: Path) -> None:
    """Settings stored in the snapshot give way to the configured ones on restart."""
    data_dir = tmp_path / "data"
    old = ModelConfig(dim=16, seed=5, auto_reindex=False, max_frame_bytes=1 << 20)
    async with running_server(data_dir, model=old) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json={"user": "a", "item": "x", "type": "share"})
            assert r.status_code == 422  # not a configured type yet
            r = await http.post("/v1/events", json={"user": "a", "item": "x", "type": "click"})
            await server.engine.wait_applied(r.json()["seq"])
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
        assert server.engine.snapshot_seq > 0
        running = server.engine.model.config()
        assert running["event_weights"] == weights
        assert running["max_frame_bytes"] == 1 << 16
        assert (running["decay_half_life"], running["ef_search"]) == (3600.0, 32)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.post("/v1/events", json={"user": "a", "item": "y", "type": "share"})
            assert r.status_code == 202
            await server.engine.wait_applied(r.json()["seq"])
        assert set(server.engine.model.seen("a")) == {"x", "y"}


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
        [sys.executable, "-m", "connectors", "serve", "--config", str(config)]
        + ["--data-dir", str(data_dir), "--http", "127.0.0.1:0", "--forward", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("recstream serve: ") and "dim is 16 in the snapshot and 24" in last, last
    assert "Traceback" not in done.stderr
