"""Real ``redis-server`` processes for the tests: one server, or a three-master cluster.

Redis cannot bind port 0, so a free loopback port is found by binding a socket first and
passed with ``--port``. Every server writes an append-only file with ``fsync`` on every write
into the test's temporary directory, so a ``kill -9`` and restart comes back with every entry it
confirmed. Tests skip loudly when ``redis-server`` is not installed (CI installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["RedisServer", "free_port", "redis_server", "require_redis", "start_cluster"]


def require_redis() -> None:
    """Skips (loudly, with the reason) when the Redis binaries are missing."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(
            "SKIPPED: redis-server / redis-cli not installed (apt-get install redis-server)"
        )


def free_port(below: int = 65536) -> int:
    """A loopback TCP port below ``below`` that was free a moment ago."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise RuntimeError(f"no free port below {below}")


class RedisServer:
    """One ``redis-server`` on loopback with AOF and ``appendfsync always``.

    Args:
        directory: Its working directory (AOF, cluster config).
        port: Its port; a free one when None. Kept across :meth:`restart`.
        cluster: Start it with ``--cluster-enabled yes``.
    """

    def __init__(self, directory: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.directory = directory
        # A cluster node also listens on port + 10000 (its bus), so its port must leave room.
        self.port = port or free_port(55536 if cluster else 65536)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--protected-mode", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.02)
        # A restart on a large AOF answers PING with LOADING errors until it is loaded.
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """``kill -9``: no chance to write anything more."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot exit
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def start_cluster(directory: Path, masters: int = 3) -> list[RedisServer]:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create`` (no
    replicas); returns once every slot is served. The caller stops them."""
    servers = [RedisServer(directory / f"m{i}", cluster=True) for i in range(masters)]
    try:
        for s in servers:
            s.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{s.port}" for s in servers]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for s in servers:
            c = s.client()
            while c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach state ok")
                time.sleep(0.05)
            c.close()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` for one test, stopped after it."""
    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
