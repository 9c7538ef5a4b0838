"""The quality benchmark, the README table and ``bench all``'s discovery of benchmarks."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import _quality, _report
from bench._all import benchmarks

ROOT = Path(__file__).resolve().parent.parent
HEADLINES = [
    f"{m}@{k}/{v}" for k in (100, 10) for v in ("exclude-seen", "seen-kept") for m in ("hr", "ndcg")
]
PEER_MODULES = {
    "popularity": None,
    "item-knn": None,
    "river-funkmf": "river",
    "river-biasedmf": "river",
    "implicit-als": "implicit",
}


# ------------------------------------------------------------------------------- metrics


def test_hit_and_ndcg_of_a_hand_computed_ranking() -> None:
    ranked = [7, 3, 9, 1, 4]
    # Item 9 sits third: inside the top 3, outside the top 2; DCG 1 / log2(4) = 0.5.
    assert _quality.rank_of(ranked, 9) == 2
    assert _quality.hit_and_ndcg(2, 3) == (1.0, 0.5)
    assert _quality.hit_and_ndcg(2, 2) == (0.0, 0.0)
    # First place is a full hit; absent items score nothing at any K.
    assert _quality.hit_and_ndcg(_quality.rank_of(ranked, 7), 1) == (1.0, 1.0)
    assert _quality.rank_of(ranked, 5) is None
    assert _quality.hit_and_ndcg(None, 100) == (0.0, 0.0)
    hr, ndcg = _quality.hit_and_ndcg(_quality.rank_of(ranked, 4), 10)
    assert hr == 1.0 and ndcg == pytest.approx(1 / math.log2(6))


def test_scores_average_per_variant_k_and_user_group() -> None:
    s = _quality.Scores(3)
    s.add({"exclude-seen": 0, "seen-kept": None}, known=True)  # NDCG 1
    s.add({"exclude-seen": 2, "seen-kept": 1}, known=True)  # NDCG 0.5; kept 1/log2(3)
    s.add({"exclude-seen": 20, "seen-kept": 0}, known=False)  # only inside @100
    assert s.mean("exclude-seen", "hr", 10) == pytest.approx(2 / 3)
    assert s.mean("exclude-seen", "hr", 100) == pytest.approx(1.0)
    assert s.mean("exclude-seen", "ndcg", 10) == pytest.approx((1 + 0.5) / 3)
    assert s.mean("exclude-seen", "ndcg", 100) == pytest.approx((1 + 0.5 + 1 / math.log2(22)) / 3)
    assert s.mean("exclude-seen", "hr", 10, "known") == pytest.approx(1.0)
    assert s.mean("exclude-seen", "hr", 10, "new") == pytest.approx(0.0)
    assert s.mean("seen-kept", "ndcg", 10, "known") == pytest.approx((0 + 1 / math.log2(3)) / 2)
    assert s.mean("seen-kept", "hr", 10, "new") == pytest.approx(1.0)


def test_top_k_ranks_best_first_without_seen_or_unknown_items() -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.9, 0.7, 0.3])
    known = np.array([True, True, True, True, True, False])
    # Ties (items 1 and 3) go by id; item 5 is unknown, item 4 is excluded as seen.
    assert _quality.top_k(scores, 4, {4}, known) == [1, 3, 0, 2]
    assert _quality.top_k(scores, 10, None, known) == [1, 3, 4, 0, 2]


def test_split_orders_by_time_and_marks_users_known_at_the_cut() -> None:
    users = np.array([50, 10, 50, 70, 10, 90, 90, 70, 30, 30])
    items = np.array([5, 6, 7, 5, 6, 8, 5, 9, 6, 5])
    ts = np.array([9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    split = _quality.Split(users, items, np.ones(10), ts, fraction=0.7)
    assert split.cut == 7
    assert np.all(np.diff(split.ts) >= 0)
    # Dense ids preserve identity: the same external user maps to the same dense id.
    pairs = set(
        zip(users[np.argsort(ts, kind="stable")].tolist(), split.users.tolist(), strict=True)
    )
    dense = dict(pairs)
    assert len(pairs) == len(set(dense.values())) == len(dense) == 5
    # 10, 50, 70, 90 have events before the cut; 30 appears only after it; 50's later
    # event is in the stream but the user was known at the split.
    assert split.known_user[dense[10]] and split.known_user[dense[50]]
    assert not split.known_user[dense[30]]


def test_eval_positions_are_a_deterministic_sorted_sample() -> None:
    a = _quality.eval_positions(10_000, 500, seed=3)
    assert len(a) == len(set(a.tolist())) == 500 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, _quality.eval_positions(10_000, 500, seed=3))
    assert np.array_equal(_quality.eval_positions(40, 0, seed=3), np.arange(40))


def _tiny_split() -> _quality.Split:
    rng = np.random.default_rng(5)
    n = 3_000
    users = rng.integers(0, 120, n)
    items = (users % 7) * 6 + rng.integers(0, 6, n)  # seven taste groups of six items
    return _quality.Split(users, items, np.ones(n), np.arange(n, dtype=np.float64))


def test_item_knn_scores_by_cosine_of_co_occurrence() -> None:
    split = _quality.Split(
        np.array([0, 0, 1, 1, 2, 2, 3, 4, 5]),
        np.array([0, 1, 0, 1, 0, 2, 9, 0, 1]),
        np.ones(9),
        np.arange(9.0),
        fraction=7 / 9,
    )
    knn = _quality.ItemKNN(split, window=0)
    knn.warm(split)
    knn.learn(4, 0, 1.0, 0.0)
    # c(0,1) = 2, n0 = 4, n1 = 2: cos 2/sqrt(8); c(0,2) = 1, n2 = 1: cos 1/2; item 3 (dense
    # id of 9) never co-occurs and comes last, by popularity alone.
    assert knn.rank(4, 3, {0}) == [1, 2, 3]
    assert knn.rank(5, 3, None) is None  # no items yet: the fallback answers
    # A repeat moves the item to the back of the user's history, without recounting.
    knn.learn(0, 0, 1.0, 0.0)
    assert knn.count[0] == 4 and knn.co[0][1] == 2 and knn.hist[0] == [1, 0]


def test_als_refold_matches_implicits_own_recalculation() -> None:
    pytest.importorskip("implicit")
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    split = _tiny_split()
    with threadpool_limits(1):
        als = _quality.ImplicitALS(split, seed=1, factors=8, regularization=0.1, alpha=2.0)
        als.warm(split)
    user, item = 3, 40
    als.learn(user, item, 1.0, 0.0)
    # implicit's own solver for the same row, against the item factors as fitted (the refold
    # solves the user before it moves the item; the implicit model object is left as fitted).
    row = als.rows[user]
    r = sp.csr_matrix(
        (list(row.values()), (np.zeros(len(row), dtype=int), list(row.keys()))),
        shape=(1, split.n_items),
    )
    expected = np.ravel(als.model.recalculate_user(user, r))
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(als.x[user], expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------- report and all


def test_report_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    doc = {
        "name": "ann",
        "peer": "hnswlib",
        "rows": [{"name": "qps", "ours": 12345.6, "peer": 1000.0, "ratio": 12.3456, "unit": "q/s"}],
    }
    (results / "ann.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    before, after = "# t\n\nintro\n", "\n## next\ntext\n"
    readme.write_text(before + f"{_report.START}\nold table\n{_report.END}" + after)
    args = ["report", "--readme", str(readme), "--results-dir", str(results)]
    from bench.__main__ import main

    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith(before + _report.START) and text.endswith(_report.END + after)
    assert "old table" not in text
    assert "| ann | qps | 12,346 | 1000 (hnswlib) | 12.3× | q/s | `python -m bench ann` |" in text
    assert main(args) == 0
    assert readme.read_text() == text  # deterministic


def test_report_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    from bench.__main__ import main

    assert main(["report", "--readme", str(readme), "--results-dir", str(tmp_path)]) == 1
    assert readme.read_text() == "no markers here\n"


def test_all_discovers_every_registered_benchmark() -> None:
    from bench.__main__ import _MODULES

    found = benchmarks()
    assert "quality" in found and "ann" in found
    assert "all" not in found and "report" not in found
    assert len(found) == len(_MODULES) - 2  # every module but report and all is a benchmark
    assert "--quick" in found["quality"]._option_string_actions


# ------------------------------------------------------------------------- the real run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """``python -m bench quality --quick`` and ``report`` into temporary copies."""
    out = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RECSTREAM_BENCH_RESULTS", None)
    subprocess.run(
        [sys.executable, "-m", "bench", "quality", "--quick", "--results-dir", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    readme = out / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "report",
            "--readme",
            str(readme),
            "--results-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    assert (out / "quality.png").stat().st_size > 0
    doc = json.loads((out / "quality.json").read_text())
    return doc, readme.read_text()


def test_quick_run_reports_every_headline_for_ours_and_each_installed_peer(
    quick_run: tuple[dict, str],
) -> None:
    doc, _ = quick_run
    assert doc["name"] == "quality" and doc["command"] == "python -m bench quality --quick"
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(HEADLINES) | {"updates/s"} <= set(rows)
    for name in HEADLINES:
        r = rows[name]
        assert 0.0 <= r["ours"] <= 1.0
        peers = r["params"]["peers"]
        for peer, module in PEER_MODULES.items():
            if module is None or importlib.util.find_spec(module) is not None:
                assert peers[peer] is not None and 0.0 <= peers[peer] <= 1.0, (name, peer)
            else:
                assert peer in doc["skipped_peers"]
        assert r["peer"] == max(v for v in peers.values() if v is not None)
        assert r["params"]["peer_name"] in peers
        assert r["ratio"] == pytest.approx(r["ours"] / r["peer"])
        # The paired difference is over the same events, so its mean is the difference of means.
        paired = r["params"]["ours_minus_peer"]
        assert paired["mean"] == pytest.approx(r["ours"] - r["peer"]) and paired["se"] >= 0
        for group in ("known_users", "new_users"):
            assert r["params"][group]["recstream"] is not None
    # A hit inside the top 10 is a hit inside the top 100; NDCG never exceeds HR.
    for v in ("exclude-seen", "seen-kept"):
        assert rows[f"hr@10/{v}"]["ours"] <= rows[f"hr@100/{v}"]["ours"]
        assert rows[f"ndcg@100/{v}"]["ours"] <= rows[f"hr@100/{v}"]["ours"]
    # Keeping seen items can only add hits.
    assert rows["hr@100/seen-kept"]["ours"] >= rows["hr@100/exclude-seen"]["ours"]
    rates = rows["updates/s"]["params"]["per_method"]
    assert rates["recstream"] > 0 and all(r is None or r > 0 for r in rates.values())
    assert not [p for p in doc["skipped_peers"] if PEER_MODULES[p] is None]


def test_quick_run_lands_in_the_readme_table(quick_run: tuple[dict, str]) -> None:
    doc, text = quick_run
    table = text[text.index(_report.START) : text.index(_report.END)]
    for r in doc["rows"]:
        assert f"| quality | {r['name']} | " in table
    assert "`python -m bench quality --quick`" in table
    assert text.count(_report.START) == 1


def _quality_run(out: Path, *args: str) -> None:
    """``python -m bench quality ARGS`` in a subprocess, results into ``out``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RECSTREAM_BENCH_RESULTS", None)
    command = [sys.executable, "-m", "bench", "quality", *args, "--results-dir", str(out)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=300)


