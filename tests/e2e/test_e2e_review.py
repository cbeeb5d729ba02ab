"""End to end: the review app as a real server on 127.0.0.1, driven in headless Chromium by Playwright.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package; never
`playwright install` (no browser download). Skipped with the reason when either is missing.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from benchmarks.browser import CHROMIUM_ARGS, chromium_path
from selflabel.review.launch import serve_in_background
from benchmarks.sample_run import make_sample_run
from selflabel.review.store import ReviewStore

CHROMIUM = chromium_path()
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")


@pytest.fixture()
def server(tmp_path: Path):
    """(url, run folder, process) of the app serving a synthetic run; stopped afterwards."""
    run = make_sample_run(tmp_path)
    with serve_in_background(run, tmp_path / "server.log") as (url, proc):
        yield url, run, proc


def settle(page) -> None:
    """Wait until the script rerun started by the last action has finished (no stale elements)."""
    time.sleep(0.3)
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')")


def test_rename_and_export_in_a_real_browser(server, tmp_path: Path) -> None:
    url, run, proc = server
    # the app listens on loopback only
    assert any(f"127.0.0.1:{url.rsplit(':', 1)[1]}" in line for line in (tmp_path / "server.log").read_text().splitlines())
    largest = max(ReviewStore(run).clusters(), key=lambda c: c.size)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(url)
            page.get_by_text("4 clusters · 40 images").wait_for()
            sidebar = page.get_by_test_id("stSidebar")
            sidebar.get_by_text("Cluster", exact=True).first.click()
            page.get_by_role("heading", name=largest.name).wait_for()
            settle(page)
            name = page.get_by_label("Name", exact=True)
            name.fill("blue things")
            name.press("Enter")
            settle(page)
            page.get_by_role("button", name="Rename").click()
            page.get_by_text("Renamed.").wait_for()
            page.get_by_role("heading", name="blue things").wait_for()
            sidebar.get_by_text("Export", exact=True).click()
            page.get_by_role("button", name="Export csv").click()
            page.get_by_text("Exported 40 images as csv").wait_for()
            page.screenshot(path=str(tmp_path / "review_app.png"), full_page=True)
        finally:
            browser.close()
    assert proc.poll() is None  # the server is still up
    assert ReviewStore(run).names()[largest.id] == "blue things"
    with open(run / "exports" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 40
    assert {r["path"] for r in rows if r["name"] == "blue things"} == {m.path for m in ReviewStore(run).members(largest.id)}
    assert (tmp_path / "review_app.png").stat().st_size > 10_000
