"""The server: recovery, the actors, the listeners, and an orderly shutdown.

Start-up: open the journal (cutting a torn tail), load the newest valid snapshot, replay the
journal after it, then start the actors and listeners. Shutdown (SIGINT/SIGTERM or
:meth:`Server.shutdown`): stop ingress, drain the journal into the model, snapshot, close
subscribers with 1001, stop the HTTP server.

Snapshots: ``snapshot.rsnap`` is the newest, ``snapshot.prev.rsnap`` the one before. Journal
segments are deleted only once the *older* snapshot covers them, so a damaged newest snapshot
still leaves a complete recovery path.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ._config import ServerConfig
from ._core import CorruptSnapshot, InvalidFrame
from ._events import journal_record, json_to_frame
from ._exceptions import InvalidEvents, JournalClosed, JournalFailed
from ._forward import ForwardServer
from ._index_actor import IndexActor
from ._journal import Journal, RecoveryReport
from ._journal_actor import Appended, JournalActor
from ._metrics import Metrics
from ._model import Model
from ._model_actor import Applied, ModelActor, apply_records
from ._publisher import Publisher, Subscription

__all__ = ["Server", "serve"]

log = logging.getLogger("recstream.server")

SNAPSHOT = "snapshot.rsnap"
PREVIOUS_SNAPSHOT = "snapshot.prev.rsnap"
# Groups of journal records that may wait between the journal and the model actor; beyond
# that, producers wait (backpressure).
MODEL_INBOX = 64
REPLAY_CHUNK = 1024


def _listening_socket(host: str, port: int, user_timeout_ms: int) -> socket.socket:
    """A bound, listening TCP socket; accepted connections inherit TCP_USER_TIMEOUT, so the
    kernel aborts a peer that stops acknowledging what we send."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Server:
    """One recstream node. ``await nursery.start(server.run)`` returns once it serves.

    Attributes (valid after start):
        http_url: ``http://host:port`` of the HTTP and websocket listener.
        forward_address: (host, port) of the Fluent Forward listener.
        recovery: What opening the journal found and cut.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config.check().with_token_secret()
        self.metrics = Metrics()
        self.model: Model = Model(self.config.model)
        self.journal_actor: JournalActor | None = None
        self.model_actor: ModelActor | None = None
        self.index_actor: IndexActor | None = None
        self.publisher: Publisher | None = None
        self.recovery: RecoveryReport | None = None
        self.http_url = ""
        self.forward_address: tuple[str, int] = ("", 0)
        self.snapshot_seq = 0
        self._previous_snapshot_seq = 0
        self.ready = False
        self.accepting = False
        self._shutdown = trio.Event()
        self._applied = trio.Event()  # set and replaced after every applied group

    # --- paths ------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def _snapshot_path(self, name: str = SNAPSHOT) -> Path:
        return self.data_dir / name

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self) -> tuple[Journal, int]:
        """Blocking: opens the journal, loads a snapshot, replays the rest. Returns the
        journal and the last sequence the model reflects."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        journal, report = Journal.open(
            self.data_dir / "wal",
            sync=self.config.sync,
            interval_ms=self.config.sync_interval_ms,
            segment_bytes=self.config.wal_segment_bytes,
        )
        self.recovery = report
        if report.reason is not None:
            log.warning(
                "journal tail damaged (%s): cut %d bytes, dropped %d segment(s); recovered up to seq %d",
                report.reason,
                report.truncated_bytes,
                report.segments_dropped,
                report.last_seq,
            )
        seq = 0
        for name in (SNAPSHOT, PREVIOUS_SNAPSHOT):
            path = self._snapshot_path(name)
            if not path.exists():
                continue
            try:
                self.model = Model.load(path)
            except (CorruptSnapshot, OSError) as e:
                log.error("snapshot %s unusable (%s); trying the previous one", path, e)
                continue
            seq = self.model.loaded_wal_seq
            self.snapshot_seq = seq
            log.info("loaded %s at journal seq %d", path, seq)
            break
        if seq and seq < journal.first_seq - 1:
            log.error(
                "journal starts at %d, after the snapshot's %d: events lost", journal.first_seq, seq
            )
        replayed = 0
        chunk: list[bytes] = []
        first = seq + 1
        for s, payload in journal.replay(after_seq=seq):
            if not chunk:
                first = s
            chunk.append(payload)
            if len(chunk) >= REPLAY_CHUNK:
                apply_records(self.model, first, chunk)
                replayed += len(chunk)
                chunk = []
        if chunk:
            apply_records(self.model, first, chunk)
            replayed += len(chunk)
        self.model.reindex(None)
        last = max(seq, journal.last_seq)
        log.info("replayed %d journal record(s); model at seq %d", replayed, last)
        return journal, last

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Recovers, serves until :meth:`shutdown`, then stops in order."""
        journal, applied_seq = await trio.to_thread.run_sync(self._recover)
        send, receive = trio.open_memory_channel[Appended](MODEL_INBOX)
        self.journal_actor = JournalActor(journal, output=send)
        self.index_actor = IndexActor(self.model)
        self.publisher = Publisher(
            self.model,
            max_subscribers=self.config.max_subscribers,
            refresh_interval=self.config.refresh_interval,
            refresh_budget=self.config.refresh_budget,
            on_push=self._on_push,
        )
        self.model_actor = ModelActor(
            self.model, receive, applied_seq=applied_seq, on_applied=self._on_applied
        )
        forward = ForwardServer(self)
        http_sock = _listening_socket(
            self.config.http_host, self.config.http_port, self.config.tcp_user_timeout_ms
        )
        fwd_sock = _listening_socket(
            self.config.forward_host, self.config.forward_port, self.config.tcp_user_timeout_ms
        )
        from ._web import build_app  # the web layer imports Server for typing only

        app = build_app(self)
        hc = HypercornConfig()
        hc.websocket_max_message_size = self.config.max_body_bytes
        hc.h11_max_incomplete_size = 64 * 1024
        hc.graceful_timeout = 2.0
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        http_stop = trio.Event()

        async with trio.open_nursery() as nursery:
            await nursery.start(self.journal_actor.run)
            await nursery.start(self.model_actor.run)
            async with trio.open_nursery() as services:
                await services.start(self.index_actor.run)
                await services.start(self.publisher.run)
                services.start_soon(self._snapshot_loop)
                forward_scope = await services.start(forward.serve, fwd_sock)
                binds = await nursery.start(
                    lambda task_status: worker_serve(
                        wrap_app(app, hc.wsgi_max_body_size, None),  # type: ignore[arg-type]
                        hc,
                        sockets=Sockets([], [http_sock], []),
                        shutdown_trigger=http_stop.wait,
                        task_status=task_status,
                    )
                )
                self.http_url = binds[0]
                host, port = fwd_sock.getsockname()[:2]
                self.forward_address = (host, port)
                self.ready = self.accepting = True
                log.info("serving HTTP on %s, Forward on %s:%d", self.http_url, host, port)
                task_status.started(self)

                await self._shutdown.wait()
                log.info("shutting down: stopping ingress")
                self.ready = self.accepting = False
                forward_scope.cancel()
                await self.journal_actor.aclose()
                await self.model_actor.drained.wait()
                await trio.to_thread.run_sync(self.model.reindex, None)
                await self.take_snapshot()
                self.publisher.close_all()
                await trio.sleep(0.05)  # let sessions send their close frames
                services.cancel_scope.cancel()
            http_stop.set()

    def shutdown(self) -> None:
        """Starts an orderly shutdown (safe to call more than once)."""
        self._shutdown.set()

    # --- hooks ------------------------------------------------------------------------------

    def _on_applied(self, results: list[Applied]) -> None:
        assert self.publisher is not None and self.index_actor is not None
        rejected = 0
        for r in results:
            self.publisher.notify(r.users, r.seq, r.accepted_at)
            rejected += len(r.rejected)
        if rejected:
            self.metrics.rejects.labels("invalid_record").inc(rejected)
        self.index_actor.wake()
        self.metrics.index_stale.set(self.index_actor.stale)
        self._applied.set()
        self._applied = trio.Event()

    def _on_push(self, sub: Subscription, msg: dict[str, Any]) -> None:
        self.metrics.pushes.inc()
        cause = msg.get("cause")
        if cause is not None:
            self.metrics.push_latency.observe(max(0.0, time.time() - cause["accepted_at"]))

    # --- used by the listeners --------------------------------------------------------------

    async def submit(self, frame: bytes, source: str) -> int:
        """Validates a frame, journals it, returns its sequence once durable.

        Raises:
            InvalidEvents: some record has bad values; nothing was journaled.
            InvalidFrame: the frame itself is malformed.
            JournalClosed: the server is shutting down.
            JournalFailed: the disk failed; the events were not acknowledged.
        """
        if not self.accepting or self.journal_actor is None:
            raise JournalClosed("the server is shutting down")
        checked = await trio.to_thread.run_sync(self.model.check_frame, frame)
        if checked is None or checked["used"] != len(frame):
            raise InvalidFrame("the body is not exactly one frame")
        if checked["rejected"]:
            self.metrics.events.labels(source, "rejected").inc(checked["entries"])
            raise InvalidEvents(checked["rejected"])
        return await self.append([frame], source, checked["entries"])

    async def append(self, frames: list[bytes], source: str, entries: int) -> int:
        """Journals already-checked frames; returns the last sequence once durable."""
        assert self.journal_actor is not None
        started = time.perf_counter()
        now = time.time()
        try:
            seq = await self.journal_actor.append([journal_record(f, now) for f in frames])
        except (JournalClosed, JournalFailed):
            self.metrics.events.labels(source, "unavailable").inc(entries)
            raise
        self.metrics.wal_sync.observe(time.perf_counter() - started)
        self.metrics.events.labels(source, "accepted").inc(entries)
        return seq

    async def wait_applied(self, seq: int) -> None:
        """Returns once the model reflects journal record ``seq``."""
        while self.model_actor is not None and self.model_actor.applied_seq < seq:
            await self._applied.wait()

    async def take_snapshot(self) -> int:
        """Writes a snapshot and deletes the journal segments the older one covers."""
        assert self.model_actor is not None and self.journal_actor is not None
        newest = self._snapshot_path()
        if newest.exists():
            os.replace(newest, self._snapshot_path(PREVIOUS_SNAPSHOT))
            self._previous_snapshot_seq = self.snapshot_seq
        seq = await self.model_actor.snapshot(newest)
        self.snapshot_seq = seq
        self.metrics.snapshots.inc()
        keep_from = self._previous_snapshot_seq + 1
        try:
            await self.journal_actor.maintain(lambda j: j.drop_before(keep_from))
        except (JournalClosed, JournalFailed):
            pass  # shutting down: the segments go next time
        return seq

    async def _snapshot_loop(self) -> None:
        while True:
            await trio.sleep(self.config.snapshot_interval)
            assert self.model_actor is not None
            if self.model_actor.applied_seq > self.snapshot_seq:
                await self.take_snapshot()

    async def feed_demo(self, rate: float) -> None:
        """Feeds a synthetic stream at ``rate`` events/s until shutdown (``--demo``)."""
        from ._synthetic import SyntheticConfig, iter_events

        per_tick = max(1, int(rate / 20))
        stream = iter_events(
            SyntheticConfig(n_users=200, n_items=500, n_events=None, seed=7), batch=per_tick
        )
        for batch in stream:
            events = [
                {"user": int(u), "item": int(i), "weight": float(w)}
                for u, i, w in zip(batch.users, batch.items, batch.weights, strict=True)
            ]
            try:
                await self.submit(json_to_frame(events, "demo", len(events))[0], "demo")
            except (JournalClosed, JournalFailed):
                return
            await trio.sleep(per_tick / rate)

    def stats(self) -> dict[str, Any]:
        s = self.model.stats()
        return {
            "events_applied": s["events_applied"],
            "users": s["users"],
            "items": s["items"],
            "subscribers": self.publisher.subscribers if self.publisher else 0,
            "wal_seq": self.journal_actor.journal.last_seq if self.journal_actor else 0,
            "applied_seq": self.model_actor.applied_seq if self.model_actor else 0,
            "snapshot_seq": self.snapshot_seq,
            "duplicates": s["duplicates"],
            "rejected": s["rejected"],
            "index_stale": s["index_stale"],
        }


async def serve(config: ServerConfig, demo_rate: float = 0.0) -> None:
    """Runs a server until SIGINT or SIGTERM, then shuts it down in order.

    With ``demo_rate`` > 0 a synthetic stream is fed at that many events per second.
    """
    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if demo_rate > 0:
            nursery.start_soon(server.feed_demo, demo_rate)
        print(f"recstream serving\n  dashboard and API: {server.http_url}/")
        print(f"  Fluent Forward:    {server.forward_address[0]}:{server.forward_address[1]}")
        if server.config.insecure:
            print("  auth is OFF (no keys configured; listening on loopback only)")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                server.shutdown()
                break
