"""The Fluent Forward Protocol v1 listener (msgpack over TCP).

Any Fluentd / Fluent Bit logger can feed the engine. Per connection:

1. With a shared key configured, the handshake: the server sends
   ``["HELO", {"nonce", "auth", "keepalive"}]``, the client answers
   ``["PING", hostname, salt, sha512_hex(salt + hostname + nonce + key), user, password]`` and
   the server replies ``["PONG", ok, reason, server_hostname, sha512_hex(salt +
   server_hostname + nonce + key)]`` (spec v1, "Handshake Messages").
2. Frames are split from the byte stream and checked in Rust: every complete frame one read
   brought in a single call (``Model.check_frames``; a frame that may be compressed is
   checked alone, see below). They are journaled in one append, and once durable each frame
   that carried a ``chunk`` option is answered ``{"ack": chunk}``, the read's acks in one
   write.

While the journal append is pending the connection is not read, so a producer that outruns
the engine is slowed by TCP flow control. The buffer never exceeds one maximum frame plus one
read. A malformed or oversized frame closes the connection with a logged reason; frames before
it stand; other connections are unaffected. So does a frame that erases users or writes items
on a connection that did not authenticate with the admin key (while auth is on).

Limits against exhaustion: at most ``max_forward_connections`` connections are served at
once (see ``connectors._connections``); a connection that completes no frame within
``idle_timeout`` -- silent, or stalled inside a frame -- is closed with a logged reason; and
compressed frames are checked (which gunzips them) only within a budget shared by every
connection, ``max_decompressing_bytes``, so many gzip bombs at once cost one bomb's memory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
from typing import Any

import msgpack
import trio

from engine import Engine, InvalidFrame, JournalClosed, JournalFailed

from ._connections import ConnectionGate
from ._ratelog import RateLimitedLog

__all__ = ["ForwardServer"]

log = logging.getLogger("recstream.forward")

# Reads of several typical frames, so that one check, one journal append and one ack write
# serve them all.
READ_SIZE = 256 * 1024
# Frames within fewer bytes than this are checked on the event loop: the Rust check costs
# well under a microsecond per event, less than a worker-thread round trip.
INLINE_CHECK_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKE_BYTES = 4096
# What the Rust check gunzips a compressed frame to at most (its Limits default).
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024


def shared_key_digest(salt: bytes | str, hostname: str, nonce: bytes | str, key: str) -> str:
    """sha512_hex(salt + hostname + nonce + key), the handshake's proof of the shared key."""

    def b(x: bytes | str) -> bytes:
        return x if isinstance(x, bytes) else x.encode()

    return hashlib.sha512(b(salt) + b(hostname) + b(nonce) + b(key)).hexdigest()


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed with this reason."""


class IdleTimeout(Exception):
    """The peer completed no frame within ``idle_timeout``; the connection is closed."""


class ForwardServer:
    """Serves Forward connections for ``engine``: frames checked and logged through it."""

    def __init__(self, engine: Engine, max_connections: int) -> None:
        cfg = engine.config
        self._engine = engine
        self._admin_key = cfg.admin_key if cfg.auth_enabled else None
        self._keys = cfg.producer_keys + ((cfg.admin_key,) if cfg.admin_key else ())
        if not cfg.auth_enabled:
            self._keys = ()
        self._log = RateLimitedLog(log)
        self._hostname = socket.gethostname()
        self.connections = 0
        self.gate = ConnectionGate("forward", max_connections, engine.metrics)
        # Each compressed check may gunzip up to the decompressed limit: the budget in slots.
        self._decompressing = trio.CapacityLimiter(
            max(1, cfg.max_decompressing_bytes // MAX_DECOMPRESSED_BYTES)
        )

    async def serve(
        self,
        sock: socket.socket,
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accepts connections on the bound, listening ``sock`` until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                task_status.started(scope)
                await trio.serve_listeners(
                    self.gate.wrap(self._handle), [listener], handler_nursery=nursery
                )

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        peer = _peer(stream)
        try:
            async with stream:
                pending = b""
                admin = not self._keys
                if self._keys:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        pending, key = await self._handshake(stream)
                    admin = key == self._admin_key
                await self._serve_frames(stream, peer, pending, admin)
        except ProtocolError as e:
            self._log.log(logging.WARNING, "forward %s: closing: %s", peer, e)
            self._engine.metrics.rejects.labels("forward_protocol").inc()
        except trio.TooSlowError:
            self._log.log(logging.WARNING, "forward %s: closing: handshake timed out", peer)
        except IdleTimeout as e:
            self._log.log(logging.INFO, "forward %s: closing: %s", peer, e)
            self._engine.metrics.idle_closed.labels("forward").inc()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass  # the peer went away
        except (JournalClosed, JournalFailed) as e:
            log.warning("forward %s: closing: %s", peer, e)
        except Exception:
            # A bug met by one connection must not take the listener, and with it every
            # other producer, down: log it and close this connection only.
            self._log.log(
                logging.ERROR,
                "forward %s: closing after an unexpected error",
                peer,
                exc_info=True,
            )
            self._engine.metrics.rejects.labels("forward_protocol").inc()
        finally:
            self.connections -= 1

    async def _handshake(self, stream: trio.SocketStream) -> tuple[bytes, str]:
        """Authenticates the peer; returns the bytes it sent after its PING and its key."""
        nonce = os.urandom(16)
        helo = ["HELO", {"nonce": nonce, "auth": b"", "keepalive": True}]
        await stream.send_all(msgpack.packb(helo, use_bin_type=True))
        ping, pending = await _read_message(stream)
        if not (isinstance(ping, list) and len(ping) == 6 and ping[0] == "PING"):
            raise ProtocolError("expected PING")
        _, hostname, salt, digest, _user, _password = ping
        if not isinstance(hostname, str) or not isinstance(digest, str):
            raise ProtocolError("malformed PING")
        if not isinstance(salt, bytes | str):
            raise ProtocolError("malformed PING salt")
        key = next(
            (
                k
                for k in self._keys
                # As bytes: compare_digest refuses str with non-ASCII characters.
                if hmac.compare_digest(
                    digest.encode(), shared_key_digest(salt, hostname, nonce, k).encode()
                )
            ),
            None,
        )
        if key is not None:
            proof = shared_key_digest(salt, self._hostname, nonce, key)
            await stream.send_all(msgpack.packb(["PONG", True, "", self._hostname, proof]))
            return pending, key
        await stream.send_all(
            msgpack.packb(["PONG", False, "shared key mismatch", self._hostname, ""])
        )
        raise ProtocolError("shared key mismatch")

    async def _serve_frames(
        self, stream: trio.SocketStream, peer: str, pending: bytes, admin: bool
    ) -> None:
        """Journals and acks frames until the peer closes; ``pending`` was read already.

        Without ``admin``, a frame that erases users or writes items ends the connection.
        """
        engine = self._engine
        limit = engine.config.model.max_frame_bytes
        idle = engine.config.idle_timeout
        buf = bytearray(pending)
        # A frame must complete within ``idle`` of the previous one (or of the start): this
        # closes silent connections and frames that stall half-sent alike.
        deadline = trio.current_time() + idle
        while True:
            if buf:
                frames, chunks, entries, error = await self._split(buf, peer, admin)
                # Complete frames stand and are acked even when what follows them is bad:
                # they are durable, and an unacked chunk would be sent again.
                if frames:
                    await engine.append(frames, "forward", entries)
                    if chunks:  # every ack of the read in one write
                        await stream.send_all(b"".join(_ack(chunk) for chunk in chunks))
                    # From here: time spent waiting on the journal is not the peer's.
                    deadline = trio.current_time() + idle
                if error is not None:
                    raise ProtocolError(f"invalid frame: {error}")
                if len(buf) > limit:
                    raise ProtocolError(f"frame over the {limit}-byte limit")
            # Reading at least as much as is buffered makes re-checking a growing partial frame
            # cost O(frame) overall rather than O(frame^2) when the data is there to read.
            data = b""
            with trio.move_on_at(deadline) as waited:
                data = await stream.receive_some(max(READ_SIZE, len(buf)))
            if waited.cancelled_caught:
                state = f"{len(buf)} bytes of a frame stalled" if buf else "silent"
                raise IdleTimeout(f"no complete frame within {idle:g} s ({state})")
            if not data:
                if buf:
                    raise ProtocolError(f"connection closed inside a frame ({len(buf)} bytes)")
                return
            buf += data

    async def _split(
        self, buf: bytearray, peer: str, admin: bool
    ) -> tuple[list[bytes], list[str], int, str | None]:
        """Takes every complete frame off the front of ``buf``.

        Returns the frames, their chunk options, their entry count, and the reason the bytes
        after them can never be a frame (None when they are a frame still arriving).
        """
        model = self._engine.model
        frames: list[bytes] = []
        chunks: list[str] = []
        entries = 0
        # One copy of the buffer; frames are found by offset, so many small frames in one
        # read cost one pass rather than a copy of the rest of the buffer each.
        data = bytes(buf)
        offset = 0
        error: str | None = None
        # Where "gzip" next occurs: the bytes before it hold no compressed frame (searched
        # again only once passed, so the search costs one pass over the buffer).
        gzip_at = -1
        while offset < len(data) and error is None:
            if gzip_at < offset:
                gzip_at = data.find(b"gzip", offset)
                if gzip_at < 0:
                    gzip_at = len(data)
            checks: list[Any] = []  # check_frame's dicts
            if gzip_at > offset:
                # Every complete frame before the "gzip" is plain: all of them are checked
                # in one call, on the event loop when that is cheaper than a thread hop.
                if gzip_at - offset <= INLINE_CHECK_BYTES:
                    checks, error = model.check_frames(data, offset, gzip_at)
                else:
                    checks, error = await trio.to_thread.run_sync(
                        model.check_frames, data, offset, gzip_at
                    )
            more = False
            if error is None and gzip_at < len(data):
                # The next frame holds "gzip" and may be compressed: checking gunzips it,
                # so it is checked alone, within the budget and off the event loop.
                at = offset + sum(c["used"] for c in checks)
                checked: Any = None
                try:
                    checked = await trio.to_thread.run_sync(
                        model.check_frame, data, at, limiter=self._decompressing
                    )
                except InvalidFrame as e:
                    error = str(e)
                if checked is not None:
                    checks.append(checked)
                    more = True  # frames may follow it
            for checked in checks:
                refused = self._take(checked, peer, admin)
                if refused is not None:
                    error = refused
                    break
                used = checked["used"]
                frames.append(data[offset : offset + used])
                offset += used
                entries += checked["entries"]
                if checked["chunk"] is not None:
                    chunks.append(checked["chunk"])
            if not more:
                break  # the rest is a frame still arriving, or nothing
        del buf[:offset]
        return frames, chunks, entries, error

    def _take(self, checked: Any, peer: str, admin: bool) -> str | None:
        """Why a checked frame is refused on this connection (None: it is taken); logs the
        events the decoder refused inside it."""
        if checked["admin"] and not admin:
            self._engine.metrics.rejects.labels("auth").inc()
            return (
                f"entry {checked['admin'][0]} erases a user or writes an item, which needs "
                "the admin key as the shared key"
            )
        if checked["rejected"]:
            # Counted in the rejects metric once the model has applied the frame.
            idx, reason = checked["rejected"][0]
            self._log.log(
                logging.INFO,
                "forward %s: %d event(s) refused, first #%d: %s",
                peer,
                len(checked["rejected"]),
                idx,
                reason,
            )
        return None


async def _read_message(stream: trio.SocketStream) -> tuple[Any, bytes]:
    """One small msgpack message (the handshake's PING) and any bytes received after it.

    A producer may send its first frame right behind the PING; those bytes belong to the
    frame stream. Reading no more than ``MAX_HANDSHAKE_BYTES`` in all bounds the message.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HANDSHAKE_BYTES)
    received = bytearray()
    while len(received) < MAX_HANDSHAKE_BYTES:
        data = await stream.receive_some(MAX_HANDSHAKE_BYTES - len(received))
        if not data:
            raise ProtocolError("connection closed during the handshake")
        received += data
        unpacker.feed(data)
        try:
            for msg in unpacker:
                return msg, bytes(received[unpacker.tell() :])
        except ValueError as e:  # damaged msgpack, bad UTF-8, nesting too deep
            raise ProtocolError(f"malformed handshake message: {e}") from None
    raise ProtocolError("handshake message too large")


def _ack(chunk: str) -> bytes:
    return msgpack.packb({"ack": chunk})


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
