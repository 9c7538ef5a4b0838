"""The server's configuration: defaults that run with zero set-up, a TOML file, environment.

Precedence: command-line flags > environment (``RECSTREAM_*``) > config file > defaults.
Secrets (keys, the token secret) are best given by the environment or a file readable only by
the service account.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import secrets
import tomllib
from pathlib import Path
from typing import Any

import attrs

from ._exceptions import ConfigError
from ._experiments import Variant, check_variants
from ._journal import SyncPolicy
from ._model import ModelConfig

__all__ = ["ServerConfig", "load_config", "parse_hostport"]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``"[v6]:PORT"``) to a pair; raises ConfigError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_positive_or_none = attrs.validators.optional(attrs.validators.gt(0))


def _no_blank_keys(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Refuses an empty or all-blank key or secret: one would let anyone in (``?key=``)."""
    keys = value if isinstance(value, tuple | list) else (value,)
    for key in keys:
        if key is not None and not (key.strip() if isinstance(key, str | bytes) else True):
            raise ConfigError(
                f"{attribute.name} has an empty or blank key; remove it or set a real one"
            )


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything ``recstream serve`` needs; every field has a working default.

    Attributes:
        data_dir: Journal, snapshots and the token secret live here.
        http_host, http_port: HTTP and websocket listener.
        forward_host, forward_port: Fluent Forward listener.
        producer_keys: Keys allowed to send events; the Forward shared key is any of them (or
            the admin key). Empty or blank keys are refused when the configuration loads.
        admin_key: Key for erasing users and writing item attributes: records that erase or
            write items are refused (HTTP 403, a websocket error, a closed Forward
            connection) unless sent with it, while auth is on.
        token_secret: Signs subscription tokens; generated and kept in ``data_dir`` if unset.
        insecure: Serve without any key. Allowed implicitly only when no key is configured
            and every listener is on loopback (a warning is logged); a non-loopback listener
            without keys refuses to start unless this is set explicitly.
        sync: Journal durability: "batch" (fsync every group commit, the default),
            "interval" (at most every ``sync_interval_ms``), "off".
        apply_before_sync: Hand each journaled group to the model as soon as it is written,
            while its sync runs (default): pushes do not wait for the disk, and may reflect
            an event that is not durable yet; producers are still acknowledged only after
            the sync. False: the strict order (apply, then push, only once durable).
        snapshot_interval: Seconds between snapshots (journal segments before one are deleted).
        push_k: Default list length for subscribers.
        refresh_interval: Age in seconds at which a subscribed list is recomputed to catch
            drift caused by other users' events (see ``engine.Publisher``).
        refresh_budget: Lists recomputed for drift per quarter ``refresh_interval`` at most.
        drift_rank_slack: A drift recompute is pushed only when the list's membership
            changed or an item moved more than this many places.
        max_subscribers: Websocket subscriptions accepted at once.
        send_timeout: Seconds a push may take before the subscriber is dropped as stuck.
        direct_push: Let the publisher write a push straight to the subscriber's socket when
            nothing else is writing to it (``connectors._direct``); False: every push goes
            through the websocket layer's own send, from the subscriber's task.
        tcp_user_timeout_ms: Set on the listening sockets so the kernel drops peers that stop
            acknowledging data (a stuck reader cannot hold a connection forever).
        max_body_bytes: Largest HTTP body and websocket message accepted.
        max_forward_connections, max_http_connections: Connections each listener serves at
            once (HTTP counts websockets); one more is closed on arrival. None: derived from
            the open-file limit (raised to its hard limit at start), which is split between
            the two listeners after a reserve for the journal and snapshots.
        idle_timeout: Seconds a connection may go without progress before it is closed: a
            Forward connection without a complete frame, a websocket producer without a
            message, an HTTP connection between requests or stalled inside one, a subscriber
            that stops answering pings (sent every third of this).
        max_decompressing_bytes: Bytes that gzip-compressed Forward frames may decompress to
            at once, all connections together; a frame waits for its share. At least
            ``model.max_decompressed_bytes``.
        max_events_per_request: Events in one HTTP request or websocket message.
        variants: A/B variants (``[[variants]]`` tables with ``name``, ``share`` and overrides
            such as ``k``, ``diversity``, ``exploration``); empty: no experiment.
        experiment_salt: Mixed into the stable hash that assigns users to variants.
        attribution_window: Seconds after an impression in which an interaction with a shown
            item is credited to its variant.
        impressions_per_user: Impressions remembered per user for attribution.
        experiment_max_users: Users whose impressions are remembered (least recent go first).
        pseudonymize_key: When set, every user id is replaced by HMAC-SHA256(key, id) (hex,
            32 characters) before anything is journaled, and ids in requests are mapped the
            same way, so raw user ids never reach the disk.
        model: The model's settings.
    """

    data_dir: Path = Path("recstream-data")
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    forward_host: str = "127.0.0.1"
    forward_port: int = 24224
    producer_keys: tuple[str, ...] = attrs.field(default=(), validator=_no_blank_keys)
    admin_key: str | None = attrs.field(default=None, validator=_no_blank_keys)
    token_secret: bytes | None = attrs.field(default=None, validator=_no_blank_keys)
    insecure: bool = False
    sync: SyncPolicy = attrs.field(
        default="batch", validator=attrs.validators.in_(("batch", "interval", "off"))
    )
    sync_interval_ms: float = 5.0
    apply_before_sync: bool = attrs.field(
        default=True, validator=attrs.validators.instance_of(bool)
    )
    wal_segment_bytes: int = 64 * 1024 * 1024
    snapshot_interval: float = 300.0
    push_k: int = 10
    refresh_interval: float = attrs.field(default=0.15, validator=attrs.validators.gt(0))
    refresh_budget: int = attrs.field(default=250, validator=attrs.validators.ge(1))
    drift_rank_slack: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    max_subscribers: int = 10_000
    send_timeout: float = 10.0
    direct_push: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    tcp_user_timeout_ms: int = 10_000
    max_body_bytes: int = 4 * 1024 * 1024
    max_events_per_request: int = 10_000
    max_forward_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_http_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    idle_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    max_decompressing_bytes: int = attrs.field(
        default=64 * 1024 * 1024, validator=attrs.validators.gt(0)
    )
    variants: tuple[Variant, ...] = attrs.field(default=(), converter=check_variants)
    experiment_salt: str = "recstream"
    attribution_window: float = 1800.0
    impressions_per_user: int = 8
    experiment_max_users: int = 100_000
    pseudonymize_key: bytes | None = attrs.field(default=None, validator=_no_blank_keys)
    model: ModelConfig = attrs.field(factory=lambda: ModelConfig(auto_reindex=False))

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must present keys or tokens."""
        return not self.insecure

    def check(self) -> ServerConfig:
        """Applies the protected-mode rule; returns the config to run with.

        Raises:
            ConfigError: a listener is reachable from other hosts but no key is configured.
        """
        has_keys = bool(self.producer_keys or self.admin_key)
        if has_keys or self.insecure:
            return self
        public = [h for h in (self.http_host, self.forward_host) if not _is_loopback(h)]
        if public:
            raise ConfigError(
                f"listening on {', '.join(public)} without any key: set RECSTREAM_PRODUCER_KEYS "
                "and RECSTREAM_ADMIN_KEY, or pass --insecure to serve anyone who connects"
            )
        return attrs.evolve(self, insecure=True)

    def with_token_secret(self) -> ServerConfig:
        """Fills ``token_secret`` from ``data_dir/token_secret``, creating it (mode 0600)."""
        if self.token_secret:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "token_secret"
        try:
            secret = path.read_bytes().strip()
            if not secret:
                raise ConfigError(f"{path} is empty: delete it to have a new secret generated")
        except FileNotFoundError:
            secret = secrets.token_hex(32).encode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
        return attrs.evolve(self, token_secret=secret)


