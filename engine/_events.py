"""Events as they travel: JSON from HTTP and websockets into Forward frames; journal records.

Every source ends up as a Fluent Forward frame, so the journal holds one kind of record and
recovery replays it through the same decoder as live traffic:

    journal record = msgpack [accepted_at: float, frame: bin]

``accepted_at`` is when the engine took the events (for latency tracing in pushes). Event ids
are de-duplicated per frame tag, so a producer that resends keeps its tag.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgpack

from ._exceptions import BadRequest, Forbidden

__all__ = ["is_admin_record", "json_to_frame", "journal_record", "parse_journal_record"]

_RECORD_KEYS = {
    "user",
    "item",
    "type",
    "weight",
    "id",
    "tags",
    "category",
    "available",
    "erase_user",
}


#: Largest integer a record may carry: msgpack, and with it every later layer, holds ints in
#: 64 bits (ids must also fit a signed 64-bit integer; the decoder says so with a reason).
_MAX_INT = 2**64 - 1
_MIN_INT = -(2**63)
#: Event times must be exact numbers of seconds; later ones are not dates (and the decoder
#: refuses any time after the year 9999 or before 1990 with a reason).
_MAX_TIME = 2**53


def _event_time(event: dict[str, Any], n: int, now: float) -> float | int:
    t = event.get("time", now)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise BadRequest(
            f"event {n}: 'time' must be a non-negative number of seconds since the epoch"
        )
    if t >= _MAX_TIME:
        raise BadRequest(f"event {n}: 'time' {t} is not a date in seconds since the epoch")
    return t


def _check_value(value: Any, n: int, key: str) -> None:
    """Refuses what msgpack cannot carry, naming the field, before anything is packed."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not _MIN_INT <= value <= _MAX_INT:
            raise BadRequest(f"event {n}: {key!r} {value} does not fit a 64-bit integer")
    elif isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadRequest(
                f"event {n}: {key!r} is not valid Unicode (a lone surrogate)"
            ) from None
    elif isinstance(value, list):
        for v in value:
            _check_value(v, n, key)


def is_admin_record(event: dict[str, Any]) -> bool:
    """Whether ``event`` erases a user or writes an item (``item`` without ``user``): the
    records only the admin key may send."""
    return "erase_user" in event or ("item" in event and "user" not in event)


def json_to_frame(
    payload: Any, tag: str, max_events: int, *, allow_admin: bool = True
) -> tuple[bytes, int]:
    """A JSON event or list of events as a Forward-mode frame ``[tag, [[time, record]...]]``.

    Only the shape is checked here (objects, known keys, the size limit, values msgpack can
    carry); field values are checked by the decoder exactly as for Forward traffic (see
    ``Model.check_frame``).

    Args:
        allow_admin: Whether the sender may erase users and write items (holds the admin key,
            or the server runs without keys).

    Returns:
        The frame and the number of events in it.

    Raises:
        BadRequest: the payload is not an event or a non-empty list of events.
        Forbidden: an erasure or item write without ``allow_admin``.
    """
    events = payload if isinstance(payload, list) else [payload]
    if not events:
        raise BadRequest("no events")
    if len(events) > max_events:
        raise BadRequest(f"{len(events)} events in one request, the limit is {max_events}")
    now = time.time()
    packer = msgpack.Packer(use_bin_type=True)
    try:
        parts = [
            packer.pack_array_header(2),
            packer.pack(tag),
            packer.pack_array_header(len(events)),
        ]
    except UnicodeEncodeError:
        raise BadRequest("the tag is not valid Unicode") from None
    for n, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadRequest(f"event {n}: expected a JSON object")
        if not all(isinstance(k, str) for k in event):
            raise BadRequest(f"event {n}: field names must be strings")
        unknown = set(event) - _RECORD_KEYS - {"time"}
        if unknown:
            raise BadRequest(
                f"event {n}: unknown field(s) {', '.join(sorted(map(ascii, unknown)))}"
            )
        if not allow_admin and is_admin_record(event):
            raise Forbidden(
                f"event {n}: erasing users and writing items needs the admin key, "
                "not a producer key"
            )
        t = _event_time(event, n, now)
        record = {k: v for k, v in event.items() if k != "time"}
        for k, v in record.items():
            _check_value(v, n, k)
        try:
            parts.append(packer.pack([t, record]))
        except (ValueError, OverflowError, TypeError) as e:  # a value msgpack cannot carry
            raise BadRequest(f"event {n}: {e}") from None
    return b"".join(parts), len(events)


def journal_record(frame: bytes, accepted_at: float | None = None) -> bytes:
    """The journal payload for one accepted frame."""
    at = time.time() if accepted_at is None else accepted_at
    return msgpack.packb([at, frame], use_bin_type=True)


def parse_journal_record(payload: bytes) -> tuple[float, bytes]:
    accepted_at, frame = msgpack.unpackb(payload, raw=False)
    return accepted_at, frame
