"""Recovery: the newest usable snapshot, and what a restart rebuilds from the local journal.

Snapshots: ``snapshot.rsnap`` is the newest, ``snapshot.prev.rsnap`` the one before. A damaged
newest file falls back to the previous one; the log keeps everything the older one does not
cover (see ``engine._snapshots``).

Configuration on restart: the snapshot carries the settings the model was built with; the
configured ones replace them where a running model can follow (event types and weights, the
Forward frame limit, decay, regularisation, re-ranking, the redelivery window, growing history
caps, ``ef_search``...). A setting the stored state depends on (``dim``, ``hnsw_m``,
``ef_construction``, ``trending_half_life``, shrinking history caps) refuses the start with a
:class:`ConfigError` naming it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import attrs

from ._config import ServerConfig
from ._core import CorruptSnapshot
from ._exceptions import ConfigError
from ._journal import FileOps, RecoveryReport
from ._log import JournalLog, replay_chunk
from ._model import Model, ModelConfig
from ._model_actor import REPLAY_MERGE_BYTES, apply_records

__all__ = ["PREVIOUS_SNAPSHOT", "SNAPSHOT", "Loaded", "Recovered", "load_snapshot", "recover"]

log = logging.getLogger("recstream.recovery")

SNAPSHOT = "snapshot.rsnap"
PREVIOUS_SNAPSHOT = "snapshot.prev.rsnap"


@attrs.frozen
class Loaded:
    """The model a start begins from.

    Attributes:
        model: The model of the newest usable snapshot, or an empty one.
        seq: The engine seq the snapshot covers (0: no snapshot).
        position: The log position stored with it (empty for the local journal).
    """

    model: Model
    seq: int
    position: bytes


def load_snapshot(data_dir: Path, config: ModelConfig) -> Loaded:
    """Loads the newest usable snapshot in ``data_dir`` (blocking).

    Raises:
        ConfigError: ``config`` does not fit the stored model.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in (SNAPSHOT, PREVIOUS_SNAPSHOT):
        path = data_dir / name
        if not path.exists():
            continue
        try:
            model = Model.load(path, config)
        except CorruptSnapshot as e:
            log.error("snapshot %s unusable (%s); trying the previous one", path, e)
            continue
        except ValueError as e:
            raise ConfigError(
                f"the configuration does not fit the model stored in {data_dir}: {e}; "
                "set it back, or start from an empty data directory"
            ) from None
        except OSError as e:
            log.error("snapshot %s unusable (%s); trying the previous one", path, e)
            continue
        seq = model.loaded_wal_seq
        position = bytes(getattr(model, "loaded_log_position", b""))
        log.info("loaded %s at journal seq %d", path, seq)
        return Loaded(model, seq, position)
    return Loaded(Model(config), 0, b"")


@attrs.frozen
class Recovered:
    """What :func:`recover` rebuilt.

    Attributes:
        model: The model as a restart would serve it.
        seq: The last journal seq it reflects.
        journal: What opening the journal found and cut.
        interrupted_erasures: Erasures a restart would complete (user -> erase record seq).
    """

    model: Model
    seq: int
    journal: RecoveryReport
    interrupted_erasures: dict[str | int, int]


def recover(config: ServerConfig, *, file_ops: FileOps | None = None) -> Recovered:
    """Rebuilds, offline and blocking, the model a restart on ``config.data_dir`` with the
    local journal would serve: the newest usable snapshot, then the journal after it.

    For checks after a crash and for tools; a running engine recovers through its log.

    Raises:
        ConfigError: ``config`` does not fit the stored model.
        JournalLocked: A running engine holds the journal.
    """
    loaded = load_snapshot(config.data_dir, config.model)
    wal = JournalLog(
        config.data_dir / "wal",
        sync=config.sync,
        interval_ms=config.sync_interval_ms,
        segment_bytes=config.wal_segment_bytes,
        file_ops=file_ops,
    )
    journal = wal.open()
    began, seq = time.perf_counter(), loaded.seq
    try:
        records = journal.replay(after_seq=0)
        erasures = wal.interrupted_erasures
        while chunk := replay_chunk(records, loaded.seq, erasures, max_bytes=REPLAY_MERGE_BYTES):
            payloads = [p for _, p in chunk]
            apply_records(loaded.model, chunk[0][0], payloads, collect=False, replay=True)
            seq = chunk[-1][0]
    finally:
        journal.close(sync=False)
    loaded.model.reindex(None)
    assert wal.recovery is not None
    log.info("recovered to seq %d in %.3f s", seq, time.perf_counter() - began)
    return Recovered(
        loaded.model, max(seq, journal.last_seq), wal.recovery, wal.interrupted_erasures
    )
