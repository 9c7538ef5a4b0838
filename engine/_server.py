"""The server: recovery, the actors, the listeners, and an orderly shutdown.

Start-up: open the journal (cutting a torn tail), load the newest valid snapshot, replay the
journal after it, then start the actors and listeners. Shutdown (SIGINT/SIGTERM or
:meth:`Server.shutdown`): stop ingress, drain the journal into the model, snapshot, close
subscribers with 1001, stop the HTTP server.

Snapshots: ``snapshot.rsnap`` is the newest, ``snapshot.prev.rsnap`` the one before. Journal
segments are deleted only once the *older* snapshot covers them, so a damaged newest snapshot
still leaves a complete recovery path.

Erasure (``DELETE /v1/users/{user}`` or a Forward ``{"erase_user": id}`` record) must leave
nothing on disk from which the user could come back. It runs in this order:

1. The erase record is journaled at seq E and applied: the model forgets the user's vector,
   history and seen set. The publisher drops unread lists and pending recomputes for the
   user's subscriptions; experiment bookkeeping forgets the user's impressions.
2. A snapshot is taken (at seq S >= E, so without the user), and copied over the previous
   snapshot, so both snapshot files are free of the user. A crash before this point leaves
   the old snapshots *and* the whole log, erase record included: replay erases again.
3. The journal is rewritten (``Journal.rewrite``, atomic) without any record of the user
   with seq <= E -- interactions and the erase record itself. A crash before the rewrite
   commits leaves step 2's snapshots, which start after E, so the records still in the log
   are never replayed; after it, the log holds nothing of the user at all.

Step 2 must precede step 3: rewriting first and crashing before the snapshot would load an
old snapshot that still has the user and replay a log that no longer erases them. Once both
are done, every snapshot is at or after E and the log has no event of the user up to E, so
no recovery path can bring the user back; events for the same id after E are new data.
Journal segments older than the new snapshot are dropped as after any snapshot.

A crash between steps 1 and 3 leaves the model state right (replay erases again) but the
bytes on disk: recovery therefore reads the whole log, not only the part after the snapshot,
for erase records, and completes steps 2 and 3 for each one it finds once serving. A
completed erasure leaves no erase record, so this never repeats. An erasure is detected live
from the model's report of the users its erase records removed. Erasing a user the model does
not know writes nothing: the endpoint answers 404 (see :meth:`Server.erase_user`), and an erase
record for an unknown user that arrives over Forward changes no file.

Configuration on restart: the snapshot carries the settings the model was built with; the
configured ones replace them where a running model can follow (event types and weights, the
Forward frame limit, decay, regularisation, re-ranking, the redelivery window, growing history
caps, ``ef_search``...). A setting the stored state depends on (``dim``, ``hnsw_m``,
``ef_construction``, ``trending_half_life``, shrinking history caps) refuses the start with a
:class:`ConfigError` naming it.

Pseudonymisation (``pseudonymize_key``): user ids in every incoming frame are replaced by
HMAC-SHA256(key, id) before the frame is journaled (see ``engine._frames``). Frames are
decoded and re-encoded in Python for that, which costs several times the Rust check per
event, so it happens only when a key is configured.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import inspect
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ._config import ServerConfig
from ._connections import ConnectionGate, default_connection_limits, raise_nofile_limit
from ._core import CorruptSnapshot, InvalidFrame
from ._events import journal_record, json_to_frame, parse_journal_record
from ._exceptions import ConfigError, InvalidEvents, JournalClosed, JournalFailed
from ._experiments import Experiments, Variant
from ._forward import ForwardServer
from ._frames import drop_users, erased_users, interactions, map_users, pseudonym
from ._index_actor import IndexActor
from ._journal import FileOps, Journal, RecoveryReport
from ._journal_actor import Appended, JournalActor
from ._metrics import Metrics
from ._model import Model
from ._model_actor import Applied, ModelActor, apply_records
from ._publisher import Publisher, Push, Subscription

__all__ = ["Server", "serve"]

log = logging.getLogger("recstream.server")

SNAPSHOT = "snapshot.rsnap"
PREVIOUS_SNAPSHOT = "snapshot.prev.rsnap"
# Groups of journal records that may wait between the journal and the model actor; beyond
# that, producers wait (backpressure).
MODEL_INBOX = 4
REPLAY_CHUNK = 1024
# Frames up to this size are re-encoded or decoded on the event loop, larger ones in a worker.
INLINE_FRAME_BYTES = 64 * 1024
PSEUDONYM_CACHE = 65_536
# Net allocations of tracked objects between young-generation collections while serving
# (CPython's default: 700). A recompute of many subscribers' lists briefly holds a few
# objects per push alive at once; with a small threshold those bursts set off collections
# that find them alive, promote them and later pay for them again in the older generations
# (20-25 % of the server's CPU with 1,000 subscribers at 7,000; none at 50,000, `python -m
# bench latency --refresh-interval 3600`). Garbage in reference cycles waits for at most
# this many objects' worth of growth.
GC_GEN0_THRESHOLD = 50_000

Id = str | int


class _GcClock:
    """Time spent in CPython's cyclic collector, for ``/v1/stats`` (``gc_seconds``).

    Whatever is alive once the server is up (modules, the app, what recovery built) is moved
    out of the collector's sight with ``gc.freeze()``: a full collection then walks only what
    serving allocated since, and stops the event loop for less.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0
        self._threshold = gc.get_threshold()

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def install(self) -> None:
        """Freezes what start-up left alive and starts timing collections."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *self._threshold[1:])
        gc.callbacks.append(self._callback)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)
        gc.set_threshold(*self._threshold)
        gc.unfreeze()


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


async def _serve_http(
    app: Any,
    hc: HypercornConfig,
    sock: socket.socket,
    gate: ConnectionGate,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio worker loop for one plain-HTTP socket, with ``gate`` on its accepts.

    Hypercorn's ``worker_serve`` builds its listeners itself, leaving no place to limit the
    connections; this is its accept loop and graceful stop, minus lifespan events (the app
    has none), TLS and QUIC. On ``stop``: no new connections, open ones get
    ``graceful_timeout`` seconds to finish.
    """
    context = WorkerContext(None)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    handler = functools.partial(TCPServer, app, hc, context, ConnectionState({}))
    host, port = sock.getsockname()[:2]
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                functools.partial(
                    trio.serve_listeners,
                    gate.wrap(handler),
                    [listener],
                    handler_nursery=connections,
                )
            )
            task_status.started(
                f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            )
            await stop.wait()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + hc.graceful_timeout


