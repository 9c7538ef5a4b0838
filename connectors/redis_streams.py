"""Replica nodes on a Redis Streams log: :class:`RedisStreamsLog`.

Every node appends the frames it accepts to a shared log in Redis and reads the whole log back,
so every node applies every event, in log order, to its own full model. The log is ``N``
partition streams; a frame goes to the partition of its producer tag (a stable hash), so one
producer's frames keep their order. One entry per frame: field ``r`` is the journal record
(``engine`` builds it: accepted time and the Forward frame, with its tag and event ids), ``n``
the id of the node that appended it.

Appending is a group commit: everything queued goes to Redis in one pipeline of ``XADD`` (plus
``WAIT`` when replicas are asked for). A producer is acknowledged only after Redis confirmed
its entries *and* this node's reader has forwarded them to the model, so an acknowledgement
carries the node-local seq of the record. With ``appendonly yes`` and ``appendfsync always``
Redis answers an ``XADD`` only after the entry is on its disk.

Reading: one task per group of streams that one server holds (all of them on one server, one
per partition on a cluster) runs ``XREAD BLOCK`` from the current positions and hands what it
read to one forwarder, which numbers the records (the node's own ``seq``) and sends them on as
:class:`Appended` groups whose ``position`` is the per-partition stream id reached. With one
partition every node forwards the same sequence; with more, partitions are merged in read
order, which may differ between nodes.

Positions are :data:`StreamId` tuples ``(milliseconds, sequence)`` per partition key. A node's
name in the registry (for trimming) is kept in its data directory, in ``NODE_ID_FILE``.

Client choice, measured with ``python -m bench scale --clients`` (one ``redis-server
--appendonly yes --appendfsync always`` on loopback; 500 pipelines of 32 ``XADD`` of 200
bytes, then the median of 200 ``XADD`` -> ``XREAD BLOCK`` wake-ups; the client's own CPU for
all of it; results in ``bench/results/scale_clients.json``), on this 2-core machine shared
with other work:

==================================  ===================  =============  ==========
client                              pipeline round trip  XREAD wake-up  client CPU
==================================  ===================  =============  ==========
redis-py 8.1 sync, trio.to_thread   1.79 ms              0.75 ms        0.60 s
coredis 6.9 on trio (anyio)         5.97 ms              1.07 ms        1.10 s
==================================  ===================  =============  ==========

Two earlier runs of the same measurement, with the disk busier, gave round trips of 8.4 and
13.9 ms (redis-py) against 16.5 and 9.8 ms (coredis): they follow Redis's ``fsync``; the
client CPU does not swing, and redis-py spends about 45 % less of it for the same work. It
also has the longer record with Redis Cluster. So: redis-py, its blocking calls in
``trio.to_thread.run_sync``, the appender and each reader with a client of their own.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import msgpack
import redis
import trio
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.retry import Retry

from engine import (
    Appended,
    JournalClosed,
    JournalFailed,
    Model,
    drop_users,
)

__all__ = [
    "NODE_ID_FILE",
    "LogGap",
    "RedisLogConfig",
    "RedisStreamsLog",
    "StreamId",
    "decode_position",
    "encode_position",
    "fetch_snapshot",
    "node_id_for",
    "parse_log_url",
    "partition_keys",
    "partition_of",
]

log = logging.getLogger("recstream.redis")

T = TypeVar("T")

#: A stream entry id as ``(milliseconds, sequence)``; compares in log order.
StreamId = tuple[int, int]

_ZERO: StreamId = (0, 0)
# Forwarded records whose log place is remembered by seq (erasures look theirs up).
_PLACES = 65_536


class LogGap(JournalFailed):
    """Raised by :meth:`RedisStreamsLog.run` when entries this node still needs were trimmed.

    The node's snapshot is older than the oldest entry kept (it was away for longer than the
    liveness window, so trimming stopped waiting for it). Replaying would silently skip events;
    start it with ``--join`` to fetch a peer's snapshot instead.
    """


# --- configuration ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RedisLogConfig:
    """Where the log lives and how it is used.

    Attributes:
        cluster: True for ``redis+cluster://`` (any one node of the cluster is given).
        host: Redis host.
        port: Redis port.
        db: Database number (always 0 on a cluster).
        password: Password, or None.
        name: The log's name, part of every key, so several logs can share one Redis.
        partitions: Partition streams; None picks 1 on one server and the number of masters
            on a cluster. Every node of one log must use the same number.
        replicas: With n > 0 each group is followed by ``WAIT n`` and only acknowledged once
            n replicas have it.
        replica_timeout: Seconds ``WAIT`` may take before the group fails.
        op_timeout: Seconds any other Redis call may take before it counts as failed.
        block: Seconds one ``XREAD BLOCK`` waits for new entries.
        read_count: Most entries one read returns per stream.
        max_pending: Capacity of the append inbox, in requests (bounds one group's size).
        retry_interval: Seconds between attempts to reach Redis while it fails.
        liveness: Seconds a node's checkpoint counts for trimming; a node silent for longer
            no longer holds the log back (and must rejoin with ``--join`` if it comes back
            after its entries were trimmed).
        keep: Newest entries per partition never trimmed, whatever the positions say.
    """

    cluster: bool = False
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    name: str = "recstream"
    partitions: int | None = None
    replicas: int = 0
    replica_timeout: float = 1.0
    op_timeout: float = 2.0
    block: float = 1.0
    read_count: int = 1000
    max_pending: int = 256
    retry_interval: float = 0.5
    liveness: float = 3600.0
    keep: int = 10_000

    def __attrs_post_init__(self) -> None:
        if self.partitions is not None and not 1 <= self.partitions <= 1024:
            raise ValueError("partitions must be between 1 and 1024")
        for name in ("op_timeout", "block", "retry_interval", "liveness", "replica_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.replicas < 0 or self.keep < 0 or self.read_count < 1 or self.max_pending < 1:
            raise ValueError("replicas and keep must be >= 0, read_count and max_pending >= 1")
        if self.cluster and self.db != 0:
            raise ValueError("Redis Cluster has only database 0")
        if not self.name or any(c in self.name for c in "{}: "):
            raise ValueError("the log name must be non-empty, without braces, colons or spaces")


def parse_log_url(url: str, **settings: Any) -> RedisLogConfig:
    """The configuration for ``redis://[:password@]host:port[/db][?name=N]`` or
    ``redis+cluster://[:password@]host:port[?name=N]``.

    Besides ``name``, the query may set the trimming bounds: ``keep`` (newest entries per
    partition never trimmed) and ``liveness`` (seconds a node's checkpoint holds the log
    back), e.g. ``?keep=100000&liveness=86400``.

    Args:
        url: The ``--log`` value.
        settings: Further :class:`RedisLogConfig` fields (``partitions=``, ``replicas=``...).

    Raises:
        ValueError: The URL is not one of these forms.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "redis+cluster"):
        raise ValueError(f"log URL {url!r}: the scheme must be redis:// or redis+cluster://")
    if not parts.hostname:
        raise ValueError(f"log URL {url!r} names no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"log URL {url!r}: bad port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"log URL {url!r}: the path must be a database number")
    query = parse_qs(parts.query)
    unknown = set(query) - {"name", "keep", "liveness"}
    if unknown:
        raise ValueError(f"log URL {url!r}: unknown parameters {sorted(unknown)}")
    for key, kind in (("name", str), ("keep", int), ("liveness", float)):
        if key in query:
            try:
                settings.setdefault(key, kind(query[key][-1]))
            except ValueError:
                raise ValueError(f"log URL {url!r}: {key} must be a number") from None
    return RedisLogConfig(
        cluster=parts.scheme == "redis+cluster",
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        password=unquote(parts.password) if parts.password else None,
        **settings,
    )


