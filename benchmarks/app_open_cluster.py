"""How long does a cluster of 2,000 images take to open? (not a test; run by hand)

    python -m benchmarks.app_open_cluster ../shared/data/imagenette-val [RUN_DIR]

Builds a run whose cluster 0 holds 2,000 images of the folder (or uses RUN_DIR's largest cluster),
then times, cold (no thumbnails on disk) and warm: the database query, the first page of thumbnails,
a full AppTest script run of the Cluster view, and, when Chromium and Playwright are here, the real
browser from the click on "Open" until every thumbnail of the page has loaded.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.browser import CHROMIUM_ARGS, chromium_path
from selflabel.review.launch import serve_in_background
from selflabel.atomic import atomic_save_npy
from selflabel.review.store import ReviewStore
from selflabel.review.thumbs import ThumbCache
from selflabel.runfiles import LabelRow, write_labels, write_manifest

APP = Path(__file__).resolve().parents[1] / "app" / "review_app.py"


def make_run(data: Path, out: Path, n: int = 2000) -> Path:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    rng = np.random.default_rng(0)
    rows = [LabelRow(p.relative_to(data).as_posix(), 0 if i < n else 1 + i % 5, float(rng.uniform(0.2, 1)))
            for i, p in enumerate(files)]
    write_labels(out / "labels.csv", rows)
    atomic_save_npy(out / "features.npy", rng.normal(size=(len(rows), 64)).astype(np.float32))
    write_manifest(out, {"data_root": str(data.resolve())})
    return out


def timed(label: str, fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    print(f"{label:<58s} {best * 1000:8.0f} ms")
    return best


def main() -> None:
    data = Path(sys.argv[1])
    run = Path(sys.argv[2]) if len(sys.argv) > 2 else make_run(data, Path(tempfile.mkdtemp()) / "run")
    shutil.rmtree(run / "thumbs", ignore_errors=True)
    store = ReviewStore(run)
    biggest = store.clusters()[0]
    print(f"run {run}: cluster {biggest.id} holds {biggest.size} images")
    thumbs = ThumbCache(run, data)
    timed("members of the cluster, sorted by confidence (all)", lambda: store.members(biggest.id), repeat=5)
    page = [m.path for m in store.members(biggest.id, limit=48)]
    timed("first page of 48 thumbnails, cold", lambda: thumbs.get_many(page))
    timed("first page of 48 thumbnails, warm", lambda: thumbs.get_many(page), repeat=5)
    everything = [m.path for m in store.members(biggest.id)]
    timed(f"all {len(everything)} thumbnails, cold", lambda: thumbs.get_many(everything))
    timed(f"all {len(everything)} thumbnails, warm", lambda: thumbs.get_many(everything), repeat=3)

    from streamlit.testing.v1 import AppTest

    os.environ["SELFLABEL_RUN"] = str(run)
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.selectbox(key="cluster").set_value(biggest.id)
    shutil.rmtree(run / "thumbs", ignore_errors=True)
    timed("AppTest: Cluster view script run, cold thumbnails", lambda: at.radio(key="view").set_value("Cluster").run())
    timed("AppTest: Cluster view script run, warm", lambda: at.run(), repeat=3)
    browser_time(run, biggest.name)


def browser_time(run: Path, name: str) -> None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright missing: no browser timing")
        return
    with serve_in_background(run) as (url, _proc):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for label in ("cold", "warm"):
                if label == "cold":
                    shutil.rmtree(run / "thumbs", ignore_errors=True)
                page.goto(url)
                page.get_by_test_id("stMain").get_by_role("button", name="Open", exact=True).first.wait_for(timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')", timeout=60_000)
                t = time.perf_counter()
                page.get_by_test_id("stMain").get_by_role("button", name="Open", exact=True).first.click()
                page.get_by_role("heading", name=name).wait_for(timeout=60_000)
                heading = time.perf_counter() - t
                page.wait_for_function(
                    "document.querySelectorAll('[data-testid=stCheckbox]').length >= 48 && "
                    "[...document.querySelectorAll('[data-testid=stMain] img')].every(i => i.complete && i.naturalWidth > 0)",
                    timeout=60_000)
                print(f"{'browser: click Open -> cluster heading shown, ' + label:<58s} {heading * 1000:8.0f} ms")
                print(f"{'browser: click Open -> 48 thumbnails shown, ' + label:<58s} {(time.perf_counter() - t) * 1000:8.0f} ms")
            browser.close()


if __name__ == "__main__":
    main()
