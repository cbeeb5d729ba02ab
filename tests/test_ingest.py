import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selflabel.data import load_rgb, scan_folder
from selflabel.errors import ImageLoadError, InputError

from conftest import make_image


def test_scan_finds_images_recursively_case_insensitive_with_gt(color_folder):
    scan = scan_folder(color_folder, gt="folders")
    assert len(scan.records) == 24
    assert {r.gt for r in scan.records} == {"red", "green", "blue"}
    assert all("/" in r.id and not r.id.startswith("/") for r in scan.records)
    assert [r.id for r in scan.records] == sorted(r.id for r in scan.records)


def test_no_gt_when_images_at_top_level(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", (10, 10, 10), seed=i)
    scan = scan_folder(tmp_path)
    assert len(scan.records) == 3 and not scan.has_gt


def test_missing_and_empty_folder_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="no images found"):
        scan_folder(tmp_path / "empty")


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("zero.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "not an image"),
    ],
)
def test_bad_files_give_clear_reasons(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as ei:
        load_rgb(p)
    assert ei.value.path == str(p)


def test_truncated_jpeg_and_png(tmp_path):
    for ext in ("jpg", "png"):
        good = make_image(tmp_path / f"good.{ext}", (100, 50, 20), size=(64, 64))
        data = good.read_bytes()
        bad = tmp_path / f"bad.{ext}"
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageLoadError, match="truncated|corrupt|decode"):
            load_rgb(bad)


def test_decompression_bomb_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(p)
    with pytest.raises(ImageLoadError, match="too large"):
        load_rgb(p, max_pixels=100_000)
    assert load_rgb(p).size == (400, 300)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    p = tmp_path / f"m.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (10, 7)).save(p)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (10, 7)


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(p, exif=exif)
    assert load_rgb(p).size == (20, 40)


def test_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=10, loop=0)
    arr = np.asarray(load_rgb(p))
    assert arr[..., 0].mean() > 200 and arr[..., 2].mean() < 50


def test_symlink_loop_and_duplicate_link(tmp_path):
    root = tmp_path / "r"
    make_image(root / "a" / "x.png", (1, 2, 3))
    os.symlink(root, root / "a" / "loop")  # folder loop
    os.symlink(root / "a" / "x.png", root / "y.png")  # second name of the same file
    os.symlink(root / "missing.png", root / "dangling.png")
    scan = scan_folder(root)
    assert [r.id for r in scan.records] == ["a/x.png"]
    reasons = {s.path: s.reason for s in scan.skipped}
    assert any("loop" in r for r in reasons.values())
    assert "dangling.png" in reasons and "broken symlink" in reasons["dangling.png"]
    assert "y.png" in reasons


def test_gt_csv(tmp_path):
    for i in range(4):
        make_image(tmp_path / "d" / f"{i}.png", (i * 50, 0, 0), seed=i)
    gt = tmp_path / "gt.csv"
    gt.write_text("path,label\n0.png,a\n1.png,a\n2.png,b\n")
    scan = scan_folder(tmp_path / "d", gt_csv=str(gt))
    assert [r.gt for r in scan.records] == ["a", "a", "b", None]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,cls\n")
    with pytest.raises(InputError, match="needs columns"):
        scan_folder(tmp_path / "d", gt_csv=str(bad))


def test_unicode_spaces_and_non_utf8_names(tmp_path):
    from selflabel.data import resolve_id

    root = tmp_path / "r"
    make_image(root / "ünï cödé" / "a photo 📷.png", (5, 5, 5))
    raw = os.fsencode(str(root)) + b"/latin\xe9.png"
    make_image(Path(os.fsdecode(raw)), (9, 9, 9))
    scan = scan_folder(root)
    ids = [r.id for r in scan.records]
    assert "ünï cödé/a photo 📷.png" in ids
    enc = [i for i in ids if i.startswith("latin")]
    assert enc == ["latin%E9.png"]
    enc[0].encode("utf-8")  # printable, CSV-safe
    assert resolve_id(root, enc[0]).is_file()
    assert np.asarray(load_rgb(resolve_id(root, enc[0]))).mean() < 30


def test_unreadable_file_reason(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    p = make_image(tmp_path / "locked.png", (1, 1, 1))
    p.chmod(0)
    with pytest.raises(ImageLoadError, match="permission denied|cannot read"):
        load_rgb(p)


def test_permission_error_is_reported_even_as_root(tmp_path, monkeypatch):
    """Root ignores file modes, so simulate the OS refusing the read."""
    import selflabel.data as data

    p = make_image(tmp_path / "locked.png", (1, 1, 1))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.Image, "open", refuse)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_rgb(p)


def test_jpeg_draft_decoding_keeps_enough_pixels(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(np.full((1200, 1600, 3), 128, np.uint8)).save(p, quality=90)
    full = load_rgb(p)
    small = load_rgb(p, draft_size=256)
    assert full.size == (1600, 1200)
    assert min(small.size) >= 256 and small.size[0] < 1600  # decoded at a reduced scale
    assert abs(np.asarray(small).mean() - 128) < 3


def test_class_folders_are_not_ground_truth_unless_asked(color_folder):
    """A class-folder tree without gt="folders" (`--gt folders`) has no ground truth."""
    scan = scan_folder(color_folder)
    assert len(scan.records) == 24 and not scan.has_gt
    assert all(r.gt is None for r in scan.records)


def test_year_folders_are_not_classes(tmp_path):
    for year in ("2019", "2020"):
        for i in range(2):
            make_image(tmp_path / "photos" / year / f"{i}.png", (10, 10, 10), seed=i)
    assert not scan_folder(tmp_path / "photos").has_gt


def test_gt_folders_leaves_loose_images_without_gt(tmp_path, caplog):
    make_image(tmp_path / "a" / "0.png", (1, 1, 1))
    make_image(tmp_path / "loose.png", (2, 2, 2))
    scan = scan_folder(tmp_path, gt="folders")
    assert [(r.id, r.gt) for r in scan.records] == [("a/0.png", "a"), ("loose.png", None)]
    assert "1 image(s) lie directly in" in caplog.text and "loose.png" in caplog.text
    with pytest.raises(InputError, match="unknown ground-truth source"):
        scan_folder(tmp_path, gt="names")
