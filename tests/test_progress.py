"""Long training is not silent: SeLa, SwAV and their fine-tuning draw a bar per epoch (loss, label
changes) through selflabel.progress; -q silences every bar."""
from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from selflabel import progress
from selflabel.cli import app

runner = CliRunner()


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """What the progress channel draws, as if stderr were a terminal."""
    buf = io.StringIO()
    monkeypatch.setattr(progress, "_console", lambda: Console(file=buf, force_terminal=True, width=160))
    monkeypatch.delenv("SELFLABEL_NO_PROGRESS", raising=False)
    return buf


def _label(folder, tmp_path, *extra):
    return runner.invoke(app, ["label", str(folder), "--out", str(tmp_path / "run"), "--backbone", "tiny", "--k", "3",
                               "--cache-dir", str(tmp_path / "cache"), "--set", "backbone.num_workers=0", *extra])


def _plain(buf: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())


@pytest.mark.parametrize("method,name", [("sela", "SeLa"), ("swav", "SwAV")])
def test_trainers_draw_a_bar_per_epoch_with_the_loss(color_folder, tmp_path, terminal, method, name):
    res = _label(color_folder, tmp_path, "--method", method, "--set", f"{method}.epochs=3",
                 "--set", f"{method}.batch_size=8")
    assert res.exit_code == 0, res.output
    text = _plain(terminal)
    assert re.search(rf"{name} .*3/3.*loss \d+\.\d{{4}}", text), text[-2000:]
    if method == "sela":
        assert re.search(r"labels changed \d+\.\d%", text), text[-2000:]


def test_finetune_epochs_are_on_the_bar(color_folder, tmp_path, terminal):
    res = _label(color_folder, tmp_path, "--method", "sela", "--finetune", "--set", "sela.epochs=1",
                 "--set", "sela.finetune_epochs=1", "--set", "sela.batch_size=8", "--set", "backbone.image_size=32")
    assert res.exit_code == 0, res.output
    assert re.search(r"SeLa fine-tune .*2/2.*loss", _plain(terminal)), _plain(terminal)[-2000:]


def test_quiet_silences_every_bar(color_folder, tmp_path, terminal):
    res = _label(color_folder, tmp_path, "--method", "sela", "--set", "sela.epochs=2", "-q")
    assert res.exit_code == 0, res.output
    assert terminal.getvalue() == ""


def test_progress_enabled_nests():
    with progress.progress_enabled(False):
        with progress.progress_enabled(True):  # an inner "on" cannot undo an outer "off"
            assert not progress._enabled
    assert progress._enabled
