"""Shared test fixtures: a real server on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from connectors import Node
from engine import ModelConfig
from engine._config import ServerConfig


def server_config(data_dir: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "http_port": 0,
        "forward_port": 0,
        "snapshot_interval": 3600.0,
        "refresh_interval": 0.2,
        "model": ModelConfig(dim=16, seed=5, auto_reindex=False),
    }
    values.update(overrides)
    return ServerConfig(**values)


@asynccontextmanager
async def running_server(data_dir: Path, **overrides: Any) -> AsyncIterator[Node]:
    """Starts a Node, yields it once it serves, shuts it down in order afterwards."""
    server = Node(server_config(data_dir, **overrides))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            server.shutdown()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_server(tmp_path / "data") as s:
        yield s


@pytest.fixture
async def http(server: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


def ws_url(server: Node, path: str) -> str:
    return server.http_url.replace("http://", "ws://") + path


@asynccontextmanager
async def websocket(url: str) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection that never leaks its socket.

    trio-websocket leaves the TCP stream for the garbage collector when the server closes
    first (as ours does on refusals and timeouts); close it here.
    """
    async with open_websocket_url(url) as ws:
        try:
            yield ws
        finally:
            await ws._stream.aclose()
