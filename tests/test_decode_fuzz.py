"""Property tests of the Forward decoder through ``Model.check_frame`` and ``ingest_forward``.

Whatever the bytes, the decoder answers in one of three ways: None (a frame's beginning, read
more), a report (a complete frame), or ``InvalidFrame`` (close the connection). It never
crashes the process or raises anything else, and ``ingest_forward`` never applies a record
``check_frame`` refused, since the server journals frames on the strength of that check.
Runs are derandomized so a failure reproduces everywhere.
"""

from __future__ import annotations

import gzip
import math
import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import DEFAULT_EVENT_WEIGHTS, IncompleteFrame, InvalidFrame, Model, ModelConfig

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

CHECKER = Model(ModelConfig(dim=4, auto_reindex=False))


def fresh_model() -> Model:
    return Model(ModelConfig(dim=4, auto_reindex=False))


def check(data: bytes) -> dict[str, Any] | None:
    """check_frame, asserting the result is one of the three allowed outcomes."""
    try:
        result = CHECKER.check_frame(data)
    except InvalidFrame:
        return {"invalid": True}
    if result is None:
        return None
    assert isinstance(result, dict)
    assert 0 < result["used"] <= len(data)
    assert result["entries"] >= 0
    assert all(0 <= i < result["entries"] for i, _ in result["rejected"])
    assert isinstance(result["tag"], str)
    assert result["chunk"] is None or isinstance(result["chunk"], str)
    return result


def ingest_agrees(model: Model, data: bytes, checked: dict[str, Any] | None) -> dict[str, Any]:
    """ingest_forward on ``data`` does what ``check`` said: refuses, asks for more, or applies
    exactly the entries the check accepted (less duplicates). Returns the report."""
    before = model.stats()["events_applied"]
    if checked is None or "invalid" in checked:
        expected = IncompleteFrame if checked is None else InvalidFrame
        try:
            model.ingest_forward(data)
        except (InvalidFrame, IncompleteFrame) as e:
            assert type(e) is expected, (e, expected)
        else:
            raise AssertionError("ingest_forward accepted what check_frame did not")
        assert model.stats()["events_applied"] == before
        return {}
    report = model.ingest_forward(data)
    assert report["consumed"] == checked["used"] and report["chunk"] == checked["chunk"]
    refused = {i for i, _ in report["rejected"]}
    assert refused == {i for i, _ in checked["rejected"]}
    assert report["applied"] + report["duplicates"] + len(refused) == checked["entries"]
    assert model.stats()["events_applied"] == before + report["applied"]
    return report


# --- (a) arbitrary bytes -------------------------------------------------------------------


@settings(max_examples=4000, **SETTINGS)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    checked = check(data)
    ingest_agrees(fresh_model(), data, checked)


@settings(max_examples=2500, **SETTINGS)
@given(
    st.sampled_from([b"\x92", b"\x93", b"\x94", b"\xdc\x00\x03", b"\xdd\x00\x00\x00\x02"]),
    st.binary(max_size=512),
)
def test_bytes_behind_an_array_head_never_crash(head: bytes, tail: bytes) -> None:
    """Random bytes rarely start like a frame; these do, so the deeper paths are reached."""
    checked = check(head + tail)
    ingest_agrees(fresh_model(), head + tail, checked)


# --- (b) structured frames -----------------------------------------------------------------

GOOD_USERS = ["u1", "u2", "u3", 4, 5, -6]
GOOD_ITEMS = ["a", "b", "c", "d", 10, 11]
BAD_USERS = ["bad-u1", "bad-u2", 666]
BAD_ITEMS = ["bad-a", "bad-b", 999]

