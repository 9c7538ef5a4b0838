"""Quality benchmark: test-then-train over a time-ordered stream, against online peers.

The protocol is the online evaluation of He, Zhang, Kan & Chua, "Fast Matrix Factorization
for Online Recommendation with Implicit Feedback" (SIGIR 2016), section 5.1: interactions are
sorted by time; the first 90% train every method (the warm start); the last 10% are streamed
in order, and for each streamed event the method is first asked for the user's top-K (scored
by hit rate and NDCG of the event's item at K = 10 and 100) and then trained on that event.

Both ranking variants are reported: already-seen items kept in the ranking (as the paper's
released code does; repeat consumption can then be hit) and excluded (what the engine serves
by default). Figures are split by users known at the split and users new in the stream. A user
with no events yet gets the most popular items from every method (ours from its own decayed
trending list, the peers from online popularity counts), so cold users rank alike.

Methods, all in one process, one thread each, on the same split and the same evaluated events:

* ``recstream`` — ``ingest`` of the warm start (online updates as it goes), ``fit(N)``, then one
  ``ingest`` call per streamed event. Ranking is ``recommend`` on the default path (for a catalog
  under ``exact_below`` items that is the exact scan). ``auto_reindex=False``, as the server
  runs it (its index actor re-links in batches); queries here never read the index.
* ``popularity`` — interaction counts, updated online.
* ``river-funkmf`` / ``river-biasedmf`` — River's ``reco.FunkMF`` and ``reco.BiasedMF``, one
  ``learn_one`` per event. These are explicit-rating models; on implicit feedback each positive
  (target 1) is followed by ``--negatives`` items drawn uniformly from the items seen so far and
  learned with target 0 (negative sampling), else everything predicts 1. Their latent vectors
  are mirrored into numpy after each update so a top-K costs one matrix-vector product.
* ``implicit-als`` — implicit's ``AlternatingLeastSquares`` fitted on the warm start, then per
  streamed event re-folded: ``partial_fit_users`` for the event's user with its full row, then
  ``partial_fit_items`` for the event's item with its full column (one thread, one BLAS thread).

The update rate counts only the training calls of the streamed phase (events / their time).

``--tune`` searches ModelConfig values on a validation split inside the warm start (train on the
first 90% of it, test-then-train on its last 10%), one parameter at a time around the defaults;
the streamed test part is never looked at. Its trials are kept in ``quality_tune.json``; that
file is the evidence behind the model's defaults. The peers' own settings are fixed, not tuned
(River: SGD 0.05, L2 0.001, N(0, 0.1) init; implicit: regularization 0.01, alpha 1, 15 sweeps);
every learner gets the same number of factors as ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import require_release, results_dir, row, write_results

KS = (10, 100)
VARIANTS = ("exclude-seen", "seen-kept")
GROUPS = ("all", "known", "new")
WARM_FRACTION = 0.9
#: Evaluated events per point of the sliding HR@100 curve.
PLOT_WINDOW = 500

#: One-parameter-at-a-time grid of ``--tune`` (the current default is always included).
TUNE_GRID: dict[str, tuple[float, ...]] = {
    "dim": (32, 64, 128),
    "c0": (64.0, 256.0, 512.0, 1024.0, 4096.0),
    "alpha": (0.0, 0.2, 0.4, 0.6, 1.0),
    "reg": (0.001, 0.01, 0.1, 1.0),
    "w_new": (1.0, 2.0, 4.0, 8.0),
}


def register(subparsers: Any) -> None:
    from engine import DATASET_FORMATS

    p = subparsers.add_parser(
        "quality", help="test-then-train HR/NDCG against online peers (eALS paper protocol)"
    )
    p.add_argument("--data", type=Path, help="dataset file (default: a synthetic stream)")
    p.add_argument("--format", default="auto", choices=("auto", *DATASET_FORMATS))
    p.add_argument("--events", type=int, default=200_000, help="synthetic events (200000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (10000)")
    p.add_argument("--items", type=int, default=5_000, help="synthetic items (5000)")
    p.add_argument("--zipf", type=float, default=0.8, help="synthetic popularity law (0.8)")
    p.add_argument("--seed", type=int, default=0, help="stream, sample and peer seed (0)")
    p.add_argument(
        "--eval-sample",
        type=int,
        default=5_000,
        help="evaluate every method on this deterministic sample of the streamed events "
        "(every streamed event is still trained on); 0: all (default 5000)",
    )
    p.add_argument("--fit-iterations", type=int, default=10, help="warm-start sweeps (10)")
    p.add_argument("--negatives", type=int, default=2, help="River negatives per positive (2)")
    p.add_argument("--peers", default="all", help="comma-separated subset of peers, or 'all'")
    p.add_argument(
        "--config", default="{}", help="JSON of ModelConfig overrides, e.g. '{\"alpha\": 0.6}'"
    )
    p.add_argument("--tune", action="store_true", help="search ModelConfig on a validation split")
    p.add_argument("--tune-passes", type=int, default=1, help="coordinate passes over the grid (1)")
    p.add_argument(
        "--quick", action="store_true", help="small run: 10000 events, 1000 users, 500 items"
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=results_dir(),
        help="where quality.json and quality.png go (default bench/results)",
    )
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# Metrics


def rank_of(ranked: Sequence[int], target: int) -> int | None:
    """0-based position of ``target`` in ``ranked``, None if absent."""
    for pos, item in enumerate(ranked):
        if item == target:
            return pos
    return None


def hit_and_ndcg(rank: int | None, k: int) -> tuple[float, float]:
    """HR@k and NDCG@k of one test event whose single relevant item sits at ``rank``.

    With one relevant item the ideal DCG is 1, so NDCG is ``1 / log2(rank + 2)`` inside the
    top k and 0 outside (He et al. 2016, section 5.1).
    """
    if rank is None or rank >= k:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(rank + 2)


class Scores:
    """Per-event HR and NDCG of one method, per variant and K, with the user group."""

    def __init__(self, n: int) -> None:
        self.rank = {v: np.full(n, -1, dtype=np.int64) for v in VARIANTS}
        self.known = np.zeros(n, dtype=bool)
        self.n = 0

    def add(self, ranks: dict[str, int | None], known: bool) -> None:
        for v in VARIANTS:
            r = ranks[v]
            self.rank[v][self.n] = -1 if r is None else r
        self.known[self.n] = known
        self.n += 1

    def per_event(self, variant: str, metric: str, k: int) -> np.ndarray:
        r = self.rank[variant][: self.n]
        inside = (r >= 0) & (r < k)
        if metric == "hr":
            return inside.astype(np.float64)
        return np.where(inside, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)

    def mean(self, variant: str, metric: str, k: int, group: str = "all") -> float | None:
        values = self.per_event(variant, metric, k)
        if group != "all":
            mask = self.known[: self.n] if group == "known" else ~self.known[: self.n]
            values = values[mask]
        return float(values.mean()) if len(values) else None


# --------------------------------------------------------------------------------------------
# The stream


class Split:
    """A time-ordered event stream with dense ids, cut into warm start and streamed part."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        weights: np.ndarray,
        ts: np.ndarray,
        fraction: float = WARM_FRACTION,
    ) -> None:
        order = np.argsort(ts, kind="stable")
        _, self.users = np.unique(users[order], return_inverse=True)
        _, self.items = np.unique(items[order], return_inverse=True)
        self.users = self.users.astype(np.int64)
        self.items = self.items.astype(np.int64)
        self.weights = np.asarray(weights, dtype=np.float64)[order]
        self.ts = np.asarray(ts, dtype=np.float64)[order]
        self.cut = int(len(self.users) * fraction)
        self.n_users = int(self.users.max()) + 1
        self.n_items = int(self.items.max()) + 1
        known = np.zeros(self.n_users, dtype=bool)
        known[self.users[: self.cut]] = True
        self.known_user = known

    def __len__(self) -> int:
        return len(self.users)

    def head(self, fraction: float) -> Split:
        """The warm start alone, re-cut at ``fraction``: the validation split of ``--tune``."""
        return Split(
            self.users[: self.cut],
            self.items[: self.cut],
            self.weights[: self.cut],
            self.ts[: self.cut],
            fraction,
        )