class Server:
    """One recstream node. ``await nursery.start(server.run)`` returns once it serves.

    Attributes (valid after start):
        http_url: ``http://host:port`` of the HTTP and websocket listener.
        forward_address: (host, port) of the Fluent Forward listener.
        recovery: What opening the journal found and cut.
        snapshot_fault: Why the last snapshot failed, or None if it succeeded.

    Args:
        config: The configuration.
        file_ops: The system calls the journal and snapshots write and sync through (the
            real ones by default; fault drills pass a ``FaultyFileOps``).
    """

    def __init__(self, config: ServerConfig, *, file_ops: FileOps | None = None) -> None:
        self.config = config.check().with_token_secret()
        self.file_ops = file_ops if file_ops is not None else FileOps()
        self.snapshot_fault: str | None = None
        self.metrics = Metrics()
        self.model: Model = Model(self.config.model)
        self.journal_actor: JournalActor | None = None
        self.model_actor: ModelActor | None = None
        self.index_actor: IndexActor | None = None
        self.publisher: Publisher | None = None
        self.recovery: RecoveryReport | None = None
        self._gc = _GcClock()
        self.http_url = ""
        self.forward_address: tuple[str, int] = ("", 0)
        self.snapshot_seq = 0
        self._previous_snapshot_seq = 0
        self.ready = False
        self.accepting = False
        self._shutdown = trio.Event()
        self._applied = trio.Event()  # set and replaced after every applied group
        cfg = self.config
        self.experiments = Experiments(
            cfg.variants,
            salt=cfg.experiment_salt,
            window=cfg.attribution_window,
            per_user=cfg.impressions_per_user,
            max_users=cfg.experiment_max_users,
        )
        self._recommend_params = self._supported_recommend_params()
        self._variant_params: dict[str, dict[str, Any]] = {}
        # Erasures applied by the model, waiting for the snapshot and journal rewrite: user
        # -> seq of its newest erase record. Bounded by the erase requests in flight.
        self._erase_pending: dict[Id, int] = {}
        self._erase_wake = trio.Event()
        self._erasing: dict[Id, int] = {}  # the batch being completed
        self._erase_stopped = False
        self.erased_through = 0  # every erasure with seq <= this is complete on disk
        self._erased = trio.Event()  # set and replaced after every completed batch
        self._snapshot_lock = trio.Lock()
        self._coalesced_reported = 0
        key = cfg.pseudonymize_key
        # Active users recur: caching their pseudonyms (bounded) saves an HMAC per event.
        self._pseudonym = (
            functools.lru_cache(maxsize=PSEUDONYM_CACHE)(functools.partial(pseudonym, key))
            if key is not None
            else None
        )
        self.metrics.index_stale.set_function(lambda: self.model.stats()["index_stale"])
        self.metrics.subscribers.set_function(
            lambda: self.publisher.subscribers if self.publisher is not None else 0
        )
        for what in ("journal", "snapshot"):
            self.metrics.storage_fault.labels(what).set_function(
                functools.partial(lambda w: float(w in self.storage_faults()), what)
            )

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
            ops=self.file_ops,
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
                self.model = Model.load(path, self.config.model)
            except CorruptSnapshot as e:
                log.error("snapshot %s unusable (%s); trying the previous one", path, e)
                continue
            except ValueError as e:
                raise ConfigError(
                    f"the configuration does not fit the model stored in {self.data_dir}: {e}; "
                    "set it back, or start from an empty data directory"
                ) from None
            except OSError as e:
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
        began, began_cpu = time.perf_counter(), time.process_time()
        chunk: list[bytes] = []
        first = seq + 1
        # The whole log is read, not only what follows the snapshot: an erase record still
        # in it means a crash interrupted that erasure, which is completed once serving.
        for s, payload in journal.replay(after_seq=0):
            if b"erase_user" in payload or b"gzip" in payload:
                for user in _erase_requests(payload):
                    self._erase_pending[user] = s
            if s <= seq:
                continue
            if not chunk:
                first = s
            chunk.append(payload)
            if len(chunk) >= REPLAY_CHUNK:
                apply_records(self.model, first, chunk, collect=False)
                replayed += len(chunk)
                chunk = []
        if chunk:
            apply_records(self.model, first, chunk, collect=False)
            replayed += len(chunk)
        self.model.reindex(None)
        last = max(seq, journal.last_seq)
        log.info(
            "replayed %d journal record(s) in %.3f s (%.3f s CPU); model at seq %d",
            replayed,
            time.perf_counter() - began,
            time.process_time() - began_cpu,
            last,
        )
        return journal, last

    # --- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Recovers, serves until :meth:`shutdown`, then stops in order."""
        journal, applied_seq = await trio.to_thread.run_sync(self._recover)
        if self._erase_pending:
            log.info("completing %d interrupted erasure(s)", len(self._erase_pending))
            self._erase_wake.set()
        send, receive = trio.open_memory_channel[Appended](MODEL_INBOX)
        self.journal_actor = JournalActor(
            journal, output=send, on_fault=lambda e: self.metrics.io_errors.labels("journal").inc()
        )
        self.index_actor = IndexActor(self.model)
        self.publisher = Publisher(
            self.model,
            max_subscribers=self.config.max_subscribers,
            refresh_interval=self.config.refresh_interval,
            refresh_budget=self.config.refresh_budget,
            on_push=self._on_push,
            applied_seq=applied_seq,
        )
        self.model_actor = ModelActor(
            self.model, receive, applied_seq=applied_seq, on_applied=self._on_applied
        )
        nofile = raise_nofile_limit()
        fwd_limit, http_limit = default_connection_limits(nofile)
        forward = ForwardServer(self, self.config.max_forward_connections or fwd_limit)
        self.forward_gate = forward.gate
        self.http_gate = ConnectionGate(
            "http", self.config.max_http_connections or http_limit, self.metrics
        )
        log.info(
            "open-file limit %d: up to %d Forward and %d HTTP connections",
            nofile,
            forward.gate.limit,
            self.http_gate.limit,
        )
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
        # Idle connections: a keep-alive connection between requests, or one stalled inside
        # its request headers, is closed after the keep-alive timeout; one that sends nothing
        # for ``idle_timeout`` (a body or websocket frame stalled half-sent, a subscriber that
        # stopped answering the pings sent every third of it) after the read timeout.
        idle = self.config.idle_timeout
        hc.keep_alive_timeout = min(5.0, idle)
        hc.read_timeout = idle  # type: ignore[assignment]
        hc.websocket_ping_interval = idle / 3
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        http_stop = trio.Event()

        self._gc.install()  # recovered, not serving yet
        async with trio.open_nursery() as nursery:
            await nursery.start(self.journal_actor.run)
            await nursery.start(self.model_actor.run)
            async with trio.open_nursery() as services:
                await services.start(self.index_actor.run)
                await services.start(self.publisher.run)
                services.start_soon(self._snapshot_loop)
                services.start_soon(self._erase_loop)
                forward_scope = await services.start(forward.serve, fwd_sock)
                self.http_url = await nursery.start(
                    _serve_http,
                    wrap_app(app, hc.wsgi_max_body_size, None),  # type: ignore[arg-type]
                    hc,
                    http_sock,
                    self.http_gate,
                    http_stop,
                )
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
                try:
                    await self.take_snapshot()
                except OSError:
                    pass  # logged; the journal holds everything, the next start replays it
                self.publisher.close_all()
                await trio.sleep(0.05)  # let sessions send their close frames
                services.cancel_scope.cancel()
            http_stop.set()
        self._gc.remove()

    def shutdown(self) -> None:
        """Starts an orderly shutdown (safe to call more than once)."""
        self._shutdown.set()

    # --- hooks ------------------------------------------------------------------------------

    def _on_applied(self, results: list[Applied]) -> None:
        assert self.publisher is not None and self.index_actor is not None
        assert self.model_actor is not None
        self.metrics.model_update.observe(self.model_actor.last_apply_seconds)
        rejected = 0
        for r in results:
            for user in r.erased:
                self.erase_applied(user, r.seq)
            self.publisher.notify(r.users, r.seq, r.accepted_at)
            rejected += len(r.rejected)
        if rejected:
            self.metrics.rejects.labels("invalid_record").inc(rejected)
        self.index_actor.wake()
        self._applied.set()
        self._applied = trio.Event()

    async def erase_user(self, user: Id, raw: Id, tag: str) -> int | None:
        """Erases ``user`` (the stored id; ``raw`` as the request named it, journaled under
        ``tag``) from the model, the snapshots and the journal; returns the erase record's
        sequence once the erasure is complete on disk.

        Returns None, writing nothing, when the model does not know the user once everything
        journaled so far is applied (an erase of an unknown id must not rewrite snapshots and
        the journal for nothing).

        Raises:
            JournalClosed: shutting down, or the erasure could not finish (it completes at the
                next start).
            JournalFailed: the disk failed before the erase record was durable.
        """
        if self.journal_actor is None:
            raise JournalClosed("the server is not serving")
        await self.wait_applied(self.journal_actor.journal.last_seq)
        known = await trio.to_thread.run_sync(self.model.user_vector, user)
        if known is None and user not in self._erase_pending and user not in self._erasing:
            return None
        frame = json_to_frame({"erase_user": raw}, tag, 1)[0]
        seq = await self.submit(frame, "http")
        await self.wait_applied(seq)
        self.erase_applied(user, seq)
        await self.wait_erased(user)
        return seq

    def erase_applied(self, user: Id, seq: int) -> None:
        """Step 1's in-memory part and the start of steps 2-3 for an erase applied at ``seq``.

        Called when an erasure is seen live, and by the erase endpoint once its record is
        applied (so an erasure the live check missed still completes). Idempotent.
        """
        assert self.publisher is not None
        dropped = self.publisher.erase(user)
        if dropped:
            self.metrics.dropped_pushes.inc(dropped)
        self.experiments.forget(user)
        if seq <= max(self._erase_pending.get(user, 0), self._erasing.get(user, 0)):
            return  # already queued or being completed
        self._erase_pending[user] = seq
        self._erase_wake.set()

    def _on_push(self, sub: Subscription, push: Push) -> None:
        assert self.publisher is not None
        self.metrics.pushes.inc()
        coalesced = self.publisher.coalesced - self._coalesced_reported
        if coalesced:
            self.metrics.coalesced.inc(coalesced)
            self._coalesced_reported = self.publisher.coalesced
        self.experiments.impression(sub.user, push.items, time.time())
        if push.cause is not None:
            self.metrics.push_latency.observe(max(0.0, time.time() - push.cause.accepted_at))

    # --- experiments ------------------------------------------------------------------------

    def _supported_recommend_params(self) -> frozenset[str] | None:
        """Keyword arguments ``Model.recommend`` accepts (None: unknown, probe per call)."""
        try:
            return frozenset(inspect.signature(self.model.recommend).parameters)
        except (TypeError, ValueError):
            return None

    def variant_for(self, user: Id) -> tuple[str, Variant | None]:
        """The user's variant name and settings (None: the default)."""
        v = self.experiments.variant_of(user)
        return (v.name if v is not None else "default"), v

    def recommend_params(self, variant: Variant | None) -> dict[str, Any]:
        """The variant's extra ``recommend`` arguments that the installed model accepts.

        A parameter the model does not know (an older extension) is left out rather than
        failing the request, so a variant can be configured ahead of the model supporting
        it. Decided once per variant: by the signature, or by one probing call per parameter
        (a TypeError means the name is unknown) where there is no signature.
        """
        if variant is None or not variant.params:
            return {}
        cached = self._variant_params.get(variant.name)
        if cached is not None:
            return cached
        if self._recommend_params is not None:
            kept = {k: v for k, v in variant.params.items() if k in self._recommend_params}
        else:
            kept = {}
            for name, value in variant.params.items():
                try:
                    self.model.recommend("", k=1, **{name: value})
                except TypeError:
                    continue
                except Exception:  # noqa: BLE001 - refused for another reason: the name is known
                    pass
                kept[name] = value
        dropped = set(variant.params) - set(kept)
        if dropped:
            log.warning(
                "variant %r: the model does not accept %s; left out",
                variant.name,
                ", ".join(sorted(dropped)),
            )
        self._variant_params[variant.name] = kept
        return kept

    # --- erasure ----------------------------------------------------------------------------

    async def wait_erased(self, user: Id) -> None:
        """Returns once the queued erasure of ``user`` is complete on disk.

        Raises:
            JournalClosed: the erasure could not finish (shutdown or a disk failure); its
                erase record stays in the journal and the next start completes it.
        """
        while user in self._erase_pending or user in self._erasing:
            await self._erased.wait()
        if self._erase_stopped:
            raise JournalClosed("the erasure completes when the server next starts")

    async def _erase_loop(self) -> None:
        try:
            while True:
                await self._erase_wake.wait()
                self._erase_wake = trio.Event()
                if not self._erase_pending:
                    continue
                pending, self._erase_pending = self._erase_pending, {}
                self._erasing = pending
                try:
                    await self._complete_erasure(pending)
                except (JournalClosed, JournalFailed) as e:
                    # The erase records stay in the journal: the next start completes them.
                    log.error("erasure of %d user(s) left incomplete: %s", len(pending), e)
                    return
                finally:
                    self._erasing = {}
                self.erased_through = max(self.erased_through, max(pending.values()))
                self._erased.set()
                self._erased = trio.Event()
        finally:
            self._erase_stopped = True
            self._erase_pending.clear()
            self._erased.set()

    async def _complete_erasure(self, pending: dict[Id, int]) -> None:
        """Steps 2 and 3 of an erasure (see the module docstring)."""
        assert self.journal_actor is not None
        await self.take_snapshot(replace_previous=True)
        through = max(pending.values())
        # A raw id that does not occur in a record's bytes cannot be in it (unless the frame
        # is compressed); this skips decoding almost every record.
        needles = [u.encode("utf-8", "surrogateescape") for u in pending if isinstance(u, str)]
        all_text = len(needles) == len(pending)

        def keep(seq: int, payload: bytes) -> bytes | None:
            if seq > through:
                return payload
            if all_text and b"gzip" not in payload and not any(n in payload for n in needles):
                return payload
            accepted_at, frame = parse_journal_record(payload)
            new = drop_users(frame, {u for u, s in pending.items() if seq <= s})
            if new is frame:
                return payload
            return None if new is None else journal_record(new, accepted_at)

        changed = await self.journal_actor.maintain(lambda j: j.rewrite(keep))
        log.info(
            "erased %d user(s): snapshots replaced, %d journal record(s) rewritten",
            len(pending),
            changed,
        )

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
            self.metrics.rejects.labels("invalid_frame").inc()
            raise InvalidFrame("the body is not exactly one frame")
        if checked["rejected"]:
            self.metrics.events.labels(source, "rejected").inc(checked["entries"])
            self.metrics.rejects.labels("invalid_event").inc(len(checked["rejected"]))
            raise InvalidEvents(checked["rejected"])
        return await self.append([frame], source, checked["entries"])

    def map_user(self, user: Id) -> Id:
        """The id the engine stores for ``user``: its pseudonym when pseudonymisation is on."""
        return self._pseudonym(user) if self._pseudonym is not None else user

    async def _off_loop(self, fn: Any, frames: list[bytes]) -> Any:
        if sum(len(f) for f in frames) <= INLINE_FRAME_BYTES:
            return fn(frames)
        return await trio.to_thread.run_sync(fn, frames)

    async def append(self, frames: list[bytes], source: str, entries: int) -> int:
        """Journals already-checked frames; returns the last sequence once durable.

        With ``pseudonymize_key`` set, user ids are replaced first; with experiments
        running, interactions are attributed to the variants once durable.
        """
        assert self.journal_actor is not None
        if self._pseudonym is not None:
            fn = self._pseudonym
            frames = await self._off_loop(lambda fs: [map_users(f, fn) for f in fs], frames)
        started = time.perf_counter()
        now = time.time()
        try:
            seq = await self.journal_actor.append([journal_record(f, now) for f in frames])
        except (JournalClosed, JournalFailed):
            self.metrics.events.labels(source, "unavailable").inc(entries)
            raise
        self.metrics.wal_sync.observe(time.perf_counter() - started)
        self.metrics.events.labels(source, "accepted").inc(entries)
        if self.experiments.tracking:
            pairs = await self._off_loop(
                lambda fs: [p for f in fs for p in interactions(f)], frames
            )
            now = time.time()
            for user, item in pairs:
                self.experiments.interaction(user, item, now)
        return seq

    async def wait_applied(self, seq: int) -> None:
        """Returns once the model reflects journal record ``seq``."""
        while self.model_actor is not None and self.model_actor.applied_seq < seq:
            await self._applied.wait()

    async def take_snapshot(self, *, replace_previous: bool = False) -> int:
        """Writes a snapshot and deletes the journal segments the older one covers.

        Args:
            replace_previous: Also make the previous snapshot a copy of the new one (erasure:
                no snapshot may keep what was erased). Both files stay, so a damaged newest
                file still has a twin to recover from.
        """
        async with self._snapshot_lock:
            return await self._take_snapshot(replace_previous)

    def storage_faults(self) -> dict[str, str]:
        """What keeps the disk from taking writes now: ``"journal"`` and/or ``"snapshot"``
        -> the reason. Empty when healthy."""
        out = {}
        if self.journal_actor is not None and self.journal_actor.fault is not None:
            out["journal"] = self.journal_actor.fault
        if self.snapshot_fault is not None:
            out["snapshot"] = self.snapshot_fault
        return out

    async def _take_snapshot(self, replace_previous: bool) -> int:
        """Raises OSError when the snapshot could not be written (recorded in
        ``snapshot_fault``): no journal segment is dropped then, so the older snapshot and
        the log still recover everything."""
        assert self.model_actor is not None and self.journal_actor is not None
        newest = self._snapshot_path()
        previous = self._snapshot_path(PREVIOUS_SNAPSHOT)
        try:
            self.file_ops.check_snapshot(newest)
            if newest.exists():
                os.replace(newest, previous)
                self._previous_snapshot_seq = self.snapshot_seq
            seq = await self.model_actor.snapshot(newest)
            self.snapshot_seq = seq
            if replace_previous:
                await trio.to_thread.run_sync(_copy_durably, newest, previous, self.file_ops)
                self._previous_snapshot_seq = seq
        except OSError as e:
            self.metrics.io_errors.labels("snapshot").inc()
            if self.snapshot_fault is None:
                log.error("snapshot failed: %s; the journal keeps everything since", e)
            name = errno.errorcode.get(e.errno or 0, "error")
            self.snapshot_fault = f"snapshot {name}: {e.strerror or e}"
            raise
        if self.snapshot_fault is not None:
            log.warning("snapshots succeed again after: %s", self.snapshot_fault)
            self.snapshot_fault = None
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
            if self.model_actor.applied_seq > self.snapshot_seq or self.snapshot_fault:
                try:
                    await self.take_snapshot()
                except OSError:
                    pass  # recorded in snapshot_fault; tried again next interval

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
            # Refusals since start, counted as recstream_rejects_total counts them: most are
            # refused before the journal (the model never sees them).
            "rejected": self.metrics.rejected_total(),
            "index_stale": s["index_stale"],
            "gc_seconds": self._gc.seconds,
            "gc_collections": self._gc.collections,
        }