# --- nodes -------------------------------------------------------------------------------

#: The file in a node's data directory that holds its name in the node registry.
NODE_ID_FILE = "node-id"


def node_id_for(data_dir: Path) -> str:
    """This data directory's node name: made once (random), then read back on every restart,
    so a restarted node takes over its own registry entry. A wiped directory is a new node.
    """
    path = data_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(name)
        os.replace(tmp, path)
        return name


def fetch_snapshot(
    peer: str, target: Path, *, admin_key: str | None = None, timeout: float = 60.0
) -> int:
    """Downloads a peer's newest snapshot (``GET /v1/admin/snapshot``), checks that it loads,
    and makes it ``target`` (atomically); returns its size. Blocking: call it before serving.

    Args:
        peer: The peer's HTTP base URL, e.g. ``http://10.0.0.7:8000``.
        target: Where this node keeps its newest snapshot.
        admin_key: The admin key, when the peer requires keys.
        timeout: Seconds for the whole download.

    Raises:
        OSError: The peer could not be reached, refused, or sent something that is not a
            usable snapshot (``CorruptSnapshot`` is a ``ValueError`` and is reported as such).
    """
    url = peer.rstrip("/") + "/v1/admin/snapshot"
    request = urllib.request.Request(url)
    if admin_key:
        request.add_header("X-Recstream-Key", admin_key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".join")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        raise OSError(f"{url} refused: {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise OSError(f"cannot fetch {url}: {e}") from None
    try:
        Model.load(tmp)
    except ValueError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{url} sent no usable snapshot: {e}") from None
    size = tmp.stat().st_size
    os.replace(tmp, target)
    return size


# --- partitions and positions ---------------------------------------------------------------


def partition_keys(name: str, n: int) -> list[str]:
    """The stream keys of a log with ``n`` partitions.

    Key ``i`` is ``recstream:{<name>-<j>}:p<i>`` with the smallest ``j`` whose hash tag falls
    in the ``i``-th of ``n`` equal ranges of the 16384 cluster slots. A cluster whose masters
    split the slots evenly (as ``redis-cli --cluster create`` does) then holds one partition
    per master; the keys depend on nothing but the name and ``n``, so every node computes the
    same ones and resharding moves streams without renaming them.
    """
    keys = []
    for i in range(n):
        low = i * REDIS_CLUSTER_HASH_SLOTS // n
        high = (i + 1) * REDIS_CLUSTER_HASH_SLOTS // n
        j = 0
        while not low <= key_slot(f"{name}-{j}".encode()) < high:
            j += 1
        keys.append(f"recstream:{{{name}-{j}}}:p{i}")
    return keys


def _frame_of(payload: bytes) -> bytes:
    """The Forward frame inside a journal record (msgpack ``[accepted_at, frame]``)."""
    _, frame = msgpack.unpackb(payload, raw=False)
    if not isinstance(frame, bytes):
        raise ValueError("the record holds no frame")
    return frame


def producer_tag(payload: bytes) -> str:
    """The Forward tag of the frame inside a journal record (``[accepted_at, frame]``).

    Raises:
        ValueError: The record is not a journal record.
    """
    try:
        frame = _frame_of(payload)
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame))
        unpacker.feed(frame)
        unpacker.read_array_header()
        tag = unpacker.unpack()
    except Exception as e:
        raise ValueError(f"not a journal record: {e}") from e
    if not isinstance(tag, str):
        raise ValueError("the frame's tag is not a string")
    return tag


