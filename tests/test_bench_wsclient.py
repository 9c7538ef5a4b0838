"""The load generator's websocket client (bench._wsclient): against a real server, against a
scripted peer on a real socket that fragments a message and pings between the fragments,
and against malformed answers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest
import trio

from bench._loadgen import items_of, parse_push
from bench._wsclient import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Client,
    HandshakeFailed,
    ProtocolError,
    State,
    accept_token,
    frame,
)

from .conftest import running_server

WAIT = 10.0  # seconds any single answer may take on a loaded machine


async def exchange(stream: trio.SocketStream, ws: Client) -> list[bytes]:
    """Writes what the client has to say, then reads until it has at least one message."""
    out = ws.take_outgoing()
    if out:
        await stream.send_all(out)
    with trio.fail_after(WAIT):
        while True:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection"
            messages = ws.receive(data)
            out = ws.take_outgoing()
            if out:
                await stream.send_all(out)
            if messages or ws.state is State.CLOSED:
                return messages


async def test_subscription_to_a_real_server_pushes_and_pings(tmp_path: Path) -> None:
    """Upgrade, the first list, a push caused by our event (read by the cheap parse, as
    json.loads reads it), the server's pings answered so that it keeps the connection, and
    a closing handshake started by the client."""
    idle = 0.6  # the server pings every third of it and drops a client that does not answer
    async with running_server(tmp_path / "d", idle_timeout=idle) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
            warm = [{"user": f"u{u}", "item": f"i{(u + j) % 9}"} for u in range(6) for j in (0, 1)]
            assert (await http.post("/v1/events", content=json.dumps(warm))).status_code == 202
            host, port = server.http_url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            ws = Client(f"{host}:{port}", "/v1/ws/recommendations?user=u1&k=3")
            first = await exchange(stream, ws)
            assert ws.state is State.OPEN and len(first) == 1
            version, cause, items = parse_push(first[0])
            doc = json.loads(first[0])
            assert (version, cause, items_of(items)) == (
                doc["version"],
                None,
                [x["item"] for x in doc["items"]],
            )
            assert items_of(items), "u1 has a list after the warm-up"
            # Outlast several ping intervals (reading, so answering them), then prove the
            # server still pushes to us.
            with trio.move_on_after(idle * 2):
                while True:
                    await exchange(stream, ws)
            top = items_of(items)[0]
            event = {"user": "u1", "item": top, "type": "click", "id": 'e-"1"-é'}
            assert (await http.post("/v1/events", content=json.dumps([event]))).status_code == 202
            cause = None
            while cause != event["id"]:
                for message in await exchange(stream, ws):
                    v, cause, items = parse_push(message)
                    doc = json.loads(message)
                    assert (v, cause) == (doc["version"], (doc["cause"] or {}).get("id"))
                    assert items_of(items) == [x["item"] for x in doc["items"]]
            assert ws.pings >= 2  # pings came and were answered: we were not dropped
            ws.close(1000)
            assert ws.state is State.CLOSING
            while ws.state is not State.CLOSED:
                await exchange(stream, ws)
            assert ws.close_code == 1000
            await stream.aclose()


def unmask(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of each client frame in ``data``, checking each is masked."""
    out, pos = [], 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "a client frame must be masked"
        n, pos = b1 & 0x7F, pos + 2
        assert n < 126
        mask, pos = data[pos : pos + 4], pos + 4
        out.append((b0 & 0x0F, bytes(x ^ mask[i % 4] for i, x in enumerate(data[pos : pos + n]))))
        pos += n
    return out


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked frame, as a server sends it (payloads under 64 KiB)."""
    n = len(payload)
    length = bytes((n,)) if n < 126 else bytes((126,)) + n.to_bytes(2, "big")
    return bytes(((0x80 if fin else 0) | opcode,)) + length + payload


async def test_fragmented_message_with_a_ping_between_fragments() -> None:
    """A scripted peer on a real socket: a text message in three fragments (one over 125
    bytes, so with a 16-bit length) with a ping between them, then a close. The client
    reassembles the message, answers the ping with a masked pong of the same payload before
    the message completes, and echoes the close code masked."""
    message = json.dumps({"user": 1, "items": [{"item": n, "score": 0.5} for n in range(20)]})
    body = message.encode()
    parts = [body[:5], body[5:150], body[150:]]
    seen: list[tuple[int, bytes]] = []
    done = trio.Event()

    async def peer(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = [
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        ][0]
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        await stream.send_all(server_frame(TEXT, parts[0], fin=False))
        await stream.send_all(server_frame(PING, b"are you there"))
        # The pong arrives while the message is still incomplete.
        with trio.fail_after(WAIT):
            got = b""
            while len(unmask_prefix(got)) < 1:
                got += await stream.receive_some(4096)
        seen.extend(unmask(got))
        await stream.send_all(server_frame(0, parts[1], fin=False))
        await stream.send_all(server_frame(0, parts[2], fin=True))
        await stream.send_all(server_frame(CLOSE, (1001).to_bytes(2, "big") + b"bye"))
        with trio.fail_after(WAIT):
            got = b""
            while len(unmask_prefix(got)) < 1:
                got += await stream.receive_some(4096)
        seen.extend(unmask(got))
        await stream.aclose()
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, peer, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = Client(f"127.0.0.1:{port}", "/x")
        messages: list[bytes] = []
        while ws.state is not State.CLOSED:
            messages += await exchange(stream, ws)
        await done.wait()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert messages == [body]
    assert ws.pings == 1
    assert seen == [(PONG, b"are you there"), (CLOSE, (1001).to_bytes(2, "big"))]
    assert (ws.close_code, ws.close_reason) == (1001, "bye")


def unmask_prefix(data: bytes) -> list[tuple[int, bytes]]:
    """The complete client frames at the start of ``data`` (none while still partial)."""
    if len(data) < 2 or len(data) < 6 + (data[1] & 0x7F):
        return []
    return unmask(data[: 6 + (data[1] & 0x7F)])


def upgraded(ws: Client) -> None:
    """Feeds a valid 101 answer to ``ws``."""
    key = ws.take_outgoing().split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    ws.receive(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n\r\n"
    )
    assert ws.state is State.OPEN


def test_handshake_refusals() -> None:
    ws = Client("h:1", "/")
    with pytest.raises(HandshakeFailed) as e:
        ws.receive(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert e.value.status == 403
    ws = Client("h:1", "/")
    with pytest.raises(HandshakeFailed, match="Accept"):
        ws.receive(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_token(b"someone else's key") + b"\r\n\r\n"
        )
    # The RFC 6455 section 1.3 example.
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    # Headers split across reads, then frames in the same read as the end of the headers.
    ws = Client("h:1", "/")
    key = ws.take_outgoing().split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n\r\n"
    )
    assert ws.receive(answer[:20]) == []
    assert ws.receive(answer[20:] + server_frame(TEXT, b"a")) == [b"a"]


def test_frames_split_anywhere_and_protocol_errors() -> None:
    ws = Client("h:1", "/")
    upgraded(ws)
    big = os.urandom(70_000)  # a 64-bit length
    data = server_frame(TEXT, b"x" * 200) + server_frame(BINARY, b"")
    data += bytes((0x80 | BINARY, 127)) + len(big).to_bytes(8, "big") + big
    got: list[bytes] = []
    for n in range(0, len(data), 7):
        got += ws.receive(data[n : n + 7])
    assert got == [b"x" * 200, b"", big]
    for bad, why in (
        (bytes((0x81, 0x81)) + b"mask" + b"x", "masked"),
        (bytes((0xC1, 0x01)) + b"x", "reserved"),
        (server_frame(0, b"x"), "continuation"),
        (server_frame(PING, b"x", fin=False), "control"),
        (server_frame(PING, b"x" * 126), "control"),
        (server_frame(TEXT, b"a", fin=False) + server_frame(TEXT, b"b"), "began"),
        (server_frame(0x3, b""), "opcode"),
    ):
        ws = Client("h:1", "/")
        upgraded(ws)
        with pytest.raises(ProtocolError, match=why):
            ws.receive(bad)
    ws = Client("h:1", "/", max_message=10)
    upgraded(ws)
    with pytest.raises(ProtocolError, match="exceeds"):
        ws.receive(server_frame(TEXT, b"12345", fin=False) + server_frame(0, b"123456"))


def test_client_frames_are_masked() -> None:
    for n in (0, 5, 125, 126, 70_000):
        payload = os.urandom(n)
        data = frame(TEXT, payload, mask=b"\x01\x02\x03\x04")
        head = 2 if n < 126 else 4 if n < 1 << 16 else 10
        assert data[0] == 0x80 | TEXT and data[1] & 0x80
        assert data[head : head + 4] == b"\x01\x02\x03\x04"
        body = data[head + 4 :]
        assert bytes(x ^ (i % 4 + 1) for i, x in enumerate(body)) == payload
