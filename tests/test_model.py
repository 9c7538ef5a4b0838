"""The Python face of the Rust model: behaviour, bad input, persistence, GIL release."""

from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
import trio

import engine
from engine import (
    CorruptSnapshot,
    IncompleteFrame,
    InvalidEvent,
    InvalidFrame,
    Model,
    ModelConfig,
    UnknownItem,
)

T0 = 1_700_000_000.0


def planted(n_users: int = 300, n_items: int = 200, per_user: int = 20, seed: int = 1) -> tuple:
    """Users in two taste groups: even users like even items, odd users odd items."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        pool = np.arange(u % 2, n_items, 2)
        for i in rng.choice(pool, size=per_user, replace=False):
            users.append(u)
            items.append(int(i))
    return np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)


def small_model(**kw: object) -> Model:
    cfg = ModelConfig(dim=16, seed=3, **kw)  # type: ignore[arg-type]
    return Model(cfg)


def test_public_surface() -> None:
    for name in engine.__all__:
        assert hasattr(engine, name), name
    assert engine._core.BUILD_PROFILE in ("release", "debug")


def test_learns_planted_groups_and_excludes_seen() -> None:
    users, items = planted()
    m = small_model()
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(10)
    hits = 0
    for u in range(0, 300, 7):
        recs = m.recommend(u, k=10)
        assert len(recs) == 10
        seen = set(m.seen(u))
        assert not seen & {i for i, _ in recs}, "seen items must be excluded by default"
        hits += sum(1 for i, _ in recs if i % 2 == u % 2)
        scores = [s for _, s in recs]
        assert scores == sorted(scores, reverse=True)
    # Almost every recommended item is from the user's own taste group.
    assert hits / (10 * len(range(0, 300, 7))) > 0.9


def test_online_event_moves_the_user_towards_the_item() -> None:
    users, items = planted()
    m = small_model()
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(5)
    before = dict(m.recommend(0, k=200, exclude_seen=False, exact=True))
    # User 0 (even group) interacts repeatedly with odd item 1.
    m.ingest([0] * 5, [1] * 5, types=["purchase"] * 5, ts=[T0 + 1] * 5)
    after = dict(m.recommend(0, k=200, exclude_seen=False, exact=True))
    assert after[1] > before.get(1, -math.inf)


def test_unknown_user_gets_trending_under_filters() -> None:
    m = small_model()
    m.upsert_item("a", category="books")
    m.upsert_item("b", category="films")
    m.ingest(["u1", "u2", "u3"], ["a", "a", "b"], ts=[T0] * 3)
    recs = m.recommend("nobody", k=5)
    assert [i for i, _ in recs] == ["a", "b"]
    assert [i for i, _ in m.recommend("nobody", k=5, category="films")] == ["b"]
    assert m.recommend("nobody", k=5, category="no-such-category") == []
    assert [i for i, _ in m.trending(k=1)] == ["a"]


def test_filters_exclude_list_category_and_unavailable() -> None:
    users, items = planted(n_items=60)
    m = small_model()
    for i in range(60):
        m.upsert_item(int(i), category="even" if i % 2 == 0 else "odd")
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(3)
    recs = [i for i, _ in m.recommend(2, k=20, exclude_seen=False)]
    banned = recs[:3]
    got = [i for i, _ in m.recommend(2, k=20, exclude_seen=False, exclude=banned)]
    assert not set(banned) & set(got)
    assert all(i % 2 == 1 for i, _ in m.recommend(2, k=10, category="odd"))
    m.upsert_item(got[0], available=False)
    assert got[0] not in [i for i, _ in m.recommend(2, k=30, exclude_seen=False)]
    assert got[0] not in [i for i, _ in m.recommend(2, k=30, exclude_seen=False, exact=True)]


def test_explanations_name_past_items() -> None:
    users, items = planted()
    m = small_model()
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(5)
    recs = m.recommend(4, k=5, explain=True)
    seen = set(m.seen(4))
    for item, _score, because in recs:
        assert 1 <= len(because) <= 3
        assert set(because) <= seen
        assert item not in because


def test_similar_items_come_from_the_same_group() -> None:
    users, items = planted()
    m = small_model()
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(10)
    sims = m.similar(10, k=10)
    assert len(sims) == 10 and 10 not in [i for i, _ in sims]
    assert sum(1 for i, _ in sims if i % 2 == 0) >= 9
    with pytest.raises(UnknownItem):
        m.similar("never-seen")


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"weights": [1.0, float("nan")]}, InvalidEvent),
        ({"weights": [1.0, -2.0]}, InvalidEvent),
        ({"weights": [1.0, 0.0]}, InvalidEvent),
        ({"weights": [1.0, float("inf")]}, InvalidEvent),
        ({"types": ["click", "teleport"]}, InvalidEvent),
        ({"ts": [T0, float("nan")]}, InvalidEvent),
    ],
)
def test_bad_values_raise_and_leave_model_unchanged(kwargs: dict, exc: type) -> None:
    m = small_model()
    m.ingest(["x"], ["y"], ts=[T0])
    before = m.stats()
    vec = m.user_vector("x")
    with pytest.raises(exc):
        m.ingest(["x", "x"], ["z", "w"], **kwargs)
    assert m.stats() == before
    assert m.item_vector("z") is None
    np.testing.assert_array_equal(m.user_vector("x"), vec)


@pytest.mark.parametrize(
    ("users", "exc"),
    [
        (["a" * 257], InvalidEvent),
        ([""], InvalidEvent),
        ([2**70], InvalidEvent),
        ([True], TypeError),
        ([1.5], TypeError),
        ([None], TypeError),
    ],
)
def test_bad_ids_raise_typed_errors(users: list, exc: type) -> None:
    m = small_model()
    with pytest.raises(exc):
        m.ingest(users, ["item"])
    assert m.stats()["events_applied"] == 0


def test_mismatched_lengths_and_bad_config() -> None:
    m = small_model()
    with pytest.raises(ValueError):
        m.ingest(["a", "b"], ["x"])
    with pytest.raises(ValueError):
        m.recommend("a", k=0)
    with pytest.raises(ValueError):
        Model({"dimm": 3})
    with pytest.raises(ValueError):
        Model({"event_weights": {"view": -1.0}})


def test_duplicate_event_ids_apply_once_per_producer() -> None:
    m = small_model()
    r1 = m.ingest(["u", "u"], ["a", "b"], ids=["e1", "e2"], producer="p", ts=[T0, T0])
    r2 = m.ingest(["u", "u"], ["a", "c"], ids=["e1", "e3"], producer="p", ts=[T0, T0])
    r3 = m.ingest(["u"], ["a"], ids=["e1"], producer="other", ts=[T0])
    assert (r1["applied"], r2["applied"], r2["duplicates"], r3["applied"]) == (2, 1, 1, 1)
    assert m.stats()["events_applied"] == 4


def _forward(tag: str, entries: list, option: dict | None = None) -> bytes:
    msg: list = [tag, entries]
    if option is not None:
        msg.append(option)
    return msgpack.packb(msg, use_bin_type=True)


def test_ingest_forward_applies_good_records_and_reports_bad_ones() -> None:
    m = small_model()
    frame = _forward(
        "app",
        [
            [int(T0), {"user": "u1", "item": "i1", "type": "click"}],
            [int(T0), {"user": "u1", "item": "i2", "weight": float("nan")}],
            [int(T0), {"item": "i3", "category": "c", "tags": ["x"]}],
            [int(T0), {"user": "u2", "item": "i1", "type": "unknown-type"}],
        ],
        {"chunk": "abc"},
    )
    checked = m.check_frame(frame)
    assert checked is not None
    assert checked["used"] == len(frame) and checked["chunk"] == "abc" and checked["tag"] == "app"
    assert [i for i, _ in checked["rejected"]] == [1, 3]
    assert m.stats()["events_applied"] == 0, "check_frame changes nothing"
    report = m.ingest_forward(frame)
    assert report["applied"] == 2  # one interaction and one item upsert
    assert [i for i, _ in report["rejected"]] == [1, 3]
    assert report["chunk"] == "abc" and report["consumed"] == len(frame)
    assert m.seen("u1") == ["i1"]
    assert m.check_frame(frame[:-3]) is None
    with pytest.raises(IncompleteFrame):
        m.ingest_forward(frame[:-3])
    with pytest.raises(InvalidFrame):
        m.ingest_forward(b"\xc1" + frame)


def test_erase_user_forgets_everything() -> None:
    users, items = planted()
    m = small_model()
    m.ingest(users, items, ts=np.full(len(users), T0))
    assert m.erase_user(5)
    assert m.user_vector(5) is None and m.seen(5) == []
    assert not m.erase_user(5)
    # An erased user who comes back starts from scratch (gets trending).
    assert m.recommend(5, k=3) == m.trending(k=3)


def test_snapshot_round_trip_is_identical(tmp_path) -> None:
    users, items = planted()
    m = small_model()
    m.upsert_item(3, category="c", tags=["t"])
    m.ingest(users, items, ts=np.full(len(users), T0), ids=list(range(len(users))), producer="p")
    m.fit(3)
    path = tmp_path / "m.rsnap"
    m.save(path, wal_seq=17)
    m2 = Model.load(path)
    assert m2.loaded_wal_seq == 17
    assert m2.stats() == m.stats()
    for u in (0, 1, 99):
        assert m2.recommend(u, k=10) == m.recommend(u, k=10)
        np.testing.assert_array_equal(m2.user_vector(u), m.user_vector(u))
    # The redelivery window came along: an old id is still a duplicate.
    assert m2.ingest([0], [1], ids=[0], producer="p", ts=[T0])["duplicates"] == 1
    # Same events afterwards give the same model.
    m.ingest([0], [7], ts=[T0 + 5])
    m2.ingest([0], [7], ts=[T0 + 5])
    np.testing.assert_array_equal(m2.user_vector(0), m.user_vector(0))


def test_damaged_snapshot_is_refused(tmp_path) -> None:
    m = small_model()
    m.ingest(["a"], ["b"], ts=[T0])
    path = tmp_path / "m.rsnap"
    m.save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.rsnap"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot):
        Model.load(bad)
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptSnapshot):
        Model.load(bad)
    with pytest.raises(OSError):
        Model.load(tmp_path / "missing.rsnap")


def test_numpy_and_sequence_inputs_agree() -> None:
    users, items = planted(n_users=50)
    a, b = small_model(), small_model()
    a.ingest(users, items, ts=np.full(len(users), T0))
    b.ingest([int(u) for u in users], [int(i) for i in items], ts=[T0] * len(users))
    np.testing.assert_array_equal(a.user_vector(3), b.user_vector(3))


async def test_long_call_in_a_thread_keeps_trio_ticking() -> None:
    """fit() releases the GIL: the event loop keeps running while it works."""
    users, items = planted(n_users=3000, n_items=2000, per_user=40)
    m = Model(ModelConfig(dim=64, seed=1))
    m.ingest(users, items, ts=np.full(len(users), T0))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        started = time.perf_counter()
        await trio.to_thread.run_sync(m.fit, 3)
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    assert elapsed > 0.05, "the call should be long enough to observe"
    # A blocked loop would tick once or twice; a free one about once per millisecond.
    assert ticks > elapsed * 1000 * 0.2
