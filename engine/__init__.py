"""recstream: a real-time recommendation engine.

Layout: the public names are re-exported here; implementations live in ``_``-prefixed modules.
``engine._core`` is the Rust extension (online eALS, HNSW, Forward decoding, snapshots);
``engine._model`` holds the model's configuration.
"""

from ._core import CorruptSnapshot as CorruptSnapshot
from ._core import IncompleteFrame as IncompleteFrame
from ._core import InvalidEvent as InvalidEvent
from ._core import InvalidFrame as InvalidFrame
from ._core import UnknownItem as UnknownItem
from ._model import DEFAULT_EVENT_WEIGHTS as DEFAULT_EVENT_WEIGHTS
from ._model import Model as Model
from ._model import ModelConfig as ModelConfig

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "CorruptSnapshot",
    "IncompleteFrame",
    "InvalidEvent",
    "InvalidFrame",
    "Model",
    "ModelConfig",
    "UnknownItem",
]
