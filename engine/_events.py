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

from ._exceptions import BadRequest

__all__ = ["json_to_frame", "journal_record", "parse_journal_record"]

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


def _event_time(event: dict[str, Any], now: float) -> float | int:
    t = event.get("time", now)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise BadRequest("'time' must be a non-negative number of seconds since the epoch")
    return t


def json_to_frame(payload: Any, tag: str, max_events: int) -> tuple[bytes, int]:
    """A JSON event or list of events as a Forward-mode frame ``[tag, [[time, record]...]]``.

    Only the shape is checked here (objects, known keys, the size limit); field values are
    checked by the decoder exactly as for Forward traffic (see ``Model.validate_frame``).

    Returns:
        The frame and the number of events in it.

    Raises:
        BadRequest: the payload is not an event or a non-empty list of events.
    """
    events = payload if isinstance(payload, list) else [payload]
    if not events:
        raise BadRequest("no events")
    if len(events) > max_events:
        raise BadRequest(f"{len(events)} events in one request, the limit is {max_events}")
    now = time.time()
    entries = []
    for n, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadRequest(f"event {n}: expected a JSON object")
        unknown = set(event) - _RECORD_KEYS - {"time"}
        if unknown:
            raise BadRequest(f"event {n}: unknown field(s) {', '.join(sorted(unknown))}")
        t = _event_time(event, now)
        record = {k: v for k, v in event.items() if k != "time"}
        entries.append([t, record])
    return msgpack.packb([tag, entries], use_bin_type=True), len(entries)


def journal_record(frame: bytes, accepted_at: float | None = None) -> bytes:
    """The journal payload for one accepted frame."""
    at = time.time() if accepted_at is None else accepted_at
    return msgpack.packb([at, frame], use_bin_type=True)


def parse_journal_record(payload: bytes) -> tuple[float, bytes]:
    accepted_at, frame = msgpack.unpackb(payload, raw=False)
    return accepted_at, frame
