"""The latency benchmark's subscribers: thousands of websockets per process, cheaply.

Each subscriber process (``multiprocessing`` with ``spawn``, so nothing of the parent's
threads or event loop is inherited) runs one ``selectors`` loop (epoll on Linux) over raw
non-blocking sockets, each speaking the websocket protocol of :mod:`bench._wsclient`. A push
costs it a ``recv``, a frame parse and one compiled-regex match (:func:`parse_push`), no JSON
decode.

Receipt times are when a push reached the subscriber's socket, not when this process got
round to reading it: the kernel stamps every arriving segment (``SO_TIMESTAMPNS``; a ``recv``
reports the stamp of the newest segment it read, so pushes read together all get the latest
one's time), converted to ``time.perf_counter()`` (CLOCK_MONOTONIC, the same clock in every
process on Linux) so the producer's send times in another process compare with them. A real
subscriber is another machine; here the load generator shares the server's two CPUs, and a
push that woke this process at once would wake it thousands of times a second, each wake-up
preempting a thread of the server. So the process reads its sockets at most once every
``poll_interval`` (1 ms by default): whatever arrived meanwhile is read in one round, and its
arrival times are still the kernel's. ``poll_interval = 0`` reads each push as it comes. How
long pushes waited in their sockets to be read (``read_delay``) is reported, so the two
measures can be compared.

It talks to the benchmark over a ``multiprocessing`` pipe, in bulk and never per message
(and to the producer over a second one, which carries only the lists):

* ``("subscribed", ok, failed, errors, seconds)`` once every subscription was tried,
  ``seconds`` from the first connect to the last first list (or the last failure);
* ``("lists", {user: items}, pushes, timed)`` every ``list_interval``, to the producer: the
  lists that changed since the last one (it clicks items of the current lists), as
  :func:`parse_push` returned them (the producer reads one with :func:`items_of` only when it
  picks that user: most lists are replaced before that), with progress counts;
* on ``("start", oracle)`` it starts a measured window (counters and samples from zero, the
  staleness oracle running when asked), on ``("stop",)`` it ends it and answers
  ``("report", {...})``: the window's counts, its samples (cause ids and receipt times as
  arrays of machine numbers) and the oracle's figures;
* on ``("close",)`` it closes every websocket (a masked close frame each, then up to
  ``close_timeout`` for the server's answers), answers ``("closed", {...})`` and exits.

Staleness oracle (the ``drift`` rows). While a window runs with the oracle on, the process
fetches each of its subscribers' exact current lists (``GET /v1/users/{u}/recommendations``
with the subscription's ``k``) over a few keep-alive HTTP connections, at most
``oracle_rate`` requests per second, one sweep over all its users every ``oracle_interval``
seconds (longer when the rate bound makes a sweep take longer). Each answer is compared with
the last list pushed to that subscriber when the answer arrived:

* the pair is *not comparable* (skipped) when the push carries a newer ``version`` (journal
  sequence) than the answer: the push already reflects more than the GET did;
* it is *stale* when the lists differ by membership of the top-k, or an item of the exact
  list sits more than ``RANK_SLACK`` (2, the server's default ``drift_rank_slack``) places
  away from its place in the pushed one: the differences the server promises to push.
  Smaller reorderings are counted apart (``differs`` counts any difference, order included)
  and are not staleness;
* a stale episode starts when an answer first shows it and ends at the next push to that
  subscriber (or an answer showing the lists agreeing again). Its length is measured from
  detection, so it misses up to one sweep of the true staleness before it; episodes still
  open when the window ends count up to that moment.

Stale therefore covers both causes: other users' events moving a list (drift) and the
subscriber's own events not yet pushed (the push latency itself). The oracle's own load is
bounded by ``oracle_rate`` and reported: its GETs (each a list computed by the server, like a
push) and the CPU this process spent on them (thread CPU time around the oracle's work).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import selectors
import socket
import struct
import time
import urllib.parse
from array import array
from typing import Any

import attrs

from bench._wsclient import Client, ProtocolError, State

__all__ = [
    "RANK_SLACK",
    "Oracle",
    "SubscriberPlan",
    "drifted",
    "items_of",
    "parse_push",
    "raise_fd_limit",
    "run_subscribers",
]

RANK_SLACK = 2  # the server's default drift_rank_slack: what the oracle calls stale
RECV_BYTES = 1 << 16
# Linux's SO_TIMESTAMPNS (also its control message's type; the socket module lacks it): the
# kernel's receive time of a segment, as a struct timespec of two 64-bit integers.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)
READ_DELAY_EVERY = 16  # one read in this many (the first of each) is sampled for ``read_delay``
ORACLE_CONNECTIONS = 4  # keep-alive HTTP connections per process for the oracle's GETs

# The message layout of engine._publisher (Subscription.message), as bytes:
#     {"user":U[,"variant":V],"items":[{"item":I,"score":S...},...],"version":N,"cause":C}
# with C null or {"seq":N,"id":ID,"accepted_at":T}. The key ,"version": cannot occur inside a
# JSON string (its quote would be escaped), so its last occurrence is the top-level one and
# the tail after it is matched exactly; strings are only accepted there without escapes or
# control characters and numbers only in JSON's own grammar, so what matches reads as
# json.loads reads it. Anything else (another layout, an escaped cause id) goes to
# json.loads.
_INT = rb"-?(?:0|[1-9][0-9]*)"
_STR = rb'"[^"\\\x00-\x1f]*"'
_ID = rb"(?:" + _INT + rb"|" + _STR + rb")"
_NUM = _INT + rb"(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_TAIL = re.compile(
    rb',"version":(0|[1-9][0-9]*),"cause":(?:null|\{"seq":'
    + _INT
    + rb',"id":(null|'
    + _ID
    + rb'),"accepted_at":'
    + _NUM
    + rb"\})\}"
)
_ITEM = re.compile(rb'\{"item":(' + _ID + rb")(?=[,}])")


def _id(raw: bytes) -> int | str:
    return raw[1:-1].decode() if raw[:1] == b'"' else int(raw)


def parse_push(message: bytes) -> tuple[int, int | str | None, bytes | list[Any]]:
    """``(version, cause id, items)`` of a pushed message; the cause id is None for a drift
    refresh (no cause) or a cause without an id.

    ``items`` is the raw bytes of the ``items`` array when the cheap reading succeeded (read
    them with :func:`items_of` only when needed), else the list json.loads found.

    Raises:
        ValueError: The message is not JSON, or not a push (no ``version`` or ``items``).
    """
    at = message.rfind(b',"version":')
    start = message.find(b',"items":[')
    if message.startswith(b'{"user":') and 0 < start < at:
        m = _TAIL.fullmatch(message, at)
        if m is not None:
            cause = m.group(2)
            return (
                int(m.group(1)),
                None if cause is None or cause == b"null" else _id(cause),
                message[start + 9 : at],
            )
    doc = json.loads(message)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError("not a pushed list")
    cause_doc = doc.get("cause")
    cause_id = cause_doc.get("id") if isinstance(cause_doc, dict) else None
    return int(doc["version"]), cause_id, [x["item"] for x in doc["items"]]


def items_of(items: bytes | list[Any]) -> list[Any]:
    """The item ids of what :func:`parse_push` returned as ``items`` (the raw array: read
    with a regex when no string in it has an escape and every entry's id matched, else with
    json.loads)."""
    if isinstance(items, list):
        return items
    if b"\\" not in items:
        found = _ITEM.findall(items)
        if len(found) == items.count(b'{"item":'):
            try:
                return list(map(int, found))
            except ValueError:  # some are strings
                return [_id(raw) for raw in found]
    return [x["item"] for x in json.loads(items)]


def drifted(old: list[Any], new: list[Any], slack: int = RANK_SLACK) -> bool:
    """Whether ``new`` differs from ``old`` by membership, or moves an item more than
    ``slack`` places (what the server pushes a drift for)."""
    if len(old) != len(new):
        return True
    where = {item: n for n, item in enumerate(old)}
    for n, item in enumerate(new):
        at = where.get(item)
        if at is None or abs(at - n) > slack:
            return True
    return False


def raise_fd_limit() -> int:
    """Raises this process's open-file limit (RLIMIT_NOFILE) to its hard limit; returns the
    limit now in force (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


@attrs.define
class Oracle:
    """Staleness: subscribers' exact lists fetched now and then, against their last push.

    ``open`` holds, per subscriber found stale, when that was first seen; a push (or an
    answer finding the lists agreeing) closes the episode and records its length.
    """

    compared: int = 0
    stale: int = 0
    differs: int = 0
    skipped: int = 0  # the push was newer than the GET: not comparable
    errors: int = 0
    sweeps: int = 0
    gets: int = 0
    cpu_s: float = 0.0  # this process's thread CPU time on the oracle's work
    open: dict[Any, float] = attrs.field(factory=dict)
    episodes: list[float] = attrs.field(factory=list)  # seconds

    def on_push(self, user: Any, received: float) -> None:
        started = self.open.pop(user, None)
        if started is not None:
            self.episodes.append(max(0.0, received - started))

    def observe(
        self,
        user: Any,
        exact: list[Any],
        version: int,
        last: tuple[list[Any], int] | None,
        now: float,
    ) -> None:
        """Compares the exact list (its GET answered at ``now`` with ``version``) with
        ``last``, the (items, version) last pushed to the subscriber."""
        if last is None or last[1] > version:
            self.skipped += 1
            return
        self.compared += 1
        self.differs += exact != last[0]
        if drifted(last[0], exact):
            self.stale += 1
            self.open.setdefault(user, now)
        else:
            self.on_push(user, now)

    def close(self, now: float) -> int:
        """Ends the window: open episodes count up to ``now``; returns how many were open."""
        still = len(self.open)
        for started in self.open.values():
            self.episodes.append(now - started)
        self.open.clear()
        return still

    def summary(self, still_open: int) -> dict[str, Any]:
        return {
            "sweeps": self.sweeps,
            "gets": self.gets,
            "compared": self.compared,
            "stale": self.stale,
            "differs": self.differs,
            "skipped_push_newer": self.skipped,
            "errors": self.errors,
            "open_at_end": still_open,
            "client_cpu_s": self.cpu_s,
            "episodes_s": self.episodes,
        }


@attrs.frozen
class SubscriberPlan:
    """What one subscriber process does.

    Attributes:
        host, port: The server's HTTP listener.
        users: The users it subscribes to, one websocket each.
        k: The list length asked for.
        key: A producer key (sent as ``?key=`` on websockets, ``X-Recstream-Key`` on GETs).
        connect_at_once: Upgrade handshakes in flight while subscribing.
        connect_timeout: Seconds for all subscriptions before giving up on the rest.
        list_interval: Seconds between list snapshots to the producer.
        oracle_interval: Seconds between the starts of two oracle sweeps.
        oracle_rate: The oracle's GETs per second, at most.
        close_timeout: Seconds to wait for the server's close frames at the end.
        poll_interval: Seconds between two reads of the sockets, at least (see the module);
            0: read each push as it arrives.
    """

    host: str
    port: int
    users: tuple[Any, ...]
    k: int = 10
    key: str | None = None
    connect_at_once: int = 64
    connect_timeout: float = 120.0
    list_interval: float = 0.05
    oracle_interval: float = 5.0
    oracle_rate: float = 100.0
    close_timeout: float = 10.0
    poll_interval: float = 0.001


@attrs.define(eq=False)
class _Socket:
    """One websocket: its user, socket and protocol state, and bytes not yet written."""

    user: Any
    sock: socket.socket
    ws: Client
    pending: bytes = b""
    got_first: bool = False


@attrs.define(eq=False)
class _Http:
    """One keep-alive HTTP connection of the oracle."""

    sock: socket.socket
    user: Any = None  # whose list is being fetched; None: idle
    buffer: bytes = b""
    pending: bytes = b""


class _Loop:
    """The subscriber process's state and its one event loop."""

    def __init__(self, conn: Any, lists_conn: Any, plan: SubscriberPlan) -> None:
        self.conn = conn
        self.lists_conn = lists_conn
        self.plan = plan
        self.sel = selectors.DefaultSelector()
        self.sel.register(conn.fileno(), selectors.EVENT_READ, None)
        self.queue: collections.deque[Any] = collections.deque(plan.users)
        self.connecting = 0
        self.sockets: set[_Socket] = set()
        self.ok = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.announced = False
        self.connect_started = 0.0
        self.last: dict[Any, tuple[bytes | list[Any], int]] = {}
        self.changed: dict[Any, bytes | list[Any]] = {}
        self.pushes = 0
        self.with_cause = 0
        self.other_causes = 0  # cause ids that are not the producer's integers
        self.ids = array("q")
        self.times = array("d")
        # Sampled seconds from a push's arrival in its socket to this process reading it.
        self.read_delays = array("d")
        self.reads = 0
        # CLOCK_REALTIME (the kernel's stamps) minus CLOCK_MONOTONIC (perf_counter), renewed
        # with every list snapshot so that a clock adjustment is followed.
        self.clock_offset = time.time() - time.perf_counter()
        self.closed_by_server: collections.Counter[int] = collections.Counter()
        self.oracle: Oracle | None = None
        self.oracle_queue: collections.deque[Any] = collections.deque()
        self.oracle_http: list[_Http] = []
        self.next_get = 0.0
        self.next_sweep = 0.0
        self.sweeping = False
        self.window_start = 0.0
        self.running = True
        self.closing_deadline: float | None = None
        query = f"k={plan.k}" + (f"&key={urllib.parse.quote(plan.key)}" if plan.key else "")
        self.ws_query = query
        self.host = f"{plan.host}:{plan.port}"

    # --- websockets ------------------------------------------------------------------------

    def connect_more(self) -> None:
        while self.queue and self.connecting < self.plan.connect_at_once:
            user = self.queue.popleft()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            target = f"/v1/ws/recommendations?user={urllib.parse.quote(str(user))}&{self.ws_query}"
            s = _Socket(user, sock, Client(self.host, target))
            s.pending = s.ws.take_outgoing()
            err = sock.connect_ex((self.plan.host, self.plan.port))
            if err not in (0, 115):  # EINPROGRESS
                sock.close()
                self.fail(s, f"connect: {os.strerror(err)}")
                continue
            self.sockets.add(s)
            self.connecting += 1
            self.sel.register(sock, selectors.EVENT_WRITE, s)
        self.maybe_announce()

    def fail(self, s: _Socket, why: str) -> None:
        self.failed += 1
        self.errors[why[:100]] += 1

    def maybe_announce(self) -> None:
        if not self.announced and not self.queue and self.connecting == 0:
            self.announced = True
            seconds = time.perf_counter() - self.connect_started
            self.conn.send(("subscribed", self.ok, self.failed, dict(self.errors), seconds))

    def drop(self, s: _Socket, why: str | None) -> None:
        """Forgets a websocket (closed by either side or broken)."""
        if s not in self.sockets:
            return
        self.sockets.discard(s)
        try:
            self.sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()
        if not s.got_first:
            self.connecting -= 1
            self.fail(s, why or f"closed {s.ws.close_code} before the first list")
            if self.closing_deadline is None:
                self.connect_more()
        elif s.ws.close_code is not None:
            self.closed_by_server[s.ws.close_code] += 1
        elif why is not None:
            self.errors[why[:100]] += 1

    def write(self, s: _Socket) -> None:
        out = s.pending + s.ws.take_outgoing()
        if out:
            try:
                n = s.sock.send(out)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.drop(s, f"send: {e.strerror or e}")
                return
            s.pending = out[n:]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if s.pending else 0)
        if s.ws.state is State.CLOSED and not s.pending:
            self.drop(s, None)
            return
        if self.sel.get_key(s.sock).events != want:
            self.sel.modify(s.sock, want, s)

    def on_ws_readable(self, s: _Socket) -> None:
        try:
            data, ancillary, _, _ = s.sock.recvmsg(RECV_BYTES, _ANCILLARY)
        except BlockingIOError:
            return
        except OSError as e:
            self.drop(s, f"recv: {e.strerror or e}")
            return
        now = time.perf_counter()
        received = now
        for level, kind, stamp in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack(stamp)
                received = min(now, sec - self.clock_offset + nsec * 1e-9)
        self.reads += 1
        if self.reads % READ_DELAY_EVERY == 1:
            self.read_delays.append(now - received)
        if not data:
            self.drop(s, "the server closed the connection without a close frame")
            return
        try:
            messages = s.ws.receive(data)
        except ProtocolError as e:
            self.drop(s, f"{type(e).__name__}: {e}")
            return
        for message in messages:
            self.on_message(s, message, received)
        if s.pending or s.ws.has_outgoing or s.ws.state is State.CLOSED:
            self.write(s)

    def on_message(self, s: _Socket, message: bytes, received: float) -> None:
        try:
            version, cause, items = parse_push(message)
        except (ValueError, KeyError, TypeError) as e:
            self.errors[f"bad message: {e}"[:100]] += 1
            return
        user = s.user
        self.last[user] = (items, version)
        self.changed[user] = items
        if not s.got_first:
            s.got_first = True  # the list sent on subscribing, not a push
            self.connecting -= 1
            self.ok += 1
            self.connect_more()
            return
        self.pushes += 1
        if self.oracle is not None:
            self.oracle.on_push(user, received)
        if cause is None:
            return  # a drift refresh: other users' events moved this list
        self.with_cause += 1
        if type(cause) is int:
            self.ids.append(cause)
            self.times.append(received)
        else:
            self.other_causes += 1

    # --- the oracle ------------------------------------------------------------------------

    def oracle_start(self) -> None:
        self.oracle = Oracle()
        self.sweeping = False
        self.next_sweep = time.perf_counter()
        self.next_get = self.next_sweep
        while len(self.oracle_http) < ORACLE_CONNECTIONS:
            self.oracle_http.append(self.http_connect())

    def http_connect(self) -> _Http:
        sock = socket.create_connection((self.plan.host, self.plan.port), timeout=10)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h = _Http(sock)
        self.sel.register(sock, selectors.EVENT_READ, h)
        return h

    def http_reconnect(self, h: _Http) -> None:
        self.sel.unregister(h.sock)
        h.sock.close()
        n = self.oracle_http.index(h)
        self.oracle_http[n] = self.http_connect()

    def oracle_tick(self, now: float) -> float:
        """Sends the GETs that fell due; returns when the next one is due."""
        oracle = self.oracle
        assert oracle is not None
        if not self.oracle_queue and all(h.user is None for h in self.oracle_http):
            if self.sweeping:
                self.sweeping = False
                oracle.sweeps += 1
            if self.next_sweep > now:
                return self.next_sweep
            self.sweeping = True
            self.oracle_queue.extend(s.user for s in self.sockets if s.got_first)
            self.next_sweep = now + self.plan.oracle_interval
        cpu0 = time.thread_time()
        while self.oracle_queue and self.next_get <= now:
            h = next((h for h in self.oracle_http if h.user is None), None)
            if h is None:
                break
            user = self.oracle_queue.popleft()
            h.user = user
            headers = f"Host: {self.host}\r\n"
            if self.plan.key:
                headers += f"X-Recstream-Key: {self.plan.key}\r\n"
            path = f"/v1/users/{urllib.parse.quote(str(user))}/recommendations?k={self.plan.k}"
            h.pending = f"GET {path} HTTP/1.1\r\n{headers}\r\n".encode()
            self.http_write(h)
            # A pause (all connections busy) earns no burst beyond one GET per connection.
            step = 1.0 / self.plan.oracle_rate
            self.next_get = max(self.next_get + step, now - ORACLE_CONNECTIONS * step)
        oracle.cpu_s += time.thread_time() - cpu0
        if not self.oracle_queue:
            return self.next_sweep
        if any(h.user is None for h in self.oracle_http):
            return self.next_get
        return math.inf  # an answer frees a connection, and wakes the loop

    def http_write(self, h: _Http) -> None:
        try:
            n = h.sock.send(h.pending)
        except BlockingIOError:
            n = 0
        except OSError:
            self.http_failed(h)
            return
        h.pending = h.pending[n:]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if h.pending else 0)
        self.sel.modify(h.sock, want, h)

    def http_failed(self, h: _Http) -> None:
        """The connection broke or closed. Only a request in flight is an error: the server
        closes idle keep-alive connections of its own accord."""
        if self.oracle is not None and h.user is not None:
            self.oracle.errors += 1
        h.user, h.buffer, h.pending = None, b"", b""
        if self.oracle is not None:
            self.http_reconnect(h)
        else:
            self.sel.unregister(h.sock)
            h.sock.close()
            self.oracle_http.remove(h)

    def on_http_readable(self, h: _Http) -> None:
        cpu0 = time.thread_time()
        try:
            data = h.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.http_failed(h)
            return
        h.buffer += data
        end = h.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = h.buffer[:end].decode("latin-1").split("\r\n")
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get("content-length", "-1"))
        if length < 0:
            self.http_failed(h)  # only Content-Length bodies are expected
            return
        if len(h.buffer) < end + 4 + length:
            return
        body = h.buffer[end + 4 : end + 4 + length]
        h.buffer = h.buffer[end + 4 + length :]
        user, h.user = h.user, None
        now = time.perf_counter()
        oracle = self.oracle
        if oracle is not None and user is not None:
            oracle.gets += 1
            status = head[0].split(" ", 2)
            if len(status) < 2 or status[1] != "200":
                oracle.errors += 1
            else:
                try:
                    doc = json.loads(body)
                    exact = [x["item"] for x in doc["items"]]
                    version = int(doc["version"])
                except (ValueError, KeyError, TypeError):
                    oracle.errors += 1
                else:
                    last = self.last.get(user)
                    pushed = (items_of(last[0]), last[1]) if last is not None else None
                    oracle.observe(user, exact, version, pushed, now)
            oracle.cpu_s += time.thread_time() - cpu0
        if fields.get("connection", "").lower() == "close":
            self.http_failed(h)  # nothing in flight any more: not an error

    # --- the pipe --------------------------------------------------------------------------

    def send_lists(self) -> None:
        lists, self.changed = self.changed, {}
        self.clock_offset = time.time() - time.perf_counter()
        self.lists_conn.send(("lists", lists, self.pushes, len(self.ids)))

    def on_command(self) -> None:
        command = self.conn.recv()
        if command[0] == "start":
            self.pushes = self.with_cause = self.other_causes = 0
            self.ids, self.times = array("q"), array("d")
            self.read_delays, self.reads = array("d"), 0
            self.window_start = time.perf_counter()
            if command[1]:
                self.oracle_start()
        elif command[0] == "stop":
            now = time.perf_counter()
            oracle, self.oracle = self.oracle, None
            self.oracle_queue.clear()
            self.conn.send(
                (
                    "report",
                    {
                        "pushes": self.pushes,
                        "pushes_with_cause": self.with_cause,
                        "other_causes": self.other_causes,
                        "ids": self.ids.tobytes(),
                        "times": self.times.tobytes(),
                        "read_delays": self.read_delays.tobytes(),
                        "open": len(self.sockets),
                        "seconds": now - self.window_start,
                        "oracle": oracle.summary(oracle.close(now)) if oracle else None,
                    },
                )
            )
        elif command[0] == "close":
            for s in list(self.sockets):
                s.ws.close(1000)
                self.write(s)
            for h in self.oracle_http:
                self.sel.unregister(h.sock)
                h.sock.close()
            self.oracle_http.clear()
            self.closing_deadline = time.perf_counter() + self.plan.close_timeout
        else:
            raise ValueError(f"unknown command {command!r}")

    def run(self) -> None:
        self.connect_started = time.perf_counter()
        self.connect_more()
        deadline = time.perf_counter() + self.plan.connect_timeout
        next_lists = time.perf_counter() + self.plan.list_interval
        next_read = 0.0
        while self.running:
            now = time.perf_counter()
            if not self.announced and now > deadline:
                self.failed += len(self.queue)  # never tried
                self.queue.clear()  # first: a drop would start the next connection
                for s in [s for s in self.sockets if not s.got_first]:
                    self.drop(s, "no first list within the connect timeout")
                self.maybe_announce()
            if self.closing_deadline is not None and (
                not self.sockets or now > self.closing_deadline
            ):
                unanswered = len(self.sockets)
                for s in list(self.sockets):
                    self.drop(s, None)
                self.conn.send(
                    (
                        "closed",
                        {
                            "closed_by_server": dict(self.closed_by_server),
                            "unanswered_closes": unanswered,
                            "errors": dict(self.errors),
                        },
                    )
                )
                return
            if now >= next_lists:
                self.send_lists()
                next_lists = now + self.plan.list_interval
            wake = next_lists
            if self.oracle is not None:
                wake = min(wake, self.oracle_tick(now))
            if self.plan.poll_interval > 0 and now < next_read and wake > now:
                time.sleep(min(next_read, wake) - now)
                continue
            next_read = now + self.plan.poll_interval
            for key, events in self.sel.select(max(0.0, wake - time.perf_counter())):
                obj = key.data
                if obj is None:
                    self.on_command()
                elif isinstance(obj, _Socket):
                    if obj not in self.sockets:
                        continue  # dropped earlier in this round
                    if events & selectors.EVENT_WRITE:
                        self.write(obj)
                        if obj not in self.sockets:
                            continue
                    if events & selectors.EVENT_READ:
                        self.on_ws_readable(obj)
                elif obj in self.oracle_http:
                    if events & selectors.EVENT_WRITE:
                        self.http_write(obj)
                    if events & selectors.EVENT_READ and obj in self.oracle_http:
                        self.on_http_readable(obj)


def run_subscribers(conn: Any, plan: SubscriberPlan, lists_conn: Any = None) -> None:
    """The subscriber process's entry point (see the module docstring): commands and
    answers over ``conn``, the lists over ``lists_conn`` (default ``conn``)."""
    limit = raise_fd_limit()
    if len(plan.users) + ORACLE_CONNECTIONS + 16 > limit:
        conn.send(
            (
                "subscribed",
                0,
                len(plan.users),
                {f"{len(plan.users)} sockets exceed the open-file limit {limit}": 1},
                0.0,
            )
        )
        return
    _Loop(conn, conn if lists_conn is None else lists_conn, plan).run()
