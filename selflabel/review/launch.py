"""Start the review app: `streamlit run` on the packaged app script, bound to loopback by default.

`selflabel app` hands its process over to Streamlit (exec), so a SIGTERM from a service manager or
`kill PID` reaches the server itself and nothing is left holding the port or the review database.
Beyond loopback the app asks for an access token (`TOKEN_ENV` in the server's environment, `?token=`
in the address), checked before any page is drawn or edit taken.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ..errors import InputError
from ..runfiles import LABELS, MANIFEST

log = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).with_name("app_main.py")
TOKEN_ENV = "SELFLABEL_TOKEN"  # the access token the app asks for; unset: no token needed
TOKEN_PARAM = "token"  # the query parameter that carries it: http://HOST:PORT/?token=...
MIN_TOKEN_CHARS = 16


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


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """Poll `url`/_stcore/health until it answers 200 (True), or the server exits or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.2)  # returns early when the server exits


@contextlib.contextmanager
def serve_in_background(run_dir: str | Path, log_file: Path | None = None, timeout_s: float = 30.0,
                        token: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of the app serving `run_dir` on a free loopback port, once /_stcore/health
    answers 200; stopped on the way out. Output goes to `log_file` (a temporary file otherwise), whose
    tail is in the error when the server exits or is not healthy within `timeout_s`. With `token`
    the app asks for it (the url carries it)."""
    port = free_port()
    env = server_env(os.environ, token)
    with contextlib.ExitStack() as stack:
        if log_file is None:
            log_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selflabel-app-"))) / "server.log"
        out = stack.enter_context(open(log_file, "wb"))
        proc = subprocess.Popen(streamlit_command(run_dir, "127.0.0.1", port), stdout=out, stderr=subprocess.STDOUT,
                                env=env)
        try:
            if not wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s):
                out.flush()
                raise RuntimeError(f"the app did not start: {log_file.read_text(errors='replace')[-2000:]}")
            yield app_url("127.0.0.1", port, token), proc
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


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses only this machine can reach."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def access_token(host: str, token: str | None = None) -> str | None:
    """The token the app will ask for: `token` when given (any host), a fresh random one beyond
    loopback, None on loopback (nobody else can connect)."""
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            raise InputError(f"--token: use at least {MIN_TOKEN_CHARS} printable ASCII characters "
                             "(or leave it out to have one generated)")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def app_url(host: str, port: int, token: str | None = None) -> str:
    """The address to open: with `?token=` when the app asks for one (this machine's name for a
    wildcard address, which others cannot open as such)."""
    shown = socket.gethostname() if host in {"0.0.0.0", "::", ""} else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{int(port)}/" + (f"?{TOKEN_PARAM}={token}" if token else "")


def server_env(environ: Mapping[str, str], token: str | None) -> dict[str, str]:
    """The server's environment: ours, without a stale run or token, with `token` when given."""
    env = {k: v for k, v in environ.items() if k not in {"SELFLABEL_RUN", TOKEN_ENV}}
    if token:
        env[TOKEN_ENV] = token
    return env


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    """Become the Streamlit server (POSIX exec: signals reach it, no child to orphan); elsewhere run
    it as a child and stop it on the way out."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(cmd[0], cmd, env)  # does not return
    proc = subprocess.Popen(cmd, env=env)  # pragma: no cover - Windows
    try:  # pragma: no cover
        return proc.wait()
    finally:  # pragma: no cover
        _stop(proc)


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501, headless: bool = True,
           token: str | None = None, announce: Callable[[str], None] | None = None) -> int:
    """Serve the app until it is stopped. `token` as from `access_token(host, ...)`: required beyond
    loopback. `announce` gets the address to open (with its token) just before the server starts."""
    check_run_dir(run_dir)
    if token is None and not is_loopback(host):
        raise InputError(f"--host {host}: serving beyond loopback needs an access token (see access_token)")
    if token is not None:
        token = access_token(host, token)
    url = app_url(host, port, token)
    log.info("starting the review app on %s", url if token is None else url.split("?")[0])
    if announce is not None:
        announce(url)
    return _exec(streamlit_command(run_dir, host, port, headless), server_env(os.environ, token))
