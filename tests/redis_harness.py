"""Real ``redis-server`` processes for the tests: one server, or a three-master cluster.

The servers themselves are :class:`bench._scale.RedisServer` and :func:`bench._scale.start_cluster`
(the scale benchmark runs the same ones). Tests skip loudly when ``redis-server`` is not
installed (CI installs it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench._scale import RedisServer, free_port, start_cluster

__all__ = ["RedisServer", "free_port", "redis_server", "require_redis", "start_cluster"]


def require_redis() -> None:
    """Skips (loudly, with the reason) when the Redis binaries are missing."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(
            "SKIPPED: redis-server / redis-cli not installed (apt-get install redis-server)"
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test, stopped after it."""
    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
