"""`selflabel app`: the packaged Streamlit script on loopback, the process handed over to Streamlit
(SIGTERM stops the server), and an access token beyond loopback."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import selflabel.review.launch as launch_mod
from benchmarks.sample_run import make_sample_run
from selflabel.errors import InputError
from selflabel.review.store import ReviewStore
from selflabel.runfiles import REVIEW_DB


def test_command_serves_the_packaged_app_on_loopback(tmp_path: Path) -> None:
    cmd = launch_mod.streamlit_command(tmp_path / "run")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]) == Path(launch_mod.__file__).with_name("app_main.py") and Path(cmd[4]).is_file()
    opts = dict(zip(cmd[5:-2:2], cmd[6:-2:2]))
    assert opts["--server.address"] == "127.0.0.1"
    assert opts["--server.port"] == "8501" and opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"
    assert cmd[-2:] == ["--", str((tmp_path / "run").resolve())]


def test_launch_becomes_streamlit_with_the_given_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path)
    calls, shown = [], []
    monkeypatch.setattr(launch_mod, "_exec", lambda cmd, env: calls.append((cmd, env)) or 3)
    monkeypatch.setenv("SELFLABEL_TOKEN", "stale-token-from-the-shell")
    token = "t" * 20
    assert launch_mod.launch(run, host="0.0.0.0", port=9000, headless=False, token=token, announce=shown.append) == 3
    ((cmd, env),) = calls
    assert cmd == launch_mod.streamlit_command(run, "0.0.0.0", 9000, False)
    assert env[launch_mod.TOKEN_ENV] == token and "SELFLABEL_RUN" not in env
    assert shown == [f"http://{socket.gethostname()}:9000/?token={token}"]
    calls.clear()
    launch_mod.launch(run, port=9001)  # loopback: no token asked for, none inherited
    assert launch_mod.TOKEN_ENV not in calls[0][1]


def test_beyond_loopback_a_token_is_required_and_generated() -> None:
    assert launch_mod.access_token("127.0.0.1") is None and launch_mod.access_token("localhost") is None
    a, b = launch_mod.access_token("0.0.0.0"), launch_mod.access_token("192.168.1.5")
    assert a and b and a != b and len(a) >= launch_mod.MIN_TOKEN_CHARS
    assert launch_mod.access_token("::1", "x" * 16) == "x" * 16
    with pytest.raises(InputError, match="16 printable"):
        launch_mod.access_token("0.0.0.0", "short")


def test_launch_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="labels.csv"):
        launch_mod.launch(tmp_path)


def test_launch_refuses_a_public_address_without_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_mod, "_exec", lambda cmd, env: pytest.fail("started without a token"))
    with pytest.raises(InputError, match="access token"):
        launch_mod.launch(make_sample_run(tmp_path), host="0.0.0.0")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_sigterm_to_selflabel_app_stops_the_server(tmp_path: Path) -> None:
    """`kill PID` on `selflabel app` (what a service manager sends) leaves no server holding the port."""
    run = make_sample_run(tmp_path)
    port = launch_mod.free_port()
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "selflabel", "app", str(run), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert launch_mod.wait_healthy(url, proc, 60), (tmp_path / "app.log").read_text()
        # the process we started is the server itself: no child to orphan
        assert "streamlit" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)  # the event: the pid we signalled has exited
        assert not _healthy(url)  # and nothing serves the port any more
        assert "review app: http://127.0.0.1:" in (tmp_path / "app.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_a_session_without_the_token_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path)
    token = "s3cret-" + "x" * 16
    monkeypatch.delenv("SELFLABEL_RUN", raising=False)
    monkeypatch.setenv(launch_mod.TOKEN_ENV, token)
    monkeypatch.setattr(sys, "argv", [str(launch_mod.APP_SCRIPT), str(run)])
    for given in (None, "wrong-" + "x" * 17):
        at = AppTest.from_file(str(launch_mod.APP_SCRIPT), default_timeout=60)
        if given:
            at.query_params[launch_mod.TOKEN_PARAM] = given
        at.run()
        assert not at.exception
        assert "access token" in at.error[0].value
        assert not at.button and not at.radio and not at.text_input and not at.get("image")  # nothing drawn
        assert not (run / REVIEW_DB).exists()  # the store was not even opened
    at = AppTest.from_file(str(launch_mod.APP_SCRIPT), default_timeout=60)
    at.query_params[launch_mod.TOKEN_PARAM] = token
    at.run()
    assert not at.exception and not at.error
    at.selectbox(key="cluster").set_value(0)
    at.radio(key="view").set_value("Cluster").run()
    at.text_input(key="rename|0").input("reds")
    at.button(key="rename").click().run()
    assert ReviewStore(run).names()[0] == "reds"