def eval_positions(n_stream: int, sample: int, seed: int) -> np.ndarray:
    """Sorted positions (within the streamed part) of the evaluated events."""
    if sample <= 0 or sample >= n_stream:
        return np.arange(n_stream)
    rng = np.random.default_rng([seed, 0x51])
    return np.sort(rng.choice(n_stream, size=sample, replace=False))


# --------------------------------------------------------------------------------------------
# Methods: warm(split), rank(user, k, seen) -> item ids, learn(user, item, weight, ts).


class Popularity:
    """Most-interacted items first (ItemPop), counts updated online; also every fallback."""

    name = "popularity"

    def __init__(self, n_items: int) -> None:
        self.count = np.zeros(n_items, dtype=np.float64)

    def warm(self, split: Split) -> None:
        np.add.at(self.count, split.items[: split.cut], 1.0)

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int]:
        return top_k(self.count, k, seen, self.count > 0)

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        self.count[item] += 1.0


def top_k(
    scores: np.ndarray, k: int, seen: set[int] | None, known: np.ndarray | None = None
) -> list[int]:
    """Ids of the k best ``scores``, best first; ``seen`` and not ``known`` items left out."""
    s = scores.astype(np.float64, copy=True)
    if known is not None:
        s[~known] = -np.inf
    if seen:
        s[np.fromiter(seen, dtype=np.int64, count=len(seen))] = -np.inf
    k = min(k, len(s))
    part = np.argpartition(-s, k - 1)[:k]
    part = part[np.isfinite(s[part])]
    # Ties broken by item id so every run ranks alike.
    return part[np.lexsort((part, -s[part]))].tolist()


