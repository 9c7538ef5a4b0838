"""``python -m bench report``: the README's performance table from ``bench/results/*.json``.

Only the text between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` is
rewritten. Rows come from every results file in name order, in the order each file lists
them, so the same results always give the same table. Each row names the command that
produced it (the file's ``command``, else ``python -m bench NAME``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench._common import results_dir

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = (
    "| benchmark | metric | ours | peer | ratio | unit | command |",
    "|---|---|---:|---|---:|---|---|",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="rewrite the README's performance table")
    p.add_argument("--readme", type=Path, default=README, help="file to rewrite (README.md)")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=results_dir(),
        help="where the results JSON files are (default bench/results)",
    )
    p.set_defaults(func=run)


def fmt(value: Any) -> str:
    """Four significant digits; thousands separated for large figures; "—" when unknown."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != value:  # NaN
        return "—"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_rows(doc: dict[str, Any], stem: str) -> list[str]:
    """Markdown rows of one results document."""
    bench = str(doc.get("name") or stem)
    command = str(doc.get("command") or f"python -m bench {bench}")
    doc_peer = doc.get("peer") if isinstance(doc.get("peer"), str) else None
    lines = []
    for r in doc.get("rows", []):
        params = r.get("params") or {}
        # Rows against a target (``..._vs_goal``) compare with the goal, not the peer program.
        is_goal = "goal" in str(r.get("name", ""))
        peer_name = params.get("peer_name") or ("goal" if is_goal else doc_peer)
        peer = fmt(r.get("peer"))
        if peer_name and r.get("peer") is not None:
            peer = f"{peer} ({peer_name})"
        ratio = r.get("ratio")
        cells = (
            bench,
            str(r.get("name", "")),
            fmt(r.get("ours")),
            peer,
            f"{ratio:.3g}×" if isinstance(ratio, int | float) else "—",
            str(r.get("unit", "")),
            f"`{command}`",
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def render(results_dir: Path) -> str:
    """The whole table (header included) for every ``*.json`` in ``results_dir``."""
    lines = list(HEADER)
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if isinstance(doc, dict):
            lines += table_rows(doc, path.stem)
    if len(lines) == len(HEADER):
        return "(run `make bench` to fill this table)"
    return "\n".join(lines)


def rewrite(text: str, table: str) -> str:
    """``text`` with everything between the markers replaced by ``table``.

    Raises:
        ValueError: If the markers are missing or out of order.
    """
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise ValueError(f"the README needs {START} followed by {END}")
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def run(args: argparse.Namespace) -> int:
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    try:
        new = rewrite(text, render(Path(args.results_dir)))
    except ValueError as e:
        print(f"{readme}: {e}", file=sys.stderr)
        return 1
    if new != text:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(readme)
    print(f"{readme}: table {'rewritten' if new != text else 'unchanged'}")
    return 0
