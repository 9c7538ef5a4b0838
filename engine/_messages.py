"""The typed messages the actors pass each other, in pipeline order.

The log (:class:`engine.Log`) forwards :class:`Appended` groups to the model actor; the model
actor reports one :class:`Applied` per record to the composition (publisher, index, erasure).
Every message is a frozen attrs class: once sent, nobody changes it.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Appended", "Applied"]


@attrs.frozen
class Appended:
    """A run of durable records, forwarded to the model actor in log order.

    Attributes:
        first_seq: The engine-local seq of ``payloads[0]``; the others follow consecutively.
        payloads: The records' payloads as appended (``engine._events.journal_record``).
        position: The log's own position after the last payload, opaque to the engine
            (empty for the local journal, whose position is the seq). Stored in snapshots
            beside the seq, so a restart resumes the log where the snapshot ends.
    """

    first_seq: int
    payloads: tuple[bytes, ...]
    position: bytes = b""

    @property
    def last_seq(self) -> int:
        """The seq of the last payload."""
        return self.first_seq + len(self.payloads) - 1


@attrs.frozen
class Applied:
    """What one journal record did to the model.

    ``users`` are the users whose lists may have changed, each with the id of its newest
    event; ``erased`` the users an erase record removed (not those the model never knew).
    """

    seq: int
    accepted_at: float
    applied: int
    duplicates: int
    rejected: tuple[tuple[int, str], ...]
    users: tuple[tuple[Any, Any], ...]
    erased: tuple[Any, ...] = ()
