"""The latency benchmark's load generator (bench._loadgen): the cheap reading of pushed
messages against json.loads, the staleness oracle's rules, and a subscriber process driving
real websockets and GETs against a real server."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from bench._loadgen import (
    Oracle,
    SubscriberPlan,
    drifted,
    items_of,
    parse_push,
    run_subscribers,
)

from .conftest import running_server

WAIT = 10.0

ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(['a"b', "back\\slash", ',"version":7,"cause":null}', "é", "😀", "\u2028"]),
)


def message(
    user: Any,
    items: list[tuple[Any, float | None, bool]],
    version: int,
    cause: tuple[int, Any, float] | None,
    variant: str | None = None,
    ascii_only: bool = True,
) -> bytes:
    """A message laid out the way the server writes one (engine._publisher and the Rust
    entries), ids written by json.dumps with or without ASCII escapes."""

    def dump(x: Any) -> str:
        return json.dumps(x, ensure_ascii=ascii_only)

    entries = ",".join(
        f'{{"item":{dump(i)},"score":{dump(s)}' + (',"explore":true' if e else "") + "}"
        for i, s, e in items
    )
    head = '{"user":' + dump(user) + (f',"variant":{dump(variant)}' if variant else "")
    cause_text = (
        "null"
        if cause is None
        else f'{{"seq":{cause[0]},"id":{dump(cause[1])},"accepted_at":{cause[2]!r}}}'
    )
    return f'{head},"items":[{entries}],"version":{version},"cause":{cause_text}}}'.encode()


def by_json(text: bytes) -> tuple[int, Any, list[Any]]:
    doc = json.loads(text)
    return doc["version"], (doc["cause"] or {}).get("id"), [x["item"] for x in doc["items"]]


@given(
    user=ids,
    items=st.lists(
        st.tuples(
            ids,
            st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
            st.booleans(),
        ),
        max_size=12,
    ),
    version=st.integers(min_value=0, max_value=2**62),
    cause=st.one_of(
        st.none(),
        st.tuples(
            st.integers(min_value=0, max_value=2**62),
            st.one_of(st.none(), ids),
            st.floats(min_value=0, max_value=2e9),
        ),
    ),
    variant=st.one_of(st.none(), st.text(max_size=5)),
    ascii_only=st.booleans(),
)
@example(user=1, items=[(5, 0.25, False)], version=3, cause=None, variant=None, ascii_only=True)
@example(
    user='u","items":[]',
    items=[('x\\"y', 1e-7, True), (-(2**63), None, False), ("ü", 1.0, False)],
    version=9,
    cause=(8, ',"version":1,"cause":null}', 1764556000.123456),
    variant="a",
    ascii_only=False,
)
def test_cheap_reading_agrees_with_json(
    user: Any,
    items: list[tuple[Any, float | None, bool]],
    version: int,
    cause: tuple[int, Any, float] | None,
    variant: str | None,
    ascii_only: bool,
) -> None:
    text = message(user, items, version, cause, variant, ascii_only)
    got_version, got_cause, raw = parse_push(text)
    assert (got_version, got_cause, items_of(raw)) == by_json(text)


def test_cheap_reading_takes_the_fast_path_on_plain_ids() -> None:
    """Plain ints and unescaped strings are read without json.loads (the raw array comes
    back); escapes fall back to json.loads for the items only when needed."""
    text = message(7, [(1, 0.5, False), ("é x", 0.25, True)], 12, (11, 42, 1.5), None, False)
    version, cause, raw = parse_push(text)
    assert isinstance(raw, bytes) and (version, cause) == (12, 42)
    assert items_of(raw) == [1, "é x"]
    escaped = message(7, [('q"', 0.5, False)], 12, (11, "i\\d", 1.5))
    assert parse_push(escaped)[1] == "i\\d"  # the tail did not match: json.loads read it
    assert items_of(parse_push(message(7, [('q"', 0.5, False)], 1, None))[2]) == ['q"']


def test_not_a_push_is_refused() -> None:
    for bad in (b"", b"[1]", b'{"error":"x"}', b'{"user":1,"items":[{"item":1'):
        with pytest.raises(ValueError):
            parse_push(bad)


def test_drifted_is_membership_or_a_move_beyond_the_slack() -> None:
    old = list(range(10))
    assert not drifted(old, list(old))
    assert not drifted(old, [1, 0, 3, 2, 4, 5, 6, 7, 9, 8])  # neighbours swapped
    assert not drifted(old, [2, 0, 1, 3, 4, 5, 6, 7, 8, 9])  # item 2 up two places
    assert drifted(old, [3, 0, 1, 2, 4, 5, 6, 7, 8, 9])  # item 3 up three places
    assert drifted(old, [*old[:9], 99])  # a new member
    assert drifted(old, old[:9])  # a shorter list


def test_oracle_episodes_and_skips() -> None:
    oracle = Oracle()
    pushed = ([1, 2, 3], 10)
    oracle.observe("u", [1, 2, 3], 10, pushed, now=1.0)  # agrees
    oracle.observe("u", [1, 2, 4], 12, pushed, now=2.0)  # stale from 2.0
    oracle.observe("u", [1, 2, 4], 13, pushed, now=3.0)  # still: the episode keeps its start
    oracle.observe("u", [9, 9, 9], 9, ([1, 2, 3], 14), now=3.5)  # the push is newer: skipped
    oracle.on_push("u", 4.5)  # a push ends it
    oracle.observe("v", [2, 1, 3], 12, pushed, now=5.0)  # differs, within the slack
    oracle.observe("w", [7], 12, None, now=5.0)  # nothing pushed yet: skipped
    oracle.observe("x", [8], 12, ([9], 11), now=6.0)  # stale until the end of the window
    assert oracle.close(now=6.25) == 1
    assert (oracle.compared, oracle.stale, oracle.differs, oracle.skipped) == (5, 3, 4, 2)
    assert oracle.episodes == [2.5, 0.25]


def command(conn: Any, lists: dict[Any, list[Any]], *message: Any, within: float = WAIT) -> Any:
    """Sends a command and returns the next answer that is not a list snapshot (those go
    into ``lists``, read as the producer reads them); fails when none comes within
    ``within`` seconds."""
    if message:
        conn.send(message)
    assert conn.poll(within), "the subscriber process did not answer"
    while True:
        answer = conn.recv()
        if answer[0] != "lists":
            return answer
        lists.update(read_lists(answer[1]))
        assert conn.poll(within)


def read_lists(snapshot: dict[Any, Any]) -> dict[Any, list[Any]]:
    """A list snapshot's raw arrays read as the producer reads the one it picks."""
    return {user: items_of(raw) for user, raw in snapshot.items()}


