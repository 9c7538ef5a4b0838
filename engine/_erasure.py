"""Erasure: completing a user's removal from the snapshots and the log.

Erasure (``DELETE /v1/users/{user}`` or a Forward ``{"erase_user": id}`` record) must leave
nothing on disk from which the user could come back. It runs in this order:

1. The erase record is logged at seq E and applied: the model forgets the user's vector,
   history and seen set. The publisher drops unread lists and pending recomputes for the
   user's subscriptions; experiment bookkeeping forgets the user's impressions.
2. A snapshot is taken (at seq S >= E, so without the user), and copied over the previous
   snapshot, so both snapshot files are free of the user. A crash before this point leaves
   the old snapshots *and* the whole log, erase record included: replay erases again.
3. The log is rewritten (:meth:`engine.Log.erase`; for the local journal ``Journal.rewrite``,
   atomic) without any record of the user with seq <= E -- interactions and the erase record
   itself. A crash before the rewrite commits leaves step 2's snapshots, which start after E,
   so the records still in the log are never replayed; after it, the log holds nothing of
   the user at all.

Step 2 must precede step 3: rewriting first and crashing before the snapshot would load an
old snapshot that still has the user and replay a log that no longer erases them. Once both
are done, every snapshot is at or after E and the log has no event of the user up to E, so
no recovery path can bring the user back; events for the same id after E are new data.

A crash between steps 1 and 3 leaves the model state right (replay erases again) but the
bytes on disk: recovery therefore reads the whole local journal, not only the part after the
snapshot, for erase records (``JournalLog.interrupted_erasures``), and completes steps 2 and 3
for each one once serving. A completed erasure leaves no erase record, so this never repeats.
An erasure is detected live from the model's report of the users its erase records removed.
Erasing a user the model does not know writes nothing.

This module's actor runs steps 2 and 3, a batch of pending erasures at a time.
"""

from __future__ import annotations

import logging

import trio

from ._exceptions import JournalClosed, JournalFailed
from ._log import Log
from ._snapshots import SnapshotActor

__all__ = ["EraseActor"]

log = logging.getLogger("recstream.erasure")

Id = str | int


class EraseActor:
    """Completes erasures on disk (steps 2 and 3), in batches.

    Args:
        snapshots: Takes step 2's snapshot.
        wal: Rewritten in step 3.

    Attributes:
        erased_through: Every erasure with a seq up to this is complete on disk.
    """

    def __init__(self, snapshots: SnapshotActor, wal: Log) -> None:
        self._snapshots = snapshots
        self._log = wal
        # Erasures applied by the model, waiting for steps 2 and 3: user -> seq of its newest
        # erase record. Bounded by the erase requests in flight.
        self._pending: dict[Id, int] = {}
        self._erasing: dict[Id, int] = {}  # the batch being completed
        self._wake = trio.Event()
        self._stopped = False
        self.erased_through = 0
        self._erased = trio.Event()  # set and replaced after every completed batch

    def queued(self, user: Id) -> int:
        """The seq of ``user``'s erase record waiting or being completed (0: none)."""
        return max(self._pending.get(user, 0), self._erasing.get(user, 0))

    def request(self, user: Id, seq: int) -> None:
        """Queues steps 2-3 for ``user``'s erase record at ``seq``. Idempotent."""
        if seq <= self.queued(user):
            return  # already queued or being completed
        self._pending[user] = seq
        self._wake.set()

    async def wait_erased(self, user: Id) -> None:
        """Returns once the queued erasure of ``user`` is complete on disk.

        Raises:
            JournalClosed: the erasure could not finish (shutdown or a disk failure); its
                erase record stays in the log and the next start completes it.
        """
        while user in self._pending or user in self._erasing:
            await self._erased.wait()
        if self._stopped:
            raise JournalClosed("the erasure completes when the server next starts")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Completes batches of erasures until cancelled or the log fails."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if not self._pending:
                    continue
                pending, self._pending = self._pending, {}
                self._erasing = pending
                try:
                    await self._complete(pending)
                except (JournalClosed, JournalFailed) as e:
                    # The erase records stay in the log: the next start completes them.
                    log.error("erasure of %d user(s) left incomplete: %s", len(pending), e)
                    return
                finally:
                    self._erasing = {}
                self.erased_through = max(self.erased_through, max(pending.values()))
                self._erased.set()
                self._erased = trio.Event()
        finally:
            self._stopped = True
            self._pending.clear()
            self._erased.set()

    async def _complete(self, pending: dict[Id, int]) -> None:
        """Steps 2 and 3 of an erasure (see the module docstring)."""
        await self._snapshots.take(replace_previous=True)
        changed = await self._log.erase(pending)
        log.info(
            "erased %d user(s): snapshots replaced, %d log record(s) rewritten",
            len(pending),
            changed,
        )
