"""Entry point: ``python -m bench SUBCOMMAND [options]``.

Each benchmark lives in its own ``bench/_NAME.py`` module exposing ``register(subparsers)``,
which adds a subcommand whose ``func`` attribute runs it. Add a module name to ``_MODULES``
to add a benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_MODULES = (
    "_ann",
    "_crossover",
    "_mf",
    "_ingest",
    "_latency",
    "_quality",
    "_reliability",
    "_recovery",
    "_served",
    "_scale",
    "_report",
    "_all",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name in _MODULES:
        importlib.import_module(f"bench.{name}").register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
