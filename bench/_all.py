"""``python -m bench all``: every registered benchmark, then the README table.

The benchmarks are found from ``bench.__main__._MODULES`` at run time, so one added later is
included without touching this file. Each runs in its own interpreter (a crash or a
``sys.exit`` in one cannot take the others down); a failure is reported and the rest still
run, and the exit status is non-zero if any failed.

``--quick`` is a smoke run: its results go to a scratch directory (``$RECSTREAM_BENCH_RESULTS``
or the system's temporary directory) and its table is printed, never written into the README
or over the published figures in ``bench/results``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from typing import Any

from bench._common import RESULTS_ENV, results_dir

#: Subcommands that are not benchmarks.
NOT_BENCHMARKS = frozenset({"all", "report"})


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("all", help="run every benchmark, then rewrite the README table")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: pass --quick to every benchmark; results to a scratch directory, "
        "the README and bench/results untouched",
    )
    p.add_argument("--no-report", action="store_true", help="leave the README alone")
    p.add_argument("--only", help="comma-separated subset of the benchmarks")
    p.set_defaults(func=run)


def benchmarks() -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser, for every benchmark module in ``_MODULES``."""
    from bench.__main__ import _MODULES

    parser = argparse.ArgumentParser(prog="python -m bench")
    subparsers = parser.add_subparsers(dest="command")
    for name in _MODULES:
        importlib.import_module(f"bench.{name}").register(subparsers)
    return {n: p for n, p in subparsers.choices.items() if n not in NOT_BENCHMARKS}


def run(args: argparse.Namespace) -> int:
    found = benchmarks()
    names = list(found)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(found))
        if unknown:
            sys.exit(f"unknown benchmarks {unknown}; registered: {names}")
        names = [n for n in names if n in wanted]
    failed: list[str] = []
    env = dict(os.environ)
    out = results_dir(quick=args.quick)
    env[RESULTS_ENV] = str(out)
    for name in names:
        argv = [sys.executable, "-m", "bench", name]
        if args.quick:
            if "--quick" in found[name]._option_string_actions:
                argv.append("--quick")
            else:
                print(f"note: {name} has no --quick; running it in full", flush=True)
        print(f"=== {' '.join(argv[1:])}", flush=True)
        began = time.perf_counter()
        code = subprocess.call(argv, env=env)
        took = time.perf_counter() - began
        if code != 0:
            failed.append(name)
            print(f"=== {name} FAILED (exit {code}) after {took:.0f} s", flush=True)
        else:
            print(f"=== {name} done in {took:.0f} s", flush=True)
    if args.quick:
        from bench._report import render

        print(f"quick results in {out} (the README and bench/results are left alone):")
        print(render(out))
    elif not args.no_report:
        code = subprocess.call([sys.executable, "-m", "bench", "report"], env=env)
        if code != 0:
            failed.append("report")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
