"""Loaders of interaction files into numpy arrays: our TSV, MovieLens, and generic CSV.

Every loader returns a :class:`Dataset` shaped like :class:`engine._synthetic.Stream`'s events
(``users``, ``items`` int64, ``weights`` float32, ``ts`` float64, ``types`` None), sorted by
time with ties kept in file order.

Files are read in blocks of a few megabytes and each block is parsed by numpy's C reader
(``np.loadtxt`` over the block), so a 25-million-line MovieLens file costs arrays, not Python
objects per line. Only when a block fails to parse is it walked line by line, to name the
first bad line in a :class:`ValueError` (``path, line N: what is wrong: the line``).

Ids: a column whose values are all integers keeps them as they are (``user_ids`` /
``item_ids`` is None). Otherwise the values are strings, mapped to dense int64 codes, and
``user_ids[code]`` gives the string back.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMATS",
    "Dataset",
    "add_load_arguments",
    "load",
    "load_csv",
    "load_from_args",
    "load_movielens",
    "load_tsv",
]

#: Formats :func:`load` understands ("auto" guesses from the name and the first line).
FORMATS = ("tsv", "movielens", "csv")

#: Bytes read per block; each block is parsed by one call into numpy's reader.
BLOCK_BYTES = 8 << 20

#: Delimiters tried, in order of preference, when a CSV's delimiter is not given.
_DELIMITERS = (",", ";", "\t", "|")


@attrs.frozen(eq=False)
class Dataset:
    """Interactions loaded from a file, sorted by time (stable).

    Attributes:
        users: User of each event: the file's integer id, or a code into ``user_ids``.
        items: Item of each event, likewise.
        weights: Weight of each event (a rating, the file's weight column, or 1).
        ts: Unix time of each event (the row number when the file has no time column).
        types: Always None: files give weights, not event types.
        user_ids: External string id of each user code; None when the file's ids are
            integers and ``users`` holds them directly.
        item_ids: The same for items.
        timed: Whether ``ts`` came from the file's time column (else it is the row number,
            which orders the events but is no time to send to a server).
    """

    users: npt.NDArray[np.int64]
    items: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32]
    ts: npt.NDArray[np.float64]
    types: None = None
    user_ids: npt.NDArray[np.str_] | None = None
    item_ids: npt.NDArray[np.str_] | None = None
    timed: bool = True

    def __len__(self) -> int:
        return len(self.users)


class _Ids:
    """Collects an id column block by block: integers while they last, else dense codes."""

    def __init__(self) -> None:
        self.blocks: list[npt.NDArray[np.int64]] = []
        self.index: dict[str, int] | None = None  # None while every id is an integer

    def add(self, values: npt.NDArray[Any]) -> None:
        if self.index is None:
            ints = _as_ints(values)
            if ints is not None:
                self.blocks.append(ints)
                return
            # A non-integer id: from now on every id is a string with a dense code.
            self.index = {}
            self.blocks = [self._codes(block.astype(str)) for block in self.blocks]
        ints = _as_ints(values) if values.dtype.kind == "f" else None
        self.blocks.append(self._codes((ints if ints is not None else values).astype(str)))

    def _codes(self, values: npt.NDArray[np.str_]) -> npt.NDArray[np.int64]:
        assert self.index is not None
        index = self.index
        unique, inverse = np.unique(values, return_inverse=True)
        codes = np.array(
            [index.setdefault(name, len(index)) for name in unique.tolist()], dtype=np.int64
        )
        return codes[inverse.reshape(-1)]

    def finish(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.str_] | None]:
        joined = (
            np.concatenate(self.blocks) if self.blocks else np.zeros(0, dtype=np.int64)
        ).astype(np.int64)
        if self.index is None:
            return joined, None
        return joined, np.array(list(self.index), dtype=str)


def _as_ints(values: npt.NDArray[Any]) -> npt.NDArray[np.int64] | None:
    """``values`` as int64 if every one is an integer (within int64), else None."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            return None
        if len(values) and np.max(np.abs(values)) >= 2.0**53:
            return None  # beyond exact float64 integers: parse the text instead
        return values.astype(np.int64)
    try:
        return values.astype(np.int64)
    except (ValueError, OverflowError):
        return None


@attrs.frozen
class _Layout:
    """How to cut a file into columns and which columns mean what."""

    delimiter: str | None  # None: runs of whitespace
    n_columns: int
    user: int
    item: int
    weight: int | None
    time: int | None
    comments: str | None
    quote: str | None
    alias: str | None = None  # a multi-character separator, replaced by ``delimiter``


