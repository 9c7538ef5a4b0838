"""Restart benchmark: how long a server takes to become ready over a full data directory.

A data directory is written the way a running server leaves it, without running one: the
journal (``wal/``) holds Forward-mode frames of ``--frame-events`` events each, one journal
record per frame exactly as ingestion journals them. Then ``python -m connectors serve`` is
started on it and timed from the spawn to the first ``/readyz`` 200.

Four restarts, each on its own data directory:

1. ``empty``: no data at all; what a restart costs before any replay (interpreter, imports,
   listeners). Its time is the floor of the others.
2. ``journal``: ``--events`` events in the journal and no snapshot: everything is replayed.
   The replay applies groups of journal records in one call each, with coalesced solves on
   every core (the model's default ``batch_apply``).
3. ``journal_per_event``: the same journal replayed with ``batch_apply=False`` (the user and
   the item solved after every event), for comparison.
4. ``snapshot``: a snapshot reflecting ``--snapshot-events`` events (written by the same
   model code the server runs, ``Model.save``), and ``--behind`` events in the journal after
   it (10 million by default: the goal's case, measured; about a minute of replay); the
   segments the snapshot covers are dropped as the server drops them.

For each: wall seconds to ready, and the server's CPU seconds at that moment (user + system,
every thread, from ``/proc/PID/stat``); then the same once the HNSW graph holds every
replayed item (``/v1/stats`` ``index_stale`` 0; the server serves before that, answering by
the exact scan while the graph lacks much of the catalog). The replay rate is the events
replayed over the seconds the server itself logs for its replay (read, decode, apply; the
graph is built after it, while serving), which leaves out the fixed start-up cost; the rate
per CPU second (the server process's CPU time over the replay, every thread, also logged) is
the figure to compare on a loaded machine, where wall time also counts the waits for a core.

Goals (``peer`` in the ``_vs_goal`` rows; ratio >= 1 means met): a replay of at least
300,000 events/s, and a restart with 10 million events behind the newest snapshot within
60 s, i.e. at least 166,667 events behind the snapshot per second of restart.

Beside them: the batched replay against the per-event one of the same journal (events/s
and CPU microseconds per event, ``peer`` the per-event path), and the restart with 10 million
events behind a snapshot: the measured time with the default ``--behind``, else
*extrapolated* from the measured ``snapshot`` run (its time to ready outside the replay, plus
10 million events at its measured replay rate) and labelled so in the row's ``how``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from bench._common import (
    ServerProcess,
    cpu_seconds,
    print_rows,
    require_release,
    row,
    write_results,
)

REPLAY_GOAL = 300_000.0  # events/s
# Seconds from the spawn within which the graph must hold every replayed item.
INDEX_TIMEOUT_S = 1800.0
SNAPSHOT_GOAL = 10_000_000 / 60.0  # events behind the snapshot per second of restart
TAG = "bench.recovery"
APPEND_RECORDS = 512  # journal records per append while writing the data directory
_REPLAYED = re.compile(r"replayed (\d+) journal record\(s\) in ([\d.]+) s \(([\d.]+) s CPU\)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "recovery", help="restart time to ready: journal replay rate, restart after a snapshot"
    )
    p.add_argument("--events", type=int, default=1_000_000, help="journal only (default 1M)")
    p.add_argument(
        "--snapshot-events",
        type=int,
        default=500_000,
        help="events the snapshot reflects (default 500k)",
    )
    p.add_argument(
        "--behind",
        type=int,
        default=10_000_000,
        help="events after the snapshot (default 10M, the goal's case)",
    )
    p.add_argument(
        "--frame-events", type=int, default=100, help="events per journal record (default 100)"
    )
    p.add_argument("--users", type=int, default=100_000, help="distinct users (default 100k)")
    p.add_argument("--items", type=int, default=20_000, help="distinct items (default 20k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 20k events, a snapshot of 10k with 20k behind, 2000 users, 500 items",
    )
    p.set_defaults(func=run)


def make_frames(n: int, args: argparse.Namespace, rng: np.random.Generator) -> list[bytes]:
    """``n`` events as Forward-mode frames of ``--frame-events`` events; popular items are
    more frequent (the square of a uniform draw skews towards the low ids)."""
    users = rng.integers(0, args.users, n).tolist()
    items = (args.items * rng.random(n) ** 2).astype(np.int64).tolist()
    now = time.time()
    frames = []
    for s in range(0, n, args.frame_events):
        entries = [
            [now, {"user": u, "item": i, "type": "click"}]
            for u, i in zip(
                users[s : s + args.frame_events], items[s : s + args.frame_events], strict=True
            )
        ]
        frames.append(msgpack.packb([TAG, entries], use_bin_type=True))
    return frames


def write_data_dir(
    data: Path, snapshot_frames: list[bytes], behind_frames: list[bytes], seed: int
) -> None:
    """The journal holding every frame; a snapshot after ``snapshot_frames`` if any."""
    from engine import Model, ModelConfig
    from engine._events import journal_record
    from engine._journal import Journal
    from engine._recovery import SNAPSHOT

    data.mkdir(parents=True)
    frames = snapshot_frames + behind_frames
    journal, _ = Journal.open(data / "wal", sync="off")
    with journal:
        for s in range(0, len(frames), APPEND_RECORDS):
            journal.append([journal_record(f) for f in frames[s : s + APPEND_RECORDS]])
        if snapshot_frames:
            model = Model(ModelConfig(seed=seed, auto_reindex=False))  # as the server's
            for f in snapshot_frames:
                model.ingest_forward(f)
            model.reindex(None)
            model.save(data / SNAPSHOT, len(snapshot_frames))
            journal.drop_before(len(snapshot_frames) + 1)
        journal.sync()


def restart(data: Path, seed: int, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Starts a server on ``data``; seconds and CPU seconds until ``/readyz`` answers 200.

    ``model`` holds further model settings of the restarted server.
    """
    config = {"sync": "off", "snapshot_interval": 3600.0, "model": {"seed": seed, **(model or {})}}
    began = time.perf_counter()
    with ServerProcess(config, startup_timeout=1800.0, data_dir=data) as server:
        while True:
            try:
                if server.get("/readyz") == b"ready":
                    break
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    raise
            time.sleep(0.005)
        ready_s = time.perf_counter() - began
        cpu_s = cpu_seconds(server.pid)
        # Serving starts before the graph holds the replayed items (the exact scan answers
        # meanwhile); how much later it does is measured too.
        while (stats := server.stats())["index_stale"]:
            if time.perf_counter() - began > INDEX_TIMEOUT_S:
                raise RuntimeError(f"the graph still lacked {stats['index_stale']} items")
            time.sleep(0.005)
        indexed_s = time.perf_counter() - began
        indexed_cpu_s = cpu_seconds(server.pid)
        log = Path(server._log.name).read_text()
        server.kill()  # the orderly shutdown's snapshot is not part of what is measured
    found = _REPLAYED.search(log)
    if found is None:
        raise RuntimeError(f"the server logged no replay figures:\n{log[-3000:]}")
    return {
        "ready_s": ready_s,
        "cpu_s": cpu_s,
        "indexed_s": indexed_s,
        "indexed_cpu_s": indexed_cpu_s,
        "records_replayed": int(found.group(1)),
        "replay_s": float(found.group(2)),
        "replay_cpu_s": float(found.group(3)),
        "events_applied": stats["events_applied"],
    }


