"""The HTTP routes, and the Starlette application with the websocket routes
(``connectors.websocket``), served by Hypercorn's trio worker (``connectors.node``).

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

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

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
    rec_json,
)

from ._direct import KeepServerSend
from ._ratelog import RateLimitedLog
from ._requests import DEFAULT_TAG, Requests, TooLarge, parse_json, printable
from .websocket import events_socket, recommendations_socket

__all__ = ["build_app"]

log = logging.getLogger("recstream.web")

Id = str | int


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": printable(message), **extra}, status_code=status)


def build_app(engine: Engine) -> Starlette:
    """The Starlette application serving ``engine`` (call it once the engine serves)."""
    r = Requests(engine)
    cfg = engine.config
    errors = RateLimitedLog(log)

    def endpoint(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Maps the engine's exceptions to HTTP answers."""

        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except TooLarge:
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

    @endpoint
    async def post_events(request: Request) -> Response:
        admin = r.require_producer(request)
        payload = parse_json(await r.read_body(request))
        tag = request.query_params.get("tag", DEFAULT_TAG)
        n, seq = await r.ingest(payload, tag, "http", allow_admin=admin)
        return JSONResponse({"accepted": n, "seq": seq}, status_code=202)

    async def ws_events(ws: WebSocket) -> None:
        await events_socket(r, ws)

    # --- recommendations out --------------------------------------------------------------

    @endpoint
    async def get_recommendations(request: Request) -> Response:
        text = request.path_params["user"]
        user = r.resolve_user(text)
        r.require_reader(request, r.reader_id(text, user))
        variant_name, variant = engine.variant_for(user)
        k = r.int_param(request, "k", (variant and variant.k) or cfg.push_k, 1, 1000)
        explain = r.flag(request, "explain")
        own = {
            "exclude_category": r.names_param(request, "exclude_category") or None,
            "diversity": r.float_param(request, "diversity", 0.0, 1.0),
            "exploration": r.float_param(request, "exploration", 0.0, 1.0),
        }
        # The request's own parameters win over its variant's.
        params = {
            **engine.recommend_params(variant),
            **{k: v for k, v in own.items() if v is not None},
        }
        # The journal sequence the list reflects (at least): read before computing it.
        version = engine.applied_seq
        recs = await engine.recommend(
            user,
            k=k,
            exclude=r.list_param(request, "exclude") or None,
            category=request.query_params.get("category"),
            explain=explain,
            **params,
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
        r.require_reader(request, None)
        item = r.resolve_item(request.path_params["item"])
        k = r.int_param(request, "k", 10, 1, 1000)
        try:
            hits = await engine.similar(item, k)
        except KeyError:
            return _error(404, f"unknown item {item!r}")
        return JSONResponse({"item": item, "items": [{"item": i, "score": s} for i, s in hits]})

    async def ws_recommendations(ws: WebSocket) -> None:
        await recommendations_socket(r, ws)

    @endpoint
    async def get_trending(request: Request) -> Response:
        k = r.int_param(request, "k", 10, 1, 1000)
        category = request.query_params.get("category")
        hits = await engine.trending(k, category)
        return JSONResponse({"items": [{"item": i, "score": s} for i, s in hits]})

    # --- admin ----------------------------------------------------------------------------

    @endpoint
    async def post_snapshot(request: Request) -> Response:
        r.require_admin(request)
        seq = await engine.take_snapshot()
        return JSONResponse({"snapshot_seq": seq})

    @endpoint
    async def get_snapshot(request: Request) -> Response:
        """A fresh snapshot's bytes, for a node joining the same shared log (``--join``)."""
        r.require_admin(request)
        seq = await engine.take_snapshot()
        body = await trio.to_thread.run_sync((engine.data_dir / SNAPSHOT).read_bytes)
        return Response(
            body,
            media_type="application/octet-stream",
            headers={"X-Recstream-Snapshot-Seq": str(seq)},
        )

    @endpoint
    async def put_item(request: Request) -> Response:
        r.require_admin(request)
        item = r.resolve_item(request.path_params["item"])
        attrs = parse_json(await r.read_body(request))
        if not isinstance(attrs, dict) or set(attrs) - {"tags", "category", "available"}:
            raise BadRequest("expected an object with tags, category and/or available")
        seq = (await r.ingest({"item": item, **attrs}, DEFAULT_TAG, "http"))[1]
        await engine.wait_applied(seq)
        return JSONResponse({"item": item, "seq": seq})

    @endpoint
    async def delete_user(request: Request) -> Response:
        """Answers once the user is gone from the model, the snapshots and the journal."""
        r.require_admin(request)
        text = request.path_params["user"]
        user = r.resolve_user(text)
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
    return Starlette(routes=routes, middleware=[Middleware(KeepServerSend)])
