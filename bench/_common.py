"""What every benchmark shares: the release-build guard, the machine description, results,
a server subprocess, loud peer skips and optional plotting."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Where ``--quick`` (smoke) runs write: never over the published figures in ``bench/results``.
QUICK_RESULTS_DIR = Path(tempfile.gettempdir()) / "recstream-bench-quick"
#: Environment variable naming another directory for results (tests write to a temporary one).
RESULTS_ENV = "RECSTREAM_BENCH_RESULTS"


def results_dir(quick: bool | None = None) -> Path:
    """Where results go: ``$RECSTREAM_BENCH_RESULTS`` if set; else, for a quick run,
    :data:`QUICK_RESULTS_DIR`; else ``bench/results`` (the figures the README publishes).

    Args:
        quick: Whether this is a smoke run; None: whether ``--quick`` is on the command line,
            which is how every benchmark is invoked (``python -m bench NAME --quick``).
    """
    override = os.environ.get(RESULTS_ENV)
    if override:
        return Path(override)
    if quick is None:
        quick = "--quick" in sys.argv[1:]
    return QUICK_RESULTS_DIR if quick else RESULTS_DIR


def require_release() -> None:
    """Exits unless ``engine._core`` is a release build: debug figures are meaningless."""
    from engine import _core

    if getattr(_core, "BUILD_PROFILE", None) != "release":
        sys.exit(
            "refusing to benchmark a debug build of engine._core; "
            "rebuild with `maturin develop --release` (or `make dev`)"
        )


def machine() -> dict[str, Any]:
    """CPU model, core count and flags that matter for the kernels, from /proc/cpuinfo."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    info["cpu"] = fields.get("model name", "unknown")
    flags = set(fields.get("flags", "").split())
    info["simd"] = sorted(flags & {"sse4_2", "avx", "avx2", "fma", "avx512f"})
    return info


def row(
    name: str,
    ours: float | None,
    peer: float | None,
    unit: str,
    params: dict[str, Any] | None = None,
    *,
    lower_is_better: bool = False,
) -> dict[str, Any]:
    """One result row; ``ratio`` is ours / peer when both are known.

    With ``lower_is_better`` (latencies) the ratio is peer / ours instead, so that a ratio of
    at least 1 always means "as good as the peer (or goal) or better".
    """
    if lower_is_better:
        ratio = peer / ours if peer is not None and ours not in (None, 0) else None
    else:
        ratio = ours / peer if ours is not None and peer not in (None, 0) else None
    return {
        "name": name,
        "ours": ours,
        "peer": peer,
        "ratio": ratio,
        "unit": unit,
        "params": params or {},
    }


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    out: Path | None = None,
) -> Path:
    """Writes ``NAME.json`` in ``out`` (default :func:`results_dir`) atomically (temporary
    file, then rename)."""
    out = results_dir() if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"name": name, "machine": machine(), "rows": rows}
    if extra:
        doc.update(extra)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def print_rows(rows: list[dict[str, Any]]) -> None:
    """One line per row: ours, peer (or goal) and the ratio."""
    for r in rows:
        ours = f"{r['ours']:.4g}" if r["ours"] is not None else "null"
        peer = f"{r['peer']:.4g}" if r["peer"] is not None else "null"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(
            f"  {r['name']:40s} ours {ours:>10s}  peer {peer:>10s}  ratio {ratio:>7s}  {r['unit']}"
        )