# Mostly drawn from small pools: generating free text is what makes these tests slow, and a
# pool with multi-byte characters and long strings exercises the same decoding paths.
WORDS = ["a", "click", "x" * 40, "ünïcödé", "日本語", "\U0001f600", "with space", "0"]
words = st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=6))
ids = st.one_of(words, st.integers(-(2**63), 2**63 - 1))
# Times are unix seconds from 1990 up to the server's clock; earlier, later than the year 9999
# or more than max_clock_skew ahead of the clock they are refused.
EPOCH_FLOOR = 631_152_000
NOW = int(time.time())
times = st.one_of(
    st.integers(EPOCH_FLOOR, NOW),
    st.builds(
        lambda s, ns: msgpack.ExtType(0, struct.pack(">II", s, ns)),
        st.integers(EPOCH_FLOOR, NOW - 1),
        st.integers(0, 999_999_999),
    ),
    st.floats(EPOCH_FLOOR, NOW),
)
bad_times = st.one_of(
    st.integers(-(2**63), -1),
    st.integers(0, EPOCH_FLOOR - 1),
    st.integers(NOW + 86_400, 2**64 - 1),
    st.floats(NOW + 86_400, 1e300),
    st.sampled_from([math.nan, math.inf, -1.5, "now", None, [1, 2, 3]]),
    st.builds(
        lambda ns: msgpack.ExtType(0, struct.pack(">II", 1, ns)), st.integers(10**9, 2**32 - 1)
    ),
    st.builds(lambda t: msgpack.ExtType(t, b"\x00" * 8), st.integers(1, 127)),
    st.builds(lambda: msgpack.ExtType(0, b"\x00" * 4)),
)


# Strategies are built once: building them inside the composites costs more than drawing.
BOOLS = st.booleans()
TENTHS = st.integers(0, 9)
GOOD_USER = st.sampled_from(GOOD_USERS)
GOOD_ITEM = st.sampled_from(GOOD_ITEMS)
BAD_USER = st.sampled_from(BAD_USERS)
BAD_ITEM = st.sampled_from(BAD_ITEMS)
GOOD_KIND = st.sampled_from(["interaction", "interaction", "interaction", "upsert", "erase"])
OPTIONAL_INTERACTION = {
    "type": st.sampled_from(sorted(DEFAULT_EVENT_WEIGHTS)),
    "weight": st.one_of(st.floats(1e-3, 1e6), st.integers(1, 10**6)),
    "id": ids,
    "extra": st.one_of(st.none(), words, st.binary(max_size=5)),  # unknown keys are skipped
}
OPTIONAL_UPSERT = {"category": words, "tags": st.lists(words, max_size=5), "available": BOOLS}
FLAW = st.integers(0, 7)
BAD_WEIGHT = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300, "heavy", None]),
    st.floats(max_value=0.0, allow_nan=False),
    st.floats(min_value=1.000001e6, allow_infinity=False),
)
ID_FIELD = st.sampled_from(["user", "item"])
BAD_ID = st.sampled_from(["", "x" * 257, 2**64 - 1, 1.5, None, [1], b"bytes"])
BAD_TYPE = st.sampled_from(["", "no-such-type", "t" * 65, 3])
WIDE_INT = st.integers(-(2**63), 2**64 - 1)
NOT_A_MAP = st.one_of(WIDE_INT, words, st.lists(WIDE_INT, max_size=3))
ITEM_FIELD = st.sampled_from(["tags", "category", "available"])


def _optional(draw: st.DrawFn, rec: dict[str, Any], fields: dict[str, st.SearchStrategy]) -> None:
    for key, values in fields.items():
        if draw(BOOLS):
            rec[key] = draw(values)


