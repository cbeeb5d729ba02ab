"""Start the review app: `streamlit run` on the packaged app script, bound to loopback by default."""
from __future__ import annotations

import ipaddress
import logging
import subprocess
import sys
from pathlib import Path

from ..errors import InputError
from ..runfiles import LABELS, MANIFEST

log = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).with_name("app_main.py")


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
            return proc.wait(10) and 0
        except subprocess.TimeoutExpired:
            return 0
    finally:
        if proc.poll() is None:  # never leave a server behind
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
