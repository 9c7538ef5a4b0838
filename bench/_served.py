"""Served-path benchmark: what one recommendation costs, from the model down to the index.

A model learns a synthetic stream (``--events`` over ``--users`` and ``--items``; or a real
data set with ``--data``), then ``--cold`` new users each get one or two events, so their
lists take the cold-start blend (few events: the popular and the personal lists mixed). On
one thread, for ``k = 10``:

* ``Model.recommend`` per user, warm users (every user of the stream) and cold users apart;
* ``Model.recommend_batch`` over ``--batch`` users per call, per user;
* ``Model.recommend_batch_json`` likewise: the batched recompute of the push path (the
  publisher computes every group of subscribers' lists with it), per user, with a goal row:
  at most 1.5× the CPU of the raw batched search below;
* the raw index search: ``engine.Index`` (the extension's HNSW index) built from the model's
  item vectors and queried with its user vectors, one query per call and ``search_batch``
  (the model's lists start from it for catalogs of ``exact_below`` items or more, and from
  the exact scan below, which a batch's users share);
* hnswlib on the same vectors with the same M, ef_construction and ef (the peer);
* the push's write: ``engine.write_text_frame`` (the publisher's direct write: the
  socket's queue checked, the frame header and the message written in one call) against
  wsproto framing the same message plus ``socket.send`` (the layer under Hypercorn's ASGI
  send, the peer), to a loopback TCP socket that a child process drains; per message;
* the publisher's hand-over of a computed list around that write (the checks, the message
  text, the bookkeeping and the metrics hook), per message, no peer.

For each: queries/s (wall) and CPU microseconds per query (``time.process_time``, every
thread of this process). A recommendation does more than a search (seen items excluded,
re-ranking, ids mapped back, a Python list built), so the gap between the model's rows and the
index rows is what the served path adds to the search.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench._common import print_rows, require_release, row, skip_peer, write_results

K = 10
REPEATS = 3  # each measurement is the best of this many passes
# The hand-over's passes take a few milliseconds each: the best of more of them.
HANDOVER_REPEATS = 30
GOAL_VS_SEARCH = 1.5  # batched recompute per user: at most this times the raw search's CPU


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "served", help="Model.recommend / recommend_batch per user vs Index and hnswlib search"
    )
    p.add_argument("--events", type=int, default=500_000, help="stream events (default 500k)")
    p.add_argument("--users", type=int, default=50_000, help="users (default 50k)")
    p.add_argument("--items", type=int, default=20_000, help="items (default 20k)")
    p.add_argument("--data", help="a real data set instead of the synthetic stream")
    p.add_argument(
        "--format", default=None, help="the data set's format (see engine.datasets.load)"
    )
    p.add_argument("--queries", type=int, default=2000, help="warm users queried (default 2000)")
    p.add_argument("--cold", type=int, default=1000, help="cold users queried (default 1000)")
    p.add_argument("--batch", type=int, default=100, help="users per recommend_batch call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 30k events, 3000 users, 1000 items, 300 warm and 100 cold queries",
    )
    p.set_defaults(func=run)


def timed(fn: Callable[[], Any], n: int, repeats: int = REPEATS) -> dict[str, float]:
    """Best of ``repeats`` passes of ``fn`` (which answers ``n`` queries): queries/s and
    CPU microseconds per query."""
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall0)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
    return {"qps": n / best_wall, "cpu_us": 1e6 * best_cpu / n, "queries": n}


# Drains a loopback connection in a child process (so its CPU is not this process's).
_DRAIN = "import socket,sys\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\nwhile s.recv(1<<20):pass"


def push_writes(lists: list[tuple[list[Any], str]]) -> dict[str, dict[str, float]]:
    """CPU per push message written: ours (``write_text_frame``) and wsproto's framing plus
    ``socket.send``, to one loopback connection drained by a child process."""
    from wsproto import ConnectionType
    from wsproto.connection import Connection
    from wsproto.events import TextMessage

    from engine import write_text_frame

    texts = [
        f'{{"user":"u{n}","version":{n},"items":{entries}}}' for n, (_, entries) in enumerate(lists)
    ]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", _DRAIN, str(port)])
        sock, _ = listener.accept()
    with sock:
        limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4
        fd, ws = sock.fileno(), Connection(ConnectionType.SERVER)

        def ours() -> None:
            for text in texts:
                deadline = time.monotonic() + 10
                while (outcome := write_text_frame(fd, text, limit)) != 1:
                    if outcome == 2 or time.monotonic() > deadline:
                        raise RuntimeError("the draining child stopped reading")
                    time.sleep(0.0001)  # declined: the child is behind

        def peer() -> None:
            for text in texts:
                sock.sendall(ws.send(TextMessage(data=text)))

        out = {"push_write": timed(ours, len(texts)), "wsproto_write": timed(peer, len(texts))}
    child.wait(10)
    return out


def push_handovers(lists: list[tuple[list[Any], str]]) -> dict[str, float]:
    """CPU per list handed over by the publisher (``Publisher._deliver``: the checks, the
    message, the bookkeeping, the metrics hook the server installs), one subscriber per list,
    every list new to its subscriber, a ``deliver`` that takes each at once (its write is the
    ``push_write`` row): the Python around each write, with the interpreter set up as the
    server sets it up."""
    from engine._engine import _Interpreter
    from engine._metrics import Metrics
    from engine._publisher import Cause, Publisher, Subscription

    metrics = Metrics()
    publisher = Publisher(
        None,  # type: ignore[arg-type]  # no model: the lists are made before the timing
        on_pushes=lambda handed: metrics.pushed(handed, time.time()),
    )
    subs = [Subscription(user=f"u{n}", k=K) for n in range(len(lists))]
    for sub in subs:
        sub.deliver = lambda _text: True
        publisher.subscribe(sub)
    # Each round's input, made before the timing: the round's number among the top items makes
    # every list new to its subscriber.
    rounds = iter(
        [
            (
                seq,
                dict[Any, Cause | None](
                    (sub.user, Cause(seq, f"e{seq}", time.time())) for sub in subs
                ),
                [([*items, seq], items, entries) for items, entries in lists],
            )
            for seq in range(1, HANDOVER_REPEATS + 1)
        ]
    )
    jobs: list[tuple[Subscription, list[Any]]] = [(sub, []) for sub in subs]

    def hand_over() -> None:
        seq, pending, listings = next(rounds)
        publisher._deliver(  # noqa: SLF001 - the hand-over itself is what is measured
            pending, jobs, listings, seq, 0, time.monotonic(), drift=False
        )

    before = publisher.pushes
    # The interpreter set up as the server sets it up (what is alive frozen out of the cyclic
    # collector's sight), so a collection walks what the hand-over allocated, not this process.
    interpreter = _Interpreter()
    interpreter.install()
    try:
        out = timed(hand_over, len(subs), HANDOVER_REPEATS)
    finally:
        interpreter.remove()
    if publisher.pushes - before != HANDOVER_REPEATS * len(subs):
        raise RuntimeError("not every list was handed over")
    return out


def train(args: argparse.Namespace) -> tuple[Any, np.ndarray, list[int], np.ndarray]:
    """The model, the warm users to query, the cold users (added here) to query and every
    item id."""
    import engine.datasets

    if args.data:
        ds = engine.datasets.load(args.data, args.format)
        users, items, weights, ts = ds.users, ds.items, ds.weights, ds.ts
    else:
        stream = engine.datasets.generate(
            engine.datasets.SyntheticConfig(
                n_events=args.events,
                n_users=args.users,
                n_items=args.items,
                seed=args.seed,
            )
        )
        users, items, weights, ts = stream.users, stream.items, stream.weights, stream.ts
    model = engine.Model(engine.ModelConfig(seed=args.seed))
    for s in range(0, len(users), 50_000):
        model.ingest(
            users[s : s + 50_000],
            items[s : s + 50_000],
            weights=np.asarray(weights[s : s + 50_000], dtype=np.float64),
            ts=ts[s : s + 50_000],
        )
    rng = np.random.default_rng(args.seed)
    known = np.unique(users)
    warm = rng.choice(known, size=min(args.queries, len(known)), replace=False)
    # Cold users: new ids with one or two events each on items drawn like the stream's.
    first = int(known.max()) + 1
    cold = list(range(first, first + args.cold))
    cold_users = [u for u in cold for _ in range(1 + u % 2)]
    picks = rng.integers(0, len(items), len(cold_users))
    now = float(np.max(ts))
    model.ingest(cold_users, items[picks], ts=[now] * len(cold_users))
    model.reindex(None)
    return model, warm, cold, np.unique(items)


def run(args: argparse.Namespace) -> int:
    require_release()
    from engine import Index

    if args.quick:
        args.events, args.users, args.items, args.queries, args.cold = 30_000, 3000, 1000, 300, 100
    t = time.perf_counter()
    model, warm, cold, all_items = train(args)
    cfg = model.config()
    print(
        f"served: model of {model.stats()['events_applied']:,} events trained in "
        f"{time.perf_counter() - t:.1f} s; {len(warm)} warm and {len(cold)} cold users",
        flush=True,
    )
    warm_ids = [int(u) for u in warm]
    runs: dict[str, dict[str, float]] = {}
    runs["recommend_warm"] = timed(lambda: [model.recommend(u, K) for u in warm_ids], len(warm_ids))
    runs["recommend_cold"] = timed(lambda: [model.recommend(u, K) for u in cold], len(cold))
    everyone = warm_ids + cold
    batches = [everyone[s : s + args.batch] for s in range(0, len(everyone), args.batch)]
    runs["recommend_batch"] = timed(
        lambda: [model.recommend_batch(b, K) for b in batches], len(everyone)
    )
    runs["recommend_batch_json"] = timed(
        lambda: [model.recommend_batch_json(b, K) for b in batches], len(everyone)
    )
    # The raw search on the model's own vectors.
    found = [model.item_vector(int(i)) for i in all_items]
    vectors = np.stack([v for v in found if v is not None]).astype(np.float32)
    queries = np.stack([model.user_vector(u) for u in warm_ids]).astype(np.float32)
    m, efc, ef = cfg["hnsw_m"], cfg["ef_construction"], cfg["ef_search"]
    index = Index(vectors.shape[1], m=m, ef_construction=efc, ef_search=ef, seed=args.seed)
    index.add(np.arange(len(vectors), dtype=np.uint32), vectors)
    runs["index_search"] = timed(lambda: [index.search(q, K, ef=ef) for q in queries], len(queries))
    runs["index_search_batch"] = timed(
        lambda: [
            index.search_batch(queries[s : s + args.batch], K, ef=ef)
            for s in range(0, len(queries), args.batch)
        ],
        len(queries),
    )
    try:
        import hnswlib
    except ImportError:
        hnsw = None
        skip_peer("hnswlib", "not installed (pip install hnswlib)")
    else:
        hnsw = hnswlib.Index(space="ip", dim=vectors.shape[1])
        hnsw.init_index(max_elements=len(vectors), M=m, ef_construction=efc, random_seed=args.seed)
        hnsw.set_num_threads(1)
        hnsw.add_items(vectors, np.arange(len(vectors)), num_threads=1)
        hnsw.set_ef(max(ef, K))
        runs["hnswlib_search"] = timed(
            lambda: [hnsw.knn_query(q, k=K, num_threads=1) for q in queries], len(queries)
        )
        runs["hnswlib_search_batch"] = timed(
            lambda: [
                hnsw.knn_query(queries[s : s + args.batch], k=K, num_threads=1)
                for s in range(0, len(queries), args.batch)
            ],
            len(queries),
        )
    computed = [t for b in batches[:10] for t in model.recommend_batch_json(b, K)]
    runs.update(push_writes(computed))
    runs["push_handover"] = push_handovers(computed)
    for name, r in runs.items():
        print(f"  {name:22s} {r['qps']:>10,.0f} queries/s  {r['cpu_us']:8.1f} µs CPU", flush=True)

    def peer(name: str, key: str) -> float | None:
        return runs[name][key] if name in runs else None

    params = {
        "k": K,
        "ef": ef,
        "m": m,
        "ef_construction": efc,
        "items": len(vectors),
        "dim": vectors.shape[1],
        "batch": args.batch,
        "peer_name": "hnswlib" if hnsw is not None else None,
    }
    rows = []
    for name, single in (
        ("recommend_warm", True),
        ("recommend_cold", True),
        ("recommend_batch", False),
        ("recommend_batch_json", False),
        ("index_search", True),
        ("index_search_batch", False),
    ):
        ref = "hnswlib_search" if single else "hnswlib_search_batch"
        p = {**params, "queries": runs[name]["queries"], "peer_is": ref}
        rows.append(row(f"{name}_qps", runs[name]["qps"], peer(ref, "qps"), "queries/s", p))
        rows.append(
            row(
                f"{name}_cpu_us",
                runs[name]["cpu_us"],
                peer(ref, "cpu_us"),
                "µs CPU/query",
                p,
                lower_is_better=True,
            )
        )
    p = {"messages": runs["push_write"]["queries"], "peer_name": "wsproto + socket.send"}
    rows.append(
        row(
            "push_write_cpu_us",
            runs["push_write"]["cpu_us"],
            runs["wsproto_write"]["cpu_us"],
            "µs CPU/message",
            {**p, "peer_is": "wsproto_write"},
            lower_is_better=True,
        )
    )
    rows.append(
        row(
            "push_handover_cpu_us",
            runs["push_handover"]["cpu_us"],
            None,
            "µs CPU/message",
            {"messages": runs["push_handover"]["queries"], "peer_name": None},
            lower_is_better=True,
        )
    )
    # The served path's own goal: a batched recompute costs at most GOAL_VS_SEARCH times the
    # raw batched search of the same users' vectors.
    goal = GOAL_VS_SEARCH * runs["index_search_batch"]["cpu_us"]
    rows.append(
        row(
            "recommend_batch_json_cpu_us_vs_goal",
            runs["recommend_batch_json"]["cpu_us"],
            goal,
            "µs CPU/query",
            {**params, "peer_name": f"goal: {GOAL_VS_SEARCH}× index_search_batch"},
            lower_is_better=True,
        )
    )
    path = write_results(
        "served",
        rows,
        {
            "params": {
                k: getattr(args, k)
                for k in (
                    "events",
                    "users",
                    "items",
                    "data",
                    "queries",
                    "cold",
                    "batch",
                    "seed",
                    "quick",
                )
            },
            "peer": "hnswlib" if hnsw is not None else None,
            "runs": runs,
            "note": (
                "one thread; the model rows include excluding seen items, re-ranking, the "
                "cold-start blend and building the Python result (or the JSON text), the index "
                "rows only the search; the peer of every row is hnswlib's search on the same "
                "item vectors, but the goal row's, which is 1.5x index_search_batch"
            ),
        },
    )
    print_rows(rows)
    print(f"wrote {path}")
    return 0
