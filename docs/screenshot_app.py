"""Make docs/app.png: the review app on a real run, in headless Chromium (not a test; run by hand).

    python docs/screenshot_app.py runs/imagenette docs/app.png [cluster-id]

Works on a copy of the run (the run's own review.sqlite is never touched). On the copy it names the
clusters after the ground-truth class most of their images share, as a reviewer would, then opens
one cluster with its least confident images first and selects two of them. The PNG is quantised
to 256 colours to stay small.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ beside docs/ in a checkout

from benchmarks.browser import CHROMIUM_ARGS, chromium_path
from selflabel.review.launch import serve_in_background
from selflabel.review.store import ReviewStore
from selflabel.runfiles import read_labels

def settle(page) -> None:
    """Wait until the script rerun that the last click started has finished."""
    time.sleep(0.3)
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget]')")
    time.sleep(0.2)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    run = Path(tempfile.mkdtemp()) / "run"
    run.mkdir()
    for name in ("labels.csv", "manifest.json", "features.npy", "prototypes.npy", "skipped.csv"):
        if (src / name).exists():
            shutil.copy2(src / name, run / name)
    rows = read_labels(run)
    majority: dict[int, Counter] = {}
    for r in rows:
        majority.setdefault(r.cluster, Counter())[r.gt] += 1
    with ReviewStore(run) as store:
        for c, counts in majority.items():
            if counts.most_common(1)[0][0]:
                store.rename(c, counts.most_common(1)[0][0].replace("_", " "))
        cid = int(sys.argv[3]) if len(sys.argv) > 3 else min(majority, key=lambda c: majority[c].most_common(1)[0][1] / sum(majority[c].values()))
        label = f"{store.names()[cid]} ({store.cluster_size(cid)})"
        worst = [m.path for m in store.members(cid, least_confident=True, limit=2)]
    with serve_in_background(run) as (url, _proc):
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1050})
            page.set_default_timeout(60_000)
            page.goto(url)
            sidebar = page.get_by_test_id("stSidebar")
            sidebar.get_by_text("Cluster", exact=True).first.click()
            sidebar.get_by_test_id("stSelectbox").click()
            page.get_by_role("option", name=label).click()
            page.get_by_text("Least confident first").click()
            settle(page)
            for i in range(len(worst)):
                page.get_by_test_id("stMain").get_by_test_id("stCheckbox").nth(i).click()
                settle(page)
            page.get_by_text(f"{len(worst)} selected").wait_for()
            page.wait_for_function("[...document.querySelectorAll('[data-testid=stMain] img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.get_by_test_id("stMain").hover()
            page.mouse.wheel(0, -10_000)  # back to the top: the clicks scrolled the grid into view
            time.sleep(1.5)
            raw = out.with_suffix(".raw.png")
            page.screenshot(path=str(raw))
            browser.close()
    with Image.open(raw) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    raw.unlink()
    print(f"{out}: {out.stat().st_size // 1024} KB (cluster {label})")


if __name__ == "__main__":
    main()
