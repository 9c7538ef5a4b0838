"""ANN benchmark: engine._core.Index against hnswlib on MF-like vectors.

Three questions, each on one core:

1. Static search: QPS and recall@10 over ef, and the QPS ratio at the smallest ef where each
   library first reaches recall >= 0.95.
2. Moving vectors, as online matrix factorisation produces: popularity-skewed (Zipf-like)
   small moves ``v += 0.05 * |v| * gaussian / sqrt(dim)`` applied as upserts; updates/s, and
   recall afterwards against the exact answer on the final vectors and against a fresh build
   of those final vectors.
3. Our query QPS while a second Python thread applies updates (the GIL is released in both).

Vectors: gaussian directions times lognormal norms ``exp(N(0, 0.5))``; queries are drawn the
same way (user vectors). Ground truth is an exact numpy scan.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import numpy as np

from bench._common import require_release, row, write_results

EFS = (10, 20, 40, 80, 160, 320)
K = 10
TARGET_RECALL = 0.95
REPEATS = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ann", help="HNSW index vs hnswlib: QPS/recall, updates, concurrency")
    p.add_argument("--n", type=int, default=100_000, help="item vectors (default 100000)")
    p.add_argument("--dim", type=int, default=64, help="dimension (default 64)")
    p.add_argument("--queries", type=int, default=1_000, help="query vectors (default 1000)")
    p.add_argument("--moves", type=int, default=100_000, help="vector moves (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="data and index seed (default 0)")
    p.add_argument("--m", type=int, default=16, help="HNSW M for both libraries (default 16)")
    p.add_argument("--ef-construction", type=int, default=200, help="(default 200)")
    p.add_argument(
        "--quick", action="store_true", help="small run: n=10000, 200 queries, 10000 moves"
    )
    p.set_defaults(func=run)


def mf_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Gaussian directions times lognormal norms: the shape of MF factor vectors."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= np.exp(rng.normal(0.0, 0.5, size=(n, 1))).astype(np.float32)
    return x


def exact_top_k(items: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest inner products per query (unordered within the k)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        scores = queries[s : s + 256] @ items.T
        out[s : s + 256] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def skewed_moves(
    rng: np.random.Generator, x: np.ndarray, moves: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Applies `moves` small moves to a copy of `x`; returns (ids, new vectors, final x).

    Item popularity follows a continuous Zipf law (density ~ 1/(rank+1)) over a random
    permutation of the items, so a few items move very often, as in a real catalog.
    """
    n, dim = x.shape
    rank = np.minimum((np.power(n + 1.0, rng.random(moves)) - 1.0).astype(np.int64), n - 1)
    ids = rng.permutation(n)[rank].astype(np.uint32)
    final = x.copy()
    out = np.empty((moves, dim), dtype=np.float32)
    noise = rng.standard_normal((moves, dim)).astype(np.float32)
    step = np.float32(0.05 / np.sqrt(dim))
    for j, i in enumerate(ids):
        v = final[i]
        v += step * np.linalg.norm(v) * noise[j]
        out[j] = v
    return ids, out, final


class Ours:
    name = "recstream"

    def __init__(self, dim: int, m: int, efc: int, seed: int) -> None:
        from engine._core import Index

        self.index = Index(dim, m=m, ef_construction=efc, seed=seed)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.index.add(ids, x)

    def search(self, q: np.ndarray, ef: int) -> np.ndarray:
        return self.index.search_batch(q, K, ef=ef)[0]


class Peer:
    name = "hnswlib"

    def __init__(self, dim: int, m: int, efc: int, seed: int, capacity: int) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=capacity, M=m, ef_construction=efc, random_seed=seed)
        self.index.set_num_threads(1)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.index.add_items(x, ids, num_threads=1)

    def search(self, q: np.ndarray, ef: int) -> np.ndarray:
        self.index.set_ef(max(ef, K))
        return self.index.knn_query(q, k=K, num_threads=1)[0]


