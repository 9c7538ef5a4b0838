"""The Fluent Forward listener end to end, over raw TCP sockets against a real server.

Frames are built by the small msgpack encoder below rather than by the ``msgpack`` package or
the engine's client, so these tests check the wire format independently of both. ``msgpack``
only decodes what the server sends back (HELO, PONG, acks).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import random
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from connectors import Node
from engine import InvalidFrame, Model, ModelConfig

from ..conftest import running_server

# --- a minimal msgpack encoder (the spec: github.com/msgpack/msgpack/blob/master/spec.md) ----


class EventTime:
    """Forward's EventTime: msgpack ext type 0, big-endian u32 seconds then u32 nanoseconds."""

    def __init__(self, seconds: int, nanos: int) -> None:
        self.seconds, self.nanos = seconds, nanos


def _sized(n: int, fix: tuple[int, int] | None, heads: tuple[int, int, int]) -> bytes:
    """The head of a str/bin/array/map of ``n`` elements: fix form, then 8/16/32-bit length."""
    if fix is not None and n < fix[1]:
        return bytes([fix[0] | n])
    for head, fmt, limit in zip(heads, (">B", ">H", ">I"), (1 << 8, 1 << 16, 1 << 32), strict=True):
        if head and n < limit:
            return bytes([head]) + struct.pack(fmt, n)
    raise ValueError(f"length {n} does not fit msgpack")


def pack(obj: Any) -> bytes:
    """Encodes None, bool, int, float, str, bytes, list/tuple, dict and EventTime."""
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj < 0x80:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack(">b", obj)
        if obj >= 0:
            for head, fmt, limit in ((0xCC, ">B", 8), (0xCD, ">H", 16), (0xCE, ">I", 32)):
                if obj < 1 << limit:
                    return bytes([head]) + struct.pack(fmt, obj)
            return b"\xcf" + struct.pack(">Q", obj)
        for head, fmt, bits in ((0xD0, ">b", 8), (0xD1, ">h", 16), (0xD2, ">i", 32)):
            if obj >= -(1 << (bits - 1)):
                return bytes([head]) + struct.pack(fmt, obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode()
        return _sized(len(data), (0xA0, 32), (0xD9, 0xDA, 0xDB)) + data
    if isinstance(obj, bytes | bytearray):
        return _sized(len(obj), None, (0xC4, 0xC5, 0xC6)) + bytes(obj)
    if isinstance(obj, list | tuple):
        return _sized(len(obj), (0x90, 16), (0, 0xDC, 0xDD)) + b"".join(map(pack, obj))
    if isinstance(obj, dict):
        body = b"".join(pack(k) + pack(v) for k, v in obj.items())
        return _sized(len(obj), (0x80, 16), (0, 0xDE, 0xDF)) + body
    if isinstance(obj, EventTime):
        return b"\xd7\x00" + struct.pack(">II", obj.seconds, obj.nanos)  # fixext 8, type 0
    raise TypeError(f"cannot encode {type(obj).__name__}")


def test_encoder_agrees_with_the_reference_decoder() -> None:
    values: list[Any] = [
        None, True, False, 0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1, -1, -32,
        -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63), 0.5, -1e300, "",
        "a" * 31, "b" * 32, "c" * 255, "d" * 256, "é" * 40000, b"", b"x" * 255, b"y" * 70000,
        list(range(15)), list(range(16)), list(range(70000)), {str(i): i for i in range(15)},
        {str(i): i for i in range(16)}, {"nested": [{"a": [b"b", None]}]},
    ]  # fmt: skip
    for v in values:
        assert msgpack.unpackb(pack(v), raw=False, strict_map_key=False) == v
    ext = msgpack.unpackb(pack(EventTime(1_700_000_000, 999_999_999)))
    assert ext == msgpack.ExtType(0, struct.pack(">II", 1_700_000_000, 999_999_999))


# --- Forward frames -----------------------------------------------------------------------

NOW = int(time.time())
TAG = "app.events"


def message(rec: dict[str, Any], t: Any = NOW, chunk: str | None = None, tag: str = TAG) -> bytes:
    frame: list[Any] = [tag, t, rec]
    if chunk is not None:
        frame.append({"chunk": chunk})
    return pack(frame)


