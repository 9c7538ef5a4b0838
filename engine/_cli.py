"""The ``recstream`` command line.

recstream serve [--data-dir DIR] [--http HOST:PORT] [--forward HOST:PORT] [--demo]
recstream replay FILE [--format tsv|movielens|csv] [--rate N] [--forward HOST:PORT]
recstream token USER [--ttl SECONDS]
recstream snapshot [--http HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from ._auth import issue_token
from ._config import load_config, parse_hostport
from ._datasets import add_load_arguments, load_from_args
from ._exceptions import ConfigError

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--data-dir", type=Path, help="journal and snapshots (default ./recstream-data)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recstream", description="real-time recommendation engine"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (zero configuration on loopback)")
    _add_common(serve)
    serve.add_argument("--http", type=parse_hostport, help="HOST:PORT (default 127.0.0.1:8000)")
    serve.add_argument("--forward", type=parse_hostport, help="HOST:PORT (default 127.0.0.1:24224)")
    serve.add_argument("--insecure", action="store_true", help="serve without keys on any address")
    serve.add_argument(
        "--demo", action="store_true", help="feed a synthetic stream to watch lists change"
    )
    serve.add_argument("--demo-rate", type=float, default=200.0, help="events/s of the demo stream")
    serve.add_argument("-v", "--verbose", action="store_true")

    replay = sub.add_parser("replay", help="stream a dataset into a running server over Forward")
    replay.add_argument("file", type=Path)
    add_load_arguments(replay)
    replay.add_argument("--rate", type=float, default=0.0, help="events/s (0: as fast as acked)")
    replay.add_argument("--forward", type=parse_hostport, default=("127.0.0.1", 24224))
    replay.add_argument("--key", help="producer key (shared key) if the server requires one")
    replay.add_argument("--batch", type=int, default=1000, help="events per frame")

    token = sub.add_parser("token", help="print a subscription token for USER")
    _add_common(token)
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=86_400.0, help="seconds (default one day)")
    token.add_argument("--int", action="store_true", help="the user id is an integer")

    snap = sub.add_parser("snapshot", help="ask a running server to snapshot now")
    snap.add_argument("--http", default="127.0.0.1:8000")
    snap.add_argument("--key", help="admin key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "replay":
            try:
                return trio.run(_replay, args)
            except ValueError as e:  # unreadable dataset: the message names file and line
                print(f"recstream replay: {e}", file=sys.stderr)
                return 2
        if args.command == "token":
            cfg = load_config(args.config, data_dir=args.data_dir).with_token_secret()
            assert cfg.token_secret is not None
            user: str | int = int(args.user) if args.int else args.user
            print(issue_token(cfg.token_secret, user, args.ttl))
            return 0
        if args.command == "snapshot":
            return _snapshot(args)
    except ConfigError as e:
        print(f"recstream: {e}", file=sys.stderr)
        return 2
    return 1


def _serve(args: argparse.Namespace) -> int:
    from ._server import serve

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.http:
        overrides["http_host"], overrides["http_port"] = args.http
    if args.forward:
        overrides["forward_host"], overrides["forward_port"] = args.forward
    if args.insecure:
        overrides["insecure"] = True
    cfg = load_config(args.config, **overrides)
    trio.run(serve, cfg, args.demo_rate if args.demo else 0.0)
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.http)
    req = urllib.request.Request(f"http://{host}:{port}/v1/admin/snapshot", method="POST")
    if args.key:
        req.add_header("X-Recstream-Key", args.key)
    with urllib.request.urlopen(req, timeout=60) as resp:
        print(json.loads(resp.read())["snapshot_seq"])
    return 0


async def _replay(args: argparse.Namespace) -> int:
    from .client import ForwardProducer

    stream = load_from_args(args.file, args)
    n = len(stream.users)
    host, port = args.forward
    started = time.monotonic()
    sent = 0
    async with ForwardProducer(host, port, shared_key=args.key) as producer:
        for lo in range(0, n, args.batch):
            hi = min(n, lo + args.batch)
            events = [
                {
                    "user": _external(stream.users[j], stream.user_ids),
                    "item": _external(stream.items[j], stream.item_ids),
                    "weight": float(stream.weights[j]),
                    "time": float(stream.ts[j]),
                }
                for j in range(lo, hi)
            ]
            await producer.send(events)
            sent = hi
            if args.rate > 0:
                ahead = sent / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    await trio.sleep(ahead)
            _progress(sent, n, started)
        await producer.flush()
    _progress(n, n, started)
    print(file=sys.stderr)
    return 0


def _external(code: Any, table: Any) -> str | int:
    """A loaded id as the producer would send it: the file's integer, or its string."""
    return str(table[int(code)]) if table is not None else int(code)


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    frac = done / total if total else 1.0
    rate = done / max(1e-9, time.monotonic() - started)
    bar = "#" * int(frac * width)
    print(f"\r[{bar:<{width}}] {done}/{total} events  {rate:,.0f} ev/s", end="", file=sys.stderr)
