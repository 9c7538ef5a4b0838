"""Forward frames decoded and re-encoded in Python, for the rare paths that must edit them.

The hot path never comes here: frames are checked and applied by the Rust decoder. Three
features need to look inside a frame from Python and possibly write a changed one:

* erasure rewrites journal records without the erased user's records (:func:`drop_users`);
* pseudonymisation replaces every user id before a frame is journaled (:func:`map_users`);
* experiment attribution reads (user, item) pairs of interactions (:func:`interactions`).

Every mode of Forward Protocol v1 is handled: Message ``[tag, time, record, option?]``,
Forward ``[tag, [[time, record]...], option?]``, PackedForward ``[tag, bin, option?]`` (the
entries' msgpack concatenated) and CompressedPackedForward (the same, gzip, with
``option.compressed == "gzip"``). EventTime (ext type 0) round-trips as ``msgpack.ExtType``.
A rewritten frame keeps its mode, tag and options, so the ``chunk`` option is still answered
and event ids are still de-duplicated per tag.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

__all__ = [
    "Frame",
    "decode_frame",
    "drop_users",
    "erased_users",
    "interactions",
    "map_users",
    "pseudonym",
]

Id = str | int
Entry = list[Any]  # [time, record]

# Ids are text or integers; strings that are not UTF-8 survive a round trip unchanged.
_UNPACK: dict[str, Any] = {
    "raw": False,
    "strict_map_key": False,
    "unicode_errors": "surrogateescape",
}


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


class Frame:
    """One decoded frame: its mode, tag, entries and option map.

    Attributes:
        mode: "message", "forward", "packed" or "compressed".
        tag: The frame's tag.
        entries: ``[time, record]`` pairs in order.
        option: The option map, or None when the frame had none.
    """

    __slots__ = ("entries", "mode", "option", "tag")

    def __init__(self, mode: str, tag: Any, entries: list[Entry], option: Any) -> None:
        self.mode = mode
        self.tag = tag
        self.entries = entries
        self.option = option

    def encode(self) -> bytes:
        """The frame in its original mode."""
        tail = [] if self.option is None else [self.option]
        if self.mode == "message":
            time, record = self.entries[0]
            return _pack([self.tag, time, record, *tail])
        if self.mode == "forward":
            return _pack([self.tag, self.entries, *tail])
        stream = b"".join(_pack(e) for e in self.entries)
        if self.mode == "compressed":
            # mtime=0: the same entries always give the same bytes (idempotent rewrites);
            # level 1: these frames go to the local journal, where speed matters more.
            stream = gzip.compress(stream, compresslevel=1, mtime=0)
        return _pack([self.tag, stream, *tail])


def decode_frame(frame: bytes) -> Frame:
    """Decodes one complete Forward frame (already checked by the Rust decoder).

    Raises:
        ValueError: ``frame`` is not a Forward frame.
    """
    obj = msgpack.unpackb(frame, **_UNPACK)
    if not isinstance(obj, list) or len(obj) < 2:
        raise ValueError("not a Forward frame")
    tag, second = obj[0], obj[1]
    if isinstance(second, list):
        return Frame("forward", tag, second, obj[2] if len(obj) > 2 else None)
    if isinstance(second, bytes | str):
        option = obj[2] if len(obj) > 2 else None
        data = second.encode("utf-8", "surrogateescape") if isinstance(second, str) else second
        mode = "packed"
        if isinstance(option, dict) and option.get("compressed") == "gzip":
            data = gzip.decompress(data)
            mode = "compressed"
        unpacker = msgpack.Unpacker(**_UNPACK, max_buffer_size=0)
        unpacker.feed(data)
        return Frame(mode, tag, [list(e) for e in unpacker], option)
    if len(obj) < 3:
        raise ValueError("Message mode needs [tag, time, record]")
    return Frame("message", tag, [[second, obj[2]]], obj[3] if len(obj) > 3 else None)


def _records(frame: Frame) -> Iterator[dict[Any, Any]]:
    for entry in frame.entries:
        if len(entry) >= 2 and isinstance(entry[1], dict):
            yield entry[1]


def interactions(frame: bytes) -> list[tuple[Id, Id]]:
    """The (user, item) pairs of the interaction records in ``frame``."""
    out = []
    for record in _records(decode_frame(frame)):
        user, item = record.get("user"), record.get("item")
        if user is not None and item is not None:
            out.append((user, item))
    return out


def erased_users(frame: bytes) -> list[Id]:
    """The ids named by ``erase_user`` records in ``frame``."""
    return [
        r["erase_user"]
        for r in _records(decode_frame(frame))
        if isinstance(r.get("erase_user"), str | int) and not isinstance(r["erase_user"], bool)
    ]


def map_users(frame: bytes, fn: Callable[[Id], Id]) -> bytes:
    """``frame`` with every user id (``user`` and ``erase_user``) replaced by ``fn(id)``."""
    decoded = decode_frame(frame)
    for record in _records(decoded):
        for key in ("user", "erase_user"):
            if key in record and isinstance(record[key], str | int):
                record[key] = fn(record[key])
    return decoded.encode()


def drop_users(frame: bytes, users: set[Id]) -> bytes | None:
    """``frame`` without any record naming one of ``users``; None if no record remains.

    Returns ``frame`` itself (the same object) when nothing had to go, so callers can tell
    cheaply that a journal record is unchanged.
    """
    decoded = decode_frame(frame)
    kept = [
        e
        for e in decoded.entries
        if not (
            len(e) >= 2
            and isinstance(e[1], dict)
            and (_in(e[1].get("user"), users) or _in(e[1].get("erase_user"), users))
        )
    ]
    if len(kept) == len(decoded.entries):
        return frame
    if not kept:
        return None
    decoded.entries = kept
    if decoded.mode == "message":  # one entry, so it was kept whole
        return frame
    return decoded.encode()


def _in(value: Any, users: set[Id]) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and value in users


def pseudonym(key: bytes, user: Id) -> str:
    """HMAC-SHA256(key, id) in hex, truncated to 32 characters (128 bits).

    Integer ids are hashed as their decimal text, so ``7`` and ``"7"`` name the same person
    after pseudonymisation; 128 bits keep accidental collisions out of reach for any number
    of users one engine could hold.
    """
    text = str(user).encode("utf-8", "surrogateescape")
    return hmac.new(key, text, hashlib.sha256).hexdigest()[:32]
