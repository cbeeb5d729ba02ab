"""The review app as a real server for browser tests and scripts: start, wait until healthy, stop.

Chromium is Debian's package (never `playwright install`); these flags keep it headless and offline.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from selflabel.review.launch import streamlit_command

CHROMIUM = os.environ.get("SELFLABEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(run: Path, log_file: Path | None = None, timeout_s: float = 30.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of `selflabel app run` on a free loopback port, once /_stcore/health answers 200.

    Its output goes to `log_file` (a temporary file otherwise), whose tail is in the error when the
    server exits or is not healthy within `timeout_s`. The server is stopped on the way out.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SELFLABEL_RUN"}
    with contextlib.ExitStack() as stack:
        if log_file is None:
            log_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selflabel-app-"))) / "server.log"
        log = stack.enter_context(open(log_file, "wb"))
        proc = subprocess.Popen(streamlit_command(run, "127.0.0.1", port), stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        raise RuntimeError(f"the app did not start: {log_file.read_text(errors='replace')[-2000:]}")
                    time.sleep(0.2)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