def test_tune_gives_every_method_the_same_budget_on_the_validation_split(
    tmp_path: Path,
) -> None:
    _quality_run(tmp_path, "--quick", "--tune", "--peers", "popularity,item-knn")
    tune = json.loads((tmp_path / "quality_tune.json").read_text())
    assert tune["budget"] == 3
    for method in ("recstream", "item-knn"):
        trials = tune["trials"][method]
        assert 1 < len(trials) <= tune["budget"]
        # The defaults are the first trial; the tuned settings are the best trial.
        assert trials[0]["params"] == tune["defaults"][method]
        best = max(t["hr@100/exclude-seen"] for t in trials)
        chosen = next(t for t in trials if t["params"] == tune["tuned"][method])
        assert chosen["hr@100/exclude-seen"] == best
    run = json.loads((tmp_path / "quality.json").read_text())
    assert run["tuned"] and run["method_params"]["item-knn"] == tune["tuned"]["item-knn"]
    assert run["command"] == "python -m bench quality --quick --peers popularity,item-knn --tune"


def test_a_headed_tsv_runs_with_every_streamed_event_scored(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 4_000
    users = rng.integers(0, 300, n)
    items = (users % 9) * 10 + rng.integers(0, 10, n)
    lines = ["user\titem\trating\ttime"]
    lines += [
        f"{u}\t{i}\t{1 + (u + i) % 5}\t{t}"
        for t, (u, i) in enumerate(zip(users, items, strict=True))
    ]
    data = tmp_path / "events.tsv"
    data.write_text("\n".join(lines) + "\n")
    _quality_run(tmp_path, "--data", str(data), "--format", "tsv", "--peers", "popularity,item-knn")
    doc = json.loads((tmp_path / f"quality-{tmp_path.name}.json").read_text())
    assert doc["evaluated_events"] == doc["streamed_events"] == n - int(n * 0.9)
    assert doc["source"]["weights"].startswith("every event 1")
    rows = {r["name"]: r for r in doc["rows"]}
    each = rows["hr@100/exclude-seen"]["params"]["ours_minus_each_peer"]
    for peer in ("popularity", "item-knn"):
        for group in ("all", "known", "new"):
            d = each[peer][group]
            assert d is None or d["se"] >= 0
        assert each[peer]["all"]["mean"] == pytest.approx(
            rows["hr@100/exclude-seen"]["ours"]
            - rows["hr@100/exclude-seen"]["params"]["peers"][peer]
        )
