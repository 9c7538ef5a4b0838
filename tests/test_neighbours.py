"""The item-neighbourhood scoring term, through ``engine.Model`` (the real extension)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Model, ModelConfig

# Event times are unix seconds; the model refuses times before 1990.
T0 = 1_700_000_000.0

PAIRS = 40  # users who took both items of a pair


def _planted(**config: object) -> Model:
    """Items 1 and 2 go together, 3 and 4 go together; item 9 is the most popular by far,
    taken alone by many users, so trending and the factorization of a one-event user
    both lean towards it."""
    m = Model(ModelConfig(auto_reindex=False, seed=3, **config))  # type: ignore[arg-type]
    users, items, ts = [], [], []
    t = T0
    for u in range(PAIRS):
        for a, b in ((1, 2), (3, 4)):
            for i in (a, b):
                users.append(f"p{a}-{u}")
                items.append(i)
                ts.append(t)
                t += 1.0
    for u in range(3 * PAIRS):
        users.append(f"solo-{u}")
        items.append(9)
        ts.append(t)
        t += 1.0
    m.ingest(users, items, ts=ts)
    m.fit(5)
    return m


def test_a_new_user_with_one_event_gets_the_co_occurring_item_on_top() -> None:
    # The neighbourhood alone (no factorization share, no trending blend): the item that
    # co-occurs with the user's one item comes first, and the explanation names that item.
    m = _planted(neighbour_weight=1.0, cold_start_events=0.0)
    m.ingest(["new"], [1], ts=[T0 + 1e6])
    top = m.recommend("new", k=3, explain=True)
    assert top[0][0] == 2 and top[0][2] == [1], top
    # Same on the batch path and with diversity re-ranking on.
    assert m.recommend_batch(["new"], k=3)[0][0][0] == 2
    assert m.recommend("new", k=3, diversity=0.5)[0][0] == 2
    m.ingest(["other"], [3], ts=[T0 + 1e6 + 1])
    assert m.recommend("other", k=1)[0][0] == 4


def test_with_the_defaults_the_co_occurring_item_follows_only_the_trending_one() -> None:
    """Defaults blend the neighbourhood with the factorization and, for one event, trending
    at equal weight: the most popular item keeps the first slot, the co-occurring item takes
    the second, ahead of the items of the other pair."""
    m = _planted()
    m.ingest(["new"], [1], ts=[T0 + 1e6])
    top = [item for item, _ in m.recommend("new", k=3)]
    assert top[:2] == [9, 2], top


def test_erasing_the_users_who_made_a_pair_removes_the_pair() -> None:
    m = _planted(neighbour_weight=1.0, cold_start_events=0.0)
    for u in range(PAIRS):
        assert m.erase_user(f"p1-{u}")
    m.ingest(["new"], [1], ts=[T0 + 1e6])
    # Item 2 has no users left, so nothing co-occurs with item 1 any more: no candidate has
    # neighbourhood evidence, and item 2 scores no higher than any other.
    scores = dict(m.recommend("new", k=5))
    assert 2 not in scores or scores[2] <= min(scores.values())


def test_counts_are_rebuilt_after_a_snapshot_load(tmp_path: Path) -> None:
    weight = ModelConfig().neighbour_weight
    if weight == 0.0:
        pytest.skip("the neighbourhood term is off by default; snapshots keep the default")
    m = _planted()
    m.ingest(["new"], [1], ts=[T0 + 1e6])
    before = m.recommend("new", k=3)
    path = tmp_path / "model.snap"
    m.save(path, wal_seq=1)
    loaded = Model.load(path)
    assert loaded.recommend("new", k=3) == before


@pytest.mark.parametrize("bad", [{"neighbour_weight": 1.5}, {"neighbour_cap": 0}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="neighbour"):
        Model(ModelConfig(**bad))  # type: ignore[arg-type]
