"""Synthetic interaction streams with planted structure, deterministic under a seed.

Tests, the server's demo mode and every benchmark run on these streams, so they try to look like
real implicit feedback rather than uniform noise:

* **Planted latent factors.** Users and items have true vectors in ``true_dim`` dimensions.
  Every item belongs to one of ``n_categories`` categories and carries 1-4 tags; its vector is
  its category's centroid plus a share of its tags' vectors plus noise, so attributes predict
  taste (what cold start relies on). A user's taste is centred on 1-3 favourite categories.
* **Popularity times affinity.** An event of user ``u`` picks item ``i`` with probability
  proportional to ``exp(affinity(u, i) / temperature) * popularity(i)``, where popularity is a
  Zipf law over a random ranking of the items, boosted while an item is fresh and decaying
  with its age.
* **Arrivals.** Part of the users and of the catalog exist at the start; the rest join or are
  released uniformly over the stream (over ``horizon_events`` for an endless stream).
* **Heavy-tailed activity.** Each user has a lognormal activity level; events pick their user
  in proportion to it among the users who have joined.
* **Drift.** A user's taste follows a mean-reverting random walk (Ornstein-Uhlenbeck) around
  its starting point; an item's popularity decays with its age.
* **Repeat consumption.** With probability ``repeat_prob`` an event re-interacts with one of
  the user's last :data:`HISTORY` items.
* **A funnel.** Each event is a view, click, cart or purchase; conversion to the next stage is
  likelier the higher the item's affinity is relative to the items the user was choosing from.
* **Timestamps.** A Poisson process of ``rate`` events per second from ``start``, optionally
  modulated over the day; non-decreasing.

Time inside the generator is the *progress* ``p = event index / horizon`` (``horizon`` is
``n_events``, or ``horizon_events`` for an endless stream), so a 20k-event test stream and a
10M-event benchmark stream have the same shape; only the wall-clock timestamps depend on
``rate``.

**Choosing an item without scanning the catalog.** Evaluating the softmax over all items per
event costs O(n_items); instead each event samples a candidate pool and resamples from it
(sampling-importance-resampling, Rubin 1988). The pool is ``candidates_popular`` items drawn
by popularity (from a reservoir of popularity draws refreshed 256 times per horizon) plus
``candidates_uniform`` items drawn uniformly from the released catalog (16 of them from the
items released within the last three ``fresh_window``), and the winner is drawn
from ``softmax(affinity / temperature + log popularity - log q)`` over the pool, where ``q`` is
the probability that the pool's proposal mixture draws the item. The ``- log q`` term corrects
for the proposal, so as the pool grows the choice tends to the full-catalog softmax; the
uniform part lets a long-tail item the user loves be found at all. To vectorise, the
:data:`GROUP` consecutive events of a chunk share one pool (one small matrix product).

Generation runs in chunks whose size depends only on the config (``horizon / 256``, clamped
to 256..:data:`CHUNK` events: small enough that arrivals and drift, updated once per chunk,
stay smooth in a short test stream), never on the batch size asked of :func:`iter_events`;
so ``generate(config)`` equals the concatenation of ``iter_events(config, batch=b)`` for
every ``b``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from ._model import DEFAULT_EVENT_WEIGHTS

__all__ = [
    "EVENT_TYPES",
    "EventBatch",
    "Stream",
    "SyntheticConfig",
    "generate",
    "iter_events",
    "write_tsv",
]

#: Event types, in funnel order; ``Stream.types`` holds indices into this tuple.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase")

#: Weight of each event type, indexed like :data:`EVENT_TYPES` (the model's defaults).
TYPE_WEIGHTS: npt.NDArray[np.float32] = np.array(
    [DEFAULT_EVENT_WEIGHTS[t] for t in EVENT_TYPES], dtype=np.float32
)

#: Most events generated per internal step; the step never depends on batch sizes.
CHUNK = 2048
#: Fewest events per internal step (short streams use smaller steps than :data:`CHUNK`).
MIN_CHUNK = 256
#: Consecutive events sharing one candidate pool.
GROUP = 16
#: Recent items remembered per user for repeat consumption.
HISTORY = 8
#: Reservoir of popularity draws the popular candidates come from.
RESERVOIR = 1 << 16
#: Reservoir refreshes per horizon (at most one per four chunks); popularity changes slowly
#: compared to this, and the resampling weights stay exact between refreshes.
REFRESHES = 256

#: Candidate pools are sampled from in blocks of this many (their size is a multiple of it).
_BLOCK = 16

_DAY = 86_400.0

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _fraction(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


def _optional_positive(instance: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


def _funnel(instance: Any, attribute: attrs.Attribute[Any], value: tuple[float, ...]) -> None:
    if len(value) != len(EVENT_TYPES) - 1 or not all(0.0 < v < 1.0 for v in value):
        raise ValueError(f"funnel must hold {len(EVENT_TYPES) - 1} rates in (0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class SyntheticConfig:
    """Shape of a synthetic stream. Same config, same stream, byte for byte.

    Attributes:
        n_users: Users over the whole stream (some join later, see ``new_user_fraction``).
        n_items: Items over the whole stream (some are released later).
        n_events: Events to generate; None for an endless stream (demo mode).
        true_dim: Dimensions of the planted factors.
        n_categories: Item categories; items of a category share a centroid.
        zipf: Exponent of the popularity law: the item of rank ``r`` has base popularity
            ``r ** -zipf``. 0 makes every item equally popular.
        temperature: Divides the affinity in the choice softmax: lower makes users pickier,
            higher makes popularity dominate.
        repeat_prob: Chance that an event re-interacts with one of the user's recent items.
        drift: How far a user's taste wanders from where it started, in the units of the
            tastes (whose norm is about 1): after ``t`` horizons the deviation has norm about
            ``drift * sqrt(1 - exp(-2 t))`` (a mean-reverting Ornstein-Uhlenbeck walk, updated
            exactly at each of the user's events). 0 keeps tastes fixed.
        new_user_fraction: Share of the users that join during the stream rather than before.
        new_item_fraction: Share of the catalog released during the stream rather than before.
        fresh_boost: Extra popularity multiplier of a just-released item (it gets
            ``1 + fresh_boost`` times its base popularity, fading over ``fresh_window``).
        fresh_window: How long, as a fraction of the horizon, the freshness boost lasts (e-fold).
        age_decay: Popularity decays as ``exp(-age_decay * age)``, age in horizons.
        activity_sigma: Sigma of the lognormal activity of users; larger is more heavy-tailed.
        funnel: Conversion rates view->click, click->cart, cart->purchase for an item of
            average affinity among those the user considered.
        funnel_affinity: Change of the conversion log-odds per standard deviation of relative
            affinity: how much more a loved item converts.
        rate: Mean events per second.
        start: Unix time of the stream's start.
        diurnal: Amplitude of the daily rate modulation in [0, 1): the rate swings between
            ``rate * (1 - diurnal)`` and ``rate * (1 + diurnal)``. 0 disables it.
        peak_hour: Hour of the day (UTC) with the highest rate.
        horizon_events: Horizon of an endless stream: users and items arrive over its first
            ``horizon_events`` events and are all present after that.
        candidates_popular: Candidates per pool drawn by popularity.
        candidates_uniform: Candidates per pool drawn uniformly from the released catalog.
        seed: Seeds the PCG64 generator behind every random choice.
    """

    n_users: int = attrs.field(default=10_000, validator=_positive)
    n_items: int = attrs.field(default=5_000, validator=_positive)
    n_events: int | None = attrs.field(default=200_000, validator=_optional_positive)
    true_dim: int = attrs.field(default=16, validator=_positive)
    n_categories: int = attrs.field(default=32, validator=_positive)
    zipf: float = attrs.field(default=1.0, validator=_non_negative)
    temperature: float = attrs.field(default=0.2, validator=_positive)
    repeat_prob: float = attrs.field(default=0.15, validator=_fraction)
    drift: float = attrs.field(default=0.3, validator=_non_negative)
    new_user_fraction: float = attrs.field(default=0.5, validator=_fraction)
    new_item_fraction: float = attrs.field(default=0.3, validator=_fraction)
    fresh_boost: float = attrs.field(default=4.0, validator=_non_negative)
    fresh_window: float = attrs.field(default=0.02, validator=_positive)
    age_decay: float = attrs.field(default=1.0, validator=_non_negative)
    activity_sigma: float = attrs.field(default=1.2, validator=_non_negative)
    funnel: tuple[float, float, float] = attrs.field(
        default=(0.2, 0.3, 0.3), converter=tuple, validator=_funnel
    )
    funnel_affinity: float = attrs.field(default=0.8, validator=_non_negative)
    rate: float = attrs.field(default=10.0, validator=_positive)
    start: float = 1_700_000_000.0
    diurnal: float = attrs.field(default=0.5, validator=_fraction)
    peak_hour: float = 20.0
    horizon_events: int = attrs.field(default=1_000_000, validator=_positive)
    candidates_popular: int = attrs.field(default=200, validator=_positive)
    candidates_uniform: int = attrs.field(default=56, validator=_positive)
    seed: int = 0

    @property
    def horizon(self) -> int:
        """Events over which users and items arrive (``n_events`` unless endless)."""
        return self.n_events if self.n_events is not None else self.horizon_events


@attrs.frozen(eq=False)
class EventBatch:
    """A run of consecutive events, as :func:`iter_events` yields them.

    Attributes:
        users: User id of each event (dense, in order of joining).
        items: Item id of each event (dense, in order of release).
        types: Index into :data:`EVENT_TYPES` of each event.
        weights: Weight of each event's type.
        ts: Unix time of each event, non-decreasing.
    """

    users: IntArray
    items: IntArray
    types: npt.NDArray[np.uint8]
    weights: npt.NDArray[np.float32]
    ts: FloatArray

    def __len__(self) -> int:
        return len(self.users)


@attrs.frozen(eq=False)
class Stream:
    """A whole generated stream: the events plus the planted truth behind them.

    Attributes:
        users: User id of each event, int64 (dense, in order of joining).
        items: Item id of each event, int64 (dense, in order of release).
        types: Index into :data:`EVENT_TYPES` of each event, uint8.
        weights: Weight of each event's type, float32.
        ts: Unix time of each event, float64, non-decreasing.
        true_affinity: Planted affinity of the event's user (at that moment) for its item.
        item_category: Category of each item.
        item_tags: Tag ids of each item (1-4 each).
        item_factors: Planted item vectors, ``(n_items, true_dim)``.
        user_factors: Planted user vectors as of each user's last event (as of joining for
            users without events), ``(n_users, true_dim)``.
        category_factors: Category centroids, ``(n_categories, true_dim)``.
        tag_factors: Tag vectors, ``(n_tags, true_dim)``.
        item_release: Event index from which each item can be picked (0: in the catalog from
            the start).
        user_join: Event index from which each user can act (0: present from the start).
        config: The configuration that produced the stream.
    """

    users: IntArray
    items: IntArray
    types: npt.NDArray[np.uint8]
    weights: npt.NDArray[np.float32]
    ts: FloatArray
    true_affinity: npt.NDArray[np.float32]
    item_category: IntArray
    item_tags: list[list[int]]
    item_factors: npt.NDArray[np.float32]
    user_factors: npt.NDArray[np.float32]
    category_factors: npt.NDArray[np.float32]
    tag_factors: npt.NDArray[np.float32]
    item_release: IntArray
    user_join: IntArray
    config: SyntheticConfig

    def __len__(self) -> int:
        return len(self.users)


class _World:
    """The generator's state: the planted catalog and users, and the running dynamics."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = c = config
        self.rng = rng = np.random.Generator(np.random.PCG64(c.seed))
        d = c.true_dim
        scale = 1.0 / math.sqrt(d)
        self.horizon = c.horizon

        # Catalog: categories of uneven size, each with a pool of typical tags.
        self.category_factors = (rng.standard_normal((c.n_categories, d)) * scale).astype(
            np.float32
        )
        category_share = rng.dirichlet(np.full(c.n_categories, 2.0))
        n_tags = 4 * c.n_categories
        self.tag_factors = (rng.standard_normal((n_tags, d)) * scale).astype(np.float32)
        tag_pool = rng.integers(0, n_tags, size=(c.n_categories, 6))
        self.item_category = rng.choice(c.n_categories, size=c.n_items, p=category_share)
        n_tag = 1 + rng.binomial(3, 0.4, size=c.n_items)
        from_pool = tag_pool[self.item_category[:, None], rng.integers(0, 6, (c.n_items, 4))]
        anywhere = rng.integers(0, n_tags, size=(c.n_items, 4))
        drawn = np.where(rng.random((c.n_items, 4)) < 0.8, from_pool, anywhere)
        drawn = np.sort(np.where(np.arange(4) < n_tag[:, None], drawn, n_tags), axis=1)
        # Mark repeated tags and the padding as absent; the first tag always stays.
        keep = np.ones_like(drawn, dtype=bool)
        keep[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        keep &= drawn < n_tags
        self.item_tags = [row[k].tolist() for row, k in zip(drawn, keep, strict=True)]
        tag_sum = np.where(keep[..., None], self.tag_factors[np.minimum(drawn, n_tags - 1)], 0.0)
        tag_mean = tag_sum.sum(axis=1) / keep.sum(axis=1, keepdims=True)
        self.item_factors = (
            self.category_factors[self.item_category]
            + 0.5 * tag_mean
            + 0.4 * scale * rng.standard_normal((c.n_items, d))
        ).astype(np.float32)

        # Popularity: Zipf over a random ranking; items sorted by release.
        rank = rng.permutation(c.n_items)
        self.log_base_pop = -c.zipf * np.log1p(rank).astype(np.float64)
        n_new_items = round(c.n_items * c.new_item_fraction)
        n_old_items = c.n_items - n_new_items
        if n_old_items == 0:
            n_old_items, n_new_items = 1, n_new_items - 1
        # Items in the catalog at the start were released during the horizon before it.
        self.item_release_p = np.concatenate(
            [
                np.sort(-rng.random(n_old_items)),
                np.sort(rng.random(n_new_items)),
            ]
        )

        # Users: favourite categories, activity, arrival.
        n_fav = 1 + rng.binomial(2, 0.4, size=c.n_users)
        favs = rng.choice(c.n_categories, size=(c.n_users, 3), p=category_share)
        fav_mask = np.arange(3) < n_fav[:, None]
        home = (self.category_factors[favs] * fav_mask[..., None]).sum(axis=1) / n_fav[:, None]
        home *= np.sqrt(n_fav)[:, None]  # users with several loves are not lukewarm on all
        home += 0.4 * scale * rng.standard_normal((c.n_users, d))
        self.user_home = home.astype(np.float32)
        self.user_now = self.user_home.copy()
        # Steps of the taste walk are picked from a table of Gaussian vectors: picking a row
        # costs far less than drawing 16 normals, and the walk, a sum of many steps, is
        # just as Gaussian.
        self.drift_noise = rng.standard_normal((1 << 14, d), dtype=np.float32)
        self.user_seen_p = np.zeros(c.n_users)
        activity = rng.lognormal(0.0, c.activity_sigma, size=c.n_users)
        self.cum_activity = np.cumsum(activity)
        n_new_users = round(c.n_users * c.new_user_fraction)
        n_old_users = c.n_users - n_new_users
        if n_old_users == 0:
            n_old_users, n_new_users = 1, n_new_users - 1
        self.user_join_p = np.concatenate([np.zeros(n_old_users), np.sort(rng.random(n_new_users))])
        self.user_seen_p[:] = np.maximum(self.user_join_p, 0.0)
        # Largest item norm: bounds the logits, see ``chunk``.
        self.max_norm = float(
            np.sqrt(np.max(np.einsum("nd,nd->n", self.item_factors, self.item_factors)))
        )
        # Spread of affinities between random users and items: the funnel's unit.
        pairs = rng.integers(0, [c.n_users, c.n_items], size=(4096, 2))
        self.affinity_sd = float(
            np.einsum("nd,nd->n", self.user_home[pairs[:, 0]], self.item_factors[pairs[:, 1]]).std()
            + 1e-6
        )

        # Repeat consumption: a ring of recent items per user.
        self.history = np.zeros((c.n_users, HISTORY), dtype=np.int64)
        self.history_len = np.zeros(c.n_users, dtype=np.int64)

        # Candidate reservoir (refreshed lazily).
        self.reservoir = np.zeros(RESERVOIR, dtype=np.int64)
        self.reservoir_count = np.zeros(c.n_items, dtype=np.float32)
        # Log popularity without the freshness boost, up to the shift ``-age_decay * p`` that
        # is the same for every item at a given moment.
        self.log_pop_static = (self.log_base_pop + c.age_decay * self.item_release_p).astype(
            np.float32
        )
        self.reservoir_step = -1
        # Refresh often enough to follow popularity, rarely enough to cost little.
        self.chunk_size = min(CHUNK, max(MIN_CHUNK, self.horizon // REFRESHES))
        self.refresh_every = max(self.horizon // REFRESHES, 4 * self.chunk_size)

        # Clock: events so far, Poisson operational time and last timestamp offset.
        self.position = 0
        self.operational = 0.0
        self.last_offset = 0.0
        phase = 2.0 * math.pi * ((c.start - c.peak_hour * 3600.0) % _DAY) / _DAY
        self.phase0 = phase

    # -- dynamics ---------------------------------------------------------------------------

    def log_popularity(self, items: IntArray, p: float) -> FloatArray:
        """Log popularity of ``items`` at progress ``p``: base, freshness boost, age decay."""
        c = self.config
        age = np.maximum(p - self.item_release_p[items], 0.0)
        log_pop: FloatArray = self.log_base_pop[items] - c.age_decay * age
        if c.fresh_boost > 0:
            # Beyond 12 windows the boost is below 1e-5 * fresh_boost: skip the exp/log there.
            fresh = age < 12.0 * c.fresh_window
            log_pop[fresh] += np.log1p(c.fresh_boost * np.exp(-age[fresh] / c.fresh_window))
        return log_pop

    def refresh_reservoir(self, p: float, n_released: int) -> None:
        """Redraw the popularity reservoir from the popularity at progress ``p``.

        Systematic resampling (Kitagawa 1996): item ``i`` gets ``floor(R * F_i + u) -
        floor(R * F_(i-1) + u)`` copies, ``F`` the cumulative popularity share and ``u`` one
        uniform draw: the expected count is exact, the spread minimal, and it costs one pass
        over the catalog instead of a binary search per copy. The reservoir's order does not
        matter since candidates are drawn from it at random positions.
        """
        log_pop = self.log_popularity(np.arange(n_released), p)
        cdf = np.cumsum(np.exp(log_pop - log_pop.max()))
        marks = np.floor(cdf * (RESERVOIR / cdf[-1]) + self.rng.random()).astype(np.int64)
        marks = np.minimum(marks, RESERVOIR)
        marks[-1] = RESERVOIR  # exact whatever the rounding of the last partial sum
        counts = np.diff(marks, prepend=0)
        self.reservoir = np.repeat(np.arange(n_released), counts)
        self.reservoir_count = np.zeros(self.config.n_items, dtype=np.float32)
        self.reservoir_count[:n_released] = counts

    def drift_users(self, users: IntArray, p: float) -> None:
        """Advance the tastes of ``users`` to progress ``p`` (exact lazy OU update)."""
        c = self.config
        if c.drift <= 0 or len(users) == 0:
            return
        elapsed = np.maximum(p - self.user_seen_p[users], 0.0)
        keep = np.exp(-elapsed).astype(np.float32)[:, None]
        sd = c.drift / math.sqrt(c.true_dim)
        noise = self.drift_noise[self.rng.integers(0, len(self.drift_noise), len(users))]
        home = self.user_home[users]
        deviation = (self.user_now[users] - home) * keep + sd * np.sqrt(1.0 - keep**2) * noise
        self.user_now[users] = home + deviation
        self.user_seen_p[users] = p

    def timestamps(self, n: int) -> FloatArray:
        """Offsets from ``start`` of the next ``n`` events of the (modulated) Poisson process.

        With rate ``r(t) = rate * (1 + diurnal * cos(2 pi t / day + phase))`` the expected
        count up to ``t`` is ``L(t) = rate * (t + diurnal * day / (2 pi) * (sin(...) - sin(
        phase)))``; event times are ``L^-1`` of unit-rate Poisson arrivals, found by Newton's
        method (``L`` is strictly increasing since ``diurnal < 1``).
        """
        c = self.config
        arrivals = self.operational + np.cumsum(self.rng.exponential(1.0, n))
        self.operational = float(arrivals[-1])
        if c.diurnal == 0:
            offsets: FloatArray = arrivals / c.rate
        else:
            omega = 2.0 * math.pi / _DAY
            amp = c.diurnal / omega
            sin0 = math.sin(self.phase0)
            target = arrivals / c.rate
            # A few contraction steps (factor ``diurnal``) bring t within Newton's basin.
            t = target.copy()
            for _ in range(4):
                t = target - amp * (np.sin(omega * t + self.phase0) - sin0)
            for _ in range(50):
                f = t + amp * (np.sin(omega * t + self.phase0) - sin0) - target
                t -= f / (1.0 + c.diurnal * np.cos(omega * t + self.phase0))
                if np.max(np.abs(f)) < 1e-7:
                    break
            offsets = t
        offsets = np.maximum.accumulate(np.maximum(offsets, self.last_offset))
        self.last_offset = float(offsets[-1])
        return offsets

    # -- one chunk ----------------------------------------------------------------------------

    def chunk(self, n: int) -> tuple[EventBatch, npt.NDArray[np.float32]]:
        """The next ``n`` events, plus the true affinity of each."""
        c = self.config
        rng = self.rng
        p = self.position / self.horizon
        n_users = int(np.searchsorted(self.user_join_p, p, side="right"))
        n_items = int(np.searchsorted(self.item_release_p, p, side="right"))
        step = self.position // self.refresh_every
        if step != self.reservoir_step:
            self.refresh_reservoir(p, n_items)
            self.reservoir_step = step

        draws = rng.random(n) * self.cum_activity[n_users - 1]
        # Searching in sorted order walks the table forward: same answer, far fewer misses.
        by_value = np.argsort(draws)
        users = np.empty(n, dtype=np.int64)
        users[by_value] = np.searchsorted(self.cum_activity, draws[by_value], side="right")
        users = np.minimum(users, n_users - 1)
        runs = _runs(users)
        self.drift_users(users[runs[0][runs[1]]], p)
        taste = self.user_now[users]

        # Candidate pools, one per GROUP events, and the SIR resampling within each.
        n_groups = -(-n // GROUP)
        n_uniform = c.candidates_uniform + (-(c.candidates_popular + c.candidates_uniform)) % _BLOCK
        # Items released within the last three freshness windows: a third, small candidate
        # class, so the boost of a new item is not lost before the reservoir sees it.
        fresh_lo = int(np.searchsorted(self.item_release_p, p - 3.0 * c.fresh_window, "right"))
        n_fresh = min(_BLOCK, n_uniform) if n_items - fresh_lo > 0 else 0
        pool = np.concatenate(
            [
                self.reservoir[rng.integers(0, RESERVOIR, (n_groups, c.candidates_popular))],
                rng.integers(0, n_items, (n_groups, n_uniform - n_fresh)),
                rng.integers(fresh_lo, n_items, (n_groups, n_fresh)),
            ],
            axis=1,
        )
        proposal = (
            c.candidates_popular / RESERVOIR * self.reservoir_count[pool]
            + np.float32((n_uniform - n_fresh) / n_items)
            + np.float32(n_fresh / max(n_items - fresh_lo, 1)) * (pool >= fresh_lo)
        )
        # log popularity - log proposal, up to a constant per pool (which the softmax ignores):
        # every released item has aged by p - release, so only the release time and the
        # freshness boost of the newest items tell them apart.
        correction = self.log_pop_static[pool] - np.log(proposal)
        boosted = pool >= int(np.searchsorted(self.item_release_p, p - 12.0 * c.fresh_window))
        if c.fresh_boost > 0 and boosted.any():
            age = p - self.item_release_p[pool[boosted]]
            correction[boosted] += np.log1p(c.fresh_boost * np.exp(-age / c.fresh_window))
        correction -= correction.max(axis=1, keepdims=True)
        scaled = np.zeros((n_groups * GROUP, c.true_dim), dtype=np.float32)
        scaled[:n] = taste * np.float32(1.0 / c.temperature)
        # (groups, GROUP, pool): affinity / temperature of every event's user for its pool.
        affinity = np.matmul(
            scaled.reshape(n_groups, GROUP, c.true_dim),
            np.take(self.item_factors, pool, axis=0).transpose(0, 2, 1),
        )
        logits = affinity + correction[:, None, :]
        # The correction is <= 0 and at least one entry per pool is 0, so unless the
        # affinities could overflow exp, no per-row maximum needs subtracting.
        bound = float(np.sqrt(np.max(np.einsum("nd,nd->n", scaled, scaled)))) * self.max_norm
        if bound > 60.0:
            logits -= logits.max(axis=2, keepdims=True)
        mass = np.exp(logits, out=logits)
        pick = _sample_rows(mass.reshape(n_groups * GROUP, -1), rng)
        items = pool[np.arange(n_groups * GROUP) // GROUP, pick][:n]
        # The affinity the user's choice has on average: the funnel compares the pick with it.
        expected = np.einsum("gkc,gkc->gk", mass, affinity) / np.einsum("gkc->gk", mass)
        expected = expected.reshape(-1)[:n] * np.float32(c.temperature)

        items = self.repeat(users, items, rng.random(n) < c.repeat_prob, runs)

        # Funnel: stage-by-stage conversion, likelier for relatively loved items.
        true_affinity = np.einsum("nd,nd->n", taste, self.item_factors[items])
        z = (true_affinity - expected) / self.affinity_sd
        logit = np.log(np.asarray(c.funnel) / (1.0 - np.asarray(c.funnel)))
        convert = rng.random((n, 3)) < 1.0 / (
            1.0 + np.exp(-(logit[None, :] + c.funnel_affinity * z[:, None]))
        )
        types = np.cumprod(convert, axis=1).sum(axis=1).astype(np.uint8)

        self.remember(users, items, runs)
        ts = c.start + self.timestamps(n)
        self.position += n
        batch = EventBatch(
            users=users, items=items, types=types, weights=TYPE_WEIGHTS[types], ts=ts
        )
        return batch, true_affinity.astype(np.float32)

    def repeat(
        self,
        users: IntArray,
        items: IntArray,
        repeat: npt.NDArray[np.bool_],
        runs: tuple[IntArray, IntArray, IntArray, IntArray],
    ) -> IntArray:
        """Replace the item of each ``repeat`` event by one of its user's last HISTORY items.

        The earlier item is counted back over the user's events before the chunk (the ring)
        and within it, so even a user with many events per chunk repeats at the configured
        rate. A repeat of a repeat resolves to the original item.
        """
        order, _, _, rank = runs
        before = self.history_len[users]
        prior = np.minimum(before + rank, HISTORY)
        repeat = repeat & (prior > 0)
        lag = 1 + (self.rng.random(len(users)) * prior).astype(np.int64)  # 1 = the last one
        in_chunk = repeat & (lag <= rank)
        from_ring = repeat & ~in_chunk
        out = items.copy()
        ring_slot = (before - (lag - rank)) % HISTORY
        out[from_ring] = self.history[users[from_ring], ring_slot[from_ring]]
        position = np.empty(len(users), dtype=np.int64)
        position[order] = np.arange(len(users))
        source = order[np.where(in_chunk, position - lag, 0)]
        # Sources come earlier among the user's events; settle chains of repeats.
        while True:
            resolved = np.where(in_chunk, out[source], out)
            if np.array_equal(resolved, out):
                return out
            out = resolved

    def remember(
        self, users: IntArray, items: IntArray, runs: tuple[IntArray, IntArray, IntArray, IntArray]
    ) -> None:
        """Append the chunk's items to their users' rings of recent items, in event order."""
        order, starts, counts, rank = runs
        sorted_users = users[order]
        sorted_rank = rank[order]
        occurrences = np.repeat(counts, counts)
        keep = sorted_rank >= occurrences - HISTORY  # only a user's last HISTORY survive
        u = sorted_users[keep]
        slot = (self.history_len[u] + sorted_rank[keep]) % HISTORY
        self.history[u, slot] = items[order][keep]
        self.history_len[sorted_users[starts]] += counts


def _sample_rows(mass: npt.NDArray[np.float32], rng: np.random.Generator) -> IntArray:
    """Draw one column per row of ``mass`` (rows, pool) in proportion to its entries.

    Inverse-CDF sampling in two levels, because a running sum along every whole row is slow
    in numpy: first pick a block of :data:`_BLOCK` adjacent entries by the blocks' sums (one
    vectorised reduction), then an entry within the chosen block.
    """
    rows, size = mass.shape
    n_blocks = size // _BLOCK
    blocks = mass.reshape(rows, n_blocks, _BLOCK)
    block_mass = np.einsum("rkb->rk", blocks)  # faster than ndarray.sum on short axes
    block_cdf = np.cumsum(block_mass, axis=1)
    target = rng.random(rows, dtype=np.float32) * block_cdf[:, -1]
    k = np.minimum((block_cdf < target[:, None]).sum(axis=1), n_blocks - 1)
    row = np.arange(rows)
    rest = target - (block_cdf[row, k] - block_mass[row, k])
    within = np.cumsum(blocks[row, k], axis=1)
    m = np.minimum((within < rest[:, None]).sum(axis=1), _BLOCK - 1)
    picked: IntArray = k * _BLOCK + m
    return picked


def _runs(users: IntArray) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Group a chunk's events by user, keeping event order within a user.

    Returns:
        ``order`` (event indices sorted by user, stably), ``starts`` and ``counts`` of each
        user's run in that order, and ``rank``: how many earlier events of the same user the
        chunk holds, per event (in event order).
    """
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - np.repeat(starts, counts)
    return order, starts, counts, rank


def _chunks(world: _World) -> Iterator[tuple[EventBatch, npt.NDArray[np.float32]]]:
    remaining = world.config.n_events
    while remaining is None or remaining > 0:
        size = world.chunk_size
        n = size if remaining is None else min(size, remaining)
        batch, affinity = world.chunk(n)
        if remaining is not None:
            remaining -= n
        yield batch, affinity


def iter_events(config: SyntheticConfig, batch: int = 1000) -> Iterator[EventBatch]:
    """Yield the stream of ``config`` in batches of ``batch`` events (the last may be short).

    Endless when ``config.n_events`` is None. Concatenating the batches gives exactly the
    events of :func:`generate`, whatever ``batch`` is.

    Raises:
        ValueError: If ``batch`` is not positive.
    """
    if batch <= 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    pending: list[EventBatch] = []
    buffered = 0
    for chunk, _ in _chunks(_World(config)):
        pending.append(chunk)
        buffered += len(chunk)
        while buffered >= batch:
            merged = _concat(pending)
            yield _slice(merged, 0, batch)
            rest = _slice(merged, batch, len(merged))
            pending = [rest] if len(rest) else []
            buffered = len(rest)
    if buffered:
        yield _concat(pending)


def _concat(batches: Sequence[EventBatch]) -> EventBatch:
    if len(batches) == 1:
        return batches[0]
    return EventBatch(
        users=np.concatenate([b.users for b in batches]),
        items=np.concatenate([b.items for b in batches]),
        types=np.concatenate([b.types for b in batches]),
        weights=np.concatenate([b.weights for b in batches]),
        ts=np.concatenate([b.ts for b in batches]),
    )


def _slice(batch: EventBatch, lo: int, hi: int) -> EventBatch:
    return EventBatch(
        users=batch.users[lo:hi],
        items=batch.items[lo:hi],
        types=batch.types[lo:hi],
        weights=batch.weights[lo:hi],
        ts=batch.ts[lo:hi],
    )


def generate(config: SyntheticConfig) -> Stream:
    """Generate the whole stream of ``config`` with its planted truth.

    Raises:
        ValueError: If ``config.n_events`` is None (use :func:`iter_events` for endless
            streams).
    """
    if config.n_events is None:
        raise ValueError("generate() needs a finite n_events; use iter_events() for endless")
    batches: list[EventBatch] = []
    affinities = []
    world = _World(config)
    for batch, affinity in _chunks(world):
        batches.append(batch)
        affinities.append(affinity)
    events = _concat(batches)
    horizon = config.horizon
    return Stream(
        users=events.users,
        items=events.items,
        types=events.types,
        weights=events.weights,
        ts=events.ts,
        true_affinity=np.concatenate(affinities),
        item_category=world.item_category.astype(np.int64),
        item_tags=world.item_tags,
        item_factors=world.item_factors,
        user_factors=world.user_now,
        category_factors=world.category_factors,
        tag_factors=world.tag_factors,
        item_release=np.ceil(np.maximum(world.item_release_p, 0.0) * horizon).astype(np.int64),
        user_join=np.ceil(world.user_join_p * horizon).astype(np.int64),
        config=config,
    )


class _Events(Protocol):
    @property
    def users(self) -> npt.NDArray[Any]: ...
    @property
    def items(self) -> npt.NDArray[Any]: ...
    @property
    def weights(self) -> npt.NDArray[np.float32]: ...
    @property
    def ts(self) -> FloatArray: ...


def write_tsv(stream: _Events, path: str | Path, *, comment: str | None = None) -> int:
    """Write ``user<TAB>item<TAB>weight<TAB>unix_ts`` lines, after a ``#`` header line.

    Weights are written with 9 significant digits and timestamps with Python's shortest
    round-trip form, so reading the file back gives identical float32 and float64 arrays.
    Works for any object with ``users``, ``items``, ``weights`` and ``ts`` arrays (a
    :class:`Stream` or a loaded dataset, whose ids are written as they are).

    Args:
        stream: The events.
        path: Destination; overwritten.
        comment: Extra text for a second ``#`` line (e.g. how the file was made).

    Returns:
        The number of events written.
    """
    n = len(stream.users)
    # A loaded dataset with string ids holds codes; write the ids they stand for.
    user_ids = getattr(stream, "user_ids", None)
    item_ids = getattr(stream, "item_ids", None)
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("# user\titem\tweight\tunix_ts\n")
        if comment:
            out.write("# " + " ".join(comment.split()) + "\n")
        step = 100_000
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            users = stream.users[lo:hi]
            items = stream.items[lo:hi]
            users = (user_ids[users] if user_ids is not None else users).tolist()
            items = (item_ids[items] if item_ids is not None else items).tolist()
            weights = np.asarray(stream.weights[lo:hi], dtype=np.float32).tolist()
            ts = np.asarray(stream.ts[lo:hi], dtype=np.float64).tolist()
            out.write(
                "".join(
                    f"{u}\t{i}\t{w:.9g}\t{t!r}\n"
                    for u, i, w, t in zip(users, items, weights, ts, strict=True)
                )
            )
    return n


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine._synthetic``: write a synthetic stream as TSV."""
    parser = argparse.ArgumentParser(
        prog="python -m engine._synthetic",
        description="Write a synthetic interaction stream as user/item/weight/unix_ts TSV.",
    )
    parser.add_argument("--events", type=int, default=SyntheticConfig().n_events)
    parser.add_argument("--users", type=int, default=SyntheticConfig().n_users)
    parser.add_argument("--items", type=int, default=SyntheticConfig().n_items)
    parser.add_argument("--dim", type=int, default=SyntheticConfig().true_dim)
    parser.add_argument("--zipf", type=float, default=SyntheticConfig().zipf)
    parser.add_argument("--rate", type=float, default=SyntheticConfig().rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="destination TSV file")
    args = parser.parse_args(argv)
    config = SyntheticConfig(
        n_events=args.events,
        n_users=args.users,
        n_items=args.items,
        true_dim=args.dim,
        zipf=args.zipf,
        rate=args.rate,
        seed=args.seed,
    )
    began = time.perf_counter()
    stream = generate(config)
    generated = time.perf_counter()
    write_tsv(stream, args.out, comment=f"generated by engine._synthetic from {config!r}")
    done = time.perf_counter()
    print(
        f"{len(stream)} events: generated in {generated - began:.2f} s, "
        f"written to {args.out} in {done - generated:.2f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
