"""``engine.Engine`` used directly, without listeners: what ``connectors`` builds on."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from engine import Engine, JournalClosed, Subscription, TooManySubscribers, json_to_frame

from .conftest import server_config


def _frame(events: object) -> bytes:
    return json_to_frame(events, "test", 100)[0]


async def test_submit_query_subscribe_and_erase(tmp_path: Path) -> None:
    engine = Engine(server_config(tmp_path / "data", max_subscribers=1))
    with pytest.raises(JournalClosed):
        await engine.submit(_frame({"user": "a", "item": "x"}), "test")  # not started
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        events = [{"user": u, "item": i} for u in ("a", "b") for i in ("x", "y", "z")]
        seq = await engine.submit(_frame(events), "test")
        await engine.wait_applied(seq)
        assert engine.applied_seq == seq == 1
        assert [r["item"] for r in await engine.recommend("c", k=3)] != []
        assert {i for i, _ in await engine.similar("x", 2)} <= {"y", "z"}
        with pytest.raises(KeyError):
            await engine.similar("nothing", 2)
        assert len(await engine.trending(2)) == 2

        sub = Subscription(user="c", k=3)
        async with engine.subscribe(sub):
            with pytest.raises(TooManySubscribers):
                async with engine.subscribe(Subscription(user="d", k=3)):
                    pass
            first = await engine.current(sub)
            seq = await engine.submit(_frame({"user": "c", "item": "x"}), "test")
            # The first push that reflects the event (a drift refresh may carry it under
            # an older version).
            with trio.fail_after(10):
                while True:
                    push = await sub.slot.get()
                    assert push is not None
                    if "x" not in push.items:
                        break
            assert push.items != first.items and seq == 2
        assert engine.stats()["subscribers"] == 0

        assert await engine.erase_user("a", "a", "test") is not None
        assert engine.model.user_vector("a") is None
        assert await engine.erase_user("nobody", "nobody", "test") is None
        stats = engine.stats()
        assert stats["log"]["log"] == "journal" and stats["wal_seq"] == stats["applied_seq"]
        engine.shutdown()
    assert engine.stats()["snapshot_seq"] == engine.applied_seq
