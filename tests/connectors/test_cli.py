"""The ``recstream`` command line as a user runs it: real subprocesses, a real server.

Every failure a user can cause must end in one line on stderr and a non-zero exit, never a
traceback or a hang; ``token`` must sign with the running server's secret; ``replay`` must
be safe to repeat.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
PRODUCER_KEY = "producer-key-for-tests"


def recstream(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs ``recstream ARGS`` (as ``python -m connectors``) and returns what it did."""
    return subprocess.run(
        [sys.executable, "-m", "connectors", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
    env["PYTHONPATH"] = str(README.parent)
    env.update(extra or {})
    return env


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Asserts the command failed with exactly one line on stderr; returns that line."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@contextmanager
def serving(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, tuple[str, int]]]:
    """A ``recstream serve`` subprocess on ephemeral ports; yields (http url, forward addr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "connectors", "serve", "--http", "127.0.0.1:0"]
        + ["--forward", "127.0.0.1:0", *args],
        cwd=cwd,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        url, forward = "", ("", 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not forward[1]:
            line = proc.stdout.readline()
            if "dashboard and API:" in line:
                url = line.split("API:")[1].strip().rstrip("/")
            elif "Fluent Forward:" in line:
                host, port = line.split("Forward:")[1].strip().rsplit(":", 1)
                forward = (host, int(port))
            elif not line and proc.poll() is not None:
                raise RuntimeError("server did not start")
        assert url and forward[1], "server did not start in time"
        yield url, forward
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_applied(url: str, n: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/v1/stats", headers={"X-Recstream-Key": PRODUCER_KEY}).json()
        if stats["events_applied"] >= n or time.monotonic() > deadline:
            return stats  # type: ignore[no-any-return]
        time.sleep(0.05)


# --- token ---------------------------------------------------------------------------------


def test_token_signs_with_the_servers_secret_and_never_makes_one(tmp_path: Path) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    keys = {"RECSTREAM_PRODUCER_KEYS": PRODUCER_KEY}
    with serving(cwd=here, env=keys) as (url, _):  # default data dir: ./recstream-data
        secret = (here / "recstream-data" / "token_secret").resolve()

        def reads_list(token: str, user: str = "ann") -> int:
            r = httpx.get(f"{url}/v1/users/{user}/recommendations", params={"token": token})
            return r.status_code

        made = recstream("token", "ann", cwd=here)
        assert made.returncode == 0, made.stderr
        assert str(secret) in made.stderr  # says where the secret came from
        assert reads_list(made.stdout.strip()) == 200
        assert reads_list(made.stdout.strip(), "bob") in (401, 403)

        # From another directory: the data directory named, or refused with the way out.
        named = recstream("token", "ann", "--data-dir", str(here / "recstream-data"), cwd=elsewhere)
        assert named.returncode == 0 and reads_list(named.stdout.strip()) == 200
        via_env = recstream(
            "token", "ann", cwd=elsewhere, env={"RECSTREAM_DATA_DIR": str(here / "recstream-data")}
        )
        assert via_env.returncode == 0 and reads_list(via_env.stdout.strip()) == 200
        lost = recstream("token", "ann", cwd=elsewhere)
        line = one_line_error(lost)
        assert "no token secret" in line and "--data-dir" in line
        assert lost.stdout == ""
        assert list(elsewhere.iterdir()) == []  # no stray secret the server would never use

        given = recstream("token", "ann", cwd=elsewhere, env={"RECSTREAM_TOKEN_SECRET": "s3"})
        assert given.returncode == 0 and "RECSTREAM_TOKEN_SECRET" in given.stderr
        assert reads_list(given.stdout.strip()) in (401, 403)  # not this server's secret


# --- replay --------------------------------------------------------------------------------


def test_replay_fails_fast_when_no_server_listens(tmp_path: Path) -> None:
    data = tmp_path / "events.tsv"
    data.write_text("# user\titem\tweight\ttime\n1\t2\t1.0\t100\n")
    began = time.monotonic()
    line = one_line_error(
        recstream("replay", str(data), "--forward", f"127.0.0.1:{free_port()}", timeout=30)
    )
    assert time.monotonic() - began < 20
    assert "cannot reach a server" in line


def test_replay_refused_key_fails_fast_with_the_reason(tmp_path: Path) -> None:
    data = tmp_path / "events.tsv"
    data.write_text("# user\titem\tweight\ttime\n1\t2\t1.0\t100\n")
    with serving(cwd=tmp_path, env={"RECSTREAM_PRODUCER_KEYS": PRODUCER_KEY}) as (_, fwd):
        addr = f"{fwd[0]}:{fwd[1]}"
        wrong = one_line_error(recstream("replay", str(data), "--forward", addr, "--key", "nope"))
        assert "refused" in wrong and "mismatch" in wrong
        none = one_line_error(recstream("replay", str(data), "--forward", addr, timeout=30))
        assert "requires a shared key" in none
        ok = recstream("replay", str(data), "--forward", addr, "--key", PRODUCER_KEY)
        assert ok.returncode == 0, ok.stderr


def _readme_replay_csv_command() -> list[str]:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"^recstream replay \S+\.csv [^\n#]*", text, re.MULTILINE)
    assert found, "the README shows a CSV replay command"
    return shlex.split(found.group(0))


def test_readme_csv_replay_works_as_written_and_twice_counts_once(tmp_path: Path) -> None:
    argv = _readme_replay_csv_command()
    csv_name = next(a for a in argv if a.endswith(".csv"))
    rows = [
        (f"u{u}", f"i{(u * 7 + j) % 23}", 1_700_000_000 + u * 10 + j)
        for u in range(40)
        for j in range(3)
    ]
    (tmp_path / csv_name).write_text(
        "user,item,time\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    )
    with serving(cwd=tmp_path) as (url, fwd):
        # The README's command exactly, pointed at this test's server.
        command = [*argv[1:], "--forward", f"{fwd[0]}:{fwd[1]}"]
        first = recstream(*command, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert f"{len(rows)}/{len(rows)} events" in first.stderr
        assert wait_applied(url, len(rows))["events_applied"] == len(rows)
        again = recstream(*command, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        # One new event behind the replay: once it is applied, everything before it is too.
        httpx.post(url + "/v1/events", json={"user": "late", "item": "i1"}).raise_for_status()
        assert wait_applied(url, len(rows) + 1)["events_applied"] == len(rows) + 1
        # --no-ids opts out: the same file then counts again.
        fresh = recstream(*command, "--no-ids", cwd=tmp_path)
        assert fresh.returncode == 0, fresh.stderr
        assert wait_applied(url, 2 * len(rows) + 1)["events_applied"] == 2 * len(rows) + 1


def test_replay_of_a_file_without_times_lets_the_server_stamp_them(tmp_path: Path) -> None:
    """Row numbers order such a file; sent as times they would be refused as before 1990."""
    data = tmp_path / "no-times.csv"
    data.write_text("user,item\n" + "".join(f"u{u},i{u % 5}\n" for u in range(30)))
    with serving(cwd=tmp_path) as (url, fwd):
        done = recstream(
            "replay",
            str(data),
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--forward",
            f"{fwd[0]}:{fwd[1]}",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        stats = wait_applied(url, 30)
        assert stats["events_applied"] == 30 and stats["rejected"] == 0


# --- one-line errors -----------------------------------------------------------------------


def test_serve_refuses_a_port_in_use_and_a_held_data_dir(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(
            recstream("serve", "--data-dir", str(tmp_path / "a"), "--http", f"127.0.0.1:{port}")
        )
        assert f"127.0.0.1:{port} is already in use" in line and "--http" in line
    with serving("--data-dir", str(tmp_path / "held"), cwd=tmp_path):
        second = recstream(
            "serve", "--data-dir", str(tmp_path / "held"), "--http", "127.0.0.1:0",
            "--forward", "127.0.0.1:0",
        )  # fmt: skip
        line = one_line_error(second)
        assert "in use by another server" in line and str(tmp_path / "held") in line
    # Stopped: the lock went with the process and the directory serves again.
    with serving("--data-dir", str(tmp_path / "held"), cwd=tmp_path) as (url, _):
        assert httpx.get(url + "/healthz").status_code == 200


def test_usage_and_file_errors_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(recstream("serve", "--http", "8000"))
    assert "HOST:PORT" in line and "127.0.0.1:8000" in line
    line = one_line_error(recstream("serve", "--config", str(tmp_path / "missing.toml")))
    assert "no such file" in line and "missing.toml" in line
    line = one_line_error(recstream("replay", str(tmp_path / "nothing.tsv")))
    assert "nothing.tsv" in line
    line = one_line_error(recstream("snapshot", "--http", f"127.0.0.1:{free_port()}"))
    assert "no server at" in line
    version = recstream("--version")
    assert version.returncode == 0 and re.fullmatch(r"recstream \d+\.\d+\.\d+\S*\n", version.stdout)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[[variants]]\nname = "a"\nshare = 0.5\ndiversty = 0.3\n',
            "unknown parameter 'diversty'; did you mean 'diversity'?",
        ),
        ('[[variants]]\nname = "a"\nshare = 0.5\ndiversity = "lots"\n', "must be a number"),
        ("[model]\ndimm = 8\n", "unknown key 'dimm' in [model]"),
        ("snapshot_intervall = 5\n", "did you mean 'snapshot_interval'?"),
        ("[model\n", "recstream.toml"),
    ],
)
def test_config_mistakes_fail_at_start(tmp_path: Path, toml: str, expected: str) -> None:
    config = tmp_path / "recstream.toml"
    config.write_text(toml)
    line = one_line_error(
        recstream("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"))
    )
    assert expected in line
    assert not (tmp_path / "d").exists()  # refused before touching anything


# --- benchmarks ----------------------------------------------------------------------------


def test_quick_bench_run_never_touches_published_figures(tmp_path: Path) -> None:
    published = README.parent / "bench" / "results" / "crossover.json"
    before = (README.read_bytes(), published.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--only", "crossover"],
        cwd=README.parent,
        env=_env({"TMPDIR": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (README.read_bytes(), published.read_bytes()) == before
    quick = json.loads((tmp_path / "recstream-bench-quick" / "crossover.json").read_text())
    assert quick["command"] == "python -m bench crossover --quick"
    assert "| crossover |" in result.stdout  # the smoke table is printed instead
