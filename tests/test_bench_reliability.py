"""The reliability benchmark, run end to end in its ``--quick`` mode.

It runs as a subprocess (the way anyone runs it) writing to a temporary results directory.
The checks are about the benchmark doing its job -- a well-formed result file whose drills
ran and whose invariants held -- never a timing threshold: the machine may be loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import _core

ROOT = Path(__file__).resolve().parent.parent
RELEASE = getattr(_core, "BUILD_PROFILE", None) == "release"


def test_reliability_refuses_a_debug_build(tmp_path: Path) -> None:
    code = (
        "import sys, engine._core as c; c.BUILD_PROFILE = 'debug'; "
        "from bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "RECSTREAM_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, "reliability", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "debug build" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not RELEASE, reason="benchmarks refuse a debug build")
def test_reliability_quick_run_holds_its_invariants(tmp_path: Path) -> None:
    env = {**os.environ, "RECSTREAM_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "reliability", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "reliability.json").read_text())
    assert doc["name"] == "reliability" and doc["params"]["quick"] is True
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) >= {
        "kill9_acked_lost",
        "kill9_applied_twice",
        "io_fault_acked_lost",
        "io_fault_recovery_max",
        "fuzz_crashes",
        "fuzz_rss_growth",
        "stuck_readers_p99",
        "stuck_released_after",
    }
    for r in doc["rows"]:
        assert set(r) == {"name", "ours", "peer", "ratio", "unit", "params"}
    assert all(v == 0 for v in doc["invariants"].values()), doc["invariants"]
    # The drills really ran: events acknowledged and killed, faults injected and refused,
    # frames and messages sent, subscribers measured.
    assert doc["kill"]["trials"] == 3 and doc["kill"]["acked"] > 0
    assert doc["kill"]["server_cpu_s"] > 0
    for drill in doc["faults"]["per_drill"]:
        assert drill["injected"] >= 1 and drill["readyz_during"].startswith("503")
        assert drill["acked_after_clear"] > 0
    assert doc["fuzz"]["frames"] == 2000 and doc["fuzz"]["ws"]["messages"] == 200
    assert doc["fuzz"]["valid"] == 20
    assert doc["stuck"]["alone"]["samples"] > 0 and doc["stuck"]["with_stuck"]["samples"] > 0
    assert doc["stuck"]["with_stuck"]["stuck_released"] == 5
