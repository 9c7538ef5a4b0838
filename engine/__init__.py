"""recstream's engine: the model, the log, the actors and their composition.

:class:`Engine` is what the outside uses: it recovers, applies what its :class:`Log` forwards,
and answers :meth:`Engine.submit`, :meth:`Engine.erase_user`, :meth:`Engine.stats` and the
model's queries. Listeners (HTTP, websockets, Fluent Forward) and the command line live in
the ``connectors`` package, which uses only the names exported here; ``engine`` never
imports ``connectors``.

Layout: implementations live in ``_``-prefixed modules: ``_core`` is the Rust extension
(online eALS, HNSW, Forward decoding, snapshots), ``_engine`` the composition, ``_log`` the
log protocol and the local journal (``_journal``, ``_journal_actor``), ``_model_actor``,
``_index_actor``, ``_publisher``, ``_snapshots``, ``_erasure`` the actors, ``_messages`` what
they send each other, ``_worker`` their hop to a worker thread, ``_recovery`` the start.
``engine.datasets`` holds the synthetic and recorded event streams used by tests, demos and
benchmarks.

``DEFAULT_EVENT_WEIGHTS`` maps the built-in event types to the weight an event of that type
gives an interaction (``ModelConfig.event_weights`` starts from it). ``SNAPSHOT`` is the file
name of the newest snapshot in a data directory (a node joining a shared log fetches a peer's).
``write_text_frame`` writes a pushed message to a websocket's socket in one call (the
connectors' direct push).
"""

from ._config import ServerConfig as ServerConfig
from ._config import load_config as load_config
from ._config import parse_hostport as parse_hostport
from ._core import CorruptSnapshot as CorruptSnapshot
from ._core import IncompleteFrame as IncompleteFrame
from ._core import Index as Index
from ._core import InvalidEvent as InvalidEvent
from ._core import InvalidFrame as InvalidFrame
from ._core import UnknownItem as UnknownItem
from ._core import write_text_frame as write_text_frame
from ._engine import Engine as Engine
from ._events import json_to_frame as json_to_frame
from ._exceptions import AuthError as AuthError
from ._exceptions import BadRequest as BadRequest
from ._exceptions import ConfigError as ConfigError
from ._exceptions import Forbidden as Forbidden
from ._exceptions import InvalidEvents as InvalidEvents
from ._exceptions import JournalClosed as JournalClosed
from ._exceptions import JournalFailed as JournalFailed
from ._exceptions import RecstreamError as RecstreamError
from ._exceptions import TooManySubscribers as TooManySubscribers
from ._frames import drop_users as drop_users
from ._journal import FaultyFileOps as FaultyFileOps
from ._journal import FileOps as FileOps
from ._log import JournalLog as JournalLog
from ._log import Log as Log
from ._messages import Appended as Appended
from ._metrics import Metrics as Metrics
from ._model import DEFAULT_EVENT_WEIGHTS as DEFAULT_EVENT_WEIGHTS
from ._model import Model as Model
from ._model import ModelConfig as ModelConfig
from ._publisher import Push as Push
from ._publisher import Subscription as Subscription
from ._publisher import rec_json as rec_json
from ._recovery import SNAPSHOT as SNAPSHOT
from ._recovery import Recovered as Recovered
from ._recovery import recover as recover

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "Appended",
    "AuthError",
    "BadRequest",
    "ConfigError",
    "CorruptSnapshot",
    "Engine",
    "FaultyFileOps",
    "FileOps",
    "Forbidden",
    "IncompleteFrame",
    "Index",
    "InvalidEvent",
    "InvalidEvents",
    "InvalidFrame",
    "JournalClosed",
    "JournalFailed",
    "JournalLog",
    "Log",
    "Metrics",
    "Model",
    "ModelConfig",
    "Push",
    "Recovered",
    "RecstreamError",
    "SNAPSHOT",
    "ServerConfig",
    "Subscription",
    "TooManySubscribers",
    "UnknownItem",
    "drop_users",
    "json_to_frame",
    "load_config",
    "parse_hostport",
    "rec_json",
    "recover",
    "write_text_frame",
]
