"""Pushes written straight to a websocket's socket, when nothing else is writing to it.

Hypercorn sends a websocket message through five layers of Python (the ASGI send, a wsproto
event, a stream event, the connection's send lock, trio's ``send_all`` in a shielded cancel
scope), about 200 µs of CPU per message on a small machine, and the sending task must be woken
first. A pushed list is one complete text message, so when the connection is open, no send is
under way on it (Hypercorn's send lock is free and the subscriber's own task is not sending)
and the kernel has room for it, the message goes out in one non-blocking ``writev(2)`` from
the task that computed it: no task wake, no await. ``engine.write_text_frame`` does the
check of the socket's queue, the frame header and the write in one call. Otherwise the
message takes the ordinary ASGI send, from the subscriber's task.

Trio runs one task at a time, so a check and a write with no ``await`` between them cannot be
interleaved with another writer. The write is attempted only while the frame and whatever is
still queued on the socket fit in a quarter of its send buffer, so the kernel takes it whole
(a reader that stops reading soon leaves more than that queued, and its messages go the
ordinary way, where the send timeout catches it); should the kernel take only part (global
TCP memory pressure), the connection cannot be continued and is shut down, which ends that
subscriber's session the way a broken connection does.

Only Hypercorn's HTTP/1.1 websockets over plain TCP on trio are recognised, by type: another
server, TLS or HTTP/2 simply never takes this path. Frames are unmasked, unfragmented text
frames (RFC 6455 §5.2); where permessage-deflate was negotiated they are sent uncompressed
(RSV1 clear), which RFC 7692 §6 allows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from engine import write_text_frame

__all__ = ["DirectWriter", "KeepServerSend", "SERVER_SEND"]

log = logging.getLogger("recstream.web")

# The scope key under which a websocket's own ASGI send is kept (before the framework wraps it).
SERVER_SEND = "recstream.server_send"
# write(2) is attempted only while the frame and the bytes still queued on the socket (unsent
# or unacknowledged) fit in this share of the socket's send buffer: the kernel, which counts
# its own overhead per segment against the buffer, then takes the frame whole.
BUFFER_SHARE = 4
# What ``engine.write_text_frame`` reports.
DECLINED, WRITTEN, CUT_SHORT = 0, 1, 2


class DirectWriter:
    """Writes whole messages to one Hypercorn websocket while that is safe (see the module).

    Args:
        stream: Hypercorn's websocket stream (the ASGI ``send``'s owner).
        lock: The connection's send lock, held by Hypercorn while it writes.
        sock: The connection's socket. Its descriptor is read at every write: once the
            socket is closed it is -1, where a number kept from before could already
            belong to another connection.
    """

    def __init__(self, stream: Any, lock: trio.Lock, sock: trio.socket.SocketType) -> None:
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
        from wsproto.connection import ConnectionState

        self._stream = stream
        self._lock = lock
        self._socket = sock
        self._connected = ASGIWebsocketState.CONNECTED
        self._open = ConnectionState.OPEN
        self._limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // BUFFER_SHARE
        # True while the subscriber's task sends (its first list, or one this writer could
        # not take): a later message must not overtake it.
        self.busy = True
        self.written = 0  # messages written here
        self.declined = 0  # messages left to the ASGI send

    @classmethod
    def find(cls, send: Callable[[Any], Awaitable[None]] | None) -> DirectWriter | None:
        """The writer behind ``send`` (the server's own ASGI send of a websocket), or None
        when that is not a Hypercorn HTTP/1.1 websocket on a plain trio socket."""
        try:
            from hypercorn.protocol.h11 import H11Protocol
            from hypercorn.protocol.ws_stream import WSStream
            from hypercorn.trio.tcp_server import TCPServer
        except ImportError:  # pragma: no cover - hypercorn is a dependency
            return None
        stream = getattr(send, "__self__", None)
        if not isinstance(stream, WSStream):
            return None
        protocol = getattr(stream.send, "__self__", None)
        if not isinstance(protocol, H11Protocol):
            return None
        server = getattr(protocol.send, "__self__", None)
        if not isinstance(server, TCPServer) or not isinstance(server.stream, trio.SocketStream):
            return None
        lock = getattr(server, "send_lock", None)
        if not isinstance(lock, trio.Lock):
            return None
        return cls(stream, lock, server.stream.socket)

    def try_write(self, text: str) -> bool:
        """Writes ``text`` as one message if that can be done at once and whole; False:
        nothing was written, send it the ordinary way."""
        stream = self._stream
        if (
            self.busy
            or self._lock.locked()
            or stream.closed
            or stream.state is not self._connected
            or stream.connection.state is not self._open
        ):
            self.declined += 1
            return False
        fd = self._socket.fileno()
        if fd < 0:  # closed
            self.declined += 1
            return False
        outcome = write_text_frame(fd, text, self._limit)
        if outcome == DECLINED:  # full or broken: the subscriber's task finds out by itself
            self.declined += 1
            return False
        if outcome == CUT_SHORT:
            log.warning("a push was cut short by the kernel; closed that subscriber")
            self.busy = True  # nothing more can be sent on this connection
            return True
        self.written += 1
        return True


class KeepServerSend:
    """ASGI middleware: keeps the server's own ``send`` of every websocket in its scope
    (``SERVER_SEND``), where :meth:`DirectWriter.find` looks for it."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope[SERVER_SEND] = send
        await self.app(scope, receive, send)
