"""Connection-level attacks against a real server: floods of connections, idle and stalled
connections, and gzip bombs. Limits and timeouts are set small so each test takes seconds."""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from bench._loadgen import SubscriberPlan
from connectors import Node
from connectors._connections import RESERVED_FDS, default_connection_limits
from connectors.node import LISTEN_BACKLOG, _listening_socket
from engine import ServerConfig
from engine._config import load_config
from engine._exceptions import ConfigError

from ..conftest import running_server, websocket, ws_url
from ..test_bench_loadgen import command, subscriber_process
from .test_forward import WAIT, Peer, clicks, connect, forward, pack

# --- helpers ------------------------------------------------------------------------------


def metric(server: Node, name: str, listener: str) -> float:
    return server.engine.metrics.registry.get_sample_value(name, {"listener": listener}) or 0.0


async def closed_by_server(stream: trio.SocketStream, within: float = WAIT) -> bytes:
    """Reads until the server closes the connection (EOF or reset); returns what it sent.

    Fails if the connection is still open after ``within`` seconds.
    """
    received = bytearray()
    with trio.fail_after(within):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
    return bytes(received)


async def still_open(stream: trio.SocketStream, seconds: float) -> None:
    """Asserts the server neither closes nor writes to ``stream`` for ``seconds``."""
    with trio.move_on_after(seconds):
        data = await stream.receive_some(65536)
        raise AssertionError(f"expected an open, quiet connection, got {data!r}")


