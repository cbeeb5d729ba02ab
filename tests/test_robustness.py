"""Reliability: bad input of every kind, kill -9 and resume, untrusted files, determinism."""
from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selflabel.backbones import create_backbone
from selflabel.config import RunConfig
from selflabel.data import load_rgb, scan_folder
from selflabel.errors import BackboneUnavailable, ImageLoadError, InputError
from selflabel.naming import flatten_path, sanitize_name
from selflabel.features import FeatureCache, extract_features
from selflabel.pipeline import label_folder
from selflabel.runfiles import read_labels

from conftest import COLORS, make_image


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels but holds almost no data (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """Good images of three colours in every awkward form, plus every kind of bad file."""
    root = tmp_path / "zoo"
    red, green, blue = COLORS["red"], COLORS["green"], COLORS["blue"]
    for i in range(4):  # plain anchors so each class has enough members
        for name, c in COLORS.items():
            make_image(root / name / f"plain_{i}.png", c, seed=i)
    r = root / "red"
    Image.new("RGB", (1, 1), red).save(r / "one_pixel.png")
    Image.fromarray((np.full((20, 20), 1, np.uint16) * 0)).save(root / "blue" / "sixteen_bit_dummy.tif")
    arr16 = np.zeros((20, 20, 3), np.uint8)
    arr16[:] = blue
    Image.fromarray(arr16).convert("CMYK").save(root / "blue" / "cmyk.jpg")
    Image.fromarray(np.full((20, 20, 3), green, np.uint8)).convert("P", palette=Image.ADAPTIVE).save(root / "green" / "palette.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = red, 255
    Image.fromarray(rgba, "RGBA").save(root / "red" / "alpha.png")
    Image.fromarray(np.full((20, 20), 120, np.uint8), "L").save(root / "gray.png")
    frames = [Image.new("RGB", (16, 16), green), Image.new("RGB", (16, 16), red)]
    frames[0].save(root / "green" / "anim.gif", save_all=True, append_images=frames[1:], duration=20, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 10), blue).save(root / "blue" / "rotated.jpg", exif=exif)
    make_image(root / "green" / "ünïcode name ✓.png", green)
    raw = os.fsencode(str(root / "green")) + b"/latin1_\xe9.png"
    make_image(Path(os.fsdecode(raw)), green, seed=9)
    make_image(root / "red" / "with space.png", red, seed=7)
    (root / "red" / "dup_a.png").write_bytes((root / "red" / "plain_0.png").read_bytes())  # duplicate content
    os.symlink(root / "red" / "plain_1.png", root / "link_to_red.png")
    os.symlink(root, root / "blue" / "loop")
    os.symlink(root / "gone.png", root / "dangling.png")
    # bad files
    (root / "red" / "zero.jpg").write_bytes(b"")
    good = (root / "red" / "plain_2.png").read_bytes()
    (root / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    jpg = root / "blue" / "full.jpg"
    make_image(jpg, blue, size=(64, 64), fmt="JPEG")
    (root / "blue" / "truncated.jpg").write_bytes(jpg.read_bytes()[:300])
    jpg.unlink()
    (root / "green" / "text.jpg").write_text("not an image, just text")
    _png_header_only(root / "green" / "huge.png", 20000, 20000)
    return root


def test_every_bad_input_is_labelled_or_skipped_with_reason(zoo, tmp_path):
    cfg = RunConfig(data=str(zoo), out=str(tmp_path / "run"))
    cfg.backbone.name, cfg.backbone.cache_dir, cfg.backbone.num_workers = "tiny", str(tmp_path / "c"), 0
    cfg.cluster.k = 3
    summary = label_folder(cfg, show_progress=False)
    rows = {r.path: r for r in read_labels(tmp_path / "run")}
    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "run" / "skipped.csv", encoding="utf-8"))}
    expect_skipped = {
        "red/zero.jpg": "empty file",
        "red/truncated.png": "truncated or corrupt",
        "blue/truncated.jpg": "truncated or corrupt",
        "green/text.jpg": "not an image",
        "green/huge.png": "too large",
        "dangling.png": "broken symlink",
    }
    for path, reason in expect_skipped.items():
        assert path in skipped and reason in skipped[path], (path, skipped.get(path))
    assert any("loop" in v for v in skipped.values())
    assert "link_to_red.png" in skipped  # same file as red/plain_1.png, counted once
    for ok in ["red/one_pixel.png", "blue/cmyk.jpg", "green/palette.png", "red/alpha.png", "gray.png", "green/anim.gif",
               "blue/rotated.jpg", "green/ünïcode name ✓.png", "green/latin1_%E9.png", "red/with space.png", "red/dup_a.png"]:
        assert ok in rows, ok
    assert summary.n_images == len(rows) and summary.n_skipped == len(skipped)
    # colour classes are recovered through every decoding path
    by = lambda p: rows[p].cluster
    assert by("red/alpha.png") == by("red/plain_0.png") == by("red/dup_a.png") == by("red/with space.png")
    assert by("blue/cmyk.jpg") == by("blue/plain_0.png")
    assert by("green/palette.png") == by("green/plain_0.png") == by("green/latin1_%E9.png")
    assert rows["red/dup_a.png"].confidence == pytest.approx(rows["red/plain_0.png"].confidence)


