"""Python-side Forward frame editing (erasure, pseudonymisation, attribution) in every mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine import Model, ModelConfig
from engine._frames import decode_frame, drop_users, interactions, map_users, pseudonym

from .connectors.test_forward import forward, message, packed

RECS: list[dict[str, Any]] = [
    {"user": "ann", "item": "dune", "type": "click", "id": "e1"},
    {"user": "bob", "item": "emma", "type": "view"},
    {"item": "dune", "tags": ["sf"], "category": "books"},
    {"user": 7, "item": "emma", "weight": 2.5},
    {"erase_user": "ann"},
]

MODES: dict[str, Callable[[list[dict[str, Any]]], bytes]] = {
    "forward": lambda recs: forward(recs, chunk="c1"),
    "packed": lambda recs: packed(recs, chunk="c1"),
    "compressed": lambda recs: packed(recs, chunk="c1", members=2),
}


def _records(frame: bytes) -> list[dict[str, Any]]:
    return [e[1] for e in decode_frame(frame).entries]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_round_trip_keeps_mode_chunk_and_records(mode: str) -> None:
    frame = MODES[mode](RECS)
    decoded = decode_frame(frame)
    assert decoded.mode == mode
    again = decoded.encode()
    checker = Model(ModelConfig(dim=4))
    checked = checker.check_frame(again)
    assert checked is not None and checked["used"] == len(again)
    assert checked["chunk"] == "c1" and checked["entries"] == len(RECS)
    assert _records(again) == RECS


@pytest.mark.parametrize("mode", sorted(MODES))
def test_drop_users_removes_only_their_records(mode: str) -> None:
    frame = MODES[mode](RECS)
    out = drop_users(frame, {"ann"})
    assert out is not None and b"ann" not in out
    assert _records(out) == [RECS[1], RECS[2], RECS[3]]
    checked = Model(ModelConfig(dim=4)).check_frame(out)
    assert checked is not None and checked["chunk"] == "c1"
    assert drop_users(frame, {"nobody"}) is frame
    assert drop_users(frame, {7, "ann", "bob"}) is not None  # the item upsert stays
    assert drop_users(MODES[mode]([RECS[0]]), {"ann"}) is None


def test_message_mode_is_dropped_whole_or_kept() -> None:
    frame = message(RECS[0], chunk="m")
    assert drop_users(frame, {"ann"}) is None
    assert drop_users(frame, {"bob"}) is frame
    renamed = map_users(frame, str.upper)
    assert decode_frame(renamed).mode == "message" and _records(renamed)[0]["user"] == "ANN"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_map_users_replaces_user_and_erase_ids(mode: str) -> None:
    key = b"k" * 32
    out = map_users(MODES[mode](RECS), lambda u: pseudonym(key, u))
    recs = _records(out)
    assert recs[0]["user"] == pseudonym(key, "ann") == recs[4]["erase_user"]
    assert recs[3]["user"] == pseudonym(key, 7)
    assert recs[2] == RECS[2]
    assert b"ann" not in out and b"bob" not in out
    assert interactions(out) == [
        (pseudonym(key, "ann"), "dune"),
        (pseudonym(key, "bob"), "emma"),
        (pseudonym(key, 7), "emma"),
    ]


def test_pseudonym_is_keyed_hmac_sha256_truncated() -> None:
    import hashlib
    import hmac

    p = pseudonym(b"secret", "alice")
    assert p == hmac.new(b"secret", b"alice", hashlib.sha256).hexdigest()[:32]
    assert p != pseudonym(b"other", "alice") and len(p) == 32
