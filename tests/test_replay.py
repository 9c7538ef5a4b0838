"""Replaying journal records without reporting them (``apply_records(collect=False)``)."""

from __future__ import annotations

import logging

import pytest

from engine import Model, ModelConfig
from engine._events import journal_record, json_to_frame
from engine._model_actor import apply_records


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
