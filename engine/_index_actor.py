"""The index actor: re-links moved item vectors in the HNSW graph, in bounded batches, then
passes the applied groups on to the publisher.

The model actor moves item vectors on every event; re-linking each one in the graph costs far
more than the move, so it is done here, off the event path, a batch of ``budget`` items per
worker-thread call (the extension locks the graph per item, so queries keep running).

Pipeline order: while the graph keeps up, the groups the model actor applied
(:meth:`IndexActor.applied`) are handed on (``on_indexed``, to the publisher) only after the
items moved until then are re-linked, so a subscriber's list is not computed from a graph
that misses the moves it reflects. That wait is bounded by ``max_wait_items``: with more
items waiting for a re-link, the groups go on at once and the re-links follow (queries
re-score candidates with current vectors, so a stale link can only hide an item briefly,
while waiting for hundreds of re-links would hold every push for tens of milliseconds), and
at most ``max_pending`` applied records wait.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._messages import Applied
from ._model import Model
from ._worker import in_worker

__all__ = ["IndexActor"]

# Up to this many moved items are re-linked on the event loop (a worker thread's round trip costs
# more); more go to a worker thread, ``budget`` at a time.
INLINE_ITEMS = 4
# Moved items re-linked at most before a group's lists are computed (``max_wait_items``).
MAX_WAIT_ITEMS = 128


class IndexActor:
    """Args:
    model: The model whose index to maintain.
    budget: Items re-linked per worker-thread call.
    idle_wait: Seconds to wait for a wake-up before checking again when nothing is stale.
    on_indexed: Called in the event loop with the applied records whose moved items are
        re-linked now (in apply order). Must not block.
    max_wait_items: Moved items re-linked at most before waiting records are handed on;
        with more waiting, the records go on first.
    max_pending: Applied records waiting at most; beyond, they are handed on at once.
    """

    def __init__(
        self,
        model: Model,
        *,
        budget: int = 512,
        idle_wait: float = 0.05,
        on_indexed: Callable[[list[Applied]], None] | None = None,
        max_wait_items: int = MAX_WAIT_ITEMS,
        max_pending: int = 65_536,
    ) -> None:
        self._model = model
        self._budget = budget
        self._idle_wait = idle_wait
        self._on_indexed = on_indexed
        self._max_wait_items = max_wait_items
        self._max_pending = max_pending
        self._pending: list[Applied] = []
        self._wake = trio.Event()
        self.stale = 0
        self.busy = False  # re-linking in a worker thread

    def wake(self) -> None:
        """Tells the actor that vectors moved (called by the model actor; never blocks)."""
        self._wake.set()

    def applied(self, results: list[Applied]) -> None:
        """Queues the model actor's results for ``on_indexed`` once their moves are in the
        graph, and wakes the actor. Never blocks.

        When no moved item waits for a re-link (a catalog the exact scan serves, whose
        graph is not kept up to date, or a group that moved nothing) and no earlier record
        waits, the results are handed on at once: waiting for this actor's turn on the event
        loop would only delay the lists they change."""
        if not self._pending and self._model.stats()["index_stale"] == 0:
            if results and self._on_indexed is not None:
                self._on_indexed(results)
            self._wake.set()  # the actor still refreshes what it refreshes between groups
            return
        self._pending.extend(results)
        if len(self._pending) > self._max_pending:
            self._hand_on()  # bounded: the graph is behind, the lists go out anyway
        self._wake.set()

    def _hand_on(self) -> None:
        pending, self._pending = self._pending, []
        if pending and self._on_indexed is not None:
            self._on_indexed(pending)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            stale = self._model.stats()["index_stale"]
            waiting = len(self._pending)
            if waiting and stale > self._max_wait_items:
                self._hand_on()  # behind: the lists go now, the re-links follow
                waiting = 0
            while True:
                if stale <= INLINE_ITEMS:
                    # A worker thread's round trip costs more than re-linking these few.
                    self.stale = self._model.reindex(INLINE_ITEMS)
                else:
                    self.busy = True
                    try:
                        self.stale = await in_worker(self._model.reindex, self._budget)
                    finally:
                        self.busy = False
                if self.stale == 0 or not waiting:
                    break
                stale = self.stale
            # Everything moved by the first ``waiting`` records is re-linked: those go on;
            # records applied meanwhile wait for the next pass.
            if waiting:
                ready, self._pending = self._pending[:waiting], self._pending[waiting:]
                if self._on_indexed is not None:
                    self._on_indexed(ready)
            if self.stale == 0 and not self._pending:
                with trio.move_on_after(self._idle_wait):
                    await self._wake.wait()
