"""The publisher actor: recomputes subscribed users' lists and hands changes to their slots.

Two things make a subscribed user's list change: that user's own events (the model actor
reports them through :meth:`Publisher.notify`; recomputed at once, coalesced with whatever else
is pending) and drift from other users' events moving item vectors. A list caused by the
user's own events is pushed when its items or their order changed. When a group of events
touches few subscribed users (up to ``AFTER_APPLY_USERS``), their lists are computed where
the model actor applied it (its worker thread; the event loop for a group of a few events)
right after the apply (:meth:`Publisher.lists_after_apply`) and pushed as the group's
results are reported, without a worker-thread round trip of their own or a wait for a flush
task; a larger group's users go to the flush tasks, whose lists are computed while the model
applies the next group.

Drift: a subscribed list that is ``refresh_interval`` old (own events recompute it sooner) is
recomputed once the model has applied anything since, oldest first, at most ``refresh_budget``
lists per quarter interval, so a list lags the model by about ``refresh_interval`` at most
while the budget lasts (it bounds the cost: ``4 * refresh_budget / refresh_interval`` lists per
second at most). A drift recompute is pushed only when the list's membership changed or an
item moved more than ``drift_rank_slack`` places from where the last push showed it: item
vectors move a little on every event, and a reshuffle of near-equal scores is not news. So a
subscriber receives at most one drift push per ``refresh_interval``, and each one changes what
it would show.

Each subscription owns one :class:`Slot`, a latest-wins mailbox: the publisher never waits for
a subscriber, and a slow subscriber receives the newest list rather than a backlog.

``version`` is the journal sequence the model had applied when a list was computed (the list
reflects every event up to it), as in ``GET /v1/users/{user}/recommendations``. A subscriber
never receives a smaller version after a larger one: a list computed from an older state than
the last one handed to the subscription is dropped. Two lists may carry the same version (the
index caught up between them). A list computed before an erasure of its user was reported is
never handed over after it: it is dropped and the user recomputed.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from json.encoder import encode_basestring_ascii as _json_string  # json.dumps(str), in C
from typing import Any, Generic, TypeVar

import attrs
import trio

from ._exceptions import TooManySubscribers
from ._messages import Applied
from ._model import Model
from ._worker import in_worker

__all__ = ["AfterApply", "Publisher", "Slot", "Subscription", "Cause", "Push", "rec_json"]

log = logging.getLogger("recstream.publisher")

# Drift refreshes computed per worker-thread call; events that arrive meanwhile go next. At
# 1,000 events/s with 1,000 subscribers (`bench latency --rate 1000`), chunks of 16 spent so
# much on worker-thread round trips that the refresh fell behind (drift p99 233-298 ms); 32
# gave 206-211 ms, for about 1.5 ms more on an own event's push p50 (a chunk's ~1 ms).
REFRESH_CHUNK = 32
# Lists computed on the event loop when ``idle`` allows (a worker thread's round trip costs
# more than one list).
INLINE_JOBS = 2
# Tasks flushing at once (see ``Publisher.flush``), and the own-event users one takes per call:
# all of them up to OWN_CHUNK_MIN, else a share of the pending ones, at most OWN_CHUNK_MAX.
WORKERS = 2
OWN_CHUNK_MIN = 16
OWN_CHUNK_MAX = 128

# Most subscribed users whose lists are computed right after their group applied, in the
# model actor's worker thread (see ``Publisher.lists_after_apply``); a group touching more goes
# to the flush tasks, whose lists are computed while the model applies the next group.
AFTER_APPLY_USERS = 32

Id = str | int
T = TypeVar("T")
# A computed list: the top-k items (what decides whether the list changed), the items the
# message shows (the top-k less recent pushes under ``repush_after``) and those entries
# encoded as a JSON array.
Listing = tuple[list[Id], list[Id], str]


@attrs.frozen
class Cause:
    """The newest event reflected in a list: journal sequence, producer's event id, and the
    time the engine accepted it (for latency tracing)."""

    seq: int
    event_id: Id | None
    accepted_at: float

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.event_id, "accepted_at": self.accepted_at}

    def json_text(self) -> str:
        """``as_json()`` encoded, the way ``json.dumps`` would."""
        event_id = self.event_id
        if event_id is None:
            event_id = "null"
        elif type(event_id) is int:  # noqa: E721 (not bool, whose JSON is true/false)
            event_id = str(event_id)
        elif type(event_id) is str:  # noqa: E721
            event_id = _json_string(event_id)
        else:
            event_id = json.dumps(event_id)
        return f'{{"seq":{self.seq},"id":{event_id},"accepted_at":{self.accepted_at!r}}}'


@attrs.frozen
class Push:
    """One message for a subscriber, serialised once: ``text`` goes to the socket as it is.

    ``items`` (the items the message lists, in order), ``version`` and ``cause`` repeat what
    ``text`` says, for the metrics and impressions, so nothing decodes it again.
    """

    text: str
    items: list[Id]
    version: int
    cause: Cause | None

    def json(self) -> dict[str, Any]:
        """The message decoded, as a client receives it."""
        out: dict[str, Any] = json.loads(self.text)
        return out


@attrs.frozen
class AfterApply:
    """Lists computed right after a group applied (:meth:`Publisher.lists_after_apply`):
    per user its newest event in the group, the subscriptions and their lists, the group's
    newest sequence, and the erasure count and time when the computation started."""

    pending: dict[Id, Cause | None]
    jobs: list[tuple[Subscription, list[Id]]]
    listings: list[Listing]
    seq: int
    erasures: int
    at: float


class Slot(Generic[T]):
    """A mailbox holding at most one message; ``put`` replaces what is unread.

    Sending never blocks and memory per subscriber is one message, whatever the reader does.
    """

    def __init__(self) -> None:
        self._value: T | None = None
        self._ready = trio.Event()
        self.closed = False
        self.replaced = 0  # messages overwritten before they were read (coalesced pushes)

    def put(self, value: T) -> bool:
        """Stores ``value``; True if it replaced an unread message (a coalesced push)."""
        if self.closed:
            return False
        replaced = self._value is not None
        if replaced:
            self.replaced += 1
        self._value = value
        self._ready.set()
        return replaced

    @property
    def empty(self) -> bool:
        """Whether no message waits to be read."""
        return self._value is None

    def discard(self) -> bool:
        """Drops the unread message, if any (erasure); True if there was one."""
        had = self._value is not None
        self._value = None
        if had and not self.closed:
            self._ready = trio.Event()
        return had

    def close(self) -> None:
        """Wakes the reader with None: no more messages will come."""
        self.closed = True
        self._ready.set()

    async def get(self) -> T | None:
        """Waits for a message and takes it; None once the slot is closed."""
        await self._ready.wait()
        value = self._value
        self._value = None
        if not self.closed:
            self._ready = trio.Event()
        return value if not self.closed else None


def rec_json(rec: dict[str, Any]) -> dict[str, Any]:
    """One entry of a list as sent to clients: ``"explore": true`` only on exploration slots."""
    out = {"item": rec["item"], "score": rec["score"]}
    if "because" in rec:
        out["because"] = rec["because"]
        out["reason"] = rec["reason"]
    if rec["explore"]:
        out["explore"] = True
    return out


@attrs.define(eq=False)
class Subscription:
    """One websocket's interest in one user's list.

    ``repush_after`` (seconds): an item pushed to this subscription is left out of its pushes
    for that long (a feed of new items rather than a re-sent list). The list still counts as
    changed only when the user's top-k itself changes; the message then carries the top-k
    items not pushed within the window. ``pushed_at`` remembers, oldest first, when each
    item was last pushed, and forgets items as their window expires, so it holds at most the
    items pushed within ``repush_after``.
    """

    user: Id
    k: int
    category: str | None = None
    exclude: tuple[Id, ...] = ()
    explain: bool = False
    exclude_category: tuple[str, ...] = ()
    diversity: float | None = None
    exploration: float | None = None
    repush_after: float | None = None
    slot: Slot[Push] = attrs.field(factory=Slot)
    last_items: list[Id] | None = None
    # Whether the newest push was a drift refresh (see ``Publisher._compute``).
    drift_pushed: bool = False
    # Journal sequence of the newest list recorded for this subscription (see the module).
    version: int = 0
    # The id messages name: the one the subscriber asked for (the raw id when the engine
    # stores pseudonyms); None: ``user``.
    shown: Id | None = None
    pushed_at: dict[Id, float] = attrs.field(factory=dict)
    # Delivers a message's text at once if it can (True), without waiting: the connector's
    # direct write. A message it declines, or one that finds an unread message in the slot,
    # goes to the slot instead, so messages never overtake one another.
    deliver: Callable[[str], bool] | None = None
    # The user's A/B variant (named in every message) and its extra recommend() arguments.
    variant: str | None = None
    params: dict[str, Any] = attrs.field(factory=dict)
    # Worked out on first use from the fields above, which do not change once subscribed:
    # the query, the key of the batch it joins, and the start of every message.
    _query: dict[str, Any] | None = attrs.field(default=None, init=False, repr=False)
    _key: Hashable = attrs.field(default=None, init=False, repr=False)
    _head: str | None = attrs.field(default=None, init=False, repr=False)

    def query(self) -> dict[str, Any]:
        """recommend() arguments: the subscription's own, else its variant's."""
        if self._query is None:
            own = {
                "k": self.k,
                "category": self.category,
                "exclude": list(self.exclude) or None,
                "explain": self.explain,
                "exclude_category": list(self.exclude_category) or None,
                "diversity": self.diversity,
                "exploration": self.exploration,
            }
            query = {**self.params, **{k: v for k, v in own.items() if v is not None}}
            query.pop("detail", None)  # the publisher picks the form of the lists it needs
            self._query = query
        return self._query

    def batch_key(self, recent: int) -> Hashable:
        """Subscriptions with equal keys (given ``recent`` items to leave out) are computed by
        one call with one query: the key stands for every argument but the user."""
        if self._key is None:
            try:
                key: Hashable = tuple(
                    (k, tuple(v) if isinstance(v, list) else v)
                    for k, v in sorted(self.query().items())
                )
                hash(key)
            except TypeError:  # an unhashable variant parameter: a batch of its own
                key = ("subscription", id(self))
            self._key = (key, self.repush_after is not None)
        return (self._key, recent)

    def message(self, entries: str, version: int, cause: Cause | None) -> str:
        """The JSON text of a message listing ``entries`` (a JSON array)."""
        if self._head is None:
            head = '{"user":' + json.dumps(self.shown if self.shown is not None else self.user)
            if self.variant is not None:
                head += ',"variant":' + json.dumps(self.variant)
            self._head = head
        cause_text = cause.json_text() if cause is not None else "null"
        return f'{self._head},"items":{entries},"version":{version},"cause":{cause_text}}}'

    def recently_pushed(self, now: float) -> list[Id]:
        """Items pushed within ``repush_after`` of ``now``; forgets older ones."""
        if self.repush_after is None:
            return []
        horizon = now - self.repush_after
        while self.pushed_at:
            item, at = next(iter(self.pushed_at.items()))
            if at > horizon:
                break
            del self.pushed_at[item]
        return list(self.pushed_at)


class Publisher:
    """Owns the subscription registry and the recompute loop.

    Args:
        model: The model to query (read-only here).
        max_subscribers: Subscriptions accepted at once; more raise TooManySubscribers.
        refresh_interval: Age at which a subscribed list is recomputed for drift (see the
            module).
        refresh_budget: Lists recomputed for drift per quarter ``refresh_interval`` at most.
        drift_rank_slack: A drift recompute is pushed when the list's membership changed or
            an item moved more than this many places.
        on_pushes: Called with the lists handed over together, as (subscription, message,
            whether ``deliver`` took it at once) in the order they went (metrics hook).
        applied_seq: The journal sequence the model reflects at start (after recovery).
        idle: Whether no writer works on the model in a worker thread now: then a list or
            two are computed on the event loop (no lock wait can block it), else in a worker
            thread. None: always in a worker thread.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_subscribers: int = 10_000,
        refresh_interval: float = 0.15,
        refresh_budget: int = 250,
        drift_rank_slack: int = 2,
        on_pushes: Callable[[list[tuple[Subscription, Push, bool]]], None] | None = None,
        applied_seq: int = 0,
        idle: Callable[[], bool] | None = None,
    ) -> None:
        self._model = model
        self._idle = idle
        self._max = max_subscribers
        self._refresh_interval = refresh_interval
        self._refresh_budget = refresh_budget
        self._rank_slack = drift_rank_slack
        # Per subscribed user, oldest first: when its list was last computed and the model's
        # sequence then (a list computed since the last apply cannot have drifted).
        self._computed: dict[Id, tuple[float, int]] = {}
        self._on_pushes = on_pushes
        self._subs: dict[Id, set[Subscription]] = {}
        self._count = 0
        # Users waiting for a recompute, with the newest cause; bounded by the subscribed
        # users, since notify() keeps only those.
        self._pending: dict[Id, Cause | None] = {}
        # Users due a drift refresh, oldest first, with the time each was found due; bounded
        # like _pending.
        self._stale: dict[Id, float] = {}
        self._seq = applied_seq  # newest journal sequence applied, from notify()
        # Erasures reported so far, and per subscribed user the count at its latest one: a
        # list computed while the count stood lower predates the erasure.
        self._erasures = 0
        self._erased_at: dict[Id, int] = {}
        self._erase_seq: dict[Id, int] = {}  # per subscribed user, its latest erase record
        # Per subscribed user, the newest sequence a list computed right after its apply
        # reflects (see ``push_after_apply``): notify() has nothing to do for records up to it.
        self._reflected: dict[Id, int] = {}
        self._wake = trio.Event()
        # Whether the newest turn of flush() went to a chunk of drift refreshes: the next
        # goes to own events if any are pending.
        self._refreshed_last = False
        self.pushes = 0
        self.coalesced = 0  # pushes that replaced an unread one
        self.delivered = 0  # pushes the subscription's ``deliver`` took at once
        self.dropped = 0  # pushes discarded unread (erasure)

    @property
    def subscribers(self) -> int:
        return self._count

    def subscribe(self, sub: Subscription) -> None:
        """Registers ``sub``; its first list is sent by the caller (see :meth:`current`).

        Raises:
            TooManySubscribers: ``max_subscribers`` are already connected.
        """
        if self._count >= self._max:
            raise TooManySubscribers(f"{self._max} subscribers already connected")
        self._subs.setdefault(sub.user, set()).add(sub)
        self._count += 1
        self._computed.setdefault(sub.user, (time.monotonic(), self._seq))

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.user)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self._count -= 1
            if not subs:
                del self._subs[sub.user]
                self._pending.pop(sub.user, None)
                self._stale.pop(sub.user, None)
                self._erased_at.pop(sub.user, None)
                self._erase_seq.pop(sub.user, None)
                self._computed.pop(sub.user, None)
                self._reflected.pop(sub.user, None)

    def notify(self, users: Iterable[tuple[Id, Id | None]], seq: int, accepted_at: float) -> None:
        """Marks users whose own events were applied (called by the model actor; never blocks)."""
        self._seq = max(self._seq, seq)
        woke = False
        for user, event_id in users:
            if user in self._subs:
                if self._reflected.get(user, 0) >= seq:
                    continue  # pushed right after the apply (see push_after_apply)
                self._pending[user] = Cause(seq, event_id, accepted_at)
                self._stale.pop(user, None)
                woke = True
        if woke:
            self._wake.set()

    def erase(self, user: Id, seq: int | None = None) -> int:
        """Forgets pending work and unread lists of ``user`` (erasure); returns the number of
        unread lists dropped. The subscriptions stay: their next list is computed from what
        the model holds now.

        Args:
            seq: The erase record's sequence. A second report of the same erasure (or of an
                older one) changes nothing: the lists computed since are free of the user.
        """
        if seq is not None:
            if self._erase_seq.get(user, 0) >= seq:
                return 0
            if user in self._subs:
                self._erase_seq[user] = seq
        self._pending.pop(user, None)
        self._stale.pop(user, None)
        self._erasures += 1
        dropped = 0
        if user in self._subs:
            self._erased_at[user] = self._erasures
            # The next list (computed from the model without the user) goes out.
            self._pending[user] = None
            self._wake.set()
        for sub in self._subs.get(user, ()):
            dropped += sub.slot.discard()
            sub.last_items = None
        self.dropped += dropped
        return dropped

    def _erased_since(self, user: Id, erasures: int) -> bool:
        """Whether ``user`` was erased after the erasure count stood at ``erasures``."""
        return self._erased_at.get(user, 0) > erasures

    def close_all(self) -> None:
        """Closes every slot (server shutdown): sessions close their sockets with 1001."""
        for subs in self._subs.values():
            for sub in subs:
                sub.slot.close()

    async def current(self, sub: Subscription) -> Push:
        """The list as it is now, recorded as the last one pushed to ``sub`` (unless a newer
        one was recorded meanwhile: then it is only returned, to be sent before that one)."""
        while True:
            recent = sub.recently_pushed(time.monotonic())
            seq, erasures = self._seq, self._erasures
            [listing] = await self._compute_listings([(sub, recent)])
            if not self._erased_since(sub.user, erasures):
                break
        if seq < sub.version:
            _, shown, entries = listing
            return Push(sub.message(entries, seq, None), shown, seq, None)
        return self._record(sub, listing, None, seq)

    async def _compute_listings(self, jobs: list[tuple[Subscription, list[Id]]]) -> list[Listing]:
        if len(jobs) <= INLINE_JOBS and self._idle is not None and self._idle():
            return self._listings(jobs)
        return await in_worker(self._listings, jobs)

    def _listings(self, jobs: list[tuple[Subscription, list[Id]]]) -> list[Listing]:
        """Computes the lists of ``jobs`` (subscription, items to leave out) in a worker thread:
        one call into the model per group of subscriptions with the same query."""
        groups: dict[Hashable, list[int]] = {}
        for n, (sub, recent) in enumerate(jobs):
            groups.setdefault(sub.batch_key(len(recent)), []).append(n)
        out: list[Listing | None] = [None] * len(jobs)
        for members in groups.values():
            sub, recent = jobs[members[0]]
            users = [jobs[n][0].user for n in members]
            if sub.repush_after is None:
                lists = self._model.recommend_batch_json(users, **sub.query())
                for n, (items, entries) in zip(members, lists, strict=True):
                    out[n] = (items, items, entries)
                continue
            # Enough candidates to fill k after leaving out the recent pushes.
            query = {**sub.query(), "k": min(sub.k + len(recent), 10_000), "detail": True}
            for n, recs in zip(members, self._model.recommend_batch(users, **query), strict=True):
                skip = set(jobs[n][1])
                shown = [r for r in recs if r["item"] not in skip][: sub.k]
                out[n] = (
                    [r["item"] for r in recs[: sub.k]],
                    [r["item"] for r in shown],
                    json.dumps([rec_json(r) for r in shown], separators=(",", ":")),
                )
        return out  # type: ignore[return-value]  # every index belongs to one group

    def _record(
        self, sub: Subscription, listing: Listing, cause: Cause | None, version: int
    ) -> Push:
        top, shown, entries = listing
        sub.last_items = top
        sub.version = version
        if sub.repush_after is not None:
            now = time.monotonic()
            for item in shown:
                sub.pushed_at.pop(item, None)  # re-insert: the dict stays oldest first
                sub.pushed_at[item] = now
        return Push(sub.message(entries, version, cause), shown, version, cause)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh_loop)
            for _ in range(WORKERS - 1):
                nursery.start_soon(self._work)
            task_status.started()
            await self._work()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            # Only the first worker to wake replaces the event: another may already wait on
            # the new one, and replacing that would leave it waiting on an event nobody sets.
            if self._wake.is_set():
                self._wake = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Recomputes pending users and pushes the lists that changed, until none is left.

        Users whose own events arrived go first; drift refreshes go in chunks of
        ``REFRESH_CHUNK``, and fresh events jump ahead of the remaining chunks, so a refresh
        of every subscriber delays a push caused by an event by one chunk at most: a chunk
        of refreshes goes ahead only once the oldest has waited a quarter
        ``refresh_interval`` (see :meth:`_refresh_overdue`), and own events take the next
        turn after it. The refreshes then get at most every other turn however far behind
        they fall (as on a machine too slow to refresh every list each interval), so they
        never hold back the pushes of events. ``run`` flushes with ``WORKERS`` tasks at
        once: while one task's chunk is computed in a worker thread, another's is computed
        beside it or pushed.
        """
        while self._pending or self._stale:
            if self._pending and (self._refreshed_last or not self._refresh_overdue()):
                self._refreshed_last = False
                n = len(self._pending)
                take = n if n <= OWN_CHUNK_MIN else min(-(-n // WORKERS), OWN_CHUNK_MAX)
                if take == n:
                    batch, self._pending = self._pending, {}
                else:
                    users = list(itertools.islice(self._pending, take))
                    batch = {user: self._pending.pop(user) for user in users}
                await self._compute(batch, drift=False)
            else:
                self._refreshed_last = True
                users = list(itertools.islice(self._stale, REFRESH_CHUNK))
                for user in users:
                    del self._stale[user]
                await self._compute(dict.fromkeys(users), drift=True)

    def _refresh_overdue(self) -> bool:
        """Whether the oldest drift refresh has waited a quarter ``refresh_interval`` behind
        own events: then a chunk of refreshes goes first. Under a steady stream of events
        there are always own-event users pending, and the refreshes would otherwise wait
        until a subscriber's own next event, however long that takes."""
        for due in self._stale.values():
            return due < time.monotonic() - self._refresh_interval / 4
        return False

    async def _compute(self, pending: dict[Id, Cause | None], *, drift: bool) -> None:
        now = time.monotonic()
        jobs = [
            (sub, sub.recently_pushed(now)) for user in pending for sub in self._subs.get(user, ())
        ]
        if not jobs:
            return
        seq, erasures = self._seq, self._erasures
        listings = await self._compute_listings(jobs)
        self._deliver(pending, jobs, listings, seq, erasures, now, drift=drift)

    def lists_after_apply(self, applied: Sequence[Applied]) -> AfterApply | None:
        """Computes the lists of the subscribed users a group touched, right after the model
        applied it, where it applied it (see ``ModelActor``'s ``alongside``): the own-event
        pushes need no worker-thread round trip of their own and no wait for a flush task.
        Hand the result to :meth:`push_after_apply` in the event loop.

        It may run beside the event loop, so it only reads what the loop changes in single
        steps (the registry's dicts and sets, copied at once). Users with a subscription
        that leaves recent pushes out (``repush_after``: its bookkeeping belongs to the
        loop) are left to :meth:`notify`, as are users subscribed while it runs.
        """
        if not applied:
            return None
        erasures, now = self._erasures, time.monotonic()
        registry = self._subs
        causes: dict[Id, Cause] = {}
        for record in applied:
            for user, event_id in record.users:
                if user in registry:
                    causes[user] = Cause(record.seq, event_id, record.accepted_at)
        if len(causes) > AFTER_APPLY_USERS:
            return None  # a busy stream: the flush tasks compute them beside the next apply
        jobs: list[tuple[Subscription, list[Id]]] = []
        done: dict[Id, Cause | None] = {}
        for user, cause in causes.items():
            subs = tuple(registry.get(user, ()))
            if subs and all(sub.repush_after is None for sub in subs):
                done[user] = cause
                jobs.extend((sub, []) for sub in subs)
        if not jobs:
            return None
        listings = self._listings(jobs)
        return AfterApply(done, jobs, listings, applied[-1].seq, erasures, now)

    def push_after_apply(self, lists: AfterApply) -> None:
        """Pushes what :meth:`lists_after_apply` computed (in the event loop, after the
        group's results were reported). :meth:`notify` skips these users for the records
        the lists reflect."""
        computed: dict[Id, set[Subscription]] = {}
        for sub, _ in lists.jobs:
            computed.setdefault(sub.user, set()).add(sub)
        for user, subs in computed.items():
            # A subscription that came meanwhile has a list from before the group, and an
            # erasure reported meanwhile queued a new computation: notify() and that
            # computation take the user as usual.
            if self._subs.get(user) == subs and not self._erased_since(user, lists.erasures):
                self._reflected[user] = lists.seq
                self._pending.pop(user, None)
                self._stale.pop(user, None)
        self._deliver(
            lists.pending,
            lists.jobs,
            lists.listings,
            lists.seq,
            lists.erasures,
            lists.at,
            drift=False,
        )

    def _deliver(
        self,
        pending: dict[Id, Cause | None],
        jobs: list[tuple[Subscription, list[Id]]],
        listings: list[Listing],
        seq: int,
        erasures: int,
        now: float,
        *,
        drift: bool,
    ) -> None:
        """Hands the computed lists that changed to their subscriptions: ``seq`` and
        ``erasures`` are the model's sequence and the erasure count when they were computed."""
        computed = self._computed
        handed: list[tuple[Subscription, Push, bool]] = []
        for user in pending:
            if user in computed:
                del computed[user]  # re-inserted: the dict stays oldest first
                computed[user] = (now, seq)
        for (sub, _), listing in zip(jobs, listings, strict=True):
            if sub not in self._subs.get(sub.user, ()):
                continue  # unsubscribed while we computed
            if self._erased_since(sub.user, erasures):
                continue  # computed before the erasure: erase() queued a new computation
            if seq < sub.version:
                continue  # a list from a newer state was handed over meanwhile
            # An own event's list equal to the one last pushed is not pushed again, unless a
            # drift refresh pushed that one: the model may have applied the event before the
            # publisher heard of it, so the drift push may have carried the event without
            # naming it, and the push that names it must still go out.
            cause = pending[sub.user]
            if listing[0] == sub.last_items and (drift or cause is None or not sub.drift_pushed):
                continue
            if drift and not self._drifted(sub.last_items, listing[0]):
                continue
            push = self._record(sub, listing, cause, seq)
            sub.drift_pushed = drift
            delivered = sub.slot.empty and sub.deliver is not None and sub.deliver(push.text)
            if delivered:
                self.delivered += 1
            else:
                self.coalesced += sub.slot.put(push)
            handed.append((sub, push, delivered))
        self.pushes += len(handed)
        if handed and self._on_pushes is not None:
            self._on_pushes(handed)

    def _drifted(self, shown: list[Id] | None, now: list[Id]) -> bool:
        """Whether a drift recompute ``now`` differs enough from the list last pushed
        (``shown``) to be pushed: other members, or an item more than the slack away."""
        if shown is None or len(shown) != len(now):
            return True
        was = {item: rank for rank, item in enumerate(shown)}
        for rank, item in enumerate(now):
            before = was.get(item)
            if before is None or abs(before - rank) > self._rank_slack:
                return True
        return False

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self._refresh_interval / 4)
            now = time.monotonic()
            users = self._due_for_refresh(now - self._refresh_interval)
            for user in users:
                self._stale.setdefault(user, now)
            if users:
                self._wake.set()

    def _due_for_refresh(self, horizon: float) -> list[Id]:
        """Up to ``refresh_budget`` subscribed users, oldest first, whose list was computed
        before ``horizon`` and before the model's newest apply, and is not queued already."""
        out: list[Id] = []
        for user, (at, seq) in self._computed.items():
            if at >= horizon or len(out) >= self._refresh_budget:
                break
            if seq < self._seq and user not in self._pending and user not in self._stale:
                out.append(user)
        return out
