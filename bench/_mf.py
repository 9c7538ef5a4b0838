"""Model-update benchmark: online eALS updates per second, against River's MF.

The stream is the synthetic one (Zipf item popularity, lognormal user activity, a funnel of
event types, users and items arriving over time), fed in order to ``engine.Model.ingest`` in
batches, as the server's model actor applies journal groups. Throughput is reported two ways:
events / CPU seconds of this process (``time.process_time``: user + system time of every
thread, the kernel's per-process count that ``/proc/PID/stat`` also shows), which is per core
whatever other load the machine has, and events / wall seconds, which is what the machine's
cores deliver together (the batched path solves on every core).

Runs:

1. dim 64 without index maintenance (``auto_reindex=False``, as the server runs the model: its
   index actor re-links moved items separately) over the whole stream, on the default batched
   path (``batch_apply=True``);
2. the same with ``auto_reindex=True`` (every batch also re-links the items it moved in the
   HNSW index) on a prefix of the stream;
3. dim 32 over the whole stream, to show how the cost scales with the dimension;
4. the per-event path (``batch_apply=False``: the user and the item are solved after every
   event) on the same prefix, to show what coalescing and parallel solves buy;
5. River's ``reco.FunkMF`` and ``reco.BiasedMF`` (plain SGD, one ``learn_one`` per event) on a
   short prefix, against ours on that same prefix and dimension.

The goal is 1M events/s per core; the bar is 100k events/s on two cores (wall). An eALS
update is not an SGD step: it solves every coordinate of the user's and the item's vector
exactly, which costs O((user_history_cap + item_history_cap) * dim + dim^2) per solve (the
histories for the observed terms, the cached Gramian for the missing-data term, and a rank-one
Gramian update). Per event that made thousands to tens of thousands of events/s per core on a
skewed stream, where a hot item with a full history of 512 users was solved for every one of
its events. The batched path records every event of a batch (histories, counts, trending,
neighbours) and then solves each touched user once and each touched item once, in parallel,
so a hot item costs one solve per batch. River's SGD step is O(dim) per event, cheaper per
event but a much weaker update.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from bench._common import print_rows, require_release, row, skip_peer, write_results

GOAL = 1_000_000.0  # events/s per core
BAR = 100_000.0  # events/s on two cores (wall), dim 64, default caps
SMALL_CAPS = (32, 64)  # user and item history caps of the run that shows what caps cost


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("mf", help="online eALS updates/s per core vs River FunkMF/BiasedMF")
    p.add_argument("--events", type=int, default=1_000_000, help="stream length (default 1M)")
    p.add_argument("--users", type=int, default=50_000, help="users in the stream (default 50k)")
    p.add_argument("--items", type=int, default=20_000, help="items in the stream (default 20k)")
    p.add_argument("--batch", type=int, default=10_000, help="events per ingest call (10000)")
    p.add_argument(
        "--reindex-events",
        type=int,
        default=200_000,
        help="prefix used for the auto_reindex=True run (default 200k)",
    )
    p.add_argument(
        "--peer-events", type=int, default=50_000, help="prefix River learns (default 50k)"
    )
    p.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    p.add_argument(
        "--quick", action="store_true", help="small run: 50k events, 10k reindexed, 3k for River"
    )
    p.set_defaults(func=run)


def measure(
    stream: Any,
    n: int,
    *,
    dim: int,
    auto_reindex: bool,
    batch: int,
    label: str,
    **config: Any,
) -> dict[str, float]:
    """Feeds the first ``n`` events to a fresh model; returns events, CPU and wall seconds.

    ``config`` holds further ``ModelConfig`` fields (the history caps).
    """
    import engine.datasets

    model = engine.Model(engine.ModelConfig(dim=dim, auto_reindex=auto_reindex, **config))
    users, items = stream.users[:n], stream.items[:n]
    weights, ts = stream.weights[:n].astype(np.float64), stream.ts[:n]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    next_report = wall0 + 5.0
    for s in range(0, n, batch):
        model.ingest(
            users[s : s + batch],
            items[s : s + batch],
            weights=weights[s : s + batch],
            ts=ts[s : s + batch],
        )
        if time.perf_counter() > next_report:
            print(f"    {label}: {min(n, s + batch):,}/{n:,} events", flush=True)
            next_report += 5.0
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    applied = model.stats()["events_applied"]
    if applied != n:
        raise RuntimeError(f"{label}: the model applied {applied} of {n} events")
    out = {
        "events": float(n),
        "cpu_s": cpu,
        "wall_s": wall,
        "per_core": n / cpu,
        "wall_rate": n / wall,
    }
    print(
        f"  {label:28s} {out['per_core']:>10,.0f} ev/s per core  ({out['wall_rate']:,.0f} ev/s wall, "
        f"{cpu:.2f} s CPU over {wall:.2f} s)",
        flush=True,
    )
    return out


def measure_river(stream: Any, n: int, *, kind: str, dim: int) -> dict[str, float]:
    """River's MF (``FunkMF`` or ``BiasedMF``) learning the first ``n`` events one by one."""
    from river import optim, reco

    model: Any
    if kind == "FunkMF":
        model = reco.FunkMF(n_factors=dim, optimizer=optim.SGD(0.05), l2=0.01, seed=0)
    else:
        model = reco.BiasedMF(
            n_factors=dim,
            bias_optimizer=optim.SGD(0.05),
            latent_optimizer=optim.SGD(0.05),
            l2_bias=0.01,
            l2_latent=0.01,
            seed=0,
        )
    users = [int(u) for u in stream.users[:n]]
    items = [int(i) for i in stream.items[:n]]
    weights = [float(w) for w in stream.weights[:n]]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for u, i, w in zip(users, items, weights, strict=True):
        model.learn_one(u, i, w)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    out = {
        "events": float(n),
        "cpu_s": cpu,
        "wall_s": wall,
        "per_core": n / cpu,
        "wall_rate": n / wall,
    }
    label = f"River {kind} dim {dim}"
    print(
        f"  {label:28s} {out['per_core']:>10,.0f} ev/s per core  ({out['wall_rate']:,.0f} ev/s wall)",
        flush=True,
    )
    return out


