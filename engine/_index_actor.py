"""The index actor: re-links moved item vectors in the HNSW graph, in bounded batches.

The model actor moves item vectors on every event; re-linking each one in the graph costs far
more than the move, so it is done here, off the event path, a batch of ``budget`` items per
worker-thread call (the extension locks the graph per item, so queries keep running). The
index trails the model by at most the items moved since the last batch started; queries
re-score candidates with current vectors, so staleness can only hide an item briefly.
"""

from __future__ import annotations

import trio

from ._model import Model

__all__ = ["IndexActor"]


class IndexActor:
    """Args:
    model: The model whose index to maintain.
    budget: Items re-linked per worker-thread call.
    idle_wait: Seconds to wait for a wake-up before checking again when nothing is stale.
    """

    def __init__(self, model: Model, *, budget: int = 512, idle_wait: float = 0.05) -> None:
        self._model = model
        self._budget = budget
        self._idle_wait = idle_wait
        self._wake = trio.Event()
        self.stale = 0

    def wake(self) -> None:
        """Tells the actor that vectors moved (called by the model actor; never blocks)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            self.stale = await trio.to_thread.run_sync(self._model.reindex, self._budget)
            if self.stale == 0:
                with trio.move_on_after(self._idle_wait):
                    await self._wake.wait()
