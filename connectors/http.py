"""HTTP and websocket endpoints (Starlette, served by Hypercorn's trio worker).

Routes (see the README for examples):

    POST   /v1/events                         events in (202 once durable)
    GET    /v1/users/{user}/recommendations   top-k now
    GET    /v1/items/{item}/similar           similar items
    PUT    /v1/items/{item}                   item attributes (admin)
    DELETE /v1/users/{user}                   erase a user (admin)
    WS     /v1/ws/events                      events in, one ack per message
    WS     /v1/ws/recommendations             the user's list, pushed whenever it changes
    GET    /v1/trending                       decayed popularity
    GET    /v1/experiments                    A/B variants: impressions, interactions, rate
    POST   /v1/admin/snapshot                 snapshot now (admin)
    GET    /v1/admin/snapshot                 snapshot now and download it (admin; --join)
    GET    /v1/stats, /metrics, /healthz, /readyz, /   (dashboard)

Ids in URLs are strings; an all-digit id also matches a user or item that producers sent as
an integer, whichever the model knows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine import (
    SNAPSHOT,
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
    json_to_frame,
    rec_json,
)

from ._auth import key_matches, verify_token
from ._ratelog import RateLimitedLog

__all__ = ["build_app"]

log = logging.getLogger("recstream.web")

Id = str | int
_INT = re.compile(r"-?\d{1,18}")
DEFAULT_TAG = "recstream"
#: Longest user or item id, as the model accepts it (UTF-8 bytes).
MAX_ID_BYTES = 256
# Websocket close codes (RFC 6455 §7.4.1).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013


#: Longest id in a URL, in UTF-8 bytes (the model's limit on string ids).
MAX_ID_BYTES = 256


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can be sent as UTF-8 whatever a client
    put in it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": _printable(message), **extra}, status_code=status)


def _parse_json(text: str | bytes) -> Any:
    """JSON from a client; BadRequest (never a 500) for anything that is not."""
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("body is not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None


def build_app(engine: Engine) -> Starlette:
    """The Starlette application serving ``engine``."""
    cfg = engine.config
    model = engine.model
    errors = RateLimitedLog(log)

    # --- helpers --------------------------------------------------------------------------

    def known_as(text: str, known: Callable[[Id], object]) -> Id:
        """A URL id as the model knows it: an all-digit id the model holds only as an
        integer (producers sent it as one) is that integer."""
        if _INT.fullmatch(text) and known(text) is None and known(int(text)) is not None:
            return int(text)
        return text

    def check_id(text: str) -> None:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise BadRequest("the id in the URL is not valid Unicode") from None
        if size > MAX_ID_BYTES:
            raise BadRequest(f"the id in the URL is {size} bytes, the limit is {MAX_ID_BYTES}")

    def resolve_user(text: str) -> Id:
        check_id(text)
        if cfg.pseudonymize_key is not None:
            return engine.map_user(text)  # the model only ever saw pseudonyms
        return known_as(text, model.user_vector)

    def resolve_item(text: str) -> Id:
        check_id(text)
        return known_as(text, model.item_vector)

    def presented_key(conn: Request | WebSocket) -> str | None:
        key = conn.headers.get("x-recstream-key") or conn.query_params.get("key")
        auth = conn.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key

    def require_producer(conn: Request | WebSocket) -> bool:
        """Checks the sender may send events; returns whether it may also send erasures and
        item writes (it holds the admin key, or the server runs without keys)."""
        if not cfg.auth_enabled:
            return True
        key = presented_key(conn)
        if cfg.admin_key and key_matches(key, (cfg.admin_key,)):
            return True
        if key_matches(key, cfg.producer_keys):
            return False
        raise AuthError("a producer key is required (X-Recstream-Key)")

    def require_admin(conn: Request | WebSocket) -> None:
        if cfg.auth_enabled and not key_matches(
            presented_key(conn), (cfg.admin_key,) if cfg.admin_key else ()
        ):
            raise AuthError("the admin key is required (X-Recstream-Key)")

    def require_reader(conn: Request | WebSocket, user: Id | None) -> None:
        """Reading a user's list: that user's token, or any producer or admin key."""
        if not cfg.auth_enabled:
            return
        keys = cfg.producer_keys + ((cfg.admin_key,) if cfg.admin_key else ())
        if key_matches(presented_key(conn), keys):
            return
        token = conn.query_params.get("token")
        if token is None or user is None:
            raise AuthError("a subscription token (?token=) or a key is required")
        assert cfg.token_secret is not None
        verify_token(cfg.token_secret, token, user)

    def int_param(conn: Request | WebSocket, name: str, default: int, lo: int, hi: int) -> int:
        raw = conn.query_params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"{name} must be an integer") from None
        if not lo <= value <= hi:
            raise BadRequest(f"{name} must be in {lo}..{hi}")
        return value

    def float_param(conn: Request | WebSocket, name: str, lo: float, hi: float) -> float | None:
        raw = conn.query_params.get(name)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"{name} must be a number") from None
        if not lo <= value <= hi:  # also refuses NaN
            raise BadRequest(f"{name} must be in {lo}..{hi}")
        return value

    def names_param(conn: Request | WebSocket, name: str) -> list[str]:
        raw = conn.query_params.get(name)
        return [x for x in raw.split(",") if x] if raw else []

    def list_param(conn: Request | WebSocket, name: str) -> list[Id]:
        raw = conn.query_params.get(name)
        return [resolve_item(x) for x in raw.split(",") if x] if raw else []

    def flag(conn: Request | WebSocket, name: str) -> bool:
        return conn.query_params.get(name, "0").lower() in ("1", "true", "yes")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise _TooLarge()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise _TooLarge()
        return bytes(body)

    def endpoint(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Maps the engine's exceptions to HTTP answers."""

        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except _TooLarge:
                engine.metrics.rejects.labels("too_large").inc()
                return _error(413, f"body over {cfg.max_body_bytes} bytes")
            except AuthError as e:
                engine.metrics.rejects.labels("auth").inc()
                forbidden = isinstance(e, Forbidden) or "another user" in str(e)
                return _error(403 if forbidden else 401, str(e))
            except InvalidEvents as e:
                return _error(
                    422, str(e), rejected=[{"index": i, "reason": r} for i, r in e.rejected]
                )
            except InvalidFrame as e:
                return _error(400, str(e))
            except BadRequest as e:
                engine.metrics.rejects.labels("bad_request").inc()
                return _error(400, str(e))
            except (JournalClosed, JournalFailed) as e:
                return _error(503, str(e))
            except Exception as e:
                # A bug met by one request: answer it, keep serving, and keep the log short
                # however often it happens.
                errors.log(
                    logging.ERROR,
                    "%s %s failed: %r",
                    request.method,
                    request.url.path,
                    e,
                    exc_info=True,
                )
                return _error(500, "internal error")

        return wrapped

    # --- events in ------------------------------------------------------------------------

    async def ingest(
        payload: Any, tag: str, source: str, allow_admin: bool = True
    ) -> tuple[int, int]:
        frame, n = json_to_frame(payload, tag, cfg.max_events_per_request, allow_admin=allow_admin)
        seq = await engine.submit(frame, source)
        return n, seq

    @endpoint
    async def post_events(request: Request) -> Response:
        admin = require_producer(request)
        payload = _parse_json(await read_body(request))
        tag = request.query_params.get("tag", DEFAULT_TAG)
        n, seq = await ingest(payload, tag, "http", allow_admin=admin)
        return JSONResponse({"accepted": n, "seq": seq}, status_code=202)

    async def ws_events(ws: WebSocket) -> None:
        await ws.accept()  # accepted first, so a refusal carries a close code and reason
        try:
            admin = require_producer(ws)
        except AuthError as e:
            await ws.close(POLICY_VIOLATION, str(e)[:120])
            return
        tag = ws.query_params.get("tag", DEFAULT_TAG)
        while True:
            try:
                message = await receive_within(ws, cfg.idle_timeout)
            except WebSocketDisconnect:
                return
            if message is None:
                engine.metrics.idle_closed.labels("ws_events").inc()
                log.info("websocket producer sent nothing for %g s; closing", cfg.idle_timeout)
                with trio.move_on_after(1):
                    await ws.close(GOING_AWAY, "idle timeout")
                return
            if message["type"] == "websocket.disconnect":
                return
            text, data = message.get("text"), message.get("bytes")
            size = len(text.encode()) if text is not None else len(data or b"")
            if size > cfg.max_body_bytes:
                await ws.close(MESSAGE_TOO_BIG, "message too big")
                return
            try:
                if text is not None:
                    payload = _parse_json(text)
                else:
                    payload = msgpack.unpackb(data or b"", raw=False)
                n, seq = await ingest(payload, tag, "ws", allow_admin=admin)
                reply: dict[str, Any] = {"ack": n, "seq": seq}
            except InvalidEvents as e:
                reply = {
                    "error": str(e),
                    "rejected": [{"index": i, "reason": r} for i, r in e.rejected],
                }
            except Forbidden as e:
                engine.metrics.rejects.labels("auth").inc()
                reply = {"error": str(e)}
            except (BadRequest, InvalidFrame, ValueError, msgpack.UnpackException) as e:
                if not isinstance(e, InvalidFrame):
                    engine.metrics.rejects.labels("bad_request").inc()
                reply = {"error": str(e)}
            except (JournalClosed, JournalFailed) as e:
                await ws.close(TRY_AGAIN_LATER, str(e)[:120])
                return
            except Exception as e:
                errors.log(logging.ERROR, "websocket message failed: %r", e, exc_info=True)
                reply = {"error": "internal error"}
            if "error" in reply:
                reply["error"] = _printable(reply["error"])
            await ws.send_json(reply)

    # --- recommendations out --------------------------------------------------------------

    def reader_id(text: str, user: Id) -> Id:
        """The id a subscription token names: the raw one when ids are pseudonymised."""
        return text if cfg.pseudonymize_key is not None else user

    @endpoint
    async def get_recommendations(request: Request) -> Response:
        text = request.path_params["user"]
        user = resolve_user(text)
        require_reader(request, reader_id(text, user))
        variant_name, variant = engine.variant_for(user)
        k = int_param(request, "k", (variant and variant.k) or cfg.push_k, 1, 1000)
        explain = flag(request, "explain")
        own = {
            "exclude_category": names_param(request, "exclude_category") or None,
            "diversity": float_param(request, "diversity", 0.0, 1.0),
            "exploration": float_param(request, "exploration", 0.0, 1.0),
        }
        # The request's own parameters win over its variant's.
        params = {
            **engine.recommend_params(variant),
            **{k: v for k, v in own.items() if v is not None},
        }
        # The journal sequence the list reflects (at least): read before computing it.
        version = engine.applied_seq
        recs = await trio.to_thread.run_sync(
            lambda: model.recommend(
                user,
                k=k,
                exclude=list_param(request, "exclude") or None,
                category=request.query_params.get("category"),
                explain=explain,
                detail=True,
                **params,
            )
        )
        items = [rec_json(r) for r in recs]
        engine.experiments.impression(user, [r["item"] for r in recs], time.time())
        shown = text if cfg.pseudonymize_key is not None else user
        return JSONResponse(
            {"user": shown, "items": items, "variant": variant_name, "version": version}
        )

    async def get_experiments(request: Request) -> Response:
        return JSONResponse(engine.experiments.report())

    @endpoint
    async def get_similar(request: Request) -> Response:
        require_reader(request, None)
        item = resolve_item(request.path_params["item"])
        k = int_param(request, "k", 10, 1, 1000)
        try:
            hits = await trio.to_thread.run_sync(lambda: model.similar(item, k))
        except KeyError:
            return _error(404, f"unknown item {item!r}")
        return JSONResponse({"item": item, "items": [{"item": i, "score": s} for i, s in hits]})

    async def ws_recommendations(ws: WebSocket) -> None:
        publisher = engine.publisher
        assert publisher is not None
        raw_user = ws.query_params.get("user")
        await ws.accept()  # accepted first, so a refusal carries a close code and reason
        try:
            if not raw_user:
                raise BadRequest("?user= is required")
            if len(raw_user.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
                raise BadRequest(f"user id longer than {MAX_ID_BYTES} bytes")
            user = resolve_user(raw_user)
            require_reader(ws, reader_id(raw_user, user))
            variant_name, variant = engine.variant_for(user)
            sub = Subscription(
                user=user,
                k=int_param(ws, "k", (variant and variant.k) or cfg.push_k, 1, 1000),
                category=ws.query_params.get("category"),
                exclude=tuple(list_param(ws, "exclude")),
                explain=flag(ws, "explain"),
                exclude_category=tuple(names_param(ws, "exclude_category")),
                diversity=float_param(ws, "diversity", 0.0, 1.0),
                exploration=float_param(ws, "exploration", 0.0, 1.0),
                repush_after=float_param(ws, "repush_after", 0.0, 86_400.0),
                variant=variant_name,
                params=engine.recommend_params(variant),
                shown=reader_id(raw_user, user),
            )
            publisher.subscribe(sub)
        except AuthError as e:
            await ws.close(POLICY_VIOLATION, str(e)[:120])
            return
        except BadRequest as e:
            await ws.close(POLICY_VIOLATION, str(e)[:120])
            return
        except TooManySubscribers as e:
            await ws.close(TRY_AGAIN_LATER, str(e)[:120])
            return
        try:
            await _push_loop(engine, ws, sub)
        finally:
            publisher.unsubscribe(sub)

    @endpoint
    async def get_trending(request: Request) -> Response:
        k = int_param(request, "k", 10, 1, 1000)
        category = request.query_params.get("category")
        hits = await trio.to_thread.run_sync(lambda: model.trending(k, category))
        return JSONResponse({"items": [{"item": i, "score": s} for i, s in hits]})

    # --- admin ----------------------------------------------------------------------------

    @endpoint
    async def post_snapshot(request: Request) -> Response:
        require_admin(request)
        seq = await engine.take_snapshot()
        return JSONResponse({"snapshot_seq": seq})

    @endpoint
    async def get_snapshot(request: Request) -> Response:
        """A fresh snapshot's bytes, for a node joining the same shared log (``--join``)."""
        require_admin(request)
        seq = await engine.take_snapshot()
        body = await trio.to_thread.run_sync((engine.data_dir / SNAPSHOT).read_bytes)
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"X-Recstream-Snapshot-Seq": str(seq)},
        )

    @endpoint
    async def put_item(request: Request) -> Response:
        require_admin(request)
        item = resolve_item(request.path_params["item"])
        attrs = _parse_json(await read_body(request))
        if not isinstance(attrs, dict) or set(attrs) - {"tags", "category", "available"}:
            raise BadRequest("expected an object with tags, category and/or available")
        seq = (await ingest({"item": item, **attrs}, DEFAULT_TAG, "http"))[1]
        await engine.wait_applied(seq)
        return JSONResponse({"item": item, "seq": seq})

    @endpoint
    async def delete_user(request: Request) -> Response:
        """Answers once the user is gone from the model, the snapshots and the journal."""
        require_admin(request)
        text = request.path_params["user"]
        user = resolve_user(text)
        # The raw id goes in: append() pseudonymises it like any other record.
        raw: Id = text if cfg.pseudonymize_key is not None else user
        seq = await engine.erase_user(user, raw, DEFAULT_TAG)
        if seq is None:
            return JSONResponse({"user": raw, "erased": False, "error": "unknown user"}, 404)
        return JSONResponse({"user": raw, "erased": True, "seq": seq})

    # --- operations -----------------------------------------------------------------------

    async def stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        if not engine.ready:
            return PlainTextResponse("starting", status_code=503)
        faults = engine.storage_faults()
        if faults:  # reads still work; writes are refused until the disk recovers
            return PlainTextResponse("; ".join(faults.values()), status_code=503)
        return PlainTextResponse("ready")

    dashboard_html = (Path(__file__).parent / "dashboard.html").read_text()

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(dashboard_html)

    routes = [
        Route("/v1/events", post_events, methods=["POST"]),
        Route("/v1/users/{user}/recommendations", get_recommendations, methods=["GET"]),
        Route("/v1/users/{user}", delete_user, methods=["DELETE"]),
        Route("/v1/items/{item}/similar", get_similar, methods=["GET"]),
        Route("/v1/items/{item}", put_item, methods=["PUT"]),
        Route("/v1/trending", get_trending, methods=["GET"]),
        Route("/v1/experiments", get_experiments, methods=["GET"]),
        Route("/v1/admin/snapshot", post_snapshot, methods=["POST"]),
        Route("/v1/admin/snapshot", get_snapshot, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/", dashboard, methods=["GET"]),
        WebSocketRoute("/v1/ws/events", ws_events),
        WebSocketRoute("/v1/ws/recommendations", ws_recommendations),
    ]
    return Starlette(routes=routes)


async def receive_within(ws: WebSocket, seconds: float) -> Any:
    """The next ASGI websocket message, or None when none arrives within ``seconds``."""
    with trio.move_on_after(seconds):
        return await ws.receive()
    return None


async def _push_loop(engine: Engine, ws: WebSocket, sub: Subscription) -> None:
    """Sends the current list, then every change, until the client leaves or is too slow.

    A send that does not finish within ``send_timeout`` closes the connection: the client
    stopped reading, and holding its socket would hold its buffers forever. A client that
    stops answering the server's pings (every third of ``idle_timeout``) is closed by the
    HTTP server's read timeout, which ends ``watch_disconnect`` and with it this loop.
    """
    timeout = engine.config.send_timeout
    publisher = engine.publisher
    assert publisher is not None

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
            first = await publisher.current(sub)
            engine.experiments.impression(sub.user, first.items, time.time())
            push: Push | None = first
            # One scope for every send, armed only while one is under way: cheaper per push
            # than a scope of its own.
            with trio.CancelScope() as sending:
                while push is not None:
                    sending_since = trio.current_time()
                    sending.deadline = sending_since + timeout
                    await ws.send_text(push.text)
                    sending.deadline = math.inf
                    # Hypercorn shields its socket write, so a stuck send may only end when
                    # the kernel gives up on the peer (TCP_USER_TIMEOUT): judge by the time.
                    if trio.current_time() - sending_since >= timeout:
                        break
                    sending_since = None
                    push = await sub.slot.get()
            if sending_since is not None:
                log.info("subscriber for %r stopped reading; closing", sub.user)
                nursery.cancel_scope.cancel()
                return
            with trio.move_on_after(1):
                await ws.close(GOING_AWAY, "server shutting down")
            nursery.cancel_scope.cancel()
    finally:
        # However the loop ended (the timeout above, the send failing once the kernel gave
        # up, the disconnect watcher), a send that outlasted the timeout dropped a stuck
        # subscriber and the list it was sending.
        if sending_since is not None and trio.current_time() - sending_since >= timeout:
            engine.metrics.dropped.inc()
            engine.metrics.dropped_pushes.inc()


class _TooLarge(Exception):
    pass