def forward(recs: list[dict[str, Any]], chunk: str | None = None, tag: str = TAG) -> bytes:
    frame: list[Any] = [tag, [[NOW, r] for r in recs]]
    if chunk is not None:
        frame.append({"chunk": chunk})
    return pack(frame)


def packed(recs: list[dict[str, Any]], chunk: str | None = None, members: int = 0) -> bytes:
    """PackedForward; with ``members`` > 0, gzip-compressed in that many gzip members."""
    stream = b"".join(pack([EventTime(NOW, 123_000_000), r]) for r in recs)
    option: dict[str, Any] = {"size": len(recs)}
    if members:
        cut = [len(stream) * k // members for k in range(members + 1)]
        stream = b"".join(gzip.compress(stream[a:b]) for a, b in zip(cut, cut[1:], strict=False))
        option["compressed"] = "gzip"
    if chunk is not None:
        option["chunk"] = chunk
    return pack([TAG, stream, option])


def clicks(user: str, items: list[str]) -> list[dict[str, Any]]:
    return [{"user": user, "item": it, "type": "click"} for it in items]


# --- a raw Forward client -----------------------------------------------------------------


WAIT = 10.0  # seconds any single reply or close may take on a loaded machine


class Peer:
    """One TCP connection to the Forward port; decodes what the server sends."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> Any:
        """The next message from the server; fails if the server closes first."""
        with trio.fail_after(WAIT):
            while True:
                for msg in self.unpacker:
                    return msg
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the connection"
                self.unpacker.feed(data)

    async def expect_closed(self) -> list[Any]:
        """Waits for the server to close; returns the messages it sent before closing.

        A reset counts as a close: the kernel sends one when the server closes with bytes of
        ours still unread.
        """
        with trio.fail_after(WAIT):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break
                self.unpacker.feed(data)
        return list(self.unpacker)

    async def expect_silence(self, seconds: float = 0.2) -> None:
        """Asserts the server sends nothing for ``seconds`` (the connection stays open)."""
        with trio.move_on_after(seconds):
            data = await self.stream.receive_some(65536)
            raise AssertionError(f"unexpected bytes from the server: {data!r}")


@asynccontextmanager
async def connect(server: Node) -> AsyncIterator[Peer]:
    host, port = server.forward_address
    stream = await trio.open_tcp_stream(host, port)
    try:
        yield Peer(stream)
    finally:
        await stream.aclose()


async def send_acked(server: Node, frames: list[bytes], chunks: list[str]) -> int:
    """Sends frames on a new connection in one write, checks the acks; returns the wal_seq."""
    async with connect(server) as peer:
        await peer.send(b"".join(frames))
        for chunk in chunks:
            assert await peer.recv() == {"ack": chunk}
    return int(server.engine.stats()["wal_seq"])


def rejected_frames(server: Node) -> float:
    value = server.engine.metrics.registry.get_sample_value(
        "recstream_rejects_total", {"reason": "forward_protocol"}
    )
    return value or 0.0


ITEMS = [f"i{n}" for n in range(12)]


async def seed_catalog(server: Node) -> int:
    """Twenty users over twelve items, popularity falling with the item number."""
    recs = [
        {"user": f"u{u}", "item": ITEMS[(u * j) % (3 + u % 9)], "type": "view"}
        for u in range(20)
        for j in range(1, 5)
    ]
    seq = await send_acked(server, [forward(recs, chunk="seed")], ["seed"])
    await server.engine.wait_applied(seq)
    return seq


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_server(tmp_path / "data") as s:
        yield s


# --- every mode ---------------------------------------------------------------------------


# Each mode builds frames carrying the chunks "c0", "c1", ... (Message mode: one per record).


def _message_int(recs: list[dict[str, Any]]) -> list[bytes]:
    return [message(r, NOW, chunk=f"c{n}") for n, r in enumerate(recs)]


def _message_event_time(recs: list[dict[str, Any]]) -> list[bytes]:
    return [message(r, EventTime(NOW, 5 + n), chunk=f"c{n}") for n, r in enumerate(recs)]


MODES: dict[str, Callable[[list[dict[str, Any]]], list[bytes]]] = {
    "message-int-time": _message_int,
    "message-event-time": _message_event_time,
    "forward": lambda recs: [forward(recs, chunk="c0")],
    "packed-forward": lambda recs: [packed(recs, chunk="c0")],
    "compressed-one-member": lambda recs: [packed(recs, chunk="c0", members=1)],
    "compressed-two-members": lambda recs: [packed(recs, chunk="c0", members=2)],
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_every_mode_is_acked_durable_and_applied(server: Node, mode: str) -> None:
    seed_seq = await seed_catalog(server)
    user, liked = "newcomer", ["i0", "i1", "i2"]
    before = [item for item, _ in server.engine.model.recommend(user, k=len(ITEMS))]
    assert set(liked) <= set(before), "the popular items are recommended to a new user"

    frames = MODES[mode](clicks(user, liked))
    chunks = [f"c{n}" for n in range(len(frames))]
    async with connect(server) as peer:
        for frame in frames:
            await peer.send(frame)
        acks = [await peer.recv() for _ in frames]
        assert acks == [{"ack": c} for c in chunks]
        # Acked means durable: the journal holds one record per frame already.
        seq = server.engine.stats()["wal_seq"]
        assert seq == seed_seq + len(frames)
    await server.engine.wait_applied(seq)
    assert sorted(server.engine.model.seen(user)) == liked
    after = [item for item, _ in server.engine.model.recommend(user, k=len(ITEMS))]
    assert after and not set(after) & set(liked)
    assert server.engine.stats()["events_applied"] == 80 + len(liked)


async def test_frames_without_chunk_are_applied_and_not_acked(server: Node) -> None:
    async with connect(server) as peer:
        await peer.send(forward(clicks("quiet", ["a", "b"])))
        await peer.send(message({"user": "quiet", "item": "c"}))
        with trio.fail_after(WAIT):
            await server.engine.wait_applied(2)  # applied implies journaled
        assert sorted(server.engine.model.seen("quiet")) == ["a", "b", "c"]
        # Had either frame been acked, that ack would arrive before this one.
        await peer.send(packed(clicks("quiet", ["d"]), chunk="only"))
        assert await peer.recv() == {"ack": "only"}
        await peer.expect_silence()
    await server.engine.wait_applied(3)
    assert server.engine.stats()["events_applied"] == 4


async def test_several_frames_in_one_write(server: Node) -> None:
    frames = [
        forward(clicks("multi", ["a"]), chunk="one"),
        message({"user": "multi", "item": "b"}),  # no chunk: no ack, still applied
        packed(clicks("multi", ["c", "d"]), chunk="two"),
        packed(clicks("multi", ["e"]), chunk="three", members=2),
    ]
    seq = await send_acked(server, frames, ["one", "two", "three"])
    assert seq == 4
    await server.engine.wait_applied(seq)
    assert sorted(server.engine.model.seen("multi")) == ["a", "b", "c", "d", "e"]


async def test_a_long_write_of_plain_and_compressed_frames_then_garbage(server: Node) -> None:
    # Hundreds of KiB in one write: frames are checked many per call (some calls on a worker
    # thread), compressed ones alone, reads end inside frames; all before the garbage stand.
    frames, chunks, items = [], [], []
    for n in range(300):
        names = [f"x{n}-{k}" for k in range(40)]
        items += names
        chunk = f"c{n}"
        chunks.append(chunk)
        if n % 37 == 5:
            frames.append(packed(clicks("long", names), chunk=chunk, members=1 + n % 2))
        elif n % 2:
            frames.append(packed(clicks("long", names), chunk=chunk))
        else:
            frames.append(forward(clicks("long", names), chunk=chunk))
    data = b"".join(frames)
    assert len(data) > 256 * 1024  # more than one read
    async with connect(server) as peer:
        await peer.send(data + b"\xc1" + forward(clicks("long", ["never"]), chunk="never"))
        assert await peer.expect_closed() == [{"ack": c} for c in chunks]
    assert server.engine.stats()["wal_seq"] == len(frames)
    await server.engine.wait_applied(len(frames))
    assert sorted(server.engine.model.seen("long")) == sorted(items)


async def test_one_frame_split_into_single_bytes(server: Node) -> None:
    frame = forward(clicks("slow", ["x", "y"]), chunk="drip")
    async with connect(server) as peer:
        for n in range(len(frame)):
            await peer.send(frame[n : n + 1])
            await trio.sleep(0.001)  # separate segments, so the server sees many reads
        assert await peer.recv() == {"ack": "drip"}
    assert server.engine.stats()["wal_seq"] == 1
    await server.engine.wait_applied(1)
    assert sorted(server.engine.model.seen("slow")) == ["x", "y"]


# --- shared-key handshake -----------------------------------------------------------------


def sha512_hex(*parts: bytes | str) -> str:
    return hashlib.sha512(
        b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    ).hexdigest()


async def handshake(peer: Peer, key: str, *, then: bytes = b"") -> tuple[list[Any], bytes, bytes]:
    """Reads HELO, sends PING (followed by ``then`` in the same write); returns the PONG."""
    helo = await peer.recv()
    assert helo[0] == "HELO" and len(helo) == 2
    nonce = helo[1]["nonce"]
    assert isinstance(nonce, bytes) and len(nonce) >= 16
    salt = os.urandom(16)
    digest = sha512_hex(salt, "producer-1", nonce, key)
    await peer.send(pack(["PING", "producer-1", salt, digest, "", ""]) + then)
    return await peer.recv(), salt, nonce


async def test_handshake_with_the_shared_key(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", producer_keys=("other", "secret")) as server:
        async with connect(server) as peer:
            pong, salt, nonce = await handshake(peer, "secret")
            assert pong[:3] == ["PONG", True, ""]
            server_host, proof = pong[3], pong[4]
            assert isinstance(server_host, str) and server_host
            assert proof == sha512_hex(salt, server_host, nonce, "secret")
            await peer.send(forward(clicks("authed", ["a", "b"]), chunk="k1"))
            assert await peer.recv() == {"ack": "k1"}
        await server.engine.wait_applied(1)
        assert sorted(server.engine.model.seen("authed")) == ["a", "b"]

        # Two handshakes never share a nonce.
        async with connect(server) as p1, connect(server) as p2:
            n1, n2 = (await p1.recv())[1]["nonce"], (await p2.recv())[1]["nonce"]
            assert n1 != n2


async def test_handshake_then_frame_in_the_same_write(tmp_path: Path) -> None:
    """A producer that sends its first frame right behind the PING loses nothing."""
    async with running_server(tmp_path / "data", producer_keys=("secret",)) as server:
        async with connect(server) as peer:
            frame = forward(clicks("eager", ["a"]), chunk="k1")
            pong, _, _ = await handshake(peer, "secret", then=frame)
            assert pong[1] is True
            assert await peer.recv() == {"ack": "k1"}
        await server.engine.wait_applied(1)
        assert server.engine.model.seen("eager") == ["a"]


async def test_handshake_with_a_wrong_key_closes_and_journals_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", producer_keys=("secret",)) as server:
        async with connect(server) as peer:
            frame = forward(clicks("intruder", ["a"]), chunk="k1")
            pong, _, _ = await handshake(peer, "guess", then=frame)
            assert pong[0] == "PONG" and pong[1] is False and pong[2]
            assert pong[4] == "", "no proof of the key for a client that does not know it"
            assert await peer.expect_closed() == []  # and no ack
        # A frame instead of a PING is refused too.
        async with connect(server) as peer:
            assert (await peer.recv())[0] == "HELO"
            await peer.send(forward(clicks("intruder", ["b"]), chunk="k2"))
            assert await peer.expect_closed() == []
        assert server.engine.stats()["wal_seq"] == 0
        assert server.engine.model.seen("intruder") == []
        assert server.engine.stats()["events_applied"] == 0


async def test_malformed_handshakes_close_only_their_connection(tmp_path: Path) -> None:
    pong_false = [["PONG", False]]
    bad_pings = [  # (bytes sent as the PING, what the server answers before closing)
        (b"\xc1", []),  # not msgpack
        (b"\x81\x91\x01\x02", []),  # a map keyed by an array
        (b"\x91" * 2000 + b"\x01", []),  # nested deeper than any decoder allows
        (pack(5), []),  # not an array
        (pack(["PING", "h", b"salt"]), []),  # too short
        (pack(["PING", 1, b"salt", "digest", "", ""]), []),  # a hostname that is not a string
        (pack(["PING", "h", b"salt", "\u00e9" * 128, "", ""]), pong_false),  # a non-hex digest
        (b"\x96\xa4PING\xa1h\xa4salt\xa2\xff\xfe\xa0\xa0", []),  # a digest that is not UTF-8
        (pack("x" * 5000), []),  # larger than any handshake message
    ]
    async with running_server(tmp_path / "data", producer_keys=("secret",)) as server:
        for ping, expected in bad_pings:
            async with connect(server) as peer:
                assert (await peer.recv())[0] == "HELO"
                await peer.send(ping)
                replies = await peer.expect_closed()
                assert [r[:2] for r in replies] == expected, ping
        assert rejected_frames(server) == len(bad_pings)
        async with connect(server) as peer:
            pong, _, _ = await handshake(peer, "secret")
            assert pong[1] is True
            await peer.send(message({"user": "after", "item": "a"}, chunk="ok"))
            assert await peer.recv() == {"ack": "ok"}
        assert server.engine.stats()["wal_seq"] == 1


# --- item upserts, erasure, duplicates ----------------------------------------------------


async def test_item_upsert_and_erase_user(server: Node) -> None:
    await seed_catalog(server)
    books = ["i3", "i5", "i7"]
    upserts = [{"item": it, "category": "books", "tags": ["paper"]} for it in books]
    seq = await send_acked(server, [forward(upserts, chunk="items")], ["items"])
    await server.engine.wait_applied(seq)
    recs = [item for item, _ in server.engine.model.recommend("u1", k=len(ITEMS), category="books")]
    assert recs and set(recs) <= set(books)
    assert set(recs) == set(books) - set(server.engine.model.seen("u1"))

    assert server.engine.model.seen("u1")
    seq = await send_acked(server, [message({"erase_user": "u1"}, chunk="gone")], ["gone"])
    await server.engine.wait_applied(seq)
    assert server.engine.model.seen("u1") == []
    assert server.engine.model.user_vector("u1") is None
    assert server.engine.model.seen("u2"), "other users keep their history"


async def test_duplicate_event_ids_are_applied_once(server: Node) -> None:
    def evs(ids: list[str], tag: str = TAG) -> bytes:
        recs = [{"user": "d", "item": f"x{i}", "id": i} for i in ids]
        return pack([tag, [[NOW, r] for r in recs], {"chunk": "c"}])

    await send_acked(server, [evs(["e1", "e2"])], ["c"])
    seq = await send_acked(server, [evs(["e1", "e2", "e3"])], ["c"])  # a redelivery plus one
    # Ids are scoped by tag: another producer's "e1" is its own event.
    seq = await send_acked(server, [evs(["e1"], tag="other.tag")], ["c"])
    await server.engine.wait_applied(seq)
    stats = server.engine.stats()
    assert (stats["events_applied"], stats["duplicates"]) == (4, 2)
    assert sorted(server.engine.model.seen("d")) == ["xe1", "xe2", "xe3"]


# --- bad input ----------------------------------------------------------------------------

STRUCTURAL = [
    b"\xc1",  # the one byte msgpack never uses
    b"\x05",  # a top-level integer
    b"\xdb\xff\xff\xff\xff",  # a top-level str32 declaring 4 GB
    pack(["only-a-tag"]),  # arity 1
    pack(["t", 1, {}, {}, 5]),  # arity 5
    pack(["t", [], {}, {}]),  # Forward mode with four elements
    b"\x92\xdb\xff\xff\xff\xff",  # a tag declaring 4 GB
    b"\x93\xa1t\xdb\xff\xff\xff\xff",  # a PackedForward payload declaring 4 GB
    b"\x92\xa1t\xdd\xff\xff\xff\xff",  # four billion Forward entries
    pack([1, [], None]),  # the tag is not a string
    pack(["t", None]),  # the second element is neither time, entries nor packed entries
    pack(["t", [], {"chunk": 5}]),  # a chunk that is not a string
    pack(["t", b"\x00\x01", {"compressed": "gzip"}]),  # not gzip
    pack(["t", b"\x91", {}]),  # packed entries cut short
]


def garbage(rng: random.Random, checker: Model) -> bytes:
    """Random bytes that hold no complete valid frame (those would rightly be journaled)."""
    while True:
        data = rng.randbytes(rng.randint(1, 300))
        try:
            if checker.check_frame(data) is None:
                return data
        except InvalidFrame:
            return data


async def test_malformed_frames_close_their_connection_only(server: Node) -> None:
    rng = random.Random(20240611)
    checker = Model(ModelConfig(dim=4))
    # Structural cases are sent without a half-close: the server must decide from the bytes
    # so far. Random garbage may be the start of a frame, so those connections half-close.
    cases = [(frame, False) for frame in STRUCTURAL]
    cases += [(garbage(rng, checker), True) for _ in range(1000 - len(cases))]
    closed = 0
    limiter = trio.CapacityLimiter(32)

    async with connect(server) as bystander:
        await bystander.send(message({"user": "calm", "item": "a"}, chunk="before"))
        assert await bystander.recv() == {"ack": "before"}

        async def one(data: bytes, half_close: bool) -> None:
            nonlocal closed
            async with limiter, connect(server) as peer:
                await peer.send(data)
                if half_close:
                    await peer.stream.send_eof()
                assert await peer.expect_closed() == [], data
                closed += 1

        async with trio.open_nursery() as nursery:
            for data, half_close in cases:
                nursery.start_soon(one, data, half_close)
        assert closed == 1000
        assert rejected_frames(server) == 1000
        assert server.engine.stats()["wal_seq"] == 1, "no malformed frame was journaled"

        # A connection that was open all along still works, and so does a new one.
        await bystander.send(message({"user": "calm", "item": "b"}, chunk="after"))
        assert await bystander.recv() == {"ack": "after"}
    seq = await send_acked(server, [forward(clicks("calm", ["c"]), chunk="new")], ["new"])
    assert seq == 3
    await server.engine.wait_applied(seq)
    assert server.engine.model.stats()["events_applied"] == 3
    assert sorted(server.engine.model.seen("calm")) == ["a", "b", "c"]


async def test_frames_before_a_malformed_one_stand(server: Node) -> None:
    async with connect(server) as peer:
        await peer.send(forward(clicks("early", ["a"]), chunk="first"))
        assert await peer.recv() == {"ack": "first"}
        # Two good frames and a bad one in a single write: the good ones are journaled and
        # acked before the connection is closed.
        await peer.send(
            message({"user": "early", "item": "b"}, chunk="second")
            + packed(clicks("early", ["c"]))
            + b"\xc1"
            + forward(clicks("early", ["never"]), chunk="never")
        )
        assert await peer.expect_closed() == [{"ack": "second"}]
    assert server.engine.stats()["wal_seq"] == 3
    await server.engine.wait_applied(3)
    assert sorted(server.engine.model.seen("early")) == ["a", "b", "c"]


async def test_bad_records_are_refused_one_by_one(server: Node) -> None:
    recs = [
        {"user": "mixed", "item": "good-1", "type": "click"},
        {"user": "mixed", "item": "nan", "weight": math.nan},
        {"user": "mixed", "item": "negative", "weight": -1.0},
        {"user": "mixed", "item": "x" * 300},
        {"user": "y" * 300, "item": "good-1"},
        {"user": "mixed", "item": "good-2", "weight": 2.5},
    ]
    seq = await send_acked(server, [forward(recs, chunk="partly")], ["partly"])
    await server.engine.wait_applied(seq)
    assert sorted(server.engine.model.seen("mixed")) == ["good-1", "good-2"]
    assert server.engine.model.stats()["events_applied"] == 2
    assert server.engine.model.stats()["users"] == 1
    invalid = server.engine.metrics.registry.get_sample_value(
        "recstream_rejects_total", {"reason": "invalid_record"}
    )
    assert invalid == 4, "each refused record is counted once"


async def test_frame_over_the_size_limit_closes_the_connection(tmp_path: Path) -> None:
    limit = 4096
    model = ModelConfig(dim=16, auto_reindex=False, max_frame_bytes=limit)
    async with running_server(tmp_path / "data", model=model) as server:
        # The largest Forward frame under the limit is accepted...
        n = 1
        while len(forward(clicks("big", [f"item-{k:04d}" for k in range(n + 1)]), "c")) <= limit:
            n += 1
        fits = forward(clicks("big", [f"item-{k:04d}" for k in range(n)]), "c")
        too_big = forward(clicks("big", [f"item-{k:04d}" for k in range(n + 1)]), "c")
        assert len(fits) <= limit < len(too_big)

        async with connect(server) as bystander:
            await bystander.send(fits)
            assert await bystander.recv() == {"ack": "c"}
            # ...one byte more is not, whole or trickled.
            async with connect(server) as peer:
                await peer.send(too_big)
                assert await peer.expect_closed() == []
            async with connect(server) as peer:
                for k in range(0, len(too_big), 512):
                    await peer.send(too_big[k : k + 512])
                assert await peer.expect_closed() == []
            # A header declaring more than the limit is refused before its bytes arrive.
            async with connect(server) as peer:
                await peer.send(b"\x93\xa1t\xc6" + struct.pack(">I", limit + 1))  # [tag, bin32
                assert await peer.expect_closed() == []
            assert server.engine.stats()["wal_seq"] == 1

            await bystander.send(message({"user": "small", "item": "a"}, chunk="d"))
            assert await bystander.recv() == {"ack": "d"}
        seq = await send_acked(server, [message({"user": "small", "item": "b"}, chunk="e")], ["e"])
        await server.engine.wait_applied(seq)
        assert server.engine.model.stats()["events_applied"] == n + 2
        assert sorted(server.engine.model.seen("small")) == ["a", "b"]


# --- times and admin records --------------------------------------------------------------


async def test_times_ahead_of_the_server_clock_are_refused_not_trending(server: Node) -> None:
    """Milliseconds or any far-future time, integer or EventTime, cannot steer trending."""
    await seed_catalog(server)
    now = int(time.time())
    frames = [
        message({"user": "evil", "item": "spam"}, 1_796_070_000_000, chunk="ms"),
        message({"user": "evil", "item": "spam"}, EventTime(now + 86_400, 0), chunk="ev"),
        forward([{"user": "evil", "item": "spam", "weight": 1e6}], chunk="fw"),
        message({"user": "evil", "item": "spam"}, EventTime(now + 3_600, 5), chunk="pk"),
    ]
    # The third frame's entry is at NOW: accepted (and no louder than its weight allows).
    seq = await send_acked(server, frames, ["ms", "ev", "fw", "pk"])
    await server.engine.wait_applied(seq)
    invalid = server.engine.metrics.registry.get_sample_value(
        "recstream_rejects_total", {"reason": "invalid_record"}
    )
    assert invalid == 3
    # Decay measures age from the server's clock at the latest, whatever producers send.
    assert server.engine.model.stats()["newest_ts"] <= time.time()
    assert server.engine.model.stats()["newest_ts"] >= NOW  # the honest events' time


async def test_admin_records_need_the_admin_key_as_shared_key(tmp_path: Path) -> None:
    keys = {"producer_keys": ("producer",), "admin_key": "admin"}
    async with running_server(tmp_path / "data", **keys) as server:
        async with connect(server) as peer:
            pong, _, _ = await handshake(peer, "producer")
            assert pong[1] is True
            await peer.send(forward(clicks("bob", ["a"]), chunk="ok"))
            assert await peer.recv() == {"ack": "ok"}
            # An erasure (or an item write) from a producer: refused, the connection closed.
            await peer.send(forward([{"erase_user": "bob"}], chunk="erase"))
            assert await peer.expect_closed() == []
        async with connect(server) as peer:
            await handshake(peer, "producer")
            await peer.send(message({"item": "a", "available": False}, chunk="item"))
            assert await peer.expect_closed() == []
        assert server.engine.stats()["wal_seq"] == 1
        await server.engine.wait_applied(1)
        assert server.engine.model.seen("bob") == ["a"]
        # The admin key as the shared key may send them.
        async with connect(server) as peer:
            pong, _, _ = await handshake(peer, "admin")
            assert pong[1] is True
            await peer.send(forward([{"erase_user": "bob"}], chunk="erase"))
            assert await peer.recv() == {"ack": "erase"}
        await server.engine.wait_applied(2)
        assert server.engine.model.seen("bob") == []
