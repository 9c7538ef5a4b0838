"""The log: the durable, ordered record of accepted frames, and its local implementation.

:class:`Log` is the seam between the engine and where accepted frames are kept. The engine
appends journal records to it (:meth:`Log.append` returns once they are durable) and applies,
in order, whatever the log forwards to it (:meth:`Log.run`): at start the records after the
snapshot (replay), then every record appended later -- by this node, or by any node for a log
shared between nodes.

Numbering: the engine numbers records with its node-local ``seq`` (versions in pushes,
``wait_applied``, snapshots' ``wal_seq``). A log may also have a position of its own, opaque
bytes to the engine, carried with each forwarded group (:class:`engine.Appended`) and stored
in snapshots beside the seq. The local journal's position is empty: its seq is its position.

:class:`JournalLog` is the local write-ahead journal (``engine._journal`` on disk, written by
``engine._journal_actor`` with group commit), the default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgpack
import trio

from ._events import journal_record, parse_journal_record
from ._exceptions import JournalClosed
from ._frames import drop_users, erased_users
from ._journal import FileOps, Journal, RecoveryReport, SyncPolicy
from ._journal_actor import JournalActor
from ._messages import Appended

__all__ = ["REPLAY_CHUNK", "REPLAY_CHUNK_BYTES", "JournalLog", "Log", "replay_chunk"]

log = logging.getLogger("recstream.journal")

Id = str | int
# Bounds of one group forwarded while replaying: at most this many records or bytes of them,
# whichever comes first (the model actor merges queued groups into larger applies; a journal of
# one-event records needs the record bound high for its groups to carry many events).
REPLAY_CHUNK = 16_384
REPLAY_CHUNK_BYTES = 4 << 20


@runtime_checkable
class Log(Protocol):
    """The durable, ordered record of accepted frames (see the module docstring).

    ``fault`` may be a plain attribute or a property.

    Attributes:
        replicated: Whether other nodes apply the same log. Their models must then depend on
            the records alone, not on how a node happened to group them: the engine turns
            ``ModelConfig.coalesce_records`` off.
    """

    replicated: bool

    @property
    def fault(self) -> str | None:
        """Why the log refuses appends now (a storage fault, its server down), or None."""
        ...

    async def run(
        self,
        output: trio.MemorySendChannel[Appended],
        *,
        after_seq: int,
        after_position: bytes,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forwards, in log order, every record after ``after_position`` (numbered from
        ``after_seq + 1``): first what the log already holds, then what is appended later.

        Calls ``task_status.started()`` once it has forwarded everything that was in the log
        when it started, so the engine serves only after catching up. Closes ``output`` when
        it ends.
        """
        ...

    async def append(self, payloads: Sequence[bytes]) -> int:
        """Appends journal records; returns the seq of the last one once durable.

        For a shared log: once the log confirmed the write and this node forwarded the
        record, so the seq is known.

        Raises:
            JournalClosed: The log is closed (or not running yet).
            JournalFailed: The records could not be made durable; they were not
                acknowledged.
        """
        ...

    async def checkpoint(self, seq: int, position: bytes) -> None:
        """A snapshot now durably covers everything up to (``seq``, ``position``): the log
        may drop what no recovery needs any more."""
        ...

    async def erase(self, users: Mapping[Id, int]) -> int:
        """Removes every record of ``users`` with a seq up to their erase record's seq (step
        3 of an erasure, see ``engine._erasure``); returns the records changed."""
        ...

    async def wait_durable(self, seq: int) -> None:
        """Returns once every record up to ``seq`` is durable. A log that forwards records
        only once they are durable returns at once; the local journal may forward a group
        while its sync runs (``apply_before_sync``), and snapshots wait here so that none
        holds a record a crash could still take out of the log.

        Raises:
            JournalFailed, JournalClosed: The log stopped before that.
        """
        ...

    def stats(self) -> dict[str, Any]:
        """For ``/v1/stats``: at least ``log`` (its kind), ``position``, ``head`` and ``lag``
        (records behind the head)."""
        ...

    async def aclose(self) -> None:
        """Stops taking appends, forwards what is queued, closes the output channel."""
        ...


