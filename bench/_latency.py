"""Push-latency benchmark: from a producer's send to a websocket subscriber's receipt.

Processes on loopback: the server is a subprocess (``python -m connectors serve`` with a
temporary data directory and a TOML config); the subscribers live in one or two processes
(``--client-processes``, see :mod:`bench._loadgen`: one epoll loop over raw sockets each, a
minimal websocket client, no JSON decode per push); the producer is a process of its own
(:mod:`bench._producer`: a blocking Forward socket, no event loop); this process only
coordinates them. Send times are ``time.perf_counter`` (CLOCK_MONOTONIC, one clock for
every process on Linux); a receipt time is when the push arrived in the subscriber's socket
(the kernel's stamp, on the same clock), and the subscriber processes read their sockets at
most every ``--client-poll`` milliseconds, so that they do not preempt the server's threads
at every push (how long pushes waited to be read is reported apart). The load generator's CPU (all those processes, from
/proc) is reported beside the server's, per push and per event (``client_cpu_*`` rows), so
that a run shows whether it measured the server or itself. So are how busy the machine was
(``machine_busy_share``, the hypervisor's steal apart in ``machine_steal_share``) and how long
the server's threads were ready to run but waited for a CPU (``server_cpu_wait_share``, in
cores, from their run-queue time in ``/proc/PID/task/*/schedstat``), so that a run shows
whether the server was short of CPUs.

Method:

1. Warm-up: a synthetic stream (``--warmup`` events over ``--catalog`` items) is sent over
   Forward and waited for in ``/v1/stats``, so users have histories and non-trivial lists.
   The stream is made longer when it reaches fewer users than there are subscribers.
2. ``--subscribers`` websockets subscribe to distinct warmed-up users (top 10 each), at most
   64 upgrade handshakes in flight per subscriber process. ``connect`` is the time from the
   first connect to the last first list received (the processes connect side by side),
   ``server_cpu_per_connect`` the server's CPU over that phase per subscriber: accept,
   upgrade, subscription and the first list.
3. The producer sends ``--rate`` events/s for ``--seconds`` over Forward (PackedForward frames
   of whatever events fell due since the previous frame, at most one frame every 2 ms; the
   send time of an event is its frame's), each for a random subscribed user,
   each with a unique ``"id"``. Half the events (``--list-fraction``) target an item in the
   user's current list, which makes it seen and so drops it from the list: a change, hence a
   push; the others target a random catalog item, which may or may not change the list.
4. A push names the newest event reflected in the list (``cause.id``); its latency is the
   arrival time minus that event's send time. Events folded into a later push of the same
   user have no sample of their own. The subscribers send the lists that changed to the
   producer every 50 ms, so a click on "an item of the current list" may miss a list that
   changed within the last 50 ms. ``pushes`` counts the messages after the first list
   each subscriber gets on subscribing, within the measured window.
5. Idle latency, before the loaded run: one subscriber, one event at a time on its top item
   (so each event changes its list), the next sent once the previous push arrived:
   ``idle_p50``/``idle_p99`` over ``--idle-events`` events (goal for p50: 1.5 ms).
6. Staleness oracle (``--oracle-interval``, default a sweep every 5 s; ``--oracle-rate``,
   default at most 100 GETs/s, so 1,000 subscribers take 10 s a sweep): during the run
   every subscriber's exact list is fetched and compared
   with the last list pushed to it; ``drift_stale_share`` is the share of comparisons that
   found it stale, ``drift_p50``/``drift_p99`` the length of the stale episodes (goal for
   p99: 250 ms). What "stale" means, and what the figures miss, is in :mod:`bench._loadgen`.
   Its GETs load the server too (each a list computed like a push's): the server CPU
   figures include them, and the summary gives their rate and the client CPU they took;
   ``--oracle-interval 0`` measures the server without them.

Both journal durabilities are measured: ``sync = "batch"`` (fdatasync per group commit; the
event is applied while the sync runs and acknowledged after it, or with ``--strict-order``
applied only after it) and ``sync = "off"``. The server's own
``recstream_push_latency_seconds`` (from accepting the event to handing the list to the
subscriber's mailbox, without the network either side) is reported beside ours.

With the server's defaults the drift refresh recomputes every subscribed list once it is
``refresh_interval`` old (in chunks behind the event-caused recomputes, up to
``refresh_budget`` per quarter interval), which costs CPU the event-caused pushes share;
``--refresh-interval 3600`` (with ``--name``, to keep the results apart) measures the
event-caused path alone.

``--target URL --forward HOST:PORT`` drives a server that is already running instead of
starting one (``--key``: its producer key, sent as the Forward shared key and with every
request). Its durability is whatever it was started with, so each rate is measured once and
the rows are named ``target_...`` instead of ``sync_...``; its warm-up events are added to
whatever it holds, the server-side figures are the differences of its histogram over the run,
and the server is left running. The results go to ``latency_target.json`` unless ``--name``
says otherwise.

Goals: p50 <= 1 ms and p99 <= 5 ms; in the rows ``peer`` is the goal and ``ratio`` is
goal / ours, so a ratio of at least 1 means the goal is met.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import random
import re
import shlex
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

import attrs
import numpy as np
import trio

from bench._common import (
    ServerProcess,
    cpu_seconds,
    cpu_wait_seconds,
    histogram_quantiles,
    machine_ticks,
    print_rows,
    pyplot,
    require_release,
    results_dir,
    row,
    waited,
    write_results,
)
from bench._loadgen import SubscriberPlan, items_of, parse_push, raise_fd_limit, run_subscribers
from bench._producer import ProducerPlan, run_producer
from bench._wsclient import Client
from engine import ModelConfig
from engine._config import parse_hostport

GOALS_MS = {"p50": 1.0, "p99": 5.0}
IDLE_GOAL_MS = 1.5  # one idle subscriber, one event at a time, default durability: p50
DRIFT_GOAL_MS = 250.0  # p99 of the stale episodes the oracle sees
MAX_FRAME_EVENTS = 500
CONNECT_AT_ONCE = 64  # websocket handshakes in flight while subscribing
# Server CPU over the measured window (from sending the first event to 1 s after the last).
CPU_KEYS = (
    "server_cpu_s",
    "server_cpu_share",
    "server_cpu_per_push_us",
    "server_cpu_per_event_us",
    "server_gc_share",
    "client_cpu_s",
    "client_cpu_s_producer",
    "client_cpu_s_subscribers",
    "client_cpu_s_coordinator",
    "client_cpu_share",
    "client_cpu_per_push_us",
    "client_cpu_per_event_us",
    "machine_busy_share",
    "machine_steal_share",
    "server_cpu_wait_share",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "latency", help="event-to-push latency p50/p99/p999 with websocket subscribers"
    )
    p.add_argument("--rate", type=float, default=10_000, help="events/s (default 10000)")
    p.add_argument(
        "--low-rate",
        type=float,
        default=1000,
        help="a second, sustainable rate measured the same way (default 1000; 0: skip)",
    )
    p.add_argument("--subscribers", type=int, default=1000, help="websockets (default 1000)")
    p.add_argument("--seconds", type=float, default=30.0, help="per durability (default 30)")
    p.add_argument("--catalog", type=int, default=5000, help="items (default 5000)")
    p.add_argument("--warmup", type=int, default=20_000, help="warm-up events (default 20000)")
    p.add_argument(
        "--list-fraction",
        type=float,
        default=0.5,
        help="share of events on an item of the user's current list (default 0.5)",
    )
    p.add_argument(
        "--dim",
        type=int,
        default=ModelConfig().dim,
        help="the server model's dim (default: the engine's)",
    )
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=None,
        help="the server's drift-refresh interval in seconds (default: the server's own); "
        "a large value isolates the event-caused pushes",
    )
    p.add_argument(
        "--name",
        default="latency",
        help="results are NAME.json and NAME.png (default latency), to keep variants apart",
    )
    p.add_argument(
        "--target",
        metavar="URL",
        help="drive this running server (http://HOST:PORT) instead of starting one; "
        "needs --forward",
    )
    p.add_argument(
        "--forward", metavar="HOST:PORT", help="the running server's Fluent Forward listener"
    )
    p.add_argument("--key", help="the running server's producer key, if it requires one")
    p.add_argument(
        "--oracle-interval",
        type=float,
        default=5.0,
        help="seconds between staleness-oracle sweeps over every subscriber (default 5; 0: off)",
    )
    p.add_argument(
        "--oracle-rate",
        type=float,
        default=100.0,
        help="the staleness oracle's GETs per second, at most (default 100)",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="subscriber processes (default: one per 5,000 subscribers, at most 2)",
    )
    p.add_argument(
        "--client-poll",
        type=float,
        default=1.0,
        metavar="MS",
        help="the subscriber processes read their sockets at most every MS milliseconds; "
        "latencies end at a push's arrival in its socket either way (default 1; 0: read "
        "each push as it arrives)",
    )
    p.add_argument(
        "--idle-events",
        type=int,
        default=200,
        help="events of the one-subscriber, one-event-at-a-time run (default 200; 0: skip)",
    )
    p.add_argument(
        "--strict-order",
        action="store_true",
        help="start the server with apply_before_sync = false (applied only once durable)",
    )
    p.add_argument(
        "--no-direct-push",
        action="store_true",
        help="start the server with direct_push = false (every push through Hypercorn's send, "
        "from the subscriber's task): the websocket layer's own cost, for comparison",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 50 subscribers, 500 events/s, 2 s, 1000 items, 3000 warm-up events, "
        "an oracle sweep every 0.5 s",
    )
    p.set_defaults(func=run)


@attrs.define
class Recorder:
    """What a producer and in-process subscribers (:func:`subscriber`, trio tasks) share:
    send times, lists, and the samples. The latency benchmark runs its subscribers in
    processes of their own; the reliability benchmark's slow-reader drill uses these."""

    sent_at: dict[int, float] = attrs.field(factory=dict)
    lists: dict[int, list[Any]] = attrs.field(factory=dict)
    samples: list[float] = attrs.field(factory=list)  # seconds
    pushes: int = 0
    pushes_with_cause: int = 0
    subscribed: int = 0
    ended: int = 0
    all_subscribed: trio.Event = attrs.field(factory=trio.Event)
    all_ended: trio.Event = attrs.field(factory=trio.Event)

    def on_message(self, user: int, message: dict[str, Any], received: float) -> None:
        self.lists[user] = [x["item"] for x in message["items"]]
        if message.get("version", 0) <= 1:
            return  # the list sent on subscribing, not a push
        self.pushes += 1
        cause = message.get("cause")
        if cause is None or cause.get("id") is None:
            return  # a drift refresh: other users' events moved this list
        self.pushes_with_cause += 1
        sent = self.sent_at.pop(cause["id"], None)
        if sent is not None:
            self.samples.append(received - sent)


