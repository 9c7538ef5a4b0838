"""What the HTTP and websocket routes share: request parsing, id resolution and auth checks.

Ids in URLs are strings; an all-digit id also matches a user or item that producers sent as
an integer, whichever the model knows. With ``pseudonymize_key`` set, user ids are mapped to
their pseudonyms (the model only ever saw those).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.websockets import WebSocket

from engine import AuthError, BadRequest, Engine, json_to_frame

from ._auth import key_matches, verify_token

__all__ = [
    "DEFAULT_TAG",
    "GOING_AWAY",
    "MAX_ID_BYTES",
    "MESSAGE_TOO_BIG",
    "POLICY_VIOLATION",
    "TRY_AGAIN_LATER",
    "Requests",
    "TooLarge",
    "parse_json",
    "printable",
]

Id = str | int
_INT = re.compile(r"-?\d{1,18}")
DEFAULT_TAG = "recstream"
#: Longest user or item id in a URL, as the model accepts it (UTF-8 bytes).
MAX_ID_BYTES = 256
# Websocket close codes (RFC 6455 §7.4.1).
GOING_AWAY = 1001
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013


class TooLarge(Exception):
    """A request body over ``max_body_bytes``."""


def printable(text: str) -> str:
    """``text`` with lone surrogates escaped, so it can be sent as UTF-8 whatever a client
    put in it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_json(text: str | bytes) -> Any:
    """JSON from a client; BadRequest (never a 500) for anything that is not."""
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("body is not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None


class Requests:
    """Parsing and checks for requests to ``engine`` (read once it serves).

    Args:
        engine: The running engine.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.model = engine.model

    def known_as(self, text: str, known: Callable[[Id], object]) -> Id:
        """A URL id as the model knows it: an all-digit id the model holds only as an
        integer (producers sent it as one) is that integer."""
        if _INT.fullmatch(text) and known(text) is None and known(int(text)) is not None:
            return int(text)
        return text

    def check_id(self, text: str) -> None:
        """Refuses an id that is not valid Unicode or longer than ``MAX_ID_BYTES``."""
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise BadRequest("the id in the URL is not valid Unicode") from None
        if size > MAX_ID_BYTES:
            raise BadRequest(f"the id in the URL is {size} bytes, the limit is {MAX_ID_BYTES}")

    def resolve_user(self, text: str) -> Id:
        """The user a URL names, as the model stores it (pseudonym, or integer id)."""
        self.check_id(text)
        if self.config.pseudonymize_key is not None:
            return self.engine.map_user(text)  # the model only ever saw pseudonyms
        return self.known_as(text, self.model.user_vector)

    def resolve_item(self, text: str) -> Id:
        """The item a URL names, as the model stores it."""
        self.check_id(text)
        return self.known_as(text, self.model.item_vector)

    def presented_key(self, conn: Request | WebSocket) -> str | None:
        """The key the client presented (header, ``?key=`` or bearer token), if any."""
        key = conn.headers.get("x-recstream-key") or conn.query_params.get("key")
        auth = conn.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key

    def require_producer(self, conn: Request | WebSocket) -> bool:
        """Checks the sender may send events; returns whether it may also send erasures and
        item writes (it holds the admin key, or the server runs without keys)."""
        if not self.config.auth_enabled:
            return True
        key = self.presented_key(conn)
        if self.config.admin_key and key_matches(key, (self.config.admin_key,)):
            return True
        if key_matches(key, self.config.producer_keys):
            return False
        raise AuthError("a producer key is required (X-Recstream-Key)")

    def require_admin(self, conn: Request | WebSocket) -> None:
        """Refuses (AuthError) a client without the admin key while auth is on."""
        if self.config.auth_enabled and not key_matches(
            self.presented_key(conn), (self.config.admin_key,) if self.config.admin_key else ()
        ):
            raise AuthError("the admin key is required (X-Recstream-Key)")

    def require_reader(self, conn: Request | WebSocket, user: Id | None) -> None:
        """Reading a user's list: that user's token, or any producer or admin key."""
        if not self.config.auth_enabled:
            return
        keys = self.config.producer_keys + (
            (self.config.admin_key,) if self.config.admin_key else ()
        )
        if key_matches(self.presented_key(conn), keys):
            return
        token = conn.query_params.get("token")
        if token is None or user is None:
            raise AuthError("a subscription token (?token=) or a key is required")
        assert self.config.token_secret is not None
        verify_token(self.config.token_secret, token, user)

    def int_param(
        self, conn: Request | WebSocket, name: str, default: int, lo: int, hi: int
    ) -> int:
        """An integer query parameter in ``lo..hi`` (``default`` when absent)."""
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

    def float_param(
        self, conn: Request | WebSocket, name: str, lo: float, hi: float
    ) -> float | None:
        """A number query parameter in ``lo..hi`` (None when absent)."""
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

    def names_param(self, conn: Request | WebSocket, name: str) -> list[str]:
        """A comma-separated query parameter as a list of names."""
        raw = conn.query_params.get(name)
        return [x for x in raw.split(",") if x] if raw else []

    def list_param(self, conn: Request | WebSocket, name: str) -> list[Id]:
        """A comma-separated query parameter as a list of item ids."""
        raw = conn.query_params.get(name)
        return [self.resolve_item(x) for x in raw.split(",") if x] if raw else []

    def flag(self, conn: Request | WebSocket, name: str) -> bool:
        """A boolean query parameter (``1``, ``true``, ``yes``)."""
        return conn.query_params.get(name, "0").lower() in ("1", "true", "yes")

    async def read_body(self, request: Request) -> bytes:
        """The request body; TooLarge past ``max_body_bytes`` (read no further)."""
        declared = request.headers.get("content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.config.max_body_bytes
        ):
            raise TooLarge()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.config.max_body_bytes:
                raise TooLarge()
        return bytes(body)

    async def ingest(
        self, payload: Any, tag: str, source: str, allow_admin: bool = True
    ) -> tuple[int, int]:
        """Submits JSON events; returns (events accepted, seq) once durable."""
        frame, n = json_to_frame(
            payload, tag, self.config.max_events_per_request, allow_admin=allow_admin
        )
        seq = await self.engine.submit(frame, source)
        return n, seq

    def reader_id(self, text: str, user: Id) -> Id:
        """The id a subscription token names: the raw one when ids are pseudonymised."""
        return text if self.config.pseudonymize_key is not None else user
