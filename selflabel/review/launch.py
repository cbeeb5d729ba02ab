"""Start the review app: `streamlit run` on the packaged app script, bound to loopback by default."""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from ..runfiles import LABELS, MANIFEST

log = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).with_name("app_main.py")

# Driving the app from a headless browser (the e2e test, the docs screenshot, the timing benchmark):
# Debian's `chromium` (never `playwright install`), with flags that keep it headless and offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """$SELFLABEL_CHROMIUM, the `chromium` on PATH, or Debian's /usr/bin/chromium."""
    return os.environ.get("SELFLABEL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def streamlit_command(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> list[str]:
    """The `streamlit run` command line for one run folder."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.address", host,
        "--server.port", str(int(port)),
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer",
        "--", str(Path(run_dir).resolve()),
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_background(run_dir: str | Path, log_file: Path | None = None,
                        timeout_s: float = 30.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of the app serving `run_dir` on a free loopback port, once /_stcore/health
    answers 200; stopped on the way out. Output goes to `log_file` (a temporary file otherwise), whose
    tail is in the error when the server exits or is not healthy within `timeout_s`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SELFLABEL_RUN"}
    with contextlib.ExitStack() as stack:
        if log_file is None:
            log_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selflabel-app-"))) / "server.log"
        out = stack.enter_context(open(log_file, "wb"))
        proc = subprocess.Popen(streamlit_command(run_dir, "127.0.0.1", port), stdout=out, stderr=subprocess.STDOUT,
                                env=env)
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
                        out.flush()
                        raise RuntimeError(f"the app did not start: {log_file.read_text(errors='replace')[-2000:]}")
                    time.sleep(0.2)
            yield url, proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a server still running; kill it if it has not exited after 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def check_run_dir(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    for name in (LABELS, MANIFEST):
        if not (run / name).is_file():
            raise InputError(f"{run}: no {name}; pass a folder written by `selflabel label`")
    return run


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> int:
    """Run the app until it is stopped (Ctrl-C); returns Streamlit's exit code."""
    check_run_dir(run_dir)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving the review app on %s: anyone who can reach this address can edit the labels", host)
    cmd = streamlit_command(run_dir, host, port, headless)
    log.info("starting the review app on http://%s:%d", host, port)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: Streamlit got it too; give it time to close
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return 0
    finally:
        _stop(proc)  # never leave a server behind
