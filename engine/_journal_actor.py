"""The journal actor: the one task that writes the write-ahead log, with group commit.

Producers (the Forward server, HTTP and websocket handlers) call :meth:`JournalActor.append`,
which queues the payloads in a bounded inbox and waits until they are durable. The actor takes
everything waiting in the inbox at once, writes it in one go and syncs once, so N concurrent
producers cost one ``fdatasync`` instead of N ("group commit"). Disk calls run in a worker
thread (``trio.to_thread.run_sync``) so the event loop never blocks on the disk.

Each group goes, in sequence order, to the model actor's bounded channel. With
``apply_before_sync`` (the server's default) a group is forwarded as soon as it is written, and
the ``fdatasync`` runs while the model applies it: the model and the pushes do not wait for the
disk, and producers are still acknowledged only after the sync. A push may therefore reflect an
event that is not durable yet (a crash in that window loses the event, which was never
acknowledged). A small group on a quiet server is even applied and pushed before its sync
starts (see ``JournalActor._let_quiet_group_through``): a worker thread starting meanwhile
would compete with the event loop for the interpreter. Without it (strict order) a group is
forwarded only once it is durable. When the model actor falls behind, the send blocks, the
actor stops draining its inbox, the inbox fills and producers wait in ``append``:
backpressure reaches the network instead of piling up in memory. The actor never blocks on
that send while records it forwarded are not durable: it syncs them first, so
:meth:`JournalActor.wait_durable` (the snapshot's guard: no snapshot may hold a record the log
could still lose) always makes progress.

An I/O error while writing (or syncing records the model has not been given) does not stop the
actor. The producers of every record not yet acknowledged get :class:`JournalFailed`, the
journal cuts those records (see ``engine._journal``), ``fault`` describes the error, and the
actor keeps taking requests: each later group first repairs the log, and while no traffic comes
it retries the repair every ``retry_interval`` seconds, so the fault clears as soon as the disk
accepts writes again.

A failed sync of records already forwarded is different: the model applied events that the log
is about to cut, and nothing can take them out of the model. The actor fails fast: it fails the
waiting producers, cuts the log, and ``run`` raises :class:`JournalFailed`, which stops the
node; the restart recovers from the newest snapshot and the log, which hold exactly the durable
records (no snapshot covers a record that was not durable). Retrying the ``fdatasync`` instead
would not be safe: after a failed ``fdatasync`` the kernel may have dropped the dirty pages and
a second call can report success for data that never reached the disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio
import trio.testing

from ._exceptions import JournalClosed, JournalFailed
from ._journal import Journal
from ._messages import Appended
from ._worker import in_worker

__all__ = ["Appended", "JournalActor"]

log = logging.getLogger("recstream.journal")

T = TypeVar("T")

# Groups up to this many bytes are written (without a sync) on the event loop.
INLINE_WRITE_BYTES = 16 * 1024
# Seconds a small group's sync waits at most for the event loop to apply and push it first
# (see ``JournalActor._let_quiet_group_through``).
QUIET_WAIT = 0.002


class _AppliedRecordsLost(JournalFailed):
    """A sync failed after its records were forwarded: the node must stop (see the module)."""


class _Request:
    """One producer's append, waiting for durability. Mutated only by the actor."""

    __slots__ = ("done", "error", "last_seq", "payloads")

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads
        self.done = trio.Event()
        self.last_seq = 0
        self.error: Exception | None = None


