"""The tour's report in a real headless browser (Debian's Chromium driven by Playwright).

Renders the report of a small tour, then checks what a reader sees: the summary table is there
with a verdict per claim, every image loads, and the page logs no console errors. The
screenshot is kept as a test artifact (``test-artifacts/report.png``, or the folder named by
``KEXUE_TEST_ARTIFACTS``). Skips when Chromium is absent, unless ``KEXUE_REQUIRE_BROWSER=1``
(set by CI, which installs it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kexue.tour import run_tour

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(
    os.environ.get("KEXUE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_or_skip() -> str:
    if CHROMIUM is None:
        if os.environ.get("KEXUE_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required (KEXUE_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    return CHROMIUM


def test_report_renders_in_a_browser(tmp_path: Path) -> None:
    chromium = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    out = tmp_path / "tour"
    sections = run_tour(["ops"], out, seed=0, progress=False)
    assert sections[0].claims, "the section states its claims for the summary table"

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
        )
        rows = page.eval_on_selector_all("table#summary tr", "els => els.map(e => e.innerText)")
        statuses = page.eval_on_selector_all("table#summary .status", "els => els.length")
        first_table = page.eval_on_selector("table", "e => e.id")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()

    assert images, "the report shows the section's figures"
    broken = [src for src, complete, width in images if not complete or width == 0]
    assert not broken, f"images that did not load: {broken}"
    assert errors == [], f"console errors: {errors}"
    assert first_table == "summary", "the report opens with the summary table"
    assert len(rows) == 1 + len(sections[0].claims)
    assert statuses == len(sections[0].claims)
