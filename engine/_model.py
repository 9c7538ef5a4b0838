"""The model's configuration; the model itself is ``engine._core.Model`` (Rust).

``Model(config)`` takes a :class:`ModelConfig`. Every method that does real work releases the
GIL, so calling it through ``trio.to_thread.run_sync`` keeps an event loop responsive.
"""

from __future__ import annotations

import attrs

from ._core import Model as Model

__all__ = ["Model", "ModelConfig", "DEFAULT_EVENT_WEIGHTS"]

#: Weight (confidence) of one event of each type: a purchase says more than a view.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "like": 3.0,
    "cart": 4.0,
    "purchase": 8.0,
}


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
        exact_below: Catalogs smaller than this are answered by an exact scan.
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
    """

    dim: int = 32
    c0: float = 256.0
    alpha: float = 0.0
    reg: float = 0.1
    w_new: float = 1.0
    online_iters: int = 1
    user_history_cap: int = 256
    item_history_cap: int = 512
    decay_half_life: float | None = None
    init_std: float = 0.01
    seed: int = 42
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 64
    event_weights: dict[str, float] = attrs.field(factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    default_weight: float = 1.0
    trending_half_life: float = 86_400.0
    exact_below: int = 2_000
    dedup_window: int = 1_000_000
    auto_reindex: bool = True
    max_frame_bytes: int = 16 * 1024 * 1024
    cold_start_events: float = 1.0
    diversity: float = 1.0
    exploration: float = 0.0
    explore_max_events: int = 5
    neighbour_weight: float = 0.5
    neighbour_window: int = 20
    neighbour_cap: int = 100
