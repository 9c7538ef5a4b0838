"""Event streams for tests, demos and benchmarks: not part of serving.

Two sources of (user, item, weight, time) events:

* a synthetic generator (:class:`SyntheticConfig`, :func:`generate`, :func:`iter_events`)
  with drifting tastes, popularity skew and categories, whose ground truth is known;
* loaders of recorded interaction files (:func:`load`: TSV, MovieLens ``ratings.dat``/
  ``ratings.csv``, generic CSV), returning a :class:`Dataset`.

``EVENT_TYPES`` are the event types the generator emits, ``FORMATS`` the file formats
:func:`load` reads. ``python -m engine._synthetic`` writes a synthetic stream as TSV.
"""

from ._datasets import FORMATS as FORMATS
from ._datasets import Dataset as Dataset
from ._datasets import add_load_arguments as add_load_arguments
from ._datasets import load as load
from ._datasets import load_csv as load_csv
from ._datasets import load_from_args as load_from_args
from ._datasets import load_movielens as load_movielens
from ._datasets import load_tsv as load_tsv
from ._synthetic import EVENT_TYPES as EVENT_TYPES
from ._synthetic import EventBatch as EventBatch
from ._synthetic import Stream as Stream
from ._synthetic import SyntheticConfig as SyntheticConfig
from ._synthetic import generate as generate
from ._synthetic import iter_events as iter_events
from ._synthetic import write_tsv as write_tsv

__all__ = [
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
]
