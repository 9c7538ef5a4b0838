"""HTTP and websocket endpoints against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed

from connectors import Node
from connectors._auth import issue_token

from ..conftest import running_server, server_config, websocket, ws_url


async def post(http: httpx.AsyncClient, events: object, **kw: object) -> httpx.Response:
    return await http.post("/v1/events", content=json.dumps(events), **kw)  # type: ignore[arg-type]


async def test_events_then_recommendations(server: Node, http: httpx.AsyncClient) -> None:
    events = [
        {"user": f"u{u}", "item": f"i{(u + j) % 7}", "type": "click"}
        for u in range(20)
        for j in range(3)
    ]
    r = await post(http, events)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 60
    await server.engine.wait_applied(body["seq"])
    r = await http.get("/v1/users/u1/recommendations", params={"k": 3, "explain": 1})
    assert r.status_code == 200
    rec = r.json()
    assert rec["user"] == "u1" and rec["variant"] == "default" and rec["version"] >= body["seq"]
    assert len(rec["items"]) == 3
    seen = {f"i{(1 + j) % 7}" for j in range(3)}
    assert not seen & {it["item"] for it in rec["items"]}
    assert all(set(it["because"]) <= seen for it in rec["items"])
    stats = (await http.get("/v1/stats")).json()
    assert stats["events_applied"] == 60 and stats["users"] == 20 and stats["items"] == 7
    assert stats["wal_seq"] >= 1
    r = await http.get("/v1/items/i1/similar", params={"k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert (await http.get("/v1/items/nope/similar")).status_code == 404
    assert (await http.get("/v1/trending")).json()["items"]


async def test_integer_ids_round_trip_through_urls(server: Node, http: httpx.AsyncClient) -> None:
    r = await post(http, [{"user": 42, "item": 7}, {"user": 42, "item": 8}, {"user": 1, "item": 9}])
    await server.engine.wait_applied(r.json()["seq"])
    rec = (await http.get("/v1/users/42/recommendations")).json()
    assert rec["user"] == 42
    assert [it["item"] for it in rec["items"]] == [9]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "not JSON"),
        ("[]", 400, "no events"),
        ('"a string"', 400, "JSON object"),
        ('{"user": "a", "item": "b", "colour": "red"}', 400, "unknown field"),
        ('{"user": "a", "item": "b", "weight": "heavy"}', 422, "weight"),
        ('{"user": "a", "item": "b", "weight": -1}', 422, "weight"),
        ('{"user": "a", "item": "b", "type": "teleport"}', 422, "teleport"),
        ('{"user": ["a"], "item": "b"}', 422, "user"),
        ('{"user": "%s", "item": "b"}' % ("x" * 300), 422, "user"),
        ('{"user": "a", "item": "b", "time": "yesterday"}', 400, "time"),
    ],
)
async def test_bad_events_are_refused_with_a_reason(
    server: Node, http: httpx.AsyncClient, body: str, status: int, fragment: str
) -> None:
    r = await http.post("/v1/events", content=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"] + json.dumps(r.json().get("rejected", ""))
    assert server.engine.stats()["wal_seq"] == 0, "nothing of a refused request is journaled"
    # ...and the server keeps serving.
    ok = await post(http, {"user": "a", "item": "b"})
    assert ok.status_code == 202


async def test_a_bad_event_refuses_the_whole_request(server: Node, http: httpx.AsyncClient) -> None:
    r = await post(
        http, [{"user": "a", "item": "b"}, {"user": "a", "item": "c", "weight": float("inf")}]
    )
    # JSON has no Infinity in strict mode; Python emits it and the decoder refuses the weight.
    assert r.status_code in (400, 422)
    assert server.engine.model.stats()["events_applied"] == 0


async def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_body_bytes=1000) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            r = await post(http, [{"user": "a", "item": f"i{n}"} for n in range(200)])
            assert r.status_code == 413
            assert (await post(http, {"user": "a", "item": "b"})).status_code == 202


async def test_events_over_websocket_json_and_msgpack(server: Node) -> None:
    async with websocket(ws_url(server, "/v1/ws/events")) as ws:
        await ws.send_message(json.dumps([{"user": "w", "item": "a"}, {"user": "w", "item": "b"}]))
        ack = json.loads(await ws.get_message())
        assert ack["ack"] == 2
        await ws.send_message(msgpack.packb({"user": "w", "item": "c", "type": "cart"}))
        ack2 = json.loads(await ws.get_message())
        assert ack2["ack"] == 1 and ack2["seq"] > ack["seq"]
        await ws.send_message(json.dumps({"user": "w", "item": "d", "weight": "x"}))
        err = json.loads(await ws.get_message())
        assert "error" in err and err["rejected"][0]["index"] == 0
        await ws.send_message(b"\xc1\xc1")
        assert "error" in json.loads(await ws.get_message())
    await server.engine.wait_applied(ack2["seq"])
    assert sorted(server.engine.model.seen("w")) == ["a", "b", "c"]


async def test_oversized_websocket_message_closes_1009(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_body_bytes=2000) as server:
        async with websocket(ws_url(server, "/v1/ws/events")) as ws:
            await ws.send_message("x" * 5000)
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 1009
        # Everyone else is still served.
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await post(http, {"user": "a", "item": "b"})).status_code == 202


async def test_subscriber_gets_initial_list_then_a_push_naming_the_cause(
    server: Node, http: httpx.AsyncClient
) -> None:
    r = await post(http, [{"user": f"u{n}", "item": f"i{n % 5}"} for n in range(30)])
    await server.engine.wait_applied(r.json()["seq"])
    async with websocket(ws_url(server, "/v1/ws/recommendations?user=sub&k=5")) as ws:
        first = json.loads(await ws.get_message())
        assert first["user"] == "sub" and len(first["items"]) == 5 and first["cause"] is None
        sent = time.time()
        await post(http, {"user": "sub", "item": "i0", "type": "purchase", "id": "evt-1"})
        with trio.fail_after(5):
            push = json.loads(await ws.get_message())
        assert push["version"] > first["version"]
        assert "i0" not in [it["item"] for it in push["items"]]
        assert push["cause"]["id"] == "evt-1"
        assert sent - 1 <= push["cause"]["accepted_at"] <= time.time()


async def test_admin_erase_and_item_attributes(server: Node, http: httpx.AsyncClient) -> None:
    r = await post(http, [{"user": "gone", "item": "a"}, {"user": "stay", "item": "a"}])
    await server.engine.wait_applied(r.json()["seq"])
    r = await http.put(
        "/v1/items/b", content=json.dumps({"category": "c1", "tags": ["t"], "available": True})
    )
    assert r.status_code == 200
    r = await http.get("/v1/users/stay/recommendations", params={"category": "c1"})
    assert [it["item"] for it in r.json()["items"]] == ["b"]
    r = await http.delete("/v1/users/gone")
    assert r.status_code == 200 and r.json()["erased"]
    assert (
        server.engine.model.user_vector("gone") is None and server.engine.model.seen("gone") == []
    )
    assert (await http.put("/v1/items/b", content="[1]")).status_code == 400


async def test_health_metrics_dashboard(server: Node, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).text == "ok"
    assert (await http.get("/readyz")).status_code == 200
    await post(http, {"user": "a", "item": "b"})
    metrics = (await http.get("/metrics")).text
    assert 'recstream_events_total{result="accepted",source="http"} 1.0' in metrics
    assert "recstream_push_latency_seconds_bucket" in metrics
    page = await http.get("/")
    assert page.status_code == 200 and "<title>recstream</title>" in page.text


# --- auth -------------------------------------------------------------------------------


async def test_keys_and_tokens(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, producer_keys=("pk",), admin_key="ak", token_secret=b"s3cret"
    ) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await post(http, {"user": "a", "item": "b"})).status_code == 401
            assert (
                await post(http, {"user": "a", "item": "b"}, headers={"X-Recstream-Key": "bad"})
            ).status_code == 401
            r = await post(http, {"user": "a", "item": "b"}, headers={"X-Recstream-Key": "pk"})
            assert r.status_code == 202
            await server.engine.wait_applied(r.json()["seq"])
            assert (
                await http.delete("/v1/users/a", headers={"X-Recstream-Key": "pk"})
            ).status_code == 401
            assert (await http.get("/v1/users/a/recommendations")).status_code == 401
            token_a = issue_token(b"s3cret", "a", ttl=60)
            ok = await http.get("/v1/users/a/recommendations", params={"token": token_a})
            assert ok.status_code == 200
            other = await http.get("/v1/users/b/recommendations", params={"token": token_a})
            assert other.status_code == 403
        base = ws_url(server, "/v1/ws/recommendations")
        # A valid token for user A cannot subscribe to user B; expired and tampered are refused.
        expired = issue_token(b"s3cret", "a", ttl=-10)
        tampered = token_a[:-2] + ("AA" if not token_a.endswith("AA") else "BB")
        for user, token in (("b", token_a), ("a", expired), ("a", tampered), ("a", "garbage")):
            async with websocket(f"{base}?user={user}&token={token}") as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason.code == 1008
        async with websocket(f"{base}?user=a&token={token_a}") as ws:
            assert json.loads(await ws.get_message())["user"] == "a"


def test_non_loopback_listener_without_keys_refuses_to_start(tmp_path: Path) -> None:
    from engine._exceptions import ConfigError

    with pytest.raises(ConfigError):
        Node(server_config(tmp_path, http_host="0.0.0.0"))
    with pytest.raises(ConfigError):
        Node(server_config(tmp_path, forward_host="192.0.2.1"))
    assert Node(
        server_config(tmp_path, http_host="0.0.0.0", producer_keys=("k",))
    ).config.auth_enabled


# --- recommendation features -------------------------------------------------------------


async def _catalog(server: Node, http: httpx.AsyncClient) -> None:
    """Books b0..b9 and films f0..f9, each with ten crowd events; fresh items n0..n9 with one
    event each; user "me" has read b0."""
    for i in range(10):
        for kind in ("b", "f"):
            r = await http.put(
                f"/v1/items/{kind}{i}", content=json.dumps({"category": f"{kind}-cat"})
            )
            assert r.status_code == 200
    events = [
        {"user": f"crowd{c}", "item": f"{kind}{i}"}
        for c in range(10)
        for i in range(10)
        for kind in ("b", "f")
    ]
    events += [{"user": f"lone{i}", "item": f"n{i}"} for i in range(10)]
    events += [{"user": "me", "item": "b0", "type": "purchase"}]
    r = await post(http, events)
    await server.engine.wait_applied(r.json()["seq"])


async def test_filters_over_http(server: Node, http: httpx.AsyncClient) -> None:
    await _catalog(server, http)

    async def items(user: str, **params: object) -> list:
        r = await http.get(f"/v1/users/{user}/recommendations", params=params)  # type: ignore[arg-type]
        assert r.status_code == 200, r.text
        return [it["item"] for it in r.json()["items"]]

    got = await items("me", k=30, exclude_category="f-cat")
    assert got and all(not i.startswith("f") for i in got) and "b0" not in got
    neither = await items("me", k=30, exclude_category="f-cat,b-cat")
    assert sorted(neither) == [f"n{i}" for i in range(10)]  # only the uncategorised items
    # An unavailable item is never shown: known or unknown user, any filter, trending too.
    assert "b1" in await items("stranger", k=30)
    r = await http.put("/v1/items/b1", content=json.dumps({"available": False}))
    await server.engine.wait_applied(r.json()["seq"])
    for user in ("me", "stranger"):
        for params in ({}, {"category": "b-cat"}, {"diversity": 0.5}, {"exploration": 0.5}):
            assert "b1" not in await items(user, k=30, **params), (user, params)
    trending = (await http.get("/v1/trending", params={"k": 30})).json()["items"]
    assert "b1" not in [it["item"] for it in trending]
    for bad in ({"diversity": "2"}, {"diversity": "x"}, {"exploration": "-0.1"}):
        r = await http.get("/v1/users/me/recommendations", params=bad)
        assert r.status_code == 400, bad


async def test_diversity_and_exploration_over_http(server: Node, http: httpx.AsyncClient) -> None:
    await _catalog(server, http)
    url = "/v1/users/me/recommendations"
    plain = (await http.get(url, params={"k": 10})).json()["items"]
    assert not any("explore" in it for it in plain)
    explored = (await http.get(url, params={"k": 10, "exploration": 0.2})).json()["items"]
    flagged = [it["item"] for it in explored if it.get("explore")]
    assert len(flagged) == 2 and all(i.startswith("n") for i in flagged), explored
    assert all(it["explore"] is True for it in explored if "explore" in it)
    diverse = (await http.get(url, params={"k": 10, "diversity": 0.3})).json()["items"]
    assert diverse[0]["item"] == plain[0]["item"] and len(diverse) == 10


async def test_push_carries_explanations(server: Node, http: httpx.AsyncClient) -> None:
    await _catalog(server, http)
    async with websocket(ws_url(server, "/v1/ws/recommendations?user=me&k=5&explain=1")) as ws:
        first = json.loads(await ws.get_message())
        assert all(it["because"] == ["b0"] for it in first["items"]), first
        r = await post(http, {"user": "me", "item": "f3", "type": "purchase"})
        with trio.fail_after(5):
            while True:
                push = json.loads(await ws.get_message())
                if push["cause"] is not None and push["cause"]["seq"] == r.json()["seq"]:
                    break
        assert all(it["because"] and set(it["because"]) <= {"b0", "f3"} for it in push["items"])
        assert any("f3" in it["because"] for it in push["items"])
    async with websocket(ws_url(server, "/v1/ws/recommendations?user=me&k=5")) as ws:
        assert all("because" not in it for it in json.loads(await ws.get_message())["items"])


async def test_push_does_not_repeat_items_within_repush_after(
    server: Node, http: httpx.AsyncClient
) -> None:
    await _catalog(server, http)
    pushed: list[set] = []

    def check(msg: dict) -> list:
        items = [it["item"] for it in msg["items"]]
        assert len(items) == 3
        for earlier in pushed:
            assert not earlier & set(items), (pushed, items)
        pushed.append(set(items))
        return items

    async with websocket(
        ws_url(server, "/v1/ws/recommendations?user=me&k=3&repush_after=60")
    ) as ws:
        check(json.loads(await ws.get_message()))
        for _ in range(4):
            # Acting on the top of the user's unfiltered list always changes it (the item
            # becomes seen), which triggers a push: by the event's own recompute, or by a drift
            # refresh that computed after the event was applied. Every push is checked.
            top = (await http.get("/v1/users/me/recommendations", params={"k": 1})).json()
            await post(http, {"user": "me", "item": top["items"][0]["item"], "type": "purchase"})
            with trio.fail_after(5):
                check(json.loads(await ws.get_message()))
    assert len(pushed) >= 5
