"""Clients for applications: a Fluent Forward producer and a recommendations subscriber.

``ForwardProducer`` batches events into PackedForward frames with a ``chunk`` id each, keeps
up to ``window`` frames in flight, and on a broken connection reconnects and resends every
frame not yet acknowledged. Give events an ``"id"`` and resends are applied once.

``subscribe`` yields a user's list every time it changes.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import msgpack
import trio

__all__ = ["ForwardProducer", "HandshakeRefused", "pack_entries", "subscribe"]


class HandshakeRefused(PermissionError):
    """Raised when the server refuses the producer: a wrong shared key, a key the server does
    not expect, or none where it requires one. Retrying cannot help, so it is never retried."""


def _event_time(ts: float) -> msgpack.ExtType:
    """Fluent EventTime: ext type 0, big-endian seconds and nanoseconds."""
    secs = int(ts)
    nanos = int(round((ts - secs) * 1e9)) % 1_000_000_000
    return msgpack.ExtType(0, secs.to_bytes(4, "big") + nanos.to_bytes(4, "big"))


def pack_entries(events: Iterable[Mapping[str, Any]], now: float | None = None) -> bytes:
    """Concatenated ``[time, record]`` entries: the body of a PackedForward frame.

    An event's ``"time"`` key, if any, becomes the entry time (else ``now``).
    """
    t0 = time.time() if now is None else now
    packer = msgpack.Packer(use_bin_type=True)
    out = bytearray()
    for e in events:
        record = {k: v for k, v in e.items() if k != "time"}
        out += packer.pack([_event_time(float(e.get("time", t0))), record])
    return bytes(out)


class ForwardProducer:
    """Sends events to a recstream (or any Fluent Forward v1) server, at least once.

    Args:
        host, port: The server's Forward listener.
        tag: The frames' tag; event ids are de-duplicated per tag.
        shared_key: The server's producer key, when it requires the handshake.
        window: Frames sent but not yet acknowledged before ``send`` waits.
        reconnect_delay: Seconds before the first reconnection attempt (doubles to 5 s).
        connect_timeout: Seconds to keep trying to connect (and to finish the handshake)
            before raising ``ConnectionError``; None retries forever, which suits a long-lived
            producer riding out server restarts, not a command a person waits on.

    Raises:
        HandshakeRefused: from any call, when the server refuses the shared key.
        ConnectionError: when no connection could be made within ``connect_timeout``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tag: str = "recstream",
        shared_key: str | None = None,
        window: int = 16,
        reconnect_delay: float = 0.1,
        connect_timeout: float | None = None,
    ) -> None:
        self._addr = (host, port)
        self._tag = tag
        self._key = shared_key
        self._window = window
        self._delay = reconnect_delay
        self._connect_timeout = connect_timeout
        self._stream: trio.SocketStream | None = None
        self._unacked: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._acked = trio.Event()
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 16)
        self._seq = 0
        self._prefix = base64.b64encode(os.urandom(6)).decode()
        self.sent_frames = 0
        self.acked_frames = 0
        self.reconnects = 0

    async def __aenter__(self) -> ForwardProducer:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def _connect(self) -> None:
        delay = self._delay
        timeout = self._connect_timeout
        deadline = trio.current_time() + (timeout if timeout is not None else float("inf"))
        while True:
            try:
                with trio.fail_after(max(0.0, deadline - trio.current_time())):
                    self._stream = await trio.open_tcp_stream(*self._addr)
                    self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 16)
                    if self._key is not None:
                        await self._handshake()
                return
            except HandshakeRefused:
                raise
            except trio.TooSlowError:
                raise ConnectionError(
                    f"no connection to {self._addr[0]}:{self._addr[1]} within {timeout:g} s"
                    + (" (no HELO: does the server expect a shared key?)" if self._key else "")
                ) from None
            except OSError as e:
                if self._stream is not None:
                    await self._stream.aclose()
                    self._stream = None
                if trio.current_time() + delay > deadline:
                    raise ConnectionError(
                        f"no connection to {self._addr[0]}:{self._addr[1]}"
                        f" within {timeout:g} s: {e.strerror or e}"
                    ) from None
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _handshake(self) -> None:
        helo = await self._read()
        if not (isinstance(helo, list) and helo and helo[0] == "HELO"):
            raise ConnectionError(f"expected HELO, got {helo!r}")
        nonce = helo[1]["nonce"]
        salt = os.urandom(16)
        host = socket.gethostname() + "-producer"
        nonce_b = nonce if isinstance(nonce, bytes) else nonce.encode()
        assert self._key is not None
        digest = hashlib.sha512(salt + host.encode() + nonce_b + self._key.encode()).hexdigest()
        assert self._stream is not None
        await self._stream.send_all(
            msgpack.packb(["PING", host, salt, digest, "", ""], use_bin_type=True)
        )
        pong = await self._read()
        if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == "PONG"):
            raise ConnectionError(f"expected PONG, got {pong!r}")
        if not pong[1]:
            raise HandshakeRefused(str(pong[2] or "shared key refused"))

    async def _read(self) -> Any:
        assert self._stream is not None
        while True:
            for msg in self._unpacker:
                return msg
            data = await self._stream.receive_some(4096)
            if not data:
                raise ConnectionError("server closed the connection")
            self._unpacker.feed(data)

    async def send(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Queues one frame of events; returns once it is sent (not yet acknowledged) and at
        most ``window`` frames await acknowledgement."""
        self._seq += 1
        chunk = f"{self._prefix}-{self._seq}"
        body = pack_entries(events)
        frame = msgpack.packb([self._tag, body, {"chunk": chunk}], use_bin_type=True)
        self._unacked[chunk] = frame
        await self._write(frame)
        self.sent_frames += 1
        while len(self._unacked) > self._window:
            await self._read_acks()

    async def flush(self) -> None:
        """Waits until every frame sent so far is acknowledged (durable on the server)."""
        while self._unacked:
            await self._read_acks()

    async def _write(self, frame: bytes) -> None:
        while True:
            if self._stream is None:
                await self._reconnect()
            assert self._stream is not None
            try:
                await self._stream.send_all(frame)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._reconnect()
                return  # _reconnect resent everything unacked, this frame included

    async def _read_acks(self) -> None:
        try:
            msg = await self._read()
        except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._reconnect()
            return
        if isinstance(msg, list) and msg and msg[0] == "HELO":
            raise HandshakeRefused("the server requires a shared key and none was given")
        if isinstance(msg, dict) and "ack" in msg:
            if self._unacked.pop(msg["ack"], None) is not None:
                self.acked_frames += 1

    async def _reconnect(self) -> None:
        if self._stream is not None:
            with trio.move_on_after(1):
                await self._stream.aclose()
            self._stream = None
        self.reconnects += 1
        await self._connect()
        assert self._stream is not None
        for frame in list(self._unacked.values()):
            await self._stream.send_all(frame)


async def subscribe(
    base_url: str,
    user: str | int,
    *,
    k: int = 10,
    token: str | None = None,
    key: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yields ``user``'s list on connect and again whenever it changes.

    ``base_url`` is the server's ``http://host:port``. Needs the ``trio-websocket`` package.
    """
    from trio_websocket import open_websocket_url

    ws_url = base_url.replace("http", "ws", 1) + f"/v1/ws/recommendations?user={user}&k={k}"
    if token:
        ws_url += f"&token={token}"
    if key:
        ws_url += f"&key={key}"
    async with open_websocket_url(ws_url) as ws:
        while True:
            yield json.loads(await ws.get_message())
