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
* ``item-knn`` — online item-based neighbourhood (Sarwar et al., WWW 2001): exact, uncapped
  co-occurrence counts of the items each user took, cosine-normalised with a shrinkage term;
  a user's score for item j sums ``sim(h, j)`` over the user's last ``window`` items.
* ``river-funkmf`` / ``river-biasedmf`` — River's ``reco.FunkMF`` and ``reco.BiasedMF``, one
  ``learn_one`` per event. These are explicit-rating models; on implicit feedback each positive
  (target 1) is followed by ``--negatives`` items drawn uniformly from the items seen so far and
  learned with target 0 (negative sampling), else everything predicts 1. Their latent vectors
  are mirrored into numpy after each update so a top-K costs one matrix-vector product.
* ``implicit-als`` — implicit's ``AlternatingLeastSquares`` fitted on the warm start, then per
  streamed event re-folded: the event's user row and then its item row are solved exactly
  (the closed form implicit's own ``recalculate_user`` uses, Hu, Koren & Volinsky 2008) against
  Gramians ``YᵀY`` / ``XᵀX`` that are kept up to date by rank-one swaps, and the rows'
  interactions are kept in per-row dicts. Calling ``partial_fit_users`` / ``partial_fit_items``
  instead would rebuild two CSR matrices and recompute a whole Gramian per event: harness
  overhead that would understate the peer's update rate, not a property of ALS.

The update rate counts only the training calls of the streamed phase: events / the CPU time
of this thread in those calls (every method learns on one thread; BLAS is held to one).

Implicit feedback: weights in the file (ratings) are ignored — every event counts 1 — unless
``--weights`` asks for them. Every streamed event is evaluated when the streamed part has at
most 20 000 events; longer streams are evaluated on a deterministic sample (``--eval-sample``).

``--tune`` gives every method the same budget: a coordinate search over its own grid
(:data:`GRIDS`, one parameter at a time from its defaults, keeping the best value before the
next), at most ``--tune-budget`` trials each, on a validation split inside the warm start
(train on the first 90% of it, test-then-train on its last 10%); the streamed test part is
never looked at. The objective is HR@100 with seen items excluded. Then the test run follows
with each method's tuned settings, in the same process. The trials go to ``NAME_tune.json``,
the evidence behind the model's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import require_release, results_dir, row, write_results

KS = (10, 100)
VARIANTS = ("exclude-seen", "seen-kept")
GROUPS = ("all", "known", "new")
WARM_FRACTION = 0.9
#: Where times that are no unix seconds (row numbers, small offsets) are moved to start.
TIME_BASE = 1_000_000_000.0
#: Evaluated events per point of the sliding HR@100 curve.
PLOT_WINDOW = 500

#: Streams with at most this many streamed events are evaluated on every event.
EVAL_ALL_BELOW = 20_000

#: Per method, the one-parameter-at-a-time grid of ``--tune`` (defaults are always tried first).
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "recstream": {
        "neighbour_weight": (0.0, 0.25, 0.5, 0.75),
        "dim": (32, 64, 128),
        "reg": (0.1, 1.0, 10.0),
        "cold_start_events": (0.0, 1.0, 5.0),
        "c0": (256.0, 512.0, 2048.0),
    },
    "implicit-als": {
        "factors": (32, 64, 128),
        "regularization": (0.01, 0.1, 1.0, 10.0, 100.0),
        "alpha": (1.0, 5.0, 20.0, 40.0),
        "iterations": (15, 30),
    },
    "item-knn": {
        "window": (5, 10, 20, 50, 0),
        "shrink": (0.0, 5.0, 20.0, 100.0),
        "alpha": (0.5, 0.3, 0.7),
    },
    "river-funkmf": {
        "lr": (0.01, 0.05, 0.1),
        "l2": (0.0001, 0.001, 0.01),
        "n_factors": (16, 32, 64),
    },
    "river-biasedmf": {
        "lr": (0.01, 0.05, 0.1),
        "l2": (0.0001, 0.001, 0.01),
        "n_factors": (16, 32, 64),
    },
    "popularity": {},
}

