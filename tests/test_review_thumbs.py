"""Image paths cannot leave the image root; thumbnails are cached on disk."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from selflabel.errors import InputError
from selflabel.review.thumbs import THUMB_SIZE, ThumbCache, safe_path


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    (r / "cats").mkdir(parents=True)
    Image.new("RGB", (640, 320), (200, 30, 30)).save(r / "cats" / "a.jpg")
    Image.new("RGB", (40, 80), (0, 200, 0)).save(r / "cats" / "b.png")
    (r / "cats" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "secret.png").write_bytes(b"secret")
    return r


def test_safe_path_accepts_paths_inside_the_root(root: Path) -> None:
    assert safe_path(root, "cats/a.jpg") == (root / "cats" / "a.jpg").resolve()
    assert safe_path(root, "cats/../cats/b.png") == (root / "cats" / "b.png").resolve()


@pytest.mark.parametrize("rel", ["../secret.png", "cats/../../secret.png", "/etc/passwd", "", "cats/\x00a.jpg"])
def test_safe_path_refuses_traversal(root: Path, rel: str) -> None:
    with pytest.raises(InputError, match="refusing"):
        safe_path(root, rel)


def test_safe_path_refuses_a_symlink_out_of_the_root(root: Path) -> None:
    os.symlink(root.parent / "secret.png", root / "cats" / "link.png")
    with pytest.raises(InputError, match="outside"):
        safe_path(root, "cats/link.png")


def test_thumbnails_are_cached_and_refreshed(tmp_path: Path, root: Path) -> None:
    cache = ThumbCache(tmp_path / "run", root)
    p = cache.get("cats/a.jpg")
    assert p.parent == tmp_path / "run" / "thumbs" and p.suffix == ".jpg"
    with Image.open(p) as im:
        assert im.format == "JPEG" and max(im.size) == THUMB_SIZE and im.size == (160, 80)
    os.utime(p, ns=(10**18, 10**18))  # a mark no rewrite could leave (no sleep needed to tell a rewrite apart)
    first = p.stat().st_mtime_ns
    assert cache.get("cats/a.jpg") == p and p.stat().st_mtime_ns == first  # served from disk
    Image.new("RGB", (100, 100), (0, 0, 255)).save(root / "cats" / "a.jpg")
    os.utime(root / "cats" / "a.jpg", ns=(first + 10**9, first + 10**9))
    q = cache.get("cats/a.jpg")
    assert q != p  # a changed image gets a new thumbnail
    with Image.open(q) as im:
        assert im.size == (100, 100)  # small images are not enlarged


def test_get_many_keeps_order_and_skips_bad_images(tmp_path: Path, root: Path) -> None:
    cache = ThumbCache(tmp_path / "run", root)
    got = cache.get_many(["cats/a.jpg", "cats/broken.jpg", "../secret.png", "cats/missing.jpg", "cats/b.png"])
    assert got[1] is None and got[2] is None and got[3] is None
    assert got[0] == cache.get("cats/a.jpg") and got[4] == cache.get("cats/b.png")
    assert sorted(p.name for p in (tmp_path / "run" / "thumbs").iterdir()) == sorted([got[0].name, got[4].name])
