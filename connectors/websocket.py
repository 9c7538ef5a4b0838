"""The websocket routes: events in (one ack per message) and pushed recommendations.

    WS     /v1/ws/events                      events in, one ack per message
    WS     /v1/ws/recommendations             the user's list, pushed whenever it changes

A subscriber gets its current list at once, then every change (see ``engine.Publisher``:
latest wins, a slow reader gets the newest list rather than a backlog); one that stops
reading for ``send_timeout`` is closed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import msgpack
import trio
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine import (
    AuthError,
    BadRequest,
    Engine,
    Forbidden,
    InvalidEvents,
    InvalidFrame,
    JournalClosed,
    JournalFailed,
    Push,
    Subscription,
    TooManySubscribers,
)

from ._direct import SERVER_SEND, DirectWriter
from ._ratelog import RateLimitedLog
from ._requests import (
    DEFAULT_TAG,
    GOING_AWAY,
    MAX_ID_BYTES,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    TRY_AGAIN_LATER,
    Requests,
    parse_json,
    printable,
)

__all__ = ["events_socket", "recommendations_socket"]

log = logging.getLogger("recstream.web")
_errors = RateLimitedLog(log)

# A first list of at most this many characters (16 KiB encoded, what a new TCP connection's
# send buffer holds by default) is written straight to the new connection's socket.
FIRST_DIRECT_CHARS = 4096


async def events_socket(r: Requests, ws: WebSocket) -> None:
    """``/v1/ws/events``: events in, one ack (or error) per message, until the client
    leaves, idles for ``idle_timeout`` or the engine stops accepting."""
    await ws.accept()  # accepted first, so a refusal carries a close code and reason
    try:
        admin = r.require_producer(ws)
    except AuthError as e:
        await ws.close(POLICY_VIOLATION, str(e)[:120])
        return
    tag = ws.query_params.get("tag", DEFAULT_TAG)
    while True:
        try:
            message = await receive_within(ws, r.config.idle_timeout)
        except WebSocketDisconnect:
            return
        if message is None:
            r.engine.metrics.idle_closed.labels("ws_events").inc()
            log.info("websocket producer sent nothing for %g s; closing", r.config.idle_timeout)
            with trio.move_on_after(1):
                await ws.close(GOING_AWAY, "idle timeout")
            return
        if message["type"] == "websocket.disconnect":
            return
        text, data = message.get("text"), message.get("bytes")
        size = len(text.encode()) if text is not None else len(data or b"")
        if size > r.config.max_body_bytes:
            await ws.close(MESSAGE_TOO_BIG, "message too big")
            return
        try:
            if text is not None:
                payload = parse_json(text)
            else:
                payload = msgpack.unpackb(data or b"", raw=False)
            n, seq = await r.ingest(payload, tag, "ws", allow_admin=admin)
            reply: dict[str, Any] = {"ack": n, "seq": seq}
        except InvalidEvents as e:
            reply = {
                "error": str(e),
                "rejected": [{"index": i, "reason": r} for i, r in e.rejected],
            }
        except Forbidden as e:
            r.engine.metrics.rejects.labels("auth").inc()
            reply = {"error": str(e)}
        except (BadRequest, InvalidFrame, ValueError, msgpack.UnpackException) as e:
            if not isinstance(e, InvalidFrame):
                r.engine.metrics.rejects.labels("bad_request").inc()
            reply = {"error": str(e)}
        except (JournalClosed, JournalFailed) as e:
            await ws.close(TRY_AGAIN_LATER, str(e)[:120])
            return
        except Exception as e:
            _errors.log(logging.ERROR, "websocket message failed: %r", e, exc_info=True)
            reply = {"error": "internal error"}
        if "error" in reply:
            reply["error"] = printable(reply["error"])
        await ws.send_json(reply)


async def recommendations_socket(r: Requests, ws: WebSocket) -> None:
    """``/v1/ws/recommendations?user=``: the user's list now, then whenever it changes."""
    raw_user = ws.query_params.get("user")
    await ws.accept()  # accepted first, so a refusal carries a close code and reason
    try:
        if not raw_user:
            raise BadRequest("?user= is required")
        if len(raw_user.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
            raise BadRequest(f"user id longer than {MAX_ID_BYTES} bytes")
        user = r.resolve_user(raw_user)
        r.require_reader(ws, r.reader_id(raw_user, user))
        variant_name, variant = r.engine.variant_for(user)
        sub = Subscription(
            user=user,
            k=r.int_param(ws, "k", (variant and variant.k) or r.config.push_k, 1, 1000),
            category=ws.query_params.get("category"),
            exclude=tuple(r.list_param(ws, "exclude")),
            explain=r.flag(ws, "explain"),
            exclude_category=tuple(r.names_param(ws, "exclude_category")),
            diversity=r.float_param(ws, "diversity", 0.0, 1.0),
            exploration=r.float_param(ws, "exploration", 0.0, 1.0),
            repush_after=r.float_param(ws, "repush_after", 0.0, 86_400.0),
            variant=variant_name,
            params=r.engine.recommend_params(variant),
            shown=r.reader_id(raw_user, user),
        )
    except AuthError as e:
        await ws.close(POLICY_VIOLATION, str(e)[:120])
        return
    except BadRequest as e:
        await ws.close(POLICY_VIOLATION, str(e)[:120])
        return
    writer = DirectWriter.find(ws.scope.get(SERVER_SEND)) if r.config.direct_push else None
    if writer is not None:
        sub.deliver = writer.try_write
    try:
        async with r.engine.subscribe(sub):
            await _push_loop(r.engine, ws, sub, writer)
    except TooManySubscribers as e:  # raised by subscribe(), before any push
        await ws.close(TRY_AGAIN_LATER, str(e)[:120])


async def receive_within(ws: WebSocket, seconds: float) -> Any:
    """The next ASGI websocket message, or None when none arrives within ``seconds``."""
    with trio.move_on_after(seconds):
        return await ws.receive()
    return None


async def _push_loop(
    engine: Engine, ws: WebSocket, sub: Subscription, writer: DirectWriter | None
) -> None:
    """Sends the current list, then every change, until the client leaves or is too slow.

    With a ``writer``, the publisher writes most changes itself (see ``_direct``); this loop
    sends the first list and the changes the writer could not take, through the ASGI send,
    while the writer stays out of the way. A small first list goes through the writer:
    nothing was sent on the new connection yet, so its send buffer takes it whole, and
    Hypercorn's own send costs about as much again as the write.

    A send that does not finish within ``send_timeout`` closes the connection: the client
    stopped reading, and holding its socket would hold its buffers forever. A client that
    stops answering the server's pings (every third of ``idle_timeout``) is closed by the
    HTTP server's read timeout, which ends ``watch_disconnect`` and with it this loop.
    """
    timeout = engine.config.send_timeout

    async def watch_disconnect(cancel: trio.CancelScope) -> None:
        try:
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass
        except (WebSocketDisconnect, RuntimeError):
            pass
        cancel.cancel()

    sending_since: float | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            first = await engine.current(sub)
            engine.experiments.impression(sub.user, first.items, time.time())
            push: Push | None = first
            # One scope for every send, armed only while one is under way: cheaper per push
            # than a scope of its own.
            with trio.CancelScope() as sending:
                if writer is not None and len(first.text) <= FIRST_DIRECT_CHARS:
                    writer.busy = False
                    if writer.try_write(first.text):
                        push = await sub.slot.get()
                while push is not None:
                    sending_since = trio.current_time()
                    sending.deadline = sending_since + timeout
                    if writer is not None:
                        writer.busy = True
                    await ws.send_text(push.text)
                    sending.deadline = math.inf
                    # Hypercorn shields its socket write, so a stuck send may only end when
                    # the kernel gives up on the peer (TCP_USER_TIMEOUT): judge by the time.
                    if trio.current_time() - sending_since >= timeout:
                        break
                    sending_since = None
                    if writer is not None:
                        writer.busy = False
                    push = await sub.slot.get()
            if sending_since is not None:
                log.info("subscriber for %r stopped reading; closing", sub.user)
                nursery.cancel_scope.cancel()
                return
            with trio.move_on_after(1):
                await ws.close(GOING_AWAY, "server shutting down")
            nursery.cancel_scope.cancel()
    finally:
        if writer is not None:
            writer.busy = True  # the session is ending: nothing more is written
        # However the loop ended (the timeout above, the send failing once the kernel gave
        # up, the disconnect watcher), a send that outlasted the timeout dropped a stuck
        # subscriber and the list it was sending.
        if sending_since is not None and trio.current_time() - sending_since >= timeout:
            engine.metrics.dropped.inc()
            engine.metrics.dropped_pushes.inc()
