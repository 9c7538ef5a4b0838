"""The index actor hands applied groups to the publisher only once their moves are in the graph."""

from __future__ import annotations

import trio

from engine import Model, ModelConfig
from engine._events import journal_record, json_to_frame
from engine._index_actor import IndexActor
from engine._messages import Applied
from engine._model_actor import apply_records


def _apply(model: Model, first_seq: int, n_items: int) -> list[Applied]:
    events = [{"user": f"u{n % 7}", "item": f"i{n}"} for n in range(n_items)]
    payload = journal_record(json_to_frame(events, "t", len(events))[0])
    return apply_records(model, first_seq, [payload])


async def test_groups_reach_the_publisher_after_their_items_are_relinked() -> None:
    model = Model(ModelConfig(dim=8, seed=1, auto_reindex=False, exact_below=0))
    seen: list[tuple[list[int], int]] = []
    actor = IndexActor(
        model,
        budget=16,  # several batches for the moved items
        max_wait_items=100,
        on_indexed=lambda rs: seen.append(([r.seq for r in rs], model.stats()["index_stale"])),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        results = _apply(model, 1, 60)
        assert model.stats()["index_stale"] > 16, "the group should leave many items stale"
        actor.applied(results)
        with trio.fail_after(10):
            while not seen:  # noqa: ASYNC110 - the callback is the event
                await trio.sleep(0.01)
        assert seen == [([1], 0)], "handed on before every moved item was re-linked"
        actor.applied(_apply(model, 2, 30))
        with trio.fail_after(10):
            while len(seen) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert seen[1] == ([2], 0)
        nursery.cancel_scope.cancel()


def test_waiting_records_are_bounded() -> None:
    model = Model(ModelConfig(dim=8, seed=1, auto_reindex=False, exact_below=0))
    handed: list[int] = []
    actor = IndexActor(model, on_indexed=lambda rs: handed.extend(r.seq for r in rs), max_pending=2)
    actor.applied(_apply(model, 1, 5) + _apply(model, 2, 5))
    assert handed == []
    actor.applied(_apply(model, 3, 5))  # a third waiting record: over the bound
    assert handed == [1, 2, 3]


async def test_records_go_on_first_when_more_items_wait_than_max_wait_items() -> None:
    model = Model(ModelConfig(dim=8, seed=1, auto_reindex=False, exact_below=0))
    seen: list[tuple[list[int], int]] = []
    actor = IndexActor(
        model,
        budget=16,
        max_wait_items=20,
        on_indexed=lambda rs: seen.append(([r.seq for r in rs], model.stats()["index_stale"])),
    )
    async with trio.open_nursery() as nursery:
        results = _apply(model, 1, 60)
        stale = model.stats()["index_stale"]
        assert stale > 20
        actor.applied(results)
        await nursery.start(actor.run)
        with trio.fail_after(10):
            while not seen:  # noqa: ASYNC110 - the callback is the event
                await trio.sleep(0.01)
        assert seen == [([1], stale)], "handed on before the re-links"
        with trio.fail_after(10):
            while model.stats()["index_stale"]:  # noqa: ASYNC110 - the re-links follow
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def test_groups_go_on_at_once_when_nothing_waits_for_a_relink() -> None:
    # A catalog the exact scan serves: its graph is not kept, nothing ever waits for a re-link,
    # and the records reach the publisher at once, without a turn of the actor's task.
    model = Model(ModelConfig(dim=8, seed=1, auto_reindex=False))
    handed: list[int] = []
    actor = IndexActor(model, on_indexed=lambda rs: handed.extend(r.seq for r in rs))
    actor.applied(_apply(model, 1, 60))
    assert model.stats()["index_stale"] == 0
    assert handed == [1]
    actor.applied(_apply(model, 2, 5))
    assert handed == [1, 2]
    # A catalog the graph serves: the same records wait for their re-links.
    graph = Model(ModelConfig(dim=8, seed=1, auto_reindex=False, exact_below=0))
    waited: list[int] = []
    actor = IndexActor(graph, on_indexed=lambda rs: waited.extend(r.seq for r in rs))
    actor.applied(_apply(graph, 1, 60))
    assert graph.stats()["index_stale"] > 0
    assert waited == []
