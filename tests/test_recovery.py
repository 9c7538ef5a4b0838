"""Crash safety: a real server process killed with SIGKILL under acknowledged ingest.

After each kill the data directory is recovered as a restart would: every acknowledged event
must be applied, and none twice. The trial itself is the one the reliability benchmark runs
thirty times (``bench._reliability.kill_trial``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._reliability import kill_trial
from bench._reliability import start_server as _start
from engine._server import Server

from .conftest import server_config

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


def _recover(data_dir: Path) -> Server:
    """The server a restart on ``data_dir`` would build, recovered but not started."""
    server = Server(server_config(data_dir))
    journal, _ = server._recover()
    journal.close()
    return server


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
