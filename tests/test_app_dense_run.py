"""The review app the way `selflabel app` runs it (the packaged script as `__main__`, the run folder
as its argument) on a real `--dense` run: every view draws, a concept can be named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from benchmarks.sample_run import dense_label_command, make_scene_folder
from selflabel.curate.run import NEIGHBOURS
from selflabel.review.launch import APP_SCRIPT, streamlit_command
from selflabel.review.store import ReviewStore
from selflabel.runfiles import read_labels


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dense")
    images = make_scene_folder(root / "images")
    done = subprocess.run(dense_label_command(images, root / "run"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def open_as_selflabel_app(run: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The script and arguments of `selflabel app RUN` (streamlit puts the arguments after `--` in sys.argv)."""
    cmd = streamlit_command(run)
    assert Path(cmd[4]) == APP_SCRIPT
    monkeypatch.delenv("SELFLABEL_RUN", raising=False)
    monkeypatch.setattr(sys, "argv", [cmd[4], *cmd[cmd.index("--") + 1:]])
    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def test_label_writes_the_curation_columns(dense_run: Path) -> None:
    rows = read_labels(dense_run)
    assert all("duplicate_of" in r.extra and np.isfinite(float(r.extra["outlier"])) for r in rows)
    assert (dense_run / NEIGHBOURS).is_file()


def test_every_view_of_a_dense_run_as_selflabel_app_runs_it(dense_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_as_selflabel_app(dense_run, monkeypatch)
    views = at.radio(key="view").options
    assert views == ["Overview", "Suggestions", "Cluster", "Duplicates", "Map", "Dense", "Export"]
    for view in views:
        at.radio(key="view").set_value(view).run()
        assert not at.exception, (view, at.exception)
        assert not at.error, (view, [e.value for e in at.error])
    at.radio(key="view").set_value("Dense").run()
    assert [h.value for h in at.header][0] == "Concept graph"
    concept = at.selectbox(key="concept").options[0]
    cid = int(concept.split(":")[0])
    at.selectbox(key="concept").set_value(cid)
    at.text_input(key="concept_name").input("car")
    at.button(key="rename_concept").click().run()
    assert not at.exception and at.success[0].value == "Concept renamed."
    assert ReviewStore(dense_run).concept_names() == {cid: "car"}
    assert "car" in list(at.dataframe[0].value["name"])
