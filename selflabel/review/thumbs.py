"""Safe image paths and an on-disk thumbnail cache (run/thumbs/<hash>.jpg).

The review app reads images only through `safe_path`, which refuses anything that does not resolve
inside the run's image root (absolute paths, `..`, symlinks pointing out). Thumbnails are keyed by
the image's relative path, size and modification time, written atomically, and made in a small
thread pool (Pillow releases the GIL while decoding).
"""
from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image, ImageOps

from ..atomic import atomic_write_bytes
from ..errors import InputError

log = logging.getLogger(__name__)

THUMBS = "thumbs"
THUMB_SIZE = 160


def safe_path(root: str | Path, rel: str) -> Path:
    """`root / rel` resolved, or InputError when it would leave `root` (traversal, absolute, symlink out)."""
    base = Path(root).resolve()
    if not rel or "\x00" in rel or Path(rel).is_absolute() or Path(rel).drive:
        raise InputError(f"refusing path {rel!r}: not a path inside the image root")
    full = (base / rel).resolve()
    if not full.is_relative_to(base):
        raise InputError(f"refusing path {rel!r}: it leads outside {base}")
    return full


class ThumbCache:
    """Thumbnails of the images under `data_root`, cached as JPEGs in `run_dir/thumbs`."""

    def __init__(self, run_dir: str | Path, data_root: str | Path, size: int = THUMB_SIZE) -> None:
        self.dir = Path(run_dir) / THUMBS
        self.data_root = Path(data_root).resolve()
        self.size = int(size)

    def key(self, rel: str) -> Path:
        src = safe_path(self.data_root, rel)
        try:
            st = src.stat()
        except OSError:
            raise InputError(f"{rel}: image missing under {self.data_root}") from None
        h = hashlib.sha1(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{self.size}".encode()).hexdigest()
        return self.dir / f"{h}.jpg"

    def get(self, rel: str) -> Path:
        """The thumbnail's path, making it first when not cached."""
        dst = self.key(rel)
        if not dst.exists():
            atomic_write_bytes(dst, make_thumbnail(safe_path(self.data_root, rel), self.size))
        return dst

    def get_many(self, rels: Iterable[str], workers: int = 4) -> list[Path | None]:
        """Thumbnails for many images in order; None for an image that cannot be read."""
        out: list[Path | None] = []
        todo: list[tuple[int, str, Path]] = []
        for rel in rels:
            try:
                dst = self.key(rel)
            except InputError as exc:
                log.warning("no thumbnail for %s: %s", rel, exc)
                dst = None
            out.append(dst)
            if dst is not None and not dst.exists():
                todo.append((len(out) - 1, rel, dst))

        def make(item: tuple[int, str, Path]) -> None:
            i, rel, dst = item
            try:
                atomic_write_bytes(dst, make_thumbnail(safe_path(self.data_root, rel), self.size))
            except (OSError, Image.DecompressionBombError) as exc:
                log.warning("no thumbnail for %s: %s", rel, exc)
                out[i] = None

        if len(todo) > 2:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(make, todo))
        else:
            for item in todo:
                make(item)
        return out


def make_thumbnail(src: Path, size: int) -> bytes:
    """JPEG bytes of `src` fitted into size x size (EXIF-rotated, RGB, first frame)."""
    with Image.open(src) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, far faster
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
