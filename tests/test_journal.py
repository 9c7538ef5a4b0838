"""Tests of the write-ahead log (engine._journal) and its actor (engine._journal_actor).

Everything runs on real files under tmp_path: the point is what ends up on disk.
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from engine import _journal
from engine._exceptions import (
    JournalClosed,
    JournalCorrupt,
    JournalFailed,
    JournalLocked,
    RecstreamError,
)
from engine._journal import HEADER_SIZE, RECORD_HEADER_SIZE, Journal, RecoveryReport
from engine._journal_actor import JournalActor
from engine._messages import Appended

ROOT = Path(__file__).resolve().parent.parent


def payload(i: int) -> bytes:
    """A distinct payload per i, of varying length (1..~60 bytes)."""
    return f"event-{i}:".encode() + bytes([65 + i % 26]) * (i % 37)


def build(path: Path, n: int, **kw: object) -> list[int]:
    """Creates a log of payload(1..n), one record per append; returns each record's offset
    in its segment file."""
    journal, _ = Journal.open(path, **kw)  # type: ignore[arg-type]
    offsets = []
    with journal:
        for i in range(1, n + 1):
            assert journal.append([payload(i)]) == i
            offsets.append(journal._size - len(_journal._encode(i, payload(i))))
    return offsets


def replay_all(journal: Journal, after: int = 0) -> list[tuple[int, bytes]]:
    return list(journal.replay(after))


def expected(first: int, last: int) -> list[tuple[int, bytes]]:
    return [(i, payload(i)) for i in range(first, last + 1)]


def seg_files(path: Path) -> list[Path]:
    return sorted(path.glob("wal-*.log"))


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Polls state that the actor does not signal with an event (channel statistics)."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.001)


# --- synchronous journal -------------------------------------------------------------------


def test_round_trip_across_rollovers_and_reopen(tmp_path: Path) -> None:
    journal, report = Journal.open(tmp_path, segment_bytes=256)
    assert report == RecoveryReport(0, 0, 0, 0, None)
    i = 0
    with journal:
        for size in [1, 3, 2, 5, 1, 4, 7, 2, 6, 1, 3, 5]:
            batch = [payload(i + k) for k in range(1, size + 1)]
            last = journal.append(batch)
            i += size
            assert last == i == journal.last_seq
        assert journal.rollovers >= 3
        files = seg_files(tmp_path)
        assert len(files) == journal.rollovers + 1
        # The file names are the first seq of each segment, and no segment outgrows the
        # limit (none of these records is bigger than a segment on its own).
        assert all(f.stat().st_size <= 256 for f in files)
        assert replay_all(journal) == expected(1, i)
        for after in [0, 1, 7, 20, i - 1, i]:
            assert replay_all(journal, after) == expected(after + 1, i)

    journal, report = Journal.open(tmp_path, segment_bytes=256)
    with journal:
        assert report == RecoveryReport(
            last_seq=i, records=i, truncated_bytes=0, segments_dropped=0, reason=None
        )
        assert journal.append([payload(i + 1), payload(i + 2)]) == i + 2
        assert replay_all(journal) == expected(1, i + 2)
    firsts = [int(f.name[4:24]) for f in seg_files(tmp_path)]
    assert firsts[0] == 1 and firsts == sorted(firsts)


@pytest.mark.parametrize("segment_bytes", [1 << 20, 200], ids=["one-segment", "many-segments"])
def test_torn_last_record_is_cut_at_every_offset(tmp_path: Path, segment_bytes: int) -> None:
    pristine = tmp_path / "pristine"
    n = 8
    offsets = build(pristine, n, segment_bytes=segment_bytes)
    files = seg_files(pristine)
    last_file = files[-1].name
    data = files[-1].read_bytes()
    start = offsets[-1]
    assert len(data) == start + RECORD_HEADER_SIZE + len(payload(n))

    for cut in range(start, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        for f in files[:-1]:
            (d / f.name).write_bytes(f.read_bytes())
        (d / last_file).write_bytes(data[:cut])

        journal, report = Journal.open(d, segment_bytes=segment_bytes)
        with journal:
            assert report.last_seq == n - 1
            assert report.records == n - 1
            assert report.truncated_bytes == cut - start
            assert report.segments_dropped == 0
            assert (report.reason is None) == (cut == start), report
            assert (d / last_file).stat().st_size == start
            assert replay_all(journal) == expected(1, n - 1)
            assert journal.append([b"after the cut"]) == n
        journal, report = Journal.open(d, segment_bytes=segment_bytes)
        with journal:
            assert report.reason is None
            assert replay_all(journal) == [*expected(1, n - 1), (n, b"after the cut")]


def test_torn_header_of_only_segment_is_cut(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    Journal.open(pristine)[0].close()
    (header_file,) = seg_files(pristine)
    header = header_file.read_bytes()
    assert len(header) == HEADER_SIZE

    for cut in range(HEADER_SIZE):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / header_file.name).write_bytes(header[:cut])
        journal, report = Journal.open(d)
        with journal:
            assert report.last_seq == 0 and report.records == 0
            assert report.segments_dropped == 1
            assert report.truncated_bytes == cut
            assert report.reason is not None and "header" in report.reason
            assert journal.append([b"first"]) == 1
            assert replay_all(journal) == [(1, b"first")]


def test_torn_header_of_last_segment_keeps_numbering(tmp_path: Path) -> None:
    build(tmp_path, 12, segment_bytes=200)
    files = seg_files(tmp_path)
    assert len(files) >= 2
    last_first = int(files[-1].name[4:24])
    size = files[-1].stat().st_size
    with open(files[-1], "r+b") as f:
        f.truncate(HEADER_SIZE - 3)
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.last_seq == last_first - 1
        assert report.segments_dropped == 1
        assert report.truncated_bytes == HEADER_SIZE - 3
        assert size > HEADER_SIZE
        assert journal.append([payload(last_first)]) == last_first
        assert replay_all(journal) == expected(1, last_first)


@pytest.mark.parametrize("field", ["length", "crc", "seq", "payload"])
def test_bit_flip_cuts_record_and_everything_after(tmp_path: Path, field: str) -> None:
    pristine = tmp_path / "pristine"
    n, bad = 7, 4
    offsets = build(pristine, n)
    (seg,) = seg_files(pristine)
    data = seg.read_bytes()
    start = offsets[bad - 1]
    span = {"length": (0, 4), "crc": (4, 8), "seq": (8, 16)}.get(
        field, (RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + len(payload(bad)))
    )
    for byte in range(start + span[0], start + span[1]):
        for bit in range(8):
            d = tmp_path / f"{byte}-{bit}"
            d.mkdir()
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            (d / seg.name).write_bytes(bytes(flipped))
            journal, report = Journal.open(d)
            with journal:
                assert report.last_seq == bad - 1, (byte, bit, report)
                assert report.records == bad - 1
                assert report.truncated_bytes == len(data) - start
                assert report.reason is not None
                assert replay_all(journal) == expected(1, bad - 1)
                assert journal.append([b"x"]) == bad


def test_garbage_later_segment_is_dropped(tmp_path: Path) -> None:
    build(tmp_path, 10, segment_bytes=200)
    files = seg_files(tmp_path)
    garbage = random.Random(7).randbytes(300)
    (tmp_path / _journal._segment_name(11)).write_bytes(garbage)
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.last_seq == 10 and report.records == 10
        assert report.segments_dropped == 1
        assert report.truncated_bytes == 300
        assert "magic" in (report.reason or "")
        assert seg_files(tmp_path) == files
        assert journal.append([payload(11)]) == 11
        assert replay_all(journal) == expected(1, 11)


def test_valid_header_with_garbage_records_is_cut_to_the_header(tmp_path: Path) -> None:
    build(tmp_path, 3)
    header = _journal._HEADER.pack(_journal.MAGIC, _journal.FORMAT_VERSION, 4)
    (tmp_path / _journal._segment_name(4)).write_bytes(header + b"\xff" * 50)
    journal, report = Journal.open(tmp_path)
    with journal:
        assert report.last_seq == 3 and report.segments_dropped == 0
        assert report.truncated_bytes == 50
        assert journal.append([payload(4)]) == 4
        assert replay_all(journal) == expected(1, 4)


def test_damage_in_an_early_segment_cuts_there_and_drops_later_ones(tmp_path: Path) -> None:
    build(tmp_path, 20, segment_bytes=200)
    files = seg_files(tmp_path)
    assert len(files) >= 3
    first = bytearray(files[0].read_bytes())
    second_record = HEADER_SIZE + RECORD_HEADER_SIZE + len(payload(1))
    first[second_record + RECORD_HEADER_SIZE] ^= 0x01  # the payload of seq 2
    files[0].write_bytes(bytes(first))
    later_bytes = sum(f.stat().st_size for f in files[1:])
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.last_seq == 1 and report.records == 1
        assert report.segments_dropped == len(files) - 1
        assert report.truncated_bytes == len(first) - second_record + later_bytes
        assert seg_files(tmp_path) == files[:1]
        assert journal.append([b"two"]) == 2


def test_missing_middle_segment_raises_and_changes_nothing(tmp_path: Path) -> None:
    build(tmp_path, 20, segment_bytes=200)
    files = seg_files(tmp_path)
    files[1].unlink()
    before = {f.name: f.read_bytes() for f in seg_files(tmp_path)}
    with pytest.raises(JournalCorrupt, match="missing"):
        Journal.open(tmp_path, segment_bytes=200)
    assert {f.name: f.read_bytes() for f in seg_files(tmp_path)} == before
    # The lock was released: fixing the directory makes it usable again.
    for f in files[2:]:
        f.unlink()
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.reason is None and report.last_seq == int(files[1].name[4:24]) - 1


def test_unknown_format_version_raises(tmp_path: Path) -> None:
    build(tmp_path, 3)
    (seg,) = seg_files(tmp_path)
    data = bytearray(seg.read_bytes())
    data[8:12] = (2).to_bytes(4, "little")
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="version 2"):
        Journal.open(tmp_path)
    assert seg.read_bytes() == bytes(data)


def test_second_open_of_a_directory_is_refused(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    with pytest.raises(JournalLocked):
        Journal.open(tmp_path)
    journal.close()
    journal, _ = Journal.open(tmp_path)
    journal.close()
    assert issubclass(JournalLocked, RecstreamError)


def test_invalid_payloads_are_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path, max_record_bytes=100)
    with journal:
        journal.append([b"a"])
        (seg,) = seg_files(tmp_path)
        size = seg.stat().st_size
        with pytest.raises(ValueError):
            journal.append([b"ok", b"x" * 101])
        with pytest.raises(ValueError):
            journal.append([b"ok", b""])
        with pytest.raises(ValueError):
            journal.append([])
        with pytest.raises(TypeError):
            journal.append(["text"])  # type: ignore[list-item]
        assert journal.last_seq == 1
        assert seg.stat().st_size == size
        assert journal.append([b"x" * 100]) == 2
        assert replay_all(journal) == [(1, b"a"), (2, b"x" * 100)]
    with pytest.raises(JournalClosed):
        journal.append([b"late"])


def test_drop_before_deletes_only_fully_covered_segments(tmp_path: Path) -> None:
    build(tmp_path, 30, segment_bytes=200)
    journal, _ = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        firsts = [int(f.name[4:24]) for f in journal.segment_files()]
        assert len(firsts) >= 4
        # Segment k holds firsts[k] .. firsts[k+1]-1: it may go once seq >= firsts[k+1].
        assert journal.drop_before(firsts[1] - 1) == 0
        assert journal.drop_before(firsts[2]) == 2
        assert journal.first_seq == firsts[2]
        assert journal.drop_before(firsts[3] - 1) == 0
        assert replay_all(journal) == expected(firsts[2], 30)
        # The active segment always stays, so numbering survives even a full drop.
        journal.drop_before(10**9)
        assert [int(f.name[4:24]) for f in seg_files(tmp_path)] == [firsts[-1]]
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.last_seq == 30 and journal.first_seq == firsts[-1]
        assert journal.append([payload(31)]) == 31
        assert replay_all(journal) == expected(firsts[-1], 31)


def test_rewrite_erases_and_transforms_and_survives_reopen(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path, segment_bytes=200)
    records = {}
    erased = {4, 5, 27}
    with journal:
        for i in range(1, 31):
            user = "alice" if i in erased else "bob"
            records[i] = f"{user}:{i}".encode()
            journal.append([records[i]])
        inodes = {f.name: f.stat().st_ino for f in seg_files(tmp_path)}

        def keep(seq: int, data: bytes) -> bytes | None:
            if data.startswith(b"alice:"):
                return None
            if seq > 28:
                return data.upper()
            return data

        assert journal.rewrite(keep) == 3 + 2
        want = [(i, p.upper() if i > 28 else p) for i, p in records.items() if i not in erased]
        assert replay_all(journal) == want
        assert journal.last_seq == 30
        assert journal.append([b"bob:31"]) == 31
        assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "REWRITE").exists()
        # Only segments with something to change were rewritten (got a new inode).
        firsts = sorted(int(n[4:24]) for n in inodes) + [31]
        untouched = 0
        for k, first in enumerate(firsts[:-1]):
            name = _journal._segment_name(first)
            touched = any(i in erased or i > 28 for i in range(first, firsts[k + 1]))
            assert (os.stat(tmp_path / name).st_ino != inodes[name]) == touched
            untouched += not touched
        assert untouched >= 2
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.reason is None and report.last_seq == 31
        assert report.records == 31  # tombstones count: numbering never moves
        assert replay_all(journal) == [*want, (31, b"bob:31")]
        assert journal.rewrite(keep) == 1  # seq 31 is new and > 28
        assert journal.rewrite(keep) == 0  # idempotent: nothing left to change
        assert replay_all(journal, 29) == [(30, b"BOB:30"), (31, b"BOB:31")]


def test_rewrite_that_fails_before_commit_leaves_log_unchanged(tmp_path: Path) -> None:
    build(tmp_path, 20, segment_bytes=200)
    journal, _ = Journal.open(tmp_path, segment_bytes=200)
    with journal:

        def keep(seq: int, data: bytes) -> bytes | None:
            if seq == 15:
                raise RuntimeError("boom")
            return None

        with pytest.raises(RuntimeError, match="boom"):
            journal.rewrite(keep)
        assert not list(tmp_path.glob("*.tmp"))
        assert replay_all(journal) == expected(1, 20)
        with pytest.raises(ValueError):
            journal.rewrite(lambda seq, data: data * 10**6)
        assert replay_all(journal) == expected(1, 20)
        assert journal.append([payload(21)]) == 21
    # A draft left by a crash before the commit point is discarded at open.
    (tmp_path / (_journal._segment_name(1) + ".tmp")).write_bytes(b"draft")
    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.reason is None
        assert not list(tmp_path.glob("*.tmp"))
        assert replay_all(journal) == expected(1, 21)


def test_rewrite_interrupted_after_commit_is_completed_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(tmp_path, 20, segment_bytes=200)
    journal, _ = Journal.open(tmp_path, segment_bytes=200)
    real_replace = os.replace
    calls = []

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(dst)
        if len(calls) == 3:  # the commit file, one segment, then the disk "fails"
            raise OSError(errno.EIO, "injected")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        journal.rewrite(lambda seq, data: None if seq % 2 else data)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(JournalFailed):
        journal.append([b"x"])
    journal.close()
    assert (tmp_path / "REWRITE").exists()

    journal, report = Journal.open(tmp_path, segment_bytes=200)
    with journal:
        assert report.reason is None and report.last_seq == 20
        assert replay_all(journal) == [(i, payload(i)) for i in range(2, 21, 2)]
        assert not (tmp_path / "REWRITE").exists()
        assert not list(tmp_path.glob("*.tmp"))


# --- the actor -----------------------------------------------------------------------------


async def test_group_commit_of_concurrent_appends(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path, segment_bytes=1024)
    send, receive = trio.open_memory_channel[Appended](1000)
    actor = JournalActor(journal, output=send, max_pending=64)
    acked: dict[int, bytes] = {}

    async def producer(i: int) -> None:
        data = payload(i)
        seq = await actor.append([data])
        # Acknowledged means durable: a completed fdatasync covers it.
        assert journal.synced_seq >= seq
        acked[seq] = data

    n = 100
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with trio.open_nursery() as producers:
            for i in range(n):
                producers.start_soon(producer, i)
        assert journal.syncs < n
        assert actor.groups < n
        await actor.aclose()

    assert sorted(acked) == list(range(1, n + 1))
    forwarded = [message async for message in receive]  # the actor closed the channel
    seq = 1
    for message in forwarded:
        assert message.first_seq == seq
        for data in message.payloads:
            assert acked[seq] == data
            seq += 1
    assert seq == n + 1
    assert journal.closed
    journal, report = Journal.open(tmp_path)
    with journal:
        assert report.reason is None
        assert dict(replay_all(journal)) == acked


class _RecordingOps(_journal.FileOps):
    """The real system calls, noting each ``fdatasync`` in ``order``."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    def fdatasync(self, fd: int) -> None:
        self.order.append("sync")
        super().fdatasync(fd)