class Ours:
    name = "recstream"

    def __init__(self, overrides: dict[str, Any], fit_iterations: int) -> None:
        from engine import Model, ModelConfig

        self.model = Model(ModelConfig(**{"auto_reindex": False, **overrides}))
        self.fit_iterations = fit_iterations

    def warm(self, split: Split) -> None:
        c = split.cut
        self.model.ingest(
            split.users[:c], split.items[:c], weights=split.weights[:c], ts=split.ts[:c]
        )
        self.model.fit(self.fit_iterations)

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int]:
        return [i for i, _ in self.model.recommend(user, k=k, exclude_seen=seen is not None)]

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        self.model.ingest([user], [item], weights=[weight], ts=[ts])


class RiverMF:
    """River's FunkMF or BiasedMF on implicit feedback through negative sampling."""

    def __init__(self, kind: str, split: Split, dim: int, negatives: int, seed: int) -> None:
        from river import optim, reco

        self.name = f"river-{kind.lower()}"
        init = optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed)
        if kind == "FunkMF":
            self.model = reco.FunkMF(
                n_factors=dim, optimizer=optim.SGD(0.05), l2=0.001, initializer=init, seed=seed
            )
        else:
            self.model = reco.BiasedMF(
                n_factors=dim,
                bias_optimizer=optim.SGD(0.01),
                latent_optimizer=optim.SGD(0.05),
                l2_bias=0.001,
                l2_latent=0.001,
                latent_initializer=init,
                seed=seed,
            )
        self.biased = kind == "BiasedMF"
        self.negatives = negatives
        self.rng = np.random.default_rng([seed, 0x7E])
        self.seen_items: list[int] = []
        self.is_seen = np.zeros(split.n_items, dtype=bool)
        self.users = np.zeros((split.n_users, dim), dtype=np.float64)
        self.items = np.zeros((split.n_items, dim), dtype=np.float64)
        self.bias = np.zeros(split.n_items, dtype=np.float64)
        self.has_user = np.zeros(split.n_users, dtype=bool)

    def _learn(self, user: int, item: int) -> list[int]:
        if not self.is_seen[item]:
            self.is_seen[item] = True
            self.seen_items.append(item)
        self.model.learn_one(user=user, item=item, y=1.0)
        touched = [item]
        picks = self.rng.integers(0, len(self.seen_items), self.negatives)
        for p in picks.tolist():
            neg = self.seen_items[p]
            self.model.learn_one(user=user, item=neg, y=0.0)
            touched.append(neg)
        return touched

    def _mirror(self, user: int, items: list[int]) -> None:
        m = self.model
        self.users[user] = m.u_latents[user]
        self.has_user[user] = True
        for i in items:
            self.items[i] = m.i_latents[i]
            if self.biased:
                self.bias[i] = m.i_biases[i]

    def warm(self, split: Split) -> None:
        for u, i in zip(
            split.users[: split.cut].tolist(), split.items[: split.cut].tolist(), strict=True
        ):
            self._learn(u, i)
        m = self.model
        for u, v in m.u_latents.items():
            self.users[u] = v
            self.has_user[u] = True
        for i, v in m.i_latents.items():
            self.items[i] = v
            if self.biased:
                self.bias[i] = m.i_biases[i]

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int] | None:
        if not self.has_user[user]:
            return None
        return top_k(self.items @ self.users[user] + self.bias, k, seen, self.is_seen)

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        self._mirror(user, self._learn(user, item))


