"""The node: an :class:`engine.Engine` with its listeners, as ``recstream serve`` runs it.

Start-up: the engine recovers (snapshot, then the log's replay) and starts its actors; then
the Fluent Forward and HTTP/websocket listeners open. Shutdown (SIGINT/SIGTERM or
:meth:`Node.shutdown`): the Forward listener stops, the engine stops accepting, drains the
log into the model, snapshots and closes subscribers with 1001; then the HTTP server stops.

Connections are limited per listener (``connectors._connections``): the open-file limit is
raised as far as allowed and shared between Forward and HTTP connections.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from engine import ConfigError, Engine, FileOps, JournalFailed, Log, ServerConfig

from ._connections import ConnectionGate, default_connection_limits, raise_nofile_limit
from .forward import ForwardServer
from .http import build_app

__all__ = ["Node", "serve"]

log = logging.getLogger("recstream.server")

# Connections the kernel completes while the server has not accepted them yet. A burst of
# thousands of subscribers connecting at once (a restart, a reconnect storm) overflows a
# short queue; the kernel then drops handshakes and clients retry only after a second or
# more. The kernel caps this at net.core.somaxconn (4096 on current Linux).
LISTEN_BACKLOG = 65535


def _listening_socket(host: str, port: int, user_timeout_ms: int) -> socket.socket:
    """A bound, listening TCP socket; accepted connections inherit TCP_USER_TIMEOUT, so the
    kernel aborts a peer that stops acknowledging what we send."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def _serve_http(
    app: Any,
    hc: HypercornConfig,
    sock: socket.socket,
    gate: ConnectionGate,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn's trio worker loop for one plain-HTTP socket, with ``gate`` on its accepts.

    Hypercorn's ``worker_serve`` builds its listeners itself, leaving no place to limit the
    connections; this is its accept loop and graceful stop, minus lifespan events (the app
    has none), TLS and QUIC. On ``stop``: no new connections, open ones get
    ``graceful_timeout`` seconds to finish.
    """
    context = WorkerContext(None)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    handler = functools.partial(TCPServer, app, hc, context, ConnectionState({}))
    host, port = sock.getsockname()[:2]
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(
                functools.partial(
                    trio.serve_listeners,
                    gate.wrap(handler),
                    [listener],
                    handler_nursery=connections,
                )
            )
            task_status.started(
                f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            )
            await stop.wait()
            accepting.cancel_scope.cancel()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + hc.graceful_timeout


class Node:
    """One recstream node: an :class:`engine.Engine` and its listeners.

    ``await nursery.start(node.run)`` returns once it serves.

    Attributes (valid after start):
        engine: The engine.
        http_url: ``http://host:port`` of the HTTP and websocket listener.
        forward_address: (host, port) of the Fluent Forward listener.
        forward_gate, http_gate: The listeners' connection limits.

    Args:
        config: The configuration.
        log: The engine's log (None: the local journal in ``config.data_dir``).
        file_ops: The system calls the journal and snapshots write and sync through (the
            real ones by default; fault drills pass a ``FaultyFileOps``).
    """

    def __init__(
        self, config: ServerConfig, *, log: Log | None = None, file_ops: FileOps | None = None
    ) -> None:
        self.engine = Engine(config, log=log, file_ops=file_ops)
        self.config = self.engine.config
        self.http_url = ""
        self.forward_address: tuple[str, int] = ("", 0)
        self.forward_gate: ConnectionGate | None = None
        self.http_gate: ConnectionGate | None = None

    def shutdown(self) -> None:
        """Starts an orderly shutdown (safe to call more than once)."""
        self.engine.shutdown()

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Starts the engine and the listeners, serves until :meth:`shutdown`, stops in
        order."""
        cfg = self.config
        engine = self.engine
        nofile = raise_nofile_limit()
        fwd_limit, http_limit = default_connection_limits(nofile)
        http_stop = trio.Event()

        async def run_engine(*, task_status: trio.TaskStatus[Engine]) -> None:
            try:
                await engine.run(task_status=task_status)
            finally:
                # The engine drained, snapshotted and closed its subscribers: HTTP stops.
                http_stop.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(run_engine)  # recovered: now the listeners open
            http_sock = _listening_socket(cfg.http_host, cfg.http_port, cfg.tcp_user_timeout_ms)
            fwd_sock = _listening_socket(
                cfg.forward_host, cfg.forward_port, cfg.tcp_user_timeout_ms
            )
            forward = ForwardServer(engine, cfg.max_forward_connections or fwd_limit)
            self.forward_gate = forward.gate
            self.http_gate = ConnectionGate(
                "http", cfg.max_http_connections or http_limit, engine.metrics
            )
            log.info(
                "open-file limit %d: up to %d Forward and %d HTTP connections",
                nofile,
                forward.gate.limit,
                self.http_gate.limit,
            )
            hc = _hypercorn_config(cfg)
            app = build_app(engine)
            async with trio.open_nursery() as listeners:
                forward_scope = await listeners.start(forward.serve, fwd_sock)
                self.http_url = await nursery.start(
                    _serve_http,
                    wrap_app(app, hc.wsgi_max_body_size, None),  # type: ignore[arg-type]
                    hc,
                    http_sock,
                    self.http_gate,
                    http_stop,
                )
                host, port = fwd_sock.getsockname()[:2]
                self.forward_address = (host, port)
                log.info("serving HTTP on %s, Forward on %s:%d", self.http_url, host, port)
                task_status.started(self)
                await engine.stopping.wait()
                forward_scope.cancel()