class JournalLog:
    """The local write-ahead journal as a :class:`Log`.

    Opening it (at the start of :meth:`run`, or earlier with :meth:`open`) cuts a torn tail;
    ``recovery`` reports what was cut. The replay reads the whole journal, not only what
    follows the snapshot: an erase record still in it means a crash interrupted that erasure,
    and ``interrupted_erasures`` lists those (user -> seq of the erase record) for the engine
    to complete once serving.

    Args:
        path: The journal's directory.
        sync: The sync policy (see :class:`engine._journal_actor.JournalActor`).
        interval_ms: The ``"interval"`` policy's sync interval.
        segment_bytes: Segment size before rolling over.
        file_ops: The system calls writes and syncs go through (fault drills pass
            ``FaultyFileOps``).
        on_fault: Called with each I/O error (for metrics).

    Attributes:
        journal: The open journal (None before :meth:`open`).
        recovery: What opening the journal found and cut (None before :meth:`open`).
        interrupted_erasures: Erase records found by the replay, user -> newest seq.
    """

    replicated = False

    def __init__(
        self,
        path: Path,
        *,
        sync: SyncPolicy = "batch",
        interval_ms: float = 5.0,
        segment_bytes: int = 64 << 20,
        file_ops: FileOps | None = None,
        on_fault: Callable[[OSError], None] | None = None,
        apply_before_sync: bool = False,
    ) -> None:
        self.path = path
        self._apply_before_sync = apply_before_sync
        self._sync = sync
        self._interval_ms = interval_ms
        self._segment_bytes = segment_bytes
        self._file_ops = file_ops if file_ops is not None else FileOps()
        self._on_fault = on_fault
        self.journal: Journal | None = None
        self.recovery: RecoveryReport | None = None
        self.interrupted_erasures: dict[Id, int] = {}
        self._actor: JournalActor | None = None
        self._covered = 0  # the seq the older of the two newest checkpoints covers
        self._closed = False

    @property
    def fault(self) -> str | None:
        """Why the journal refuses writes (the last I/O error), or None while healthy."""
        return self._actor.fault if self._actor is not None else None

    def open(self) -> Journal:
        """Opens the journal (blocking, idempotent), cutting a torn tail."""
        if self.journal is None:
            self.journal, self.recovery = Journal.open(
                self.path,
                sync=self._sync,
                interval_ms=self._interval_ms,
                segment_bytes=self._segment_bytes,
                ops=self._file_ops,
            )
            report = self.recovery
            if report.reason is not None:
                log.warning(
                    "journal tail damaged (%s): cut %d bytes, dropped %d segment(s); "
                    "recovered up to seq %d",
                    report.reason,
                    report.truncated_bytes,
                    report.segments_dropped,
                    report.last_seq,
                )
        return self.journal

    async def run(
        self,
        output: trio.MemorySendChannel[Appended],
        *,
        after_seq: int,
        after_position: bytes = b"",
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Replays the journal after ``after_seq`` into ``output``, then runs the journal
        actor, which forwards every group once durable (see :class:`Log`)."""
        actor_started = False
        try:
            journal = await trio.to_thread.run_sync(self.open)
            if self._closed:
                raise JournalClosed("the journal is closed")
            if after_seq and after_seq < journal.first_seq - 1:
                log.error(
                    "journal starts at %d, after the snapshot's %d: events lost",
                    journal.first_seq,
                    after_seq,
                )
            self._covered = after_seq
            records = journal.replay(after_seq=0)
            erasures = self.interrupted_erasures
            while chunk := await trio.to_thread.run_sync(
                replay_chunk, records, after_seq, erasures
            ):
                await output.send(Appended(chunk[0][0], tuple(p for _, p in chunk)))
            self._actor = JournalActor(
                journal,
                output=output,
                on_fault=self._on_fault,
                apply_before_sync=self._apply_before_sync,
            )
            actor_started = True
            async with trio.open_nursery() as nursery:
                await nursery.start(self._actor.run)
                task_status.started()
        finally:
            if not actor_started:
                output.close()
                if self.journal is not None:
                    self.journal.close(sync=False)

    async def append(self, payloads: Sequence[bytes]) -> int:
        """See :meth:`Log.append` (and :meth:`JournalActor.append`)."""
        if self._actor is None:
            raise JournalClosed("the journal is not open for appends")
        return await self._actor.append(payloads)

    async def checkpoint(self, seq: int, position: bytes = b"") -> None:
        """Deletes the segments that the older of the two newest snapshots covers, so a
        damaged newest snapshot still leaves a complete recovery path."""
        keep_from, self._covered = self._covered + 1, seq
        if self._actor is not None:
            await self._actor.maintain(lambda j: j.drop_before(keep_from))

    async def erase(self, users: Mapping[Id, int]) -> int:
        """Rewrites the journal (atomically) without any record of ``users`` with a seq up
        to theirs: their events and the erase records themselves."""
        if self._actor is None:
            raise JournalClosed("the journal is not open")
        return await self._actor.maintain(lambda j: j.rewrite(_erasing(users)))

    async def wait_durable(self, seq: int) -> None:
        """See :meth:`Log.wait_durable`; what the replay forwarded was durable already."""
        if self._actor is not None:
            await self._actor.wait_durable(seq)

    def stats(self) -> dict[str, Any]:
        """``{"log": "journal", "position": head, "head": last seq, "lag": 0}``."""
        head = self.journal.last_seq if self.journal is not None else 0
        return {"log": "journal", "position": head, "head": head, "lag": 0}

    async def aclose(self) -> None:
        """Stops taking appends; what is queued is written, synced and forwarded."""
        self._closed = True
        if self._actor is not None:
            await self._actor.aclose()


def replay_chunk(
    records: Iterator[tuple[int, bytes]],
    after_seq: int,
    erasures: dict[Id, int],
    *,
    max_bytes: int = REPLAY_CHUNK_BYTES,
) -> list[tuple[int, bytes]]:
    """The next records after ``after_seq`` from a journal replay (blocking), noting the
    erase records of every record read in ``erasures``.

    Args:
        max_bytes: Payload bytes after which the chunk ends (it holds at least one record
            and at most ``REPLAY_CHUNK``).
    """
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for seq, payload in records:
        if b"erase_user" in payload or b"gzip" in payload:
            for user in _erase_requests(payload):
                erasures[user] = seq
        if seq <= after_seq:
            continue
        chunk.append((seq, payload))
        size += len(payload)
        if len(chunk) >= REPLAY_CHUNK or size >= max_bytes:
            break
    return chunk


def _erasing(users: Mapping[Id, int]) -> Callable[[int, bytes], bytes | None]:
    """The ``Journal.rewrite`` filter that drops ``users``' records up to their seqs."""
    through = max(users.values())
    # A raw id that does not occur in a record's bytes cannot be in it (unless the frame is
    # compressed); this skips decoding almost every record.
    needles = [u.encode("utf-8", "surrogateescape") for u in users if isinstance(u, str)]
    all_text = len(needles) == len(users)

    def keep(seq: int, payload: bytes) -> bytes | None:
        if seq > through:
            return payload
        if all_text and b"gzip" not in payload and not any(n in payload for n in needles):
            return payload
        accepted_at, frame = parse_journal_record(payload)
        new = drop_users(frame, {u for u, s in users.items() if seq <= s})
        if new is frame:
            return payload
        return None if new is None else journal_record(new, accepted_at)

    return keep


def _erase_requests(payload: bytes) -> list[Id]:
    """Users named by erase records in one journal payload (an unreadable one: none)."""
    try:
        return erased_users(parse_journal_record(payload)[1])
    except (ValueError, TypeError, OSError, EOFError, msgpack.UnpackException) as e:
        log.warning("journal record unreadable while looking for erasures: %s", e)
        return []
