"""Driving the review app from a headless browser (the e2e test, the docs screenshot, the timing benchmark).

Debian's `chromium` (never `playwright install`: no browser download), with flags that keep it
headless and offline. Tooling, not product: it lives beside the benchmarks, not in the package.
"""
from __future__ import annotations

import os
import shutil

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """$SELFLABEL_CHROMIUM, the `chromium` on PATH, or Debian's /usr/bin/chromium."""
    return os.environ.get("SELFLABEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