class JournalActor:
    """Owns a :class:`Journal` and serializes every write to it.

    Start it with ``await nursery.start(actor.run)``. Stop it with :meth:`aclose` (or
    :meth:`close` and let ``run`` finish): what is already queued is written, synced and
    forwarded, then the journal and the output channel are closed.

    The sync policy is the journal's (``Journal.open(sync=...)``):

    * ``"batch"``: every group is synced before its producers are acknowledged.
    * ``"interval"``: a group is written at once but synced at most every ``interval_ms``;
      producers are acknowledged after the sync that covers them. Trades latency for fewer
      syncs under light, steady load.
    * ``"off"``: acknowledged after the write. Survives a process crash (the data is in the
      page cache), not an OS crash or power loss.

    Args:
        journal: The open journal; the actor closes it when ``run`` returns.
        output: Where durable records go (the model actor's inbox), or None. It must be
            bounded: its capacity is how far the model may lag before producers wait. The
            actor closes it when ``run`` returns, so the consumer sees the end of the stream.
        max_pending: Capacity of the inbox, in append requests. It bounds memory and the
            size of one group; a few hundred is plenty, because groups form while a sync is
            in flight.
        on_fault: Called with each I/O error (for metrics), in the actor's task.
        retry_interval: Seconds between repair attempts while a fault persists and no
            request arrives.
        apply_before_sync: Forward each group to ``output`` once written, before its sync
            (see the module); False: only once durable (strict order).

    Attributes:
        fault: Why the journal refuses writes (the last I/O error), or None while healthy.
        faults: I/O errors met since start.
        durable_seq: The newest seq acknowledged to producers (durable under the sync
            policy); every record up to it is in the log for good.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        output: trio.MemorySendChannel[Appended] | None = None,
        max_pending: int = 256,
        on_fault: Callable[[OSError], None] | None = None,
        retry_interval: float = 1.0,
        apply_before_sync: bool = False,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.journal = journal
        self.fault: str | None = None
        self.faults = 0
        self._on_fault = on_fault
        self._retry_interval = retry_interval
        self._fault_at = -math.inf
        self.groups = 0
        self._output = output
        self._apply_before_sync = apply_before_sync and output is not None
        self.durable_seq = journal.last_seq
        self._forwarded_seq = journal.last_seq  # newest seq handed to ``output``
        self._durable = trio.Event()  # set (and replaced) whenever durable_seq grows
        self._send, self._receive = trio.open_memory_channel[_Request](max_pending)
        self._unacked: list[_Request] = []  # written, waiting for a sync (interval policy)
        self._in_flight: list[_Request] = []  # taken from the inbox, not yet written
        self._last_sync = -math.inf
        self._error: BaseException | None = None
        self._started = False
        self._stopped = trio.Event()
        # Held around every worker-thread call that touches the journal, so maintenance
        # (drop_before, rewrite) never runs while a group is being written.
        self._io = trio.Lock()
        # Set while a small group's sync waits for the event loop to go quiet.
        self._quiet: trio.CancelScope | None = None

    async def append(self, payloads: Sequence[bytes]) -> int:
        """Appends payloads and returns once they are durable under the sync policy.

        Cancelling the call does not take the payloads back if they were already queued:
        they may still be written. Producers that must not duplicate give events ids.

        Args:
            payloads: Opaque, non-empty byte strings, written as consecutive records.

        Returns:
            The seq of the last payload; the first is ``returned - len(payloads) + 1``.

        Raises:
            ValueError, TypeError: A payload is invalid (see ``Journal.check_payloads``);
                nothing was queued.
            JournalClosed: The actor was closed before the request was queued.
            JournalFailed: An I/O error met this request before it was durable: the
                payloads were not acknowledged, and they were cut from the log (a crash
                before the cut is made durable may still leave them to replay).
        """
        request = _Request(self.journal.check_payloads(payloads))
        try:
            await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._stopped_error() from None
        if self._quiet is not None:
            self._quiet.cancel()  # the actor has work again: its pending sync goes now
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.last_seq

    async def maintain(self, fn: Callable[[Journal], T]) -> T:
        """Runs ``fn(journal)`` in a worker thread between groups.

        For maintenance that must not interleave with writes: ``drop_before`` after a
        snapshot, ``rewrite`` to erase a user's records.
        """
        async with self._io:
            return await trio.to_thread.run_sync(fn, self.journal)

    async def wait_durable(self, seq: int) -> None:
        """Returns once every record up to ``seq`` is durable (acknowledged).

        Raises:
            JournalFailed, JournalClosed: The actor stopped before that.
        """
        while self.durable_seq < seq:
            if self._stopped.is_set():
                raise self._stopped_error()
            event = self._durable
            with trio.move_on_after(self._retry_interval):
                await event.wait()

    def close(self) -> None:
        """Stops taking requests; ``run`` writes what is queued and then returns.

        Producers blocked on a full inbox get :class:`JournalClosed`.
        """
        self._send.close()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until ``run`` has synced and closed the journal."""
        self.close()
        if self._started:
            await self._stopped.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The actor's loop: take a group, write it, sync per policy, ack, forward.

        Raises:
            JournalFailed: The journal became unusable (an I/O error after a rewrite's
                commit point). Waiting producers got :class:`JournalFailed` first.
        """
        if self._started:
            raise RuntimeError("JournalActor.run can only be called once")
        self._started = True
        try:
            task_status.started()
            await self._loop()
            # Clean shutdown: whatever was written is synced (even with "off") and acked.
            await self._sync_and_ack()
        except _AppliedRecordsLost as exc:
            self._error = exc
            # Best effort: cut the refused records now, so a restart does not replay them.
            with contextlib.suppress(Exception):
                async with self._io:
                    await trio.to_thread.run_sync(self.journal.sync)
            raise
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._shut_down()

    async def _loop(self) -> None:
        interval = self.journal.interval_ms / 1000
        while True:
            deadline = self._last_sync + interval if self._unacked else math.inf
            if self.fault is not None:
                deadline = min(deadline, self._fault_at + self._retry_interval)
            first: _Request | None = None
            with trio.move_on_at(deadline):
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
            if first is None:  # an interval elapsed: records wait for a sync, or a repair
                await self._sync_and_ack()
                continue
            group = [first]
            while True:
                try:
                    group.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._write(group)

    async def _write(self, group: list[_Request]) -> None:
        policy = self.journal.sync_policy
        interval = self.journal.interval_ms / 1000
        sync_now = policy == "batch" or (
            policy == "interval" and trio.current_time() >= self._last_sync + interval
        )
        early = self._apply_before_sync and policy != "off"
        payloads = [p for request in group for p in request.payloads]
        self._in_flight = group
        sync_here = sync_now and not early
        inline = not sync_here and sum(len(p) for p in payloads) <= INLINE_WRITE_BYTES
        try:
            async with self._io:
                if inline:
                    # Into the page cache: cheaper than a worker thread's round trip.
                    last = self.journal.append(payloads)
                else:
                    last = await in_worker(self._write_in_thread, payloads, sync_here)
        except OSError as exc:
            self._failed(exc)
            return
        self._in_flight = []
        if (sync_now and not early) or policy == "off":
            self._healthy()
        self.groups += 1
        seq = last - len(payloads)
        for request in group:
            seq += len(request.payloads)
            request.last_seq = seq
        self._unacked.extend(group)
        if early:
            # The model applies the group while the disk syncs it.
            await self._forward(group)
            if sync_now:
                if inline and self._receive.statistics().current_buffer_used == 0:
                    await self._let_quiet_group_through()
                await self._sync_and_ack()
            return
        if sync_now:
            self._last_sync = trio.current_time()
        if sync_now or policy == "off":
            await self._ack()

    async def _let_quiet_group_through(self) -> None:
        """Waits until no task can run (the small group just forwarded has been applied and
        pushed on the event loop), a new append arrives, or ``QUIET_WAIT`` passes.

        The sync's worker thread needs the interpreter lock to start and to report back.
        Started while the event loop applies the group and writes the push, it takes the
        lock whenever the loop lets go of it (a system call, a call into the model), and
        on a busy machine a thread holding it may wait for a core: the loop then stalls
        for milliseconds in the middle of the push. Started once the loop is idle, it costs
        the push nothing; the producers' acks come that much later, and still only after
        the sync. Under load the loop is never idle: a new append ends the wait at once, so
        the next group is not held back.
        """
        with trio.move_on_after(QUIET_WAIT) as self._quiet:
            await trio.testing.wait_all_tasks_blocked()
        self._quiet = None

    def _write_in_thread(self, payloads: list[bytes], sync_now: bool) -> int:
        last = self.journal.append(payloads)
        if sync_now:
            self.journal.sync()
        return last

    async def _sync_and_ack(self, *, forward: bool = True) -> bool:
        """Syncs what is written and acknowledges it; False if the sync failed."""
        try:
            async with self._io:
                await in_worker(self.journal.sync)
        except OSError as exc:
            self._failed(exc)
            return False
        self._healthy()
        self._last_sync = trio.current_time()
        await self._ack(forward=forward)
        return True

    def _failed(self, exc: OSError) -> None:
        """Fails every request not yet acknowledged; the journal cuts their records.

        Raises:
            JournalFailed: Some of those records were already forwarded (applied before
                their sync): the model holds events the log is cutting, so the node must stop
                and recover (see the module).
        """
        waiting = self._in_flight + self._unacked
        self._in_flight, self._unacked = [], []
        self.faults += 1
        self._fault_at = trio.current_time()
        name = errno.errorcode.get(exc.errno or 0, "error")
        if self.fault is None or self.faults % 1000 == 0:  # once per outage, then rarely
            log.error("journal %s: %s; writes refused until the disk recovers", name, exc)
        self.fault = f"journal {name}: {exc.strerror or exc}"
        for request in waiting:
            err = JournalFailed(f"not written: {self.fault}")
            err.__cause__ = exc
            request.error = err
            request.done.set()
        if self._on_fault is not None:
            self._on_fault(exc)
        if self._forwarded_seq > self.durable_seq:
            log.critical(
                "journal %s after records up to seq %d were applied: stopping so that a "
                "restart recovers exactly the durable records",
                name,
                self._forwarded_seq,
            )
            raise _AppliedRecordsLost(
                f"records applied before their sync were lost: {self.fault}"
            ) from exc

    def _healthy(self) -> None:
        if self.fault is not None:
            log.warning("journal writable again after: %s", self.fault)
            self.fault = None

    async def _ack(self, *, forward: bool = True) -> None:
        """Wakes the producers of every written request, then forwards their records (unless
        they went to the model before their sync)."""
        if not self._unacked:
            return
        done, self._unacked = self._unacked, []
        for request in done:
            request.done.set()
        self.durable_seq = done[-1].last_seq
        self._durable.set()
        self._durable = trio.Event()
        if forward:
            await self._forward(done)

    async def _forward(self, requests: list[_Request]) -> None:
        """Hands the records of ``requests`` not yet forwarded to the model, in seq order.

        Before a send that would block (the model is behind), everything written is synced
        and acknowledged, so the actor never waits on the model while holding forwarded
        records that are not durable.
        """
        if self._output is None:
            return
        last_seq = requests[-1].last_seq
        if last_seq <= self._forwarded_seq:
            return
        payloads = tuple(p for request in requests for p in request.payloads)
        first_seq = last_seq - len(payloads) + 1
        skip = self._forwarded_seq + 1 - first_seq
        if skip > 0:
            first_seq, payloads = first_seq + skip, payloads[skip:]
        appended = Appended(first_seq, payloads)
        self._forwarded_seq = last_seq
        try:
            self._output.send_nowait(appended)
            return
        except trio.WouldBlock:
            pass
        if self._unacked:
            self._forwarded_seq = first_seq - 1  # not handed over yet
            if not await self._sync_and_ack(forward=False):
                return  # the records were cut and their producers failed
            self._forwarded_seq = last_seq
        await self._output.send(appended)

    def _stopped_error(self) -> Exception:
        if self._error is not None:
            err = JournalFailed("the journal actor stopped after an I/O error")
            err.__cause__ = self._error
            return err
        return JournalClosed("the journal actor is closed")

    def _shut_down(self) -> None:
        """Fails every request still waiting, closes the channels and the journal.

        Runs however ``run`` ends. Without it, a producer whose request sat in the inbox when
        the actor died would wait forever. No checkpoint happens here, so no request can
        slip into the inbox between draining and closing it.
        """
        waiting = self._in_flight + self._unacked
        self._in_flight, self._unacked = [], []
        while True:
            try:
                waiting.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._receive.close()
        for request in waiting:
            request.error = self._stopped_error()
            request.done.set()
        # Unsynced records were never acknowledged, so there is no promise to keep by
        # waiting for the disk here; the clean path synced already.
        self.journal.close(sync=False)
        if self._output is not None:
            self._output.close()
        self._stopped.set()
