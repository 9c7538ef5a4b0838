"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright).

Skipped only where Chromium is missing on a developer machine; in CI (``CI`` set) a missing
browser fails the test instead, so the dashboard is never silently untested.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_recovery import _start

CHROMIUM = "/usr/bin/chromium"


def _require_browser() -> Any:
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "playwright is not installed (pip install playwright)"
        sync_playwright = None
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the dashboard test: {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture
def server_url(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "recstream.toml"
    config.write_text("[model]\ndim = 16\n")
    proc, url = _start(tmp_path / "data", config)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_dashboard_subscribe_click_and_watch_the_list_change(server_url: str) -> None:
    sync_playwright = _require_browser()
    with httpx.Client(base_url=server_url, timeout=10) as http:
        events = [
            {"user": f"u{u}", "item": f"item{(u * j) % 15}", "type": "click"}
            for u in range(30)
            for j in range(1, 5)
        ]
        assert http.post("/v1/events", json=events).status_code == 202

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server_url + "/")
            # Trending and the engine tiles fill in from the live API.
            page.wait_for_selector("#trending li", timeout=5000)
            page.wait_for_function("document.getElementById('users').textContent === '30'")

            page.fill("#user", "dash-user")
            page.click("#watch button")
            page.wait_for_selector("#recs li button", timeout=5000)
            page.wait_for_function("document.getElementById('subs').textContent === '1'")
            before = page.eval_on_selector_all(
                "#recs li button", "els => els.map(e => e.textContent)"
            )
            version = page.get_attribute("#recs", "data-version")
            assert len(before) == 10

            page.click("#recs li button >> nth=0")  # sends a click event for the top item
            page.wait_for_function(
                f"document.getElementById('recs').dataset.version !== '{version}'", timeout=1000
            )
            after = page.eval_on_selector_all(
                "#recs li button", "els => els.map(e => e.textContent)"
            )
            assert after != before and before[0] not in after  # seen items leave the list

            # Explanations: the clicked item is now the user's history, so it explains the list.
            page.wait_for_selector(".because", timeout=2000)
            assert "because you interacted with " + before[0] in page.inner_text("#recs")

            # Push latency quantiles and the ingest rate come from /metrics and /v1/stats.
            page.wait_for_function(
                "document.getElementById('p50').textContent.startsWith('≤')", timeout=3000
            )
            assert page.inner_text("#p99").startswith("≤")
            assert page.inner_text("#rate").isdigit()
        finally:
            browser.close()
    assert errors == []
