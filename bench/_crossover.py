"""Where the exact scan stops beating the HNSW index: ``python -m bench crossover``.

The model answers small catalogs by an exact scan (``ModelConfig.exact_below``) and large
ones through the index. This measures both on MF-like vectors over a range of catalog sizes,
single-threaded, and reports the smallest size at which the index (at the beam width that
gives recall@10 ≥ 0.95) answers more queries per second than the scan.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from ._ann import TARGET_RECALL, exact_top_k, mf_vectors
from ._common import require_release, row, write_results

K = 10
EFS = (16, 32, 64, 128)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("crossover", help="exact scan vs HNSW by catalog size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sizes", default="200,500,1000,2000,5000,20000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="sizes 500,2000 and 100 queries")
    p.set_defaults(func=run)


def _qps(fn: Any, n_queries: int) -> float:
    started = time.perf_counter()
    fn()
    return n_queries / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> int:
    require_release()
    from engine._core import Index, exact_search_batch

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.queries = [500, 2000], 100
    rng = np.random.default_rng(args.seed)
    q = mf_vectors(rng, args.queries, args.dim)
    points: list[dict[str, Any]] = []
    for n in sizes:
        x = mf_vectors(rng, n, args.dim)
        truth = exact_top_k(x, q, K)
        scan_qps = _qps(lambda x=x: exact_search_batch(x, q, K), len(q))
        index = Index(args.dim, seed=args.seed)
        index.add(np.arange(n, dtype=np.uint32), x)
        hnsw_qps, hnsw_ef, recall = 0.0, None, 0.0
        for ef in EFS:
            ids, _ = index.search_batch(q, K, ef=ef)  # warm and measure recall
            recall = float(
                np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)])
            )
            if recall >= TARGET_RECALL:
                hnsw_qps = _qps(lambda ef=ef, index=index: index.search_batch(q, K, ef=ef), len(q))
                hnsw_ef = ef
                break
        points.append(
            {"n": n, "scan_qps": scan_qps, "hnsw_qps": hnsw_qps, "ef": hnsw_ef, "recall": recall}
        )
        print(
            f"  n={n:7d}  scan {scan_qps:9.0f} q/s   hnsw {hnsw_qps:9.0f} q/s (ef={hnsw_ef}, recall {recall:.3f})"
        )
    crossover = next((p["n"] for p in points if p["hnsw_qps"] > p["scan_qps"]), None)
    print(
        f"crossover: the index is faster from n={crossover}"
        if crossover
        else "crossover: not reached"
    )
    rows = [
        row(f"qps@n={p['n']}", p["hnsw_qps"], p["scan_qps"], "queries/s (index vs exact scan)", p)
        for p in points
    ]
    rows.append(row("crossover catalog size", crossover, None, "items", {"sizes": sizes}))
    write_results(
        "crossover",
        rows,
        {"command": "python -m bench crossover" + (" --quick" if args.quick else "")},
    )
    return 0
