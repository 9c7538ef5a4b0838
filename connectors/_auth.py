"""Keys and subscription tokens.

Three kinds of credential, each checked at its own door:

* producer keys — may send events (HTTP header ``X-Recstream-Key``, websocket ``key`` query
  parameter or header, Fluent Forward shared key);
* the admin key — may erase users and write item attributes;
* subscription tokens — ``recstream token USER`` signs ``(user, expiry)`` with the server's
  secret (HMAC-SHA256); a token lets its holder subscribe to that user's list until it expires,
  and to no other user's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from engine import AuthError

__all__ = ["issue_token", "verify_token", "key_matches"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: bytes, user: str | int, ttl: float, now: float | None = None) -> str:
    """A token for subscribing to ``user``'s recommendations for ``ttl`` seconds.

    The user id keeps its type (``7`` and ``"7"`` are different users), so the payload is JSON.
    """
    if not secret:
        raise ValueError("no token secret is configured")
    expires = int((time.time() if now is None else now) + ttl)
    payload = json.dumps([user, expires], separators=(",", ":")).encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify_token(secret: bytes, token: str, user: str | int, now: float | None = None) -> None:
    """Raises :class:`AuthError` unless ``token`` is a valid, unexpired token for ``user``."""
    try:
        payload_b64, mac_b64 = token.split(".")
        payload = _unb64(payload_b64)
        mac = _unb64(mac_b64)
    except ValueError as e:
        raise AuthError("malformed token") from e
    expected = hmac.new(secret, payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise AuthError("token signature does not match")
    token_user, expires = json.loads(payload)
    if token_user != user or type(token_user) is not type(user):
        raise AuthError("token is for another user")
    if (time.time() if now is None else now) > expires:
        raise AuthError("token has expired")


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Whether ``presented`` equals one of ``keys`` (constant time per key).

    An empty or blank key never matches, presented or configured: ``?key=`` must not open a
    door that a configuration mistake left keyed with "".
    """
    if presented is None or not presented.strip():
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters.
    p = presented.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(p, k.encode()) for k in keys if k.strip())