def _erase_requests(payload: bytes) -> list[Id]:
    """Users named by erase records in one journal payload (an unreadable one: none)."""
    try:
        return erased_users(parse_journal_record(payload)[1])
    except (ValueError, TypeError, OSError, EOFError, msgpack.UnpackException) as e:
        log.warning("journal record unreadable while looking for erasures: %s", e)
        return []


def _copy_durably(src: Path, dst: Path, ops: FileOps | None = None) -> None:
    """Replaces ``dst`` with a copy of ``src`` atomically (temp file, fsync, rename).

    Writes and syncs go through ``ops``; on an error the temporary file is removed and
    ``dst`` is left as it was.
    """
    ops = ops if ops is not None else FileOps()
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with open(src, "rb") as f_in, open(tmp, "wb") as f_out:
            fd = f_out.fileno()
            while block := f_in.read(1 << 20):
                view = memoryview(block)
                while view:
                    view = view[ops.write(fd, view) :]
            ops.fsync(fd)
        os.replace(tmp, dst)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        ops.fsync(fd)
    finally:
        os.close(fd)


async def serve(config: ServerConfig, demo_rate: float = 0.0) -> None:
    """Runs a server until SIGINT or SIGTERM, then shuts it down in order.

    With ``demo_rate`` > 0 a synthetic stream is fed at that many events per second.
    """
    server = Server(config)
    try:
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
    except BaseExceptionGroup as group:
        # A refused start is one ConfigError: raise it as such, so the CLI prints one line.
        refused = group.subgroup(ConfigError)
        leaves = list(_leaves(refused)) if refused is not None else []
        if (
            len(leaves) == 1
            and group.subgroup(lambda e: not isinstance(e, (ConfigError, BaseExceptionGroup)))
            is None
        ):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[Any]) -> Any:
    """The exceptions inside a (nested) group."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