#: Trials per method of ``--tune`` (the same for every method).
TUNE_BUDGET = 12


def register(subparsers: Any) -> None:
    from engine.datasets import FORMATS as DATASET_FORMATS

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
        default=None,
        help="evaluate every method on this deterministic sample of the streamed events "
        f"(every streamed event is still trained on); 0: all (default: all up to "
        f"{EVAL_ALL_BELOW} streamed events, else 5000)",
    )
    p.add_argument(
        "--weights",
        action="store_true",
        help="use the file's weights (ratings) as confidences (default: every event counts 1)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="results name (default: quality, or quality-DATASET for --data)",
    )
    p.add_argument("--fit-iterations", type=int, default=10, help="warm-start sweeps (10)")
    p.add_argument("--negatives", type=int, default=2, help="River negatives per positive (2)")
    p.add_argument("--peers", default="all", help="comma-separated subset of peers, or 'all'")
    p.add_argument(
        "--config", default="{}", help="JSON of ModelConfig overrides, e.g. '{\"alpha\": 0.6}'"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="tune every method on a validation split of the warm start, then run the test",
    )
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="take every method's settings from the 'tuned' entry of a NAME_tune.json "
        "written by --tune (reruns the test with tuned settings without tuning again)",
    )
    p.add_argument(
        "--tune-budget",
        type=int,
        default=TUNE_BUDGET,
        help=f"trials per method of --tune ({TUNE_BUDGET})",
    )
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

    def __init__(
        self,
        kind: str,
        split: Split,
        negatives: int,
        seed: int,
        *,
        n_factors: int = 32,
        lr: float = 0.05,
        l2: float = 0.001,
    ) -> None:
        from river import optim, reco

        self.name = f"river-{kind.lower()}"
        dim = int(n_factors)
        init = optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed)
        if kind == "FunkMF":
            self.model = reco.FunkMF(
                n_factors=dim, optimizer=optim.SGD(lr), l2=l2, initializer=init, seed=seed
            )
        else:
            self.model = reco.BiasedMF(
                n_factors=dim,
                bias_optimizer=optim.SGD(lr / 5),
                latent_optimizer=optim.SGD(lr),
                l2_bias=l2,
                l2_latent=l2,
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


class ItemKNN:
    """Online item-based neighbourhood over exact co-occurrence counts.

    Every first interaction of a user with an item adds one to ``c(i, h)`` for each item ``h``
    the user took before (so the counts are exactly ``RᵀR`` of the binary interaction matrix
    so far) and one to ``n_i``. The similarity is the asymmetric cosine of Aiolli ("Efficient
    top-N recommendation for very large scale binary rated datasets", RecSys 2013),
    ``c(h, j) / (n_h^α · n_j^(1-α) + shrink)`` (α = 0.5: cosine); a user's score of ``j``
    sums it over the user's last ``window`` items (0: all). Ties, including users whose items
    have no co-occurrences yet, are broken by popularity.
    """

    name = "item-knn"

    def __init__(
        self, split: Split, *, window: int = 20, shrink: float = 0.0, alpha: float = 0.5
    ) -> None:
        self.window = int(window)
        self.shrink = float(shrink)
        self.alpha = float(alpha)
        self.co: list[dict[int, float]] = [{} for _ in range(split.n_items)]
        self.count = np.zeros(split.n_items, dtype=np.float64)
        self.hist: list[list[int]] = [[] for _ in range(split.n_users)]
        self.taken: list[set[int]] = [set() for _ in range(split.n_users)]

    def warm(self, split: Split) -> None:
        for u, i in zip(
            split.users[: split.cut].tolist(), split.items[: split.cut].tolist(), strict=True
        ):
            self.learn(u, i, 1.0, 0.0)

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int] | None:
        hist = self.hist[user]
        if not hist:
            return None
        recent = hist[-self.window :] if self.window > 0 else hist
        scores = np.zeros(len(self.count), dtype=np.float64)
        pow_j = self.count ** (1.0 - self.alpha)
        for h in recent:
            row = self.co[h]
            if not row:
                continue
            js = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
            cs = np.fromiter(row.values(), dtype=np.float64, count=len(row))
            scores[js] += cs / (self.count[h] ** self.alpha * pow_j[js] + self.shrink)
        top = self.count.max()
        scores += 1e-9 * self.count / top  # popularity breaks ties
        return top_k(scores, k, seen, self.count > 0)

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        hist = self.hist[user]
        if item in self.taken[user]:
            hist.remove(item)  # the most recent touch goes last
        else:
            self.taken[user].add(item)
            self.count[item] += 1.0
            row = self.co[item]
            for h in hist:
                row[h] = row.get(h, 0.0) + 1.0
                other = self.co[h]
                other[item] = other.get(item, 0.0) + 1.0
        hist.append(item)