def _blocks(path: Path, skip_lines: int) -> Iterator[tuple[int, str]]:
    """Yield ``(number of the block's first line, text of whole lines)`` from ``path``."""
    line = 1
    with open(path, "rb") as f:
        for _ in range(skip_lines):
            f.readline()
            line += 1
        carry = b""
        while True:
            data = f.read(BLOCK_BYTES)
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield line, _decode(block, path, line)
            line += block.count(b"\n")
        if carry:
            yield line, _decode(carry, path, line)


def _decode(block: bytes, path: Path, line: int) -> str:
    try:
        return block.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        bad = line + block.count(b"\n", 0, err.start)
        raise ValueError(f"{path}, line {bad}: not valid UTF-8") from None


def _parse(path: Path, layout: _Layout, skip_lines: int) -> Dataset:
    """Read ``path`` block by block through numpy; locate the bad line on failure."""
    users, items = _Ids(), _Ids()
    weights: list[npt.NDArray[np.float32]] = []
    times: list[npt.NDArray[np.float64]] = []
    rows = 0
    for first_line, text in _blocks(path, skip_lines):
        if layout.alias is not None and layout.delimiter is not None:
            text = text.replace(layout.alias, layout.delimiter)
        table = _fast_table(text, layout)
        if table is None:
            _raise_bad_line(path, layout, first_line, text)
        if table.shape[0] == 0:
            continue
        if table.dtype.kind == "f" and (
            _as_ints(table[:, layout.user]) is None or _as_ints(table[:, layout.item]) is None
        ):
            table = _fast_table(text, layout, as_text=True)  # ids that are not integers
            assert table is not None
        numeric = _numeric_columns(table, layout)
        if numeric is None:
            _raise_bad_line(path, layout, first_line, text)
        weight, time = numeric
        users.add(table[:, layout.user])
        items.add(table[:, layout.item])
        weights.append(weight)
        times.append(
            time if time is not None else np.arange(rows, rows + len(table), dtype=np.float64)
        )
        rows += len(table)
    user_codes, user_ids = users.finish()
    item_codes, item_ids = items.finish()
    w = np.concatenate(weights) if weights else np.zeros(0, dtype=np.float32)
    ts = np.concatenate(times) if times else np.zeros(0, dtype=np.float64)
    order = np.argsort(ts, kind="stable")
    return Dataset(
        users=user_codes[order],
        items=item_codes[order],
        weights=w[order],
        ts=ts[order],
        user_ids=user_ids,
        item_ids=item_ids,
        timed=layout.time is not None,
    )


def _fast_table(text: str, layout: _Layout, as_text: bool = False) -> npt.NDArray[Any] | None:
    """The block as a 2-D array (float64 if all numeric, else str), or None if it is ragged."""
    options: dict[str, Any] = {
        "delimiter": layout.delimiter,
        "comments": layout.comments,
        "ndmin": 2,
    }
    if layout.quote is not None:
        options["quotechar"] = layout.quote
    with warnings.catch_warnings():
        # numpy notes that blank lines do not count towards max_rows; we do not use it.
        warnings.filterwarnings("ignore", "Input line", UserWarning)
        table = _loadtxt(text, as_text, options)
    if table is None:
        return None
    if table.shape[0] and table.shape[1] != layout.n_columns:
        return None
    return table


def _loadtxt(text: str, as_text: bool, options: dict[str, Any]) -> npt.NDArray[Any] | None:
    """numpy's C reader over ``text``: as float64 if it can, else as strings."""
    table: npt.NDArray[Any]
    try:
        if as_text:
            raise ValueError
        table = np.loadtxt(io.StringIO(text), dtype=np.float64, **options)
    except ValueError:
        try:
            table = np.loadtxt(io.StringIO(text), dtype=str, **options)
        except ValueError:
            return None
    return table


def _numeric_columns(
    table: npt.NDArray[Any], layout: _Layout
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64] | None] | None:
    """Weights and times of the block, or None if one is not a finite number."""
    try:
        if layout.weight is None:
            weight = np.ones(len(table), dtype=np.float32)
        else:
            raw = table[:, layout.weight].astype(np.float64)
            if not np.all(np.isfinite(raw)):
                return None
            weight = raw.astype(np.float32)
        time = None
        if layout.time is not None:
            time = table[:, layout.time].astype(np.float64)
            if not np.all(np.isfinite(time)):
                return None
    except ValueError:
        return None
    return weight, time


