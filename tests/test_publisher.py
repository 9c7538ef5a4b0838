"""Pushes: latest-wins slots, coalescing, and a stuck subscriber that must not hurt others."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path

import httpx
import trio

from engine._publisher import Slot, Subscription

from .conftest import running_server, websocket, ws_url


async def test_slot_keeps_only_the_newest_message() -> None:
    slot = Slot()
    slot.put({"v": 1})
    slot.put({"v": 2})
    slot.put({"v": 3})
    assert await slot.get() == {"v": 3}
    assert slot.replaced == 2
    with trio.move_on_after(0.05) as scope:
        await slot.get()
    assert scope.cancelled_caught, "nothing new: get waits"
    slot.close()
    assert await slot.get() is None


def test_repush_window_forgets_items_as_they_expire() -> None:
    sub = Subscription(user="u", k=3, repush_after=10.0)
    assert Subscription(user="u", k=3).recently_pushed(0.0) == []
    sub.pushed_at.update({"a": 0.0, "b": 4.0, "c": 8.0})
    assert sub.recently_pushed(9.0) == ["a", "b", "c"]
    # Entries are oldest first, so expiry pops from the front and memory holds only the
    # items pushed within the window.
    assert sub.recently_pushed(12.0) == ["b", "c"]
    assert list(sub.pushed_at) == ["b", "c"]
    assert sub.recently_pushed(100.0) == [] and not sub.pushed_at


def _stuck_subscriber(url: str, user: str) -> socket.socket:
    """A websocket client that completes the handshake, then never reads again."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/ws/recommendations?user={user}&k=500&explain=1 HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


async def test_stuck_subscriber_does_not_delay_others_and_is_released(tmp_path: Path) -> None:
    async with running_server(tmp_path, send_timeout=1.0, tcp_user_timeout_ms=2000) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            catalog = [{"user": f"seed{n}", "item": f"item{n:04d}"} for n in range(1500)]
            r = await http.post("/v1/events", json=catalog)
            await server.wait_applied(r.json()["seq"])
            stuck = await trio.to_thread.run_sync(_stuck_subscriber, server.http_url, "stuck")
            try:
                async with websocket(
                    ws_url(server, "/v1/ws/recommendations?user=good&k=5")
                ) as good:
                    top = json.loads(await good.get_message())["items"][0]["item"]
                    assert server.publisher is not None
                    with trio.fail_after(10):
                        while server.publisher.subscribers < 2:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    worst = 0.0
                    n = 0
                    # Keep the stuck subscriber's list changing (large messages pile up
                    # unread) while the good one is measured, until the server drops it.
                    with trio.fail_after(90):  # generous: CI machines are shared
                        while server.publisher.subscribers > 1 or n < 20:
                            await http.post(
                                "/v1/events", json={"user": "stuck", "item": f"item{n:04d}"}
                            )
                            sent = time.monotonic()
                            # An event on the good user's top item always changes its list.
                            await http.post("/v1/events", json={"user": "good", "item": top})
                            while True:  # periodic refreshes may push in between
                                msg = json.loads(await good.get_message())
                                if top not in [i["item"] for i in msg["items"]]:
                                    break
                            worst = max(worst, time.monotonic() - sent)
                            top = msg["items"][0]["item"]
                            n += 1
                    assert server.publisher.subscribers == 1, n
                    # Far below the stuck client's send timeout: it never waited on it.
                    assert worst < 0.5, worst
                    metrics = server.metrics.render().decode()
                    assert "recstream_subscribers_dropped_total 1.0" in metrics
            finally:
                stuck.close()