class ImplicitALS:
    """implicit's ALS fitted on the warm start, re-folded exactly per streamed event.

    Per event the user's row and then the item's row are solved in closed form,
    ``x_u = (YᵀY + λI + Yᵀ(C_u − I)Y)⁻¹ YᵀC_u p_u`` with ``C_u = α·r_u`` (the equation implicit's
    ``recalculate_user`` solves, Hu, Koren & Volinsky, ICDM 2008), against Gramians kept
    current by rank-one swaps (recomputed exactly every :data:`REFRESH` updates).
    """

    name = "implicit-als"
    #: Updates between exact recomputations of the Gramians.
    REFRESH = 4096

    def __init__(
        self,
        split: Split,
        seed: int,
        *,
        factors: int = 32,
        regularization: float = 0.01,
        alpha: float = 1.0,
        iterations: int = 15,
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        self.model = AlternatingLeastSquares(
            factors=int(factors),
            regularization=float(regularization),
            alpha=float(alpha),
            iterations=int(iterations),
            num_threads=1,
            random_state=seed,
        )
        self.reg = float(regularization)
        self.alpha = float(alpha)
        self.rows: list[dict[int, float]] = [{} for _ in range(split.n_users)]
        self.cols: list[dict[int, float]] = [{} for _ in range(split.n_items)]
        self.is_seen = np.zeros(split.n_items, dtype=bool)
        self.has_user = np.zeros(split.n_users, dtype=bool)
        self.x = np.zeros((split.n_users, int(factors)))
        self.y = np.zeros((split.n_items, int(factors)))
        self.xtx = np.zeros((int(factors), int(factors)))
        self.yty = np.zeros_like(self.xtx)
        self.updates = 0

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
            shape=(len(self.x), len(self.y)),
        ).tocsr()  # duplicates are summed
        self.model.fit(m, show_progress=False)
        uf, itf = self.model.user_factors, self.model.item_factors
        self.x[: len(uf)] = uf
        self.y[: len(itf)] = itf
        self._refresh()

    def _refresh(self) -> None:
        self.xtx = self.x.T @ self.x
        self.yty = self.y.T @ self.y

    def _solve(self, other: np.ndarray, gram: np.ndarray, row: dict[int, float]) -> np.ndarray:
        ids = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        conf = self.alpha * np.fromiter(row.values(), dtype=np.float64, count=len(row))
        f = other[ids]
        a = gram + (f.T * (conf - 1.0)) @ f
        a[np.diag_indices_from(a)] += self.reg
        return np.linalg.solve(a, f.T @ conf)

    def rank(self, user: int, k: int, seen: set[int] | None) -> list[int] | None:
        if not self.has_user[user]:
            return None
        return top_k(self.y @ self.x[user], k, seen, self.is_seen)

    def learn(self, user: int, item: int, weight: float, ts: float) -> None:
        row, col = self.rows[user], self.cols[item]
        row[item] = row.get(item, 0.0) + weight
        col[user] = col.get(user, 0.0) + weight
        self.is_seen[item] = True
        self.has_user[user] = True
        new = self._solve(self.y, self.yty, row)
        old = self.x[user]
        self.xtx += np.outer(new, new) - np.outer(old, old)
        self.x[user] = new
        new = self._solve(self.x, self.xtx, col)
        old = self.y[item]
        self.yty += np.outer(new, new) - np.outer(old, old)
        self.y[item] = new
        self.updates += 1
        if self.updates % self.REFRESH == 0:
            self._refresh()


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
        # CPU time of this thread: on a shared machine wall time would charge the update
        # with whatever else runs (every method learns on this one thread).
        t = time.thread_time()
        method.learn(u, i, weights[j], ts[j])
        learn_s += time.thread_time() - t
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
    import engine.datasets

    if args.data is not None:
        ds = engine.datasets.load(args.data, args.format)
        source = {
            "data": str(args.data),
            "format": args.format,
            "weights": "file" if args.weights else "every event 1 (implicit)",
        }
        weights = ds.weights if args.weights else np.ones(len(ds), dtype=np.float64)
        ts = ds.ts
        if len(ts) and (not ds.timed or ts.min() < TIME_BASE):
            # Row numbers, or times that are no unix seconds: the model refuses times before
            # 1990. Decay and trending see only differences, so a shift changes nothing else.
            ts = ts - ts.min() + TIME_BASE
            source["times"] = f"shifted to start at {TIME_BASE:.0f} (unix seconds)"
        return Split(ds.users, ds.items, weights, ts), source
    config = engine.datasets.SyntheticConfig(
        n_events=args.events,
        n_users=args.users,
        n_items=args.items,
        zipf=args.zipf,
        seed=args.seed,
    )
    s = engine.datasets.generate(config)
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


