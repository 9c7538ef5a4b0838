"""The write-ahead log: every accepted event is appended here before it is acknowledged.

The log is a directory of segment files ``wal-<first seq, 20 digits>.log``. Each segment is

* a 20-byte header: magic ``b"RSWAL\\0\\0\\0"``, u32 format version, u64 first sequence number;
* then records, each a 16-byte header -- u32 payload length, u32 CRC32 over (u64 seq +
  payload), u64 seq -- followed by the payload. All integers are little-endian.

Sequence numbers are consecutive across segments. Consecutiveness is deliberately strict: with
the CRC it is what tells a torn tail from a valid one, and it lets a snapshot say "everything up
to seq N" with no ambiguity. Records erased by :meth:`Journal.rewrite` therefore stay in place
as *tombstones* (zero-length payloads) so that numbering never moves; replay skips them, and
empty payloads are refused on append for that reason.

I/O faults: every write and sync of record data goes through a :class:`FileOps` object, which
tests and the reliability benchmark replace with :class:`FaultyFileOps` to fail the k-th call.
A failed ``write`` or ``fdatasync`` does not end the journal. On Linux a failed ``fsync``
reports the error once and may mark the dirty pages clean without writing them, so a later
``fsync`` that succeeds proves nothing about them: whatever was written since the last
successful :meth:`Journal.sync` is treated as lost. The journal *cuts* it -- later segments are
deleted and the kept segment truncated back to that point, then synced -- and the owner fails
the producers of those records (they were never acknowledged). The next write first repairs the
log this way; until a repair succeeds every write is refused. Nothing acknowledged is touched:
the kept point only moves forward on a successful sync (or, under ``"off"``, a completed write,
which is what that policy acknowledges on).

Crash model: a crash can only damage the end of the *last* segment, because a segment is made
durable (``fdatasync``) before the next one is created, whatever the sync policy, and a new
segment's header and directory entry are durable before any record goes into it. Recovery in
:meth:`Journal.open` therefore cuts the log at the first bad record or damaged header and drops
whatever follows; it raises :class:`JournalCorrupt` only for states that are not damage but
inconsistency of intact data (a missing segment file, an unknown format version), which
cutting would make irreversible.

:class:`Journal` is synchronous and not thread-safe: exactly one owner calls it at a time. The
trio actor in ``engine._journal_actor`` is that owner in the engine; it runs the blocking calls
in a worker thread and implements the sync policies with group commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import attrs

from ._exceptions import JournalClosed, JournalCorrupt, JournalFailed, JournalLocked

__all__ = ["FORMAT_VERSION", "FaultyFileOps", "FileOps", "Journal", "RecoveryReport", "SyncPolicy"]

SyncPolicy = Literal["batch", "interval", "off"]

MAGIC = b"RSWAL\0\0\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ")
_RECORD = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
HEADER_SIZE = _HEADER.size
RECORD_HEADER_SIZE = _RECORD.size

# Recovery validates lengths against this format-wide cap, not the configured
# ``max_record_bytes``: lowering the configuration must never make recovery cut valid records.
_FORMAT_MAX_RECORD = 1 << 30

_SEGMENT_RE = re.compile(r"^wal-(\d{20})\.log$")
_LOCK_NAME = "LOCK"
_COMMIT_NAME = "REWRITE"  # lists the segments a committed rewrite replaces
_TMP_SUFFIX = ".tmp"
_SYNC_POLICIES = ("batch", "interval", "off")


def _segment_name(first_seq: int) -> str:
    return f"wal-{first_seq:020d}.log"


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))


def _encode(seq: int, payload: bytes) -> bytes:
    return _RECORD.pack(len(payload), _crc(seq, payload), seq) + payload


class FileOps:
    """The system calls that make data durable, as an object that can be replaced.

    The journal and the snapshot code write and sync through one of these; the default is the
    plain system calls. :class:`FaultyFileOps` fails chosen calls, to drill the fault paths.
    """

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """``os.write``: returns the bytes written (possibly fewer than given)."""
        return os.write(fd, data)

    def fdatasync(self, fd: int) -> None:
        """``os.fdatasync``: file data (and the size) to the disk."""
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        """``os.fsync``: file data and all metadata (used for directories)."""
        os.fsync(fd)

    def check_snapshot(self, path: Path) -> None:
        """Called before the model writes a snapshot to ``path`` (the extension does its own
        writes and syncs, out of reach of this object); the default does nothing."""


@attrs.define
class FaultyFileOps(FileOps):
    """A :class:`FileOps` that fails chosen calls with an :class:`OSError`.

    Calls are counted per kind: ``"write"`` and ``"sync"`` (``fdatasync`` and ``fsync``
    together) on files under ``scope`` (all files when None), and ``"snapshot"`` (each snapshot
    the model is about to write). The k-th call of a kind listed in ``fail_at`` (1-based) and,
    with ``sticky``, every later one fails until :meth:`clear`. Nothing is written or synced by
    a failing call, as with a device that refuses it.

    Attributes:
        fail_at: Kind -> the call number that fails first.
        error: The errno raised (``errno.EIO``, ``errno.ENOSPC``, ...).
        sticky: Keep failing after the first fault (a full disk) instead of failing once.
        scope: Only count calls on files inside this directory (None: every file).
        calls: Calls seen so far, per kind.
        injected: Faults raised so far.
    """

    fail_at: dict[str, int] = attrs.field(factory=dict)
    error: int = errno.EIO
    sticky: bool = False
    scope: Path | None = None
    calls: dict[str, int] = attrs.field(factory=dict)
    injected: int = 0
    _cleared: bool = False

    def clear(self) -> None:
        """The fault is over: every later call goes through."""
        self._cleared = True

    def _in_scope(self, fd: int) -> bool:
        if self.scope is None:
            return True
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True
        return Path(target).is_relative_to(self.scope)

    def _check(self, kind: str, where: str) -> None:
        n = self.calls[kind] = self.calls.get(kind, 0) + 1
        k = self.fail_at.get(kind)
        if self._cleared or k is None or n < k or (n > k and not self.sticky):
            return
        self.injected += 1
        raise OSError(self.error, f"{os.strerror(self.error)} (injected, {kind} #{n})", where)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self._in_scope(fd):
            self._check("write", f"fd {fd}")
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self._in_scope(fd):
            self._check("sync", f"fd {fd}")
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if self._in_scope(fd):
            self._check("sync", f"fd {fd}")
        super().fsync(fd)

    def check_snapshot(self, path: Path) -> None:
        if self.scope is None or path.is_relative_to(self.scope):
            self._check("snapshot", str(path))


_OS = FileOps()


def _fsync_dir(path: Path, ops: FileOps = _OS) -> None:
    """Make renames, creations and deletions in ``path`` durable (they live in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray, ops: FileOps = _OS) -> None:
    """``write`` until done: a regular file may accept less than asked (signals, >2 GiB)."""
    view = memoryview(data)
    while view:
        written = ops.write(fd, view)
        view = view[written:]


