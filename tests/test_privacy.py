"""Pseudonymisation at the edge: raw user ids never reach the disk."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from engine._config import load_config
from engine._frames import pseudonym

from .conftest import running_server, websocket, ws_url
from .connectors.test_forward import connect, forward, packed

KEY = b"operator-secret-key"
RAW = "alice-raw-id"


async def test_raw_user_ids_never_reach_the_disk(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_server(data_dir, pseudonymize_key=KEY) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            events = [{"user": RAW, "item": f"i{n}", "type": "click"} for n in range(4)]
            events += [{"user": f"other{n}", "item": f"i{n % 15}"} for n in range(45)]
            r = await http.post("/v1/events", json=events)
            assert r.status_code == 202
            # Over Forward too, plain and gzip-compressed, with acks.
            async with connect(server) as peer:
                await peer.send(forward([{"user": RAW, "item": "i4"}], chunk="f1"))
                assert await peer.recv() == {"ack": "f1"}
                await peer.send(packed([{"user": RAW, "item": "i5"}], chunk="f2", members=1))
                assert await peer.recv() == {"ack": "f2"}
            # And over the events websocket.
            async with websocket(ws_url(server, "/v1/ws/events")) as ws:
                await ws.send_message(json.dumps({"user": RAW, "item": "i6"}))
                reply = json.loads(await ws.get_message())
            await server.engine.wait_applied(reply["seq"])

            stored = pseudonym(KEY, RAW)
            assert server.engine.model.user_vector(RAW) is None
            assert set(server.engine.model.seen(stored)) == {f"i{n}" for n in range(7)}
            r = await http.get(f"/v1/users/{RAW}/recommendations", params={"k": 3})
            body = r.json()
            assert r.status_code == 200 and body["user"] == RAW and len(body["items"]) == 3
            assert not {it["item"] for it in body["items"]} & set(server.engine.model.seen(stored))
            async with websocket(ws_url(server, f"/v1/ws/recommendations?user={RAW}&k=3")) as ws:
                first = json.loads(await ws.get_message())
                assert [it["item"] for it in first["items"]] == [it["item"] for it in body["items"]]
            assert (await http.post("/v1/admin/snapshot")).status_code == 200
            listing = sorted(p.name for p in data_dir.iterdir())
            assert "snapshot.rsnap" in listing, listing
    # Shut down (final snapshot written): nothing on disk names the raw id.
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    listing = sorted(str(p.relative_to(data_dir)) for p in files)
    assert any(p.suffix == ".rsnap" for p in files), (listing, data_dir.exists())
    assert [p for p in files if RAW.encode() in p.read_bytes()] == []
    assert any(stored.encode() in p.read_bytes() for p in files if p.name.startswith("wal-"))

    # Restarted with the same key, the same raw id finds the same user.
    async with running_server(data_dir, pseudonymize_key=KEY) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            r = await http.delete(f"/v1/users/{RAW}")
            assert r.status_code == 200
            assert server.engine.model.seen(stored) == []


def test_key_from_the_environment() -> None:
    cfg = load_config(env={"RECSTREAM_PSEUDONYMIZE_KEY": "abc"})
    assert cfg.pseudonymize_key == b"abc"