async def subscriber(
    url: str,
    user: int,
    rec: Recorder,
    gate: trio.Semaphore,
    expected: int,
    key: str | None = None,
) -> None:
    """Subscribes to ``user``'s list and records every push until the server closes."""
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    released = False
    query = f"user={user}&k=10" + (f"&key={urllib.parse.quote(key)}" if key else "")
    await gate.acquire()
    try:
        async with open_websocket_url(
            f"{url.replace('http', 'ws', 1)}/v1/ws/recommendations?{query}"
        ) as ws:
            try:
                rec.on_message(user, json.loads(await ws.get_message()), time.perf_counter())
                gate.release()
                released = True
                rec.subscribed += 1
                if rec.subscribed == expected:
                    rec.all_subscribed.set()
                while True:
                    text = await ws.get_message()
                    rec.on_message(user, json.loads(text), time.perf_counter())
            except ConnectionClosed:
                pass
            finally:
                await ws._stream.aclose()  # trio-websocket leaves it to the GC otherwise
    except (HandshakeError, OSError, trio.BrokenResourceError):
        pass
    finally:
        if not released:
            gate.release()
        rec.ended += 1
        if rec.ended == expected:
            rec.all_ended.set()


class LoadGenerator:
    """The load generator's processes for one run, seen from the benchmark's trio loop: the
    subscriber processes (:func:`bench._loadgen.run_subscribers`, a share of the users
    each) and the producer process (:func:`bench._producer.run_producer`).

    Each subscriber process has a control pipe to this process and a lists pipe to the
    producer; the producer has a control pipe. :meth:`pump` reads one control pipe for as
    long as it lives and hands its answers to :meth:`expect`.

    Args:
        plans: One per subscriber process.
        producer: The producer's plan.
    """

    def __init__(self, plans: list[SubscriberPlan], producer: ProducerPlan) -> None:
        ctx = multiprocessing.get_context("spawn")  # nothing of this process's threads
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        lists_ends = []
        for plan in plans:
            ours, theirs = ctx.Pipe()
            lists_out, lists_in = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=run_subscribers, args=(theirs, plan, lists_in), daemon=True)
            proc.start()
            theirs.close()
            lists_in.close()
            lists_ends.append(lists_out)
            self._conns.append(ours)
            self._procs.append(proc)
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=run_producer, args=(theirs, lists_ends, producer), daemon=True)
        proc.start()
        theirs.close()
        for end in lists_ends:
            end.close()
        self._conns.append(ours)
        self._procs.append(proc)
        self.subscribers = range(len(plans))
        self.producer = len(plans)
        self._answers = [trio.open_memory_channel[tuple[Any, ...]](4) for _ in self._conns]

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of (the producer, the subscriber processes)."""
        pids = [p.pid for p in self._procs]
        return cpu_seconds(pids[self.producer]), sum(cpu_seconds(pids[n]) for n in self.subscribers)

    def command(self, to: range | int, *command: Any) -> None:
        for n in [to] if isinstance(to, int) else to:
            self._conns[n].send(command)

    async def pump(self) -> None:
        """Reads every control pipe until cancelled."""
        async with trio.open_nursery() as nursery:
            for n in range(len(self._conns)):
                nursery.start_soon(self._pump_one, n)

    async def _pump_one(self, n: int) -> None:
        conn, send = self._conns[n], self._answers[n][0]
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            while conn.poll():
                try:
                    message = conn.recv()
                except EOFError:
                    return
                await send.send(message)

    async def expect(self, of: range | int, kind: str, within: float) -> list[tuple[Any, ...]]:
        """The next answer of each process in ``of``, which must be of ``kind``.

        Raises:
            RuntimeError: A process answered something else, or not within ``within`` s.
        """
        out = []
        with trio.move_on_after(within):
            for n in [of] if isinstance(of, int) else of:
                message = await self._answers[n][1].receive()
                if message[0] != kind:
                    raise RuntimeError(
                        f"expected {kind!r} from a load-generator process: {message}"
                    )
                out.append(message)
            return out
        raise RuntimeError(f"no {kind!r} from every load-generator process within {within:g} s")

    def join(self) -> None:
        """Waits for the processes to exit (they do once told to); kills any that do not (by
        its pid)."""
        for proc in self._procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()


async def idle_latency(
    url: str, address: tuple[str, int], user: int, n: int, key: str | None
) -> list[float]:
    """One subscriber, one event at a time on its top item (so that every event changes
    its list), the next sent 10 ms after the previous push arrived: receipt minus send, in
    seconds. The subscriber is the load generator's raw websocket client (no JSON decode),
    so its own cost adds as little as it can to the figure."""
    from connectors.client import ForwardProducer

    parts = urllib.parse.urlsplit(url)
    host, port = str(parts.hostname), int(parts.port or 80)
    query = f"user={user}&k=10" + (f"&key={urllib.parse.quote(key)}" if key else "")
    ws = Client(f"{host}:{port}", f"/v1/ws/recommendations?{query}")
    ready: collections.deque[tuple[bytes, float]] = collections.deque()
    out: list[float] = []

    async def receive(stream: trio.SocketStream) -> tuple[bytes, float]:
        """The next message and when its bytes arrived."""
        while not ready:
            pending = ws.take_outgoing()
            if pending:
                await stream.send_all(pending)  # a pong
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("the server closed the subscription")
            received = time.perf_counter()
            ready.extend((message, received) for message in ws.receive(data))
        return ready.popleft()

    async with (
        await trio.open_tcp_stream(host, port) as stream,
        ForwardProducer(*address, tag="bench.idle", shared_key=key) as producer,
    ):
        await stream.send_all(ws.take_outgoing())
        items = items_of(parse_push((await receive(stream))[0])[2])
        for n_event in range(n):
            if not items:
                break
            event_id = f"idle-{user}-{n_event}"
            sent = time.perf_counter()
            await producer.send([{"user": user, "item": items[0], "type": "click", "id": event_id}])
            with trio.move_on_after(5):
                while True:
                    message, received = await receive(stream)
                    _, cause, raw = parse_push(message)
                    items = items_of(raw)
                    if cause == event_id:
                        out.append(received - sent)
                        break
            await trio.sleep(0.01)
        await producer.flush()
        ws.close(1000)
        with trio.move_on_after(1):
            await stream.send_all(ws.take_outgoing())
    return out


def latencies(reports: list[dict[str, Any]], sent_at: np.ndarray) -> list[float]:
    """Receipt minus send time, seconds, of each event named as a push's cause (the first
    receipt of each: a later push naming the same event is not a sample of its own)."""
    ids = np.concatenate([np.frombuffer(r["ids"], dtype=np.int64) for r in reports])
    times = np.concatenate([np.frombuffer(r["times"], dtype=np.float64) for r in reports])
    ours = (ids >= 0) & (ids < len(sent_at))
    ids, times = ids[ours], times[ours]
    ids, first = np.unique(ids, return_index=True)
    return [float(x) for x in times[first] - sent_at[ids]]


def merge_oracles(reports: list[dict[str, Any]], interval: float) -> dict[str, Any] | None:
    """The subscriber processes' oracle figures as one (None when the oracle was off)."""
    parts = [r["oracle"] for r in reports if r["oracle"] is not None]
    if not parts:
        return None
    total = {
        k: sum(p[k] for p in parts)
        for k in parts[0]
        if k not in ("episodes_s", "sweeps", "client_cpu_s")
    }
    episodes = sorted(1e3 * e for p in parts for e in p["episodes_s"])
    seconds = max(r["seconds"] for r in reports)
    return {
        **total,
        "interval_s": interval,
        "sweeps": min(p["sweeps"] for p in parts),  # complete sweeps over every subscriber
        "gets_per_s": total["gets"] / seconds if seconds else None,
        "client_cpu_s": sum(p["client_cpu_s"] for p in parts),
        "stale_share": total["stale"] / total["compared"] if total["compared"] else None,
        "differs_share": total["differs"] / total["compared"] if total["compared"] else None,
        "episodes": len(episodes),
        "stale_p50_ms": _quantile(episodes, 0.5),
        "stale_p99_ms": _quantile(episodes, 0.99),
    }


