"""The ``recstream`` command line.

recstream serve [--data-dir DIR] [--http HOST:PORT] [--forward HOST:PORT] [--demo]
                [--log redis://HOST:PORT[/DB] | redis+cluster://HOST:PORT]
                [--log-partitions N] [--log-replicas N] [--join http://PEER:PORT]
recstream replay FILE [--format tsv|movielens|csv] [--rate N] [--forward HOST:PORT]
recstream token USER [--ttl SECONDS]
recstream snapshot [--http HOST:PORT]
recstream --version

Every failure a user can cause (a port in use, a data directory another server holds, a
missing file, no server listening, a bad flag or config key) ends the command with one line
on stderr naming the problem and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import trio

from engine import ConfigError, JournalFailed, ServerConfig, load_config, parse_hostport
from engine.datasets import add_load_arguments, load_from_args

from ._auth import issue_token

__all__ = ["main"]

#: The file in the data directory a serving process holds an exclusive ``flock`` on.
LOCK_FILE = "lock"
#: Seconds ``replay`` keeps trying to reach the server (and finish its handshake).
REPLAY_CONNECT_TIMEOUT = 5.0


class CommandError(Exception):
    """A failure the user can fix; ``main`` prints its message as one line and exits 1."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{e} (for example 127.0.0.1:{text})") from None