def _raise_bad_line(path: Path, layout: _Layout, first_line: int, text: str) -> NoReturn:
    """Walk the block line by line and raise a ValueError naming the first bad line."""
    for offset, line in enumerate(text.splitlines()):
        number = first_line + offset
        stripped = line.strip()
        if not stripped or (layout.comments is not None and stripped.startswith(layout.comments)):
            continue
        if layout.quote is not None:
            fields = next(csv.reader([line], delimiter=layout.delimiter or ",", quotechar='"'))
        elif layout.delimiter is None:
            fields = line.split()
        else:
            fields = line.split(layout.delimiter)
        problem = _field_problem(fields, layout)
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}: {line!r}")
    last = first_line + text.count("\n")
    raise ValueError(f"{path}, lines {first_line}-{last}: could not parse this block")


def _field_problem(fields: list[str], layout: _Layout) -> str | None:
    if len(fields) != layout.n_columns:
        return f"expected {layout.n_columns} fields, found {len(fields)}"
    for name, column in (("weight", layout.weight), ("time", layout.time)):
        if column is None:
            continue
        try:
            value = float(fields[column])
        except ValueError:
            return f"{name} {fields[column].strip()!r} is not a number"
        if not math.isfinite(value):
            return f"{name} {fields[column].strip()!r} is not finite"
    for name, column in (("user", layout.user), ("item", layout.item)):
        if not fields[column].strip():
            return f"empty {name} id"
    return None


#: Header names recognised per role in a tab-separated file with a header line, in order.
TSV_HEADER_NAMES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid"),
    "item": ("item", "item_id", "itemid", "movieid", "iid"),
    "weight": ("weight", "rating", "score"),
    "time": ("time", "timestamp", "ts", "unix_ts"),
}


def _tsv_header(path: Path) -> dict[str, str] | None:
    """Header name per role when ``path``'s first line names its columns, else None."""
    first = _first_line(path)
    if first.startswith("#"):
        return None
    fields = [f.strip() for f in first.split("\t")]
    if not fields or all(_is_number(f) for f in fields):
        return None
    lowered = {f.lower(): f for f in fields}
    found = {
        role: next(lowered[n] for n in names if n in lowered)
        for role, names in TSV_HEADER_NAMES.items()
        if any(n in lowered for n in names)
    }
    if "user" not in found or "item" not in found:
        raise ValueError(
            f"{path}: the header {fields} names no user and item column "
            f"(user: one of {TSV_HEADER_NAMES['user']}, item: one of {TSV_HEADER_NAMES['item']})"
        )
    return found


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_tsv(path: str | Path) -> Dataset:
    """Load a tab-separated interaction file.

    Two shapes are understood. Without a header, ``user<TAB>item<TAB>weight<TAB>unix_ts``
    lines (``#`` lines are comments): what :func:`engine._synthetic.write_tsv` writes; loading
    its output gives back the same arrays. With a header line naming the columns (see
    :data:`TSV_HEADER_NAMES`, e.g. ``user item time``): user and item are required, the weight
    defaults to 1 and the time to the row number.

    Raises:
        ValueError: On a line without the expected fields or with a non-numeric weight or
            time, or a header without user and item columns.
    """
    header = _tsv_header(Path(path))
    if header is not None:
        return load_csv(
            path,
            user_col=header["user"],
            item_col=header["item"],
            weight_col=header.get("weight"),
            time_col=header.get("time"),
            delimiter="\t",
        )
    layout = _Layout(
        delimiter="\t", n_columns=4, user=0, item=1, weight=2, time=3, comments="#", quote=None
    )
    return _parse(Path(path), layout, skip_lines=0)


def load_movielens(path: str | Path, *, min_rating: float | None = None) -> Dataset:
    """Load MovieLens ratings as implicit interactions, the rating being the weight.

    Understands ``u.data`` (MovieLens 100k: ``user item rating timestamp`` separated by tabs
    or spaces, no header), ``ratings.dat`` (MovieLens 1M/10M: the same fields separated by
    ``::``) and ``ratings.csv`` (MovieLens 20M/25M/latest: header
    ``userId,movieId,rating,timestamp``); the first line tells which.

    Args:
        path: The ratings file.
        min_rating: Keep only ratings of at least this much; None keeps every rating (a low
            rating still says the user watched the film).

    Raises:
        ValueError: On a malformed line, naming it.
    """
    path = Path(path)
    header = _first_line(path)
    if "userid" in header.lower().replace('"', ""):
        data = load_csv(
            path,
            user_col="userId",
            item_col="movieId",
            weight_col="rating",
            time_col="timestamp",
            delimiter=",",
        )
    else:
        layout = _Layout(
            delimiter="\t" if "::" in header else None,
            n_columns=4,
            user=0,
            item=1,
            weight=2,
            time=3,
            comments=None,
            quote=None,
            alias="::" if "::" in header else None,
        )
        data = _parse(path, layout, skip_lines=0)
    if min_rating is None:
        return data
    keep = data.weights >= min_rating
    return attrs.evolve(
        data,
        users=data.users[keep],
        items=data.items[keep],
        weights=data.weights[keep],
        ts=data.ts[keep],
    )


