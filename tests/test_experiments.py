"""A/B variants: stable assignment, variant in every answer, attribution, Wilson intervals."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from engine._config import load_config
from engine._exceptions import ConfigError
from engine._experiments import Experiments, Variant, assign, wilson_interval

from .conftest import running_server, websocket, ws_url

VARIANTS = (
    Variant(name="control", share=0.5),
    Variant(name="short", share=0.5, k=3, params={"diversity": 0.3, "no_such_param": 1}),
)


def test_wilson_interval_matches_the_formula() -> None:
    # Reference values: Wilson (1927) score interval, z = 1.96 (e.g. Newcombe 1998, table I:
    # 81/263 -> 0.2553..0.3662).
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)


def test_assignment_is_stable_and_follows_the_shares() -> None:
    variants = (Variant(name="a", share=0.2), Variant(name="b", share=0.3))
    names = [assign(variants, "s1", f"user{n}") for n in range(20_000)]
    counts = {n: sum(1 for v in names if (v.name if v else None) == n) for n in ("a", "b", None)}
    assert counts["a"] / 20_000 == pytest.approx(0.2, abs=0.015)
    assert counts["b"] / 20_000 == pytest.approx(0.3, abs=0.015)
    assert counts[None] / 20_000 == pytest.approx(0.5, abs=0.015)
    assert [assign(variants, "s1", f"user{n}") for n in range(50)] == names[:50]
    other_salt = [assign(variants, "s2", f"user{n}") for n in range(200)]
    assert other_salt != names[:200]


def test_attribution_window_and_bounded_memory() -> None:
    ex = Experiments(VARIANTS, window=60.0, per_user=2, max_users=3)
    user = next(u for u in (f"u{n}" for n in range(100)) if ex.name_of(u) == "short")
    ex.impression(user, ["a", "b"], now=1000.0)
    assert ex.interaction(user, "a", now=1030.0) == "short"
    assert ex.interaction(user, "b", now=1030.0) == "short"  # same impression, counted once
    assert ex.interaction(user, "a", now=1061.0) is None  # outside the window
    assert ex.interaction(user, "zzz", now=1001.0) is None  # never shown
    short = next(v for v in ex.report()["variants"] if v["name"] == "short")
    assert (short["impressions"], short["interactions"], short["converted"]) == (1, 2, 1)
    ex.impression(user, ["c"], now=1100.0)
    ex.impression(user, ["d"], now=1101.0)
    assert ex.interaction(user, "a", now=1102.0) is None  # only the newest two are kept
    for n in range(10):
        ex.impression(f"other{n}", ["x"], now=1100.0)
    assert len(ex._shown) == 3


def test_variants_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        '[[variants]]\nname = "a"\nshare = 0.5\nk = 4\ndiversity = 0.2\n'
        '[[variants]]\nname = "b"\nshare = 0.5\nexploration = 0.1\n'
    )
    cfg = load_config(path)
    assert cfg.variants == (
        Variant(name="a", share=0.5, k=4, params={"diversity": 0.2}),
        Variant(name="b", share=0.5, params={"exploration": 0.1}),
    )
    path.write_text(
        '[[variants]]\nname = "a"\nshare = 0.7\n[[variants]]\nname = "b"\nshare = 0.7\n'
    )
    with pytest.raises(ConfigError):
        load_config(path)


async def test_variants_over_http_and_websocket(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", variants=VARIANTS) as server:
        ex = server.engine.experiments
        users = [f"v{n}" for n in range(40)]
        by_variant = {
            name: [u for u in users if ex.name_of(u) == name] for name in ("control", "short")
        }
        assert by_variant["control"] and by_variant["short"]
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            events = [{"user": f"seed{n}", "item": f"i{n % 12}"} for n in range(60)]
            r = await http.post("/v1/events", json=events)
            await server.engine.wait_applied(r.json()["seq"])
            shown: dict[str, list[str]] = {}
            for u in users:
                body = (await http.get(f"/v1/users/{u}/recommendations")).json()
                assert body["variant"] == ex.name_of(u)
                # The variant's k applies when the request names none; an override the
                # installed model does not accept is left out instead of failing.
                assert len(body["items"]) == (3 if body["variant"] == "short" else 10)
                shown[u] = [it["item"] for it in body["items"]]
            # An explicit k wins over the variant's.
            u = by_variant["short"][0]
            r = await http.get(f"/v1/users/{u}/recommendations", params={"k": 5})
            assert len(r.json()["items"]) == 5
            # Clicks on shown items are credited; clicks on other items are not.
            control, short = by_variant["control"][:3], by_variant["short"][:2]
            clicks = [{"user": u, "item": shown[u][0], "type": "click"} for u in control + short]
            clicks.append({"user": control[0], "item": "never-shown"})
            r = await http.post("/v1/events", json=clicks)
            assert r.status_code == 202
            report = (await http.get("/v1/experiments")).json()
            rows = {v["name"]: v for v in report["variants"]}
            assert rows["control"]["impressions"] == len(by_variant["control"])
            assert rows["short"]["impressions"] == len(by_variant["short"]) + 1
            assert rows["control"]["interactions"] == 3 and rows["short"]["interactions"] == 2
            n = rows["control"]["impressions"]
            assert rows["control"]["rate"] == pytest.approx(3 / n)
            assert rows["control"]["ci95"] == pytest.approx(list(wilson_interval(3, n)))
            assert report["interval"] == "wilson"

            # Pushes name the variant too.
            user = by_variant["short"][1]
            async with websocket(ws_url(server, f"/v1/ws/recommendations?user={user}")) as ws:
                first = json.loads(await ws.get_message())
                assert first["variant"] == "short" and len(first["items"]) == 3
                await http.post(
                    "/v1/events", json={"user": user, "item": first["items"][0]["item"]}
                )
                # The push may be the event's own or a drift refresh that computed after the
                # event was applied (the clicks above moved item vectors): either names the
                # variant.
                with trio.fail_after(5):
                    push = json.loads(await ws.get_message())
                assert push["variant"] == "short" and len(push["items"]) == 3
            rows = {v["name"]: v for v in (await http.get("/v1/experiments")).json()["variants"]}
            assert rows["short"]["interactions"] == 3


async def test_without_variants_everyone_is_default(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data") as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            body = (await http.get("/v1/users/anyone/recommendations")).json()
            assert body["variant"] == "default"
            assert (await http.get("/v1/experiments")).json()["variants"] == []


async def test_overrides_reach_recommend_only_when_the_model_accepts_them(
    tmp_path: Path,
) -> None:
    async with running_server(tmp_path / "data", variants=VARIANTS) as server:
        short = VARIANTS[1]
        accepted = server.engine._recommend_params
        assert accepted is not None and "k" in accepted and "no_such_param" not in accepted
        expected = {k: v for k, v in short.params.items() if k in accepted}
        assert server.engine.recommend_params(short) == expected
        assert "no_such_param" not in server.engine.recommend_params(short)
        # A model that accepts the override gets it.
        server.engine._recommend_params = accepted | {"diversity"}
        server.engine._variant_params.clear()
        assert server.engine.recommend_params(short) == {"diversity": 0.3}
        # Without a signature, one probing call per parameter decides.
        server.engine._recommend_params = None
        server.engine._variant_params.clear()
        assert server.engine.recommend_params(short) == expected
        assert server.engine.recommend_params(VARIANTS[0]) == {}
