"""The Python face of the Rust model: behaviour, bad input, persistence, GIL release."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import attrs
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


# --- recommendation features -------------------------------------------------------------


def _groups_with_hits(**kw: object) -> Model:
    """Planted taste groups plus ten hit items (180..189) a crowd of 150 users interacted with
    more recently, so the trending list and the personal lists disagree."""
    users, items = planted()
    m = small_model(**kw)
    m.ingest(users, items, ts=np.full(len(users), T0))
    crowd = [f"c{n}" for n in range(150) for _ in range(10)]
    hits = [180 + j for _ in range(150) for j in range(10)]
    m.ingest(crowd, hits, ts=np.full(len(crowd), T0 + 10))
    m.fit(5)
    return m


def test_cold_start_blends_trending_and_moves_to_personal() -> None:
    # The blend alone: the neighbourhood term off on both sides.
    blended = _groups_with_hits(cold_start_events=5, neighbour_weight=0.0)
    personal = _groups_with_hits(cold_start_events=0, neighbour_weight=0.0)  # no blend
    trending = [i for i, _ in blended.trending(k=10)]
    assert set(trending) == set(range(180, 190))

    def top(m: Model) -> list:
        return [i for i, _ in m.recommend("newbie", k=10)]

    def overlap(a: list, b: list) -> int:
        return len(set(a) & set(b))

    # One event (beta = 5/6): mostly trending.
    for m in (blended, personal):
        m.ingest(["newbie"], [2], ts=[T0 + 20])
    first = top(blended)
    assert overlap(first, trending) >= 7, first
    assert overlap(top(personal), trending) <= 3, top(personal)
    # Many events (beta = 5/125): mostly personal.
    acted = [int(i) for i in range(0, 120, 2)] * 2
    for m in (blended, personal):
        m.ingest(["newbie"] * len(acted), acted, ts=np.full(len(acted), T0 + 30))
    later = top(blended)
    assert overlap(later, top(personal)) >= 8, (later, top(personal))
    assert overlap(later, trending) < overlap(first, trending)
    # Unknown users: pure trending.
    assert [i for i, _ in blended.recommend("stranger", k=10)] == trending


def _categorised(**kw: object) -> Model:
    users, items = planted(n_users=200, n_items=40, per_user=10)
    m = small_model(**kw)
    for i in range(40):
        m.upsert_item(i, category="even" if i % 2 == 0 else "odd")
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(10)
    return m


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_new_item_gets_a_vector_from_its_category() -> None:
    m = _categorised(cold_start_events=0)  # rank by the vectors alone
    m.upsert_item("new", category="even")
    even = np.mean([m.item_vector(i) for i in range(0, 40, 2)], axis=0)
    odd = np.mean([m.item_vector(i) for i in range(1, 40, 2)], axis=0)
    assert _cosine(m.item_vector("new"), even) > 0.95
    # 10 even items are unseen by each even user; the new one joins them, above every odd
    # item. Odd users' lists (their 10 unseen odd items) never hold it.
    for u in range(0, 200, 2):
        assert "new" in [i for i, _ in m.recommend(u, k=11)], u
    for u in range(1, 200, 2):
        assert "new" not in [i for i, _ in m.recommend(u, k=10)], u
    # Feedback takes over: odd users interacting with it pull it to the odd cluster.
    fans = list(range(1, 61, 2))
    m.ingest(fans * 3, ["new"] * 90, types=["purchase"] * 90, ts=np.full(90, T0 + 1))
    v = m.item_vector("new")
    assert _cosine(v, odd) > _cosine(v, even)


def test_category_exclusion() -> None:
    m = _categorised()
    got = [i for i, _ in m.recommend(2, k=15, exclude_category=["odd"])]
    assert len(got) == 10 and all(i % 2 == 0 for i in got)  # only the unseen even items
    assert m.recommend(2, k=5, exclude_category=["odd", "even"]) == []
    # An unknown category excludes nothing; exclusion applies to trending users too.
    assert len(m.recommend(2, k=15, exclude_category=["films"])) == 15
    assert all(i % 2 == 1 for i, _ in m.recommend("nobody", k=10, exclude_category=["even"]))
    with pytest.raises(TypeError):
        m.recommend(2, exclude_category="odd")


def _mean_pairwise_cosine(m: Model, items: list) -> float:
    vs = [m.item_vector(i) for i in items]
    sims = [_cosine(vs[a], vs[b]) for a in range(len(vs)) for b in range(a + 1, len(vs))]
    return float(np.mean(sims))


def test_diversity_spreads_the_list_and_keeps_the_first_item() -> None:
    users, items = planted()
    m = small_model(cold_start_events=0)
    m.ingest(users, items, ts=np.full(len(users), T0))
    m.fit(10)
    drops = []
    for u in range(0, 40, 3):
        plain = m.recommend(u, k=10)
        diverse = m.recommend(u, k=10, diversity=0.3)
        assert len(diverse) == 10 and diverse[0] == plain[0]
        assert diverse != plain
        drops.append(
            _mean_pairwise_cosine(m, [i for i, _ in plain])
            - _mean_pairwise_cosine(m, [i for i, _ in diverse])
        )
    assert min(drops) > 0, drops
    # The global default applies when the request names none; 1.0 is plain ranking.
    m2 = small_model(cold_start_events=0, diversity=0.3)
    m2.ingest(users, items, ts=np.full(len(users), T0))
    m2.fit(10)
    assert m2.recommend(3, k=10) == m.recommend(3, k=10, diversity=0.3)
    assert m2.recommend(3, k=10, diversity=1.0) == m.recommend(3, k=10)
    with pytest.raises(ValueError):
        m.recommend(3, diversity=1.5)
    with pytest.raises(ValueError):
        small_model(diversity=-0.1)


def test_exploration_slots_hold_fresh_items_and_are_flagged() -> None:
    users, items = planted()
    m = small_model(explore_max_events=3)
    m.ingest(users, items, ts=np.full(len(users), T0))
    # Twenty fresh items with one or two events each.
    fresh = [f"f{n}" for n in range(20)]
    m.ingest([f"x{n}" for n in range(20)], fresh, ts=np.full(20, T0 + 1))
    m.ingest(["y"] * 5, fresh[:5], ts=np.full(5, T0 + 2))
    m.fit(5)
    for u in range(0, 300, 37):
        recs = m.recommend(u, k=10, exploration=0.2, detail=True)
        assert len(recs) == 10
        flagged = [r["item"] for r in recs if r["explore"]]
        assert len(flagged) == 2 and set(flagged) <= set(fresh), recs
        assert [r["explore"] for r in recs].index(True) > 0  # not in the top slot
        assert recs == m.recommend(u, k=10, exploration=0.2, detail=True)  # deterministic
        plain = m.recommend(u, k=10, detail=True)
        assert not any(r["explore"] for r in plain)
        assert not set(fresh) & {r["item"] for r in plain}
    # Explored items are also sampled per user, not one fixed pair for everyone.
    picks = {
        tuple(r["item"] for r in m.recommend(u, k=10, exploration=0.2, detail=True) if r["explore"])
        for u in range(0, 300, 37)
    }
    assert len(picks) > 1
    # Items with three events or more are no longer fresh.
    m.ingest(["z"] * 20, fresh * 1, ts=np.full(20, T0 + 3))
    recs = m.recommend(4, k=10, exploration=0.2, detail=True)
    assert not {r["item"] for r in recs if r["explore"]} & set(fresh[:5])


# --- reasons and score scale -------------------------------------------------------------

REASONS = {"similar_to_history", "similar_users", "trending", "new_item", "exploration"}


def test_every_explained_item_has_a_reason() -> None:
    m = _groups_with_hits()
    m.upsert_item("fresh", tags=["t"], category="books")
    m.ingest(["newbie"], [2], ts=[T0 + 20])

    def detail(user: object, **kw: object) -> list[dict]:
        return m.recommend(user, k=10, explain=True, detail=True, **kw)  # type: ignore[no-any-return]

    for user in ("stranger", "newbie", 4):
        for rec in detail(user, exploration=0.3):
            assert rec["reason"] in REASONS, rec
            # An exploration slot says so first (it may also have supporting items).
            assert rec["explore"] == (rec["reason"] == "exploration"), rec
            # Nothing is left unexplained: an empty `because` always has another reason.
            if rec["reason"] == "similar_to_history":
                assert rec["because"], rec
    assert {r["reason"] for r in detail("stranger")} == {"trending"}
    # One event: the top of the list is the crowd's hits, and it says so (even where one of
    # the user's items happens to point at it too).
    top = detail("newbie")[0]
    assert top["reason"] == "trending", top
    # A settled user's own taste explains the list.
    assert detail(4)[0]["reason"] == "similar_to_history"
    # Without explain there is no reason either (the tuple and dict forms stay as they were).
    assert "reason" not in m.recommend(4, k=3, detail=True)[0]


def test_trending_scores_are_relative_to_the_most_popular_item() -> None:
    m = _groups_with_hits()
    scores = [s for _, s in m.trending(k=200)]
    assert scores[0] == pytest.approx(1.0)
    assert all(0.0 < s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    # Unknown users get the same scale, and a filter does not change an item's score.
    assert m.recommend("stranger", k=200) == m.trending(k=200)
    m.upsert_item(181, category="hits")
    (hit, score), *_ = m.recommend("stranger", k=5, category="hits")
    assert hit == 181 and score == pytest.approx(dict(m.trending(k=200))[181])


def test_model_without_a_config_uses_model_config_defaults() -> None:
    """One set of defaults: the extension's, which ``ModelConfig`` reads."""
    assert Model().config() == attrs.asdict(ModelConfig())
    assert Model(ModelConfig()).config() == engine._core.default_config()
    users, items = planted(n_users=40, per_user=5)
    a, b = Model(), Model(ModelConfig())
    for m in (a, b):
        m.ingest(users, items, ts=np.full(len(users), T0))
    for u in (0, 1, 17):
        assert np.array_equal(a.user_vector(u), b.user_vector(u))


