"""Replaying journal records without reporting them (``apply_records(collect=False)``), or
without naming their users (``users=False``, the engine catching up at start-up)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from engine import Model, ModelConfig
from engine import _model_actor as model_actor
from engine._events import journal_record, json_to_frame
from engine._log import replay_chunk
from engine._messages import Appended, Applied
from engine._model_actor import ModelActor, apply_records


def _payload(events: list[dict[str, object]]) -> bytes:
    return journal_record(json_to_frame(events, "replay", 100)[0])


def test_replay_applies_like_the_live_path_and_skips_a_bad_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    payloads = [
        _payload([{"user": "a", "item": "x"}, {"user": "b", "item": "y"}]),
        b"\xc1 not a journal record",
        _payload([{"user": "a", "item": "y"}]),
    ]
    live, replayed = Model(ModelConfig(seed=1)), Model(ModelConfig(seed=1))
    reported = apply_records(live, 7, payloads)
    with caplog.at_level(logging.ERROR, logger="recstream.model"):
        assert apply_records(replayed, 7, payloads, collect=False) == []
    assert "journal record 8 could not be applied" in caplog.text
    assert [a.seq for a in reported] == [7, 8, 9]
    assert [a.applied for a in reported] == [2, 0, 1]
    assert replayed.stats()["events_applied"] == live.stats()["events_applied"] == 3
    assert sorted(replayed.seen("a")) == sorted(live.seen("a")) == ["x", "y"]


def test_a_batched_group_reports_and_counts_like_the_per_event_path() -> None:
    """One group with repeats, a redelivery, a refused entry, an item write and an erasure:
    the batched path (one coalesced call for the group) reports every record as the
    per-event path does and leaves the same histories; only the vectors may differ."""
    events = [
        {"user": f"u{n % 7}", "item": f"i{n * n % 11}", "type": "click", "id": n} for n in range(60)
    ]
    payloads = [
        _payload(events[:30]),
        _payload([*events[25:35], {"user": "u1", "item": "i1", "type": "nope"}]),
        _payload([{"item": "i3", "category": "c", "tags": ["t"]}, {"erase_user": "u2"}]),
        _payload(events[35:]),
    ]
    per_event = Model(ModelConfig(seed=1, batch_apply=False))
    batched = Model(ModelConfig(seed=1))
    assert batched.config()["batch_apply"] is True
    expect = apply_records(per_event, 1, payloads)
    got = apply_records(batched, 1, payloads)

    def comparable(applied: list) -> list:
        return [
            (a.seq, a.applied, a.duplicates, a.rejected, sorted(a.users), a.erased) for a in applied
        ]

    assert comparable(got) == comparable(expect)
    assert [a.duplicates for a in got] == [0, 5, 0, 0]
    assert got[2].erased == ("u2",)
    assert batched.stats()["events_applied"] == per_event.stats()["events_applied"]
    for user in [f"u{n}" for n in range(7)]:
        assert sorted(batched.seen(user)) == sorted(per_event.seen(user))
    assert batched.trending(k=11) == per_event.trending(k=11)


def test_per_record_solves_do_not_depend_on_the_grouping() -> None:
    """With ``coalesce_records`` off, records applied in groups of any size give the same
    vectors (what replicas reading one log in different groups rely on); with it on, the
    vectors depend on the grouping."""
    events = [
        {"user": f"u{n % 9}", "item": f"i{n * 7 % 13}", "type": "click", "id": n}
        for n in range(120)
    ]
    payloads = [_payload(events[n : n + 10]) for n in range(0, 120, 10)]

    def vectors(coalesce: bool, sizes: list[int]) -> list[list[float]]:
        model = Model(ModelConfig(seed=1, coalesce_records=coalesce))
        first = 0
        for size in sizes:
            apply_records(model, first + 1, payloads[first : first + size])
            first += size
        return [model.user_vector(f"u{n}").tolist() for n in range(9)]

    one_by_one = vectors(False, [1] * 12)
    assert vectors(False, [12]) == one_by_one
    assert vectors(False, [5, 4, 3]) == one_by_one
    assert vectors(True, [12]) != vectors(True, [1] * 12)


def test_a_replay_without_users_reports_everything_else_and_builds_the_same_model() -> None:
    """``users=False`` (the engine catching up at start-up) leaves the users out of the
    reports, and nothing else: counts, refusals, erasures and the model are the same."""
    events = [{"user": f"u{n % 5}", "item": f"i{n % 8}", "id": n} for n in range(40)]
    payloads = [
        _payload(events[:20]),
        _payload([*events[15:25], {"user": "u1", "item": "i1", "type": "nope"}]),
        _payload([{"erase_user": "u3"}]),
        _payload(events[25:]),
    ]
    full, quiet = Model(ModelConfig(seed=2)), Model(ModelConfig(seed=2))
    expect = apply_records(full, 1, payloads)
    got = apply_records(quiet, 1, payloads, users=False)
    assert all(a.users for a in expect if a.applied) and all(not a.users for a in got)
    assert [attrs_without_users(a) for a in got] == [attrs_without_users(a) for a in expect]
    assert got[2].erased == ("u3",) and got[1].duplicates == 5 and len(got[1].rejected) == 1
    for user in [f"u{n}" for n in range(5)]:
        assert sorted(quiet.seen(user)) == sorted(full.seen(user))
        assert quiet.recommend(user, k=5) == full.recommend(user, k=5)


def attrs_without_users(a: Applied) -> tuple[object, ...]:
    return (a.seq, a.applied, a.duplicates, a.rejected, a.erased)


async def test_the_model_actor_reports_users_once_told_to() -> None:
    """The engine starts its model actor without user reports while it catches up, then
    turns them on: groups after that name their users again."""
    model = Model(ModelConfig(seed=3))
    send, inbox = trio.open_memory_channel[Appended](4)
    reported: list[list[Applied]] = []
    first = trio.Event()

    def on_applied(results: list[Applied], _: object) -> None:
        reported.append(results)
        first.set()

    actor = ModelActor(model, inbox, on_applied=on_applied, report_users=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await send.send(Appended(1, (_payload([{"user": "a", "item": "x"}]),)))
        await first.wait()
        actor.report_users = True
        await send.send(Appended(2, (_payload([{"user": "b", "item": "y"}]),)))
        await send.aclose()
    assert [[(a.seq, a.applied, a.users) for a in r] for r in reported] == [
        [(1, 1, ())],
        [(2, 1, (("b", None),))],
    ]
    assert actor.applied_seq == 2


async def test_groups_queued_behind_an_apply_are_applied_with_the_next_one() -> None:
    model = Model(ModelConfig(seed=3))
    send, inbox = trio.open_memory_channel[Appended](4)
    reported: list[list[int]] = []
    actor = ModelActor(model, inbox, on_applied=lambda rs, _: reported.append([a.seq for a in rs]))
    # Three groups wait before the actor starts, as they do behind a long apply.
    for seq, user in ((1, "a"), (2, "b"), (4, "c")):
        events = [{"user": user, "item": "x"}] * (2 if seq == 2 else 1)
        payloads = (_payload(events[:1]),) * len(events)
        await send.send(Appended(seq, payloads, f"p{seq}".encode()))
    await send.aclose()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
    assert reported == [[1, 2, 3, 4]]  # one apply, in order
    assert actor.applied_seq == 4 and actor.applied_position == b"p4"
    assert model.stats()["events_applied"] == 4


@pytest.mark.parametrize("report_users", [True, False])
async def test_a_catching_up_actor_merges_up_to_the_replay_bound(
    monkeypatch: pytest.MonkeyPatch, report_users: bool
) -> None:
    """Live, queued groups merge up to ``MERGE_BYTES``; while the engine catches up (no user
    reports) up to the larger ``REPLAY_MERGE_BYTES``, with the same resulting counts."""
    payload = _payload([{"user": "a", "item": "x"}])
    monkeypatch.setattr(model_actor, "MERGE_BYTES", 2 * len(payload))
    monkeypatch.setattr(model_actor, "REPLAY_MERGE_BYTES", 100 * len(payload))
    model = Model(ModelConfig(seed=3))
    send, inbox = trio.open_memory_channel[Appended](8)
    applies: list[list[int]] = []
    actor = ModelActor(
        model,
        inbox,
        on_applied=lambda rs, _: applies.append([a.seq for a in rs]),
        report_users=report_users,
    )
    for seq in range(1, 7):
        await send.send(Appended(seq, (payload,)))
    await send.aclose()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
    if report_users:
        assert applies == [[1, 2], [3, 4], [5, 6]]
    else:
        assert applies == [[1, 2, 3, 4, 5, 6]]
    assert actor.applied_seq == 6 and model.stats()["events_applied"] == 6


def test_replay_chunks_are_bounded_by_bytes_and_note_every_erasure() -> None:
    """A chunk ends once it holds ``max_bytes`` of payloads (at least one record); records
    up to the snapshot are skipped, yet their erase records are still noted."""
    event = _payload([{"user": "a", "item": "x", "id": 1}])
    erase = _payload([{"erase_user": "gone"}])
    records = iter([(1, erase), *((seq, event) for seq in range(2, 12))])
    erasures: dict[str | int, int] = {}
    sizes = []
    while chunk := replay_chunk(records, 3, erasures, max_bytes=3 * len(event)):
        sizes.append([seq for seq, _ in chunk])
    assert sizes == [[4, 5, 6], [7, 8, 9], [10, 11]]
    assert erasures == {"gone": 1}
    one = replay_chunk(iter([(1, event), (2, event)]), 0, {}, max_bytes=1)
    assert [seq for seq, _ in one] == [1]


def test_a_replay_builds_the_model_of_the_live_apply() -> None:
    """``replay=True`` (the engine catching up, ``recover``) only allows more events per
    solve: for groups under the live bound it reports and builds the same model, vectors
    included."""
    events = [{"user": f"u{n % 6}", "item": f"i{n * 5 % 17}", "id": n} for n in range(80)]
    payloads = [
        _payload(events[:40]),
        _payload([{"item": "i2", "category": "c"}, {"erase_user": "u4"}]),
        _payload(events[30:]),
    ]
    live, replayed = Model(ModelConfig(seed=4)), Model(ModelConfig(seed=4))
    expect = apply_records(live, 1, payloads, users=False)
    got = apply_records(replayed, 1, payloads, users=False, replay=True)
    assert [attrs_without_users(a) for a in got] == [attrs_without_users(a) for a in expect]
    # Ids 30..39 come again, but u4's (34) left the redelivery window with its erasure.
    assert got[2].duplicates == 9 and got[1].erased == ("u4",)
    for user in [f"u{n}" for n in range(6)]:
        assert sorted(replayed.seen(user)) == sorted(live.seen(user))
        assert replayed.user_vector(user).tolist() == live.user_vector(user).tolist()
        assert replayed.recommend(user, k=5) == live.recommend(user, k=5)


def test_a_replay_records_in_stages_to_the_same_snapshot(tmp_path: Path) -> None:
    """A replay (``users=False``) records its groups in stages on two threads, the serial
    recording (``users=True``) one record after another: over groups long enough for many
    stage steps, with redeliveries, a refusal, an item write and an erasure inside, both
    write the same snapshot byte for byte."""
    events = [{"user": f"u{n * 7 % 301}", "item": f"i{n * n % 97}", "id": n} for n in range(9000)]
    payloads = [_payload(events[s : s + 100]) for s in range(0, 9000, 100)]
    payloads[20:20] = [
        _payload([*events[100:150], {"user": "u1", "item": "i1", "type": "nope"}]),
        _payload([{"item": "i3", "category": "c", "tags": ["t"]}, {"erase_user": "u14"}]),
    ]
    snapshots = []
    for users in (True, False):
        model = Model(ModelConfig(seed=3))
        applied = apply_records(model, 1, payloads, users=users, replay=True)
        assert sum(a.applied for a in applied) == 9002
        assert sum(a.duplicates for a in applied) == 50
        assert model.stats()["rejected"] == 1
        model.save(tmp_path / f"{users}.rsnap", 1)
        snapshots.append((tmp_path / f"{users}.rsnap").read_bytes())
    assert snapshots[0] == snapshots[1]


@pytest.mark.parametrize("report_users", [True, False])
async def test_alongside_follows_a_small_group_on_the_event_loop(report_users: bool) -> None:
    """What must follow a group (the lists of its users) runs where the group was applied: on
    the event loop for a few events, in the worker thread for more; never while catching up."""
    import threading

    small = _payload([{"user": "a", "item": "x"}])
    large = _payload([{"user": f"u{n}", "item": f"i{n}"} for n in range(40)])
    assert len(small) <= model_actor.INLINE_GROUP_BYTES < len(large)
    loop_thread = threading.get_ident()
    ran: list[tuple[int, bool]] = []
    reported: list[tuple[int, object]] = []

    def alongside(results: list[Applied]) -> str:
        ran.append((results[0].seq, threading.get_ident() == loop_thread))
        return f"lists of {results[0].seq}"

    send, inbox = trio.open_memory_channel[Appended](4)
    actor = ModelActor(
        Model(ModelConfig(seed=3)),
        inbox,
        on_applied=lambda rs, extra: reported.append((rs[0].seq, extra)),
        alongside=alongside,
        report_users=report_users,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await send.send(Appended(1, (small,)))
        await trio.testing.wait_all_tasks_blocked()
        await send.send(Appended(2, (large,)))
        await send.aclose()
    if report_users:
        assert ran == [(1, True), (2, False)]
        assert reported == [(1, "lists of 1"), (2, "lists of 2")]
    else:
        assert ran == []
        assert reported == [(1, None), (2, None)]