async def test_quiet_group_reaches_the_model_before_its_sync_and_is_acked_after(
    tmp_path: Path,
) -> None:
    """With ``apply_before_sync``, a small group on a quiet actor is handed to the model
    and the consumer works on it before the sync starts (its worker thread would compete
    with that work); the producer is still acknowledged only once the sync covers it."""
    order: list[str] = []
    journal, _ = Journal.open(tmp_path, sync="batch", ops=_RecordingOps(order))
    send, receive = trio.open_memory_channel[Appended](16)
    actor = JournalActor(journal, output=send, apply_before_sync=True)

    async def consumer() -> None:
        async for group in receive:
            order.append(f"applied {group.last_seq}")
            # The model actor hands on to the index actor, which hands on to the publisher.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            order.append(f"pushed {group.last_seq}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await nursery.start(actor.run)
        for n in range(1, 4):
            seq = await actor.append([payload(n)])
            assert journal.synced_seq >= seq  # acknowledged means durable
            order.append(f"acked {seq}")
        await actor.aclose()
    for n in range(1, 4):
        assert order[4 * n - 4 : 4 * n] == [
            f"applied {n}",
            f"pushed {n}",
            "sync",
            f"acked {n}",
        ], order


async def test_slow_consumer_blocks_producers_until_it_reads(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    send, receive = trio.open_memory_channel[Appended](1)
    actor = JournalActor(journal, output=send, max_pending=1)
    done: list[int] = []

    async def producer(i: int) -> None:
        done.append(await actor.append([payload(i)]))

    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        assert await actor.append([payload(1)]) == 1  # fills the output buffer
        assert await actor.append([payload(2)]) == 2  # acked; the actor now waits to forward
        await wait_until(lambda: send.statistics().tasks_waiting_send == 1)
        inbox = actor._send.statistics
        nursery.start_soon(producer, 3)
        await wait_until(lambda: inbox().current_buffer_used == 1)  # 3 sits in the inbox
        nursery.start_soon(producer, 4)
        await wait_until(lambda: inbox().tasks_waiting_send == 1)  # 4 cannot even enter it
        await trio.sleep(0.2)
        assert done == []
        assert journal.last_seq == 2  # nothing more was written while the consumer slept

        got = [await receive.receive(), await receive.receive()]
        assert [(m.first_seq, m.payloads) for m in got] == [(1, (payload(1),)), (2, (payload(2),))]
        await wait_until(lambda: len(done) == 2)
        assert sorted(done) == [3, 4]
        rest: list[Appended] = []

        async def drain() -> None:
            rest.extend([m async for m in receive])

        nursery.start_soon(drain)
        await actor.aclose()
    assert [p for m in rest for p in m.payloads] == [payload(3), payload(4)]


async def test_interval_policy_acks_only_after_a_covering_sync(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path, sync="interval", interval_ms=20)
    actor = JournalActor(journal, max_pending=256)
    acked: list[int] = []

    async def producer(i: int) -> None:
        seq = await actor.append([payload(i)])
        assert journal.synced_seq >= seq
        acked.append(seq)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for wave in range(5):
            async with trio.open_nursery() as producers:
                for i in range(20):
                    producers.start_soon(producer, wave * 20 + i)
                    await trio.sleep(0.001)
        elapsed = trio.current_time() - start
        await actor.aclose()
    assert sorted(acked) == list(range(1, 101))
    # At most one sync per interval (plus the first, which is immediate).
    assert journal.syncs <= elapsed / 0.020 + 2
    assert journal.syncs < 100


async def test_off_policy_acks_after_write_and_syncs_on_close(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path, sync="off")
    actor = JournalActor(journal)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for i in range(1, 21):
            assert await actor.append([payload(i)]) == i
        assert journal.syncs == 0
        await actor.aclose()
    assert journal.syncs == 1 and journal.synced_seq == 20
    journal, _ = Journal.open(tmp_path)
    with journal:
        assert replay_all(journal) == expected(1, 20)


async def test_close_drains_queued_appends_then_refuses_new_ones(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    send, receive = trio.open_memory_channel[Appended](100)
    actor = JournalActor(journal, output=send, max_pending=100)
    results: dict[int, bytes] = {}

    async def producer(i: int) -> None:
        results[await actor.append([payload(i)])] = payload(i)

    async with trio.open_nursery() as nursery:
        # Queue before the actor runs, close, then start it: the queue must be drained.
        for i in range(1, 11):
            nursery.start_soon(producer, i)
        await trio.testing.wait_all_tasks_blocked()
        actor.close()
        await nursery.start(actor.run)
    assert sorted(results) == list(range(1, 11))
    forwarded = [p for m in [m async for m in receive] for p in m.payloads]
    assert forwarded == [results[seq] for seq in range(1, 11)]
    with pytest.raises(JournalClosed):
        await actor.append([b"late"])
    with pytest.raises(ValueError):
        await actor.append([b""])
    assert journal.closed


async def test_io_error_fails_waiters_and_the_actor_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal, _ = Journal.open(tmp_path)
    actor = JournalActor(journal, max_pending=64, retry_interval=0.05)
    real_fdatasync = os.fdatasync
    disk_broken = [True]

    def flaky_fdatasync(fd: int) -> None:
        if disk_broken[0]:
            raise OSError(errno.EIO, "injected I/O error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", flaky_fdatasync)
    failures: list[JournalFailed] = []

    async def producer(i: int) -> None:
        try:
            await actor.append([payload(i)])
        except JournalFailed as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        async with trio.open_nursery() as producers:
            for i in range(5):
                producers.start_soon(producer, i)
        assert len(failures) == 5
        assert all(isinstance(f.__cause__, OSError) for f in failures)
        assert actor.fault is not None and "EIO" in actor.fault
        with pytest.raises(JournalFailed):  # the log cannot be cut back while the disk fails
            await actor.append([b"during the failure"])
        disk_broken[0] = False
        with trio.fail_after(5):
            while actor.fault is not None:  # noqa: ASYNC110 - the actor retries on its own
                await trio.sleep(0.01)
        assert await actor.append([b"after the failure"]) == 1  # nothing refused was kept
        await actor.aclose()
    assert journal.closed
    journal, _ = Journal.open(tmp_path)
    with journal:
        assert replay_all(journal) == [(1, b"after the failure")]


# --- crash consistency ---------------------------------------------------------------------


def crash_payload(i: int) -> bytes:
    return (f"crash-{i}|".encode()) * (1 + i % 9)


_CHILD = """
import sys
import trio
from engine._journal import Journal
from engine._journal_actor import JournalActor

{payload_src}

async def main(directory):
    journal, report = Journal.open(directory, segment_bytes=2048)
    actor = JournalActor(journal, max_pending=64)
    counter = iter(range(10**9))

    async def producer():
        while True:
            i = next(counter)
            seq = await actor.append([crash_payload(i)])
            sys.stdout.write(f"{{seq}} {{i}}\\n")
            sys.stdout.flush()

    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        for _ in range(8):
            nursery.start_soon(producer)

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("trial", range(3))
def test_kill_9_loses_no_acknowledged_append(tmp_path: Path, trial: int) -> None:
    rng = random.Random()
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(payload_src=textwrap.dedent(inspect.getsource(crash_payload))))
    data_dir = tmp_path / "wal"
    out_path = tmp_path / "acked.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(out_path, "wb") as out:
        child = subprocess.Popen([sys.executable, str(script), str(data_dir)], stdout=out, env=env)
        try:
            deadline = time.monotonic() + 20
            while out_path.stat().st_size < 200:  # wait until it is really appending
                assert child.poll() is None, "the child exited early"
                assert time.monotonic() < deadline, "the child never acknowledged"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL

    lines = out_path.read_bytes().split(b"\n")[:-1]  # a torn last line was never complete
    acked = {int(s): int(i) for s, i in (line.split() for line in lines)}
    assert len(acked) > 10
    journal, report = Journal.open(data_dir, segment_bytes=2048)
    with journal:
        on_disk = dict(replay_all(journal))
    assert list(on_disk) == list(range(1, report.last_seq + 1))
    for seq, i in acked.items():
        assert on_disk[seq] == crash_payload(i), (seq, report)