async def warm_up(address: tuple[str, int], stream: Any, key: str | None = None) -> None:
    from connectors.client import ForwardProducer

    async with ForwardProducer(*address, tag="bench.warmup", shared_key=key) as producer:
        for s in range(0, len(stream.users), 1000):
            await producer.send(
                {"user": int(u), "item": int(i), "weight": float(w)}
                for u, i, w in zip(
                    stream.users[s : s + 1000],
                    stream.items[s : s + 1000],
                    stream.weights[s : s + 1000],
                    strict=True,
                )
            )
        await producer.flush()


def warm_up_stream(args: argparse.Namespace) -> tuple[Any, list[int]]:
    """The warm-up stream and the users it gives events to (sorted).

    Every subscriber is a user with a history, so the stream must reach at least
    ``--subscribers`` users. User activity is skewed (a few users send many events), so
    ``--warmup`` events over ``2 * subscribers`` users may reach too few (20,000 events reach
    8,832 of 20,000 users): the stream is then doubled until it reaches enough, and the
    larger size is said. Subscribers are never quietly dropped.

    Raises:
        SystemExit: Even 64 times ``--warmup`` events reach too few users.
    """
    import engine.datasets

    n_events = args.warmup
    while True:
        warm = engine.datasets.generate(
            engine.datasets.SyntheticConfig(
                n_events=n_events,
                n_users=2 * args.subscribers,
                n_items=args.catalog,
                new_user_fraction=0.0,
                new_item_fraction=0.0,
                seed=args.seed,
            )
        )
        active = sorted({int(u) for u in warm.users})
        if len(active) >= args.subscribers:
            break
        if n_events >= 64 * args.warmup:
            raise SystemExit(
                f"{n_events:,} warm-up events reach only {len(active):,} users, fewer than "
                f"the {args.subscribers:,} subscribers"
            )
        n_events *= 2
    if n_events != args.warmup:
        print(
            f"latency: {args.warmup:,} warm-up events reach fewer than {args.subscribers:,} "
            f"users; warming up with {n_events:,}",
            flush=True,
        )
        args.warmup = n_events
    return warm, active