@asynccontextmanager
async def subscriber_process(plan: SubscriberPlan) -> AsyncIterator[Any]:
    """Runs ``plan`` in a subscriber process; yields this side of its command pipe. On the
    way out, waits for the process to exit (it does once told to close) and checks it ended
    cleanly; kills it if it does not exit."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=run_subscribers, args=(theirs, plan), daemon=True)
    proc.start()
    theirs.close()
    try:
        yield ours
    finally:
        await trio.to_thread.run_sync(proc.join, WAIT)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()
    assert proc.exitcode == 0


async def test_subscriber_process_against_a_real_server(tmp_path: Path) -> None:
    """A subscriber process subscribes to five users, times the pushes our events cause,
    sends their lists to the producer, runs the oracle's GETs and closes every websocket
    with a closing handshake."""
    users = [f"u{u}" for u in range(5)]
    async with running_server(tmp_path / "d") as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT) as http:
            warm = [
                {"user": u, "item": f"i{(n + j) % 11}"}
                for n, u in enumerate(users)
                for j in (0, 1, 2)
            ]
            assert (await http.post("/v1/events", content=json.dumps(warm))).status_code == 202
            host, port = server.http_url.removeprefix("http://").split(":")
            plan = SubscriberPlan(
                host=host, port=int(port), users=tuple(users), k=3, oracle_interval=0.2
            )
            async with subscriber_process(plan) as ours:
                lists: dict[Any, list[Any]] = {}
                answer = await trio.to_thread.run_sync(command, ours, lists)
                assert answer[:4] == ("subscribed", 5, 0, {})
                assert answer[4] > 0  # seconds the subscriptions took
                ours.send(("start", True))
                await trio.sleep(0.3)  # a list snapshot or more
                while ours.poll():
                    kind, snapshot, _, _ = ours.recv()
                    assert kind == "lists"
                    lists.update(read_lists(snapshot))
                firsts = {}
                for u in users:
                    top = (await http.get(f"/v1/users/{u}/recommendations?k=3")).json()
                    firsts[u] = [x["item"] for x in top["items"]]
                    # The first lists reached the producer (the server pushes no reordering
                    # within the rank slack, so the order may have moved since).
                    assert not drifted(lists[u], firsts[u])
                # Each user clicks its top item (so its list changes), with integer ids.
                clicked = time.perf_counter()
                for n, u in enumerate(users):
                    event = {"user": u, "item": firsts[u][0], "id": 1000 + n}
                    r = await http.post("/v1/events", content=json.dumps([event]))
                    assert r.status_code == 202
                await trio.sleep(1.0)
                stopped = time.perf_counter()
                kind, report = await trio.to_thread.run_sync(command, ours, lists, "stop")
                assert kind == "report" and report["open"] == 5
                timed = set(memoryview(report["ids"]).cast("q").tolist())
                assert timed == {1000, 1001, 1002, 1003, 1004}
                # Receipt times are the kernel's arrival stamps on the perf_counter clock:
                # after the clicks were sent, before the report was asked for, and never
                # later than the process read them.
                received = memoryview(report["times"]).cast("d").tolist()
                assert all(clicked < t < stopped for t in received), (clicked, received, stopped)
                delays = memoryview(report["read_delays"]).cast("d").tolist()
                assert delays and all(0 <= d < WAIT for d in delays)
                assert report["pushes"] >= 5 and report["pushes_with_cause"] >= 5
                for u in users:  # the lists the pushes carried reached the producer too
                    now = (await http.get(f"/v1/users/{u}/recommendations?k=3")).json()
                    assert not drifted(lists[u], [x["item"] for x in now["items"]])
                oracle = report["oracle"]
                assert oracle["gets"] >= 5 and oracle["errors"] == 0
                assert oracle["compared"] + oracle["skipped_push_newer"] == oracle["gets"]
                kind, closed = await trio.to_thread.run_sync(command, ours, lists, "close")
                assert kind == "closed"
                assert closed["closed_by_server"] == {1000: 5} and closed["unanswered_closes"] == 0
