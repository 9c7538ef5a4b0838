"""Per-listener connection limits and the process's file-descriptor budget.

Every accepted connection costs a file descriptor. Without a cap, a flood of idle connections
uses them all: ``accept`` then fails with EMFILE, and so does everything else that opens a file
-- the journal, snapshots, the HTTP listener's own connections. Each listener therefore admits
at most a configured number of connections at once; beyond that a connection is accepted and
closed at once (the peer sees the close, not a hang, and the backlog keeps draining), counted
in ``recstream_connections_refused_total`` and reported by at most one log line per
``LOG_EVERY`` seconds. The defaults share the descriptor limit between the two listeners,
most of it for HTTP (every websocket subscriber holds a connection, producers are few), and
keep a reserve for the journal, snapshots, worker threads and the interpreter.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Awaitable, Callable

import attrs
import trio

from engine import Metrics

__all__ = ["ConnectionGate", "default_connection_limits", "raise_nofile_limit"]

log = logging.getLogger("recstream.connections")

# Seconds between log lines about refused connections (the metric counts every one).
LOG_EVERY = 10.0
# Descriptors kept back from the listeners: journal segments, snapshots, worker threads,
# the interpreter's own files, plus a tenth of the limit.
RESERVED_FDS = 128
# The Forward listener's share of the descriptors left for connections; HTTP gets the rest.
FORWARD_SHARE = 8


def raise_nofile_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.

    The soft limit is often 1024 while the hard one is far higher; a server holding thousands
    of connections needs the latter. Failing to raise it is not an error: the connection
    limits are derived from whatever limit holds.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_connection_limits(nofile: int) -> tuple[int, int]:
    """Forward and HTTP connection limits for a process allowed ``nofile`` descriptors.

    A reserve (``RESERVED_FDS`` plus a tenth) stays free for everything but connections. Of
    the rest, an eighth goes to Forward (a few producers, each sending many events) and the
    others to HTTP, where every subscriber holds a websocket: 20,000 descriptors give 2,234
    Forward and 15,638 HTTP connections, room for the default ``max_subscribers`` (10,000)
    beside the requests (an even split gave HTTP 8,936). Each listener has its own limit,
    so a flood on one cannot starve the other.
    """
    spare = max(nofile - RESERVED_FDS - nofile // 10, 32)
    forward = max(spare // FORWARD_SHARE, 16)
    return forward, max(spare - forward, 16)


@attrs.define
class ConnectionGate:
    """Admits at most ``limit`` concurrent connections to one listener.

    Attributes:
        listener: The listener's name in logs and metrics ("forward", "http").
        limit: Connections served at once; the next one is closed on arrival.
        metrics: Where admissions and refusals are counted.
        open: Connections being served now.
        refused: Connections refused since the start.
    """

    listener: str
    limit: int
    metrics: Metrics
    open: int = 0
    refused: int = 0
    _logged_at: float = -LOG_EVERY
    _refused_at_log: int = 0

    def __attrs_post_init__(self) -> None:
        self.metrics.connections.labels(self.listener).set_function(lambda: self.open)

    def wrap(
        self, handler: Callable[[trio.SocketStream], Awaitable[object]]
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        """``handler`` behind the gate: over the limit, the stream is closed unserved."""

        async def gated(stream: trio.SocketStream) -> None:
            if self.open >= self.limit:
                await self._refuse(stream)
                return
            self.open += 1
            try:
                await handler(stream)
            finally:
                self.open -= 1

        return gated

    async def _refuse(self, stream: trio.SocketStream) -> None:
        self.refused += 1
        self.metrics.connections_refused.labels(self.listener).inc()
        now = trio.current_time()
        if now - self._logged_at >= LOG_EVERY:
            log.warning(
                "%s: %d connection(s) refused: %d open, the limit is %d",
                self.listener,
                self.refused - self._refused_at_log,
                self.open,
                self.limit,
            )
            self._logged_at = now
            self._refused_at_log = self.refused
        # Closed without a graceful shutdown: nothing was promised to this peer.
        await trio.aclose_forcefully(stream)
