"""The latency benchmark's producer: events at a fixed rate over Fluent Forward, cheaply.

A process of its own (``multiprocessing`` with ``spawn``) with one blocking socket and no
event loop: it sleeps until events fall due, packs whatever fell due into one PackedForward
frame (at most ``max_frame_events``), writes it and notes the send time of every event in it
(``time.perf_counter()``, the clock the subscriber processes time their receipts with), and
reads the server's acks without waiting for them until ``window`` frames are unacknowledged.
At most one frame goes out per ``frame_interval`` (2 ms). The events are those of
:mod:`bench._latency`: a click by a random subscribed user, on an item of that user's current
list (``list_fraction`` of them) or on a random catalog item, each with the next integer
``"id"``.

The current lists come from the subscriber processes, each over a pipe of its own, as
snapshots of the lists that changed (with their progress counts; each list as the raw JSON
array of its items, read when its user is picked); the producer reads them between frames,
and keeps reading them until told to exit, so that no subscriber process ever blocks on a
full pipe.

Over its control pipe: ``("ready",)`` once started, then on ``("go",)`` the run (connecting
first, through the shared-key handshake when there is a key), answered by ``("done", sent,
seconds, send times)`` once every frame is acknowledged; ``("exit",)`` ends it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import select
import socket
import time
from typing import Any

import attrs
import msgpack
import numpy as np

from bench._loadgen import items_of

__all__ = ["ProducerPlan", "run_producer"]

ACK_TIMEOUT = 60.0  # seconds to wait for the last acks


@attrs.frozen
class ProducerPlan:
    """What the producer process sends.

    Attributes:
        host, port: The server's Forward listener.
        users: The subscribed users, whom every event is for.
        items: The catalog, for the events not on a current list.
        rate: Events per second.
        seconds: For how long (fewer events when the server holds the producer back).
        list_fraction: The share of events on an item of the user's current list.
        seed: Of the random choices.
        key: The server's shared key, if it requires the handshake.
        tag: The frames' tag.
        window: Frames sent but not yet acknowledged before the producer waits.
        max_frame_events: Events per frame, at most.
        frame_interval: Seconds from one frame to the next, at least: each wake-up of the
            process costs far more than packing one more event (a timer and a context
            switch, more in a virtual machine), so events that fall due meanwhile wait for
            the next frame. The send times are taken when a frame is written, so this shapes
            the load (bursts of ``rate * frame_interval`` events) but adds nothing to the
            measured latencies.
    """

    host: str
    port: int
    users: tuple[Any, ...]
    items: tuple[Any, ...]
    rate: float
    seconds: float
    list_fraction: float = 0.5
    seed: int = 0
    key: str | None = None
    tag: str = "bench.latency"
    window: int = 512
    max_frame_events: int = 500
    frame_interval: float = 0.002


class _Producer:
    def __init__(self, conn: Any, lists_conns: list[Any], plan: ProducerPlan) -> None:
        self.conn = conn
        self.lists_conns = list(lists_conns)
        self.plan = plan
        # Per user its current list: raw (bytes, or a list json.loads found) until first used.
        self.lists: dict[Any, bytes | list[Any]] = {}
        self.progress = [(0, 0)] * len(lists_conns)
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 20)
        self.unacked = 0
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        """Connects (and goes through the shared-key handshake when there is a key): at the
        start of the run, so that a long wait for the subscribers cannot idle it out."""
        self.sock = socket.create_connection((self.plan.host, self.plan.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.plan.key is not None:
            self.handshake(self.plan.key)
        self.sock.setblocking(False)
        return self.sock

    def handshake(self, key: str) -> None:
        """The Forward shared-key handshake (HELO, PING, PONG), blocking."""
        assert self.sock is not None
        helo = self.read_message()
        if not (isinstance(helo, list) and helo and helo[0] == "HELO"):
            raise ConnectionError(f"expected HELO, got {helo!r}")
        nonce = helo[1]["nonce"]
        nonce = nonce if isinstance(nonce, bytes) else nonce.encode()
        salt, host = os.urandom(16), socket.gethostname() + "-bench"
        digest = hashlib.sha512(salt + host.encode() + nonce + key.encode()).hexdigest()
        self.sock.sendall(msgpack.packb(["PING", host, salt, digest, "", ""], use_bin_type=True))
        pong = self.read_message()
        if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == "PONG" and pong[1]):
            raise PermissionError(f"the server refused the shared key: {pong!r}")

    def read_message(self) -> Any:
        assert self.sock is not None
        while True:
            for message in self.unpacker:
                return message
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the Forward connection")
            self.unpacker.feed(data)

    def read_acks(self, timeout: float) -> None:
        """Reads the acks that arrived (waiting up to ``timeout`` for the first)."""
        if self.sock is None:
            return
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the Forward connection")
        self.unpacker.feed(data)
        for message in self.unpacker:
            if isinstance(message, dict) and "ack" in message:
                self.unacked -= 1

    def read_lists(self) -> None:
        for n, conn in enumerate(self.lists_conns):
            while conn.poll():
                try:
                    _, lists, pushes, timed = conn.recv()
                except EOFError:
                    self.lists_conns[n] = _Closed()
                    break
                self.lists.update(lists)
                self.progress[n] = (pushes, timed)

    def wait(self, seconds: float) -> None:
        """Up to ``seconds``, reading lists as they come, then the acks that came meanwhile
        (an ack does not wake the process: they wait in the socket's buffer, which holds a
        window's worth, to save a wake-up per frame)."""
        waiting = [c for c in self.lists_conns if not isinstance(c, _Closed)]
        ready, _, _ = select.select(waiting, [], [], max(0.0, seconds))
        if ready:
            self.read_lists()
        self.read_acks(0)

    def send(self, frame: bytes) -> None:
        assert self.sock is not None
        view = memoryview(frame)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                select.select([], [self.sock], [], 1.0)
                self.read_acks(0)
        self.unacked += 1
        while self.unacked > self.plan.window:
            self.read_acks(1.0)

    def run(self) -> tuple[int, float, np.ndarray]:
        plan = self.plan
        rng = random.Random(plan.seed)
        users, items, lists = plan.users, plan.items, self.lists
        total = int(plan.rate * plan.seconds)
        sent_at = np.zeros(total)
        packer = msgpack.Packer(use_bin_type=True)
        prefix = base64.b64encode(os.urandom(6)).decode()
        sent = frames = 0
        self.connect()
        start = time.perf_counter()
        next_report, next_frame = start + 1.0, start
        while sent < total:
            now = time.perf_counter()
            if now - start >= plan.seconds:
                break
            if now < next_frame:
                self.wait(next_frame - now)
                continue
            due = min(total, int((now - start) * plan.rate) + 1) - sent
            if due <= 0:
                self.wait(sent / plan.rate - (now - start))
                continue
            first = sent
            stamp = _event_time(time.time())
            body = bytearray()
            for _ in range(min(due, plan.max_frame_events)):
                user = users[rng.randrange(len(users))]
                current = lists.get(user)
                if current is not None and rng.random() < plan.list_fraction:
                    current = lists[user] = items_of(current)  # kept decoded
                else:
                    current = None
                if current:
                    item = current[rng.randrange(len(current))]
                else:
                    item = items[rng.randrange(len(items))]
                body += packer.pack(
                    [stamp, {"user": user, "item": item, "type": "click", "id": sent}]
                )
                sent += 1
            frames += 1
            frame = packer.pack([plan.tag, bytes(body), {"chunk": f"{prefix}-{frames}"}])
            t = time.perf_counter()
            sent_at[first:sent] = t
            self.send(frame)
            next_frame = t + plan.frame_interval
            if t > next_report:
                next_report = t + 1.0
                pushes = sum(p for p, _ in self.progress)
                timed = sum(t for _, t in self.progress)
                print(
                    f"    {sent:,}/{total:,} events, {pushes:,} pushes, {timed:,} timed",
                    flush=True,
                )
            if frames % 8 == 0:
                self.read_lists()
        elapsed = time.perf_counter() - start
        deadline = time.perf_counter() + ACK_TIMEOUT
        while self.unacked > 0 and time.perf_counter() < deadline:
            self.read_acks(0.1)
            self.read_lists()
        if self.unacked > 0:
            raise TimeoutError(f"{self.unacked} frames unacknowledged after {ACK_TIMEOUT:g} s")
        return sent, elapsed, sent_at[:sent]


class _Closed:
    """A lists pipe whose subscriber process has gone."""

    def poll(self) -> bool:
        return False


def _event_time(ts: float) -> msgpack.ExtType:
    """Fluent EventTime: ext type 0, big-endian seconds and nanoseconds."""
    secs = int(ts)
    nanos = int(round((ts - secs) * 1e9)) % 1_000_000_000
    return msgpack.ExtType(0, secs.to_bytes(4, "big") + nanos.to_bytes(4, "big"))


def run_producer(conn: Any, lists_conns: list[Any], plan: ProducerPlan) -> None:
    """The producer process's entry point (see the module docstring)."""
    producer = _Producer(conn, lists_conns, plan)
    conn.send(("ready",))
    while True:
        while not conn.poll():
            producer.wait(0.05)
        command = conn.recv()
        if command[0] == "go":
            sent, elapsed, sent_at = producer.run()
            conn.send(("done", sent, elapsed, sent_at.tobytes()))
        elif command[0] == "exit":
            if producer.sock is not None:
                producer.sock.close()
            return
        else:
            raise ValueError(f"unknown command {command!r}")
