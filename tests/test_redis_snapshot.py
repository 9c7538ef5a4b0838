"""The snapshot's log position (the shared log's place beside the node's own ``wal_seq``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import CorruptSnapshot, Model


def test_log_position_round_trips_through_a_snapshot_file(tmp_path: Path) -> None:
    m = Model()
    m.ingest(["u1", "u2"], ["i1", "i2"], ids=["e1", "e2"], producer="p")
    position = b"\x81\xb2recstream:{l-0}:p0\xaf1700000000000-3"
    path = tmp_path / "snap.rsnap"
    m.save(path, 12, log_position=position)
    loaded = Model.load(path)
    assert (loaded.loaded_wal_seq, loaded.loaded_log_position) == (12, position)
    assert loaded.stats()["events_applied"] == 2
    # Without one (the local journal), the position is empty.
    m.save(path, wal_seq=3)
    assert (Model.load(path).loaded_wal_seq, Model.load(path).loaded_log_position) == (3, b"")
    assert Model().loaded_log_position == b""


def test_an_oversized_log_position_is_refused_and_the_old_snapshot_stays(tmp_path: Path) -> None:
    m = Model()
    path = tmp_path / "snap.rsnap"
    m.save(path, 1, log_position=b"ok")
    with pytest.raises(ValueError):
        m.save(path, 2, log_position=b"x" * ((1 << 20) + 1))
    assert Model.load(path).loaded_log_position == b"ok"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptSnapshot):
        Model.load(path)