class ImplicitALS:
    """implicit's ALS fitted on the warm start, re-folded per streamed event."""

    name = "implicit-als"

    def __init__(self, split: Split, dim: int, seed: int) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        self.model = AlternatingLeastSquares(
            factors=dim,
            regularization=0.01,
            alpha=1.0,
            iterations=15,
            num_threads=1,
            random_state=seed,
        )
        self.rng = np.random.default_rng([seed, 0xA1])
        self.n_users = split.n_users
        self.n_items = split.n_items
        self.rows: list[dict[int, float]] = [{} for _ in range(split.n_users)]
        self.cols: list[dict[int, float]] = [{} for _ in range(split.n_items)]
        self.is_seen = np.zeros(split.n_items, dtype=bool)
        self.has_user = np.zeros(split.n_users, dtype=bool)

    def warm(self, split: Split) -> None:
        import scipy.sparse as sp

        c = split.cut
        for u, i, w in zip(
            split.users[:c].tolist(),
            split.items[:c].tolist(),
            split.weights[:c].tolist(),
            strict=True,
        ):
            self.rows[u][i] = self.rows[u].get(i, 0.0) + w
            self.cols[i][u] = self.cols[i].get(u, 0.0) + w
        self.is_seen[split.items[:c]] = True
        self.has_user[split.users[:c]] = True
        m = sp.coo_matrix(
            (split.weights[:c].astype(np.float32), (split.users[:c], split.items[:c])),
            shape=(self.n_users, self.n_items),
        ).tocsr()  # duplicates are summed
        self.model.fit(m, show_progress=False)

    def _grow(self, user: int, item: int) -> None:
        """New rows start small and random, as implicit's own initialisation does."""
        m = self.model
        for attr, needed in (("user_factors", user), ("item_factors", item)):
            f = getattr(m, attr)
            if needed >= len(f):
                extra = self.rng.random((needed + 1 - len(f), f.shape[1]), dtype=np.float32)
                setattr(m, attr, np.concatenate([f, extra * np.float32(0.01)]))

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int] | None:
        if not self.has_user[user]:
            return None
        m = self.model
        scores = np.zeros(self.n_items, dtype=np.float32)
        n = len(m.item_factors)
        scores[:n] = m.item_factors @ m.user_factors[user]
        return top_k(scores, k, seen, self.is_seen)

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        import scipy.sparse as sp

        row, col = self.rows[user], self.cols[item]
        row[item] = row.get(item, 0.0) + weight
        col[user] = col.get(user, 0.0) + weight
        self.is_seen[item] = True
        self.has_user[user] = True
        self._grow(user, item)
        n_items = len(self.model.item_factors)
        n_users = len(self.model.user_factors)
        r = sp.csr_matrix(
            (
                np.fromiter(row.values(), np.float32),
                np.fromiter(row.keys(), np.int32),
                [0, len(row)],
            ),
            shape=(1, n_items),
        )
        self.model.partial_fit_users(np.array([user]), r)
        c = sp.csr_matrix(
            (
                np.fromiter(col.values(), np.float32),
                np.fromiter(col.keys(), np.int32),
                [0, len(col)],
            ),
            shape=(1, n_users),
        )
        self.model.partial_fit_items(np.array([item]), c)


# --------------------------------------------------------------------------------------------
# The protocol


