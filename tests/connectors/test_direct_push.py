"""Pushes the publisher writes straight to the subscriber's socket (connectors/_direct.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import websockets.sync.client
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from connectors._direct import DECLINED, WRITTEN, DirectWriter
from connectors.websocket import FIRST_DIRECT_CHARS
from engine import write_text_frame

from ..conftest import running_server, ws_url


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    return ours, peer


def _receive(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 70_000])
def test_written_frames_decode_with_a_third_party_websocket_client(size: int) -> None:
    text = ("é" * size)[: max(0, size - 1)] + "x" * min(size, 1)  # multi-byte characters
    ours, peer = _tcp_pair()
    with ours, peer:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.setblocking(False)
        assert write_text_frame(ours.fileno(), text, 1 << 21) == WRITTEN
        n = len(text.encode())
        header = 2 if n < 126 else 4 if n < 65_536 else 10
        client = Connection(ConnectionType.CLIENT)
        client.receive_data(_receive(peer, header + n))
        [event] = list(client.events())
    assert isinstance(event, TextMessage)
    assert event.data == text and event.message_finished


def test_a_frame_that_does_not_fit_under_the_limit_is_declined_whole() -> None:
    ours, peer = _tcp_pair()
    with ours, peer:
        ours.setblocking(False)
        fd = ours.fileno()
        # The second frame alone exceeds the limit; the third fits beside the first.
        outcomes = [write_text_frame(fd, text, 64) for text in ("a" * 10, "b" * 100, "c" * 10)]
        assert outcomes == [WRITTEN, DECLINED, WRITTEN]
        assert _receive(peer, 24) == b"\x81\x0a" + b"a" * 10 + b"\x81\x0a" + b"c" * 10
        with pytest.raises(ValueError):
            write_text_frame(-1, "x", 64)


async def _warm_up(server: Any, http: httpx.AsyncClient) -> None:
    """900 events over 20 users and 300 items, applied: the users have lists of 5 and more."""
    warm = [{"user": f"u{n % 20}", "item": f"i{n * 7 % 300}"} for n in range(900)]
    r = await http.post("/v1/events", json=warm)
    await server.engine.wait_applied(r.json()["seq"])


def _read_pushes(url: str, stop_at: str, out: trio.MemorySendChannel[dict[str, Any]]) -> None:
    """A `websockets` client (permessage-deflate offered, as it does by default) handing
    messages to the test until one names the event ``stop_at`` as its cause."""
    with websockets.sync.client.connect(url, open_timeout=10) as ws:
        while True:
            message = json.loads(ws.recv(timeout=10))
            trio.from_thread.run(out.send, message)
            if (message.get("cause") or {}).get("id") == stop_at:
                return


@pytest.mark.parametrize("direct", [True, False])
async def test_pushes_arrive_whole_and_in_order_written_at_once_or_not(
    tmp_path: Path, direct: bool
) -> None:
    async with running_server(tmp_path, refresh_interval=3600.0, direct_push=direct) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            await _warm_up(server, http)
            got: list[dict[str, Any]] = []
            send, receive = trio.open_memory_channel[dict[str, Any]](100)
            url = ws_url(server, "/v1/ws/recommendations?user=u1&k=5")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _read_pushes, url, "e-last", send)
                with trio.fail_after(10):
                    got.append(await receive.receive())
                for n in range(40):
                    # The user's top item, once seen, leaves the list: every event changes it.
                    top = got[-1]["items"][0]["item"]
                    event_id = "e-last" if n == 39 else f"e-{n}"
                    await http.post(
                        "/v1/events", json=[{"user": "u1", "item": top, "id": event_id}]
                    )
                    with trio.fail_after(10):
                        got.append(await receive.receive())
                        # (a list the warm-up events changed may come first)
                        while (got[-1]["cause"] or {}).get("id") != event_id:
                            got.append(await receive.receive())
    versions = [m["version"] for m in got]
    assert versions == sorted(versions) and len(got) >= 41
    assert all(m["user"] == "u1" and len(m["items"]) == 5 for m in got)
    metrics = server.engine.metrics
    assert metrics.pushes._value.get() == len(got) - 1  # all but the first list
    # Each event's push found the connection idle and was written by the publisher itself
    # (a list the warm-up changed may have come while the first list was being sent).
    delivered = metrics.delivered_at_once._value.get()
    assert delivered >= 40 if direct else delivered == 0


def _first_message(url: str) -> dict[str, Any]:
    with websockets.sync.client.connect(url, open_timeout=10) as ws:
        message: dict[str, Any] = json.loads(ws.recv(timeout=10))
    return message


@pytest.mark.parametrize("k", [5, 400])
async def test_a_small_first_list_is_written_at_once_a_large_one_sent_by_the_server(
    tmp_path: Path, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new subscriber's first list goes out through the direct writer when it is small
    (nothing is queued on a new connection), through Hypercorn's send when it is not; both
    arrive whole."""
    writers: list[DirectWriter | None] = []
    find = DirectWriter.find

    def recording_find(send: Any) -> DirectWriter | None:
        writer = find(send)
        writers.append(writer)
        return writer

    monkeypatch.setattr(DirectWriter, "find", staticmethod(recording_find))
    async with running_server(tmp_path, refresh_interval=3600.0) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            seed = [{"user": f"s{n}", "item": f"item{n:04d}"} for n in range(600)]
            r = await http.post("/v1/events", json=seed)
            await server.engine.wait_applied(r.json()["seq"])
        url = ws_url(server, f"/v1/ws/recommendations?user=u1&k={k}&explain=1")
        with trio.fail_after(10):
            first = await trio.to_thread.run_sync(_first_message, url)
    assert first["user"] == "u1" and len(first["items"]) == k
    [writer] = writers
    assert writer is not None
    small = len(json.dumps(first, separators=(",", ":"))) <= FIRST_DIRECT_CHARS
    assert small == (k == 5)
    assert writer.written == (1 if small else 0)


