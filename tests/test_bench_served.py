"""The recovery and served benchmarks in their ``--quick`` mode, and the latency benchmark
driving a server that is already running (``--target``).

Each runs as a subprocess writing to a temporary results directory, as in
``test_bench_perf.py``: the checks are about the benchmark doing its job, never a timing
threshold.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench._common import ServerProcess

from .test_bench_perf import assert_ratio, load, needs_release, rows_by_name, run_bench


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return tmp_path / "results"


@needs_release
def test_recovery_quick(results: Path) -> None:
    proc = run_bench("recovery", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = load(results, "recovery")
    rows = rows_by_name(doc)
    p, runs = doc["params"], doc["runs"]
    # Every journaled event was replayed, once; the snapshot restart replayed only the
    # records after the snapshot and still holds the snapshot's events.
    assert runs["empty"]["records_replayed"] == 0 and runs["empty"]["events_applied"] == 0
    assert runs["journal"]["records_replayed"] == p["events"] // p["frame_events"]
    assert runs["journal"]["events_applied"] == p["events"]
    assert runs["snapshot"]["records_replayed"] == p["behind"] // p["frame_events"]
    assert runs["snapshot"]["events_applied"] == p["snapshot_events"] + p["behind"]
    for name in ("journal", "snapshot"):
        assert 0 < runs[name]["replay_s"] < runs[name]["ready_s"]
        assert runs[name]["cpu_s"] > 0
        assert_ratio(rows[f"restart_{name}_replay_events_per_s_vs_goal"])
        assert rows[f"restart_{name}_replay_events_per_s_vs_goal"]["ours"] == pytest.approx(
            runs[name]["events_replayed"] / runs[name]["replay_s"]
        )
    assert_ratio(rows["restart_snapshot_behind_events_per_s_vs_goal"])


@needs_release
def test_served_quick(results: Path) -> None:
    proc = run_bench("served", results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = load(results, "served")
    rows = rows_by_name(doc)
    runs = doc["runs"]
    assert runs["recommend_warm"]["queries"] == doc["params"]["queries"]
    assert runs["recommend_cold"]["queries"] == doc["params"]["cold"]
    for name in ("recommend_batch", "recommend_batch_json"):
        assert runs[name]["queries"] == doc["params"]["queries"] + doc["params"]["cold"]
    # The batched recompute is held to a goal relative to the raw search of the same run.
    goal = rows["recommend_batch_json_cpu_us_vs_goal"]
    assert goal["ours"] == runs["recommend_batch_json"]["cpu_us"]
    assert goal["peer"] == pytest.approx(1.5 * runs["index_search_batch"]["cpu_us"])
    assert_ratio(goal, lower_is_better=True)
    peer = importlib.util.find_spec("hnswlib") is not None
    for name in (
        "recommend_warm",
        "recommend_cold",
        "recommend_batch",
        "recommend_batch_json",
        "index_search",
    ):
        if peer:
            assert_ratio(rows[f"{name}_qps"])
            assert_ratio(rows[f"{name}_cpu_us"], lower_is_better=True)
        else:
            assert rows[f"{name}_qps"]["peer"] is None
    assert (doc["peer"] == "hnswlib") == peer
    # The push's write is measured against wsproto's framing plus send, on the same messages.
    writes = rows["push_write_cpu_us"]
    assert runs["push_write"]["queries"] == runs["wsproto_write"]["queries"] > 0
    assert writes["ours"] == runs["push_write"]["cpu_us"] > 0
    assert writes["peer"] == runs["wsproto_write"]["cpu_us"] > 0
    assert_ratio(writes, lower_is_better=True)
    # The hand-over around the write: every message went through the publisher, no peer.
    handover = rows["push_handover_cpu_us"]
    assert handover["ours"] == runs["push_handover"]["cpu_us"] > 0
    assert runs["push_handover"]["queries"] == runs["push_write"]["queries"]
    assert handover["peer"] is None


@needs_release
def test_latency_drives_a_running_server(results: Path) -> None:
    key = "bench-target-key"
    config = {"sync": "off", "producer_keys": [key], "snapshot_interval": 3600.0}
    with ServerProcess(config) as server:
        host, port = server.forward_address
        argv = ["--target", server.http_url, "--forward", f"{host}:{port}", "--key", key]
        proc = run_bench("latency", results, *argv)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The server was left running, and it holds the warm-up and the measured events.
        doc = load(results, "latency_target")
        run = doc["runs"]["target"]
        stats = server.stats()
        assert stats["events_applied"] >= doc["params"]["warmup"] + run["events_sent"]
    assert not (results / "latency.json").exists()
    rows = rows_by_name(doc)
    assert doc["params"]["target"] == server.http_url
    assert run["subscribers"] == doc["params"]["subscribers"]
    assert run["samples"] > 0 and run["pushes"] >= run["samples"]
    assert run["server_push_latency_ms"]["count"] > 0
    for q in ("p50", "p99"):
        assert_ratio(rows[f"target_{q}"], lower_is_better=True)
    assert not any(name.startswith("sync_") for name in rows)
    # Its CPU, and how busy its machine was, cannot be read from here.
    assert run["server_cpu_s"] is None and run["machine_busy_share"] is None
    assert run["server_cpu_wait_share"] is None and run["machine_steal_share"] is None
    assert not any(name.startswith("target_machine") for name in rows)
    assert "target_server_cpu_wait_share" not in rows


@needs_release
def test_latency_target_needs_its_forward_listener(results: Path) -> None:
    proc = run_bench("latency", results, "--target", "http://127.0.0.1:9")
    assert proc.returncode != 0
    assert "--target and --forward go together" in proc.stderr
