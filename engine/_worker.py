"""The engine's own hop to a worker thread, for the actors' hot calls.

``trio.to_thread.run_sync`` does a good deal per call besides handing the function to a
cached thread: it takes a token of a capacity limiter, copies the context, sets thread-local
state for ``trio.from_thread``, formats a name for the thread and gives it to the OS (two
``prctl`` calls per job, one to set it and one to reset it). Under load the actors make a few
thousand such calls a second (each group applied, each chunk of lists, each sync), and the
naming alone was about 3 % of the server's CPU samples at 10,000 events/s. :func:`in_worker`
keeps only the hand-over: the function runs in one of trio's cached threads, its outcome comes
back to the waiting task.

It is meant for calls whose number is bounded by the caller (an actor awaits one at a time),
so it needs no limiter; calls made per connection keep ``trio.to_thread.run_sync`` and its
limiter. Like that function's default, the call cannot be cancelled while it runs in the
thread: a cancellation is raised at the caller's next checkpoint, once it has returned. The
function must not use ``trio.from_thread``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome

__all__ = ["in_worker"]

T = TypeVar("T")


async def in_worker(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread; its result, or its exception raised here."""
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
    result: T = await trio.lowlevel.wait_task_rescheduled(
        lambda _: trio.lowlevel.Abort.FAILED  # the thread cannot be stopped: wait for it
    )
    return result
