"""`launch` runs the packaged Streamlit script on loopback."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import selflabel.review.launch as launch_mod
from selflabel.errors import InputError
from selflabel.review.sample import make_sample_run


def test_command_serves_the_packaged_app_on_loopback(tmp_path: Path) -> None:
    cmd = launch_mod.streamlit_command(tmp_path / "run")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]) == Path(launch_mod.__file__).with_name("app_main.py") and Path(cmd[4]).is_file()
    opts = dict(zip(cmd[5:-2:2], cmd[6:-2:2]))
    assert opts["--server.address"] == "127.0.0.1"
    assert opts["--server.port"] == "8501" and opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"
    assert cmd[-2:] == ["--", str((tmp_path / "run").resolve())]


def test_launch_runs_streamlit_with_the_given_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_sample_run(tmp_path)
    calls = []

    class FakePopen:
        def __init__(self, cmd):
            calls.append(cmd)

        def wait(self, timeout=None):
            return 3

        def poll(self):
            return 3

    monkeypatch.setattr(launch_mod.subprocess, "Popen", FakePopen)
    assert launch_mod.launch(run, host="0.0.0.0", port=9000, headless=False) == 3  # streamlit's exit code
    (cmd,) = calls
    assert cmd == launch_mod.streamlit_command(run, "0.0.0.0", 9000, False)


def test_launch_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="labels.csv"):
        launch_mod.launch(tmp_path)