async def test_a_closed_socket_is_never_written_whatever_its_number_became() -> None:
    from types import SimpleNamespace

    from hypercorn.protocol.ws_stream import ASGIWebsocketState
    from wsproto.connection import ConnectionState

    from connectors._direct import DirectWriter

    ours, peer = trio.socket.socketpair()
    stream = SimpleNamespace(
        closed=False,
        state=ASGIWebsocketState.CONNECTED,
        connection=SimpleNamespace(state=ConnectionState.OPEN),
    )
    writer = DirectWriter(stream, trio.Lock(), ours)
    writer.busy = False
    assert writer.try_write("first")
    assert await peer.recv(100) == b"\x81\x05first"
    number = ours.fileno()
    ours.close()
    # Another connection now holds the closed socket's number.
    other, other_peer = socket.socketpair()
    duplicated = other.fileno() != number
    if duplicated:
        os.dup2(other.fileno(), number)
    try:
        assert not writer.try_write("second")
        other_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_peer.recv(100)  # nothing was written to the other connection
    finally:
        if duplicated:
            os.close(number)
        for s in (other, other_peer, peer):
            s.close()
    assert (writer.written, writer.declined) == (1, 1)


async def test_every_subscriber_of_a_batch_gets_each_list_whole_and_in_order(
    tmp_path: Path,
) -> None:
    """Events of several subscribed users arrive in one batch, round after round: their lists
    are computed together and written one after another; each subscriber gets every list
    whole and in order."""
    users = [f"u{n}" for n in range(8)]
    rounds = 12
    async with running_server(tmp_path, refresh_interval=3600.0) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            await _warm_up(server, http)
            got: dict[str, list[dict[str, Any]]] = {user: [] for user in users}
            send, receive = trio.open_memory_channel[dict[str, Any]](1000)

            async def take(ids: set[str]) -> None:
                """Messages until every subscriber has one and every event in ``ids`` was
                named as a cause."""
                with trio.fail_after(10):
                    while not all(got.values()) or ids - {
                        (m["cause"] or {}).get("id") for ms in got.values() for m in ms
                    }:
                        message = await receive.receive()
                        got[message["user"]].append(message)

            async with trio.open_nursery() as nursery:
                for user in users:
                    url = ws_url(server, f"/v1/ws/recommendations?user={user}&k=5")
                    stop_at = f"{user}-{rounds - 1}"
                    nursery.start_soon(trio.to_thread.run_sync, _read_pushes, url, stop_at, send)
                await take(set())
                for n in range(rounds):
                    # Each user's top item, once seen, leaves its list: every event changes it.
                    batch = [
                        {"user": u, "item": got[u][-1]["items"][0]["item"], "id": f"{u}-{n}"}
                        for u in users
                    ]
                    await http.post("/v1/events", json=batch)
                    await take({event["id"] for event in batch})
    for user in users:
        versions = [m["version"] for m in got[user]]
        assert versions == sorted(versions) and len(got[user]) >= rounds + 1
        assert all(m["user"] == user and len(m["items"]) == 5 for m in got[user])
    metrics = server.engine.metrics
    assert metrics.pushes._value.get() == sum(len(ms) - 1 for ms in got.values())
    # Most lists found their connection idle and were written by the publisher itself.
    assert metrics.delivered_at_once._value.get() >= len(users) * rounds // 2
