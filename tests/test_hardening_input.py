"""Attacks on the input paths, each against a real server: poisoned times, admin records sent
with a producer key, empty keys, and inputs that used to end in a 500 and a traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio

from connectors import Node
from connectors._auth import key_matches
from connectors._ratelog import RateLimitedLog
from engine import Model, ModelConfig
from engine._config import load_config
from engine._exceptions import ConfigError

from .conftest import running_server, websocket, ws_url

# --- time poisoning -----------------------------------------------------------------------


async def seed(server: Node, http: httpx.AsyncClient) -> None:
    """Forty users over ten items, item "i0" the most popular."""
    events = [{"user": f"u{u}", "item": f"i{(u * j) % 10}"} for u in range(40) for j in range(4)]
    r = await http.post("/v1/events", json=events)
    assert r.status_code == 202, r.text
    await server.engine.wait_applied(r.json()["seq"])


@pytest.mark.parametrize(
    "time_of",
    [
        lambda now: 1_796_070_000_000,  # milliseconds
        lambda now: now + 3_600,  # an hour ahead
        lambda now: 2**52,
        lambda now: 0,  # a missing time sent as 0
        lambda now: 86_400.5,
    ],
    ids=["milliseconds", "hour-ahead", "2^52", "zero", "one-day"],
)
async def test_one_event_cannot_steer_trending(
    server: Node, http: httpx.AsyncClient, time_of: Any
) -> None:
    await seed(server, http)
    evil = {"user": "evil", "item": "spam", "time": time_of(time.time())}
    r = await http.post("/v1/events", json=evil)
    assert r.status_code == 422, r.text
    assert "time" in r.json()["rejected"][0]["reason"]
    # The same over the websocket.
    async with websocket(ws_url(server, "/v1/ws/events")) as ws:
        await ws.send_message(json.dumps(evil))
        reply = json.loads(await ws.get_message())
        assert "time" in reply["rejected"][0]["reason"]
    # Normal traffic is what trending and unknown users see.
    trending = [it["item"] for it in (await http.get("/v1/trending")).json()["items"]]
    assert "spam" not in trending and trending
    fresh = (await http.get("/v1/users/stranger/recommendations")).json()["items"]
    assert "spam" not in [it["item"] for it in fresh] and fresh


async def test_a_time_within_the_skew_counts_as_now(server: Node, http: httpx.AsyncClient) -> None:
    await seed(server, http)
    r = await http.post(
        "/v1/events", json={"user": "early", "item": "i3", "time": time.time() + 120}
    )
    assert r.status_code == 202, r.text
    await server.engine.wait_applied(r.json()["seq"])
    assert server.engine.model.stats()["newest_ts"] <= time.time()


def test_the_library_refuses_far_future_times_and_clamps_near_ones() -> None:
    m = Model(ModelConfig(dim=8, max_clock_skew=60.0))
    with pytest.raises(ValueError, match="ahead of the server's clock"):
        m.ingest(["u"], ["spam"], ts=[time.time() + 3_600])
    with pytest.raises(ValueError, match="year 9999"):
        m.ingest(["u"], ["spam"], ts=[1_796_070_000_000.0])
    assert m.stats()["events_applied"] == 0
    m.ingest(["u"], ["i"], ts=[time.time() + 30])
    assert m.stats()["newest_ts"] <= time.time()
    with pytest.raises(ValueError, match="max_clock_skew"):
        Model(ModelConfig(max_clock_skew=float("nan")))


def test_a_loaded_snapshot_takes_the_servers_clock_skew(tmp_path: Path) -> None:
    m = Model(ModelConfig(dim=8, max_clock_skew=3_600.0))
    m.ingest(["u"], ["i"], ts=[time.time()])
    m.save(tmp_path / "m.rsnap")
    strict = Model.load(tmp_path / "m.rsnap", ModelConfig(dim=8, max_clock_skew=10.0))
    with pytest.raises(ValueError, match="ahead of the server's clock"):
        strict.ingest(["u"], ["j"], ts=[time.time() + 60])
    lenient = Model.load(tmp_path / "m.rsnap", ModelConfig(dim=8, max_clock_skew=3_600.0))
    lenient.ingest(["u"], ["j"], ts=[time.time() + 60])
    assert lenient.stats()["events_applied"] == 2


def test_replay_counts_events_at_their_acceptance_time() -> None:
    """A journaled frame applies alike live and after a restart: its events count at most at
    the time the server accepted it, and those too far ahead of that are refused."""
    accepted = 1_700_000_000.0
    frame = msgpack.packb(
        [
            "t",
            [
                [accepted + 100, {"user": "u", "item": "a"}],
                [accepted + 10**6, {"user": "u", "item": "b"}],
            ],
        ]
    )
    m = Model(ModelConfig(dim=8))
    report = m.ingest_forward(frame, accepted)
    assert report["applied"] == 1 and report["rejected"][0][0] == 1
    assert m.stats()["newest_ts"] == accepted
    with pytest.raises(ValueError, match="accepted_at"):
        m.ingest_forward(frame, float("inf"))


async def test_replay_after_restart_keeps_the_clock_where_it_was_live(tmp_path: Path) -> None:
    """An accepted near-future event counts at its acceptance time when the journal is
    replayed too (the snapshots are removed, so recovery replays every record)."""
    async with running_server(tmp_path / "d") as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            await seed(server, http)
            r = await http.post(
                "/v1/events", json={"user": "x", "item": "i1", "time": time.time() + 200}
            )
            assert r.status_code == 202
            await server.engine.wait_applied(r.json()["seq"])
            live = server.engine.model.stats()
    for snapshot in (tmp_path / "d").glob("*.rsnap"):
        snapshot.unlink()
    async with running_server(tmp_path / "d") as server:
        replayed = server.engine.model.stats()
        assert replayed["events_applied"] == live["events_applied"] == 161
        assert replayed["newest_ts"] == live["newest_ts"] <= time.time()


# --- admin records ------------------------------------------------------------------------

KEYS = {"producer_keys": ("producer",), "admin_key": "admin"}


@pytest.mark.parametrize(
    "record", [{"erase_user": "bob"}, {"item": "emma", "available": False}], ids=["erase", "item"]
)
async def test_admin_records_need_the_admin_key(tmp_path: Path, record: dict[str, Any]) -> None:
    async with running_server(tmp_path / "d", **KEYS) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            as_producer = {"X-Recstream-Key": "producer"}
            r = await http.post("/v1/events", json=record, headers=as_producer)
            assert r.status_code == 403 and "admin key" in r.json()["error"]
            # In a list with good events the whole request is refused.
            both = [{"user": "bob", "item": "a"}, record]
            assert (
                await http.post("/v1/events", json=both, headers=as_producer)
            ).status_code == 403
            assert server.engine.stats()["wal_seq"] == 0
            url = ws_url(server, "/v1/ws/events?key=producer")
            async with websocket(url) as ws:
                await ws.send_message(json.dumps(record))
                assert "admin key" in json.loads(await ws.get_message())["error"]
                await ws.send_message(msgpack.packb(record))
                assert "admin key" in json.loads(await ws.get_message())["error"]
                # The connection still serves the producer's events.
                await ws.send_message(json.dumps({"user": "bob", "item": "a"}))
                assert json.loads(await ws.get_message())["ack"] == 1
            assert server.engine.stats()["wal_seq"] == 1
            r = await http.post("/v1/events", json=record, headers={"X-Recstream-Key": "admin"})
            assert r.status_code == 202, r.text
            async with websocket(ws_url(server, "/v1/ws/events?key=admin")) as ws:
                await ws.send_message(json.dumps(record))
                assert json.loads(await ws.get_message())["ack"] == 1


async def test_without_auth_admin_records_stay_allowed(tmp_path: Path) -> None:
    async with running_server(tmp_path / "d", insecure=True) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            r = await http.post("/v1/events", json=[{"erase_user": "bob"}, {"item": "emma"}])
            assert r.status_code == 202, r.text


# --- empty keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"producer_keys": [""]},
        {"producer_keys": ["good", "   "]},
        {"admin_key": ""},
        {"admin_key": " \t"},
        {"token_secret": b""},
        {"pseudonymize_key": "  "},
    ],
)
def test_blank_keys_are_refused_from_flags(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="empty or blank"):
        load_config(env={}, **overrides)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECSTREAM_PRODUCER_KEYS", " "),
        ("RECSTREAM_PRODUCER_KEYS", "a,,b"),
        ("RECSTREAM_ADMIN_KEY", "  "),
        ("RECSTREAM_TOKEN_SECRET", " "),
        ("RECSTREAM_PSEUDONYMIZE_KEY", " "),
    ],
)
def test_blank_keys_are_refused_from_the_environment(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match="empty or blank"):
        load_config(env={name: value})


def test_blank_keys_are_refused_from_the_file_and_the_server_does_not_start(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "recstream.toml"
    conf.write_text('producer_keys = [""]\n')
    with pytest.raises(ConfigError, match="producer_keys"):
        load_config(conf, env={})
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "connectors", "serve", "--config", str(conf)),
            *("--data-dir", str(tmp_path / "d"), "--http", "0.0.0.0:0", "--forward", "127.0.0.1:0"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")},
    )
    assert proc.returncode != 0
    assert "empty or blank" in proc.stderr


def test_empty_presented_keys_never_match() -> None:
    assert not key_matches("", ("",))
    assert not key_matches("  ", ("  ",))
    assert not key_matches("", ("real",))
    assert key_matches("real", ("", "real"))
    assert not key_matches("\ud800", ("real",))


def test_an_empty_token_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token_secret").write_bytes(b"\n")
    with pytest.raises(ConfigError, match="token_secret"):
        load_config(env={}, data_dir=tmp_path).with_token_secret()


# --- 4xx, never 500 -----------------------------------------------------------------------

LONG = "x" * 300
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _bytes_key_map() -> bytes:
    return msgpack.packb({b"user": "a", "item": "b"}, use_bin_type=True)


HTTP_ATTACKS: list[tuple[str, str, str | None]] = [
    ("POST", "/v1/events", '{"user": 18446744073709551616, "item": "b"}'),
    ("POST", "/v1/events", '{"user": "a", "item": -9223372036854775809}'),
    ("POST", "/v1/events", '{"user": 18446744073709551615, "item": "b"}'),
    ("POST", "/v1/events", f'{{"user": "a", "item": "b", "time": {2**70}}}'),
    ("POST", "/v1/events", f'{{"user": "a", "item": "b", "weight": {2**70}}}'),
    ("POST", "/v1/events", '{"user": "\\ud800", "item": "b"}'),
    ("POST", "/v1/events", '{"user": "a", "item": "b", "tags": ["\\udfff"]}'),
    ("POST", "/v1/events", '{"\\ud800": 1, "user": "a", "item": "b"}'),
    ("POST", "/v1/events", DEEP_JSON),
    ("PUT", "/v1/items/b", DEEP_JSON),
    ("PUT", "/v1/items/b", '{"category": "\\ud800"}'),
    ("GET", f"/v1/users/{LONG}/recommendations", None),
    ("GET", f"/v1/items/{LONG}/similar", None),
    ("DELETE", f"/v1/users/{LONG}", None),
    ("GET", f"/v1/users/u/recommendations?exclude={LONG}", None),
]

WS_ATTACKS: list[str | bytes] = [
    _bytes_key_map(),
    msgpack.packb([{"user": "a", "item": "b"}, {b"\xff": 1}], use_bin_type=True),
    "[" * 5_000 + "]" * 5_000,
    '{"user": "\\ud800", "item": "b"}',
    '{"\\ud800": 1}',
    '{"user": 18446744073709551616, "item": "b"}',
    f'{{"user": "a", "item": "b", "time": {2**70}}}',
]


@pytest.mark.parametrize(
    "attack",
    [pytest.param(a, id=f"{a[0]} {a[1][:40]} {(a[2] or '')[:40]}") for a in HTTP_ATTACKS]
    + [pytest.param(m, id=f"ws {m[:40]!r}") for m in WS_ATTACKS],
)
async def test_hostile_input_gets_a_4xx_with_a_reason(
    server: Node, http: httpx.AsyncClient, attack: tuple[str, str, str | None] | str | bytes
) -> None:
    if isinstance(attack, tuple):
        method, path, body = attack
        r = await http.request(method, path, content=body)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]
        assert server.engine.stats()["wal_seq"] == 0, "nothing of a refused request is journaled"
    else:
        async with websocket(ws_url(server, "/v1/ws/events")) as ws:
            await ws.send_message(attack)
            reply = json.loads(await ws.get_message())
            assert reply.get("error"), reply
            assert server.engine.stats()["wal_seq"] == 0, (
                "nothing of a refused message is journaled"
            )
            # The connection survives the bad message.
            await ws.send_message(json.dumps({"user": "a", "item": "b"}))
            assert json.loads(await ws.get_message())["ack"] == 1
    # ...and the server keeps serving everyone.
    r = await http.post("/v1/events", json={"user": "a", "item": "b"})
    assert r.status_code == 202


async def test_a_flood_of_garbage_keeps_the_log_small(
    server: Node, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Everything the server side logs: the engine, the web server, and any library's warnings.
    caplog.set_level(logging.DEBUG, "recstream")
    caplog.set_level(logging.INFO, "hypercorn")
    caplog.set_level(logging.WARNING)
    host, port = server.forward_address
    sent = 0
    while sent < 10_000:
        async with websocket(ws_url(server, "/v1/ws/events")) as ws:
            for n in range(2_000):
                await ws.send_message(WS_ATTACKS[n % len(WS_ATTACKS)])
                assert "error" in json.loads(await ws.get_message())
        for method, path, body in HTTP_ATTACKS:
            r = await http.request(method, path, content=body)
            assert r.status_code < 500
        # Forward connections that each send a malformed frame: each is closed and logged.
        for _ in range(100):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"\xc1 not msgpack")
                with trio.fail_after(10):
                    while await stream.receive_some(1024):
                        pass
        sent += 2_000 + len(HTTP_ATTACKS) + 100
    closed = server.engine.metrics.registry.get_sample_value(
        "recstream_rejects_total", {"reason": "forward_protocol"}
    )
    assert closed is not None and closed >= 400
    server_side = [
        r
        for r in caplog.records
        if r.name.startswith(("recstream", "hypercorn")) or r.levelno >= logging.WARNING
    ]
    size = sum(len(caplog.handler.format(r)) for r in server_side)
    assert size < 20_000, f"{len(server_side)} log records, {size} characters"


def test_repeated_reasons_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("test.ratelog"), interval=10.0, max_reasons=3, clock=lambda: now[0]
    )
    caplog.set_level(logging.INFO, "test.ratelog")
    for n in range(1_000):
        limited.log(logging.WARNING, "peer %s: frame over %d bytes", "10.0.0.1", n)
    assert len(caplog.records) == 1
    now[0] = 11.0
    limited.log(logging.WARNING, "peer %s: frame over %d bytes", "10.0.0.1", 5)
    assert "999 similar line(s) suppressed" in caplog.records[-1].getMessage()
    # Distinct reasons each get a line; the table stays bounded.
    for n in range(100):
        limited.log(logging.WARNING, f"reason {'abcdefghij'[n % 10]}")
    assert len(caplog.records) <= 2 + 3
    assert len(limited._reasons) <= 3 + 1  # the shared slot for reasons over the limit
