"""A run folder holds one run: reruns resume, another configuration is refused unless --overwrite
(which keeps review edits aside), two processes never write one folder, killed writers' temp files
go, and a full disk or unwritable folder is one line naming the path."""
from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selflabel.atomic import remove_stale_temps
from selflabel.cli import app
from selflabel.review.store import ReviewStore
from selflabel.runfiles import read_labels
from selflabel.sample import sample_dir

runner = CliRunner()


def _label(data, out, cache, *extra):
    return runner.invoke(app, ["label", str(data), "--out", str(out), "--backbone", "tiny", "--cache-dir", str(cache),
                               "-q", *extra])


def _one_line_error(res, code: int) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    return res.output


def test_same_command_reruns_into_its_folder(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    first = (out / "labels.csv").read_text()
    res = _label(color_folder, out, cache_dir, "--k", "3", "--set", "backbone.num_workers=0")  # speed settings only
    assert res.exit_code == 0, res.output
    assert (out / "labels.csv").read_text() == first
    assert json.loads((out / "manifest.json").read_text())["features"]["computed"] == 0


def test_other_configuration_is_refused_then_overwrite_replaces_it(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3", "--dense", "--set", "dense.image_size=64",
                  "--set", "dense.k_parts=4").exit_code == 0
    assert (out / "dense" / "dense.json").is_file()
    state = lambda: {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    before = state()
    msg = _one_line_error(_label(color_folder, out, cache_dir, "--k", "4"), 2)
    assert f"{out} holds another run" in msg and "cluster.k: 3 -> 4" in msg and "dense.enabled: True -> False" in msg
    assert "--overwrite" in msg
    assert state() == before  # nothing touched
    res = _label(color_folder, out, cache_dir, "--k", "4", "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "dense").exists()  # the old run's dense stage is gone, so eval / export cannot read it
    assert json.loads((out / "manifest.json").read_text())["k"] == 4
    # 3 colours in 4 clusters: estimated sizes may leave the 4th without an image's argmax (floor mass only)
    assert 3 <= len({r.cluster for r in read_labels(out)}) <= 4
    ev = runner.invoke(app, ["eval", str(out), "--gt", "folders", "--json"])
    assert ev.exit_code == 0 and "dense" not in json.loads(ev.output)


def test_overwrite_keeps_review_edits_aside(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    with ReviewStore(out) as store:
        store.rename(0, "my reds")
    assert _label(color_folder, out, cache_dir, "--k", "3", "--method", "kmeans", "--overwrite").exit_code == 0
    assert not (out / "review.sqlite").exists()
    aside = list(out.glob("previous-review-*/review.sqlite"))
    assert len(aside) == 1
    with sqlite3.connect(aside[0]) as db:  # the edit is still there to read
        assert "my reds" in json.dumps(db.execute("SELECT name FROM names").fetchall())


def test_stale_dense_of_an_older_run_is_not_read(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    (out / "dense").mkdir()
    (out / "dense" / "dense.json").write_text("{}")  # e.g. copied in, or left by a tool version before run.json
    ev = runner.invoke(app, ["eval", str(out), "--gt", "folders", "--json"])
    assert ev.exit_code == 0, ev.output
    assert "dense" not in json.loads(ev.output) and "dense_note" not in json.loads(ev.output)


def _wait_for(pred, proc, timeout=120.0) -> bool:
    """Poll (every 10 ms) for an event the code exposes; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_second_label_process_on_one_folder_is_refused(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "selflabel", "label", str(sample_dir()), "--out", str(out), "--cache-dir", str(cache),
           "--backbone", "tiny", "--k", "10", "-q"]
    first = subprocess.Popen([*cmd, "--method", "sela", "--set", "sela.epochs=100000"])  # never ends by itself
    try:
        lock = out / ".lock"
        # the lock file names its holder once the lock is held; run.json follows once the folder is taken
        holds = lambda: lock.is_file() and lock.read_text().strip() == str(first.pid) and (out / "run.json").is_file()
        assert _wait_for(holds, first), "the first run never took the lock"
        run_json = (out / "run.json").read_text()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # any configuration
        assert second.returncode == 5, second.stderr
        assert f"another `selflabel label` (pid {first.pid}) is writing this run folder" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None and (out / "run.json").read_text() == run_json  # the first run goes on, unharmed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead process's lock: the folder can be taken again
    again = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(read_labels(out)) == 100


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".labels.csv.{dead.pid}-abcd1234.tmp").write_text("partial")
    (tmp_path / f".tree.tmp-{dead.pid}").mkdir()
    (tmp_path / f".tree.tmp-{dead.pid}" / "a.png").write_bytes(b"x")
    (tmp_path / f".labels.csv.{os.getpid()}-live.tmp").write_text("a live writer's")
    (tmp_path / f".tree.tmp-{os.getpid()}").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".labels.csv.{dead.pid}-abcd1234.tmp", f".tree.tmp-{dead.pid}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".labels.csv.{os.getpid()}-live.tmp",
                                                                 f".tree.tmp-{os.getpid()}"])


def test_stale_temp_files_in_the_run_folder_are_removed_by_the_next_run(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    (out / ".features.npy.999999999-x.tmp").write_bytes(b"\0" * 1000)  # a killed writer (pid beyond pid_max)
    (out / ".labels.csv.k2j4h5g6.tmp").write_text("older pid-less temp name")
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / ".sela.pt.999999999-y.tmp").write_bytes(b"\0")
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    assert not list(out.rglob(".*.tmp"))


# ----------------------------------------------------------------------------- full disk, unwritable folders
def _fail_writes(monkeypatch, target: Path, err: int):
    """os.replace raises `err` for `target`: its atomic write fails at the commit (the disk filled up)."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst) == target:
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("err,name", [(errno.ENOSPC, "ENOSPC"), (errno.EACCES, "EACCES")])
def test_full_disk_in_the_run_folder_is_one_line_and_the_rerun_resumes(color_folder, cache_dir, tmp_path, monkeypatch,
                                                                        err, name):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_writes(m, out / "labels.csv", err)  # after extraction and clustering
        res = _label(color_folder, out, cache_dir, "--k", "3")
    msg = _one_line_error(res, 4)
    assert "cannot write " + str(out / "labels.csv") in msg and name in msg and os.strerror(err) in msg
    assert not list(out.rglob(".*.tmp"))  # no temp file left behind
    assert any(cache_dir.rglob("*.keys"))  # the features computed before the failure are kept ...
    res = _label(color_folder, out, cache_dir, "--k", "3")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["features"]["computed"] == 0  # ... and reused


def test_unwritable_run_folder_is_one_line(color_folder, cache_dir, tmp_path, monkeypatch):
    real = os.mkdir

    def mkdir(path, *a, **k):
        if Path(path).name == "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    msg = _one_line_error(_label(color_folder, tmp_path / "run", cache_dir, "--k", "3"), 4)
    assert f"cannot write {tmp_path / 'run'}: Permission denied [EACCES]" in msg


def test_full_disk_during_imagefolder_export(color_folder, cache_dir, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    assert _label(color_folder, out, cache_dir, "--k", "3").exit_code == 0
    tree = tmp_path / "tree"
    real, copied = shutil.copy2, []

    def copy2(src, dst, *a, **k):
        if len(copied) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(dst)
        return real(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "copy2", copy2)
        res = runner.invoke(app, ["export", str(out), "--format", "imagefolder", "--out", str(tree)])
    msg = _one_line_error(res, 4)
    assert f"cannot write {tree}: No space left on device [ENOSPC]" in msg
    assert not tree.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tree")]
    res = runner.invoke(app, ["export", str(out), "--format", "imagefolder", "--out", str(tree)])
    assert res.exit_code == 0 and sum(1 for p in tree.rglob("*") if p.is_file()) == 24
