"""``python -m bench scale --quick`` end to end: real nodes, real Redis, a results file.

Checks that the benchmark does its job (every figure measured, the local-journal peer too,
ratios consistent), never a timing threshold: the machine may be loaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import _core

from .redis_harness import require_redis

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(_core.BUILD_PROFILE != "release", reason="benchmarks refuse debug builds")
def test_scale_quick_measures_replicas_against_the_local_journal(tmp_path: Path) -> None:
    require_redis()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "scale", "--quick"],
        cwd=ROOT,
        env={**os.environ, "RECSTREAM_BENCH_RESULTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {
        f"{m}_{n}_nodes"
        for n in (1, 2)
        for m in ("acked_events_per_s", "event_to_push_p50", "event_to_push_p99")
    }
    for r in rows.values():
        assert r["ours"] > 0 and r["peer"] > 0 and math.isfinite(r["ratio"]), r
    assert math.isclose(
        rows["acked_events_per_s_2_nodes"]["ratio"],
        rows["acked_events_per_s_2_nodes"]["ours"] / rows["acked_events_per_s_2_nodes"]["peer"],
    )
    runs = doc["runs"]
    assert [(r["log"], r["nodes"]) for r in runs] == [("journal", 1), ("redis", 1), ("redis", 2)]
    assert all(r["events"] == 3000 and r["pushes"] > 0 for r in runs)
    assert doc["estimate"]["events_per_s_per_core_any_n"] > 0


@pytest.mark.skipif(_core.BUILD_PROFILE != "release", reason="benchmarks refuse debug builds")
def test_scale_clients_quick_measures_both_redis_clients(tmp_path: Path) -> None:
    require_redis()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "scale", "--clients", "--quick"],
        cwd=ROOT,
        env={**os.environ, "RECSTREAM_BENCH_RESULTS": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "scale_clients.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"xadd_pipeline_round_trip_ms", "xread_block_wake_ms", "client_cpu_s"}
    for r in rows.values():
        assert r["ours"] > 0, r
        if r["peer"] is not None:  # coredis is a benchmark peer: measured when installed
            assert math.isclose(r["ratio"], r["peer"] / r["ours"]), r
