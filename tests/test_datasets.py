"""Tests of the dataset loaders (engine._datasets) on small files written here."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from engine import _datasets
from engine._datasets import load, load_csv, load_movielens, load_tsv
from engine._synthetic import SyntheticConfig, generate, write_tsv

U_DATA = (
    "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n244\t51\t2\t880606923\n"
)
RATINGS_CSV = (
    "userId,movieId,rating,timestamp\n1,307,3.5,1256677221\n1,481,3.5,1256677456\n"
    "2,1091,1.5,1256677471\n3,307,4.0,1256677000\n"
)


def test_write_tsv_then_load_gives_identical_arrays(tmp_path: Path) -> None:
    stream = generate(SyntheticConfig(n_users=300, n_items=200, n_events=20_000, seed=4))
    path = tmp_path / "stream.tsv"
    assert write_tsv(stream, path) == len(stream)
    for loaded in (load_tsv(path), load(path)):
        for name in ("users", "items", "weights", "ts"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(stream, name), name)
        assert loaded.users.dtype == np.int64 and loaded.items.dtype == np.int64
        assert loaded.weights.dtype == np.float32 and loaded.ts.dtype == np.float64
        assert loaded.types is None and loaded.user_ids is None


def test_tsv_round_trip_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_datasets, "BLOCK_BYTES", 97)  # many blocks, cut mid-line
    stream = generate(SyntheticConfig(n_users=50, n_items=40, n_events=500, seed=2))
    path = tmp_path / "stream.tsv"
    write_tsv(stream, path, comment="small")
    loaded = load_tsv(path)
    np.testing.assert_array_equal(loaded.items, stream.items)
    np.testing.assert_array_equal(loaded.ts, stream.ts)


def test_movielens_u_data(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text(U_DATA)
    data = load(path)  # "auto" recognises u.data
    # Sorted by time.
    np.testing.assert_array_equal(data.ts, [878887116, 880606923, 881250949, 891717742])
    np.testing.assert_array_equal(data.users, [22, 244, 196, 186])
    np.testing.assert_array_equal(data.items, [377, 51, 242, 302])
    np.testing.assert_array_equal(data.weights, np.array([1, 2, 3, 3], dtype=np.float32))
    liked = load_movielens(path, min_rating=3)
    np.testing.assert_array_equal(liked.users, [196, 186])


def test_movielens_ratings_dat(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n")
    data = load(path)
    np.testing.assert_array_equal(data.users, [2, 1, 1])
    np.testing.assert_array_equal(data.items, [1357, 1193, 661])
    np.testing.assert_array_equal(data.weights, np.float32([5, 5, 3]))
    path.write_text("1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(ValueError, match="line 2: expected 4 fields"):
        load(path)


def test_movielens_ratings_csv(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS_CSV)
    for data in (load_movielens(path), load(path), load(path, "movielens")):
        np.testing.assert_array_equal(data.users, [3, 1, 1, 2])
        np.testing.assert_array_equal(data.items, [307, 307, 481, 1091])
        np.testing.assert_array_equal(data.weights, np.float32([4.0, 3.5, 3.5, 1.5]))
        assert data.user_ids is None
    assert len(load_movielens(path, min_rating=3.5)) == 3


def test_generic_csv_with_semicolons_and_string_ids(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "when;who;what;how_much\n"
        "1700000010;alice;sku-1;2.5\n"
        '1700000005;"bob; jr";sku-2;1\n'
        "1700000010;alice;sku-2;4\n"
    )
    data = load_csv(path, user_col="who", item_col="what", weight_col="how_much", time_col="when")
    assert data.user_ids is not None and data.item_ids is not None
    assert [data.user_ids[u] for u in data.users] == ["bob; jr", "alice", "alice"]
    assert [data.item_ids[i] for i in data.items] == ["sku-2", "sku-1", "sku-2"]  # stable
    np.testing.assert_array_equal(data.weights, np.float32([1, 2.5, 4]))
    np.testing.assert_array_equal(data.ts, [1700000005, 1700000010, 1700000010])
    # Written back with the string ids, and read again as the same events.
    out = tmp_path / "events.tsv"
    write_tsv(data, out)
    again = load_tsv(out)
    assert again.user_ids is not None
    assert [again.user_ids[u] for u in again.users] == ["bob; jr", "alice", "alice"]


def test_csv_without_weight_or_time_keeps_file_order(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("user,item\n5,9\n3,9\n5,1\n")
    data = load(path, user_col="user", item_col="item")
    np.testing.assert_array_equal(data.users, [5, 3, 5])
    np.testing.assert_array_equal(data.weights, np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(data.ts, [0, 1, 2])


def test_ids_switch_to_strings_in_a_later_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_datasets, "BLOCK_BYTES", 16)
    path = tmp_path / "mixed.tsv"
    path.write_text("1\t10\t1\t1\n2\t10\t1\t2\nx\t11\t1\t3\n1\t11\t1\t4\n")
    data = load_tsv(path)
    assert data.user_ids is not None
    assert [data.user_ids[u] for u in data.users] == ["1", "2", "x", "1"]
    assert data.users[0] == data.users[3]
    assert data.item_ids is None


@pytest.mark.parametrize(
    ("name", "text", "line", "problem"),
    [
        ("bad.tsv", "# header\n1\t2\t1\t5\n1\t2\t1\n", 3, "expected 4 fields"),
        ("bad.tsv", "1\t2\t1\t5\n\n1\t2\tlots\t6\n", 3, "weight 'lots'"),
        ("u.data", "1\t2\t3\t5\n1\t2\t3\tyesterday\n", 2, "time 'yesterday'"),
        ("bad.csv", "u;i;w\n1;2;1\n1;2;nan\n", 3, "weight 'nan' is not finite"),
        ("ratings.csv", RATINGS_CSV + "4,5\n", 6, "expected 4 fields"),
    ],
)
def test_malformed_line_is_named(
    tmp_path: Path, name: str, text: str, line: int, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    options = {"user_col": "u", "item_col": "i", "weight_col": "w"} if name == "bad.csv" else {}
    with pytest.raises(ValueError, match=f"line {line}: {problem}"):
        load(path, **options)


def test_malformed_line_number_counts_earlier_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_datasets, "BLOCK_BYTES", 64)
    path = tmp_path / "long.tsv"
    lines = [f"{i}\t{i % 7}\t1\t{i}" for i in range(200)]
    lines[150] = "150\t3\t1"
    path.write_text("# header\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 152: expected 4 fields"):
        load_tsv(path)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no user column 'user'"):
        load_csv(path, user_col="user", item_col="b")
    with pytest.raises(ValueError, match="unknown format"):
        load(path, "parquet")
    odd = tmp_path / "x.bin"
    odd.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load(odd)


def test_windows_line_endings_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffuser,item,rating\r\n1,2,3\r\n4,5,1.5\r\n".encode())
    data = load(path, user_col="user", item_col="item", weight_col="rating")
    np.testing.assert_array_equal(data.users, [1, 4])
    np.testing.assert_array_equal(data.weights, np.float32([3, 1.5]))
    tsv = tmp_path / "crlf.tsv"
    tsv.write_bytes(b"1\t2\t3\t5\r\n4\t5\t1\t6\r\n")
    np.testing.assert_array_equal(load_tsv(tsv).ts, [5, 6])


def test_command_line_options(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("t|u|i|w\n20|a|x|2\n10|b|y|1\n")
    parser = argparse.ArgumentParser()
    _datasets.add_load_arguments(parser)
    args = parser.parse_args(
        ["--user-col", "u", "--item-col", "i", "--weight-col", "w", "--time-col", "t"]
    )
    data = _datasets.load_from_args(path, args)
    assert data.user_ids is not None
    assert [data.user_ids[u] for u in data.users] == ["b", "a"]
    np.testing.assert_array_equal(data.weights, np.float32([1, 2]))
    with pytest.raises(ValueError, match="--user-col"):
        _datasets.load_from_args(path, parser.parse_args([]))


def test_tsv_with_a_header_names_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "events.tsv"
    path.write_text("user\titem\ttime\n7\t3\t300\n5\t4\t100\n7\t4\t200\n")
    data = load(path)  # "auto": a .tsv file
    np.testing.assert_array_equal(data.ts, [100, 200, 300])
    np.testing.assert_array_equal(data.users, [5, 7, 7])
    np.testing.assert_array_equal(data.items, [4, 4, 3])
    np.testing.assert_array_equal(data.weights, [1, 1, 1])  # no weight column: every event 1
    rated = tmp_path / "rated.tsv"
    rated.write_text("userId\tmovieId\trating\ttimestamp\n1\t2\t4.5\t10\n")
    r = load_tsv(rated)
    assert r.users.tolist() == [1] and r.items.tolist() == [2] and r.weights.tolist() == [4.5]


def test_tsv_header_without_user_or_item_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("who\twhat\ttime\n1\t2\t3\n")
    with pytest.raises(ValueError, match="names no user and item column"):
        load_tsv(path)