async def wait_until(predicate: Callable[[], bool], within: float = WAIT) -> None:
    """Polls ``predicate`` until it holds; fails after ``within`` seconds."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polling server state, no event to wait on
            await trio.sleep(0.01)


async def tcp(address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address)


def http_address(server: Node) -> tuple[str, int]:
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def acked(peer: Peer, chunk: str, user: str = "u1") -> None:
    """Sends one frame with ``chunk`` on ``peer`` and expects its ack."""
    await peer.send(forward(clicks(user, ["i1", "i2"]), chunk=chunk))
    assert await peer.recv() == {"ack": chunk}


# --- 1. connection exhaustion -------------------------------------------------------------


async def test_forward_connections_over_the_limit_are_refused(tmp_path: Path) -> None:
    limit, extra = 50, 15
    async with running_server(tmp_path / "d", max_forward_connections=limit) as server:
        async with connect(server) as producer, AsyncExitStack() as stack:
            await acked(producer, "before")
            idle = []
            for _ in range(limit - 1):
                s = await tcp(server.forward_address)
                stack.push_async_callback(s.aclose)
                idle.append(s)
            # The server has taken all of them in before the flood arrives.
            await wait_until(lambda: server.forward_gate.open >= limit)
            refused = []
            for _ in range(extra):
                s = await tcp(server.forward_address)
                stack.push_async_callback(s.aclose)
                refused.append(s)
            for s in refused:
                assert await closed_by_server(s) == b""
            assert metric(server, "recstream_connections_refused_total", "forward") == extra
            assert server.forward_gate.open == limit
            # Everyone already connected, and HTTP, keep working.
            await acked(producer, "during")
            async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
                r = await http.get("/v1/stats")
                assert r.status_code == 200
                assert r.json()["wal_seq"] == 2
                text = (await http.get("/metrics")).text
                assert (
                    f'recstream_connections_refused_total{{listener="forward"}} {extra}.0' in text
                )
            # A freed slot admits the next producer.
            await idle.pop().aclose()
            await wait_until(lambda: server.forward_gate.open < limit)
            async with connect(server) as late:
                await acked(late, "after", user="u2")


async def test_http_connections_over_the_limit_are_refused(tmp_path: Path) -> None:
    limit, extra = 20, 10
    async with running_server(tmp_path / "d", max_http_connections=limit) as server:
        addr = http_address(server)
        async with AsyncExitStack() as stack:
            # Two connections that were there before the flood: a keep-alive HTTP client
            # and a websocket subscriber.
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.http_url, timeout=WAIT)
            )
            assert (await http.get("/healthz")).status_code == 200
            sub = await stack.enter_async_context(
                websocket(ws_url(server, "/v1/ws/recommendations?user=u1&k=3"))
            )
            await sub.get_message()  # the first list
            for _ in range(limit - 2):
                s = await tcp(addr)
                stack.push_async_callback(s.aclose)
            await wait_until(lambda: server.http_gate.open >= limit)
            refused = []
            for _ in range(extra):
                s = await tcp(addr)
                stack.push_async_callback(s.aclose)
                refused.append(s)
            for s in refused:
                # Refused before anything is read: even a request gets no answer.
                try:
                    await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                except trio.BrokenResourceError:
                    pass
                assert await closed_by_server(s) == b""
            assert metric(server, "recstream_connections_refused_total", "http") == extra
            # The connected client, the subscriber and the Forward listener still work.
            r = await http.get("/v1/stats")
            assert r.status_code == 200
            async with connect(server) as producer:
                await acked(producer, "c1", user="u9")
            with trio.fail_after(WAIT):
                pushed = await sub.get_message()
            assert '"items"' in pushed


# --- 2. idle and stalled connections ------------------------------------------------------

IDLE = 1.0


async def test_silent_and_stalled_forward_connections_are_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", idle_timeout=IDLE) as server:
        start = trio.current_time()  # before the server can have accepted them
        silent = await tcp(server.forward_address)
        stalled = await tcp(server.forward_address)
        busy = await tcp(server.forward_address)
        try:
            frame = forward(clicks("u1", ["i1"]), chunk="half")
            await stalled.send_all(frame[: len(frame) // 2])
            # A producer completing a frame every half timeout is never idle.

            async def keep_busy() -> None:
                for n in range(5):
                    await busy.send_all(forward(clicks("u2", ["i3"]), chunk=f"b{n}"))
                    await trio.sleep(IDLE / 2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_busy)
                assert await closed_by_server(silent) == b""
                assert await closed_by_server(stalled) == b""
                assert trio.current_time() - start >= IDLE * 0.99  # not closed early
            assert metric(server, "recstream_connections_idle_closed_total", "forward") == 2
            # The busy one outlived the idle ones by more than a timeout and is still served.
            peer = Peer(busy)
            assert [await peer.recv() for _ in range(5)] == [{"ack": f"b{n}"} for n in range(5)]
            await acked(peer, "still-open")
            # Nothing of the half-sent frame was journaled.
            assert server.engine.stats()["wal_seq"] == 6
        finally:
            for s in (silent, stalled, busy):
                await s.aclose()


UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def upgraded(address: tuple[str, int], path: str) -> trio.SocketStream:
    """A raw connection upgraded to a websocket at ``path`` (the 101 response read)."""
    stream = await tcp(address)
    await stream.send_all(UPGRADE.format(path=path).encode())
    response = b""
    with trio.fail_after(WAIT):
        while b"\r\n\r\n" not in response:
            data = await stream.receive_some(4096)
            assert data, "closed during the upgrade"
            response += data
    assert response.startswith(b"HTTP/1.1 101"), response
    return stream


async def test_idle_and_stalled_http_and_websockets_are_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", idle_timeout=IDLE) as server:
        addr = http_address(server)
        streams = [await tcp(addr) for _ in range(3)]
        idle_http, half_headers, half_body = streams
        try:
            await half_headers.send_all(b"GET /v1/stats HTTP/1.1\r\nHo")
            await half_body.send_all(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[{"
            )
            # Websockets that never answer pings: one sends nothing, one two bytes of a
            # masked text frame's header and then nothing.
            streams.append(await upgraded(addr, "/v1/ws/events"))
            streams.append(await upgraded(addr, "/v1/ws/events"))
            await streams[-1].send_all(b"\x81\xfe")
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(closed_by_server, s, WAIT)
            # The gate counts a connection out once its handler has finished, which may be a
            # moment after the peer sees the close.
            await wait_until(lambda: server.http_gate.open == 0)
            # The listener itself is fine.
            async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
                assert (await http.get("/v1/stats")).status_code == 200
        finally:
            for s in streams:
                await s.aclose()


async def test_websocket_producer_that_sends_no_events_is_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", idle_timeout=IDLE) as server:
        # A real client answers pings, so only the missing events close it: with a reason.
        async with websocket(ws_url(server, "/v1/ws/events")) as ws:
            await ws.send_message(json.dumps([{"user": "u1", "item": "i1"}]))
            assert json.loads(await ws.get_message())["ack"] == 1
            start = trio.current_time()
            with pytest.raises(ConnectionClosed) as closed:
                with trio.fail_after(WAIT):
                    await ws.get_message()
            assert closed.value.reason.code == 1001
            assert closed.value.reason.reason == "idle timeout"
            # Not closed at once (the server's clock started about when the ack was sent).
            assert trio.current_time() - start >= IDLE * 0.5
        assert metric(server, "recstream_connections_idle_closed_total", "ws_events") == 1


async def test_subscriber_that_stops_answering_pings_is_dropped(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", idle_timeout=IDLE) as server:
        publisher = server.engine.publisher
        assert publisher is not None
        # A real client answers pings: it stays subscribed though it never sends anything.
        async with websocket(ws_url(server, "/v1/ws/recommendations?user=u1&k=3")) as good:
            await good.get_message()
            deaf = await upgraded(http_address(server), "/v1/ws/recommendations?user=u2")
            try:
                await wait_until(lambda: publisher.subscribers == 2)
                # Never reads or answers: the pings go unanswered and it is closed.
                await wait_until(lambda: publisher.subscribers == 1, IDLE * 3 + WAIT)
                sent = await closed_by_server(deaf)
                assert b"\x89" in sent  # a ping frame was sent and never answered
            finally:
                await deaf.aclose()
            await trio.sleep(IDLE * 1.5)
            assert publisher.subscribers == 1
            async with connect(server) as producer:
                await acked(producer, "c1", user="u9")
            with trio.fail_after(WAIT):
                assert '"items"' in await good.get_message()


# --- 3. gzip bombs ------------------------------------------------------------------------

BOMBS = 20


def gzip_bomb(total: int = 1 << 30, member: int = 1 << 20) -> bytes:
    """A CompressedPackedForward frame whose payload gunzips to ``total`` zero bytes.

    Built as identical gzip members of ``member`` zeros each (a valid multi-member stream),
    so it costs one small compression: about 1 MB compressed for 1 GB.
    """
    one = gzip.compress(bytes(member), compresslevel=9)
    return pack(["app.bomb", one * (total // member), {"compressed": "gzip", "chunk": "bomb"}])


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of ``pid`` in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return hwm, rss


@contextmanager
def server_process(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """``recstream serve`` as a subprocess on ephemeral ports; yields it and its Forward
    address, and stops it with SIGTERM afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connectors", "serve", "--data-dir", str(data_dir)]
        + ["--http", "127.0.0.1:0", "--forward", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        address = None
        for line in proc.stdout:
            m = re.search(r"Fluent Forward:\s+([\d.]+):(\d+)", line)
            if m:
                address = (m.group(1), int(m.group(2)))
                break
        assert address is not None, "the server did not start"
        yield proc, address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@asynccontextmanager
async def open_peer(address: tuple[str, int]) -> AsyncIterator[Peer]:
    stream = await trio.open_tcp_stream(*address)
    try:
        yield Peer(stream)
    finally:
        await stream.aclose()


async def test_concurrent_gzip_bombs_stay_within_the_memory_budget(tmp_path: Path) -> None:
    bomb = gzip_bomb()
    assert len(bomb) < 2 << 20
    with server_process(tmp_path / "d") as (proc, address):
        async with open_peer(address) as producer:
            await acked(producer, "warm")
            _, baseline = rss_kib(proc.pid)
            refused: list[Any] = []

            async def one() -> None:
                async with open_peer(address) as peer:
                    try:
                        await peer.send(bomb)
                    except trio.BrokenResourceError:
                        pass  # refused before it was all sent
                    refused.append(await peer.expect_closed())

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for _ in range(BOMBS):
                        nursery.start_soon(one)
                    # The honest producer is served while the bombs are being refused.
                    await acked(producer, "during")
            assert refused == [[]] * BOMBS  # each closed without an ack
            await acked(producer, "after")
            hwm, rss = rss_kib(proc.pid)
        peak_mib, left_mib = (hwm - baseline) / 1024, (rss - baseline) / 1024
        print(f"gzip bombs: peak {peak_mib:.0f} MiB, left {left_mib:.0f} MiB over the baseline")
        assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB over the baseline"
        assert left_mib < 100, f"RSS {left_mib:.0f} MiB over the baseline afterwards"


def test_limits_must_be_positive(tmp_path: Path) -> None:
    for field in ("max_forward_connections", "max_http_connections", "idle_timeout"):
        with pytest.raises(ConfigError, match=field):
            load_config(data_dir=tmp_path, **{field: 0})
    cfg = load_config(data_dir=tmp_path, max_forward_connections=5, idle_timeout=0.5)
    assert (cfg.max_forward_connections, cfg.idle_timeout) == (5, 0.5)


# --- 3. many subscribers at once ----------------------------------------------------------

STORM = 2000  # websockets opened at once


def test_listen_backlog_holds_a_connection_storm() -> None:
    """The listening socket queues thousands of completed handshakes (up to the kernel's
    cap), so a burst of subscribers is not met with dropped SYNs and second-long retries."""
    sock = _listening_socket("127.0.0.1", 0, 1000)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        # On a listening socket tcpi_sacked holds the accept queue's capacity.
        (capacity,) = struct.unpack_from("I", info, 28)
    finally:
        sock.close()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert capacity == min(LISTEN_BACKLOG, somaxconn)
    assert capacity >= min(somaxconn, 4096)


def test_default_limits_leave_room_for_the_default_subscribers() -> None:
    for nofile in (1024, 20_000, 65_536, 1 << 20):
        forward, http = default_connection_limits(nofile)
        assert forward >= 16 and http > forward
        assert forward + http <= nofile - RESERVED_FDS  # the reserve stays free
    forward, http = default_connection_limits(20_000)
    assert http >= ServerConfig().max_subscribers + 1000


async def test_thousands_of_subscribers_connecting_at_once(tmp_path: Path) -> None:
    """A subscriber process opens ``STORM`` websockets at once (every handshake in flight
    together); each gets its first list, the server keeps answering, and they all close
    cleanly."""
    async with running_server(tmp_path / "d", refresh_interval=3600.0) as server:
        host, port = http_address(server)
        plan = SubscriberPlan(
            host=host,
            port=port,
            users=tuple(f"storm{n}" for n in range(STORM)),
            k=3,
            connect_at_once=STORM,
        )
        async with subscriber_process(plan) as conn:
            lists: dict[Any, list[Any]] = {}
            subscribed = await trio.to_thread.run_sync(
                functools.partial(command, conn, lists, within=60)
            )
            # Each subscription counts once its first list arrived.
            assert subscribed[:4] == ("subscribed", STORM, 0, {})
            publisher = server.engine.publisher
            assert publisher is not None and publisher.subscribers == STORM
            assert server.http_gate is not None and server.http_gate.refused == 0
            async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
                assert (await http.get("/healthz")).status_code == 200
            kind, closed = await trio.to_thread.run_sync(
                functools.partial(command, conn, lists, "close", within=60)
            )
            assert kind == "closed"
            assert closed["closed_by_server"] == {1000: STORM}, closed
            assert closed["unanswered_closes"] == 0 and closed["errors"] == {}
            await wait_until(lambda: publisher.subscribers == 0)
