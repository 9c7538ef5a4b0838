"""recstream: a real-time recommendation engine.

Layout: the public names are re-exported here; implementations live in ``_``-prefixed modules.
``engine._core`` is the Rust extension (online eALS, HNSW, Forward decoding, snapshots);
``engine._model`` the model's configuration; ``engine._server`` the server and its actors;
``engine._synthetic`` and ``engine._datasets`` event streams for tests, demos and benchmarks.
``engine.client`` (a Forward producer and a subscriber) is public as a module.
"""

from ._config import ServerConfig as ServerConfig
from ._config import load_config as load_config
from ._core import CorruptSnapshot as CorruptSnapshot
from ._core import IncompleteFrame as IncompleteFrame
from ._core import Index as Index
from ._core import InvalidEvent as InvalidEvent
from ._core import InvalidFrame as InvalidFrame
from ._core import UnknownItem as UnknownItem
from ._datasets import FORMATS as DATASET_FORMATS
from ._datasets import Dataset as Dataset
from ._datasets import load as load_dataset
from ._exceptions import RecstreamError as RecstreamError
from ._model import DEFAULT_EVENT_WEIGHTS as DEFAULT_EVENT_WEIGHTS
from ._model import Model as Model
from ._model import ModelConfig as ModelConfig
from ._server import Server as Server
from ._server import serve as serve
from ._synthetic import EVENT_TYPES as EVENT_TYPES
from ._synthetic import EventBatch as EventBatch
from ._synthetic import Stream as Stream
from ._synthetic import SyntheticConfig as SyntheticConfig
from ._synthetic import generate as generate_stream
from ._synthetic import iter_events as iter_events
from ._synthetic import write_tsv as write_tsv

__all__ = [
    "DATASET_FORMATS",
    "DEFAULT_EVENT_WEIGHTS",
    "EVENT_TYPES",
    "CorruptSnapshot",
    "Dataset",
    "EventBatch",
    "IncompleteFrame",
    "Index",
    "InvalidEvent",
    "InvalidFrame",
    "Model",
    "ModelConfig",
    "RecstreamError",
    "Server",
    "ServerConfig",
    "Stream",
    "SyntheticConfig",
    "UnknownItem",
    "generate_stream",
    "iter_events",
    "load_config",
    "load_dataset",
    "serve",
    "write_tsv",
]