def _hypercorn_config(cfg: ServerConfig) -> HypercornConfig:
    """Hypercorn's settings for the HTTP listener."""
    hc = HypercornConfig()
    hc.websocket_max_message_size = cfg.max_body_bytes
    hc.h11_max_incomplete_size = 64 * 1024
    hc.graceful_timeout = 2.0
    # Idle connections: a keep-alive connection between requests, or one stalled inside
    # its request headers, is closed after the keep-alive timeout; one that sends nothing
    # for ``idle_timeout`` (a body or websocket frame stalled half-sent, a subscriber that
    # stopped answering the pings sent every third of it) after the read timeout.
    idle = cfg.idle_timeout
    hc.keep_alive_timeout = min(5.0, idle)
    hc.read_timeout = idle  # type: ignore[assignment]
    hc.websocket_ping_interval = idle / 3
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve(config: ServerConfig, demo_rate: float = 0.0, log: Log | None = None) -> None:
    """Runs a node until SIGINT or SIGTERM, then shuts it down in order.

    With ``demo_rate`` > 0 a synthetic stream is fed at that many events per second. ``log``
    replaces the local journal (``recstream serve --log``).
    """
    server = Node(config, log=log)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            if demo_rate > 0:
                nursery.start_soon(server.engine.feed_demo, demo_rate)
            print(f"recstream serving\n  dashboard and API: {server.http_url}/")
            print(f"  Fluent Forward:    {server.forward_address[0]}:{server.forward_address[1]}")
            if server.config.insecure:
                print("  auth is OFF (no keys configured; listening on loopback only)")
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    server.shutdown()
                    break
    except BaseExceptionGroup as group:
        # A refused start is one ConfigError, and a node stopped by a sync fault after
        # apply one JournalFailed: raise it as such, so the CLI prints one line.
        for kind in (ConfigError, JournalFailed):
            found = group.subgroup(kind)
            leaves = list(_leaves(found)) if found is not None else []
            if len(leaves) == 1 and _only(group, kind):
                raise leaves[0] from None
        raise


def _only(group: BaseExceptionGroup[Any], kind: type[BaseException]) -> bool:
    """Whether every exception in ``group`` is a ``kind``."""
    return group.subgroup(lambda e: not isinstance(e, (kind, BaseExceptionGroup))) is None


def _leaves(group: BaseExceptionGroup[Any]) -> Any:
    """The exceptions inside a (nested) group."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
