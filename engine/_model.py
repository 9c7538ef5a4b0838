"""The model's configuration; the model itself is ``engine._core.Model`` (Rust).

``Model(config)`` takes a :class:`ModelConfig`. Every method that does real work releases the
GIL, so calling it through ``trio.to_thread.run_sync`` keeps an event loop responsive.
"""

from __future__ import annotations

from typing import Any

import attrs

from ._core import Model as Model
from ._core import default_config

__all__ = ["Model", "ModelConfig", "DEFAULT_EVENT_WEIGHTS"]

# The extension's defaults are the only ones: ``Model()`` without a configuration and
# ``Model(ModelConfig())`` are the same model.
_DEFAULTS: dict[str, Any] = default_config()

#: Weight (confidence) of one event of each type: a purchase says more than a view.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = dict(_DEFAULTS["event_weights"])


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Settings of the factorization, the index and event handling.

    The defaults were chosen by ``python -m bench quality --data
    ../shared/data/amazon-grocery/events.tsv --format tsv --tune`` (README, "Model quality"):
    a coordinate search on a validation split inside the warm-start part of the Amazon grocery
    purchases, never on the streamed test part. The neighbourhood term was the large step
    (validation HR@100 0.19 → 0.26 at ``neighbour_weight`` 0.5); with it a short cold-start
    blend (``cold_start_events`` 1) and lighter regularisation (``reg`` 0.1) helped, since
    the neighbourhood already gives one-event users a personal list; dim 32 stayed best and c0
    256 tied 512. The trials are in ``bench/results/quality-amazon-grocery_tune.json``.
    The extension holds them (``Model()`` without a configuration uses the same ones).

    Attributes:
        dim: Latent factors per user and item.
        c0: Total weight of the missing data in eALS (He et al. 2016); larger pushes
            unobserved items down harder.
        alpha: Popularity exponent of the missing-data weights: 0 weighs every item alike,
            1 in proportion to its popularity.
        reg: L2 regularisation of the factors.
        w_new: Weight multiplier of interactions learned online (the paper's w_new).
        online_iters: Coordinate sweeps per event for the user and the item.
        user_history_cap: Most recent interactions of a user used per update (bounds the cost
            of an event for very active users).
        item_history_cap: The same for very popular items.
        decay_half_life: Seconds after which an interaction counts half; None: no decay.
        init_std: Standard deviation of new vectors.
        seed: Seeds every random choice (vectors, index levels): same input, same model.
        hnsw_m: Links per node of the HNSW graph (layer 0 gets twice as many).
        ef_construction: Beam width while linking.
        ef_search: Default beam width of queries; raise it for recall, lower it for speed.
        event_weights: Weight of each event type name.
        default_weight: Weight of an event that names neither a type nor a weight.
        trending_half_life: Seconds after which an event counts half in the trending list.
        max_clock_skew: Seconds an event's time may be ahead of the server's clock; a later
            time is refused with a reason. The model's clock (the "now" of recency decay and
            trending) is the newest of ``min(event time, time the server accepted it)``, so
            no producer can move it past the server's clock, and old events never move it
            back. Times before 1990 or after the year 9999 are always refused.
        exact_below: Catalogs smaller than this are answered by an exact scan (a batch of
            lists shares one); their index is not kept up to date meanwhile (moved items are
            re-linked once the catalog reaches this size). Larger catalogs are scanned too
            while the graph lacks more than 1 % of the items (and more than 64): after a
            restart, until the replayed items are linked.
        dedup_window: How many recent event ids (per producer) are remembered to drop
            redeliveries.
        auto_reindex: Re-link moved items in the index after every call that moves them; the
            server turns this off and re-links from its index actor instead.
        max_frame_bytes: Largest Forward frame accepted.
        cold_start_events: ``n0`` of the cold-start blend: a user with ``n`` events gets
            ``(1 - b)·personal + b·trending`` (each min-max normalised over a candidate pool)
            with ``b = n0 / (n0 + n)``, so lists move smoothly from popular to personal. 0 turns
            the blend off. Users without events always get the trending list.
        diversity: Default ``λ`` of maximal-marginal-relevance re-ranking in [0, 1]: 1 ranks by
            relevance alone (off); lower values trade relevance for items unlike those
            already chosen. Requests may override it.
        exploration: Default share of list slots in [0, 1] given to fresh items (see
            ``explore_max_events``), flagged ``explore``. Requests may override it.
        explore_max_events: Items with fewer events than this are fresh: candidates for
            exploration slots.
        neighbour_weight: Share ``γ`` of the item-neighbourhood term in a user's personal
            score, ``(1 - γ)·factorization + γ·neighbourhood`` (each min-max normalised over
            the candidate pool). The neighbourhood score of an item is the sum of its cosine
            similarities (capped co-occurrence counts) to the user's ``neighbour_window`` most
            recent items: direct evidence that serves users with one or two events, where the
            factorization has little to go on. 0 turns it off (and stops the counting).
        neighbour_window: A user's most recent items that a new item is paired with, and that
            score the user's list; bounds the cost of an event.
        neighbour_cap: Neighbours kept per item (Space-Saving eviction); bounds memory and the
            cost of an event.
        batch_apply: Apply each group of events (one ``ingest`` call, one frame, a group of
            journal records) with coalesced solves: every event still counts in histories,
            counts, trending, neighbours and de-duplication, but each touched user is solved
            once, then each touched item once, in parallel on all cores. False solves the
            user and the item after every event (the per-event online path).
        coalesce_records: With ``batch_apply``, coalesce the solves of all the journal records
            (frames) of a group. False solves at the end of every record: the model then
            depends on the records alone, not on how many were grouped on their way to it, so
            replicas that read one shared log in different groups compute the same vectors
            (``recstream serve --log`` turns it off).
    """

    dim: int = _DEFAULTS["dim"]
    c0: float = _DEFAULTS["c0"]
    alpha: float = _DEFAULTS["alpha"]
    reg: float = _DEFAULTS["reg"]
    w_new: float = _DEFAULTS["w_new"]
    online_iters: int = _DEFAULTS["online_iters"]
    user_history_cap: int = _DEFAULTS["user_history_cap"]
    item_history_cap: int = _DEFAULTS["item_history_cap"]
    decay_half_life: float | None = _DEFAULTS["decay_half_life"]
    init_std: float = _DEFAULTS["init_std"]
    seed: int = _DEFAULTS["seed"]
    hnsw_m: int = _DEFAULTS["hnsw_m"]
    ef_construction: int = _DEFAULTS["ef_construction"]
    ef_search: int = _DEFAULTS["ef_search"]
    event_weights: dict[str, float] = attrs.field(factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    default_weight: float = _DEFAULTS["default_weight"]
    trending_half_life: float = _DEFAULTS["trending_half_life"]
    max_clock_skew: float = _DEFAULTS["max_clock_skew"]
    exact_below: int = _DEFAULTS["exact_below"]
    dedup_window: int = _DEFAULTS["dedup_window"]
    auto_reindex: bool = _DEFAULTS["auto_reindex"]
    max_frame_bytes: int = _DEFAULTS["max_frame_bytes"]
    cold_start_events: float = _DEFAULTS["cold_start_events"]
    diversity: float = _DEFAULTS["diversity"]
    exploration: float = _DEFAULTS["exploration"]
    explore_max_events: int = _DEFAULTS["explore_max_events"]
    neighbour_weight: float = _DEFAULTS["neighbour_weight"]
    neighbour_window: int = _DEFAULTS["neighbour_window"]
    neighbour_cap: int = _DEFAULTS["neighbour_cap"]
    batch_apply: bool = _DEFAULTS["batch_apply"]
    coalesce_records: bool = _DEFAULTS["coalesce_records"]
