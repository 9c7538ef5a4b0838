"""Tests of the synthetic stream generator (engine._synthetic): determinism and the statistics
it promises, measured on the generated arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from engine._datasets import load_tsv
from engine._synthetic import (
    CHUNK,
    EVENT_TYPES,
    HISTORY,
    TYPE_WEIGHTS,
    Stream,
    SyntheticConfig,
    generate,
    iter_events,
    main,
)

SMALL = SyntheticConfig(n_users=400, n_items=300, n_events=12_000, seed=7)


@pytest.fixture(scope="module")
def default_stream() -> Stream:
    """A stream at the default settings (200k events)."""
    return generate(SyntheticConfig())


def assert_same_events(a: Stream, b: Stream) -> None:
    for name in ("users", "items", "types", "weights", "ts", "true_affinity"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def recent_repeat_flags(users: npt.NDArray[np.int64], items: npt.NDArray[np.int64]):
    """Per event (in a user's order): has the user earlier events, and is the item among the
    user's previous HISTORY items?"""
    order = np.argsort(users, kind="stable")
    u, i = users[order], items[order]
    has_prior = np.r_[False, u[1:] == u[:-1]]
    repeat = np.zeros(len(u), dtype=bool)
    for lag in range(1, HISTORY + 1):
        same_user = np.r_[np.zeros(lag, bool), u[lag:] == u[:-lag]]
        same_item = np.r_[np.zeros(lag, bool), i[lag:] == i[:-lag]]
        repeat |= same_user & same_item
    return has_prior, repeat


def test_same_seed_gives_the_same_stream() -> None:
    a, b = generate(SMALL), generate(SMALL)
    assert_same_events(a, b)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    assert a.item_tags == b.item_tags


def test_different_seeds_differ() -> None:
    a = generate(SMALL)
    b = generate(SyntheticConfig(n_users=400, n_items=300, n_events=12_000, seed=8))
    assert not np.array_equal(a.items, b.items)
    assert not np.array_equal(a.users, b.users)
    assert not np.array_equal(a.item_factors, b.item_factors)


@pytest.mark.parametrize("batch", [1, 777, 5000, 50_000])
def test_batches_concatenate_to_the_generated_stream(batch: int) -> None:
    config = SyntheticConfig(n_users=300, n_items=200, n_events=9_000, seed=3)
    stream = generate(config)
    batches = list(iter_events(config, batch=batch))
    assert all(len(b) == batch for b in batches[:-1])
    assert 0 < len(batches[-1]) <= batch
    for name in ("users", "items", "types", "weights", "ts"):
        joined = np.concatenate([getattr(b, name) for b in batches])
        np.testing.assert_array_equal(joined, getattr(stream, name), err_msg=name)


def test_endless_stream_keeps_going_with_rising_time() -> None:
    config = SyntheticConfig(n_users=300, n_items=200, n_events=None, horizon_events=5_000)
    stream = iter_events(config, batch=4_000)
    batches = [next(stream) for _ in range(4)]  # past the horizon
    ts = np.concatenate([b.ts for b in batches])
    assert len(ts) == 16_000
    assert np.all(np.diff(ts) >= 0)
    assert ts[-1] > ts[0]
    with pytest.raises(ValueError, match="finite n_events"):
        generate(config)


def test_item_popularity_is_heavy_tailed(default_stream: Stream) -> None:
    counts = np.sort(np.bincount(default_stream.items, minlength=default_stream.config.n_items))
    top = counts[::-1][: len(counts) // 100]
    assert top.sum() / len(default_stream) > 0.10
    # ... while the catalog is still broadly explored.
    assert np.mean(counts > 0) > 0.5


def test_user_activity_is_heavy_tailed(default_stream: Stream) -> None:
    counts = np.bincount(default_stream.users, minlength=default_stream.config.n_users)
    active = np.sort(counts[counts > 0])[::-1]
    assert active[: len(active) // 100].sum() / len(default_stream) > 0.05  # uniform: ~0.01
    assert active[0] > 20 * np.median(active)


def test_timestamps_are_non_decreasing_at_the_configured_rate(default_stream: Stream) -> None:
    ts, config = default_stream.ts, default_stream.config
    assert ts.dtype == np.float64
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] >= config.start
    config = SyntheticConfig(n_users=300, n_items=200, n_events=30_000, rate=3.0, diurnal=0.0)
    ts = generate(config).ts
    assert np.all(np.diff(ts) >= 0)
    span = ts[-1] - config.start
    assert span == pytest.approx(len(ts) / config.rate, rel=0.05)


def test_diurnal_modulation_shapes_the_day() -> None:
    config = SyntheticConfig(
        n_users=300, n_items=200, n_events=40_000, rate=0.2, diurnal=0.8, peak_hour=20.0
    )
    stream = generate(config)
    hours = ((stream.ts % 86_400.0) // 3600).astype(int)
    per_hour = np.bincount(hours, minlength=24)
    assert per_hour[19:22].sum() > 4 * per_hour[7:10].sum()  # rate ~1.8 vs ~0.2 of mean
    flat = generate(
        SyntheticConfig(n_users=300, n_items=200, n_events=40_000, rate=0.2, diurnal=0.0)
    )
    flat_hours = np.bincount(((flat.ts % 86_400.0) // 3600).astype(int), minlength=24)
    assert flat_hours.max() < 3 * flat_hours.min()


def test_items_and_users_arrive_during_the_stream(default_stream: Stream) -> None:
    s = default_stream
    n = len(s)
    first = np.full(s.config.n_items, n)
    np.minimum.at(first, s.items, np.arange(n))
    seen = first < n
    assert np.mean(first[seen] > n // 2) > 0.05  # some items appear only in the second half
    # Nothing happens before its item is released or its user joins.
    assert np.all(s.item_release[s.items] <= np.arange(n) + CHUNK)
    assert np.all(s.user_join[s.users] <= np.arange(n) + CHUNK)
    assert np.sum(s.item_release > 0) == round(s.config.n_items * s.config.new_item_fraction)


def test_fresh_items_get_a_popularity_boost(default_stream: Stream) -> None:
    s = default_stream
    n = len(s)
    new = np.flatnonzero((s.item_release > 0) & (s.item_release < n // 2))
    window = n // 20
    released = s.item_release[s.items]
    age = np.arange(n) - released
    is_new = np.isin(s.items, new)
    early = np.sum(is_new & (age < window))
    later = np.sum(is_new & (age >= window) & (age < 2 * window))
    assert early > 1.5 * later


@pytest.mark.parametrize("repeat_prob", [0.15, 0.4])
def test_repeat_rate_is_near_the_configured_probability(repeat_prob: float) -> None:
    base = dict(n_users=2_000, n_items=3_000, n_events=60_000, seed=11)
    has_prior, repeat = recent_repeat_flags(
        *_events(generate(SyntheticConfig(repeat_prob=0.0, **base)))
    )
    organic = repeat[has_prior].mean()
    has_prior, repeat = recent_repeat_flags(
        *_events(generate(SyntheticConfig(repeat_prob=repeat_prob, **base)))
    )
    measured = repeat[has_prior].mean()
    expected = repeat_prob + (1 - repeat_prob) * organic
    assert measured == pytest.approx(expected, abs=0.03)


def _events(stream: Stream) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    return stream.users, stream.items


def test_event_types_follow_a_funnel(default_stream: Stream) -> None:
    counts = np.bincount(default_stream.types, minlength=len(EVENT_TYPES))
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0
    assert counts[0] > 0.5 * len(default_stream)  # most events are views
    # Conversion is likelier for loved items: mean affinity rises along the funnel.
    affinity = [default_stream.true_affinity[default_stream.types == t].mean() for t in range(4)]
    assert affinity[0] < affinity[1] < affinity[2] < affinity[3]
    np.testing.assert_array_equal(default_stream.weights, TYPE_WEIGHTS[default_stream.types])
    assert default_stream.weights.dtype == np.float32


def test_planted_structure_predicts_the_next_item(default_stream: Stream) -> None:
    """A user's held-out last item has a higher true affinity than a popular item drawn at
    random: there is signal for a model to learn."""
    s = default_stream
    last = np.full(s.config.n_users, -1)
    last[s.users] = np.arange(len(s))  # later events overwrite earlier ones
    counts = np.bincount(s.users, minlength=s.config.n_users)
    users = np.flatnonzero(counts >= 3)
    held_out = s.items[last[users]]
    popularity = np.bincount(s.items, minlength=s.config.n_items).astype(float)
    rng = np.random.default_rng(0)
    popular = rng.choice(len(popularity), size=len(users), p=popularity / popularity.sum())
    taste = s.user_factors[users]
    true_next = np.einsum("nd,nd->n", taste, s.item_factors[held_out])
    random_popular = np.einsum("nd,nd->n", taste, s.item_factors[popular])
    assert true_next.mean() > random_popular.mean() + 0.2
    assert np.mean(true_next > random_popular) > 0.7


def test_catalog_has_categories_and_tags(default_stream: Stream) -> None:
    s = default_stream
    assert s.item_category.shape == (s.config.n_items,)
    assert s.item_category.min() >= 0 and s.item_category.max() < s.config.n_categories
    assert len(s.item_tags) == s.config.n_items
    assert all(1 <= len(tags) <= 4 and len(set(tags)) == len(tags) for tags in s.item_tags)
    assert max(len(tags) for tags in s.item_tags) == 4
    # Items sit near their own category's centroid.
    distances = np.linalg.norm(s.item_factors[:, None, :] - s.category_factors[None, :, :], axis=2)
    assert np.mean(distances.argmin(axis=1) == s.item_category) > 0.8


def test_tastes_drift_away_from_where_they_started() -> None:
    base = dict(n_users=500, n_items=400, n_events=30_000, seed=9)
    still = generate(SyntheticConfig(drift=0.0, **base))
    moving = generate(SyntheticConfig(drift=0.8, **base))
    # Same seed, same planted world: without drift a user's taste stays where it started.
    np.testing.assert_array_equal(still.item_factors, moving.item_factors)
    last = np.full(500, -1)
    last[moving.users] = np.arange(len(moving))
    active = np.flatnonzero(last >= 0)
    moved = np.linalg.norm(moving.user_factors - still.user_factors, axis=1)
    assert np.all(moved[last < 0] == 0)  # no events, no update
    # The walk goes further the longer a user has been around.
    elapsed = (last[active] - moving.user_join[active]) / len(moving)
    late, early = moved[active][elapsed > 0.5], moved[active][elapsed < 0.1]
    assert late.mean() > 1.5 * early.mean() > 0
    # Mean-reverting walk: after a time t (in horizons) the deviation has spread
    # drift * sqrt(1 - exp(-2 t)) (as a vector norm, tastes having norm about 1).
    predicted = 0.8 * np.sqrt(1 - np.exp(-2 * elapsed))
    assert moved[active].mean() == pytest.approx(predicted.mean(), rel=0.15)


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="repeat_prob"):
        SyntheticConfig(repeat_prob=1.0)
    with pytest.raises(ValueError, match="n_items"):
        SyntheticConfig(n_items=0)
    with pytest.raises(ValueError, match="funnel"):
        SyntheticConfig(funnel=(0.5, 0.5))
    with pytest.raises(ValueError, match="batch"):
        next(iter_events(SMALL, batch=0))


def test_cli_writes_a_loadable_tsv(tmp_path: Path) -> None:
    out = tmp_path / "stream.tsv"
    assert (
        main(
            [
                "--events",
                "3000",
                "--users",
                "100",
                "--items",
                "80",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_text().startswith("#")
    loaded = load_tsv(out)
    expected = generate(SyntheticConfig(n_events=3000, n_users=100, n_items=80, seed=5))
    np.testing.assert_array_equal(loaded.users, expected.users)
    np.testing.assert_array_equal(loaded.items, expected.items)
    np.testing.assert_array_equal(loaded.ts, expected.ts)