def stream_eval(
    method: Any,
    split: Split,
    positions: np.ndarray,
    fallback: Popularity | None,
    every_event: bool = False,
    curve: bool = True,
) -> dict[str, Any]:
    """Warm start, then test-then-train over the streamed part.

    Args:
        method: The method under test.
        split: The stream.
        positions: Positions within the streamed part to evaluate (sorted).
        fallback: Ranks for users the method has no vector for (a popularity model trained
            alongside); None when the method answers every user itself.
        every_event: Also score every streamed event, not only ``positions``.
        curve: Keep per-event figures for the plot.

    Returns:
        ``scores`` on the positions, ``all_scores`` on every event (if asked), warm-start
        seconds and the streamed update rate.
    """
    began = time.perf_counter()
    method.warm(split)
    if fallback is not None:
        fallback.warm(split)
    warm_s = time.perf_counter() - began

    n_stream = len(split) - split.cut
    scores = Scores(len(positions))
    all_scores = Scores(n_stream) if every_event else None
    evaluate = np.zeros(n_stream, dtype=bool)
    evaluate[positions] = True
    seen: dict[int, set[int]] = {}
    for u, i in zip(
        split.users[: split.cut].tolist(), split.items[: split.cut].tolist(), strict=True
    ):
        seen.setdefault(u, set()).add(i)
    users = split.users[split.cut :].tolist()
    items = split.items[split.cut :].tolist()
    weights = split.weights[split.cut :].tolist()
    ts = split.ts[split.cut :].tolist()
    learn_s = 0.0
    k = max(KS)
    for j in range(n_stream):
        u, i = users[j], items[j]
        if evaluate[j] or every_event:
            user_seen = seen.get(u, set())
            ranks: dict[str, int | None] = {}
            for v in VARIANTS:
                exclude = user_seen if v == "exclude-seen" else None
                ranked = method.rank(u, k, exclude)
                if ranked is None and fallback is not None:
                    ranked = fallback.rank(u, k, exclude)
                ranks[v] = rank_of(ranked or [], i)
            known = bool(split.known_user[u])
            if evaluate[j]:
                scores.add(ranks, known)
            if all_scores is not None:
                all_scores.add(ranks, known)
        t = time.perf_counter()
        method.learn(u, i, weights[j], ts[j])
        learn_s += time.perf_counter() - t
        if fallback is not None:
            fallback.learn(u, i, weights[j], ts[j])
        seen.setdefault(u, set()).add(i)
    return {
        "scores": scores,
        "all_scores": all_scores,
        "warm_s": warm_s,
        "updates_per_s": n_stream / learn_s if learn_s > 0 else None,
    }


def load_split(args: argparse.Namespace) -> tuple[Split, dict[str, Any]]:
    import engine

    if args.data is not None:
        ds = engine.load_dataset(args.data, args.format)
        source = {"data": str(args.data), "format": args.format}
        return Split(ds.users, ds.items, ds.weights, ds.ts), source
    config = engine.SyntheticConfig(
        n_events=args.events,
        n_users=args.users,
        n_items=args.items,
        zipf=args.zipf,
        seed=args.seed,
    )
    s = engine.generate_stream(config)
    source = {
        "synthetic": {
            "n_events": args.events,
            "n_users": args.users,
            "n_items": args.items,
            "zipf": args.zipf,
            "seed": args.seed,
        }
    }
    return Split(s.users, s.items, s.weights, s.ts), source


def make_peers(
    names: Sequence[str], split: Split, dim: int, args: argparse.Namespace
) -> tuple[list[Callable[[], Any]], dict[str, str]]:
    """Factories of the peers that can run, and the reason for each one skipped."""
    factories: list[Callable[[], Any]] = []
    skipped: dict[str, str] = {}
    if "popularity" in names:
        factories.append(lambda: Popularity(split.n_items))
    for kind in ("FunkMF", "BiasedMF"):
        name = f"river-{kind.lower()}"
        if name not in names:
            continue
        try:
            import river.reco  # noqa: F401
        except ImportError as e:
            skipped[name] = f"river is not importable ({e}); pip install river"
            continue
        factories.append(lambda kind=kind: RiverMF(kind, split, dim, args.negatives, args.seed))
    if "implicit-als" in names:
        try:
            import implicit.cpu.als  # noqa: F401
            import scipy.sparse  # noqa: F401
        except ImportError as e:
            skipped["implicit-als"] = f"implicit is not importable ({e}); pip install implicit"
        else:
            factories.append(lambda: ImplicitALS(split, dim, args.seed))
    return factories, skipped


