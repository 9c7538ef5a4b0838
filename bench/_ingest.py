"""Ingest benchmark: acknowledged events per second over Fluent Forward, against Redis Streams.

A server runs as a subprocess (``python -m connectors serve``) with the journal's default
durability (``sync = "batch"``: fdatasync per group commit) and again with ``sync = "off"``.
Several producer connections each keep a window of PackedForward frames (``batch`` events
each, with a ``chunk`` id) in flight; an event counts only once its frame's ack arrived before
the deadline. The frames are packed before the clock starts and resent in rotation (without
event ids, so every copy is applied), so the producer's own cost is a socket write per frame.

Beside each rate, the server's CPU per acknowledged event: user plus system seconds of the
server process (all its threads, from ``/proc``) over the measured interval, divided by the
events acknowledged in it; for Redis, of the ``redis-server`` process alike.

Acks mean durable in the journal, not applied to the model; but the model actor's inbox is
bounded, so when the model falls behind the journal waits and so do the acks. The first
seconds' acks fill that inbox; the rate over the run's second half is the steady one, and the
rate at which the model applied events during the run is reported beside it. One more run with
a cheap model (``--light-dim``) shows how much of the bound is the model's.

Peer: Redis Streams, ``XADD`` of the same events in pipelined batches of the same size from
the same number of connections (redis-py, one thread per connection), with
``appendonly yes`` and ``appendfsync always`` (fsync before replying, like ``sync = "batch"``)
and ``appendfsync no`` (beside ``sync = "off"``). Skipped loudly when ``redis-server`` or the
``redis`` package is absent.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from typing import Any

import attrs
import msgpack
import trio

from bench._common import (
    ServerProcess,
    child_process,
    cpu_seconds,
    free_port,
    histogram_quantiles,
    print_rows,
    require_release,
    row,
    skip_peer,
    write_results,
)
from engine import ModelConfig

GOAL = 300_000.0  # acknowledged events/s
TAG = "bench.ingest"
POOL_FRAMES = 32  # distinct frames resent in rotation


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ingest", help="acked events/s over Forward (sync batch/off) vs Redis Streams XADD"
    )
    p.add_argument("--seconds", type=float, default=15.0, help="per run (default 15)")
    p.add_argument("--connections", type=int, default=4, help="producer connections (default 4)")
    p.add_argument("--batch", type=int, default=1000, help="events per frame (default 1000)")
    p.add_argument("--window", type=int, default=8, help="frames in flight per connection (8)")
    p.add_argument(
        "--dim",
        type=int,
        default=ModelConfig().dim,
        help="the server model's dim (default: the engine's)",
    )
    p.add_argument(
        "--light-dim",
        type=int,
        default=8,
        help="one more sync=batch run with this cheap model dim, to show where the bound "
        "lies (default 8; 0: skip)",
    )
    p.add_argument("--quick", action="store_true", help="3 s per run")
    p.set_defaults(func=run)


def event_batches(n_batches: int, batch: int) -> list[list[dict[str, Any]]]:
    """``n_batches`` lists of ``batch`` synthetic events (skewed users and items)."""
    import engine.datasets

    stream = engine.datasets.generate(
        engine.datasets.SyntheticConfig(
            n_events=n_batches * batch, n_users=20_000, n_items=10_000, seed=1
        )
    )
    types = engine.datasets.EVENT_TYPES
    events = [
        {"user": int(u), "item": int(i), "type": types[int(t)]}
        for u, i, t in zip(stream.users, stream.items, stream.types, strict=True)
    ]
    return [events[s : s + batch] for s in range(0, len(events), batch)]


# --- ours ---------------------------------------------------------------------------------


@attrs.define
class Window:
    """The measured interval and the events acknowledged inside it (and in its second half,
    when any buffer that absorbed the first seconds is full and only the steady rate is left)."""

    start: float
    seconds: float
    acked: int = 0
    acked_second_half: int = 0

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def count(self, events: int, now: float) -> None:
        if now <= self.deadline:
            self.acked += events
            if now >= self.start + self.seconds / 2:
                self.acked_second_half += events


async def forward_producer(
    address: tuple[str, int],
    bodies: list[bytes],
    batch: int,
    window: int,
    conn: int,
    clock: Window,
) -> None:
    """One connection keeping ``window`` frames unacknowledged until the deadline."""
    stream = await trio.open_tcp_stream(*address)
    credit = trio.Semaphore(window)
    pending: dict[str, int] = {}
    unpacker = msgpack.Unpacker(raw=False)

    async def read_acks() -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("the server closed a producer connection")
            unpacker.feed(data)
            for msg in unpacker:
                clock.count(pending.pop(msg["ack"]), time.perf_counter())
                credit.release()

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(read_acks)
        seq = 0
        while time.perf_counter() < clock.deadline:
            await credit.acquire()
            chunk = f"{conn}-{seq}"
            frame = msgpack.packb(
                [TAG, bodies[(conn + seq) % len(bodies)], {"chunk": chunk}], use_bin_type=True
            )
            pending[chunk] = batch
            await stream.send_all(frame)
            seq += 1
        # Acks after the deadline do not count: stop here rather than drain.
        await trio.sleep(max(0.0, clock.deadline - time.perf_counter()))
        nursery.cancel_scope.cancel()


def run_ours(sync: str, bodies: list[bytes], args: argparse.Namespace, dim: int) -> dict[str, Any]:
    """Starts a server with ``sync`` and a model of ``dim``, floods it for ``args.seconds``;
    the run's figures."""
    config = {"sync": sync, "snapshot_interval": 3600.0, "model": {"dim": dim}}
    with ServerProcess(config) as server:
        applied0 = server.stats()["events_applied"]
        cpu0 = cpu_seconds(server.pid)
        clock = Window(time.perf_counter(), args.seconds)
        applied_at_deadline: list[int] = []
        cpu_at_deadline: list[float] = []

        def sample_applied() -> None:
            time.sleep(max(0.0, clock.deadline - time.perf_counter()))
            cpu_at_deadline.append(cpu_seconds(server.pid))
            applied_at_deadline.append(server.stats()["events_applied"])

        sampler = threading.Thread(target=sample_applied)
        sampler.start()

        async def flood() -> None:
            async with trio.open_nursery() as nursery:
                for c in range(args.connections):
                    nursery.start_soon(
                        forward_producer,
                        server.forward_address,
                        bodies,
                        args.batch,
                        args.window,
                        c,
                        clock,
                    )

                async def progress() -> None:
                    while time.perf_counter() < clock.deadline:
                        await trio.sleep(min(1.0, max(0.0, clock.deadline - time.perf_counter())))
                        elapsed = time.perf_counter() - clock.start
                        print(
                            f"    sync={sync}: {clock.acked / elapsed:>10,.0f} acked ev/s so far",
                            flush=True,
                        )

                nursery.start_soon(progress)

        trio.run(flood)
        sampler.join()
        wal = histogram_quantiles(server.metrics(), "recstream_wal_append_seconds", (0.5, 0.99))
        stats = server.stats()
        server.kill()  # the backlog queued for the model is of no interest
    rate = clock.acked / args.seconds
    applied_rate = (applied_at_deadline[0] - applied0) / args.seconds
    cpu = cpu_at_deadline[0] - cpu0
    print(
        f"  ours sync={sync} dim {dim}: {rate:,.0f} acked ev/s, {_us(cpu, clock.acked)} server "
        f"CPU/event ({cpu:.1f} CPU s), model applied {applied_rate:,.0f} ev/s during the run; "
        f"journal append p50 {1e3 * (wal['p50'] or 0):.2f} ms",
        flush=True,
    )
    return {
        "acked_events": clock.acked,
        "rate": rate,
        "server_cpu_s": cpu,
        "server_cpu_per_event_us": _per_event_us(cpu, clock.acked),
        "rate_second_half": clock.acked_second_half / (args.seconds / 2),
        "applied_rate": applied_rate,
        "wal_append_p50_s": wal["p50"],
        "wal_append_p99_s": wal["p99"],
        "wal_appends": wal["count"],
        "events_applied_after_run": stats["events_applied"],
    }