def _version() -> str:
    try:
        return importlib.metadata.version("recstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--data-dir", type=Path, help="journal and snapshots (default ./recstream-data)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recstream", description="real-time recommendation engine")
    parser.add_argument("--version", action="version", version=f"recstream {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the server (zero configuration on loopback)")
    _add_common(serve)
    serve.add_argument("--http", type=_hostport, help="HOST:PORT (default 127.0.0.1:8000)")
    serve.add_argument("--forward", type=_hostport, help="HOST:PORT (default 127.0.0.1:24224)")
    serve.add_argument("--insecure", action="store_true", help="serve without keys on any address")
    serve.add_argument(
        "--demo", action="store_true", help="feed a synthetic stream to watch lists change"
    )
    serve.add_argument("--demo-rate", type=float, default=200.0, help="events/s of the demo stream")
    serve.add_argument(
        "--log",
        metavar="URL",
        help="a shared Redis Streams log instead of the local journal: redis://HOST:PORT[/DB] "
        "or redis+cluster://HOST:PORT (every node on it is a full replica)",
    )
    serve.add_argument(
        "--log-partitions",
        type=int,
        metavar="N",
        help="partition streams (default 1, on a cluster one per master; same on every node)",
    )
    serve.add_argument(
        "--log-replicas",
        type=int,
        default=0,
        metavar="N",
        help="acknowledge only once N Redis replicas have each write (WAIT)",
    )
    serve.add_argument(
        "--join",
        metavar="URL",
        help="start from this peer's newest snapshot (http://PEER:PORT), then the log after it",
    )
    serve.add_argument("-v", "--verbose", action="store_true")

    replay = sub.add_parser("replay", help="stream a dataset into a running server over Forward")
    replay.add_argument("file", type=Path)
    add_load_arguments(replay)
    replay.add_argument("--rate", type=float, default=0.0, help="events/s (0: as fast as acked)")
    replay.add_argument("--forward", type=_hostport, default=("127.0.0.1", 24224))
    replay.add_argument("--key", help="producer key (shared key) if the server requires one")
    replay.add_argument("--batch", type=int, default=1000, help="events per frame")
    replay.add_argument(
        "--no-ids",
        action="store_true",
        help="send no event ids (by default each event's id is derived from the file name "
        "and its row, so replaying a file again applies nothing twice)",
    )

    token = sub.add_parser("token", help="print a subscription token for USER")
    _add_common(token)
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=86_400.0, help="seconds (default one day)")
    token.add_argument("--int", action="store_true", help="the user id is an integer")

    snap = sub.add_parser("snapshot", help="ask a running server to snapshot now")
    snap.add_argument("--http", type=_hostport, default=("127.0.0.1", 8000))
    snap.add_argument("--key", help="admin key")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``recstream ARGV`` (``sys.argv[1:]`` by default); returns the exit status."""
    args = _parser().parse_args(argv)
    name = f"recstream {args.command}"
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "replay":
            return trio.run(_replay, args)
        if args.command == "token":
            return _token(args)
        if args.command == "snapshot":
            return _snapshot(args)
    except (ConfigError, CommandError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except FileNotFoundError as e:
        print(f"{name}: no such file: {e.filename}", file=sys.stderr)
        return 1
    except ValueError as e:  # an unreadable dataset: the message names file and line
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    return 1


def _token(args: argparse.Namespace) -> int:
    """Signs a token with the secret ``serve`` would use with the same flags, config and
    environment; says on stderr where that secret came from. Never creates a secret: one
    made here would not be the running server's, and its tokens would all be refused."""
    cfg = load_config(args.config, data_dir=args.data_dir)
    if cfg.token_secret:
        source = "RECSTREAM_TOKEN_SECRET" if os.environ.get("RECSTREAM_TOKEN_SECRET") else None
        where = source or f"token_secret in {args.config}"
        secret = cfg.token_secret
    else:
        path = cfg.data_dir.absolute() / "token_secret"
        try:
            secret = path.read_bytes().strip()
        except FileNotFoundError:
            raise CommandError(
                f"no token secret at {path}: run this where `recstream serve` runs, or name "
                "its data directory with --data-dir (or --config / RECSTREAM_DATA_DIR), or set "
                "RECSTREAM_TOKEN_SECRET for both"
            ) from None
        if not secret:
            raise CommandError(f"{path} is empty")
        where = str(path)
    print(f"recstream token: signed with the token secret from {where}", file=sys.stderr)
    user: str | int = int(args.user) if args.int else args.user
    print(issue_token(secret, user, args.ttl))
    return 0


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``data_dir/lock`` (the pid is written in it).

    Raises:
        CommandError: another process holds it: a second server on the same journal would
            corrupt it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    f: IO[str] = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the server
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise CommandError(
                f"data directory {data_dir.absolute()} is in use by another server "
                f"(pid {holder}); stop it or choose another --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Raises CommandError if ``host:port`` cannot be bound (in use, or not this host's)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                why = "is already in use (another server?)"
            else:
                why = f"cannot be listened on ({e.strerror})"
            raise CommandError(
                f"{host}:{port} {why}; choose another with {flag} HOST:PORT"
            ) from None


def _serve(args: argparse.Namespace) -> int:
    from .node import serve

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
    cfg: ServerConfig = load_config(args.config, **overrides).check()
    _check_port_free(cfg.http_host, cfg.http_port, "--http")
    _check_port_free(cfg.forward_host, cfg.forward_port, "--forward")
    with _data_dir_lock(cfg.data_dir):
        log = _shared_log(args, cfg)
        try:
            trio.run(serve, cfg, args.demo_rate if args.demo else 0.0, log)
        except KeyboardInterrupt:
            pass
        except JournalFailed as e:
            # A sync failed after the model applied its records (apply_before_sync): the node
            # stopped so that a restart recovers exactly what is durable.
            raise CommandError(
                f"stopped: {e}; restart to recover from the snapshot and the journal"
            ) from None
        except BaseExceptionGroup as group:
            # Binding races the check above; report the cause, not a traceback of tasks.
            leaf = _first_os_error(group)
            if leaf is None:
                raise
            raise leaf from None
    return 0


def _shared_log(args: argparse.Namespace, cfg: ServerConfig) -> Any:
    """The Redis Streams log ``--log`` names (None: the local journal); with ``--join``, the
    peer's snapshot is fetched first."""
    if args.log is None:
        if args.join or args.log_partitions is not None or args.log_replicas:
            raise CommandError("--join, --log-partitions and --log-replicas need --log")
        return None
    from engine import SNAPSHOT

    from .redis_streams import RedisStreamsLog, fetch_snapshot, node_id_for, parse_log_url

    try:
        config = parse_log_url(args.log, partitions=args.log_partitions, replicas=args.log_replicas)
    except ValueError as e:
        raise CommandError(f"--log: {e}") from None
    if args.join:
        try:
            size = fetch_snapshot(args.join, cfg.data_dir / SNAPSHOT, admin_key=cfg.admin_key)
        except OSError as e:
            raise CommandError(f"--join: {e}") from None
        logging.getLogger("recstream.server").info(
            "joined: %d bytes of snapshot from %s", size, args.join
        )
    return RedisStreamsLog(config, node_id=node_id_for(cfg.data_dir))


def _first_os_error(group: BaseExceptionGroup[Any]) -> OSError | None:
    for e in group.exceptions:
        if isinstance(e, OSError):
            return e
        if isinstance(e, BaseExceptionGroup):
            found = _first_os_error(e)
            if found is not None:
                return found
    return None


def _snapshot(args: argparse.Namespace) -> int:
    host, port = args.http
    url = f"http://{host}:{port}/v1/admin/snapshot"
    req = urllib.request.Request(url, method="POST")
    if args.key:
        req.add_header("X-Recstream-Key", args.key)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            print(json.loads(resp.read())["snapshot_seq"])
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace").strip()
        raise CommandError(f"the server refused ({e.code}): {body or e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) else e.reason
        raise CommandError(f"no server at {host}:{port} ({reason}); is it running?") from None
    return 0


def _event_ids(path: Path, n: int) -> list[str]:
    """Stable ids for the rows of ``path``: a digest of its name and the row number.

    The same file replayed again sends the same ids, so the server's redelivery window
    (``dedup_window``, the newest million ids per tag) applies nothing twice.
    """
    stem = hashlib.blake2b(path.name.encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()
    return [f"replay-{stem}-{j}" for j in range(n)]


async def _replay(args: argparse.Namespace) -> int:
    from .client import ForwardProducer, HandshakeRefused

    stream = load_from_args(args.file, args)
    n = len(stream.users)
    ids = None if args.no_ids else _event_ids(args.file, n)
    host, port = args.forward
    started = time.monotonic()
    sent = 0
    producer = ForwardProducer(
        host, port, shared_key=args.key, connect_timeout=REPLAY_CONNECT_TIMEOUT
    )
    try:
        async with producer:
            for lo in range(0, n, args.batch):
                hi = min(n, lo + args.batch)
                events = [
                    {
                        "user": _external(stream.users[j], stream.user_ids),
                        "item": _external(stream.items[j], stream.item_ids),
                        "weight": float(stream.weights[j]),
                    }
                    for j in range(lo, hi)
                ]
                # A file without a time column is ordered by row; the server stamps its events.
                if stream.timed:
                    for j, event in zip(range(lo, hi), events, strict=True):
                        event["time"] = float(stream.ts[j])
                if ids is not None:
                    for j, event in zip(range(lo, hi), events, strict=True):
                        event["id"] = ids[j]
                await producer.send(events)
                sent = hi
                if args.rate > 0:
                    ahead = sent / args.rate - (time.monotonic() - started)
                    if ahead > 0:
                        await trio.sleep(ahead)
                _progress(sent, n, started)
            await producer.flush()
    except HandshakeRefused as e:
        raise CommandError(f"{host}:{port} refused the producer: {e}") from None
    except ConnectionError as e:
        if sent:
            print(file=sys.stderr)
        raise CommandError(f"cannot reach a server at {host}:{port}: {e}") from None
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