@attrs.frozen
class RecoveryReport:
    """What :meth:`Journal.open` found and what it cut.

    Attributes:
        last_seq: Highest sequence number in the recovered log (0 if it never held a record).
            The next append gets ``last_seq + 1``.
        records: Valid records kept, erased tombstones included.
        truncated_bytes: Bytes removed: the cut tail of a segment plus every dropped segment.
        segments_dropped: Whole segment files deleted because they lay after the cut.
        reason: Why the log was cut (file, offset, what was wrong), or None if it was intact.
            Log it: a cut after a crash is expected, a cut without one points at the disk.
    """

    last_seq: int
    records: int
    truncated_bytes: int
    segments_dropped: int
    reason: str | None


@attrs.frozen
class _Damage:
    offset: int
    reason: str


class _SegmentScan:
    """Reads one segment's records in order and stops at the first bad one.

    After iteration, ``damage`` says where and why it stopped (None if the segment ended
    cleanly) and ``end`` is the offset just past the last valid record: the cut point.
    """

    def __init__(self, path: Path, first_seq: int, limit: int | None = None) -> None:
        self.path = path
        self.first_seq = first_seq
        self.limit = limit
        self.damage: _Damage | None = None
        self.end = HEADER_SIZE
        self.last_seq = first_seq - 1

    def records(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb", buffering=1 << 20) as f:
            size = os.fstat(f.fileno()).st_size
            if self.limit is not None:
                size = min(size, self.limit)
            f.seek(HEADER_SIZE)
            offset = HEADER_SIZE
            expected = self.first_seq
            while offset < size:
                where = f"{self.path.name} offset {offset}"
                if size - offset < RECORD_HEADER_SIZE:
                    self.damage = _Damage(offset, f"{where}: short record header")
                    return
                length, crc, seq = _RECORD.unpack(f.read(RECORD_HEADER_SIZE))
                if length > _FORMAT_MAX_RECORD:
                    self.damage = _Damage(offset, f"{where}: length {length} over limit")
                    return
                if length > size - offset - RECORD_HEADER_SIZE:
                    self.damage = _Damage(offset, f"{where}: truncated payload")
                    return
                payload = f.read(length)
                if _crc(seq, payload) != crc:
                    self.damage = _Damage(offset, f"{where}: CRC mismatch")
                    return
                if seq != expected:
                    self.damage = _Damage(
                        offset, f"{where}: seq {seq} where {expected} was expected"
                    )
                    return
                offset += RECORD_HEADER_SIZE + length
                self.end = offset
                self.last_seq = seq
                expected += 1
                yield seq, payload


def _check_header(path: Path, name_seq: int) -> str | None:
    """Returns why the header of ``path`` is damaged, or None if it is sound.

    Raises:
        JournalCorrupt: The magic is right but the version is not ours. That is an intact
            file from another format, not damage, and must not be cut.
    """
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        return f"{path.name}: short segment header ({len(raw)} bytes)"
    magic, version, first_seq = _HEADER.unpack(raw)
    if magic != MAGIC:
        return f"{path.name}: bad segment magic"
    if version != FORMAT_VERSION:
        raise JournalCorrupt(
            f"{path.name}: format version {version}, this build reads {FORMAT_VERSION}"
        )
    if first_seq != name_seq:
        return f"{path.name}: header says first seq {first_seq}, the file name {name_seq}"
    return None


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        m = _SEGMENT_RE.match(entry.name)
        if m is not None and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    found.sort()
    return found


def _finish_rewrite(directory: Path) -> None:
    """Completes or rolls back a rewrite that a crash interrupted.

    The commit file is the atomic switch: if it exists, every listed ``.tmp`` segment was
    durable before it was written, so renaming them into place (again) rolls forward. Without
    it, any ``.tmp`` file is an unfinished draft and is deleted.
    """
    commit = directory / _COMMIT_NAME
    if commit.exists():
        for name in commit.read_text("ascii").split():
            tmp = directory / (name + _TMP_SUFFIX)
            if tmp.exists():
                os.replace(tmp, directory / name)
        _fsync_dir(directory)
        commit.unlink()
    for entry in os.scandir(directory):
        if entry.name.endswith(_TMP_SUFFIX):
            os.unlink(entry.path)
    _fsync_dir(directory)


class Journal:
    """A segmented, checksummed write-ahead log of opaque payloads.

    Open one with :meth:`Journal.open`. Appends go to the page cache; :meth:`sync` makes them
    durable. The sync policy given to ``open`` is recorded here but applied by the caller
    (the journal actor does group commit); the journal itself only syncs where correctness
    needs it regardless of policy: at rollover, in :meth:`rewrite` and on :meth:`close`.

    Attributes:
        directory: The log directory.
        sync_policy: ``"batch"``, ``"interval"`` or ``"off"``, for the owner to apply.
        interval_ms: The sync interval of the ``"interval"`` policy.
        segment_bytes: Soft size limit of a segment; a segment holds at least one record.
        max_record_bytes: Largest payload :meth:`append` accepts.
        syncs: ``fdatasync`` calls on record data, by :meth:`sync` and at rollover; the
            measure of how well group commit works.
        rollovers: Segments started since open.
        synced_seq: Highest seq known durable (covered by a completed sync).
        repairs: Times the log was cut back to its kept point after an I/O error.
        fault: The I/O error that left unkept records behind, until a repair succeeds.
    """

    def __init__(
        self,
        directory: Path,
        lock_fd: int,
        segments: list[int],
        last_seq: int,
        *,
        sync_policy: SyncPolicy,
        interval_ms: float,
        segment_bytes: int,
        max_record_bytes: int,
        ops: FileOps = _OS,
    ) -> None:
        """Internal: use :meth:`Journal.open`, which recovers the directory first."""
        self.directory = directory
        self.sync_policy: SyncPolicy = sync_policy
        self.interval_ms = interval_ms
        self.segment_bytes = segment_bytes
        self.max_record_bytes = max_record_bytes
        self.syncs = 0
        self.rollovers = 0
        self.synced_seq = last_seq
        self._lock_fd: int | None = lock_fd
        self._segments = segments
        self._last_seq = last_seq
        self._closed = False
        self._failed: OSError | None = None
        self._ops = ops
        self.fault: OSError | None = None
        self.repairs = 0
        self._dirty = False
        self._fd = -1
        self._size = 0
        self._open_active()
        self._keep()

    # --- opening and recovery -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        sync: SyncPolicy = "batch",
        interval_ms: float = 5,
        segment_bytes: int = 64 << 20,
        max_record_bytes: int = 16 << 20,
        ops: FileOps | None = None,
    ) -> tuple[Journal, RecoveryReport]:
        """Opens (creating if needed) the log in ``directory`` and recovers it.

        Every record is read and checked. At the first bad one -- short header, length over
        limit, truncated payload, CRC mismatch, sequence not consecutive -- or at a damaged
        segment header, the log is cut: that segment is truncated after its last valid record
        (deleted if its header is bad) and every later segment is deleted. The cut is made
        durable before this returns, and described in the report.

        Args:
            directory: The log directory; created if missing.
            sync: The durability policy for the owner to apply: ``"batch"`` syncs every group
                of appends (safe default), ``"interval"`` at most every ``interval_ms``,
                ``"off"`` never (an OS crash may lose acknowledged events; a process crash
                does not).
            interval_ms: Sync period for ``"interval"``.
            segment_bytes: A segment rolls over once the next record would take it past this.
                Smaller segments let :meth:`drop_before` free space sooner.
            max_record_bytes: Largest payload accepted by :meth:`append`.
            ops: The system calls used for writing and syncing (default: the real ones).

        Returns:
            The open journal and the recovery report.

        Raises:
            JournalCorrupt: A segment is missing between two intact ones, or a segment has an
                unknown format version. Nothing was changed on disk.
            JournalLocked: Another open journal holds this directory.
            ValueError: An argument is out of range.
        """
        if sync not in _SYNC_POLICIES:
            raise ValueError(f"sync must be one of {_SYNC_POLICIES}, not {sync!r}")
        if not interval_ms > 0:
            raise ValueError("interval_ms must be positive")
        if not 0 < max_record_bytes <= _FORMAT_MAX_RECORD:
            raise ValueError(f"max_record_bytes must be in 1..{_FORMAT_MAX_RECORD}")
        if segment_bytes <= HEADER_SIZE + RECORD_HEADER_SIZE:
            raise ValueError("segment_bytes is too small to hold a record")

        path = Path(directory)
        if not path.is_dir():
            path.mkdir(parents=True)
            _fsync_dir(path.parent)
        lock_fd = os.open(path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalLocked(f"{path} is held by another open journal") from None
            raise
        opened = False
        try:
            _finish_rewrite(path)
            segments, last_seq, report = cls._recover(path)
            journal = cls(
                path,
                lock_fd,
                segments,
                last_seq,
                sync_policy=sync,
                interval_ms=interval_ms,
                segment_bytes=segment_bytes,
                max_record_bytes=max_record_bytes,
                ops=_OS if ops is None else ops,
            )
            opened = True
        finally:
            if not opened:
                os.close(lock_fd)
        return journal, report

    @staticmethod
    def _recover(path: Path) -> tuple[list[int], int, RecoveryReport]:
        found = _list_segments(path)
        # Every check that can raise JournalCorrupt runs before anything is cut, so that the
        # exception leaves the directory exactly as it was. An unknown version anywhere, even
        # after a cut, stops recovery: that file was written by another build, not torn.
        headers = [_check_header(seg_path, name_seq) for name_seq, seg_path in found]
        kept: list[int] = []
        records = 0
        last_seq = 0
        next_seq = found[0][0] if found else 1
        cut: tuple[int, _Damage, bool] | None = None  # (index, damage, header damaged)
        for i, (name_seq, seg_path) in enumerate(found):
            bad_header = headers[i]
            if bad_header is not None:
                cut = (i, _Damage(0, bad_header), True)
                break
            if kept and name_seq != last_seq + 1:
                raise JournalCorrupt(
                    f"{seg_path.name} starts at seq {name_seq} but the previous segment "
                    f"ends at {last_seq}: a segment file is missing or misplaced"
                )
            scan = _SegmentScan(seg_path, name_seq)
            for _ in scan.records():
                records += 1
            kept.append(name_seq)
            last_seq = scan.last_seq
            next_seq = last_seq + 1
            if scan.damage is not None:
                cut = (i, scan.damage, False)
                break

        truncated = 0
        dropped = 0
        reason = None
        if cut is not None:
            index, damage, header_damaged = cut
            reason = damage.reason
            _, seg_path = found[index]
            if header_damaged:
                # Nothing in it can be trusted; if it was the only segment its name is still
                # the best evidence of where numbering stood.
                if not kept:
                    next_seq = found[index][0]
                start = index
            else:
                size = seg_path.stat().st_size
                fd = os.open(seg_path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, damage.offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                truncated += size - damage.offset
                start = index + 1
            for _, later in found[start:]:
                truncated += later.stat().st_size
                later.unlink()
                dropped += 1
            _fsync_dir(path)

        if not kept:
            last_seq = next_seq - 1
        report = RecoveryReport(
            last_seq=last_seq,
            records=records,
            truncated_bytes=truncated,
            segments_dropped=dropped,
            reason=reason,
        )
        if not kept:
            Journal._create_segment(path, next_seq)
            kept.append(next_seq)
        return kept, last_seq, report

    @staticmethod
    def _create_segment(directory: Path, first_seq: int, ops: FileOps = _OS) -> None:
        """Creates a segment holding only its header, durable with its directory entry.

        A file left behind by an earlier failed attempt is replaced: it was never used.
        """
        seg = directory / _segment_name(first_seq)
        fd = os.open(seg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, _HEADER.pack(MAGIC, FORMAT_VERSION, first_seq), ops)
            ops.fdatasync(fd)
        finally:
            os.close(fd)
        _fsync_dir(directory, ops)

    def _open_active(self) -> None:
        seg = self.directory / _segment_name(self._segments[-1])
        self._fd = os.open(seg, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    # --- state ----------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the newest record (0 for a log that never held one)."""
        return self._last_seq

    @property
    def first_seq(self) -> int:
        """The lowest seq still held on disk (records below it were dropped)."""
        return self._segments[0]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def segment_files(self) -> list[Path]:
        """The segment files in sequence order; the last is the one being appended to."""
        return [self.directory / _segment_name(s) for s in self._segments]

    def _check_writable(self) -> None:
        """Refuses a closed or broken journal; repairs one left behind by an I/O fault.

        Raises:
            JournalClosed, JournalFailed: See the writing methods.
            OSError: The repair failed too; the fault persists.
        """
        if self._closed:
            raise JournalClosed("the journal is closed")
        if self._failed is not None:
            raise JournalFailed("an earlier I/O error left the journal unusable") from (
                self._failed
            )
        if self.fault is not None:
            self._repair()

    def _keep(self) -> None:
        """Everything written so far is kept: an I/O fault cuts back to here, not further."""
        self._kept = (self._segments[-1], self._size, self._last_seq)

    def _fail(self, exc: OSError) -> None:
        self.fault = exc

    def _repair(self) -> None:
        """Cuts the log back to the kept point after an I/O fault, durably.

        Segments started since are deleted, the kept segment is truncated to its kept size
        and synced, then appending resumes there with the next seq after the kept one. The
        records cut were never acknowledged. If a step fails the fault stays and the next
        call tries again from the start; every step is idempotent.
        """
        kept_segment, kept_size, kept_seq = self._kept
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        while self._segments[-1] != kept_segment:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(self._segments[-1])).unlink()
            del self._segments[-1]
        _fsync_dir(self.directory, self._ops)
        fd = os.open(self.directory / _segment_name(kept_segment), os.O_WRONLY)
        try:
            os.ftruncate(fd, kept_size)
            self._ops.fdatasync(fd)
        finally:
            os.close(fd)
        self._last_seq = self.synced_seq = kept_seq
        self._dirty = False
        self._open_active()
        self.fault = None
        self.repairs += 1

    # --- writing --------------------------------------------------------------------------

    def check_payloads(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Validates payloads for :meth:`append` without writing anything.

        The actor calls this in the producer's task so that one bad payload is rejected
        alone, before it can share a group commit with anybody else's.

        Returns:
            The payloads as a list of ``bytes``.

        Raises:
            TypeError: A payload is not ``bytes`` or ``bytearray``.
            ValueError: The list is empty, or a payload is empty (reserved for erased
                records) or longer than ``max_record_bytes``.
        """
        out = []
        for p in payloads:
            if not isinstance(p, bytes | bytearray):
                raise TypeError(f"payloads must be bytes, not {type(p).__name__}")
            if not 0 < len(p) <= self.max_record_bytes:
                raise ValueError(
                    f"payload of {len(p)} bytes outside 1..{self.max_record_bytes} bytes"
                )
            out.append(bytes(p))
        if not out:
            raise ValueError("nothing to append")
        return out

    def append(self, payloads: Sequence[bytes]) -> int:
        """Appends payloads as consecutive records; not durable until :meth:`sync`.

        All payloads are validated first, so a bad one means nothing is written. The records
        for one segment go out in a single ``os.write``; a batch crossing a rollover takes one
        write per segment.

        Args:
            payloads: Opaque, non-empty byte strings.

        Returns:
            The seq of the last record written; the first is ``returned - len(payloads) + 1``.

        Raises:
            ValueError, TypeError: See :meth:`check_payloads`.
            JournalClosed: After :meth:`close`.
            JournalFailed: An earlier I/O error made the journal unusable.
            OSError: The write (or the repair of an earlier fault) failed. What was written
                since the last successful :meth:`sync` is cut before the next write; none of
                it may be acknowledged.
        """
        self._check_writable()
        batch = self.check_payloads(payloads)
        seq = self._last_seq
        try:
            # The records for one segment, built in a single buffer: each payload is copied
            # once, and the buffer goes out in one write.
            chunk = bytearray()
            for p in batch:
                seq += 1
                size = RECORD_HEADER_SIZE + len(p)
                segment_has_records = self._size > HEADER_SIZE or bool(chunk)
                if segment_has_records and self._size + len(chunk) + size > self.segment_bytes:
                    self._write_chunk(chunk, seq - 1)
                    chunk = bytearray()
                    self._rollover(seq)
                chunk += _RECORD.pack(len(p), _crc(seq, p), seq)
                chunk += p
            self._write_chunk(chunk, seq)
        except OSError as exc:
            self._fail(exc)
            raise
        if self.sync_policy == "off":
            self._keep()  # acknowledged once written
        return seq

    def _write_chunk(self, chunk: bytearray, last_seq: int) -> None:
        if not chunk:
            return
        _write_all(self._fd, chunk, self._ops)
        self._size += len(chunk)
        self._last_seq = last_seq
        self._dirty = True

    def _rollover(self, first_seq: int) -> None:
        """Closes the active segment durably and starts a new one at ``first_seq``.

        The old segment is synced before the new one exists, in every policy, so that damage
        from a crash can only ever be in the last segment (see the module docstring).
        """
        self._sync_fd()
        os.close(self._fd)
        self._fd = -1
        self._segments.append(first_seq)  # before creating it: a repair must delete it
        self._create_segment(self.directory, first_seq, self._ops)
        self.rollovers += 1
        self._open_active()

    def _sync_fd(self) -> None:
        if self._dirty:
            self._ops.fdatasync(self._fd)
            self._dirty = False
            self.syncs += 1
        self.synced_seq = self._last_seq

    def sync(self) -> None:
        """Makes every appended record durable (``fdatasync`` of the active segment).

        Earlier segments and new directory entries were made durable at rollover, so one
        ``fdatasync`` covers everything. A no-op when nothing was written since the last sync.

        Raises:
            JournalClosed: After :meth:`close`.
            JournalFailed: An earlier I/O error made the journal unusable.
            OSError: The sync (or the repair of an earlier fault) failed. A failed
                ``fdatasync`` may have discarded the data it could not write, so everything
                since the last successful sync is cut before the next write.
        """
        self._check_writable()
        try:
            self._sync_fd()
        except OSError as exc:
            self._fail(exc)
            raise
        self._keep()

    # --- reading --------------------------------------------------------------------------

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yields ``(seq, payload)`` for every record with ``seq > after_seq``, in order.

        Erased records (tombstones) are skipped. The log is re-validated while reading; the
        records appended after the call are not included. Do not append, drop or rewrite
        while iterating.

        Raises:
            JournalClosed: After :meth:`close`.
            JournalCorrupt: The log changed under the journal since it was opened.
        """
        if self._closed:
            raise JournalClosed("the journal is closed")
        segments = list(self._segments)
        active_end = self._size
        last = self._last_seq
        return self._replay(segments, active_end, last, after_seq)

    def _replay(
        self, segments: list[int], active_end: int, last: int, after_seq: int
    ) -> Iterator[tuple[int, bytes]]:
        for i, first in enumerate(segments):
            is_last = i == len(segments) - 1
            if not is_last and segments[i + 1] <= after_seq + 1:
                continue
            scan = _SegmentScan(
                self.directory / _segment_name(first), first, active_end if is_last else None
            )
            for seq, payload in scan.records():
                if seq > after_seq and payload:
                    yield seq, payload
            if scan.damage is not None:
                raise JournalCorrupt(f"log changed since open: {scan.damage.reason}")
            if is_last and scan.last_seq != last:
                raise JournalCorrupt(f"log ends at seq {scan.last_seq}, expected {last}")

    # --- maintenance ----------------------------------------------------------------------

    def drop_before(self, seq: int) -> int:
        """Deletes whole segments whose every record has a seq below ``seq``.

        Call it once a durable snapshot covers everything before ``seq``. The active segment
        is never deleted: its header keeps the numbering even when it holds no record yet.
        Segments go oldest first, so a crash midway still leaves a valid log.

        Returns:
            The number of segment files deleted.
        """
        self._check_writable()
        dropped = 0
        while len(self._segments) > 1 and self._segments[1] <= seq:
            (self.directory / _segment_name(self._segments[0])).unlink()
            del self._segments[0]
            dropped += 1
        if dropped:
            _fsync_dir(self.directory)
        return dropped

    def rewrite(self, keep: Callable[[int, bytes], bytes | None]) -> int:
        """Rewrites the log through ``keep``, atomically: all of it or none of it survives.

        ``keep(seq, payload)`` returns the payload to keep (the same or a transformed one) or
        None to erase the record. Erased records become tombstones, so sequence numbers and
        ``last_seq`` never change; replay skips them. Only segments with a change are
        rewritten: each goes to a ``.tmp`` file that is synced, then a commit file listing
        them is written and synced, then they are renamed over the originals. Recovery rolls
        a committed rewrite forward and deletes an uncommitted one (see ``_finish_rewrite``).

        This is how the events of an erased user leave the log; ``keep`` should be idempotent
        so a rewrite can simply be repeated.

        Args:
            keep: Called once per live record, in seq order.

        Returns:
            The number of records changed or erased.

        Raises:
            ValueError: ``keep`` returned a payload longer than ``max_record_bytes``. The log
                is unchanged.
            Exception: Anything ``keep`` raises propagates; the log is unchanged.
            OSError: Writing failed; if it happened after the commit point the journal is
                unusable until reopened, which completes the rewrite.
        """
        self._check_writable()
        self.sync()
        changed = 0
        staged: list[str] = []
        complete = False
        try:
            for i, first in enumerate(self._segments):
                is_last = i == len(self._segments) - 1
                name = _segment_name(first)
                limit = self._size if is_last else None
                changed += self._stage_segment(name, first, limit, keep, staged)
            complete = True
        finally:
            if not complete:  # before the commit point: discard the drafts, log unchanged
                for name in staged:
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / (name + _TMP_SUFFIX)).unlink()
        if not staged:
            return changed

        commit = self.directory / _COMMIT_NAME
        try:
            draft = self.directory / (_COMMIT_NAME + _TMP_SUFFIX)
            with open(draft, "w", encoding="ascii") as f:
                f.write("\n".join(staged) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(draft, commit)
            _fsync_dir(self.directory)  # the commit point
            os.close(self._fd)
            self._fd = -1
            for name in staged:
                os.replace(self.directory / (name + _TMP_SUFFIX), self.directory / name)
            _fsync_dir(self.directory)
            commit.unlink()
            _fsync_dir(self.directory)
            self._open_active()
        except OSError as exc:
            self._failed = exc
            raise
        self._keep()  # the kept segment's size changed with its tombstones
        return changed

    def _stage_segment(
        self,
        name: str,
        first: int,
        limit: int | None,
        keep: Callable[[int, bytes], bytes | None],
        staged: list[str],
    ) -> int:
        """Writes the rewritten form of one segment to ``name.tmp`` if anything changes."""
        scan = _SegmentScan(self.directory / name, first, limit)
        out = [_HEADER.pack(MAGIC, FORMAT_VERSION, first)]
        changed = 0
        for seq, payload in scan.records():
            new = payload
            if payload:  # tombstones stay tombstones
                kept = keep(seq, payload)
                new = b"" if kept is None else bytes(kept)
                if len(new) > self.max_record_bytes:
                    raise ValueError(f"keep() returned {len(new)} bytes for seq {seq}")
                if new != payload:
                    changed += 1
            out.append(_encode(seq, new))
        if scan.damage is not None:
            raise JournalCorrupt(f"log changed since open: {scan.damage.reason}")
        if not changed:
            return 0
        staged.append(name)
        fd = os.open(
            self.directory / (name + _TMP_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
        )
        try:
            _write_all(fd, b"".join(out))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return changed

    # --- closing --------------------------------------------------------------------------

    def close(self, *, sync: bool = True) -> None:
        """Syncs (unless ``sync=False`` or the journal failed) and releases the directory.

        Idempotent. ``sync=False`` is for an owner that is being cancelled and never
        acknowledged the unsynced records, so it does not need to wait for the disk.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if sync and self._failed is None and self.fault is None and self._fd >= 0:
                self._sync_fd()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
