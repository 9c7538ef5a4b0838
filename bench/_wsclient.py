"""A minimal RFC 6455 websocket client without I/O, for the latency benchmark's load generator.

The load generator keeps thousands of subscriptions open from one single-threaded process; a
full websocket library (tasks, per-message objects, UTF-8 validation, a JSON decode) would
cost it about as much CPU as the server it measures. :class:`Client` is only the protocol:
the caller moves bytes between it and a socket (``receive(data)`` in, ``take_outgoing()``
out), so one ``selectors`` loop can drive any number of them.

What it does:

* the HTTP/1.1 upgrade (RFC 6455 section 4): a random ``Sec-WebSocket-Key``, then a refusal
  unless the answer is ``101`` with ``Upgrade: websocket``, ``Connection: upgrade`` and the
  ``Sec-WebSocket-Accept`` derived from that key;
* server frames (section 5): unmasked (a masked one is a protocol error), no extension
  bits, text and binary messages, fragmented ones reassembled (control frames may come
  between the fragments), each message at most ``max_message`` bytes;
* control frames: a ping is answered with a masked pong carrying the same payload; a close
  is answered with a masked close echoing its code, after which the connection is closed;
  ``close()`` starts the closing handshake from this side.

What it leaves out: extensions and subprotocols (none are offered), and the UTF-8 check of
text messages (their consumer decodes them and fails on bad UTF-8 itself).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os

__all__ = ["Client", "HandshakeFailed", "ProtocolError", "State", "accept_token", "frame"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_HEADER_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 1 << 20

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(ValueError):
    """Raised when the server breaks RFC 6455: a masked or malformed frame, a message over
    the size bound, a continuation with nothing to continue. The connection is unusable;
    close its socket."""


class HandshakeFailed(ProtocolError):
    """Raised when the server does not upgrade the connection: a status other than 101, a
    missing upgrade header, or a ``Sec-WebSocket-Accept`` that does not answer our key
    (``status`` is the HTTP status, 0 when the response could not be parsed)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class State(enum.Enum):
    CONNECTING = "connecting"  # the upgrade request is sent, its answer not yet read
    OPEN = "open"
    CLOSING = "closing"  # we sent a close and wait for the server's
    CLOSED = "closed"  # both closes exchanged (or the server's answered): close the socket


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; masked with the 4-byte ``mask`` (a client must mask every frame:
    random when None)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if not n:
        return head + mask
    # XOR with the key repeated to the payload's length, as one big-integer operation.
    keystream = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return head + mask + masked


class Client:
    """One client connection's protocol state.

    Args:
        host: The ``Host`` header (``HOST:PORT``).
        target: The request target, path and query (``/v1/ws/recommendations?user=7``).
        headers: Further request headers (name, value).
        max_message: Bytes a message may reach, fragments included.

    Attributes:
        state: See :class:`State`.
        close_code: The code of the server's close frame (1005 when it had none), or None.
        close_reason: Its reason text.
        pings: Pings answered so far.
    """

    def __init__(
        self,
        host: str,
        target: str,
        headers: tuple[tuple[str, str], ...] = (),
        max_message: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._key = base64.b64encode(os.urandom(16))
        self._max_message = max_message
        self.state = State.CONNECTING
        self.close_code: int | None = None
        self.close_reason = ""
        self.pings = 0
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragment_bytes = 0
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers),
        ]
        self._outgoing = bytearray(("\r\n".join(lines) + "\r\n\r\n").encode())

    @property
    def has_outgoing(self) -> bool:
        """Whether there are bytes for the socket (an answer to a ping or a close)."""
        return bool(self._outgoing)

    def take_outgoing(self) -> bytes:
        """The bytes to write to the socket now (and forgets them)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def close(self, code: int = 1000) -> None:
        """Starts the closing handshake (no-op unless open)."""
        if self.state is State.OPEN:
            self._outgoing += frame(CLOSE, code.to_bytes(2, "big"))
            self.state = State.CLOSING

    def receive(self, data: bytes) -> list[bytes]:
        """Feeds bytes read from the socket; returns the complete messages they finish (text
        and binary payloads alike), in order.

        Raises:
            HandshakeFailed: The upgrade was refused or answered wrongly.
            ProtocolError: The server broke the protocol.
        """
        buf = self._buffer + data if self._buffer else data
        if self.state is State.CONNECTING:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise HandshakeFailed("upgrade response headers too long")
                self._buffer = buf
                return []
            self._check_upgrade(buf[:end])
            self.state = State.OPEN
            buf = buf[end + 4 :]
        messages: list[bytes] = []
        pos, size = 0, len(buf)
        while size - pos >= 2 and self.state is not State.CLOSED:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise ProtocolError("the server masked a frame")
            if b0 & 0x70:
                raise ProtocolError("reserved bits set without an extension")
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n > self._max_message:
                raise ProtocolError(f"a frame of {n} bytes exceeds {self._max_message}")
            if size - pos < head + n:
                break
            payload = buf[pos + head : pos + head + n]
            pos += head + n
            message = self._on_frame(b0 & 0x80, b0 & 0x0F, payload)
            if message is not None:
                messages.append(message)
        self._buffer = buf[pos:] if pos < size else b""
        return messages

    def _on_frame(self, fin: int, opcode: int, payload: bytes) -> bytes | None:
        if opcode >= CLOSE:
            if not fin or len(payload) > 125:
                raise ProtocolError("a control frame fragmented or over 125 bytes")
            if opcode == PING:
                self.pings += 1
                if self.state is State.OPEN:
                    self._outgoing += frame(PONG, payload)
            elif opcode == CLOSE:
                self._on_close(payload)
            elif opcode != PONG:
                raise ProtocolError(f"unknown control opcode {opcode:#x}")
            return None
        if opcode == CONTINUATION:
            if self._fragments is None:
                raise ProtocolError("a continuation frame without a message to continue")
            self._fragment_bytes += len(payload)
            if self._fragment_bytes > self._max_message:
                raise ProtocolError(f"a fragmented message exceeds {self._max_message} bytes")
            self._fragments.append(payload)
            if not fin:
                return None
            message = b"".join(self._fragments)
            self._fragments = None
            return message
        if opcode not in (TEXT, BINARY):
            raise ProtocolError(f"unknown data opcode {opcode:#x}")
        if self._fragments is not None:
            raise ProtocolError("a new message began before the fragmented one ended")
        if fin:
            return payload
        self._fragments, self._fragment_bytes = [payload], len(payload)
        return None

    def _on_close(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise ProtocolError("a close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big") if payload else 1005
        self.close_code = code
        self.close_reason = payload[2:].decode("utf-8", "replace")
        if self.state is State.OPEN:
            # Echo the code (none if it sent none): the closing handshake's answer.
            self._outgoing += frame(CLOSE, payload[:2])
        self.state = State.CLOSED

    def _check_upgrade(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HandshakeFailed(f"not an HTTP response: {lines[0][:80]!r}")
        status = int(parts[1])
        if status != 101:
            raise HandshakeFailed(f"upgrade refused: {lines[0][:80]!r}", status)
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if fields.get("upgrade", "").lower() != "websocket":
            raise HandshakeFailed("101 without Upgrade: websocket", status)
        if "upgrade" not in fields.get("connection", "").lower():
            raise HandshakeFailed("101 without Connection: upgrade", status)
        if fields.get("sec-websocket-accept", "").encode() != accept_token(self._key):
            raise HandshakeFailed("Sec-WebSocket-Accept does not answer our key", status)
