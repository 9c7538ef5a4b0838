"""``python -m bench scale``: replica nodes on a Redis Streams log, 1, 2 and 3 nodes, against
one node on its local journal.

Each setup runs real ``recstream serve`` processes (``--log redis://...`` for the replicas)
and one real ``redis-server`` (``--appendonly yes --appendfsync always``, on loopback). Two
phases per setup:

* **Ingest**: one Fluent Forward producer per node, each sending its share of ``--events``
  in frames of ``--batch`` events with up to 16 frames in flight, as fast as acknowledgements
  come. Figure: acknowledged events/s (all producers, wall clock), and the CPU each node
  spent per event (``/proc`` of the node process: every node applies every event, and the
  node a frame arrived on also appends it).
* **Push**: ``--subscribers`` websocket subscribers spread round-robin over the nodes, then
  ``--rate`` events/s for ``--seconds``, half of them for subscribed users. Figure: event ->
  push latency, from the time the receiving node accepted the event to the time the node
  holding the subscription handed the new list to its socket (the servers'
  ``recstream_push_latency_seconds`` histograms, merged over the nodes; one machine, so one
  clock), and the CPU per push (node CPU of the phase less its events' share, per push).

This machine has 2 cores shared by every process here, so adding nodes adds work to the same
cores: the runs simulate the placement (every event crossing Redis and reaching every model),
not capacity. The capacity of N machines is estimated on paper from the measured CPU costs,
in the results' ``estimate``: each node applies every event, so the event rate the group can
absorb is that of one node (``1 / CPU per event`` per core) whatever N is, while subscribers and
queries spread over the nodes and scale with N (``N / CPU per push`` pushes/s per core).

The same module holds :class:`RedisServer` and :func:`start_cluster`, the Redis processes the
tests start too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
import trio

from bench._common import (
    ServerProcess,
    cpu_seconds,
    histogram_quantiles,
    print_rows,
    require_release,
    row,
    skip_peer,
    write_results,
)

__all__ = ["RedisServer", "free_port", "register", "run", "start_cluster"]

PUSH_METRIC = "recstream_push_latency_seconds"
NODE_CONFIG: dict[str, Any] = {"snapshot_interval": 30.0}


def free_port(below: int = 65536) -> int:
    """A loopback TCP port below ``below`` that was free a moment ago."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise RuntimeError(f"no free port below {below}")


class RedisServer:
    """One ``redis-server`` on loopback with AOF and ``appendfsync always``.

    Args:
        directory: Its working directory (AOF, cluster config).
        port: Its port; a free one when None. Kept across :meth:`restart`.
        cluster: Start it with ``--cluster-enabled yes``.
    """

    def __init__(self, directory: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.directory = directory
        # A cluster node also listens on port + 10000 (its bus), so its port must leave room.
        self.port = port or free_port(55536 if cluster else 65536)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.02)
        # A restart on a large AOF answers PING with LOADING errors until it is loaded.
        client.close()
        return self

    def client(self) -> redis.Redis:
        """A client of this server, closed by :meth:`stop`."""
        client = redis.Redis(port=self.port, socket_timeout=5)
        self._clients.append(client)
        return client

    def kill(self) -> None:
        """``kill -9``: no chance to write anything more."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Closes the clients handed out, then ends the server (SIGTERM, then SIGKILL)."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot exit
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(directory: Path, masters: int = 3) -> list[RedisServer]:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create`` (no
    replicas); returns once every slot is served. The caller stops them."""
    servers = [RedisServer(directory / f"m{i}", cluster=True) for i in range(masters)]
    try:
        for s in servers:
            s.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{s.port}" for s in servers]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for s in servers:
            c = s.client()
            while c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach state ok")
                time.sleep(0.05)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scale", help="replica nodes on Redis Streams (1-3 nodes) vs one node's local journal"
    )
    p.add_argument("--events", type=int, default=60_000, help="events of the ingest phase")
    p.add_argument("--batch", type=int, default=100, help="events per Forward frame")
    p.add_argument("--subscribers", type=int, default=60, help="websocket subscribers")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s of the push phase")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the push phase")
    p.add_argument("--nodes", default="1,2,3", help="replica counts to run (default 1,2,3)")
    p.add_argument(
        "--clients",
        action="store_true",
        help="instead: the Redis client choice, redis-py (sync, in worker threads) vs coredis",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3000 events, 6 subscribers, 200 events/s for 2 s, 1 and 2 nodes",
    )
    p.set_defaults(func=run)