def test_decompression_bomb_message_names_limit(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageLoadError, match=r"20000x20000 = 400,000,000 pixels > limit"):
        load_rgb(tmp_path / "bomb.png")


def test_exif_and_16bit_decode_values(tmp_path):
    a = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160)
    Image.fromarray(a).save(tmp_path / "g16.png")
    im = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert im.dtype == np.uint8 and im.max() > 200 and im[0, 0, 0] == 0


KILLER = Path(__file__).resolve().parent / "drivers" / "killer.py"


def _label_cmd(data, out, cache, *extra):
    return [sys.executable, "-m", "selflabel", "label", str(data), "--out", str(out), "--cache-dir", str(cache), "-q", *extra]


def _killed_at(event: str, n: int, cmd: list[str]) -> None:
    """Run the CLI command `cmd` (after its `-m selflabel`) and kill -9 it at the n-th `event` (tests/drivers/killer.py)."""
    proc = subprocess.run([sys.executable, str(KILLER), event, str(n), *cmd[3:]], timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"the process was not killed at {event} {n} (exit {proc.returncode})"


@pytest.fixture
def many_images(tmp_path):
    root = tmp_path / "many"
    for ci, (name, c) in enumerate(COLORS.items()):
        for i in range(100):
            make_image(root / name / f"{i:03d}.png", c, size=(96, 96), seed=ci * 1000 + i)
    return root


@pytest.mark.slow
def test_kill_during_extraction_then_resume_equals_uninterrupted(many_images, tmp_path):
    args = ["--backbone", "tiny", "--k", "3", "--set", "backbone.flush_every=16", "--set", "backbone.batch_size=8",
            "--set", "backbone.image_size=160", "--set", "backbone.num_workers=0"]
    cache = tmp_path / "cache"
    _killed_at("shard", 2, _label_cmd(many_images, tmp_path / "run", cache, *args))  # right after the 2nd shard
    done = sum(len(k.read_text().split()) for k in cache.rglob("*.keys"))
    assert done == 32  # two shards of 16 committed, nothing of the batch in flight
    assert not (tmp_path / "run" / "labels.csv").exists()
    subprocess.run(_label_cmd(many_images, tmp_path / "run", cache, *args), check=True, timeout=300)
    subprocess.run(_label_cmd(many_images, tmp_path / "ref", tmp_path / "cache_ref", *args), check=True, timeout=300)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["features"]["computed"] == 300 - 32 and man["features"]["cached"] == 32  # resumed, not redone
    a, b = read_labels(tmp_path / "run"), read_labels(tmp_path / "ref")
    assert [(r.path, r.cluster) for r in a] == [(r.path, r.cluster) for r in b]
    np.testing.assert_allclose(np.load(tmp_path / "run" / "features.npy"), np.load(tmp_path / "ref" / "features.npy"), rtol=1e-5)


@pytest.mark.slow
def test_kill_during_training_then_resume_equals_uninterrupted(tmp_path):
    from selflabel.sample import sample_dir

    args = ["--backbone", "tiny", "--k", "10", "--method", "sela", "--set", "sela.epochs=12", "--set", "sela.label_updates=6"]
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    # killed inside the 4th checkpoint write: its temp file is complete, the rename never happens
    _killed_at("checkpoint-mid", 4, _label_cmd(sample_dir(), run, cache, *args))
    ckpt = run / "checkpoints" / "sela.pt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3
    assert len(list(ckpt.parent.glob(".sela.pt.*.tmp"))) == 1  # what the kill left behind
    assert not (run / "labels.csv").exists()
    subprocess.run(_label_cmd(sample_dir(), run, cache, *args, "-v"), check=True, timeout=600)
    assert not list(ckpt.parent.glob(".*.tmp"))  # the killed writer's temp file was removed by the rerun
    man = json.loads((run / "manifest.json").read_text())
    assert man["method_info"]["resumed_from_epoch"] == 3
    subprocess.run(_label_cmd(sample_dir(), tmp_path / "ref", cache, *args), check=True, timeout=600)
    a, b = read_labels(run), read_labels(tmp_path / "ref")
    assert [(r.path, r.cluster) for r in a] == [(r.path, r.cluster) for r in b]


@pytest.mark.slow
def test_kill_during_export_leaves_no_partial_tree(many_images, tmp_path):
    cache = tmp_path / "cache"
    subprocess.run(_label_cmd(many_images, tmp_path / "run", cache, "--backbone", "tiny", "--k", "3"), check=True, timeout=300)
    out = tmp_path / "tree"
    export = [sys.executable, "-m", "selflabel", "export", str(tmp_path / "run"), "--format", "imagefolder", "--out", str(out)]
    subprocess.run(export, check=True, timeout=300)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    _killed_at("export", 150, export)  # half of the new tree copied
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tree.tmp-")]
    assert len(stale) == 1 and sum(1 for p in stale[0].rglob("*") if p.is_file()) == 150
    after_kill = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert after_kill == before  # the old complete export is untouched
    subprocess.run(export, check=True, timeout=300)
    again = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert again == before and len(again) == 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tree.")]  # the killed export's copy is gone


def test_malicious_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pth"
    torch.save({"weights": Evil()}, p)
    with pytest.raises(BackboneUnavailable, match="weights_only"):
        create_backbone("tiny", weights=str(p))
    assert not (tmp_path / "pwned").exists()


def test_pickled_or_foreign_cache_shard_is_ignored(color_folder, tmp_path):
    cache_root = tmp_path / "c"
    bb = create_backbone("tiny")
    recs = scan_folder(color_folder).records
    extract_features(recs, bb, num_workers=0, cache_dir=cache_root, show_progress=False)
    d = next(cache_root.glob(f"{bb.cache_key()}-*"))  # the key ends in the engine and precision
    shard = sorted(d.glob("*.npy"))[0]
    np.save(shard, np.array([{"evil": 1}] * 24, dtype=object), allow_pickle=True)
    cache = FeatureCache(cache_root, d.name)
    assert len(cache) == 0
    res = extract_features(recs, bb, num_workers=0, cache_dir=cache_root, show_progress=False)
    assert res.n_computed == 24 and np.isfinite(res.features).all()


def test_user_csv_validation(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("path,cluster,confidence\na.png,x,0.5\n")
    with pytest.raises(InputError, match="line 2"):
        read_labels(bad)
    bad.write_text("file,label\n")
    with pytest.raises(InputError, match="missing column"):
        read_labels(bad)


@pytest.mark.parametrize("name,expected", [("../../etc/passwd", "etc_passwd"), ("a/b\\c", "a_b_c"), ("..", "fallback"),
                                           ("  cat  ", "cat"), ("x" * 300, "x" * 80), ("Straße 🚗", "Straße")])
def test_export_names_are_sanitised(name, expected):
    out = sanitize_name(name, "fallback")
    assert "/" not in out and "\\" not in out and out not in {".", ".."}
    assert out == expected


def test_flatten_path_never_escapes():
    assert flatten_path("../a/../b.png") == "a__b.png"


def test_same_seed_same_labels(color_folder, tmp_path):
    outs = []
    for i in range(2):
        cfg = RunConfig(data=str(color_folder), out=str(tmp_path / f"r{i}"), seed=5)
        cfg.backbone.name, cfg.backbone.cache_dir, cfg.backbone.num_workers = "tiny", str(tmp_path / f"c{i}"), 0
        cfg.cluster.k = 4
        label_folder(cfg, show_progress=False)
        outs.append((tmp_path / f"r{i}" / "labels.csv").read_text())
    assert outs[0] == outs[1]