def client_processes(args: argparse.Namespace, subscribers: int) -> int:
    """``--client-processes``, or one per 5,000 subscribers, at most 2."""
    if args.client_processes > 0:
        return int(args.client_processes)
    return min(2, max(1, -(-subscribers // 5000)))


async def measure(
    server: ServerProcess,
    users: list[int],
    items: list[int],
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    url = urllib.parse.urlsplit(server.http_url)
    host, port = str(url.hostname), int(url.port or 80)
    n_procs = min(client_processes(args, len(users)), len(users))
    plans = [
        SubscriberPlan(
            host=host,
            port=port,
            users=tuple(users[n::n_procs]),
            key=args.key,
            connect_at_once=CONNECT_AT_ONCE,
            oracle_interval=args.oracle_interval,
            oracle_rate=args.oracle_rate / n_procs,
            poll_interval=args.client_poll / 1e3,
        )
        for n in range(n_procs)
    ]
    producer_plan = ProducerPlan(
        host=server.forward_address[0],
        port=server.forward_address[1],
        users=tuple(users),
        items=tuple(items),
        rate=rate,
        seconds=args.seconds,
        list_fraction=args.list_fraction,
        seed=args.seed,
        key=args.key,
        max_frame_events=MAX_FRAME_EVENTS,
    )
    # The subscribe phase's server CPU: from before the load generator starts to the last
    # subscription (the server does nothing else meanwhile).
    connect_cpu0 = cpu_seconds(server.pid) if server.pid else None
    gen = LoadGenerator(plans, producer_plan)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gen.pump)
            t0 = time.perf_counter()
            before = await trio.to_thread.run_sync(server.metrics)
            await gen.expect(gen.producer, "ready", 60)
            answers = await gen.expect(gen.subscribers, "subscribed", 180)
            connect_cpu = (
                cpu_seconds(server.pid) - connect_cpu0 if connect_cpu0 is not None else None
            )
            subscribed = sum(a[1] for a in answers)
            connect_s = max(a[4] for a in answers)  # the processes connect side by side
            failures: dict[str, int] = {}
            for a in answers:
                for why, count in a[3].items():
                    failures[why] = failures.get(why, 0) + count
            per_connect = (
                f", {1e6 * connect_cpu / subscribed:.0f} µs of server CPU each"
                if connect_cpu is not None and subscribed
                else ""
            )
            print(
                f"    {subscribed} subscribers connected in {connect_s:.2f} s{per_connect} "
                f"by {n_procs} process(es) ({time.perf_counter() - t0:.1f} s with their start)"
                + (f"; {sum(a[2] for a in answers)} failed: {failures}" if failures else ""),
                flush=True,
            )
            await trio.sleep(0.5)
            gc0 = (await trio.to_thread.run_sync(server.stats)).get("gc_seconds")
            # A server started elsewhere (--target) has no process here to read its CPU from.
            cpu0 = cpu_seconds(server.pid) if server.pid else None
            waits0 = cpu_wait_seconds(server.pid) if server.pid else {}
            (producer0, subscribers0), here0 = gen.cpu_seconds(), cpu_seconds(os.getpid())
            machine0 = machine_ticks()
            gen.command(gen.subscribers, "start", args.oracle_interval > 0)
            wall0 = time.perf_counter()
            gen.command(gen.producer, "go")
            [(_, sent, elapsed, sent_at)] = await gen.expect(
                gen.producer, "done", args.seconds + 120
            )
            await trio.sleep(1.0)  # the last pushes
            cpu = cpu_seconds(server.pid) - cpu0 if cpu0 is not None else None
            waits = cpu_wait_seconds(server.pid) if server.pid else {}
            producer, subscribers = (
                a - b for a, b in zip(gen.cpu_seconds(), (producer0, subscribers0), strict=True)
            )
            here = cpu_seconds(os.getpid()) - here0
            busy, steal, ticks = (a - b for a, b in zip(machine_ticks(), machine0, strict=True))
            client = producer + subscribers + here
            wall = time.perf_counter() - wall0
            gen.command(gen.subscribers, "stop")
            reports = [a[1] for a in await gen.expect(gen.subscribers, "report", 60)]
            exposition = await trio.to_thread.run_sync(server.metrics)
            stats = await trio.to_thread.run_sync(server.stats)
            if args.target is not None:
                exposition = histogram_delta(before, exposition, "recstream_push_latency_seconds")
            gen.command(gen.subscribers, "close")
            closed = [a[1] for a in await gen.expect(gen.subscribers, "closed", 60)]
            gen.command(gen.producer, "exit")
            nursery.cancel_scope.cancel()
    finally:
        gen.join()
    pushes = sum(r["pushes"] for r in reports)
    read_delays_ms = sorted(
        1e3 * float(d) for r in reports for d in np.frombuffer(r["read_delays"], dtype=np.float64)
    )
    return {
        "samples": latencies(reports, np.frombuffer(sent_at, dtype=np.float64)),
        "pushes": pushes,
        "pushes_with_cause": sum(r["pushes_with_cause"] for r in reports),
        "subscribed": subscribed,
        "subscribe_failures": failures,
        "connect_s": connect_s,
        "server_cpu_per_connect_us": (
            1e6 * connect_cpu / subscribed if connect_cpu is not None and subscribed else None
        ),
        "open_at_end": sum(r["open"] for r in reports),
        "closes": closed,
        "client_processes": n_procs,
        "oracle": merge_oracles(reports, args.oracle_interval),
        "sent": sent,
        "elapsed": elapsed,
        "server_push": histogram_quantiles(
            exposition, "recstream_push_latency_seconds", (0.5, 0.99, 0.999)
        ),
        "subscribers_seen_by_server": stats["subscribers"],
        "events_applied": stats["events_applied"],
        "server_cpu_s": cpu,
        "server_cpu_share": cpu / wall if cpu is not None else None,
        "server_cpu_per_push_us": 1e6 * cpu / pushes if cpu is not None and pushes else None,
        "server_cpu_per_event_us": 1e6 * cpu / sent if cpu is not None and sent else None,
        # Share of that CPU spent in the cyclic garbage collector (servers that report it);
        # in the summary only, not a row: a short run may see no collection at all.
        "server_gc_share": ((stats["gc_seconds"] - gc0) / cpu if gc0 is not None and cpu else None),
        # The load generator: the producer, the subscriber processes and this one.
        "client_cpu_s": client,
        "client_cpu_s_producer": producer,
        "client_cpu_s_subscribers": subscribers,
        "client_cpu_s_coordinator": here,
        "client_cpu_share": client / wall,
        "client_cpu_per_push_us": 1e6 * client / pushes if pushes else None,
        "client_cpu_per_event_us": 1e6 * client / sent if sent else None,
        # Every CPU of this machine: the server, the load generator, the kernel's work for
        # them (loopback TCP, wake-ups) and anything else running. Latency under load grows
        # steeply as this nears 1 (queueing), so it says how much a run's figures owe to a
        # busy machine. Only for a server started here, like the server's CPU: a --target
        # server may run elsewhere.
        "machine_busy_share": busy / ticks if ticks and cpu is not None else None,
        # The part of that the hypervisor gave to other machines (inside busy).
        "machine_steal_share": steal / ticks if ticks and cpu is not None else None,
        # Seconds per second that the server's threads were ready to run but waited for a
        # CPU (their run-queue time, /proc/PID/task/*/schedstat): in cores, like the CPU
        # share. When it nears the server's CPU share, the server is short of CPUs rather
        # than of work to do: its threads hand work to one another, and each hand-over waits
        # its turn.
        "server_cpu_wait_share": waited(waits0, waits) / wall if waits else None,
        # How long pushes waited in the subscribers' sockets before being read (sampled; not
        # part of the latencies, which end at arrival): see bench._loadgen.
        "read_delay_ms": {f"p{q * 100:g}": _quantile(read_delays_ms, q) for q in (0.5, 0.99)},
    }


def run_once(
    sync: str,
    rate: float,
    args: argparse.Namespace,
    warm: Any,
    users: list[int],
    items: list[int],
) -> dict[str, Any]:
    """One server with ``sync``, warmed up, subscribed to, fed ``rate`` events/s."""
    from hdrh.histogram import HdrHistogram

    print(
        f"  sync={sync}, {rate:g} events/s: starting the server, {len(warm.users):,} warm-up "
        "events",
        flush=True,
    )
    config = {
        "sync": sync,
        "snapshot_interval": 3600.0,
        "max_subscribers": max(10_000, 2 * args.subscribers),
        # Every subscriber is an HTTP connection: the default share of the open-file limit
        # (half of it, less a reserve) may be too few.
        "max_http_connections": args.subscribers + 256,
        "max_forward_connections": 64,
        "model": {"dim": args.dim, "seed": args.seed},
    }
    if args.refresh_interval is not None:
        config["refresh_interval"] = args.refresh_interval
    if args.strict_order:
        config["apply_before_sync"] = False
    if args.no_direct_push:
        config["direct_push"] = False
    server: ServerProcess
    if args.target is None:
        server = ServerProcess(config)
    else:
        server = RunningServer(args.target, parse_hostport(args.forward), args.key)
    with server:
        base = server.stats()["events_applied"] if args.target is not None else 0
        trio.run(warm_up, server.forward_address, warm, args.key)
        server.wait_applied(base + len(warm.users))
        idle = (
            trio.run(
                idle_latency,
                server.http_url,
                server.forward_address,
                users[0],
                args.idle_events,
                args.key,
            )
            if args.idle_events > 0
            else []
        )
        out = trio.run(measure, server, users, items, rate, args)
    samples: list[float] = out["samples"]
    hist = HdrHistogram(1, 120_000_000, 3)  # microseconds, 3 significant digits
    for x in samples:
        hist.record_value(max(1, round(x * 1e6)))
    pct = {
        f"p{q:g}": hist.get_value_at_percentile(q) / 1e3 if samples else None
        for q in (50, 99, 99.9)
    }
    idle_ms = sorted(1e3 * x for x in idle)
    oracle = out["oracle"]
    result = {
        "sync": sync,
        "rate": rate,
        "idle_p50_ms": _quantile(idle_ms, 0.5),
        "idle_p99_ms": _quantile(idle_ms, 0.99),
        "idle_samples": len(idle_ms),
        "p50_ms": pct["p50"],
        "p99_ms": pct["p99"],
        "p999_ms": pct["p99.9"],
        "max_ms": hist.get_max_value() / 1e3 if samples else None,
        "samples": len(samples),
        "pushes": out["pushes"],
        "pushes_with_cause": out["pushes_with_cause"],
        "events_sent": out["sent"],
        "achieved_rate": out["sent"] / out["elapsed"],
        "subscribers": out["subscribed"],
        "subscribe_failures": out["subscribe_failures"],
        "connect_s": out["connect_s"],
        "server_cpu_per_connect_us": out["server_cpu_per_connect_us"],
        "subscribers_open_at_end": out["open_at_end"],
        "closes": out["closes"],
        "client_processes": out["client_processes"],
        "subscribers_seen_by_server": out["subscribers_seen_by_server"],
        "server_push_latency_ms": {
            k: (v * 1e3 if isinstance(v, float) and k != "count" else v)
            for k, v in out["server_push"].items()
        },
        "oracle": oracle,
        "latencies_s": sorted(samples),
        **{k: out[k] for k in CPU_KEYS},
        "read_delay_ms": out["read_delay_ms"],
    }
    server_ms = result["server_push_latency_ms"]
    print(
        f"  sync={sync}, {rate:g}/s: p50 {_ms(result['p50_ms'])}  p99 {_ms(result['p99_ms'])}  "
        f"p999 {_ms(result['p999_ms'])}  ({result['samples']:,} timed of {out['pushes']:,} "
        f"pushes, {out['sent']:,} events at {result['achieved_rate']:,.0f}/s); server-side p50 "
        f"{_ms(server_ms['p50'])} p99 {_ms(server_ms['p99'])}; server CPU "
        f"{_us(result['server_cpu_per_push_us'])}/push, {_us(result['server_cpu_per_event_us'])}"
        f"/event, {_cores(result['server_cpu_share'])}; pushes read from their sockets p50 "
        f"{_ms(result['read_delay_ms']['p50'])} p99 {_ms(result['read_delay_ms']['p99'])} "
        f"after arrival; load generator CPU "
        f"{_us(result['client_cpu_per_push_us'])}/push, {_us(result['client_cpu_per_event_us'])}"
        f"/event, {_cores(result['client_cpu_share'])} (producer "
        f"{result['client_cpu_s_producer']:.2f} s, subscribers "
        f"{result['client_cpu_s_subscribers']:.2f} s, coordinator "
        f"{result['client_cpu_s_coordinator']:.2f} s); machine "
        + (
            f"{result['machine_busy_share']:.0%} busy ({result['machine_steal_share']:.0%} "
            f"steal), server threads waiting for a CPU {_cores(result['server_cpu_wait_share'])}"
            if result["machine_busy_share"] is not None
            else "n/a"
        )
        + f"; idle p50 "
        f"{_ms(result['idle_p50_ms'])} p99 {_ms(result['idle_p99_ms'])}"
        + (
            f", {result['server_gc_share']:.1%} in GC"
            if result["server_gc_share"] is not None
            else ""
        ),
        flush=True,
    )
    if oracle is not None:
        print(
            f"  sync={sync}, {rate:g}/s: oracle {oracle['compared']:,} compared "
            f"({oracle['gets_per_s'] or 0:.0f} GETs/s, {oracle['sweeps']} sweeps, "
            f"{oracle['skipped_push_newer']} skipped, {oracle['errors']} errors), stale "
            f"{oracle['stale_share'] or 0:.2%} (differs {oracle['differs_share'] or 0:.2%}), "
            f"{oracle['episodes']} episodes p50 {_ms(oracle['stale_p50_ms'])} p99 "
            f"{_ms(oracle['stale_p99_ms'])}",
            flush=True,
        )
    return result


class RunningServer(ServerProcess):
    """A server someone else started (``--target``): what the benchmark asks of a
    :class:`ServerProcess`, without starting or stopping anything.

    Args:
        http_url: ``http://HOST:PORT``.
        forward_address: Its Fluent Forward listener.
        key: A producer key, sent with every request, or None.
    """

    def __init__(self, http_url: str, forward_address: tuple[str, int], key: str | None) -> None:
        super().__init__({})
        self.http_url = http_url.rstrip("/")
        self.forward_address = forward_address
        self.key = key

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get(self, path: str) -> bytes:
        headers = {"X-Recstream-Key": self.key} if self.key else {}
        request = urllib.request.Request(self.http_url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return bytes(resp.read())

    def terminate(self) -> None:
        pass  # not ours to stop

    def kill(self) -> None:
        pass


def histogram_delta(before: str, after: str, metric: str) -> str:
    """The exposition of ``metric`` over the interval between two scrapes: each bucket, count
    and sum of ``after`` minus its value in ``before`` (a running server's histogram is
    cumulative since it started)."""
    earlier: dict[str, float] = {}
    pattern = re.compile(rf"^({metric}_(?:bucket\{{[^}}]*\}}|count|sum))\s+(\S+)$")
    for line in before.splitlines():
        m = pattern.match(line)
        if m:
            earlier[m.group(1)] = float(m.group(2))
    out = []
    for line in after.splitlines():
        m = pattern.match(line)
        if m:
            out.append(f"{m.group(1)} {float(m.group(2)) - earlier.get(m.group(1), 0.0)}")
    return "\n".join(out)


def _quantile(sorted_values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _ms(v: float | None) -> str:
    return f"{v:.2f} ms" if v is not None else "n/a"


def _us(v: float | None) -> str:
    return f"{v:.0f} µs" if v is not None else "n/a"


def _cores(v: float | None) -> str:
    return f"{v:.2f} cores" if v is not None else "n/a cores"


def plot(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> str | None:
    """A latency CDF per durability, log-scaled time axis, with the goals marked."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs.values():
        xs = [1e3 * s for s in r["latencies_s"]]
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            label = (
                f'sync="{r["sync"]}", {r["achieved_rate"]:,.0f} of {r["rate"]:,.0f} ev/s '
                f"(p50 {_ms(r['p50_ms'])}, p99 {_ms(r['p99_ms'])})"
            )
            ax.plot(xs, ys, label=label)
    for name, ms in GOALS_MS.items():
        ax.axvline(ms, color="grey", linestyle=":", linewidth=1)
        ax.text(ms, 0.02, f" {name} goal", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("event send to push receipt (ms)")
    ax.set_ylabel("fraction of pushes")
    ax.set_title(f"event to push: {args.subscribers} websocket subscribers, model dim {args.dim}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    path = results_dir() / f"{args.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run(args: argparse.Namespace) -> int:
    require_release()

    if (args.target is None) != (args.forward is None):
        raise SystemExit("--target and --forward go together: the running server's two listeners")
    if args.target is not None and args.name == "latency":
        args.name = "latency_target"  # never over the figures of the server this starts

    if args.quick:
        args.subscribers, args.rate, args.low_rate, args.seconds = 50, 500.0, 0.0, 2.0
        args.catalog, args.warmup = 1000, 3000
        args.oracle_interval = min(args.oracle_interval, 0.5)
    # Thousands of sockets here, in the subscriber processes and in a server started here
    # (they inherit the limit).
    limit = raise_fd_limit()
    if limit < args.subscribers + 256:
        raise SystemExit(
            f"{args.subscribers} subscribers need more open files than the limit of {limit}; "
            "raise the hard limit (ulimit -Hn)"
        )
    warm, active = warm_up_stream(args)
    rng = random.Random(args.seed)
    users = sorted(rng.sample(active, min(args.subscribers, len(active))))
    items = sorted({int(i) for i in warm.items})
    args.subscribers = len(users)
    print(
        f"latency: {len(users)} subscribers, {args.rate:g} events/s "
        + (f"(and {args.low_rate:g}) " if args.low_rate else "")
        + f"for {args.seconds:g} s, "
        f"{len(items)} items, dim {args.dim}",
        flush=True,
    )
    rates = [args.rate] + ([args.low_rate] if args.low_rate else [])
    # A running server has the durability it was started with: one run per rate.
    syncs = ("batch", "off") if args.target is None else ("target",)
    prefix = "sync_" if args.target is None else ""
    runs = {
        # Rows of the headline rate are named by durability alone.
        (f"{prefix}{sync}" if rate == args.rate else f"{prefix}{sync}_rate{rate:g}"): run_once(
            sync, rate, args, warm, users, items
        )
        for rate in rates
        for sync in syncs
    }
    png = plot(runs, args)

    rows = []
    for label, r in runs.items():
        sync, rate = r["sync"], r["rate"]
        params = {
            "sync": sync,
            "subscribers": r["subscribers"],
            "rate": rate,
            "seconds": args.seconds,
            "samples": r["samples"],
            "server_push_latency_ms": r["server_push_latency_ms"],
        }
        for q in ("p50", "p99", "p999"):
            goal = GOALS_MS.get(q)
            rows.append(
                row(
                    f"{label}_{q}",
                    r[f"{q}_ms"],
                    goal,
                    "ms",
                    {**params, "peer_is": "goal" if goal else None},
                    lower_is_better=True,
                )
            )
        for q in ("p50", "p99"):
            if r["idle_samples"]:
                rows.append(
                    row(
                        f"{label}_idle_{q}",
                        r[f"idle_{q}_ms"],
                        IDLE_GOAL_MS if q == "p50" else None,
                        "ms",
                        {
                            **params,
                            "samples": r["idle_samples"],
                            "peer_is": "goal" if q == "p50" else None,
                        },
                        lower_is_better=True,
                    )
                )
        rows.append(
            row(
                f"{label}_pushes",
                r["pushes"],
                None,
                "pushes",
                {**params, "with_cause": r["pushes_with_cause"]},
            )
        )
        rows.append(
            row(
                f"{label}_connect",
                r["connect_s"],
                None,
                "s",
                {**params, "failures": r["subscribe_failures"]},
                lower_is_better=True,
            )
        )
        if r["server_cpu_per_connect_us"] is not None:
            rows.append(
                row(
                    f"{label}_server_cpu_per_connect",
                    r["server_cpu_per_connect_us"],
                    None,
                    "µs/connect",
                    params,
                    lower_is_better=True,
                )
            )
        rows.append(
            row(
                f"{label}_events_sent",
                r["events_sent"],
                int(rate * args.seconds),
                "events",
                {**params, "peer_is": "planned"},
            )
        )
        rows.append(
            row(
                f"{label}_achieved_rate",
                r["achieved_rate"],
                rate,
                "events/s",
                {**params, "peer_is": "requested rate"},
            )
        )
        for key, unit in (
            ("server_cpu_per_push_us", "µs/push"),
            ("server_cpu_per_event_us", "µs/event"),
            ("server_cpu_share", "cores"),
            ("client_cpu_per_push_us", "µs/push"),
            ("client_cpu_per_event_us", "µs/event"),
            ("client_cpu_share", "cores"),
        ):
            if r[key] is None:
                continue  # a --target server's CPU cannot be read from here
            name = key.removesuffix("_us")
            side = key.split("_", 1)[0]
            rows.append(
                row(
                    f"{label}_{name}",
                    r[key],
                    None,
                    unit,
                    {
                        **params,
                        "cpu_seconds": r[f"{side}_cpu_s"],
                        "processes": r["client_processes"] + 2 if side == "client" else 1,
                    },
                    lower_is_better=True,
                )
            )
        for key, unit in (
            ("machine_busy_share", "share of all CPUs"),
            ("machine_steal_share", "share of all CPUs"),
            ("server_cpu_wait_share", "cores"),
        ):
            if r[key] is not None:
                rows.append(
                    row(
                        f"{label}_{key}",
                        r[key],
                        None,
                        unit,
                        {**params, "cpus": os.cpu_count()},
                        lower_is_better=True,
                    )
                )
        o = r["oracle"]
        if o is not None:
            oracle_params = {
                **params,
                **{k: v for k, v in o.items() if not k.endswith("_ms")},
            }
            if o["stale_share"] is not None:
                rows.append(
                    row(
                        f"{label}_drift_stale_share",
                        o["stale_share"],
                        None,
                        "share",
                        oracle_params,
                        lower_is_better=True,
                    )
                )
            for q in ("p50", "p99"):
                if o[f"stale_{q}_ms"] is None:
                    continue  # no stale episode at all
                goal = DRIFT_GOAL_MS if q == "p99" else None
                rows.append(
                    row(
                        f"{label}_drift_{q}",
                        o[f"stale_{q}_ms"],
                        goal,
                        "ms",
                        {**oracle_params, "peer_is": "goal" if goal else None},
                        lower_is_better=True,
                    )
                )
    summary = {
        label: {k: v for k, v in r.items() if k != "latencies_s"} for label, r in runs.items()
    }
    path = write_results(
        args.name,
        rows,
        {
            # The README table's command column (`python -m bench report`).
            "command": (
                "python -m bench " + shlex.join(sys.argv[1:])
                if sys.argv[1:2] == ["latency"]
                else None
            ),
            "params": {
                k: getattr(args, k)
                for k in (
                    "rate",
                    "low_rate",
                    "subscribers",
                    "seconds",
                    "catalog",
                    "warmup",
                    "list_fraction",
                    "dim",
                    "refresh_interval",
                    "oracle_interval",
                    "oracle_rate",
                    "client_processes",
                    "idle_events",
                    "strict_order",
                    "target",
                    "forward",
                    "seed",
                    "quick",
                )
            },
            "peer": "goals (p50 <= 1 ms, p99 <= 5 ms)",
            "runs": summary,
            "plot": png,
            "note": (
                "server, producer and subscribers share the machine's cores; the subscribers "
                "live in client_processes processes of their own (raw sockets, one epoll loop "
                "each), the producer in another; client_cpu_* is all of them and the "
                "coordinating benchmark process. "
                "When the server cannot keep "
                "up, acks slow the producer (achieved_rate < rate) and the latency is the "
                "queue inside the server. The server's drift refresh recomputes every subscribed "
                "list once it is refresh_interval old, behind the event-caused recomputes; "
                "--refresh-interval 3600 isolates the latter."
            ),
        },
    )
    print_rows(rows)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0
