"""The app's curation views, driven by AppTest: near-duplicates, suggestions, least typical first."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from benchmarks.sample_run import make_sample_run
from selflabel.atomic import atomic_save_npy
from selflabel.curate.run import NEIGHBOURS, curate_run
from selflabel.review.store import ReviewStore
from selflabel.runfiles import FEATURES, read_labels

APP = Path(__file__).resolve().parents[1] / "app" / "review_app.py"
COPIES = (1, 2)  # rows made near-duplicates of row 0


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    run = make_sample_run(tmp_path, per_class=10, mistakes=3, dim=64)
    x = np.load(run / FEATURES)
    x += np.random.default_rng(2).normal(0, 4.0, x.shape)  # spread the classes: distinct images are not copies
    x[list(COPIES)] = x[0] + np.random.default_rng(1).normal(0, 0.01, (len(COPIES), x.shape[1]))
    atomic_save_npy(run / FEATURES, x.astype(np.float32))
    curate_run(run)
    return run


def open_view(run: Path, view: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("SELFLABEL_RUN", str(run))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.radio(key="view").set_value(view).run()
    assert not at.exception, at.exception
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def test_curation_columns_and_neighbours_are_written(run: Path) -> None:
    rows = read_labels(run)
    assert [r.extra["duplicate_of"] for r in rows[:4]] == ["", rows[0].path, rows[0].path, ""]
    assert sum(bool(r.extra["duplicate_of"]) for r in rows) == len(COPIES)
    assert all(np.isfinite(float(r.extra["outlier"])) for r in rows)
    assert (run / NEIGHBOURS).is_file()


def test_duplicates_view_keeps_one_and_rejects_the_rest(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_view(run, "Duplicates", monkeypatch)
    assert at.header[0].value == "Near-duplicates (1 groups, 2 copies)"
    paths = [r.path for r in read_labels(run)]
    at.selectbox(key="keep|0.0").set_value(paths[2])
    click(at, "dedup|0.0")
    s = ReviewStore(run)
    assert [s.member(paths[i]).status for i in (0, 1, 2)] == ["rejected", "rejected", "ok"]
    assert s.history(1)[0].kind == "status"  # one edit
    click(at, "undo")
    assert {ReviewStore(run).member(paths[i]).status for i in (0, 1, 2)} == {"ok"}
    click(at, "dedup_all")
    assert [ReviewStore(run).member(paths[i]).status for i in (0, 1, 2)] == ["ok", "rejected", "rejected"]


def test_accept_and_dismiss_suggestions_then_undo(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = read_labels(run)
    wrong = {r.path for r in rows if r.gt != ("red", "green", "blue", "yellow")[r.cluster]}
    assert len(wrong) == 3
    at = open_view(run, "Suggestions", monkeypatch)
    accepts = [b.key for b in at.button if b.key.startswith("accept|move:")]
    assert accepts, [b.key for b in at.button]
    start = ReviewStore(run).state()
    click(at, accepts[0])
    s = ReviewStore(run)
    moved = [p for p in s.history(1)[0].args["paths"]]
    assert set(moved) <= wrong  # the neighbours point to the true class
    true_cluster = {"red": 0, "green": 1, "blue": 2, "yellow": 3}
    assert all(s.member(p).cluster == true_cluster[next(r.gt for r in rows if r.path == p)] for p in moved)
    key = accepts[0][len("accept|"):]
    assert s.suggestion_states() == {key: "accepted"}
    assert f"accept|{key}" not in [b.key for b in at.button]
    click(at, "undo")
    assert ReviewStore(run).state() == start and ReviewStore(run).suggestion_states() == {}
    assert f"accept|{key}" in [b.key for b in at.button]  # offered again
    click(at, f"dismiss|{key}")
    assert ReviewStore(run).suggestion_states() == {key: "dismissed"}
    assert ReviewStore(run).state() == start and f"accept|{key}" not in [b.key for b in at.button]
    click(at, "undo")
    assert f"accept|{key}" in [b.key for b in at.button]


def test_least_typical_first(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = open_view(run, "Cluster", monkeypatch)
    at.radio(key="order").set_value("Least typical first").run()
    assert not at.exception
    cid = at.selectbox(key="cluster").value
    score = {r.path: float(r.extra["outlier"]) for r in read_labels(run)}
    shown = [c.key[len("sel|"):] for c in at.checkbox if c.key.startswith("sel|")]
    assert [score[p] for p in shown] == sorted((score[m.path] for m in ReviewStore(run).members(cid)), reverse=True)


def test_accept_the_suggested_name_in_one_click(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selflabel.suggest import write_votes

    rows = read_labels(run)
    clusters = np.array([r.cluster for r in rows])
    first = int(clusters[0])
    votes = np.where(clusters == first, 0, 1)  # every member of the first cluster votes "church"
    write_votes(run, votes, ["church", "tench"], source="test")
    at = open_view(run, "Cluster", monkeypatch)
    at.selectbox(key="cluster").set_value(first).run()
    assert not at.exception, at.exception
    assert any("Suggested: church (100 %)" in c.value for c in at.caption)
    click(at, "accept_name")
    assert {c.id: c.name for c in ReviewStore(run).clusters()}[first] == "church"
    assert not [b for b in at.button if b.key == "accept_name"]  # accepted: no longer offered


def test_export_can_leave_the_copies_out(run: Path) -> None:
    import csv

    from selflabel.export import export_run

    paths = [r.path for r in read_labels(run)]
    target, n_all = export_run(run, "csv", run / "all.csv")
    target, n = export_run(run, "csv", run / "dedup.csv", include_duplicates=False)
    kept = {r["path"] for r in csv.DictReader(open(target))}
    assert n == n_all - len(COPIES) and paths[0] in kept and not kept & {paths[i] for i in COPIES}