def events(tag: str, first: int, n: int, users: int) -> list[dict[str, Any]]:
    """``n`` interactions with unique ids over ``users`` users and 2000 items."""
    return [
        {"user": f"u{k % users}", "item": f"i{(k * 7919) % 2000}", "id": f"{tag}-{k}"}
        for k in range(first, first + n)
    ]


def _buckets(exposition: str) -> dict[float, float]:
    out = {}
    for line in exposition.splitlines():
        if line.startswith(f"{PUSH_METRIC}_bucket{{"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            out[float(le.group(1))] = float(line.rsplit(" ", 1)[1])
    return out


def merged_quantiles(before: list[str], after: list[str]) -> dict[str, Any]:
    """p50/p99 of the push latency over the phase: each node's histogram after minus before,
    summed over the nodes (cumulative buckets add), read as one histogram."""
    total: dict[float, float] = {}
    for b, a in zip(before, after, strict=True):
        old = _buckets(b)
        for le, cum in _buckets(a).items():
            total[le] = total.get(le, 0.0) + cum - old.get(le, 0.0)
    count = total.get(float("inf"), 0.0)
    text = "\n".join(
        f'{PUSH_METRIC}_bucket{{le="{"+Inf" if le == float("inf") else le}"}} {cum}'
        for le, cum in sorted(total.items())
    )
    text += f"\n{PUSH_METRIC}_count {count}\n{PUSH_METRIC}_sum 0\n"
    q = histogram_quantiles(text, PUSH_METRIC, (0.5, 0.99))
    return {"p50": q["p50"], "p99": q["p99"], "pushes": count}


async def _ingest(nodes: list[ServerProcess], total: int, batch: int, users: int) -> float:
    """Sends ``total`` events split over one producer per node; returns the seconds until
    every frame was acknowledged."""
    from connectors.client import ForwardProducer

    share = total // len(nodes)

    async def produce(i: int, node: ServerProcess) -> None:
        host, port = node.forward_address
        async with ForwardProducer(host, port, tag=f"p{i}", connect_timeout=30) as producer:
            for first in range(0, share, batch):
                await producer.send(events(f"p{i}", first, min(batch, share - first), users))
            await producer.flush()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, node in enumerate(nodes):
            nursery.start_soon(produce, i, node)
    return time.perf_counter() - began


async def _push_phase(
    nodes: list[ServerProcess], subscribers: int, rate: float, seconds: float, users: int
) -> int:
    """Subscribes, then sends ``rate`` events/s for ``seconds``; returns the events sent."""
    from connectors.client import ForwardProducer, subscribe

    sent = 0
    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)

        async def listen(node: ServerProcess, user: str) -> None:
            first = True
            async for _ in subscribe(node.http_url, user):
                if first:
                    ready.release()
                    first = False

        for s in range(subscribers):
            nursery.start_soon(listen, nodes[s % len(nodes)], f"u{s}")
        with trio.fail_after(60):
            for _ in range(subscribers):
                await ready.acquire()
        tick = 0.05
        per_tick = max(1, round(rate * tick))
        producers = []
        for i, node in enumerate(nodes):
            host, port = node.forward_address
            producers.append(ForwardProducer(host, port, tag=f"live{i}", connect_timeout=30))
        async with trio.open_nursery() as sending:
            for p in producers:
                await p.__aenter__()
            deadline = trio.current_time() + seconds
            k = 0
            while trio.current_time() < deadline:
                p = producers[k % len(producers)]
                batch = events(f"live{k % len(producers)}", sent, per_tick, users)
                # Half the events go to subscribed users, so their lists move.
                for j, e in enumerate(batch):
                    if j % 2 == 0:
                        e["user"] = f"u{(sent + j) % subscribers}"
                await p.send(batch)
                sent += per_tick
                k += 1
                await trio.sleep(tick)
            for p in producers:
                await p.flush()
                await p.aclose()
            sending.cancel_scope.cancel()
        await trio.sleep(0.5)  # the last pushes
        nursery.cancel_scope.cancel()
    return sent