def skip_peer(name: str, why: str) -> None:
    """Says loudly that a peer is not measured, so a null column is never mistaken for a win."""
    bar = "!" * 72
    print(f"\n{bar}\n!!! SKIPPED peer {name}: {why}\n{bar}", flush=True)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) if absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plot; pip install matplotlib)", flush=True)
        return None
    return plt


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for peers without port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(config: dict[str, Any]) -> str:
    """A flat TOML document with one level of tables (enough for ``ServerConfig``)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, v in config.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


class ServerProcess:
    """``python -m connectors serve`` in a child process, on ephemeral loopback ports.

    A benchmark's clients then compete with a real server process (its own interpreter, GIL
    and event loop) exactly as production clients would. The data directory is temporary;
    the server's log goes to ``server.log`` in it (printed on a failed start).

    Args:
        config: ``ServerConfig`` fields (``[model]`` as a nested dict), written to a TOML file.
        startup_timeout: Seconds to wait for the listeners.
        data_dir: An existing data directory to serve (a restart); default a new one.
        args: Further ``serve`` arguments (``--log URL``, ``--join URL``...).

    Attributes (inside the ``with`` block):
        http_url: ``http://127.0.0.1:PORT``.
        forward_address: ``("127.0.0.1", PORT)`` of the Forward listener.
        pid: The child's process id (it is signalled by this id only).
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        startup_timeout: float = 60.0,
        data_dir: Path | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.http_url = ""
        self.forward_address: tuple[str, int] = ("", 0)
        self.pid = 0
        self._proc: subprocess.Popen[str] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> ServerProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="recstream-bench-")
        root = Path(self._tmp.name)
        (root / "server.toml").write_text(to_toml(self.config))
        self._log = open(root / "server.log", "w")  # noqa: SIM115 (closed in __exit__)
        cmd = [sys.executable, "-m", "connectors", "serve", "--http", "127.0.0.1:0"]
        data = self.data_dir if self.data_dir is not None else root / "data"
        cmd += ["--forward", "127.0.0.1:0", "--data-dir", str(data)]
        cmd += ["--config", str(root / "server.toml"), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.pid = self._proc.pid
        try:
            self._read_addresses()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _read_addresses(self) -> None:
        """Parses the URLs that ``serve`` prints once its listeners are bound."""
        assert self._proc is not None and self._proc.stdout is not None
        lines: list[str] = []
        done = threading.Event()
        stdout = self._proc.stdout

        def reader() -> None:
            for line in stdout:
                lines.append(line)
                if "Fluent Forward" in line:
                    done.set()
            done.set()  # end of output: the server exited

        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()
        done.wait(self.startup_timeout)
        text = "".join(lines)
        http = re.search(r"(http://[\d.]+:\d+)", text)
        fwd = re.search(r"Fluent Forward:\s+([\d.]+):(\d+)", text)
        if not (http and fwd):
            log = Path(self._log.name).read_text()[-3000:]
            raise RuntimeError(f"server did not start:\n{text}\n--- server.log ---\n{log}")
        self.http_url = http.group(1)
        self.forward_address = (fwd.group(1), int(fwd.group(2)))

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.http_url + path, timeout=30) as resp:
            return bytes(resp.read())

    def stats(self) -> dict[str, Any]:
        """The server's ``/v1/stats``."""
        return dict(json.loads(self.get("/v1/stats")))

    def metrics(self) -> str:
        """The server's Prometheus exposition at ``/metrics``."""
        return self.get("/metrics").decode()

    def wait_applied(self, events: int, timeout: float = 300.0) -> dict[str, Any]:
        """Polls ``/v1/stats`` until the model has applied ``events`` events."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["events_applied"] >= events:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {stats['events_applied']} of {events} events applied")
            time.sleep(0.1)

    def terminate(self) -> None:
        """Asks the server for its orderly shutdown (SIGTERM: drain, snapshot, close)."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """Ends the server at once (SIGKILL), skipping the drain and snapshot of a shutdown:
        for runs that leave a backlog nobody will read."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self._proc.wait()

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._proc.wait()
            reader = self._reader
            if reader is not None:
                reader.join(timeout=5)  # it ends at the end of the output
            if self._proc.stdout is not None and (reader is None or not reader.is_alive()):
                self._proc.stdout.close()
            self._proc = None
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def histogram_quantiles(
    exposition: str, metric: str, quantiles: tuple[float, ...]
) -> dict[str, Any]:
    """Quantiles of a Prometheus histogram from its cumulative buckets.

    Interpolates linearly inside the bucket holding the quantile, as PromQL's
    ``histogram_quantile`` does, so the figures are estimates bounded by the bucket edges. A
    quantile beyond the highest finite bucket is reported as that bucket's bound with
    ``pQ_above_top_bucket`` set: the true value is larger.
    """
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for line in exposition.splitlines():
        if line.startswith(f"{metric}_bucket{{"):
            bound = re.search(r'le="([^"]+)"', line)
            assert bound is not None
            buckets.append((float(bound.group(1)), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{metric}_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{metric}_sum"):
            total = float(line.rsplit(" ", 1)[1])
    buckets.sort()
    out: dict[str, Any] = {"count": count, "mean": total / count if count else None}
    for q in quantiles:
        value = None
        if count:
            rank, lo, below = q * count, 0.0, 0.0
            for le, cum in buckets:
                if cum >= rank:
                    if le == float("inf"):
                        value = lo
                        out[f"p{q * 100:g}_above_top_bucket"] = True
                    else:
                        inside = cum - below
                        value = lo + (le - lo) * ((rank - below) / inside if inside else 1.0)
                    break
                lo, below = le, cum
        out[f"p{q * 100:g}"] = value
    return out


@contextmanager
def child_process(cmd: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Runs ``cmd`` for the ``with`` block, then ends it by its pid (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(cmd, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, all) clock ticks of every CPU of this machine so far, from the first line
    of ``/proc/stat``: busy is everything but idle and iowait, steal included (time the
    hypervisor gave to others was not this machine's to use); guest time is inside user
    time, so it is not counted twice."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, ticks[7], sum(ticks)


def cpu_wait_seconds(pid: int) -> dict[int, float]:
    """Per thread of process ``pid``, the seconds it has spent so far runnable but waiting for
    a CPU: the second field of ``/proc/PID/task/TID/schedstat`` (nanoseconds on the run queue).
    Empty where the kernel keeps no scheduler statistics. Subtract two readings with
    :func:`waited`."""
    out: dict[int, float] = {}
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile, or no schedstat
    return out


def waited(before: dict[int, float], after: dict[int, float]) -> float:
    """Seconds of run-queue wait between two :func:`cpu_wait_seconds` readings, summed over
    the threads alive at the second (a thread that ended in between is not counted)."""
    return sum(w - before.get(tid, 0.0) for tid, w in after.items())


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of every thread of process ``pid`` so far, from
    ``/proc/PID/stat`` (fields 14 and 15 of proc(5), counted after the ")" closing the name)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