@st.composite
def good_record(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(GOOD_KIND)
    if kind == "interaction":
        rec: dict[str, Any] = {"user": draw(GOOD_USER), "item": draw(GOOD_ITEM)}
        _optional(draw, rec, OPTIONAL_INTERACTION)
        return rec
    if kind == "upsert":
        rec = {"item": draw(GOOD_ITEM)}
        _optional(draw, rec, OPTIONAL_UPSERT)
        return rec
    return {"erase_user": draw(GOOD_USER)}


@st.composite
def bad_record(draw: st.DrawFn) -> Any:
    """A record wrong in exactly one way, over ids that no good record uses."""
    rec: dict[str, Any] = {"user": draw(BAD_USER), "item": draw(BAD_ITEM)}
    flaw = draw(FLAW)
    if flaw == 0:
        rec["weight"] = draw(BAD_WEIGHT)
    elif flaw == 1:
        rec[draw(ID_FIELD)] = draw(BAD_ID)
    elif flaw == 2:
        rec["type"] = draw(BAD_TYPE)
    elif flaw == 3:
        del rec["item"]
    elif flaw == 4:
        rec["erase_user"] = rec["user"]
    elif flaw == 5:
        return draw(NOT_A_MAP)
    elif flaw == 6:
        return {"item": rec["item"], draw(ITEM_FIELD): 7}
    else:
        return {"nothing": "useful"}
    return rec


GOOD_RECORD = good_record()
BAD_RECORD = bad_record()


@st.composite
def entries(draw: st.DrawFn, max_size: int) -> list[tuple[Any, Any, bool]]:
    """(time, record, valid) triples; a bad time also makes the entry invalid."""
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        valid = draw(BOOLS)
        rec = draw(GOOD_RECORD if valid else BAD_RECORD)
        if valid and draw(TENTHS) == 0:
            t: Any = draw(bad_times)
            valid = False
            rec = draw(BAD_RECORD)  # keep invalid entries on the bad ids
        else:
            t = draw(times)
            if draw(TENTHS) == 0:
                t = [t, {}]  # Fluent Bit's [time, metadata] pair
        out.append((t, rec, valid))
    return out


MODE = st.sampled_from(["message", "forward", "packed", "packed-str", "compressed"])
TAG = st.one_of(st.sampled_from(["", "app.events", "日本"]), st.text(max_size=12))
CHUNK = st.one_of(st.none(), st.text(max_size=24))
ONE_ENTRY = entries(1)
ENTRIES = entries(8)
MEMBERS = st.integers(1, 3)


def _str32(data: bytes) -> bytes:
    return b"\xdb" + struct.pack(">I", len(data)) + data


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A valid frame of any mode and what check_frame must say about it."""
    mode = draw(MODE)
    tag = draw(TAG)
    chunk = draw(CHUNK)
    es = draw(ONE_ENTRY if mode == "message" else ENTRIES)
    if mode == "message":
        # Message mode has exactly one entry, and its time must look like a time, since the
        # type of the second element is what tells the modes apart.
        if not es or not isinstance(es[0][0], int | float | msgpack.ExtType):
            es = [(draw(times), draw(GOOD_RECORD), True)]
    option: dict[str, Any] | None = None
    if chunk is not None or draw(BOOLS):
        option = {"size": len(es)} if draw(BOOLS) else {}
        if chunk is not None:
            option["chunk"] = chunk
    if mode == "compressed":
        option = dict(option or {}, compressed="gzip")
    with_nil_option = option is None and mode != "message" and draw(BOOLS)

    pairs = [[t, rec] for t, rec, _ in es]
    if mode == "message":
        parts: list[Any] = [tag, pairs[0][0], pairs[0][1]]
        head = msgpack.packb(parts + ([option] if option is not None else []))
        frame = head
    elif mode == "forward":
        parts = [tag, pairs] + (
            [option] if option is not None else [None] if with_nil_option else []
        )
        frame = msgpack.packb(parts)
    else:
        stream = b"".join(msgpack.packb(p) for p in pairs)
        if mode == "compressed":
            members = draw(MEMBERS)
            cut = sorted(
                draw(
                    st.lists(
                        st.integers(0, len(stream)), min_size=members - 1, max_size=members - 1
                    )
                )
            )
            bounds = [0, *cut, len(stream)]
            stream = b"".join(
                gzip.compress(stream[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)
            )
        tail = [option] if option is not None else [None] if with_nil_option else []
        payload = _str32(stream) if mode == "packed-str" else msgpack.packb(stream)
        frame = (
            bytes([0x90 | (2 + len(tail))])
            + msgpack.packb(tag)
            + payload
            + b"".join(msgpack.packb(o) for o in tail)
        )
    expect = {
        "used": len(frame),
        "entries": len(es),
        "rejected": {n for n, (_, _, valid) in enumerate(es) if not valid},
        "chunk": chunk,
        "tag": tag,
    }
    return frame, expect


@settings(max_examples=1500, **SETTINGS)
@given(frames(), st.binary(max_size=16))
def test_valid_frames_are_checked_exactly(case: tuple[bytes, dict[str, Any]], after: bytes) -> None:
    frame, expect = case
    checked = check(frame)
    assert checked is not None and "invalid" not in checked, checked
    assert checked["used"] == expect["used"] == len(frame)
    assert checked["entries"] == expect["entries"]
    assert {i for i, _ in checked["rejected"]} == expect["rejected"], checked["rejected"]
    assert checked["chunk"] == expect["chunk"] and checked["tag"] == expect["tag"]
    # Bytes after the frame (the next frame's start) change nothing about it.
    assert check(frame + after) == checked
    # Every strict prefix is a frame still arriving, never a verdict.
    step = max(1, len(frame) // 64)
    for end in range(0, len(frame), step):
        assert check(frame[:end]) is None, end


def check_one_by_one(data: bytes, offset: int, end: int) -> tuple[list[Any], str | None]:
    """What ``check_frames`` must return, from ``check_frame`` called frame after frame."""
    out: list[Any] = []
    window = data[:end]
    while offset < end:
        try:
            checked = CHECKER.check_frame(window, offset)
        except InvalidFrame as e:
            return out, str(e)
        if checked is None:
            break
        out.append(checked)
        offset += checked["used"]
    return out, None


@settings(max_examples=150, **SETTINGS)
@given(
    st.lists(frames(), max_size=5),
    st.binary(max_size=16),
    st.binary(max_size=4),
    st.integers(0, 2**16),
)
def test_check_frames_agrees_with_check_frame_frame_by_frame(
    cases: list[tuple[bytes, dict[str, Any]]], after: bytes, before: bytes, cut: int
) -> None:
    data = before + b"".join(frame for frame, _ in cases) + after
    for offset, end in (
        (len(before), len(data)),
        (len(before), len(before) + cut % (len(data) + 1 - len(before))),
    ):
        assert CHECKER.check_frames(data, offset, end) == check_one_by_one(data, offset, end)
    whole = b"".join(frame for frame, _ in cases)
    checks, error = CHECKER.check_frames(whole)
    assert error is None
    assert [c["used"] for c in checks] == [len(frame) for frame, _ in cases]


def test_check_frames_refuses_a_window_outside_the_buffer() -> None:
    with pytest.raises(ValueError):
        CHECKER.check_frames(b"\x90", 2)
    with pytest.raises(ValueError):
        CHECKER.check_frames(b"\x90\x90", 1, 0)
    with pytest.raises(ValueError):
        CHECKER.check_frames(b"\x90", 0, 5)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
)


def mutate(frame: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    data = bytearray(frame)
    for op in ops:
        at = op[1] % (len(data) + 1)
        if op[0] == "flip" and data:
            data[at % len(data)] ^= 1 << op[2]
        elif op[0] == "truncate":
            del data[at:]
        elif op[0] == "insert":
            data[at:at] = op[2]
        elif op[0] == "delete":
            del data[at : at + op[2]]
    return bytes(data)


@settings(max_examples=1500, **SETTINGS)
@given(frames(), st.lists(mutation, min_size=1, max_size=3))
def test_mutated_frames_never_crash(case: tuple[bytes, dict[str, Any]], ops: list[Any]) -> None:
    data = mutate(case[0], ops)
    checked = check(data)
    ingest_agrees(fresh_model(), data, checked)


# --- (c) ingest_forward against check_frame ------------------------------------------------


@settings(max_examples=700, **SETTINGS)
@given(st.lists(frames(), min_size=1, max_size=3))
def test_ingest_applies_only_what_the_check_accepted(
    cases: list[tuple[bytes, dict[str, Any]]],
) -> None:
    model = fresh_model()
    for frame, expect in cases:
        report = ingest_agrees(model, frame, check(frame))
        assert {i for i, _ in report["rejected"]} == expect["rejected"]
    # Invalid entries only ever name the bad ids: none of them reached the model.
    for user in BAD_USERS:
        assert model.seen(user) == []
    for user in GOOD_USERS:
        assert not set(model.seen(user)) & set(BAD_ITEMS)
    for item in BAD_ITEMS:
        assert model.item_vector(item) is None
