"""The model actor: applies durable journal records to the model, in journal order.

It is the only writer of the model. Each group of records from the journal actor is applied in
one worker-thread call (``Model.apply_journal``: the extension decodes the records, releases
the GIL and, with ``batch_apply``, solves the group's users and items once each on every core),
then the users those records touched are reported to the publisher and the index actor is told
that vectors moved. Work that must follow a group at once (the publisher computing the lists
of the group's subscribed users) runs in the same worker-thread call (``alongside``): one
round trip to a worker thread instead of one per stage. A group of a few events is applied,
and followed, on the event loop itself (``INLINE_GROUP_BYTES``). While the engine catches
up at start-up nobody subscribes yet, so the groups are applied without noting their users
(``report_users``), as a replay: merged into larger groups whose solves are coalesced further
(see ``REPLAY_MERGE_BYTES``, ``apply_records``).
Snapshots are taken between groups, so a snapshot reflects exactly the records up to its
sequence number.
Groups may arrive before they are durable (the journal's ``apply_before_sync``); a snapshot
then waits until the journal has synced every record it reflects, so no snapshot ever holds an
event that a crash could still take out of the log.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ._messages import Appended, Applied
from ._model import Model
from ._worker import in_worker

__all__ = ["REPLAY_MERGE_BYTES", "Applied", "ModelActor", "apply_records"]

log = logging.getLogger("recstream.model")

# Groups up to this many bytes of records (a few events) are applied on the event loop (tens
# of microseconds), with what follows them (``alongside``: the lists of their subscribed
# users), larger ones in a worker thread.
INLINE_GROUP_BYTES = 512
# Groups queued behind the one being applied are applied with the next, up to this many bytes.
MERGE_BYTES = 8 * 1024 * 1024
# The same bound while the engine catches up at start-up (``report_users`` off): nobody waits
# for a push then, and a larger group solves each of its users and items once for more events
# (a replay spends most of its time in those solves). It bounds the memory of one apply: the
# payloads and their decoded records.
REPLAY_MERGE_BYTES = 16 * 1024 * 1024


def apply_records(
    model: Model,
    first_seq: int,
    payloads: Sequence[bytes],
    *,
    collect: bool = True,
    users: bool = True,
    replay: bool = False,
) -> list[Applied]:
    """Applies journal payloads in order as one group (blocking; call it in a worker thread).

    The whole group goes to the extension in one call, which releases the GIL and, with
    ``batch_apply`` on, coalesces the group's vector solves (see ``ModelConfig``).

    A record that cannot be decoded is logged and skipped: it was validated before it was
    journaled, so this means a bug or a changed limit, and one bad record must not stop
    recovery or the live stream.

    Args:
        collect: Whether to return what each record did. An offline replay has nobody to
            tell, and skips building one :class:`Applied` per record.
        users: Whether the :class:`Applied` name the users each record touched; without,
            ``users`` is empty (counts, refusals and erasures are still reported).
        replay: The records are a replay at start-up (nobody waits for their pushes): the
            extension then solves each user and item once for up to a million events of the
            group instead of 65,536.

    Returns:
        One :class:`Applied` per payload, in order; nothing without ``collect``.
    """
    out: list[Applied] = []
    results = model.apply_journal(payloads, collect, users, replay)
    for seq, result in enumerate(results, first_seq):
        if isinstance(result, str):
            log.error("journal record %d could not be applied: %s", seq, result)
            if collect:
                out.append(
                    Applied(seq, time.time(), 0, 0, ((0, f"unreadable record: {result}"),), ())
                )
        elif result is not None:
            out.append(Applied(seq, *result))
    return out


def _apply_then(
    apply: Callable[[], list[Applied]], alongside: Callable[[list[Applied]], Any] | None
) -> tuple[list[Applied], Any]:
    results = apply()
    return results, (alongside(results) if alongside is not None and results else None)


class ModelActor:
    """Applies what the journal actor forwards.

    Args:
        model: The model; this actor is its only writer.
        inbox: The journal actor's output channel.
        applied_seq: The journal position the model already reflects (after recovery).
        applied_position: The log's position at ``applied_seq`` (empty for the journal).
        on_applied: Called in the event loop with each group's results and what
            ``alongside`` returned for them (None when it did not run): publisher, metrics,
            index wake-up. Must not block.
        alongside: Called with a group's results where it was applied (the worker thread,
            or the event loop for a group of a few events), right after, while groups are
            reported live (``report_users``); what it returns goes to ``on_applied``. It may
            run outside the event loop: it may only read state the loop changes in single
            steps.
        wait_durable: Returns once the journal holds every record up to the given seq
            durably (``JournalActor.wait_durable``); None when groups arrive durable.
        report_users: Whether each group's results name the users it touched. The engine
            starts with False while it catches up (nobody subscribes before it is ready) and
            sets :attr:`report_users` once caught up. While False, groups are applied as a
            replay (larger, with more events per solve).
    """

    def __init__(
        self,
        model: Model,
        inbox: trio.MemoryReceiveChannel[Appended],
        *,
        applied_seq: int = 0,
        applied_position: bytes = b"",
        on_applied: Callable[[list[Applied], Any], None] | None = None,
        alongside: Callable[[list[Applied]], Any] | None = None,
        wait_durable: Callable[[int], Awaitable[None]] | None = None,
        report_users: bool = True,
    ) -> None:
        self.model = model
        self.applied_seq = applied_seq
        self.applied_position = applied_position  # the log's position at applied_seq
        self._inbox = inbox
        self._on_applied = on_applied
        self._alongside = alongside
        self._wait_durable = wait_durable
        self.report_users = report_users
        self._lock = trio.Lock()  # held while a group applies; snapshots take it in between
        self.last_apply_seconds = 0.0  # wall time of the newest group's apply (metrics)
        self.drained = trio.Event()
        self.busy = False  # a group is being applied in a worker thread

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Applies groups until the journal actor closes the channel."""
        task_status.started()
        async with self._inbox:
            while True:
                try:
                    group = self._merge_waiting(await self._inbox.receive())
                except trio.EndOfChannel:
                    break
                async with self._lock:
                    started = time.perf_counter()
                    apply = functools.partial(
                        apply_records,
                        self.model,
                        group.first_seq,
                        group.payloads,
                        users=self.report_users,
                        replay=not self.report_users,
                    )
                    alongside = self._alongside if self.report_users else None
                    if sum(len(p) for p in group.payloads) <= INLINE_GROUP_BYTES:
                        # A worker thread's round trip costs more than these few events and
                        # the lists of their few users.
                        results, extra = _apply_then(apply, alongside)
                    else:
                        self.busy = True
                        try:
                            results, extra = await in_worker(_apply_then, apply, alongside)
                        finally:
                            self.busy = False
                    self.last_apply_seconds = time.perf_counter() - started
                    self.applied_seq = group.last_seq
                    self.applied_position = group.position
                if self._on_applied is not None:
                    self._on_applied(results, extra)
        self.drained.set()

    def _merge_waiting(self, group: Appended) -> Appended:
        """``group`` and the groups queued behind it, as one (up to ``MERGE_BYTES``, or
        ``REPLAY_MERGE_BYTES`` while catching up): while a group applies, the next ones
        wait, and one call for all of them coalesces more solves and costs one worker-thread
        round trip."""
        payloads = list(group.payloads)
        size = sum(len(p) for p in payloads)
        last = group
        limit = MERGE_BYTES if self.report_users else REPLAY_MERGE_BYTES
        while size < limit:
            try:
                queued = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if queued.first_seq != last.last_seq + 1:
                raise AssertionError(f"the log skipped from {last.last_seq} to {queued.first_seq}")
            payloads.extend(queued.payloads)
            size += sum(len(p) for p in queued.payloads)
            last = queued
        if last is group:
            return group
        return Appended(group.first_seq, tuple(payloads), last.position)

    async def snapshot(self, path: Path) -> tuple[int, bytes]:
        """Writes a snapshot between groups; returns the seq and log position it reflects.

        Raises:
            JournalFailed, JournalClosed: The log stopped before the records the snapshot
                would reflect were durable; nothing was written.
        """
        async with self._lock:
            seq, position = self.applied_seq, self.applied_position
            if self._wait_durable is not None:
                await self._wait_durable(seq)
            await trio.to_thread.run_sync(
                functools.partial(self.model.save, path, seq, log_position=position)
            )
        return seq, position
