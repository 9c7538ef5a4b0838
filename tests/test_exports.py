"""The public surface of ``engine`` and ``connectors``: exactly these names, each documented.

A name added to or removed from an ``__all__`` must be added to or removed from the lists
here too, so the public API changes only on purpose.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

import connectors
import engine

PUBLIC = {
    "engine": {
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
    },
    "engine.datasets": {
        "EVENT_TYPES",
        "FORMATS",
        "Dataset",
        "EventBatch",
        "Stream",
        "SyntheticConfig",
        "add_load_arguments",
        "generate",
        "iter_events",
        "load",
        "load_csv",
        "load_from_args",
        "load_movielens",
        "load_tsv",
        "write_tsv",
    },
    "connectors": {"Node", "serve"},
    "connectors.cli": {"main"},
    "connectors.client": {
        "ForwardProducer",
        "HandshakeRefused",
        "pack_entries",
        "subscribe",
    },
    "connectors.forward": {"ForwardServer"},
    "connectors.http": {"build_app"},
    "connectors.node": {"Node", "serve"},
    "connectors.redis_streams": {
        "NODE_ID_FILE",
        "LogGap",
        "RedisLogConfig",
        "RedisStreamsLog",
        "StreamId",
        "decode_position",
        "encode_position",
        "fetch_snapshot",
        "node_id_for",
        "parse_log_url",
        "partition_keys",
        "partition_of",
    },
    "connectors.websocket": {"events_socket", "recommendations_socket"},
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_lists_exactly_the_public_names(name: str) -> None:
    module = _module(name)
    assert set(module.__all__) == PUBLIC[name]
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_exists_and_is_documented(name: str) -> None:
    module = _module(name)
    assert inspect.getdoc(module), f"{name} has no docstring"
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr} is listed but missing"
        obj = getattr(module, attr)
        if inspect.isclass(obj) or callable(obj):
            # Its own docstring, not one inherited from a base class.
            assert obj.__doc__ and obj.__doc__.strip(), f"{name}.{attr} has no docstring"
        else:
            # A constant: the module's docstring must name it.
            assert attr in (module.__doc__ or ""), f"{name}.{attr} is not described"


def test_the_packages_underscore_names_stay_private() -> None:
    """``from engine import *`` gives the public names only: no helper leaks through."""
    for module in (engine, connectors):
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import *", namespace)  # noqa: S102 - a fixed module name
        assert set(namespace) - {"__builtins__"} == PUBLIC[module.__name__]