PEER_NAMES = ("popularity", "river-funkmf", "river-biasedmf", "implicit-als")


def _single_blas_thread() -> Any:
    """One BLAS thread for every library loaded so far (load the peers' libraries first)."""
    for module in ("scipy.sparse", "implicit.cpu.als"):
        try:
            __import__(module)
        except ImportError:
            pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(1)


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.quick:
        args.events, args.users, args.items = 10_000, 1_000, 500
        args.eval_sample = min(args.eval_sample, 500) if args.eval_sample else 500
        args.fit_iterations = min(args.fit_iterations, 5)
    overrides = json.loads(args.config)
    if args.tune:
        return tune(args, overrides)
    limits = _single_blas_thread()  # noqa: F841  (kept alive for the run)

    from engine import ModelConfig

    dim = int(overrides.get("dim", ModelConfig().dim))
    split, source = load_split(args)
    n_stream = len(split) - split.cut
    positions = eval_positions(n_stream, args.eval_sample, args.seed)
    names = PEER_NAMES if args.peers == "all" else tuple(args.peers.split(","))
    unknown = set(names) - set(PEER_NAMES)
    if unknown:
        sys.exit(f"unknown peers {sorted(unknown)}; choose from {PEER_NAMES}")
    print(
        f"quality: {len(split)} events, {split.n_users} users, {split.n_items} items; "
        f"warm start {split.cut}, streamed {n_stream}, evaluated {len(positions)}"
    )
    for name, reason in make_peers(names, split, dim, args)[1].items():
        print("\n" + "!" * 72 + f"\n!!! SKIPPED peer {name}: {reason}\n" + "!" * 72)

    results: dict[str, dict[str, Any]] = {}
    ours = Ours(overrides, args.fit_iterations)
    results["recstream"] = stream_eval(ours, split, positions, None, every_event=True)
    _progress("recstream", results["recstream"])
    factories, skipped = make_peers(names, split, dim, args)
    for factory in factories:
        peer = factory()
        fallback = None if isinstance(peer, Popularity) else Popularity(split.n_items)
        every = isinstance(peer, Popularity)
        results[peer.name] = stream_eval(peer, split, positions, fallback, every_event=every)
        _progress(peer.name, results[peer.name])

    rows, breakdown = summarise(results)
    extra = {
        "command": command_line(args),
        "protocol": "test-then-train, He et al. SIGIR 2016 section 5.1; warm start 90%",
        "source": source,
        "model_config": {**_config_dict(ModelConfig(**{"auto_reindex": False, **overrides}))},
        "fit_iterations": args.fit_iterations,
        "ranking_path": "Model.recommend default path (exact scan below exact_below items)",
        "events": len(split),
        "warm_start_events": split.cut,
        "streamed_events": n_stream,
        "evaluated_events": len(positions),
        "river_negatives": args.negatives,
        "skipped_peers": skipped,
        "warm_start_seconds": {m: round(r["warm_s"], 3) for m, r in results.items()},
        "breakdown": breakdown,
    }
    out_dir = Path(args.results_dir)
    path = write_results("quality", rows, extra, out=out_dir)
    plot(results, positions, split, out_dir / "quality.png")
    print_table(rows, breakdown, results)
    print(f"wrote {path} and {out_dir / 'quality.png'}")
    return 0


def _progress(name: str, r: dict[str, Any]) -> None:
    s: Scores = r["scores"]
    print(
        f"  {name:15s} warm {r['warm_s']:7.1f} s   "
        f"{(r['updates_per_s'] or 0):10.0f} updates/s   "
        f"HR@100 excl {s.mean('exclude-seen', 'hr', 100):.4f} "
        f"kept {s.mean('seen-kept', 'hr', 100):.4f}",
        flush=True,
    )


