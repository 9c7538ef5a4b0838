"""Type stubs of the Rust extension. See ``engine.Model`` in the README for the guide."""

from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

Id = str | int

BUILD_PROFILE: str

class InvalidEvent(ValueError):
    """An event was refused (bad id, weight, type or time); `ingest` applied none of the batch."""

class InvalidFrame(ValueError):
    """Bytes that can never become a valid Forward frame: close the connection."""

class IncompleteFrame(ValueError):
    """A Forward frame was cut short: more bytes are needed."""

class UnknownItem(KeyError):
    """The item id has never been seen by the model."""

class CorruptSnapshot(ValueError):
    """A snapshot file is damaged, truncated or of another format version."""

class Report(TypedDict):
    applied: int
    duplicates: int
    rejected: list[tuple[int, str]]
    users: list[tuple[Id, Id | None]]
    erased: list[Id]

class FrameReport(Report):
    chunk: str | None
    consumed: int

class FrameCheck(TypedDict):
    used: int
    entries: int
    rejected: list[tuple[int, str]]
    admin: list[int]
    chunk: str | None
    tag: str

class Rec(TypedDict, total=False):
    """An entry of ``recommend(..., detail=True)``; ``because`` only with ``explain=True``."""

    item: Id
    score: float
    explore: bool
    because: list[Id]

class Stats(TypedDict):
    events_applied: int
    duplicates: int
    rejected: int
    users: int
    items: int
    index_size: int
    index_stale: int
    newest_ts: float

class Model:
    loaded_wal_seq: int
    loaded_log_position: bytes
    def __init__(self, config: Any = None) -> None: ...
    def ingest(
        self,
        users: Sequence[Id] | npt.NDArray[np.int64],
        items: Sequence[Id] | npt.NDArray[np.int64],
        weights: Sequence[float] | npt.NDArray[np.float64] | None = None,
        types: Sequence[str | None] | None = None,
        ts: Sequence[float] | npt.NDArray[np.float64] | None = None,
        ids: Sequence[Id] | None = None,
        producer: str = "",
    ) -> Report: ...
    def ingest_forward(self, frame: bytes, accepted_at: float | None = None) -> FrameReport: ...
    def apply_journal(
        self,
        payloads: Sequence[bytes],
        collect: bool = True,
        users: bool = True,
        replay: bool = False,
    ) -> list[
        str
        | tuple[
            float,
            int,
            int,
            tuple[tuple[int, str], ...],
            tuple[tuple[Id, Id | None], ...],
            tuple[Id, ...],
        ]
        | None
    ]: ...
    def check_frame(self, buf: bytes, offset: int = 0) -> FrameCheck | None: ...
    def check_frames(
        self, buf: bytes, offset: int = 0, end: int | None = None
    ) -> tuple[list[FrameCheck], str | None]: ...
    def recommend(
        self,
        user: Id,
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Iterable[Id] | None = None,
        category: str | None = None,
        exact: bool = False,
        explain: bool = False,
        ef: int | None = None,
        *,
        exclude_category: Sequence[str] | None = None,
        diversity: float | None = None,
        exploration: float | None = None,
        detail: bool = False,
    ) -> list[Any]: ...
    def recommend_batch(
        self,
        users: Sequence[Id],
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Iterable[Id] | None = None,
        category: str | None = None,
        exact: bool = False,
        explain: bool = False,
        ef: int | None = None,
        *,
        exclude_category: Sequence[str] | None = None,
        diversity: float | None = None,
        exploration: float | None = None,
        detail: bool = False,
    ) -> list[list[Any]]: ...
    def recommend_batch_json(
        self,
        users: Sequence[Id],
        k: int = 10,
        exclude_seen: bool = True,
        exclude: Iterable[Id] | None = None,
        category: str | None = None,
        exact: bool = False,
        explain: bool = False,
        ef: int | None = None,
        *,
        exclude_category: Sequence[str] | None = None,
        diversity: float | None = None,
        exploration: float | None = None,
    ) -> list[tuple[list[Id], str]]: ...
    def trending(self, k: int = 10, category: str | None = None) -> list[tuple[Id, float]]: ...
    def similar(self, item: Id, k: int = 10) -> list[tuple[Id, float]]: ...
    def erase_user(self, user: Id) -> bool: ...
    def upsert_item(
        self,
        item: Id,
        tags: Sequence[str] | None = None,
        category: str | None = None,
        available: bool | None = None,
    ) -> None: ...
    def fit(self, iterations: int) -> None: ...
    def reindex(self, budget: int | None = None) -> int: ...
    def user_vector(self, user: Id) -> npt.NDArray[np.float32] | None: ...
    def item_vector(self, item: Id) -> npt.NDArray[np.float32] | None: ...
    def seen(self, user: Id) -> list[Id]: ...
    def stats(self) -> Stats: ...
    def config(self) -> dict[str, Any]: ...
    def save(
        self, path: str | PathLike[str], wal_seq: int = 0, log_position: bytes = b""
    ) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str], config: Any = None) -> Model: ...

def default_config() -> dict[str, Any]: ...
def write_text_frame(fd: int, text: str, limit: int) -> int: ...

class Index:
    def __init__(
        self, dim: int, m: int = 16, ef_construction: int = 200, ef_search: int = 64, seed: int = 42
    ) -> None: ...
    def add(self, ids: npt.NDArray[np.uint32], vectors: npt.NDArray[np.float32]) -> None: ...
    def delete(self, id: int) -> bool: ...
    def search(
        self, query: npt.NDArray[np.float32], k: int, ef: int | None = None
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...
    def search_batch(
        self, queries: npt.NDArray[np.float32], k: int, ef: int | None = None
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...
    def __len__(self) -> int: ...
    def check_invariants(self) -> None: ...
    def save(self, path: str | PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str]) -> Index: ...

def exact_search_batch(
    matrix: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...
