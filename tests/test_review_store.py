"""The review database: edits, exact undo, the append-only log, concurrency and crashes."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from selflabel.errors import InputError
from benchmarks.sample_run import CLASSES, make_sample_run
from selflabel.review.store import (ConflictError, ReviewStore, default_name, effective_concept_names, effective_labels,
                                   split_labels)
from selflabel.runfiles import read_labels


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return make_sample_run(tmp_path, per_class=10, mistakes=3)


def snapshot(store: ReviewStore):
    imgs, names = store.state()
    return dict(imgs), dict(names)


def assert_consistent(store: ReviewStore) -> None:
    """The stored state is exactly labels.csv with the active edits replayed."""
    assert store.state() == store.replay()
    assert (*store.state(), store.concept_names()) == store.replay(concepts=True)


def test_seeds_from_labels_in_wal_mode(run: Path) -> None:
    rows = read_labels(run)
    with ReviewStore(run) as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
        imgs, names = s.state()
        assert imgs == {r.path: (r.cluster, pytest.approx(r.confidence), "ok") for r in rows}
        assert names == {}
        assert s.names() == {c: default_name(c) for c in range(4)}
        assert sum(c.size for c in s.clusters()) == 40
        assert s.version() == 0
    # reopening does not seed twice
    with ReviewStore(run) as s:
        assert s.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 40


def test_each_edit_and_its_exact_undo(run: Path) -> None:
    with ReviewStore(run) as s:
        start = snapshot(s)
        paths = [m.path for m in s.members(0)][:3]
        edits = [
            lambda: s.rename(1, "grass"),
            lambda: s.merge([2, 3], 1),
            lambda: s.move(paths, 1),
            lambda: s.move(paths[:1], None, name="odd one"),
            lambda: s.set_status(paths[1:], "rejected"),
            lambda: s.set_status(paths[2:], "unsure"),
            lambda: s.split(1, 3),
        ]
        states = [start]
        for edit in edits:
            assert isinstance(edit(), int)
            assert_consistent(s)
            states.append(snapshot(s))
            assert states[-1] != states[-2]  # every edit changed something
        for expected in reversed(states[:-1]):
            assert len(s.undo()) == 1
            assert snapshot(s) == expected  # undo restores the previous state exactly
            assert_consistent(s)
        assert s.undo() == []  # nothing left
        assert snapshot(s) == start
        hist = s.history(limit=100)
        assert [e.kind for e in hist].count("undo") == len(edits)
        assert not any(e.active for e in hist)


def test_rename_merge_move_status_state(run: Path) -> None:
    with ReviewStore(run) as s:
        s.rename(0, "  reds ")
        assert s.names()[0] == "reds"
        assert s.rename(0, "reds") is None  # no-op is not logged
        size0, size2 = s.cluster_size(0), s.cluster_size(2)
        s.merge([2], 0)
        assert s.cluster_size(0) == size0 + size2 and s.cluster_size(2) == 0
        assert 2 not in s.names()
        moved = [m.path for m in s.members(0, least_confident=True, limit=2)]
        eid = s.move(moved, None, name="mystery")
        new = s.history(1)[0].args["target"]
        assert s.history(1)[0].id == eid and new == 4  # first fresh id after 0..3
        assert {m.path for m in s.members(new)} == set(moved)
        assert all(m.confidence == 1.0 for m in s.members(new))
        assert s.names()[new] == "mystery"
        s.set_status(moved, "rejected")
        rows, names, rejected, unsure = effective_labels(run)
        assert rejected == set(moved) and unsure == set()
        assert names[0] == "reds" and names[new] == "mystery"
        assert {r.path: r.cluster for r in rows}[moved[0]] == new
        assert [r.path for r in rows] == [r.path for r in read_labels(run)]  # order of labels.csv kept


def test_invalid_edits_raise_and_change_nothing(run: Path) -> None:
    with ReviewStore(run) as s:
        before = snapshot(s)
        with pytest.raises(InputError, match="does not exist"):
            s.merge([99], 0)
        with pytest.raises(InputError, match="not in this run"):
            s.move(["nope.png"], 0)
        with pytest.raises(InputError, match="status"):
            s.set_status([s.members(0)[0].path], "deleted")
        with pytest.raises(InputError, match="empty"):
            s.rename(0, "   ")
        with pytest.raises(InputError, match="cannot split"):
            s.split(0, 1)
        assert snapshot(s) == before and s.version() == 0


@pytest.mark.parametrize("method", ["kmeans", "sinkhorn"])
def test_split_recovers_merged_classes_with_fresh_ids(run: Path, method: str) -> None:
    if method == "sinkhorn":
        pytest.importorskip("selflabel.ot", reason="the Sinkhorn module is not in this checkout yet")
    truth = {r.path: r.gt for r in read_labels(run)}
    with ReviewStore(run) as s:
        s.rename(0, "warm")
        s.merge([1], 0)
        members = {m.path for m in s.members(0)}
        s.split(0, 2, method=method)
        new = s.history(1)[0].args["new"]
        assert new == [4, 5] and s.cluster_size(0) == 0
        assert {s.names()[i] for i in new} == {"warm.1", "warm.2"}
        parts = [{m.path for m in s.members(i)} for i in new]
        assert parts[0] | parts[1] == members
        # each part is (nearly) one true class: the planted features are well separated
        purity = sum(max(sum(truth[p] == c for p in part) for c in CLASSES) for part in parts) / len(members)
        assert purity >= 0.85
        assert all(0.0 < m.confidence <= 1.0 for i in new for m in s.members(i))
        s.undo()
        s.split(0, 2, method=method)  # ids are never reused, even after an undo
        assert s.history(1)[0].args["new"] == [6, 7]
        assert_consistent(s)


def test_split_labels_confidence_is_softmax_of_chosen_part() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(20, 8)) + 5, rng.normal(size=(20, 8)) - 5]).astype(np.float32)
    labels, conf = split_labels(x, 2)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    assert conf.shape == (40,) and np.all(conf > 0.5) and np.all(conf <= 1.0)


def test_split_detects_a_concurrent_change(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import selflabel.review.store as store_mod

    other = ReviewStore(run)
    real = store_mod.split_labels

    def meanwhile(*a, **k):  # another tab moves an image out while the split is computed
        other.move([other.members(0)[0].path], 1)
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "split_labels", meanwhile)
    with ReviewStore(run) as s:
        with pytest.raises(ConflictError):
            s.split(0, 2)
        assert s.history(1)[0].kind == "move"  # the other tab's edit stands, the split did not happen
        assert_consistent(s)
    other.close()


def test_log_is_append_only(run: Path) -> None:
    with ReviewStore(run) as s:
        s.rename(0, "x")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            s.conn.execute("UPDATE edits SET summary = 'y'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            s.conn.execute("DELETE FROM edits")


def test_two_connections_edit_concurrently(run: Path) -> None:
    paths = [r.path for r in read_labels(run)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with ReviewStore(run) as s:
                for i in range(40):
                    p = list(rng.choice(paths, size=2, replace=False))
                    if i % 3 == 0:
                        s.set_status(p, ["rejected", "unsure", "ok"][i % 9 // 3])
                    elif i % 3 == 1:
                        s.move(p, int(rng.integers(0, 4)))
                    else:
                        s.rename(int(rng.integers(0, 4)), f"t{seed}-{i}")
                    if i % 10 == 9:
                        s.undo()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with ReviewStore(run) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        hist = s.history(limit=1000)
        assert sum(e.kind == "undo" for e in hist) == 8
        assert_consistent(s)
        assert sorted(c.size for c in s.clusters()) and sum(c.size for c in s.clusters()) == 40


def _edit_forever(run: str, ready) -> None:
    with ReviewStore(run) as s:
        paths = [m.path for m in s.members(0)]
        i = 0
        while True:
            s.set_status([paths[i % len(paths)]], ["rejected", "ok"][i // len(paths) % 2])  # always a change
            i += 1
            if i == 20:
                ready.set()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_writer_loses_no_committed_edit(run: Path) -> None:
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_edit_forever, args=(str(run), ready))
    proc.start()
    assert ready.wait(30)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # a crash in the middle of editing
    proc.join()
    with ReviewStore(run) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert s.version() >= 20
        assert_consistent(s)


def test_effective_labels_without_review_is_labels_csv(run: Path) -> None:
    rows, names, rejected, unsure = effective_labels(run)
    assert rows == read_labels(run)
    assert names == {c: default_name(c) for c in range(4)} and rejected == set() == unsure
    assert not (run / "review.sqlite").exists()  # reading does not create the database


def test_a_changed_labels_csv_is_refused(run: Path) -> None:
    ReviewStore(run).close()
    (run / "labels.csv").write_text((run / "labels.csv").read_text().replace("0.", "0.0", 1))
    with pytest.raises(InputError, match="different labels.csv"):
        ReviewStore(run)
    with pytest.raises(InputError, match="different labels.csv"):
        effective_labels(run)


def test_concept_renames_are_edits_with_exact_undo(run: Path) -> None:
    with ReviewStore(run) as s:
        assert s.concept_names() == {} and effective_concept_names(run) == {}
        first = s.rename_concept(2, "  car ", known=[1, 2, 3])
        assert s.concept_names() == {2: "car"}
        assert s.rename_concept(2, "car") is None  # no change, no log row
        s.rename_concept(2, "vehicle")
        s.rename(1, "grass")  # cluster names and concept names are separate
        assert s.concept_names() == {2: "vehicle"} and s.names()[1] == "grass"
        assert_consistent(s)
        with pytest.raises(InputError, match="empty"):
            s.rename_concept(2, "   ")
        with pytest.raises(InputError, match="concept 9 does not exist"):
            s.rename_concept(9, "x", known=[1, 2, 3])
        s.undo(2)
        assert s.concept_names() == {2: "car"} and s.names()[1] == default_name(1)
        assert_consistent(s)
        assert [e.kind for e in s.history()][-1:] == ["rename_concept"] and s.history()[-1].id == first
    assert effective_concept_names(run) == {2: "car"}  # as the CLI's export reads it


def test_tabs_opening_a_new_review_at_once_all_succeed(tmp_path: Path) -> None:
    """SQLite answers the switch to WAL 'database is locked' at once (no busy wait) while another
    connection holds the new file: three connections opening one new review together must all work."""
    for trial in range(15):
        run = make_sample_run(tmp_path / str(trial), per_class=3, mistakes=0)
        errors: list[BaseException] = []

        def open_and_edit(name: str) -> None:
            try:
                with ReviewStore(run) as s:
                    s.rename(1, name)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_and_edit, args=(f"t{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        with ReviewStore(run) as s:
            assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert len([e for e in s.history() if e.kind == "rename"]) == 3