_ENV: dict[str, tuple[str, Any]] = {
    "RECSTREAM_DATA_DIR": ("data_dir", Path),
    "RECSTREAM_PRODUCER_KEYS": ("producer_keys", lambda s: tuple(s.split(","))),
    "RECSTREAM_ADMIN_KEY": ("admin_key", str),
    "RECSTREAM_TOKEN_SECRET": ("token_secret", str.encode),
    "RECSTREAM_SYNC": ("sync", str),
    "RECSTREAM_PSEUDONYMIZE_KEY": ("pseudonymize_key", str.encode),
}


def _check_keys(data: dict[str, Any], allowed: Any, where: str) -> None:
    """Raises ConfigError naming every key of ``data`` not in ``allowed`` (with a guess)."""
    names = sorted(allowed)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {key!r} {where}{hint}")


def load_config(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> ServerConfig:
    """Builds a ServerConfig from a TOML file, the environment and explicit overrides.

    The TOML file holds the field names of :class:`ServerConfig` at the top level and the
    model's under ``[model]``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: {e}") from None
        model = data.pop("model", None)
        _check_keys(data, {a.name for a in attrs.fields(ServerConfig)}, f"in {path}")
        if model is not None:
            if not isinstance(model, dict):
                raise ConfigError(f"{path}: [model] must be a table")
            _check_keys(model, {a.name for a in attrs.fields(ModelConfig)}, f"in [model] of {path}")
            try:
                values["model"] = ModelConfig(**{"auto_reindex": False, **model})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}: bad [model] setting: {e}") from None
        variants = data.pop("variants", None)
        if variants is not None:
            values["variants"] = tuple(Variant.from_dict(v) for v in variants)
        values.update(data)
    for name, (field, conv) in _ENV.items():
        raw = (os.environ if env is None else env).get(name)
        if raw:
            values[field] = conv(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    if isinstance(values.get("pseudonymize_key"), str):
        values["pseudonymize_key"] = values["pseudonymize_key"].encode()
    if "producer_keys" in values:
        values["producer_keys"] = tuple(values["producer_keys"])
    try:
        return ServerConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad configuration: {e}") from e
