"""Snapshot rotation: writes snapshots, keeps the previous one, tells the log what they cover.

``snapshot.rsnap`` is the newest snapshot, ``snapshot.prev.rsnap`` the one before. After each
snapshot the log is told what it covers (:meth:`engine.Log.checkpoint`); the local journal
deletes only segments the *older* snapshot covers, so a damaged newest snapshot still leaves a
complete recovery path. A failed snapshot drops nothing: the older snapshot and the log still
recover everything, and ``fault`` says why until a snapshot succeeds again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

import trio

from ._exceptions import JournalClosed, JournalFailed
from ._journal import FileOps
from ._log import Log
from ._metrics import Metrics
from ._model_actor import ModelActor
from ._recovery import PREVIOUS_SNAPSHOT, SNAPSHOT

__all__ = ["SnapshotActor", "copy_durably"]

log = logging.getLogger("recstream.snapshots")


class SnapshotActor:
    """Owns the snapshot files; takes a snapshot every ``interval`` seconds when the model
    moved (or the last one failed), and on request.

    Args:
        data_dir: Where the snapshot files live.
        model_actor: Writes a snapshot between the groups it applies.
        wal: The log, told what each snapshot covers.
        metrics: Counts snapshots and their I/O errors.
        file_ops: The system calls snapshot copies write and sync through.
        interval: Seconds between periodic snapshots.
        snapshot_seq: The seq of the snapshot loaded at start (0: none).

    Attributes:
        snapshot_seq: The seq the newest snapshot covers.
        fault: Why the last snapshot failed, or None if it succeeded.
    """

    def __init__(
        self,
        data_dir: Path,
        model_actor: ModelActor,
        wal: Log,
        metrics: Metrics,
        *,
        file_ops: FileOps,
        interval: float,
        snapshot_seq: int = 0,
    ) -> None:
        self._newest = data_dir / SNAPSHOT
        self._previous = data_dir / PREVIOUS_SNAPSHOT
        self._model_actor = model_actor
        self._log = wal
        self._metrics = metrics
        self._file_ops = file_ops
        self._interval = interval
        self.snapshot_seq = snapshot_seq
        self.fault: str | None = None
        self._lock = trio.Lock()

    async def take(self, *, replace_previous: bool = False) -> int:
        """Writes a snapshot, then lets the log drop what the older one covers.

        Args:
            replace_previous: Also make the previous snapshot a copy of the new one (erasure:
                no snapshot may keep what was erased). Both files stay, so a damaged newest
                file still has a twin to recover from.

        Returns:
            The seq the snapshot covers.

        Raises:
            OSError: The snapshot could not be written (recorded in ``fault``).
        """
        async with self._lock:
            return await self._take(replace_previous)

    async def _take(self, replace_previous: bool) -> int:
        try:
            self._file_ops.check_snapshot(self._newest)
            if self._newest.exists():
                os.replace(self._newest, self._previous)
            seq, position = await self._model_actor.snapshot(self._newest)
            self.snapshot_seq = seq
            if replace_previous:
                await trio.to_thread.run_sync(
                    copy_durably, self._newest, self._previous, self._file_ops
                )
        except OSError as e:
            self._metrics.io_errors.labels("snapshot").inc()
            if self.fault is None:
                log.error("snapshot failed: %s; the journal keeps everything since", e)
            name = errno.errorcode.get(e.errno or 0, "error")
            self.fault = f"snapshot {name}: {e.strerror or e}"
            raise
        if self.fault is not None:
            log.warning("snapshots succeed again after: %s", self.fault)
            self.fault = None
        self._metrics.snapshots.inc()
        try:
            await self._log.checkpoint(seq, position)
            if replace_previous:  # the previous file covers the same now
                await self._log.checkpoint(seq, position)
        except (JournalClosed, JournalFailed):
            pass  # shutting down: the segments go next time
        return seq

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Takes a snapshot every ``interval`` seconds while the model moved or the last one
        failed, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            if self._model_actor.applied_seq > self.snapshot_seq or self.fault:
                try:
                    await self.take()
                except OSError:
                    pass  # recorded in fault; tried again next interval


def copy_durably(src: Path, dst: Path, ops: FileOps | None = None) -> None:
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