def test_a_refusal_is_counted_once_in_a_large_frame() -> None:
    m = small_model()
    recs = [{"user": f"u{n % 9}", "item": f"i{n}", "type": "click"} for n in range(100)]
    recs[70]["type"] = "no-such-type"
    frame = msgpack.packb(["t", [[int(T0), r] for r in recs]])
    report = m.ingest_forward(frame)
    assert [i for i, _ in report["rejected"]] == [70]
    assert (m.stats()["rejected"], m.stats()["events_applied"]) == (1, 99)


async def test_event_loop_keeps_ticking_while_a_snapshot_and_a_writer_run(tmp_path: Path) -> None:
    """A snapshot of a large model with a writer waiting behind it must not stall an event
    loop that reads the model's counters (as /metrics and /v1/stats do)."""
    n = 100_000
    model = Model(ModelConfig(dim=64, auto_reindex=False, dedup_window=0))
    rng = np.random.default_rng(3)
    model.ingest(np.arange(n, dtype=np.int64), rng.integers(0, 3000, n).astype(np.int64))
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            users = np.arange(k, k + 32, dtype=np.int64) % n
            model.ingest(users, rng.integers(0, 3000, 32).astype(np.int64))
            k += 32

    saves: list[float] = []

    def snapshots() -> None:
        for _ in range(3):
            started = time.perf_counter()
            model.save(tmp_path / "snap.rsnap")
            saves.append(time.perf_counter() - started)

    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while True:
            started = time.perf_counter()
            model.stats()
            await trio.sleep(0.002)
            worst = max(worst, time.perf_counter() - started)

    thread = threading.Thread(target=writer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        thread.start()
        try:
            await trio.to_thread.run_sync(snapshots)
        finally:
            stop.set()
            thread.join()
        nursery.cancel_scope.cancel()
    # Liveness, not speed: a stalled loop waits out a whole serialisation.
    assert worst < min(saves) / 2, (worst, saves)