def run(args: argparse.Namespace) -> int:
    require_release()
    import engine.datasets

    if args.quick:
        args.events, args.users, args.items = 50_000, 5_000, 2_000
        args.reindex_events, args.peer_events = 10_000, 3_000
    args.reindex_events = min(args.reindex_events, args.events)
    args.peer_events = min(args.peer_events, args.events)
    try:
        import river

        peer_version: str | None = river.__version__
    except ImportError:
        peer_version = None
        skip_peer("River", "not installed (pip install river)")

    print(
        f"mf: generating {args.events:,} synthetic events ({args.users:,} users, {args.items:,} items)",
        flush=True,
    )
    t0 = time.perf_counter()
    config = engine.datasets.SyntheticConfig(
        n_events=args.events, n_users=args.users, n_items=args.items, seed=args.seed
    )
    stream = engine.datasets.generate(config)
    print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)

    ours64 = measure(
        stream, args.events, dim=64, auto_reindex=False, batch=args.batch, label="ours dim 64"
    )
    ours32 = measure(
        stream, args.events, dim=32, auto_reindex=False, batch=args.batch, label="ours dim 32"
    )
    reindexed = measure(
        stream,
        args.reindex_events,
        dim=64,
        auto_reindex=True,
        batch=args.batch,
        label="ours dim 64 auto_reindex",
    )
    plain_prefix = measure(
        stream,
        args.reindex_events,
        dim=64,
        auto_reindex=False,
        batch=args.batch,
        label="ours dim 64 same prefix",
    )
    per_event = measure(
        stream,
        args.reindex_events,
        dim=64,
        auto_reindex=False,
        batch=args.batch,
        label="ours dim 64 per-event path",
        batch_apply=False,
    )
    small_caps = measure(
        stream,
        args.reindex_events,
        dim=64,
        auto_reindex=False,
        batch=args.batch,
        label="ours dim 64 caps 32/64",
        user_history_cap=SMALL_CAPS[0],
        item_history_cap=SMALL_CAPS[1],
    )
    # The peer comparison is like for like: same prefix, same dimension, and ours in batches
    # no larger than the prefix.
    peer_batch = min(args.batch, args.peer_events)
    ours_slice = {
        dim: measure(
            stream,
            args.peer_events,
            dim=dim,
            auto_reindex=False,
            batch=peer_batch,
            label=f"ours dim {dim} peer prefix",
        )
        for dim in (64, 32)
    }
    river_runs: dict[str, dict[str, float] | None] = {
        "FunkMF64": None,
        "BiasedMF64": None,
        "FunkMF32": None,
    }
    if peer_version is not None:
        river_runs["FunkMF64"] = measure_river(stream, args.peer_events, kind="FunkMF", dim=64)
        river_runs["BiasedMF64"] = measure_river(stream, args.peer_events, kind="BiasedMF", dim=64)
        river_runs["FunkMF32"] = measure_river(stream, args.peer_events, kind="FunkMF", dim=32)

    def per_core(run: dict[str, float] | None) -> float | None:
        return run["per_core"] if run is not None else None

    def wall_rate(run: dict[str, float] | None) -> float | None:
        return run["wall_rate"] if run is not None else None

    common = {
        "batch": args.batch,
        "stream_events": args.events,
        "users": args.users,
        "items": args.items,
    }
    cost_note = (
        "an eALS solve updates every coordinate of a user's or an item's vector: "
        "O(history*dim + dim^2) (caps 256 users' items, 512 items' users); the batched path "
        "solves each user and item of a batch once (a hot item once per batch, not once per "
        "event) on every core; per_core counts the CPU seconds of every thread; the history "
        "term dominates, so the cost grows about linearly with dim (dim64_over_dim32_cost) "
        "and falls with smaller caps; an SGD step (River) is O(dim) but learns one "
        "coordinate direction per event"
    )
    rows = [
        row(
            "updates_dim64_vs_goal",
            ours64["per_core"],
            GOAL,
            "events/s/core",
            {
                **common,
                "dim": 64,
                "auto_reindex": False,
                "wall_rate": ours64["wall_rate"],
                "cpu_s": ours64["cpu_s"],
                "wall_s": ours64["wall_s"],
                "peer_is": "goal",
                "note": cost_note,
            },
        ),
        row(
            "updates_dim64_wall_vs_bar",
            ours64["wall_rate"],
            BAR,
            "events/s",
            {
                **common,
                "dim": 64,
                "auto_reindex": False,
                "cores": os.cpu_count(),
                "cpu_s": ours64["cpu_s"],
                "wall_s": ours64["wall_s"],
                "peer_is": "bar: 100k events/s on two cores",
                "peer_name": "bar, two cores",
                "note": "wall time on a machine shared with other work counts its waits for a core",
            },
        ),
        row(
            "updates_dim64_per_event_path_vs_goal",
            per_event["per_core"],
            GOAL,
            "events/s/core",
            {
                **common,
                "dim": 64,
                "auto_reindex": False,
                "events": args.reindex_events,
                "batch_apply": False,
                "wall_rate": per_event["wall_rate"],
                "peer_is": "goal",
                "batched_same_prefix": plain_prefix["per_core"],
                "batched_same_prefix_wall_rate": plain_prefix["wall_rate"],
            },
        ),
        row(
            "updates_dim32_vs_goal",
            ours32["per_core"],
            GOAL,
            "events/s/core",
            {
                **common,
                "dim": 32,
                "auto_reindex": False,
                "wall_rate": ours32["wall_rate"],
                "peer_is": "goal",
                "dim64_over_dim32_cost": ours32["per_core"] / ours64["per_core"],
            },
        ),
        row(
            "updates_dim64_auto_reindex_vs_goal",
            reindexed["per_core"],
            GOAL,
            "events/s/core",
            {
                **common,
                "dim": 64,
                "auto_reindex": True,
                "events": args.reindex_events,
                "wall_rate": reindexed["wall_rate"],
                "peer_is": "goal",
                "without_reindex_same_prefix": plain_prefix["per_core"],
                "reindex_share_of_cpu": 1 - plain_prefix["cpu_s"] / reindexed["cpu_s"],
            },
        ),
        row(
            "updates_dim64_small_caps_vs_goal",
            small_caps["per_core"],
            GOAL,
            "events/s/core",
            {
                **common,
                "dim": 64,
                "auto_reindex": False,
                "events": args.reindex_events,
                "user_history_cap": SMALL_CAPS[0],
                "item_history_cap": SMALL_CAPS[1],
                "wall_rate": small_caps["wall_rate"],
                "peer_is": "goal",
                "default_caps_same_prefix": plain_prefix["per_core"],
            },
        ),
    ]
    for key, dim, kind in (
        ("FunkMF64", 64, "FunkMF"),
        ("BiasedMF64", 64, "BiasedMF"),
        ("FunkMF32", 32, "FunkMF"),
    ):
        rows.append(
            row(
                f"updates_dim{dim}_vs_river_{kind}",
                ours_slice[dim]["per_core"],
                per_core(river_runs[key]),
                "events/s/core",
                {
                    "dim": dim,
                    "events": args.peer_events,
                    "batch": peer_batch,
                    "auto_reindex": False,
                    "peer_is": f"river.reco.{kind} learn_one (SGD lr 0.05, l2 0.01)"
                    if peer_version
                    else None,
                    "peer_wall_rate": wall_rate(river_runs[key]),
                },
            )
        )
    path = write_results(
        "mf",
        rows,
        {
            "params": {
                **common,
                "reindex_events": args.reindex_events,
                "peer_events": args.peer_events,
                "seed": args.seed,
                "quick": args.quick,
            },
            "peer": f"river {peer_version}" if peer_version else None,
            "runs": {
                "dim64": ours64,
                "dim32": ours32,
                "dim64_auto_reindex": reindexed,
                "dim64_same_prefix": plain_prefix,
                "dim64_small_caps": small_caps,
                "dim64_per_event_path": per_event,
                "ours_peer_prefix": {str(k): v for k, v in ours_slice.items()},
                "river": river_runs,
            },
        },
    )
    print_rows(rows)
    print(f"wrote {path}")
    return 0
