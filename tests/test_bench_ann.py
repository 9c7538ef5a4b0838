"""The ANN and crossover benchmarks, run end to end in their ``--quick`` mode.

Checks that each does its job (well-formed results, ours measured, hnswlib measured when it
is installed, ratios consistent with the figures), never a timing threshold.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from .test_bench_perf import run_bench


def _rows(results: Path, name: str) -> dict[str, dict]:
    doc = json.loads((results / f"{name}.json").read_text())
    assert doc["name"] == name and doc["rows"]
    for r in doc["rows"]:
        assert set(r) == {"name", "ours", "peer", "ratio", "unit", "params"}
    return {r["name"]: r for r in doc["rows"]}


def test_ann_quick_measures_ours_and_hnswlib(tmp_path: Path) -> None:
    proc = run_bench("ann", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(tmp_path, "ann")
    have_peer = importlib.util.find_spec("hnswlib") is not None
    for name in ("qps_at_recall_0.95", "update_rate", "build_rate"):
        r = rows[name]
        assert isinstance(r["ours"], int | float) and r["ours"] > 0, r
        if have_peer:
            assert r["peer"] is not None and r["peer"] > 0, r
            assert math.isclose(r["ratio"], r["ours"] / r["peer"], rel_tol=1e-6)
        else:
            assert "SKIPPED peer hnswlib" in proc.stdout
    recall_rows = [r for n, r in rows.items() if n.startswith("recall_after_moves")]
    assert recall_rows and all(0 < r["ours"] <= 1 for r in recall_rows)


def test_crossover_quick_compares_scan_and_index(tmp_path: Path) -> None:
    proc = run_bench("crossover", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(tmp_path, "crossover")
    sizes = [r for n, r in rows.items() if n.startswith("qps@n=")]
    assert len(sizes) == 2
    for r in sizes:
        assert r["ours"] > 0 and r["peer"] > 0
        assert r["params"]["recall"] >= 0.95
    assert "crossover catalog size" in rows