def timed(f: Any, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = f(*args)
    return out, time.perf_counter() - t


def build(lib: Any, x: np.ndarray, chunk: int = 10_000) -> float:
    """Inserts all rows of `x`; returns inserts per second."""
    ids = np.arange(len(x), dtype=np.uint32)
    t = time.perf_counter()
    for s in range(0, len(x), chunk):
        lib.add(ids[s : s + chunk], x[s : s + chunk])
    return len(x) / (time.perf_counter() - t)


def curves(libs: dict[str, Any], q: np.ndarray, truth: np.ndarray) -> dict[str, list]:
    """QPS (one core, batch API) and recall@10 at every ef, for every library.

    Each timing is the best of `REPEATS`, alternating the libraries, so that load from other
    processes on a shared machine penalises neither side more than the other.
    """
    out: dict[str, list] = {k: [] for k in libs}
    for ef in EFS:
        best = dict.fromkeys(libs, float("inf"))
        found: dict[str, np.ndarray] = {}
        for _ in range(REPEATS):
            for k, lib in libs.items():
                found[k], secs = timed(lib.search, q, ef)
                best[k] = min(best[k], secs)
        for k in libs:
            out[k].append({"ef": ef, "qps": len(q) / best[k], "recall": recall(found[k], truth)})
    return out


def first_reaching(points: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((p for p in points if p["recall"] >= target), None)


def apply_moves(lib: Any, ids: np.ndarray, vecs: np.ndarray, chunk: int = 1_000) -> float:
    """Applies the moves in order (chunks only amortise the Python call); returns moves/s."""
    t = time.perf_counter()
    for s in range(0, len(ids), chunk):
        lib.add(ids[s : s + chunk], vecs[s : s + chunk])
    return len(ids) / (time.perf_counter() - t)


def concurrent_qps(
    ours: Ours, q: np.ndarray, ef: int, ids: np.ndarray, vecs: np.ndarray, seconds: float
) -> tuple[float, float, float]:
    """Our QPS alone, then while another thread applies updates; and that thread's rate."""
    # Large batches on both sides: the GIL is only held between Rust calls, and each
    # re-acquisition can wait for the other thread's switch interval.
    batch = q

    def query_for(duration: float) -> float:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            ours.search(batch, ef)
            done += len(batch)
        return done / (time.perf_counter() - t0)

    alone = query_for(seconds)
    stop = threading.Event()
    applied = [0]

    def writer() -> None:
        while not stop.is_set():
            for s in range(0, len(ids), 1_000):
                if stop.is_set():
                    return
                ours.add(ids[s : s + 1_000], vecs[s : s + 1_000])
                applied[0] += len(ids[s : s + 1_000])

    th = threading.Thread(target=writer, daemon=True)
    t0 = time.perf_counter()
    th.start()
    during = query_for(seconds)
    stop.set()
    th.join()
    return alone, during, applied[0] / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.quick:
        args.n, args.queries, args.moves = 10_000, 200, 10_000
    try:
        import hnswlib  # noqa: F401

        have_peer = True
    except ImportError:
        have_peer = False
        print("\n" + "!" * 72 + "\n!!! SKIPPED peer hnswlib (pip install hnswlib)\n" + "!" * 72)

    rng = np.random.default_rng(args.seed)
    x = mf_vectors(rng, args.n, args.dim)
    q = mf_vectors(rng, args.queries, args.dim)
    print(f"ann: n={args.n} dim={args.dim} queries={args.queries} moves={args.moves}")
    truth = exact_top_k(x, q, K)

    libs: dict[str, Any] = {"ours": Ours(args.dim, args.m, args.ef_construction, args.seed)}
    if have_peer:
        libs["peer"] = Peer(args.dim, args.m, args.ef_construction, args.seed, args.n)
    build_rate = {k: build(lib, x) for k, lib in libs.items()}
    static = curves(libs, q, truth)
    for k, c in static.items():
        print(
            f"  {k:5s} build {build_rate[k]:8.0f}/s  "
            + "  ".join(f"ef={p['ef']}: {p['qps']:.0f} qps r={p['recall']:.3f}" for p in c)
        )
    at95 = {k: first_reaching(c, TARGET_RECALL) for k, c in static.items()}

    ids, vecs, final = skewed_moves(rng, x, args.moves)
    final_truth = exact_top_k(final, q, K)
    update_rate = {k: apply_moves(lib, ids, vecs) for k, lib in libs.items()}
    moved = curves(libs, q, final_truth)
    fresh_libs: dict[str, Any] = {"ours": Ours(args.dim, args.m, args.ef_construction, args.seed)}
    if have_peer:
        fresh_libs["peer"] = Peer(args.dim, args.m, args.ef_construction, args.seed, args.n)
    for lib in fresh_libs.values():
        build(lib, final)
    fresh = curves(fresh_libs, q, final_truth)
    del fresh_libs
    for k in libs:
        print(
            f"  {k:5s} updates {update_rate[k]:8.0f}/s  after moves / fresh build: "
            + "  ".join(
                f"ef={a['ef']}: {a['recall']:.3f}/{b['recall']:.3f}"
                for a, b in zip(moved[k], fresh[k], strict=True)
            )
        )

    ef_c = int(at95["ours"]["ef"]) if at95["ours"] else EFS[-1]
    more_ids, more_vecs, _ = skewed_moves(rng, final, min(args.moves, 20_000))
    alone, during, writer_rate = concurrent_qps(
        libs["ours"], q, ef_c, more_ids, more_vecs, seconds=3.0 if args.quick else 5.0
    )
    print(
        f"  ours  qps at ef={ef_c}: alone {alone:.0f}, with a writer thread {during:.0f} "
        f"(writer applied {writer_rate:.0f} updates/s)"
    )

    def get(d: dict[str, Any], k: str) -> Any:
        return d.get(k)

    rows = [
        row(
            "build_rate",
            build_rate["ours"],
            get(build_rate, "peer"),
            "inserts/s/core",
            {"m": args.m, "ef_construction": args.ef_construction},
        ),
    ]
    for i, ef in enumerate(EFS):
        rows.append(
            row(
                f"qps_ef{ef}",
                static["ours"][i]["qps"],
                static["peer"][i]["qps"] if have_peer else None,
                "queries/s/core",
                {
                    "ef": ef,
                    "recall_ours": static["ours"][i]["recall"],
                    "recall_peer": static["peer"][i]["recall"] if have_peer else None,
                },
            )
        )
    p95 = at95.get("peer")
    o95 = at95["ours"]
    rows.append(
        row(
            "qps_at_recall_0.95",
            o95["qps"] if o95 else None,
            p95["qps"] if p95 else None,
            "queries/s/core",
            {
                "rule": f"first ef in {EFS} reaching recall@10 >= 0.95",
                "ef_ours": o95["ef"] if o95 else None,
                "ef_peer": p95["ef"] if p95 else None,
                "recall_ours": o95["recall"] if o95 else None,
                "recall_peer": p95["recall"] if p95 else None,
            },
        )
    )
    rows.append(
        row(
            "update_rate",
            update_rate["ours"],
            get(update_rate, "peer"),
            "updates/s/core",
            {"moves": args.moves, "step": "0.05*|v|*N(0,I)/sqrt(dim)"},
        )
    )
    for label, ef_of in (("ours_ef95", o95), ("peer_ef95", p95)):
        if ef_of is None:
            continue
        i = EFS.index(int(ef_of["ef"]))
        rows.append(
            row(
                f"recall_after_moves@{label}",
                moved["ours"][i]["recall"],
                moved["peer"][i]["recall"] if have_peer else None,
                "recall@10",
                {"ef": EFS[i], "against": "exact top-10 of the final vectors"},
            )
        )
        rows.append(
            row(
                f"recall_fresh_build_of_final@{label}",
                fresh["ours"][i]["recall"],
                fresh["peer"][i]["recall"] if have_peer else None,
                "recall@10",
                {
                    "ef": EFS[i],
                    "moved_minus_fresh_ours": moved["ours"][i]["recall"]
                    - fresh["ours"][i]["recall"],
                    "moved_minus_fresh_peer": moved["peer"][i]["recall"]
                    - fresh["peer"][i]["recall"]
                    if have_peer
                    else None,
                },
            )
        )
    rows.append(
        row(
            "qps_with_concurrent_writer",
            during,
            None,
            "queries/s",
            {
                "ef": ef_c,
                "qps_alone": alone,
                "writer_updates_per_s": writer_rate,
                "threads": "1 query thread + 1 writer thread",
            },
        )
    )
    path = write_results(
        "ann",
        rows,
        {
            "params": {
                k: getattr(args, k)
                for k in ("n", "dim", "queries", "moves", "seed", "m", "ef_construction", "quick")
            },
            "curves": {"static": static, "after_moves": moved, "fresh_build_of_final": fresh},
            "peer": "hnswlib" if have_peer else None,
        },
    )
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        peer = f"{r['peer']:.4g}" if r["peer"] is not None else "null"
        print(f"  {r['name']:40s} ours {r['ours']:.4g}  peer {peer}  ratio {ratio}  {r['unit']}")
    print(f"wrote {path}")
    return 0
