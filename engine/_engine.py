"""The engine: the model, the log and the actors, composed; what the listeners talk to.

Start-up: load the newest usable snapshot (``engine._recovery``), start the model actor, then
the log, which replays what follows the snapshot through the model actor before it reports
started; then the index, publisher, snapshot and erasure actors. Shutdown
(:meth:`Engine.shutdown`): stop accepting, close the log (what is queued is made durable and
applied), snapshot, close subscribers with 1001.

The pipeline, in order: log -> model actor -> index actor -> publisher. The log forwards
durable groups on a bounded channel (backpressure reaches the producers); the model actor
applies them; the index actor re-links the items they moved and only then hands their users
to the publisher, so a list is never computed before the moves it reflects are in the graph.
Every actor lives in a module of its own; none imports this one.

Pseudonymisation (``pseudonymize_key``): user ids in every incoming frame are replaced by
HMAC-SHA256(key, id) before the frame is logged (see ``engine._frames``). Frames are
decoded and re-encoded in Python for that, which costs several times the Rust check per
event, so it happens only when a key is configured.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._config import ServerConfig
from ._core import InvalidFrame
from ._erasure import EraseActor
from ._events import journal_record, json_to_frame
from ._exceptions import InvalidEvents, JournalClosed, JournalFailed
from ._experiments import Experiments, Variant
from ._frames import interactions, map_users, pseudonym
from ._index_actor import MAX_WAIT_ITEMS, IndexActor
from ._journal import FileOps, RecoveryReport
from ._log import JournalLog, Log
from ._messages import Appended, Applied
from ._metrics import Metrics
from ._model import Model
from ._model_actor import ModelActor
from ._publisher import AfterApply, Publisher, Push, Subscription
from ._recovery import load_snapshot
from ._snapshots import SnapshotActor

if TYPE_CHECKING:
    from ._core import FrameCheck

__all__ = ["Engine"]

log = logging.getLogger("recstream.engine")

# Groups of log records that may wait between the log and the model actor; beyond that, the
# log stops forwarding and producers wait (backpressure).
MODEL_INBOX = 4
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
# Seconds a thread holding the GIL keeps it while another asks for it (CPython's default is
# 5 ms). The event loop and the worker threads (lists, applies, syncs) hand the GIL over many
# times per push: each list computed in a worker thread takes it back to build its result,
# and each finished call wakes the loop, which takes it back in turn. With the default, every
# hand-over could wait 5 ms: at 1,000 events/s with 1,000 subscribers, an own event's push took
# p50 130 ms and p99 302 ms with the default against 52 and 108 ms with 0.5 ms (`python -m
# bench latency --rate 1000 --low-rate 0 --idle-events 0`, sync batch, one run each).
SWITCH_INTERVAL = 0.0005

Id = str | int
# Sent by the engine behind the log's catch-up (never by a log: it has no payload).
_CAUGHT_UP = Appended(0, ())


class _Interpreter:
    """The interpreter's settings while the engine serves, and the time spent in CPython's
    cyclic collector, for ``/v1/stats`` (``gc_seconds``).

    Whatever is alive once the engine is up (modules, the app, what recovery built) is moved
    out of the collector's sight with ``gc.freeze()``: a full collection then walks only what
    serving allocated since, and stops the event loop for less.

    The GIL switch interval is cut to ``SWITCH_INTERVAL`` (see there).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0
        self._threshold = gc.get_threshold()
        self._switch_interval = sys.getswitchinterval()

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
        sys.setswitchinterval(SWITCH_INTERVAL)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)
        gc.set_threshold(*self._threshold)
        gc.unfreeze()
        sys.setswitchinterval(self._switch_interval)