def _per_event_us(cpu: float, events: int) -> float | None:
    return 1e6 * cpu / events if events else None


def _us(cpu: float, events: int) -> str:
    per = _per_event_us(cpu, events)
    return "n/a" if per is None else f"{per:.2f} µs"


# --- peer ---------------------------------------------------------------------------------


def peer_missing() -> str | None:
    """Why the Redis peer cannot run, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install redis)"
    return None


def run_redis(
    appendfsync: str, batches: list[list[dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    """XADD pipelines from ``args.connections`` threads against a fresh redis-server."""
    import redis

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="recstream-bench-redis-") as tmp:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp]
        cmd += ["--appendonly", "yes", "--appendfsync", appendfsync, "--save", ""]
        with child_process(cmd, stdout=open(f"{tmp}/redis.log", "w")) as proc:  # noqa: SIM115
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            cpu0 = cpu_seconds(proc.pid)
            clock = Window(time.perf_counter(), args.seconds)
            lock = threading.Lock()
            cpu_at_deadline: list[float] = []

            def sample_cpu() -> None:
                time.sleep(max(0.0, clock.deadline - time.perf_counter()))
                cpu_at_deadline.append(cpu_seconds(proc.pid))

            def producer(conn: int) -> None:
                r = redis.Redis(port=port)
                k = conn
                while time.perf_counter() < clock.deadline:
                    pipe = r.pipeline(transaction=False)
                    for e in batches[k % len(batches)]:
                        pipe.xadd("events", e)  # type: ignore[arg-type]
                    pipe.execute()
                    with lock:
                        clock.count(len(batches[k % len(batches)]), time.perf_counter())
                    k += 1
                r.close()

            threads = [
                threading.Thread(target=producer, args=(c,)) for c in range(args.connections)
            ]
            threads.append(threading.Thread(target=sample_cpu))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            length = client.xlen("events")
            client.close()
    rate = clock.acked / args.seconds
    cpu = cpu_at_deadline[0] - cpu0
    print(
        f"  Redis Streams appendfsync={appendfsync}: {rate:,.0f} acked ev/s, "
        f"{_us(cpu, clock.acked)} redis-server CPU/event ({length:,} in the stream)",
        flush=True,
    )
    return {
        "acked_events": clock.acked,
        "rate": rate,
        "server_cpu_s": cpu,
        "server_cpu_per_event_us": _per_event_us(cpu, clock.acked),
        "rate_second_half": clock.acked_second_half / (args.seconds / 2),
        "stream_length": length,
    }


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.quick:
        args.seconds = 3.0
    missing = peer_missing()
    if missing:
        skip_peer("Redis Streams", missing)
    print(
        f"ingest: {args.connections} connections x window {args.window} x {args.batch} events, "
        f"{args.seconds:g} s per run",
        flush=True,
    )
    batches = event_batches(POOL_FRAMES, args.batch)
    from connectors.client import pack_entries

    now = time.time()
    bodies = [pack_entries(b, now=now) for b in batches]

    ours = {sync: run_ours(sync, bodies, args, args.dim) for sync in ("batch", "off")}
    light = run_ours("batch", bodies, args, args.light_dim) if args.light_dim else None
    peer: dict[str, dict[str, Any] | None] = {"always": None, "no": None}
    if missing is None:
        peer = {mode: run_redis(mode, batches, args) for mode in ("always", "no")}

    params = {
        "connections": args.connections,
        "window_frames": args.window,
        "events_per_frame": args.batch,
        "seconds": args.seconds,
        "model_dim": args.dim,
        "event_ids": False,
    }
    rows = []
    for sync, mode in (("batch", "always"), ("off", "no")):
        o, p = ours[sync], peer[mode]
        detail = {**params, "sync": sync, **{k: v for k, v in o.items() if k != "rate"}}
        rows.append(
            row(
                f"ingest_sync_{sync}_vs_redis",
                o["rate"],
                p["rate"] if p else None,
                "acked events/s",
                {**detail, "peer_is": f"Redis Streams XADD, appendfsync {mode}" if p else None},
            )
        )
        rows.append(
            row(
                f"ingest_sync_{sync}_vs_goal",
                o["rate"],
                GOAL,
                "acked events/s",
                {**detail, "peer_is": "goal"},
            )
        )
        rows.append(
            row(
                f"ingest_sync_{sync}_second_half_vs_redis",
                o["rate_second_half"],
                p["rate_second_half"] if p else None,
                "acked events/s",
                {
                    **detail,
                    "peer_is": f"Redis Streams XADD, appendfsync {mode}" if p else None,
                    "window": "the run's second half only: the steady rate once buffers are full",
                },
            )
        )
        rows.append(
            row(
                f"ingest_sync_{sync}_cpu_per_event_vs_redis",
                o["server_cpu_per_event_us"],
                p["server_cpu_per_event_us"] if p else None,
                "server CPU µs/acked event",
                {
                    **detail,
                    "peer_is": f"redis-server CPU, appendfsync {mode}" if p else None,
                    "cpu": "user+system seconds of the server process (every thread) over the "
                    "measured interval, per event acknowledged in it",
                },
                lower_is_better=True,
            )
        )
    if light is not None:
        rows.append(
            row(
                f"ingest_sync_batch_dim{args.light_dim}_vs_goal",
                light["rate"],
                GOAL,
                "acked events/s",
                {
                    **params,
                    "model_dim": args.light_dim,
                    "sync": "batch",
                    **{k: v for k, v in light.items() if k != "rate"},
                    "peer_is": "goal",
                    "why": "a cheap model: how far the Forward listener and journal go when "
                    "the model's apply rate bounds the acks less",
                },
            )
        )
    path = write_results(
        "ingest",
        rows,
        {
            "params": {**params, "quick": args.quick},
            "peer": "redis-server (Redis Streams)" if missing is None else None,
            "peer_skipped": missing,
            "runs": {"ours": ours, "ours_light_model": light, "redis": peer},
        },
    )
    print_rows(rows)
    print(f"wrote {path}")
    return 0