PEER_NAMES = ("popularity", "item-knn", "river-funkmf", "river-biasedmf", "implicit-als")
#: The Python module each peer needs.
PEER_MODULES = {
    "popularity": None,
    "item-knn": None,
    "river-funkmf": "river.reco",
    "river-biasedmf": "river.reco",
    "implicit-als": "implicit.cpu.als",
}


def default_params(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A method's settings before tuning: ours are ModelConfig fields (plus ``--config``);
    every learner gets the same number of factors as ours."""
    from engine import ModelConfig

    if name == "recstream":
        base = ModelConfig()
        return {**{k: getattr(base, k) for k in GRIDS["recstream"]}, **overrides}
    dim = int(overrides.get("dim", ModelConfig().dim))
    return {
        "popularity": {},
        "item-knn": {"window": 20, "shrink": 0.0, "alpha": 0.5},
        "river-funkmf": {"n_factors": dim, "lr": 0.05, "l2": 0.001},
        "river-biasedmf": {"n_factors": dim, "lr": 0.05, "l2": 0.001},
        "implicit-als": {"factors": dim, "regularization": 0.01, "alpha": 1.0, "iterations": 15},
    }[name]


def make_method(name: str, split: Split, params: dict[str, Any], args: argparse.Namespace) -> Any:
    """A fresh instance of method ``name`` with ``params``."""
    if name == "recstream":
        return Ours(params, args.fit_iterations)
    if name == "popularity":
        return Popularity(split.n_items)
    if name == "item-knn":
        return ItemKNN(split, **params)
    if name in ("river-funkmf", "river-biasedmf"):
        kind = "FunkMF" if name == "river-funkmf" else "BiasedMF"
        return RiverMF(kind, split, args.negatives, args.seed, **params)
    if name == "implicit-als":
        return ImplicitALS(split, args.seed, **params)
    raise ValueError(f"unknown method {name!r}")


def unavailable(names: Sequence[str]) -> dict[str, str]:
    """The reason each peer that cannot run is skipped."""
    skipped = {}
    for name in names:
        module = PEER_MODULES[name]
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError as e:
            package = module.split(".")[0]
            skipped[name] = f"{package} is not importable ({e}); pip install {package}"
    return skipped


def evaluate(
    name: str,
    split: Split,
    params: dict[str, Any],
    positions: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``stream_eval`` of a fresh ``name``; peers without a vector for a user fall back to
    popularity (ours answers every user itself)."""
    method = make_method(name, split, params, args)
    alone = name in ("recstream", "popularity")
    fallback = None if alone else Popularity(split.n_items)
    sampled = len(positions) < len(split) - split.cut
    return stream_eval(method, split, positions, fallback, every_event=sampled and alone)


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


def sample_size(n_stream: int, requested: int | None) -> int:
    """Evaluated events: all up to :data:`EVAL_ALL_BELOW` streamed events unless asked."""
    if requested is not None:
        return requested
    return 0 if n_stream <= EVAL_ALL_BELOW else 5_000


def results_name(args: argparse.Namespace) -> str:
    if args.name:
        return str(args.name)
    if args.data is None:
        return "quality"
    path = Path(args.data)
    stem = path.parent.name if path.stem in ("events", "ratings", "u", "data") else path.stem
    return f"quality-{stem}"


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.quick:
        args.events, args.users, args.items = 10_000, 1_000, 500
        args.eval_sample = min(args.eval_sample, 500) if args.eval_sample else 500
        args.fit_iterations = min(args.fit_iterations, 5)
        args.tune_budget = min(args.tune_budget, 3)
    overrides = json.loads(args.config)
    limits = _single_blas_thread()  # noqa: F841  (kept alive for the run)

    from engine import ModelConfig

    split, source = load_split(args)
    n_stream = len(split) - split.cut
    positions = eval_positions(n_stream, sample_size(n_stream, args.eval_sample), args.seed)
    peers = PEER_NAMES if args.peers == "all" else tuple(args.peers.split(","))
    unknown = set(peers) - set(PEER_NAMES)
    if unknown:
        sys.exit(f"unknown peers {sorted(unknown)}; choose from {PEER_NAMES}")
    print(
        f"quality: {len(split)} events, {split.n_users} users, {split.n_items} items; "
        f"warm start {split.cut}, streamed {n_stream}, evaluated {len(positions)}"
    )
    skipped = unavailable(peers)
    for name, reason in skipped.items():
        print("\n" + "!" * 72 + f"\n!!! SKIPPED peer {name}: {reason}\n" + "!" * 72)
    names = ["recstream", *(p for p in peers if p not in skipped)]
    params = {name: default_params(name, overrides) for name in names}
    name = results_name(args)
    out_dir = Path(args.results_dir)
    if args.tune:
        params = tune(args, split, names, params, source, out_dir / f"{name}_tune.json")
    elif args.params is not None:
        tuned = json.loads(Path(args.params).read_text())["tuned"]
        params = {m: tuned.get(m, params[m]) for m in names}

    results: dict[str, dict[str, Any]] = {}
    for method in names:
        results[method] = evaluate(method, split, params[method], positions, args)
        _progress(method, results[method])

    rows, breakdown = summarise(results)
    ours_config = {"auto_reindex": False, **params["recstream"]}
    extra = {
        "command": command_line(args),
        "protocol": "test-then-train, He et al. SIGIR 2016 section 5.1; warm start 90%",
        "source": source,
        "model_config": _config_dict(ModelConfig(**ours_config)),
        "method_params": {m: params[m] for m in names},
        "tuned": bool(args.tune),
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
    path = write_results(name, rows, extra, out=out_dir)
    plot(results, positions, split, out_dir / f"{name}.png")
    print_table(rows, breakdown, results)
    print(f"wrote {path} and {out_dir / (name + '.png')}")
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
                            "ours_minus_each_peer": {
                                m: {
                                    g: paired_difference(
                                        results["recstream"]["scores"],
                                        results[m]["scores"],
                                        variant,
                                        metric,
                                        k,
                                        g,
                                    )
                                    for g in GROUPS
                                }
                                for m in peers
                            },
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
    ours: Scores, peer: Scores | None, variant: str, metric: str, k: int, group: str = "all"
) -> dict[str, float] | None:
    """Mean and standard error of ours minus the peer over the same evaluated events.

    Both methods are scored on the same events, so the paired difference has a much smaller
    error than the two means apart; ``|mean| > 2 se`` is a difference the sample supports.
    ``group`` restricts it to events of users known at the split or new in the stream.
    """
    if peer is None or ours.n != peer.n:
        return None
    d = ours.per_event(variant, metric, k) - peer.per_event(variant, metric, k)
    if group != "all":
        known = ours.known[: ours.n]
        d = d[known if group == "known" else ~known]
    if len(d) < 2:
        return None
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


def tune(
    args: argparse.Namespace,
    split: Split,
    names: Sequence[str],
    start: dict[str, dict[str, Any]],
    source: dict[str, Any],
    path: Path,
) -> dict[str, dict[str, Any]]:
    """Coordinate search of every method over its :data:`GRIDS` on a validation split.

    The warm start (first 90% of the stream) is itself cut 90/10: each candidate trains on the
    first part and is scored test-then-train on the rest. One parameter moves at a time,
    starting from the method's defaults; the best value is kept before the next parameter.
    Every method gets the same budget of ``--tune-budget`` trials. The objective is HR@100
    with seen items excluded (the served default).

    Returns:
        The tuned settings of every method (the trials are written to ``path``).
    """
    val = split.head(WARM_FRACTION)
    n_val = len(val) - val.cut
    positions = eval_positions(n_val, sample_size(n_val, args.eval_sample), args.seed)
    print(
        f"tune: validation split of the warm start: train {val.cut}, "
        f"test-then-train {n_val}, evaluated {len(positions)}; "
        f"budget {args.tune_budget} trials per method"
    )
    tuned: dict[str, dict[str, Any]] = {}
    trials: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        tuned[name], trials[name] = tune_method(name, val, positions, start[name], args)
    figures = {
        m: {
            "defaults": next(t for t in trials[m] if t["params"] == start[m]),
            "tuned": next(t for t in trials[m] if t["params"] == tuned[m]),
        }
        for m in names
    }
    rows = [
        row(
            f"validation hr@100/exclude-seen {m} (tuned vs defaults)",
            figures[m]["tuned"]["hr@100/exclude-seen"],
            figures[m]["defaults"]["hr@100/exclude-seen"],
            "fraction",
            {"peer_name": "defaults", "tuned": tuned[m], "defaults": start[m]},
        )
        for m in names
    ]
    extra = {
        "command": command_line(args),
        "source": source,
        "objective": "hr@100/exclude-seen on the validation split inside the warm start",
        "budget": args.tune_budget,
        "grids": {m: {k: list(v) for k, v in GRIDS[m].items()} for m in names},
        "defaults": {m: start[m] for m in names},
        "tuned": tuned,
        "trials": trials,
    }
    written = write_results(path.stem, rows, extra, out=path.parent)
    print(f"tuned {tuned}; wrote {written}")
    return tuned


def tune_method(
    name: str,
    val: Split,
    positions: np.ndarray,
    start: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One method's coordinate search; returns the best settings and every trial."""
    trials: list[dict[str, Any]] = []
    cache: dict[str, float] = {}

    def score(params: dict[str, Any]) -> float:
        key = json.dumps(params, sort_keys=True)
        if key not in cache:
            began = time.perf_counter()
            r = evaluate(name, val, params, positions, args)
            s: Scores = r["scores"]
            figs = {
                f"{m}@{k}/{v}": s.mean(v, m, k)
                for k in KS
                for v in VARIANTS
                for m in ("hr", "ndcg")
            }
            cache[key] = figs["hr@100/exclude-seen"] or 0.0
            trials.append({"params": params, **figs, "updates_per_s": r["updates_per_s"]})
            print(
                f"  {name:15s} {key:70s} hr@100/excl {cache[key]:.4f}  "
                f"({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
        return cache[key]

    current = dict(start)
    best = score(current)
    for param, values in GRIDS[name].items():
        for value in values:
            if len(cache) >= args.tune_budget:
                return current, trials
            candidate = {**current, param: value}
            s = score(candidate)
            if s > best:
                best, current = s, candidate
    return current, trials


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
        if args.weights:
            parts.append("--weights")
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
        ("--name", args.name, None),
        ("--params", args.params, None),
    ):
        if value != default:
            parts += [flag, f"'{value}'" if flag == "--config" else str(value)]
    if not args.quick:
        if args.eval_sample is not None:
            parts += ["--eval-sample", str(args.eval_sample)]
        if args.fit_iterations != 10:
            parts += ["--fit-iterations", str(args.fit_iterations)]
    if args.tune:
        parts.append("--tune")
        if args.tune_budget != TUNE_BUDGET and not args.quick:
            parts += ["--tune-budget", str(args.tune_budget)]
    return " ".join(parts)