class Engine:
    """One recstream engine. ``await nursery.start(engine.run)`` returns once it serves.

    Listeners (``connectors``) reach the engine through this class only: they submit frames
    (:meth:`submit`, :meth:`append`), read lists (``model``, ``publisher``), erase users
    (:meth:`erase_user`) and read :meth:`stats`.

    Args:
        config: The configuration (the listener settings in it are the connectors').
        log: Where accepted frames are kept (:class:`engine.Log`); None: the local journal
            in ``config.data_dir / "wal"``.
        file_ops: The system calls the journal and snapshots write and sync through (the
            real ones by default; fault drills pass a ``FaultyFileOps``).

    Attributes (valid once started):
        model: The model (read it freely; only the model actor writes it).
        publisher: The subscription registry (:class:`engine.Subscription`).
        experiments: A/B variants and their impressions.
        metrics: The Prometheus registry.
        ready: True while serving (after recovery, before shutdown).
        accepting: True while new frames are accepted.
        stopping: Set when shutdown begins (listeners stop their ingress then).
        recovery: What opening the local journal found and cut (None for another log).
    """

    def __init__(
        self, config: ServerConfig, *, log: Log | None = None, file_ops: FileOps | None = None
    ) -> None:
        self.config = config.check().with_token_secret()
        cfg = self.config
        self.file_ops = file_ops if file_ops is not None else FileOps()
        self.metrics = Metrics()
        self.log: Log = (
            log
            if log is not None
            else JournalLog(
                cfg.data_dir / "wal",
                sync=cfg.sync,
                interval_ms=cfg.sync_interval_ms,
                segment_bytes=cfg.wal_segment_bytes,
                file_ops=self.file_ops,
                on_fault=lambda e: self.metrics.io_errors.labels("journal").inc(),
                apply_before_sync=cfg.apply_before_sync,
            )
        )
        if self.log.replicated and cfg.model.coalesce_records:
            # Replicas group what they read differently; per-record solves keep their models
            # identical (see ModelConfig.coalesce_records).
            self.config = cfg = attrs.evolve(
                cfg, model=attrs.evolve(cfg.model, coalesce_records=False)
            )
        self.model: Model = Model(cfg.model)
        self.model_actor: ModelActor | None = None
        self.index_actor: IndexActor | None = None
        self.publisher: Publisher | None = None
        self.snapshots: SnapshotActor | None = None
        self.erasure: EraseActor | None = None
        self.recovery: RecoveryReport | None = None
        self._interpreter = _Interpreter()
        self.ready = False
        self.accepting = False
        self.stopping = trio.Event()
        self._applied = trio.Event()  # set and replaced after every applied group
        self._forwarded_seq = 0  # the newest seq the log forwarded to the model actor
        self._coalesced_reported = 0
        self.experiments = Experiments(
            cfg.variants,
            salt=cfg.experiment_salt,
            window=cfg.attribution_window,
            per_user=cfg.impressions_per_user,
            max_users=cfg.experiment_max_users,
        )
        self._recommend_params = self._supported_recommend_params()
        self._variant_params: dict[str, dict[str, Any]] = {}
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

    # --- running ----------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Where snapshots (and the local journal) live."""
        return self.config.data_dir

    async def run(self, *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED) -> None:
        """Recovers, serves until :meth:`shutdown`, then stops in order."""
        cfg = self.config
        loaded = await trio.to_thread.run_sync(load_snapshot, cfg.data_dir, cfg.model)
        self.model = model = loaded.model
        began, began_cpu = time.perf_counter(), time.process_time()
        from_log, to_relay = trio.open_memory_channel[Appended](MODEL_INBOX)
        to_model, inbox = trio.open_memory_channel[Appended](MODEL_INBOX)
        self.model_actor = ModelActor(
            model,
            inbox,
            applied_seq=loaded.seq,
            applied_position=loaded.position,
            on_applied=self._on_applied,
            alongside=self._lists_after_apply,
            wait_durable=self.log.wait_durable,
            report_users=False,  # nobody subscribes while catching up
        )
        self._forwarded_seq = loaded.seq
        self.index_actor = IndexActor(model, on_indexed=self._on_indexed)
        self.publisher = Publisher(
            model,
            max_subscribers=cfg.max_subscribers,
            refresh_interval=cfg.refresh_interval,
            refresh_budget=cfg.refresh_budget,
            drift_rank_slack=cfg.drift_rank_slack,
            on_pushes=self._on_pushes,
            applied_seq=loaded.seq,
            idle=self._model_idle,
        )
        self.snapshots = SnapshotActor(
            cfg.data_dir,
            self.model_actor,
            self.log,
            self.metrics,
            file_ops=self.file_ops,
            interval=cfg.snapshot_interval,
            snapshot_seq=loaded.seq,
        )
        self.erasure = EraseActor(self.snapshots, self.log)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.model_actor.run)
            caught_up = trio.Event()
            nursery.start_soon(self._relay, to_relay, to_model, caught_up)
            async with from_log.clone() as marker:
                await nursery.start(
                    functools.partial(
                        self.log.run,
                        from_log,
                        after_seq=loaded.seq,
                        after_position=loaded.position,
                    )
                )
                # The log forwarded what it held; a marker behind it tells when the relay
                # has passed all of it on; then the model applies it. The graph takes in the
                # replayed items in the background (the index actor): until it holds the
                # catalog, the exact scan answers queries, so serving starts at once.
                await marker.send(_CAUGHT_UP)
            await caught_up.wait()
            await self.wait_applied(self._forwarded_seq)
            self.model_actor.report_users = True
            if isinstance(self.log, JournalLog):
                self.recovery = self.log.recovery
            log.info(
                "replayed %d journal record(s) in %.3f s (%.3f s CPU); model at seq %d",
                self.model_actor.applied_seq - loaded.seq,
                time.perf_counter() - began,
                time.process_time() - began_cpu,  # the replay runs in worker threads
                self.model_actor.applied_seq,
            )
            self._interpreter.install()  # recovered, not serving yet
            try:
                async with trio.open_nursery() as services:
                    await services.start(self.index_actor.run)
                    await services.start(self.publisher.run)
                    await services.start(self.snapshots.run)
                    await services.start(self.erasure.run)
                    if isinstance(self.log, JournalLog) and self.log.interrupted_erasures:
                        interrupted = self.log.interrupted_erasures
                        log.info("completing %d interrupted erasure(s)", len(interrupted))
                        for user, seq in interrupted.items():
                            self.erasure.request(user, seq)
                    self.ready = self.accepting = True
                    task_status.started(self)

                    await self.stopping.wait()
                    log.info("shutting down: stopping ingress")
                    self.ready = self.accepting = False
                    await self.log.aclose()
                    await self.model_actor.drained.wait()
                    await trio.to_thread.run_sync(model.reindex, None)
                    try:
                        await self.take_snapshot()
                    except OSError:
                        pass  # logged; the log holds everything, the next start replays it
                    self.publisher.close_all()
                    await trio.sleep(0.05)  # let sessions send their close frames
                    services.cancel_scope.cancel()
            finally:
                self._interpreter.remove()

    async def _relay(
        self,
        receive: trio.MemoryReceiveChannel[Appended],
        send: trio.MemorySendChannel[Appended],
        caught_up: trio.Event,
    ) -> None:
        """Passes the log's groups on to the model actor, noting the newest seq forwarded;
        sets ``caught_up`` at the start-up marker."""
        async with receive, send:
            async for group in receive:
                if group is _CAUGHT_UP:
                    caught_up.set()
                    continue
                self._forwarded_seq = group.last_seq
                await send.send(group)

    def shutdown(self) -> None:
        """Starts an orderly shutdown (safe to call more than once)."""
        self.stopping.set()

    # --- hooks ------------------------------------------------------------------------------

    def _lists_after_apply(self, results: list[Applied]) -> AfterApply | None:
        """Right after a group applied, where the model actor applied it (see ``ModelActor``):
        the lists of the group's subscribed users (pushed by ``_on_applied``), computed once
        the items the group moved are re-linked, as the index actor would wait for them (up to
        as many)."""
        if self.publisher is None or not self.ready:
            return None
        stale = self.model.stats()["index_stale"]
        if 0 < stale <= MAX_WAIT_ITEMS:
            self.model.reindex(MAX_WAIT_ITEMS)
        return self.publisher.lists_after_apply(results)

    def _on_applied(self, results: list[Applied], lists: AfterApply | None) -> None:
        """The model actor applied a group: erasures start now; the lists computed with the
        apply are pushed; the publisher hears of the other users once the index actor
        re-linked the items the group moved."""
        assert self.index_actor is not None and self.model_actor is not None
        assert self.publisher is not None
        self.metrics.model_update.observe(self.model_actor.last_apply_seconds)
        rejected = 0
        for r in results:
            for user in r.erased:
                self.erase_applied(user, r.seq)
            rejected += len(r.rejected)
        if rejected:
            self.metrics.rejects.labels("invalid_record").inc(rejected)
        if self.ready:
            # The publisher's version follows the model at once (a list computed from now on
            # reflects these records); the users' own recomputes wait for the index.
            if results:
                self.publisher.notify((), results[-1].seq, results[-1].accepted_at)
            if lists is not None:
                self.publisher.push_after_apply(lists)
            self.index_actor.applied(results)
        else:
            self._on_indexed(results)  # catching up: no subscriber yet, the index rebuilds
        self.index_actor.wake()
        self._applied.set()
        self._applied = trio.Event()

    def _on_indexed(self, results: list[Applied]) -> None:
        assert self.publisher is not None
        for r in results:
            self.publisher.notify(r.users, r.seq, r.accepted_at)

    def _model_idle(self) -> bool:
        """Whether neither the model actor nor the index actor works in a worker thread."""
        model, index = self.model_actor, self.index_actor
        return model is not None and index is not None and not (model.busy or index.busy)

    def _on_pushes(self, handed: list[tuple[Subscription, Push, bool]]) -> None:
        assert self.publisher is not None
        now = time.time()
        self.metrics.pushed(handed, now)
        coalesced = self.publisher.coalesced - self._coalesced_reported
        if coalesced:
            self.metrics.coalesced.inc(coalesced)
            self._coalesced_reported = self.publisher.coalesced
        if self.experiments.variants:
            for sub, push, _ in handed:
                self.experiments.impression(sub.user, push.items, now)

    # --- ingestion --------------------------------------------------------------------------

    def check_frame(self, buf: bytes, offset: int = 0) -> FrameCheck | None:
        """Checks the Forward frame at ``buf[offset:]`` without applying it (see
        ``Model.check_frame``): None while the frame is incomplete.

        Raises:
            InvalidFrame: The bytes can never be a frame.
        """
        return self.model.check_frame(buf, offset)

    async def submit(self, frame: bytes, source: str) -> int:
        """Validates a frame, logs it, returns its sequence once durable.

        Raises:
            InvalidEvents: some record has bad values; nothing was logged.
            InvalidFrame: the frame itself is malformed.
            JournalClosed: the engine is shutting down.
            JournalFailed: the log failed; the events were not acknowledged.
        """
        if not self.accepting:
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

    async def _off_loop(self, fn: Any, frames: Sequence[bytes]) -> Any:
        if sum(len(f) for f in frames) <= INLINE_FRAME_BYTES:
            return fn(frames)
        return await trio.to_thread.run_sync(fn, frames)

    async def append(self, frames: Sequence[bytes], source: str, entries: int) -> int:
        """Logs already-checked frames; returns the last sequence once durable.

        With ``pseudonymize_key`` set, user ids are replaced first; with experiments
        running, interactions are attributed to the variants once durable.

        Args:
            frames: Frames checked with :meth:`check_frame`.
            source: The metrics label of the listener (``http``, ``ws``, ``forward``).
            entries: The events the frames hold (for the metrics).

        Raises:
            JournalClosed, JournalFailed: See :meth:`submit`.
        """
        frames = list(frames)
        if self._pseudonym is not None:
            fn = self._pseudonym
            frames = await self._off_loop(lambda fs: [map_users(f, fn) for f in fs], frames)
        started = time.perf_counter()
        now = time.time()
        try:
            seq = await self.log.append([journal_record(f, now) for f in frames])
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

    @property
    def applied_seq(self) -> int:
        """The newest seq the model reflects."""
        return self.model_actor.applied_seq if self.model_actor is not None else 0

    async def wait_applied(self, seq: int) -> None:
        """Returns once the model reflects log record ``seq``."""
        while self.model_actor is not None and self.model_actor.applied_seq < seq:
            await self._applied.wait()

    # --- queries and subscriptions ----------------------------------------------------------

    async def recommend(
        self,
        user: Id,
        *,
        k: int,
        exclude: Sequence[Id] | None = None,
        category: str | None = None,
        explain: bool = False,
        **params: Any,
    ) -> list[Any]:
        """The user's top ``k`` now, as ``Model.recommend(..., detail=True)`` entries
        (computed in a worker thread; ``params`` are the model's re-ranking arguments)."""
        return await trio.to_thread.run_sync(
            lambda: self.model.recommend(
                user,
                k=k,
                exclude=exclude,
                category=category,
                explain=explain,
                detail=True,
                **params,
            )
        )

    async def similar(self, item: Id, k: int = 10) -> list[tuple[Id, float]]:
        """The ``k`` items most similar to ``item``, with scores.

        Raises:
            KeyError: The model does not know ``item``.
        """
        return await trio.to_thread.run_sync(lambda: self.model.similar(item, k))

    async def trending(self, k: int = 10, category: str | None = None) -> list[tuple[Id, float]]:
        """The ``k`` items with the highest decayed popularity (in ``category``)."""
        return await trio.to_thread.run_sync(lambda: self.model.trending(k, category))

    @contextlib.asynccontextmanager
    async def subscribe(self, sub: Subscription) -> AsyncIterator[Subscription]:
        """Registers ``sub`` for pushes while the ``async with`` block runs: its slot
        (``sub.slot.get()``) receives the user's list whenever it changes. Send the current
        list first (:meth:`current`).

        Raises:
            TooManySubscribers: ``max_subscribers`` are subscribed already.
            JournalClosed: The engine is not serving.
        """
        if self.publisher is None:
            raise JournalClosed("the server is not serving")
        publisher = self.publisher
        publisher.subscribe(sub)
        try:
            yield sub
        finally:
            publisher.unsubscribe(sub)

    async def current(self, sub: Subscription) -> Push:
        """The subscribed user's list now, recorded as the last one pushed to ``sub``."""
        assert self.publisher is not None
        return await self.publisher.current(sub)

    # --- snapshots and erasure --------------------------------------------------------------

    @property
    def snapshot_seq(self) -> int:
        """The seq the newest snapshot covers."""
        return self.snapshots.snapshot_seq if self.snapshots is not None else 0

    @property
    def snapshot_fault(self) -> str | None:
        """Why the last snapshot failed, or None if it succeeded."""
        return self.snapshots.fault if self.snapshots is not None else None

    @property
    def erased_through(self) -> int:
        """Every erasure with a seq up to this is complete on disk."""
        return self.erasure.erased_through if self.erasure is not None else 0

    async def take_snapshot(self, *, replace_previous: bool = False) -> int:
        """Writes a snapshot and lets the log drop what the older one covers; returns the
        seq it covers.

        Raises:
            JournalClosed: The engine is not running.
            OSError: The snapshot could not be written (see ``snapshot_fault``).
        """
        if self.snapshots is None:
            raise JournalClosed("the engine is not running")
        return await self.snapshots.take(replace_previous=replace_previous)

    def storage_faults(self) -> dict[str, str]:
        """What keeps the engine from taking writes now: ``"journal"`` (the log) and/or
        ``"snapshot"`` -> the reason. Empty when healthy."""
        out = {}
        if self.log.fault is not None:
            out["journal"] = self.log.fault
        if self.snapshot_fault is not None:
            out["snapshot"] = self.snapshot_fault
        return out

    async def erase_user(self, user: Id, raw: Id, tag: str) -> int | None:
        """Erases ``user`` (the stored id; ``raw`` as the request named it, logged under
        ``tag``) from the model, the snapshots and the log; returns the erase record's
        sequence once the erasure is complete on disk.

        Returns None, writing nothing, when the model does not know the user once everything
        logged so far is applied (an erase of an unknown id must not rewrite snapshots and
        the log for nothing).

        Raises:
            JournalClosed: shutting down, or the erasure could not finish (it completes at the
                next start).
            JournalFailed: the disk failed before the erase record was durable.
        """
        if self.erasure is None:
            raise JournalClosed("the server is not serving")
        await self.wait_applied(self._log_head())
        known = await trio.to_thread.run_sync(self.model.user_vector, user)
        if known is None and not self.erasure.queued(user):
            return None
        frame = json_to_frame({"erase_user": raw}, tag, 1)[0]
        seq = await self.submit(frame, "http")
        await self.wait_applied(seq)
        self.erase_applied(user, seq)
        await self.erasure.wait_erased(user)
        return seq

    def erase_applied(self, user: Id, seq: int) -> None:
        """Step 1's in-memory part and the start of steps 2-3 for an erase applied at ``seq``
        (see ``engine._erasure``).

        Called when an erasure is seen live, and by :meth:`erase_user` once its record is
        applied (so an erasure the live check missed still completes). Idempotent.
        """
        assert self.publisher is not None and self.erasure is not None
        dropped = self.publisher.erase(user, seq)
        if dropped:
            self.metrics.dropped_pushes.inc(dropped)
        self.experiments.forget(user)
        self.erasure.request(user, seq)

    async def wait_erased(self, user: Id) -> None:
        """Returns once the queued erasure of ``user`` is complete on disk.

        Raises:
            JournalClosed: the erasure could not finish (see :meth:`erase_user`).
        """
        if self.erasure is not None:
            await self.erasure.wait_erased(user)

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

    # --- demo and stats ---------------------------------------------------------------------

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

    def _log_head(self) -> int:
        """The newest seq the log holds for this node (durable or about to be)."""
        head = self.log.stats().get("head")
        return head if isinstance(head, int) else self._forwarded_seq

    def stats(self) -> dict[str, Any]:
        """The figures ``/v1/stats`` and the dashboard show."""
        s = self.model.stats()
        return {
            "events_applied": s["events_applied"],
            "users": s["users"],
            "items": s["items"],
            "subscribers": self.publisher.subscribers if self.publisher else 0,
            "wal_seq": self._log_head(),
            "applied_seq": self.applied_seq,
            "snapshot_seq": self.snapshot_seq,
            "duplicates": s["duplicates"],
            # Refusals since start, counted as recstream_rejects_total counts them: most are
            # refused before the log (the model never sees them).
            "rejected": self.metrics.rejected_total(),
            "index_stale": s["index_stale"],
            "gc_seconds": self._interpreter.seconds,
            "gc_collections": self._interpreter.collections,
            # JSON-ready: a log's opaque bytes (its position) as hex.
            "log": {k: v.hex() if isinstance(v, bytes) else v for k, v in self.log.stats().items()},
        }
