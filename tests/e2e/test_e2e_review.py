"""End to end: `selflabel app RUN` as a real server, driven in headless Chromium by Playwright.

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package; never
`playwright install` (no browser download). Skipped with the reason when either is missing.
Every wait is on something the page shows (a heading, a message), never on a sleep.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.browser import CHROMIUM_ARGS, chromium_path
from benchmarks.sample_run import dense_label_command, make_sample_run, make_scene_folder
from selflabel.atomic import atomic_save_npy
from selflabel.curate.run import curate_run
from selflabel.review.launch import TOKEN_ENV, free_port, serve_in_background, wait_healthy
from selflabel.review.store import ReviewStore

CHROMIUM = chromium_path()
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
TOKEN = "e2e-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(url, run folder, process): `selflabel app` on a real tiny --dense run, asking for a token."""
    root = tmp_path_factory.mktemp("e2e")
    done = subprocess.run(dense_label_command(make_scene_folder(root / "images"), root / "run"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    port = free_port()
    log = open(root / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "selflabel", "app", str(root / "run"), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, TOKEN_ENV: TOKEN},
                            start_new_session=True)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", proc, 60), (root / "app.log").read_text()
        yield f"http://127.0.0.1:{port}/", root / "run", proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        log.close()


@pytest.fixture()
def page(server):
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(90_000)  # a loaded 2-core machine
            yield page
        finally:
            browser.close()


def test_without_the_token_nothing_is_shown(server, page) -> None:
    url, run, _proc = server
    page.goto(url + "?token=wrong-but-long-enough-xx")
    page.get_by_text("needs its access token").wait_for()
    assert page.get_by_test_id("stSidebar").count() == 0
    assert page.get_by_role("button").filter(has_text="Rename").count() == 0


def test_every_view_in_a_real_browser(server, page, tmp_path: Path) -> None:
    url, run, proc = server
    store = ReviewStore(run)
    clusters = store.clusters()
    n = sum(c.size for c in clusters)
    page.goto(f"{url}?token={TOKEN}")
    page.get_by_text(f"{len(clusters)} clusters · {n} images").wait_for()
    sidebar = page.get_by_test_id("stSidebar")
    main = page.get_by_test_id("stMain")

    sidebar.get_by_text("Cluster", exact=True).first.click()
    page.get_by_role("heading", name=clusters[0].name).wait_for()
    name = main.get_by_label("Name", exact=True)
    name.fill("street scenes")
    main.get_by_role("button", name="Rename", exact=True).click()
    page.get_by_text("Renamed.").wait_for()
    page.get_by_role("heading", name="street scenes").wait_for()

    sidebar.get_by_text("Map", exact=True).click()
    page.get_by_role("heading", name="Feature map").wait_for()

    sidebar.get_by_text("Dense", exact=True).click()
    page.get_by_role("heading", name="Concept graph").wait_for()
    main.get_by_label("New name").fill("car")
    main.get_by_role("button", name="Rename concept").click()
    page.get_by_text("Concept renamed.").wait_for()

    sidebar.get_by_text("Export", exact=True).click()
    main.get_by_role("button", name="Export csv").click()
    page.get_by_text(f"Exported {n} images as csv").wait_for()
    page.screenshot(path=str(tmp_path / "review_app.png"), full_page=True)

    assert proc.poll() is None  # the server is still up
    store = ReviewStore(run)
    assert store.names()[clusters[0].id] == "street scenes"
    assert list(store.concept_names().values()) == ["car"]
    with open(run / "exports" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows if r["name"] == "street scenes"} == {m.path for m in store.members(clusters[0].id)}
    assert (tmp_path / "review_app.png").stat().st_size > 10_000


@pytest.fixture()
def curated_server(tmp_path: Path):
    """A synthetic run with two near-duplicate copies and three misplaced images, curated, served."""
    run = make_sample_run(tmp_path, per_class=10, mistakes=3, dim=64)
    x = np.load(run / "features.npy") + np.random.default_rng(2).normal(0, 4.0, (40, 64))
    x[[1, 2]] = x[0] + 0.01
    atomic_save_npy(run / "features.npy", x.astype(np.float32))
    curate_run(run)
    with serve_in_background(run, tmp_path / "server.log") as (url, proc):
        yield url, run


def test_duplicates_and_a_suggestion_in_a_real_browser(curated_server, page) -> None:
    url, run = curated_server
    page.goto(url)
    page.get_by_text("4 clusters · 40 images").wait_for()
    sidebar = page.get_by_test_id("stSidebar")
    main = page.get_by_test_id("stMain")
    sidebar.get_by_text("Duplicates", exact=True).click()
    page.get_by_role("heading", name="Near-duplicates (1 groups, 2 copies)").wait_for()
    main.get_by_role("button", name="Keep one, reject the rest").click()
    page.get_by_text("Kept one, rejected the rest.").wait_for()
    store = ReviewStore(run)
    paths = [r.path for r in store.base_rows[:3]]
    assert [store.member(p).status for p in paths] == ["ok", "rejected", "rejected"]

    sidebar.get_by_text("Suggestions", exact=True).click()
    page.get_by_role("heading", name="Suggestions (").wait_for()
    main.get_by_role("button", name="Accept").first.click()
    page.get_by_text("Accepted: ").wait_for()
    assert list(ReviewStore(run).suggestion_states().values()) == ["accepted"]
    assert ReviewStore(run).history(1)[0].kind in {"move", "merge", "split"}