def measure(
    name: str,
    snapshot_frames: list[bytes],
    behind_frames: list[bytes],
    seed: int,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recstream-recovery-") as tmp:
        data = Path(tmp) / "data"
        t = time.perf_counter()
        write_data_dir(data, snapshot_frames, behind_frames, seed)
        print(f"  {name}: data directory written in {time.perf_counter() - t:.1f} s", flush=True)
        out = restart(data, seed, model)
    print(
        f"  {name}: ready in {out['ready_s']:.2f} s, {out['cpu_s']:.2f} s CPU; replayed "
        f"{out['records_replayed']:,} records in {out['replay_s']:.2f} s; graph whole after "
        f"{out['indexed_s']:.2f} s, {out['indexed_cpu_s']:.2f} s CPU",
        flush=True,
    )
    return out


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.quick:
        args.events, args.snapshot_events, args.behind = 20_000, 10_000, 20_000
        args.users, args.items = 2000, 500
    print(
        f"recovery: {args.events:,} events in the journal; a snapshot of "
        f"{args.snapshot_events:,} with {args.behind:,} behind; {args.frame_events} per record",
        flush=True,
    )
    rng = np.random.default_rng(args.seed)
    journal_frames = make_frames(args.events, args, rng)
    snap_frames = make_frames(args.snapshot_events, args, rng)
    behind_frames = make_frames(args.behind, args, rng)
    runs = {
        "empty": measure("empty", [], [], args.seed),
        "journal": measure("journal", [], journal_frames, args.seed),
        "journal_per_event": measure(
            "journal_per_event", [], journal_frames, args.seed, {"batch_apply": False}
        ),
        "snapshot": measure("snapshot", snap_frames, behind_frames, args.seed),
    }
    for name, events in (
        ("journal", args.events),
        ("journal_per_event", args.events),
        ("snapshot", args.behind),
    ):
        r = runs[name]
        r["events_replayed"] = events
        r["replay_events_per_s"] = events / r["replay_s"]
        r["restart_events_per_s"] = events / r["ready_s"]
    base = {"frame_events": args.frame_events, "users": args.users, "items": args.items}
    rows = [
        row("restart_empty_ready_s", runs["empty"]["ready_s"], None, "s", base),
        row("restart_empty_cpu_s", runs["empty"]["cpu_s"], None, "s CPU", base),
    ]
    for name, params in (
        ("journal", {**base, "events": args.events, "snapshot": None}),
        (
            "journal_per_event",
            {**base, "events": args.events, "snapshot": None, "batch_apply": False},
        ),
        ("snapshot", {**base, "events": args.behind, "snapshot_events": args.snapshot_events}),
    ):
        r = runs[name]
        rows += [
            row(f"restart_{name}_ready_s", r["ready_s"], None, "s", params),
            row(f"restart_{name}_cpu_s", r["cpu_s"], None, "s CPU", params),
            row(f"restart_{name}_indexed_s", r["indexed_s"], None, "s", params),
            row(f"restart_{name}_indexed_cpu_s", r["indexed_cpu_s"], None, "s CPU", params),
            row(
                f"restart_{name}_replay_events_per_cpu_s",
                r["events_replayed"] / r["replay_cpu_s"],
                None,
                "events/CPU s",
                params,
            ),
            row(
                f"restart_{name}_replay_events_per_s_vs_goal",
                r["replay_events_per_s"],
                REPLAY_GOAL,
                "events/s",
                {**params, "replay_s": r["replay_s"], "replay_cpu_s": r["replay_cpu_s"]},
            ),
        ]
    journal, per_event = runs["journal"], runs["journal_per_event"]
    us_per_event = {
        name: 1e6 * runs[name]["replay_cpu_s"] / runs[name]["events_replayed"]
        for name in ("journal", "journal_per_event", "snapshot")
    }
    jparams = {**base, "events": args.events, "snapshot": None}
    rows += [
        row(
            "restart_journal_replay_events_per_s_vs_per_event",
            journal["replay_events_per_s"],
            per_event["replay_events_per_s"],
            "events/s",
            jparams,
        ),
        row(
            "restart_journal_replay_cpu_us_per_event_vs_per_event",
            us_per_event["journal"],
            us_per_event["journal_per_event"],
            "µs CPU/event",
            jparams,
            lower_is_better=True,
        ),
        row(
            "restart_snapshot_replay_cpu_us_per_event",
            us_per_event["snapshot"],
            None,
            "µs CPU/event",
            {**base, "events": args.behind, "snapshot_events": args.snapshot_events},
        ),
    ]
    snap = runs["snapshot"]
    ten_m = 10_000_000
    measured = args.behind == ten_m
    ten_m_s = (
        snap["ready_s"]
        if measured
        else snap["ready_s"] - snap["replay_s"] + ten_m / snap["replay_events_per_s"]
    )
    rows.append(
        row(
            "restart_10m_behind_snapshot_ready_s_vs_goal",
            ten_m_s,
            60.0,
            "s",
            {
                **base,
                "behind": ten_m,
                "snapshot_events": args.snapshot_events,
                "how": "measured" if measured else f"extrapolated from {args.behind:,} behind",
            },
            lower_is_better=True,
        )
    )
    rows.append(
        row(
            "restart_snapshot_behind_events_per_s_vs_goal",
            runs["snapshot"]["restart_events_per_s"],
            SNAPSHOT_GOAL,
            "events/s",
            {**base, "behind": args.behind, "goal": "10M events behind in 60 s"},
        )
    )
    path = write_results(
        "recovery",
        rows,
        {
            "params": {
                k: getattr(args, k)
                for k in (
                    "events",
                    "snapshot_events",
                    "behind",
                    "frame_events",
                    "users",
                    "items",
                    "seed",
                    "quick",
                )
            },
            "peer": "goals (replay >= 300k events/s; 10M events behind a snapshot in <= 60 s)",
            "runs": runs,
        },
    )
    print_rows(rows)
    print(f"wrote {path}")
    return 0