def _wait_applied(nodes: list[ServerProcess], total: int) -> None:
    for node in nodes:
        node.wait_applied(total, timeout=600)


def measure(setup: int | None, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One setup: ``None`` is one node on its local journal, ``n`` is n replica nodes on
    one Redis."""
    users = 2000
    with ExitStack() as stack:
        extra: list[str] = []
        if setup is not None:
            server = RedisServer(work / "redis").start()
            stack.callback(server.stop)
            extra = ["--log", server.url]
        count = setup or 1
        nodes = []
        for i in range(count):
            node = ServerProcess(NODE_CONFIG, data_dir=work / f"node{i}", args=extra)
            stack.enter_context(node)
            nodes.append(node)
        cpu0 = [cpu_seconds(n.pid) for n in nodes]
        took = trio.run(_ingest, nodes, args.events, args.batch, users)
        acked = args.events // count * count
        _wait_applied(nodes, acked)
        cpu1 = [cpu_seconds(n.pid) for n in nodes]
        before = [n.metrics() for n in nodes]
        sent = trio.run(_push_phase, nodes, args.subscribers, args.rate, args.seconds, users)
        _wait_applied(nodes, acked + sent)
        time.sleep(0.5)
        cpu2 = [cpu_seconds(n.pid) for n in nodes]
        after = [n.metrics() for n in nodes]
        push = merged_quantiles(before, after)
        cpu_event = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / count / acked
        phase_cpu = sum(c - b for b, c in zip(cpu1, cpu2, strict=True))
        pushes = push["pushes"]
        cpu_push = (phase_cpu - sent * count * cpu_event) / pushes if pushes else None
    return {
        "nodes": count,
        "log": "journal" if setup is None else "redis",
        "events": acked,
        "seconds": took,
        "events_per_s": acked / took,
        "cpu_us_per_event_per_node": 1e6 * cpu_event,
        "push_events": sent,
        "pushes": pushes,
        "push_p50_ms": 1e3 * push["p50"] if push["p50"] is not None else None,
        "push_p99_ms": 1e3 * push["p99"] if push["p99"] is not None else None,
        "cpu_us_per_push": 1e6 * cpu_push if cpu_push is not None and cpu_push > 0 else None,
    }


def estimate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Paper capacity from the measured CPU costs of the largest replica run.

    Every node applies every event, so the event rate a group of N nodes absorbs is what one
    node's cores give, for any N; pushes (and queries) spread over the nodes, so they scale
    with N. Per core, since how far one node's model work spreads over several cores is not
    measured here; the push cost is an upper bound (it carries the node's idle work of the
    phase).
    """
    replica = [r for r in runs if r["log"] == "redis"]
    if not replica:
        return {}
    r = max(replica, key=lambda x: x["nodes"])
    out: dict[str, Any] = {
        "from_run_with_nodes": r["nodes"],
        "cpu_us_per_event_per_node": r["cpu_us_per_event_per_node"],
        "cpu_us_per_push": r["cpu_us_per_push"],
        "events_per_s_per_core_any_n": 1e6 / r["cpu_us_per_event_per_node"],
        "assumes": "Redis on machines of its own and not the bottleneck; pushes limited by "
        "CPU, not by the network",
    }
    if r["cpu_us_per_push"]:
        per_core = 1e6 / r["cpu_us_per_push"]
        out["pushes_per_s_per_core"] = per_core
        out["pushes_per_s_per_core_of_n_nodes"] = {n: n * per_core for n in (1, 2, 3, 10)}
    return out


CLIENT_ROUNDS = 500  # pipelines of CLIENT_PIPELINE XADDs
CLIENT_PIPELINE = 32
CLIENT_WAKES = 200  # XADD -> XREAD BLOCK wake-ups


async def _redis_py_client(port: int, payload: bytes) -> dict[str, float]:
    """redis-py's sync client with each call in a worker thread, as the log uses it."""
    writer, reader = redis.Redis(port=port), redis.Redis(port=port)

    def pipeline() -> None:
        p = writer.pipeline(transaction=False)
        for _ in range(CLIENT_PIPELINE):
            p.xadd("bench:a", {"r": payload})
        p.execute()

    began = time.perf_counter()
    for _ in range(CLIENT_ROUNDS):
        await trio.to_thread.run_sync(pipeline)
    round_trip = (time.perf_counter() - began) / CLIENT_ROUNDS
    wakes = []
    last: Any = writer.xinfo_stream("bench:a")["last-generated-id"]
    for _ in range(CLIENT_WAKES):
        got: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def read(at: Any = last, got: dict[str, Any] = got) -> None:
                got["reply"] = await trio.to_thread.run_sync(
                    lambda: reader.xread({"bench:a": at}, block=2000, count=10)
                )
                got["at"] = time.perf_counter()

            nursery.start_soon(read)
            await trio.sleep(0.002)
            sent = time.perf_counter()
            await trio.to_thread.run_sync(lambda: writer.xadd("bench:a", {"r": payload}))
        last = got["reply"][0][1][-1][0]
        wakes.append(got["at"] - sent)
    writer.close()
    reader.close()
    return {"round_trip": round_trip, "wake": sorted(wakes)[len(wakes) // 2]}


async def _coredis_client(port: int, payload: bytes) -> dict[str, float]:
    """coredis, natively async on trio (through anyio)."""
    import coredis

    async with coredis.Redis(port=port) as writer, coredis.Redis(port=port) as reader:
        began = time.perf_counter()
        for _ in range(CLIENT_ROUNDS):
            async with writer.pipeline(transaction=False) as p:
                for _ in range(CLIENT_PIPELINE):
                    p.xadd("bench:b", {"r": payload})
        round_trip = (time.perf_counter() - began) / CLIENT_ROUNDS
        wakes = []
        last: Any = (await writer.xinfo_stream("bench:b"))["last-generated-id"]
        for _ in range(CLIENT_WAKES):
            got: dict[str, Any] = {}
            async with trio.open_nursery() as nursery:

                async def read(at: Any = last, got: dict[str, Any] = got) -> None:
                    got["reply"] = await reader.xread({"bench:b": at}, block=2000, count=10)
                    got["at"] = time.perf_counter()

                nursery.start_soon(read)
                await trio.sleep(0.002)
                sent = time.perf_counter()
                await writer.xadd("bench:b", {"r": payload})
            entries = next(iter(got["reply"].values()))
            last = entries[-1].identifier
            wakes.append(got["at"] - sent)
    return {"round_trip": round_trip, "wake": sorted(wakes)[len(wakes) // 2]}


def compare_clients(quick: bool) -> int:
    """The measurement behind the client choice of ``connectors.redis_streams``: pipelines
    of ``XADD`` against ``redis-server --appendfsync always``, ``XADD`` -> ``XREAD BLOCK``
    wake-ups, and the client's own CPU for both."""
    global CLIENT_ROUNDS, CLIENT_WAKES
    if quick:
        CLIENT_ROUNDS, CLIENT_WAKES = 50, 20
    payload = os.urandom(200)
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="recstream-clients-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            for name, fn in (("redis-py", _redis_py_client), ("coredis", _coredis_client)):
                if name == "coredis":
                    try:
                        import coredis  # noqa: F401
                    except ImportError:
                        skip_peer("coredis", "not installed (pip install coredis)")
                        continue
                cpu = time.process_time()
                runs[name] = trio.run(fn, server.port, payload)
                runs[name]["cpu"] = time.process_time() - cpu
                print(f"  {name:9s} {runs[name]}", flush=True)
        finally:
            server.stop()
    ours, peer = runs["redis-py"], runs.get("coredis")
    p = {"pipeline": CLIENT_PIPELINE, "rounds": CLIENT_ROUNDS, "wakes": CLIENT_WAKES,
         "peer_name": "coredis"}  # fmt: skip

    def theirs(key: str) -> float | None:
        return peer[key] * (1e3 if key != "cpu" else 1.0) if peer else None

    rows = [
        row("xadd_pipeline_round_trip_ms", 1e3 * ours["round_trip"], theirs("round_trip"),
            "ms", p, lower_is_better=True),
        row("xread_block_wake_ms", 1e3 * ours["wake"], theirs("wake"), "ms", p,
            lower_is_better=True),
        row("client_cpu_s", ours["cpu"], theirs("cpu"), "s CPU", p, lower_is_better=True),
    ]  # fmt: skip
    path = write_results(
        "scale_clients",
        rows,
        {
            "command": "python -m bench scale --clients",
            "params": {"quick": quick, **p},
            "peer": "coredis",
            "runs": runs,
        },
    )
    print_rows(rows)
    print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    require_release()
    if args.clients:
        return compare_clients(args.quick)
    if args.quick:
        args.events, args.subscribers, args.rate, args.seconds = 3000, 6, 200.0, 2.0
        args.nodes = "1,2"
    counts = [int(n) for n in args.nodes.split(",")]
    have_redis = shutil.which("redis-server") is not None
    if not have_redis:
        skip_peer("redis-server", "not installed (apt-get install redis-server): replica rows")
    runs = []
    with tempfile.TemporaryDirectory(prefix="recstream-scale-") as tmp:
        for setup in [None, *(counts if have_redis else [])]:
            work = Path(tmp) / f"setup-{setup or 'journal'}"
            r = measure(setup, args, work)
            runs.append(r)
            print(
                f"  {r['log']:8s} {r['nodes']} node(s): {r['events_per_s']:>9,.0f} acked ev/s, "
                f"{r['cpu_us_per_event_per_node']:.1f} µs CPU/event/node, push p50 "
                f"{r['push_p50_ms']} ms p99 {r['push_p99_ms']} ms over {r['pushes']:.0f} "
                f"pushes, {r['cpu_us_per_push']} µs CPU/push",
                flush=True,
            )
    journal = runs[0]
    rows = []
    for r in runs[1:]:
        n = r["nodes"]
        p = {"nodes": n, "log": "redis", "peer_name": "1 node, local journal"}
        rows.append(row(f"acked_events_per_s_{n}_nodes", r["events_per_s"],
                        journal["events_per_s"], "events/s", p))  # fmt: skip
        for q in ("p50", "p99"):
            rows.append(
                row(
                    f"event_to_push_{q}_{n}_nodes",
                    r[f"push_{q}_ms"],
                    journal[f"push_{q}_ms"],
                    "ms",
                    p,
                    lower_is_better=True,
                )  # fmt: skip
            )
    if not rows:  # no Redis: the journal's own figures, so the run still says something
        p = {"nodes": 1, "log": "journal"}
        rows.append(row("acked_events_per_s_journal", journal["events_per_s"], None, "events/s", p))
    path = write_results(
        "scale",
        rows,
        {
            "params": {
                k: getattr(args, k)
                for k in ("events", "batch", "subscribers", "rate", "seconds", "nodes", "quick")
            },  # fmt: skip
            "peer": "1 node, local journal",
            "runs": runs,
            "estimate": estimate(runs),
            "note": (
                "all processes on one 2-core machine: more nodes add work to the same cores, "
                "so these runs simulate placement, not capacity; see 'estimate' for N machines"
            ),
        },
    )
    print_rows(rows)
    print(f"estimate: {estimate(runs)}")
    print(f"wrote {path}")
    return 0