def partition_of(payload: bytes, n: int) -> int:
    """The partition of a journal record: CRC-32 of its producer tag, modulo ``n``."""
    if n == 1:
        return 0
    return zlib.crc32(producer_tag(payload).encode()) % n


def parse_id(raw: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``.

    Raises:
        ValueError: Not a stream id.
    """
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, sep, seq = text.partition("-")
    if not (ms.isdigit() and (not sep or seq.isdigit())):
        raise ValueError(f"not a stream id: {text!r}")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def encode_position(position: Mapping[str, StreamId]) -> bytes:
    """The opaque position the engine stores in snapshots: msgpack ``{key: "ms-seq"}``."""
    return msgpack.packb({k: format_id(v) for k, v in sorted(position.items())})


def decode_position(raw: bytes) -> dict[str, StreamId]:
    """Inverse of :func:`encode_position`; ``b""`` (no position yet) is the empty mapping.

    Raises:
        ValueError: The bytes are not a position.
    """
    if not raw:
        return {}
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise ValueError(f"log position is not msgpack: {e}") from e
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("log position is not a map of stream keys")
    return {k: parse_id(v) for k, v in value.items()}


# --- the log ------------------------------------------------------------------------------


class _Request:
    """One producer's append. Mutated only by the appender task."""

    __slots__ = ("done", "error", "ids", "payloads")

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads
        self.done = trio.Event()
        self.ids: list[tuple[str, StreamId]] = []
        self.error: Exception | None = None


class RedisStreamsLog:
    """The durable, ordered log of accepted frames, shared by every node through Redis.

    Start it with ``await nursery.start(log.run, output, after_seq=..., after_position=...)``;
    ``run`` returns once it has forwarded what the log held when it started. Stop it with
    :meth:`aclose`.

    Args:
        config: Where the log is (:func:`parse_log_url`).
        node_id: This node's name in the node registry (for trimming); stable across restarts
            of the same node (the engine derives it from its data directory).
        now: The wall clock (for the node registry).

    Attributes:
        fault: Why appends fail now (Redis unreachable, timing out, refusing), or None.
        faults: Failed Redis calls since start.
        keys: The partition stream keys (known once ``run`` has started).
    """

    replicated = True  # every node applies the whole log

    def __init__(
        self,
        config: RedisLogConfig,
        *,
        node_id: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.node_id = node_id or uuid.uuid4().hex
        self._now = now
        self.fault: str | None = None
        self.faults = 0
        self.keys: list[str] = []
        self._registry = f"recstream:{{{config.name}}}:nodes"
        self._trimmed = f"recstream:{{{config.name}}}:trimmed"
        self._send, self._inbox = trio.open_memory_channel[_Request](config.max_pending)
        self._started = trio.Event()
        self._stopped = trio.Event()
        self._closing = False
        self._position: dict[str, StreamId] = {}
        self._last_seq = 0
        # Seqs of the entries this node appended, by (key, id), until their appender collects
        # them. Bounded: an appender whose call failed after Redis took the entry never
        # collects, and the oldest such leftovers are dropped first.
        self._own: OrderedDict[tuple[str, StreamId], int] = OrderedDict()
        self._own_cap = 64 * config.max_pending + 65_536
        # The newest forwarded records' places, by seq (for erasure: where an erase record
        # sits in the log), and whether this node appended them.
        self._places: OrderedDict[int, tuple[str, StreamId, bool]] = OrderedDict()
        self._progress = trio.Event()
        self._waiting = 0
        self._idle = trio.Event()
        self._idle.set()
        self._appender_done = trio.Event()
        self._heads: dict[str, StreamId] = {}
        self._added_start: dict[str, int] = {}
        self._added_now: dict[str, int] = {}
        self._read_after_start: dict[str, int] = {}
        self._head_start: dict[str, StreamId] = {}
        self._cancel = trio.CancelScope()
        self._admin: redis.Redis | RedisCluster | None = None

    # -- clients --

    def _client(self, *, blocking: bool = False) -> redis.Redis | RedisCluster:
        """A new client. The appender and each reader have their own, so a blocking read
        never waits behind an append; the rare calls (checkpoints, erasures, head samples)
        share one, which redis-py's connection pool makes safe across threads."""
        c = self.config
        # A blocking read waits `block` and a WAIT up to `replica_timeout` before answering.
        timeout = (
            c.op_timeout
            + (c.block if blocking else 0.0)
            + (c.replica_timeout if c.replicas else 0.0)
        )
        common: dict[str, Any] = {
            "password": c.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": c.op_timeout,
            # No silent retries inside the client: a failed call fails its group at once (its
            # producers resend), and the fault shows in ``fault`` and /readyz.
            "retry": Retry(NoBackoff(), 0),
        }
        if c.cluster:
            return RedisCluster(host=c.host, port=c.port, **common)
        return redis.Redis(host=c.host, port=c.port, db=c.db, **common)

    async def _call(self, fn: Callable[[], T]) -> T:
        """Runs a blocking Redis call in a worker thread."""
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)

    def _fail(self, what: str, e: Exception) -> str:
        self.faults += 1
        self.fault = f"{what}: {type(e).__name__}: {e}"
        return self.fault

    # -- the public face --

    async def run(
        self,
        output: trio.MemorySendChannel[Appended],
        *,
        after_seq: int,
        after_position: bytes,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forwards every record of the log after ``after_position``, numbered from
        ``after_seq + 1``: first the backlog, then what any node appends later.

        Args:
            output: The model actor's bounded inbox; closed when ``run`` returns.
            after_seq: The seq of the last record the node's snapshot reflects.
            after_position: The log position of that record (empty: the log's start).
            task_status: Started once the backlog present at start has been forwarded.

        Raises:
            LogGap: Entries after ``after_position`` were trimmed (rejoin with ``--join``).
            redis.RedisError: Redis could not be reached at start.
        """
        async with output:
            try:
                self._admin = self._client()
                await self._resolve_keys()
                stored = decode_position(after_position)
                self._position = {k: stored.get(k, _ZERO) for k in self.keys}
                self._last_seq = after_seq
                await self._check_gap()
                # Registered before catching up, so trimming waits for this node from now on.
                await self._call(lambda: self._register(self._position))
                await self._sample_heads(start=True)
                merged_send, merged = trio.open_memory_channel[tuple[str, list[Any]]](4)
                with self._cancel:
                    async with trio.open_nursery() as nursery:
                        async with merged_send:
                            for group in self._read_groups():
                                nursery.start_soon(self._reader, group, merged_send.clone())
                        nursery.start_soon(self._sampler)
                        await self._forward_backlog(merged, output)
                        self._started.set()
                        task_status.started()
                        nursery.start_soon(self._appender)
                        await self._forward(merged, output)
            finally:
                self._stopped.set()
                self._started.set()
                if self._admin is not None:
                    self._admin.close()

    async def append(self, payloads: Sequence[bytes]) -> int:
        """Appends journal records; returns the seq of the last once Redis holds them all and
        this node's reader has forwarded them.

        Raises:
            JournalClosed: The log is closing (nothing was appended).
            JournalFailed: Redis did not confirm (unreachable, timed out, too few replicas);
                some entries may be in the log anyway, so a producer resends and the model's
                redelivery window drops the copies.
            ValueError: A payload is not a journal record.
        """
        if not payloads:
            raise ValueError("nothing to append")
        for p in payloads:
            partition_of(p, 2)  # refuse what the reader could not route, before Redis sees it
        await self._started.wait()
        if self._closing or self._stopped.is_set():
            raise JournalClosed("the log is closed")
        request = _Request(list(payloads))
        try:
            await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise JournalClosed("the log is closed") from None
        await request.done.wait()
        if request.error is not None:
            raise request.error
        self._waiting += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            last = request.ids[-1]
            while last not in self._own:
                if self._stopped.is_set():
                    raise JournalClosed("the log closed before the records were read back")
                await self._progress.wait()
            seq = self._own[last]
            for key in request.ids:
                self._own.pop(key, None)
            return seq
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._idle.set()

    async def checkpoint(self, seq: int, position: bytes) -> None:
        """Records this node's snapshot position in the registry and trims every partition
        below the oldest position of the live nodes (keeping ``config.keep`` entries).

        A Redis error is logged and counted, not raised: the next checkpoint tries again.
        """
        try:
            await self._call(lambda: self._register(decode_position(position)))
            await self._call(self._trim)
        except redis.RedisError as e:
            log.warning("checkpoint not recorded in Redis: %s", self._fail("checkpoint", e))

    async def erase(self, users: Mapping[Any, int]) -> int:
        """Deletes (``XDEL``) the log entries whose frames hold only records of ``users``, up
        to each user's erase record; returns the entries deleted.

        Only the node that appended the erase record does this (the others find the entries
        gone or going). A stream entry cannot be rewritten in place, so a frame that mixes an
        erased user's events with other users' stays whole until trimming removes it; the
        model of every node forgot the user when it applied the erase record. Records are
        compared by stream id across partitions, which orders them by the Redis server's
        clock. A Redis error leaves the entries for trimming and is logged.
        """
        cuts: dict[Any, StreamId] = {}
        for user, seq in users.items():
            place = self._places.get(seq)
            if place is None:  # forwarded long ago: every entry up to the present position
                cuts[user] = max(self._position.values(), default=_ZERO)
            elif place[2]:
                cuts[user] = place[1]
        if not cuts:
            return 0
        newest = max(cuts.values())
        admin = self._admin
        assert admin is not None

        def scan_and_delete() -> tuple[int, int]:
            deleted = mixed = 0
            for key in self.keys:
                start = "-"
                while True:
                    page: Any = admin.xrange(key, start, format_id(newest), count=500)
                    doomed = []
                    for raw_id, fields in page:
                        sid = parse_id(raw_id)
                        wanted = {u for u, cut in cuts.items() if sid <= cut}
                        if not wanted or b"r" not in fields:
                            continue
                        frame = _frame_of(fields[b"r"])
                        left = drop_users(frame, wanted)
                        if left is None:
                            doomed.append(raw_id)
                        elif left is not frame:
                            mixed += 1
                    if doomed:
                        deleted += int(admin.xdel(key, *doomed))
                    if len(page) < 500:
                        break
                    last = parse_id(page[-1][0])
                    start = format_id((last[0], last[1] + 1))
            return deleted, mixed

        try:
            deleted, mixed = await self._call(scan_and_delete)
        except redis.RedisError as e:
            log.warning("erasure left the log entries to trimming: %s", self._fail("erase", e))
            return 0
        if mixed:
            log.warning(
                "%d log entries mix erased users' events with others'; they stay until trimmed",
                mixed,
            )
        return deleted

    def stats(self) -> dict[str, Any]:
        """The node's log position, the head and the lag (entries behind it, sampled each
        second; None until the backlog present at start has been read)."""
        lag: int | None = None
        if self._started.is_set() and self._added_now:
            # Entries added since start less those read since; a partition whose newest entry
            # was read counts 0 (entries deleted before this node read them never arrive).
            lag = sum(
                max(
                    0,
                    self._added_now.get(k, 0)
                    - self._added_start.get(k, 0)
                    - self._read_after_start.get(k, 0),
                )
                for k in self.keys
                if self._position[k] < self._heads.get(k, _ZERO)
            )
        return {
            "log": "redis",
            "node": self.node_id,
            "partitions": len(self.keys),
            "position": {k: format_id(v) for k, v in self._position.items()},
            "head": {k: format_id(v) for k, v in self._heads.items()},
            "lag": lag,
            "fault": self.fault,
        }

    async def wait_durable(self, seq: int) -> None:
        """Returns at once: only entries Redis confirmed are read back and forwarded."""

    async def aclose(self) -> None:
        """Stops taking appends, lets queued ones finish (written and read back), then ends
        ``run`` (which closes its output)."""
        self._closing = True
        await self._send.aclose()
        with trio.move_on_after(self.config.op_timeout * 2 + self.config.block):
            if self._started.is_set() and not self._stopped.is_set():
                await self._appender_done.wait()
            await self._idle.wait()
        self._cancel.cancel()
        await self._stopped.wait()

    # -- start-up --

    async def _resolve_keys(self) -> None:
        c = self.config
        n = c.partitions
        admin = self._admin
        assert admin is not None
        if n is None:
            if isinstance(admin, RedisCluster):
                n = len(await self._call(admin.get_primaries))
            else:
                n = 1
        self.keys = partition_keys(c.name, n)

    async def _check_gap(self) -> None:
        admin = self._admin
        assert admin is not None
        trimmed = await self._call(lambda: admin.hgetall(self._trimmed))
        for raw_key, raw_id in trimmed.items():
            key, cut = _text(raw_key), parse_id(raw_id)
            if key in self._position and self._position[key] < cut:
                raise LogGap(
                    f"{key} was trimmed below {format_id(cut)}, after this node's position "
                    f"{format_id(self._position[key])}: start it with --join URL of a peer"
                )

    def _read_groups(self) -> list[list[str]]:
        """Keys read by one ``XREAD`` each: all on one server, one per partition on a cluster
        (a command may not span slots there)."""
        if self.config.cluster:
            return [[k] for k in self.keys]
        return [list(self.keys)]

    async def _sample_heads(self, *, start: bool = False) -> None:
        """Reads each partition's head id and total entries ever added (``XINFO STREAM``)."""
        admin = self._admin
        assert admin is not None

        def sample() -> dict[str, tuple[StreamId, int]]:
            out = {}
            for key in self.keys:
                try:
                    info = admin.xinfo_stream(key)
                except redis.ResponseError:  # no such stream yet
                    out[key] = (_ZERO, 0)
                    continue
                # The newest entry that exists: the last generated one may have been deleted.
                last = info.get("last-entry")
                out[key] = (parse_id(last[0]) if last else _ZERO, int(info["entries-added"]))
            return out

        for key, (head, added) in (await self._call(sample)).items():
            self._heads[key] = head
            self._added_now[key] = added
            if start:
                self._head_start[key] = head
                self._added_start[key] = added
                self._read_after_start[key] = 0

    async def _sampler(self) -> None:
        while True:
            await trio.sleep(1.0)
            try:
                await self._sample_heads()
            except redis.RedisError as e:
                log.debug("head sample failed: %s", e)

    # -- reading --

    async def _reader(
        self, keys: list[str], out: trio.MemorySendChannel[tuple[str, list[Any]]]
    ) -> None:
        """``XREAD BLOCK`` over ``keys`` from this reader's own positions, forever; Redis
        errors are retried every ``retry_interval``."""
        client = self._client(blocking=True)
        at = {k: self._position[k] for k in keys}
        async with out:
            try:
                await self._read_loop(client, at, out)
            finally:
                client.close()

    async def _read_loop(
        self,
        client: redis.Redis | RedisCluster,
        at: dict[str, StreamId],
        out: trio.MemorySendChannel[tuple[str, list[Any]]],
    ) -> None:
        block_ms = max(1, int(self.config.block * 1000))
        count = self.config.read_count
        while True:
            streams = {k: format_id(v) for k, v in at.items()}
            try:
                got = await self._call(
                    lambda s=streams: client.xread(s, count=count, block=block_ms)  # type: ignore[misc]
                )
            except redis.RedisError as e:
                log.warning("reading the log failed: %s", e)
                self.faults += 1
                await trio.sleep(self.config.retry_interval)
                continue
            items = _stream_items(got)
            if not items:
                # Nothing new within `block`: these keys are caught up (an empty batch says
                # so to the forwarder, which needs it while catching up).
                for key in at:
                    await out.send((key, []))
            for raw_key, entries in items:
                key = _text(raw_key)
                if entries:
                    at[key] = parse_id(entries[-1][0])
                    await out.send((key, entries))

    async def _forward_backlog(
        self,
        merged: trio.MemoryReceiveChannel[tuple[str, list[Any]]],
        output: trio.MemorySendChannel[Appended],
    ) -> None:
        """Forwards until every partition reached the head it had at start, or its reader
        found nothing more (the head entry may have been deleted since)."""
        behind = {k for k in self.keys if self._position[k] < self._head_start[k]}
        while behind:
            key, entries = await merged.receive()
            if entries:
                await self._forward_one(key, entries, output)
            if not entries or self._position[key] >= self._head_start[key]:
                behind.discard(key)

    async def _forward(
        self,
        merged: trio.MemoryReceiveChannel[tuple[str, list[Any]]],
        output: trio.MemorySendChannel[Appended],
    ) -> None:
        async for key, entries in merged:
            await self._forward_one(key, entries, output)

    async def _forward_one(
        self, key: str, entries: list[Any], output: trio.MemorySendChannel[Appended]
    ) -> None:
        """Numbers and forwards entries read from ``key``, skipping any at or before the
        position (entries the snapshot already reflects); an empty batch forwards nothing."""
        payloads: list[bytes] = []
        first_seq = self._last_seq + 1
        me = self.node_id.encode()
        head_start = self._head_start.get(key, _ZERO)
        for raw_id, fields in entries:
            sid = parse_id(raw_id)
            if sid <= self._position[key]:
                continue
            payload = fields.get(b"r")
            if payload is None:
                log.error("log entry %s %s has no record: skipped", key, format_id(sid))
                continue
            self._position[key] = sid
            self._last_seq += 1
            payloads.append(payload)
            if sid > head_start:
                self._read_after_start[key] = self._read_after_start.get(key, 0) + 1
            mine = fields.get(b"n") == me
            if mine:
                self._own[(key, sid)] = self._last_seq
                if len(self._own) > self._own_cap:
                    self._own.popitem(last=False)
            self._places[self._last_seq] = (key, sid, mine)
            if len(self._places) > _PLACES:
                self._places.popitem(last=False)
        if payloads:
            if self._heads.get(key, _ZERO) < self._position[key]:
                self._heads[key] = self._position[key]
            await output.send(Appended(first_seq, tuple(payloads), encode_position(self._position)))
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    # -- appending --

    async def _appender(self) -> None:
        """Group commit: takes every queued request, writes them in one pipeline, wakes them."""
        try:
            await self._append_groups()
        finally:
            self._appender_done.set()

    async def _append_groups(self) -> None:
        client = self._client()
        try:
            await self._append_loop(client)
        finally:
            client.close()

    async def _append_loop(self, client: redis.Redis | RedisCluster) -> None:
        backoff = self.config.retry_interval
        while True:
            if self.fault is None:
                try:
                    first = await self._inbox.receive()
                except trio.EndOfChannel:
                    return
            else:
                with trio.move_on_after(backoff) as idle:
                    try:
                        first = await self._inbox.receive()
                    except trio.EndOfChannel:
                        return
                if idle.cancelled_caught:
                    try:
                        await self._call(client.ping)
                        self.fault = None
                    except redis.RedisError as e:
                        self._fail("Redis unreachable", e)
                    continue
            group = [first]
            while True:
                try:
                    group.append(self._inbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._commit(client, group)

    async def _commit(self, client: redis.Redis | RedisCluster, group: list[_Request]) -> None:
        n = len(self.keys)
        c = self.config
        routed = [[(self.keys[partition_of(p, n)], p) for p in r.payloads] for r in group]
        me = self.node_id.encode()

        def write() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for entries in routed:
                for key, payload in entries:
                    pipe.xadd(key, {b"r": payload, b"n": me})
            results = pipe.execute()
            if c.replicas:
                touched = {key for entries in routed for key, _ in entries}
                for key in touched:
                    if isinstance(client, RedisCluster):
                        node = client.get_node_from_key(key)
                        acked = client.execute_command(
                            "WAIT", c.replicas, int(c.replica_timeout * 1000), target_nodes=node
                        )
                    else:
                        acked = client.execute_command(
                            "WAIT", c.replicas, int(c.replica_timeout * 1000)
                        )
                    if int(acked) < c.replicas:
                        raise redis.RedisError(
                            f"only {acked} of {c.replicas} replicas confirmed within "
                            f"{c.replica_timeout} s"
                        )
                    if not isinstance(client, RedisCluster):
                        break  # one WAIT covers every write of this connection
            return results

        try:
            ids = await self._call(write)
        except redis.RedisError as e:
            reason = self._fail("appending to Redis failed", e)
            log.warning("%s; %d requests refused", reason, len(group))
            for r in group:
                failed = JournalFailed(reason)
                failed.__cause__ = e
                r.error = failed
                r.done.set()
            return
        self.fault = None
        it = iter(ids)
        for r, entries in zip(group, routed, strict=True):
            r.ids = [(key, parse_id(next(it))) for key, _ in entries]
            r.done.set()

    # -- checkpoints and trimming --

    def _register(self, position: Mapping[str, StreamId]) -> None:
        assert self._admin is not None
        record = msgpack.packb(
            {"position": {k: format_id(v) for k, v in position.items()}, "time": self._now()}
        )
        self._admin.hset(self._registry, self.node_id, record)

    def trim_points(self, nodes: Mapping[Any, Any]) -> dict[str, StreamId]:
        """Per partition, the oldest position among the nodes seen within ``liveness``.

        A live node without a position for a partition pins it at the start (nothing is
        trimmed there). Partitions no live node reports are absent.
        """
        now = self._now()
        low: dict[str, StreamId] = {}
        for raw in nodes.values():
            try:
                record = msgpack.unpackb(raw, raw=False)
                seen = float(record["time"])
                position = {k: parse_id(v) for k, v in record["position"].items()}
            except Exception as e:
                log.warning("node registry entry unreadable: %s", e)
                return {}  # unknown state: trim nothing
            if now - seen > self.config.liveness:
                continue
            for key in self.keys:
                p = position.get(key, _ZERO)
                low[key] = min(low.get(key, p), p)
        return low

    def _trim(self) -> dict[str, int]:
        """Trims each partition below its trim point, never into its newest ``keep`` entries.

        Returns:
            Entries removed per key.
        """
        admin = self._admin
        assert admin is not None
        removed: dict[str, int] = {}
        points = self.trim_points(admin.hgetall(self._registry))
        for key, point in points.items():
            if point == _ZERO:
                continue
            limit = point
            if self.config.keep:
                newest: Any = admin.xrevrange(key, "+", "-", count=self.config.keep)
                if len(newest) < self.config.keep:
                    continue
                limit = min(limit, parse_id(newest[-1][0]))
            # Record the cut first: a node whose position is below it must not replay.
            admin.hset(self._trimmed, key, format_id(limit))
            removed[key] = int(admin.xtrim(key, minid=format_id(limit), approximate=False))
        return removed


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _stream_items(got: Any) -> list[tuple[Any, list[Any]]]:
    """``XREAD``'s (RESP2) reply as ``[(key, [(id, fields)...])...]``; None when it timed out."""
    return [(k, entries) for k, entries in got or ()]