def load_csv(
    path: str | Path,
    *,
    user_col: str,
    item_col: str,
    weight_col: str | None = None,
    time_col: str | None = None,
    delimiter: str | None = None,
) -> Dataset:
    """Load a delimited file whose first line names its columns.

    Fields may be quoted with ``"`` (to hold the delimiter), but a record must fit on one
    line.

    Args:
        path: The file.
        user_col: Header name of the user id column.
        item_col: Header name of the item id column.
        weight_col: Header name of the weight column; None weighs every row 1.
        time_col: Header name of the Unix time column; None uses the row number, keeping the
            file's order.
        delimiter: Field separator; None picks the most frequent of ``, ; TAB |`` in the
            header line.

    Raises:
        ValueError: If a named column is missing, or on a malformed line (naming it).
    """
    path = Path(path)
    header_line = _first_line(path)
    if delimiter is None:
        counts = [header_line.count(d) for d in _DELIMITERS]
        delimiter = _DELIMITERS[counts.index(max(counts))] if max(counts) else ","
    header = [h.strip() for h in next(csv.reader([header_line], delimiter=delimiter))]

    def column(name: str | None, role: str) -> int | None:
        if name is None:
            return None
        if name not in header:
            raise ValueError(f"{path}: no {role} column {name!r} in header {header}")
        return header.index(name)

    user, item = column(user_col, "user"), column(item_col, "item")
    assert user is not None and item is not None
    layout = _Layout(
        delimiter=delimiter,
        n_columns=len(header),
        user=user,
        item=item,
        weight=column(weight_col, "weight"),
        time=column(time_col, "time"),
        comments=None,
        quote='"',
    )
    return _parse(path, layout, skip_lines=1)


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().rstrip("\r\n")


def _guess_format(path: Path) -> str:
    """Guess a format from the file's name, then from its first line."""
    name = path.name.lower()
    first = _first_line(path)
    if name.endswith(".tsv") or first.startswith("#"):
        return "tsv"
    if name == "u.data" or name.endswith((".data", ".dat")):
        return "movielens"
    if "userid" in first.lower().replace('"', "") and "movieid" in first.lower():
        return "movielens"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"{path}: cannot tell the format; give one of {FORMATS}")


def load(path: str | Path, format: str = "auto", **options: Any) -> Dataset:
    """Load ``path`` in ``format`` (one of :data:`FORMATS`, or "auto" to guess).

    "auto" picks "tsv" for ``*.tsv`` or a first line starting with ``#``, "movielens" for
    ``u.data``/``*.data``/``*.dat`` or a ``userId,movieId,...`` header, and "csv" for other
    ``*.csv``.
    ``options`` go to the loader (``min_rating`` for MovieLens; ``user_col``, ``item_col``,
    ``weight_col``, ``time_col``, ``delimiter`` for CSV).

    Raises:
        ValueError: On an unknown format, options the format does not take, or a bad file.
    """
    path = Path(path)
    if format == "auto":
        format = _guess_format(path)
    if format == "tsv":
        if options:
            raise ValueError(f"the tsv format takes no options, got {sorted(options)}")
        return load_tsv(path)
    if format == "movielens":
        return load_movielens(path, **options)
    if format == "csv":
        return load_csv(path, **options)
    raise ValueError(f"unknown format {format!r}; expected one of {FORMATS} or 'auto'")


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--format --user-col --item-col --weight-col --time-col --delimiter
    --min-rating`` to a command that reads a dataset (use with :func:`load_from_args`)."""
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--user-col", help="csv: header name of the user column")
    parser.add_argument("--item-col", help="csv: header name of the item column")
    parser.add_argument("--weight-col", help="csv: header name of the weight column")
    parser.add_argument("--time-col", help="csv: header name of the unix time column")
    parser.add_argument("--delimiter", help="csv: field separator (default: guessed)")
    parser.add_argument("--min-rating", type=float, help="movielens: drop lower ratings")


def load_from_args(path: str | Path, args: argparse.Namespace) -> Dataset:
    """Load ``path`` with the options parsed from :func:`add_load_arguments`."""
    path = Path(path)
    format = args.format if args.format != "auto" else _guess_format(path)
    if format == "csv":
        if not args.user_col or not args.item_col:
            raise ValueError("csv needs --user-col and --item-col")
        return load_csv(
            path,
            user_col=args.user_col,
            item_col=args.item_col,
            weight_col=args.weight_col,
            time_col=args.time_col,
            delimiter=args.delimiter,
        )
    if format == "movielens":
        return load_movielens(path, min_rating=args.min_rating)
    return load(path, format)