def summarise(results: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Headline rows (ours vs the best peer) and the per-method, per-group breakdown."""
    rows = []
    breakdown: dict[str, Any] = {}
    peers = [m for m in results if m != "recstream"]
    for k in sorted(KS, reverse=True):
        for variant in VARIANTS:
            for metric in ("hr", "ndcg"):
                name = f"{metric}@{k}/{variant}"
                figs = {
                    m: {g: r["scores"].mean(variant, metric, k, g) for g in GROUPS}
                    for m, r in results.items()
                }
                for m in ("recstream", "popularity"):
                    if m in results and results[m]["all_scores"] is not None:
                        figs[m]["all_events"] = results[m]["all_scores"].mean(variant, metric, k)
                breakdown[name] = figs
                ours = figs["recstream"]["all"]
                best = max(peers, key=lambda m: figs[m]["all"] or 0.0, default=None)
                rows.append(
                    row(
                        name,
                        ours,
                        figs[best]["all"] if best else None,
                        "fraction",
                        {
                            "peer_name": best,
                            "peers": {m: figs[m]["all"] for m in peers},
                            "known_users": {m: figs[m]["known"] for m in results},
                            "new_users": {m: figs[m]["new"] for m in results},
                            "ours_minus_peer": paired_difference(
                                results["recstream"]["scores"],
                                results[best]["scores"] if best else None,
                                variant,
                                metric,
                                k,
                            ),
                        },
                    )
                )
    rates = {m: r["updates_per_s"] for m, r in results.items()}
    learners = [m for m in peers if m != "popularity" and rates[m]]
    fastest = max(learners, key=lambda m: rates[m], default=None)
    rows.append(
        row(
            "updates/s",
            rates["recstream"],
            rates[fastest] if fastest else None,
            "events/s",
            {"peer_name": fastest, "per_method": rates},
        )
    )
    return rows, breakdown


def paired_difference(
    ours: Scores, peer: Scores | None, variant: str, metric: str, k: int
) -> dict[str, float] | None:
    """Mean and standard error of ours minus the peer over the same evaluated events.

    Both methods are scored on the same events, so the paired difference has a much smaller
    error than the two means apart; ``|mean| > 2 se`` is a difference the sample supports.
    """
    if peer is None or ours.n != peer.n or ours.n < 2:
        return None
    d = ours.per_event(variant, metric, k) - peer.per_event(variant, metric, k)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d)))}


def print_table(
    rows: list[dict[str, Any]], breakdown: dict[str, Any], results: dict[str, Any]
) -> None:
    methods = list(results)
    print("\n" + " " * 24 + "".join(f"{m:>16s}" for m in methods))
    for name, figs in breakdown.items():
        for g in GROUPS:
            cells = "".join(
                f"{figs[m][g]:16.4f}" if figs[m][g] is not None else f"{'-':>16s}" for m in methods
            )
            print(f"{name + ' ' + g:24s}{cells}")
    rates = "".join(f"{(results[m]['updates_per_s'] or 0):16.0f}" for m in methods)
    print(f"{'updates/s':24s}{rates}")


def plot(
    results: dict[str, dict[str, Any]], positions: np.ndarray, split: Split, path: Path
) -> None:
    """Sliding HR@100 over the streamed part, one line per method, one panel per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot (pip install matplotlib)")
        return
    window = max(1, min(PLOT_WINDOW, len(positions) // 5))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, variant in zip(axes, VARIANTS, strict=True):
        for name, r in results.items():
            hits = r["scores"].per_event(variant, "hr", 100)
            if len(hits) < window:
                continue
            sliding = np.convolve(hits, np.ones(window) / window, mode="valid")
            x = split.cut + positions[window - 1 :]
            ax.plot(x, sliding, label=name, linewidth=1.4 if name == "recstream" else 1.0)
        ax.set_title(f"HR@100, {variant} (sliding over {window} evaluated events)")
        ax.set_xlabel("event position in the stream")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("HR@100")
    axes[0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Tuning


def tune(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Coordinate search over :data:`TUNE_GRID` on a validation split of the warm start.

    The warm start (first 90% of the stream) is itself cut 90/10: each candidate trains on the
    first part and is scored test-then-train on the rest. One parameter moves at a time,
    starting from the current defaults (plus ``--config``); the best value is kept before the
    next parameter. The objective is HR@100 with seen items excluded (the served default).
    """
    from engine import ModelConfig

    split, source = load_split(args)
    val = split.head(WARM_FRACTION)
    n_stream = len(val) - val.cut
    positions = eval_positions(n_stream, min(args.eval_sample or 2_000, 2_000), args.seed)
    print(
        f"tune: validation split of the warm start: train {val.cut}, "
        f"test-then-train {n_stream}, evaluated {len(positions)}"
    )
    defaults = {name: getattr(ModelConfig(), name) for name in TUNE_GRID}
    current = {**defaults, **{k: v for k, v in overrides.items() if k in TUNE_GRID}}
    cache: dict[str, dict[str, float | None]] = {}
    trials: list[dict[str, Any]] = []

    def score(cfg: dict[str, Any]) -> float:
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            began = time.perf_counter()
            method = Ours({**overrides, **cfg}, args.fit_iterations)
            s: Scores = stream_eval(method, val, positions, None)["scores"]
            cache[key] = {
                f"{m}@{k}/{v}": s.mean(v, m, k)
                for k in KS
                for v in VARIANTS
                for m in ("hr", "ndcg")
            }
            trials.append({"config": cfg, **cache[key]})
            print(
                f"  {key:90s} hr@100/excl {cache[key]['hr@100/exclude-seen']:.4f} "
                f"kept {cache[key]['hr@100/seen-kept']:.4f}  ({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
        return cache[key]["hr@100/exclude-seen"] or 0.0

    best = score(current)
    for _ in range(args.tune_passes):
        for name, values in TUNE_GRID.items():
            for value in values:
                candidate = {**current, name: type(defaults[name])(value)}
                s = score(candidate)
                if s > best:
                    best, current = s, candidate
    default_figs = (
        cache[json.dumps(defaults, sort_keys=True)]
        if json.dumps(defaults, sort_keys=True) in cache
        else None
    )
    tuned_figs = cache[json.dumps(current, sort_keys=True)]
    rows = [
        row(
            f"validation {name} (tuned vs defaults)",
            tuned_figs[name],
            default_figs[name] if default_figs else None,
            "fraction",
            {"peer_name": "current defaults", "tuned": current, "defaults": defaults},
        )
        for name in ("hr@100/exclude-seen", "ndcg@100/exclude-seen", "hr@100/seen-kept")
    ]
    extra = {
        "command": command_line(args),
        "source": source,
        "objective": "hr@100/exclude-seen on the validation split inside the warm start",
        "grid": {k: list(v) for k, v in TUNE_GRID.items()},
        "defaults": defaults,
        "tuned": current,
        "trials": trials,
    }
    out_dir = Path(args.results_dir)
    path = write_results("quality_tune", rows, extra, out=out_dir)
    print(f"best {current} hr@100/exclude-seen {best:.4f}; wrote {path}")
    return 0


# --------------------------------------------------------------------------------------------
# Output


def _config_dict(config: Any) -> dict[str, Any]:
    import attrs

    return {k: v for k, v in attrs.asdict(config).items() if k != "event_weights"}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (options that differ from their defaults)."""
    parts = ["python -m bench quality"]
    if args.quick:
        parts.append("--quick")
    if args.data is not None:
        parts += ["--data", str(args.data), "--format", args.format]
    elif not args.quick:
        for flag, value, default in (
            ("--events", args.events, 200_000),
            ("--users", args.users, 10_000),
            ("--items", args.items, 5_000),
            ("--zipf", args.zipf, 0.8),
        ):
            if value != default:
                parts += [flag, str(value)]
    for flag, value, default in (
        ("--seed", args.seed, 0),
        ("--negatives", args.negatives, 2),
        ("--peers", args.peers, "all"),
        ("--config", args.config, "{}"),
    ):
        if value != default:
            parts += [flag, f"'{value}'" if flag == "--config" else str(value)]
    if not args.quick:
        if args.eval_sample != 5_000:
            parts += ["--eval-sample", str(args.eval_sample)]
        if args.fit_iterations != 10:
            parts += ["--fit-iterations", str(args.fit_iterations)]
    if args.tune:
        parts.append("--tune")
        if args.tune_passes != 1:
            parts += ["--tune-passes", str(args.tune_passes)]
    return " ".join(parts)
