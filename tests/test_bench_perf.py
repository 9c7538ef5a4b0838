"""The latency, ingest and mf benchmarks, run end to end in their ``--quick`` mode.

Each runs as a subprocess (the way anyone runs it) writing to a temporary results directory.
The checks are about the benchmark doing its job: well-formed JSON, every figure of ours
measured and positive, each installed peer measured too, ratios consistent with the figures.
Never a timing threshold: the machine may be loaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine import _core

ROOT = Path(__file__).resolve().parent.parent
RELEASE = getattr(_core, "BUILD_PROFILE", None) == "release"


def run_bench(name: str, results: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSTREAM_BENCH_RESULTS": str(results)}
    return subprocess.run(
        [sys.executable, "-m", "bench", name, "--quick", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def load(results: Path, name: str) -> dict[str, Any]:
    doc = json.loads((results / f"{name}.json").read_text())
    assert doc["name"] == name
    assert doc["machine"]["logical_cpus"] >= 1
    assert doc["params"]["quick"] is True
    assert doc["rows"], "no result rows"
    for r in doc["rows"]:
        assert set(r) == {"name", "ours", "peer", "ratio", "unit", "params"}
        assert isinstance(r["ours"], int | float) and math.isfinite(r["ours"]), r
        # A share (of stale lists, of steal) or a wait may be measured as none at all.
        none_ok = r["unit"].startswith("share") or r["name"].endswith("_wait_share")
        assert r["ours"] >= 0 if none_ok else r["ours"] > 0, r
    return doc


def rows_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    names = [r["name"] for r in doc["rows"]]
    assert len(names) == len(set(names)), "duplicate row names"
    return {r["name"]: r for r in doc["rows"]}


def assert_ratio(r: dict[str, Any], *, lower_is_better: bool = False) -> None:
    """The peer was measured, and the ratio is the one its figures give."""
    assert isinstance(r["peer"], int | float) and r["peer"] > 0, r
    expected = r["peer"] / r["ours"] if lower_is_better else r["ours"] / r["peer"]
    assert r["ratio"] == pytest.approx(expected)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


def test_benchmarks_refuse_a_debug_build(results: Path) -> None:
    """Every benchmark checks the build profile first; a debug build is simulated by
    relabelling the loaded extension, since CI only builds release."""
    code = (
        "import sys, engine._core as c; c.BUILD_PROFILE = 'debug'; "
        "from bench.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "RECSTREAM_BENCH_RESULTS": str(results)}
    for name in ("mf", "ann", "crossover", "quality", "ingest", "latency", "recovery", "served"):
        proc = subprocess.run(
            [sys.executable, "-c", code, name, "--quick"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0, name
        assert "refusing to benchmark a debug build" in proc.stderr, (name, proc.stderr)
        assert not (results / f"{name}.json").exists()


needs_release = pytest.mark.skipif(not RELEASE, reason="benchmarks refuse a debug build")


@needs_release
def test_latency_quick(results: Path) -> None:
    proc = run_bench("latency", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = load(results, "latency")
    assert doc["command"] == "python -m bench latency --quick"  # the README table names it
    rows = rows_by_name(doc)
    for sync in ("batch", "off"):
        run = doc["runs"][f"sync_{sync}"]
        # Every subscriber connected, pushes came back and some were timed by their cause id.
        assert run["subscribers"] == doc["params"]["subscribers"]
        assert run["samples"] > 0 and run["pushes"] >= run["samples"]
        assert 0 < run["events_sent"] <= rows[f"sync_{sync}_events_sent"]["peer"]
        assert run["server_push_latency_ms"]["count"] > 0
        assert run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"] <= run["max_ms"]
        for q in ("p50", "p99"):
            assert_ratio(rows[f"sync_{sync}_{q}"], lower_is_better=True)
        assert rows[f"sync_{sync}_p999"]["peer"] is None
        # The load generator's CPU, from its processes, beside the server's.
        assert run["client_processes"] == 1 and run["subscribe_failures"] == {}
        for side in ("server", "client"):
            assert rows[f"sync_{sync}_{side}_cpu_per_push"]["ours"] == pytest.approx(
                1e6 * run[f"{side}_cpu_s"] / run["pushes"]
            )
            assert rows[f"sync_{sync}_{side}_cpu_share"]["unit"] == "cores"
        # The whole machine was busy at least with the server's and the load generator's CPU.
        busy = rows[f"sync_{sync}_machine_busy_share"]["ours"]
        assert busy == run["machine_busy_share"] and busy <= 1
        cpus = rows[f"sync_{sync}_machine_busy_share"]["params"]["cpus"]
        shares = run["server_cpu_share"] + run["client_cpu_share"]
        # /proc/stat samples a state per tick, the processes' times are exact: in a window of
        # a few hundred ticks the two differ by several per cent.
        assert busy * cpus >= 0.75 * shares
        # Steal is part of busy; the server's threads waited for CPUs for some time, not more
        # than every thread waiting all along (the server runs well under 64 threads).
        steal = rows[f"sync_{sync}_machine_steal_share"]["ours"]
        assert 0 <= steal <= busy and steal == run["machine_steal_share"]
        wait = rows[f"sync_{sync}_server_cpu_wait_share"]
        assert wait["unit"] == "cores" and 0 <= wait["ours"] == run["server_cpu_wait_share"] < 64
        # Every websocket was open to the end and closed with a closing handshake.
        assert run["subscribers_open_at_end"] == run["subscribers"]
        assert sum(c["unanswered_closes"] for c in run["closes"]) == 0
        # The staleness oracle swept every subscriber and compared what it could.
        oracle = run["oracle"]
        assert oracle["sweeps"] >= 1 and oracle["errors"] == 0
        assert oracle["compared"] + oracle["skipped_push_newer"] == oracle["gets"]
        assert 0 <= oracle["stale"] <= oracle["differs"] <= oracle["compared"] > 0
        assert rows[f"sync_{sync}_drift_stale_share"]["ours"] == oracle["stale_share"]
        if oracle["episodes"]:
            assert_ratio(rows[f"sync_{sync}_drift_p99"], lower_is_better=True)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (results / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_release
def test_ingest_quick(results: Path) -> None:
    proc = run_bench("ingest", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = load(results, "ingest")
    rows = rows_by_name(doc)
    peer_installed = (
        shutil.which("redis-server") is not None and importlib.util.find_spec("redis") is not None
    )
    for sync in ("batch", "off"):
        assert doc["runs"]["ours"][sync]["acked_events"] > 0
        assert_ratio(rows[f"ingest_sync_{sync}_vs_goal"])
        vs_redis = rows[f"ingest_sync_{sync}_vs_redis"]
        if peer_installed:
            assert_ratio(vs_redis)
        else:
            assert vs_redis["peer"] is None and vs_redis["ratio"] is None
            assert "SKIPPED peer Redis Streams" in proc.stdout
    assert (doc["peer_skipped"] is None) == peer_installed
    # The cheap-model run that shows how much of the bound is the model's.
    assert_ratio(rows["ingest_sync_batch_dim8_vs_goal"])
    assert doc["runs"]["ours_light_model"]["acked_events"] > 0


@needs_release
def test_mf_quick(results: Path) -> None:
    proc = run_bench("mf", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = load(results, "mf")
    rows = rows_by_name(doc)
    for name in (
        "updates_dim64_vs_goal",
        "updates_dim32_vs_goal",
        "updates_dim64_auto_reindex_vs_goal",
        "updates_dim64_small_caps_vs_goal",
    ):
        assert_ratio(rows[name])
    # CPU time was measured (not wall time passed off as per-core figures).
    assert doc["runs"]["dim64"]["cpu_s"] > 0
    assert doc["runs"]["dim64"]["events"] == doc["params"]["stream_events"]
    river = importlib.util.find_spec("river") is not None
    for name in (
        "updates_dim64_vs_river_FunkMF",
        "updates_dim64_vs_river_BiasedMF",
        "updates_dim32_vs_river_FunkMF",
    ):
        if river:
            assert_ratio(rows[name])
        else:
            assert rows[name]["peer"] is None
    assert (doc["peer"] is not None) == river


def test_cpu_wait_is_run_queue_time() -> None:
    """Two busy processes on one CPU: each waits while the other runs, and the reading says
    so; the reading of a process that sleeps hardly moves."""
    from bench._common import cpu_wait_seconds, waited

    spin = [
        sys.executable,
        "-c",
        "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 3: pass",
    ]
    cpu = min(os.sched_getaffinity(0))
    procs = [
        subprocess.Popen(spin, preexec_fn=lambda: os.sched_setaffinity(0, {cpu})) for _ in range(2)
    ]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        time.sleep(0.5)  # all three started
        spinning, asleep = cpu_wait_seconds(procs[0].pid), cpu_wait_seconds(sleeper.pid)
        time.sleep(1.0)
        spun = waited(spinning, cpu_wait_seconds(procs[0].pid))
        slept = waited(asleep, cpu_wait_seconds(sleeper.pid))
    finally:
        for p in (*procs, sleeper):
            p.kill()
            p.wait()
    assert list(spinning) == [procs[0].pid]  # its one thread, named by its id
    # Sharing one CPU, each spinner waited about half of that second.
    assert 0.2 < spun <= 1.0
    assert slept < 0.1
    assert cpu_wait_seconds(procs[0].pid) == {}  # ended: nothing to read, and no error
