"""The exceptions recstream raises on purpose.

Every class derives from :class:`RecstreamError`, so a caller can catch the whole family at an
API boundary. Each docstring says when the exception is raised and how it differs from its
siblings, because choosing the right ``except`` clause is the reader's real question.

Bad arguments are *not* in this file: they raise the built-in :class:`ValueError` or
:class:`TypeError`, since they are the caller's mistake rather than a state of the engine.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BadRequest",
    "ConfigError",
    "Forbidden",
    "InvalidEvents",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalFailed",
    "JournalLocked",
    "RecstreamError",
    "TooManySubscribers",
]


class RecstreamError(Exception):
    """Base class of every error the engine raises deliberately.

    Catch this at an API boundary (an HTTP handler, a connector) to turn engine failures into
    a response. It never wraps programming errors: those stay ``TypeError``/``ValueError``.
    """


# --- write-ahead log ------------------------------------------------------------------------


class JournalError(RecstreamError):
    """Base class of the write-ahead log's errors.

    Catch this to handle "the journal cannot take this request" without caring why; catch a
    subclass when the reaction differs (retry later, alert an operator, restart the process).
    """


class JournalCorrupt(JournalError):
    """Raised by ``Journal.open`` (or a later replay) when the log is damaged in a way that
    cannot be cut off safely.

    A torn or garbled *tail* is never reported this way: recovery cuts it at the last valid
    record and says so in the ``RecoveryReport``, because that is what a crash leaves behind.
    This exception is for states a crash cannot produce and that cutting would make worse,
    such as a missing segment between two intact ones (someone deleted or moved a file) or a
    segment written by an unknown format version. No segment is cut or deleted before it is
    raised, so an operator can inspect or restore the directory and open it again.
    """


class JournalClosed(JournalError):
    """Raised when a journal (or its actor) is asked to do something after an orderly close.

    Unlike :class:`JournalFailed`, nothing went wrong: the owner closed it, typically during
    shutdown. A producer that sees this should stop sending; its request was not written.
    """


class JournalFailed(JournalError):
    """Raised when an I/O error kept a request from becoming durable.

    After a failed ``write`` or ``fdatasync`` the kernel may have dropped the dirty pages and
    a retry could report success without the data being on disk, so the journal cuts every
    record written since its last good sync and the requests waiting for them get this
    exception, with the original :class:`OSError` as ``__cause__``: their events were *not*
    acknowledged. Later requests are accepted again once the cut succeeds (the disk works
    again). Differs from :class:`JournalClosed` in that it is a fault.
    """


class JournalLocked(JournalError):
    """Raised by ``Journal.open`` when another open journal already holds the directory.

    Two writers on one log would interleave sequence numbers and corrupt it, so the directory
    is guarded by an advisory lock that the kernel releases when its holder exits, even by
    ``kill -9``. Seeing this means another process (or a second ``open`` in this one) is live.
    """


# --- serving ----------------------------------------------------------------------------------


class ConfigError(RecstreamError):
    """Raised at start-up when the configuration is inconsistent or unsafe.

    The server does not start; the message says which setting to change. The most common case
    is protected mode: a listener reachable from other hosts with no key configured.
    """


class AuthError(RecstreamError):
    """Raised when a request's key or subscription token is missing, wrong or expired.

    HTTP answers 401 (403 for a valid token for another user); websockets close with 1008.
    Differs from :class:`BadRequest` in that the request itself may be fine.
    """


class Forbidden(AuthError):
    """Raised when a request presents a valid key that does not allow what it asks: a
    producer key sending user erasures or item writes, which need the admin key. Unlike its
    parent, presenting another key of the same kind will not help (HTTP 403, not 401).
    """


class BadRequest(RecstreamError):
    """Raised when a request's body or parameters are malformed (not JSON, wrong shape,
    unknown fields, too many events).

    HTTP answers 400 (413 for bodies over the limit); nothing of the request was accepted.
    Events that are well-formed but carry bad values (a NaN weight, an unknown event type)
    are refused by the model's validation instead, with 422.
    """


class InvalidEvents(BadRequest):
    """Raised when well-formed events carry bad values (a NaN weight, an unknown type, an id
    over the length limit).

    ``rejected`` lists every refusal as (event index, reason). Nothing of the request was
    accepted; HTTP answers 422. Differs from its parent in that the shape was fine.
    """

    def __init__(self, rejected: list[tuple[int, str]]) -> None:
        super().__init__(
            f"{len(rejected)} event(s) refused; event {rejected[0][0]}: {rejected[0][1]}"
        )
        self.rejected = rejected


class TooManySubscribers(RecstreamError):
    """Raised when a subscription would exceed ``max_subscribers``.

    The websocket is closed with 1013 (try again later); existing subscribers are unaffected.
    """
