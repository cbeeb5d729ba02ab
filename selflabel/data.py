"""Ingest: walk a folder of images, decode them safely, and serve them to a DataLoader.

Ids are POSIX paths relative to the root, so runs are stable across machines. Every file
that cannot be used is reported with a reason instead of stopping the run.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from .errors import ImageLoadError, InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


@dataclass
class ImageRecord:
    """One usable image. `id` is its POSIX path relative to the scanned root."""

    id: str
    path: Path
    gt: str | None = None


@dataclass
class Skipped:
    """A file that was left out, and why."""

    path: str
    reason: str


@dataclass
class ScanResult:
    root: Path
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def has_gt(self) -> bool:
        return any(r.gt is not None for r in self.records)


def _display(path: Path, root: Path) -> str:
    """Relative POSIX path as the image id. A name that is not valid UTF-8 (the OS hands it to
    Python with surrogate escapes) is percent-encoded from its raw bytes, so the id is printable,
    fits a UTF-8 CSV and still leads back to the file (see `resolve_id`)."""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return urllib.parse.quote(os.fsencode(rel), safe="/")


def resolve_id(root: str | os.PathLike, image_id: str) -> Path:
    """The file behind an image id (inverse of the id encoding in `scan_folder`)."""
    p = Path(root) / image_id
    if "%" in image_id and not os.path.lexists(p):
        raw = os.fsencode(str(root)) + b"/" + urllib.parse.unquote_to_bytes(image_id)
        alt = Path(os.fsdecode(raw))
        if os.path.lexists(alt):
            return alt
    return p


GT_SOURCES = ("folders",)  # the values of `scan_folder(gt=...)` / `--gt`


def scan_folder(root: str | os.PathLike, *, follow_symlinks: bool = True, gt_csv: str | None = None,
                gt: str | None = None) -> ScanResult:
    """Walk `root` recursively (sorted, case-insensitive extensions), following symlinks safely.

    Ground truth only when asked: the `gt_csv` file (columns path,label), or with ``gt="folders"``
    the first-level folder name of each image (images directly in `root` get none, with a warning). Folder
    names are never labels by themselves: `photos/2019/`, `photos/2020/` are not two classes.
    Raises InputError for a missing or empty root or an unknown `gt`.
    """
    if gt is not None and gt not in GT_SOURCES:
        raise InputError(f"--gt {gt!r}: unknown ground-truth source (allowed: {', '.join(GT_SOURCES)}; "
                         "or give --gt-csv FILE)")
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise InputError(f"{root}: no such file or directory")
    if not root_path.is_dir():
        raise InputError(f"{root}: not a directory")
    root_path = root_path.resolve()
    result = ScanResult(root=root_path)
    seen_dirs: set[tuple[int, int]] = set()
    found: list[tuple[tuple[int, int], bool, ImageRecord]] = []

    def walk(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as exc:
            result.skipped.append(Skipped(_display(d, root_path), f"unreadable folder: {exc.strerror}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            result.skipped.append(Skipped(_display(d, root_path), "symlink loop (folder already visited)"))
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            result.skipped.append(Skipped(_display(d, root_path), f"unreadable folder: {exc.strerror}"))
            return
        for e in entries:
            p = Path(e.path)
            if e.name.startswith("."):
                continue
            try:
                is_link = e.is_symlink()
                if is_link and not follow_symlinks:
                    continue
                if e.is_dir(follow_symlinks=True):
                    walk(p)
                    continue
                if not e.is_file(follow_symlinks=True):
                    if is_link:
                        result.skipped.append(Skipped(_display(p, root_path), "broken symlink"))
                    continue
            except OSError as exc:  # e.g. ELOOP on a self-referencing link
                result.skipped.append(Skipped(_display(p, root_path), f"cannot follow: {exc.strerror}"))
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                fst = p.stat()
            except OSError as exc:
                result.skipped.append(Skipped(_display(p, root_path), f"cannot stat: {exc.strerror}"))
                continue
            found.append(((fst.st_dev, fst.st_ino), is_link, ImageRecord(id=_display(p, root_path), path=p)))

    walk(root_path)
    # one file reached under several names (symlinks, hard links) is labelled once, under its real name
    found.sort(key=lambda f: (f[1], f[2].id))
    keep: dict[tuple[int, int], ImageRecord] = {}
    for fkey, is_link, rec in found:
        if fkey in keep:
            result.skipped.append(Skipped(rec.id, f"same file as {keep[fkey].id} ({'symlink' if is_link else 'hard link'})"))
        else:
            keep[fkey] = rec
    result.records = sorted(keep.values(), key=lambda r: r.id)
    if not result.records:
        raise InputError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    _attach_gt(result, gt_csv, gt)
    return result


def _attach_gt(result: ScanResult, gt_csv: str | None, gt: str | None) -> None:
    if gt_csv:
        table = read_gt_csv(gt_csv)
        for r in result.records:
            r.gt = table.get(r.id)
        return
    if gt == "folders":
        parts = [r.id.split("/") for r in result.records]
        loose = [r.id for r, p in zip(result.records, parts) if len(p) < 2]
        if loose:  # e.g. images assigned later to a run labelled with --gt folders
            log.warning("--gt folders: %d image(s) lie directly in %s, not in a class folder (first: %s): no "
                        "ground truth for them", len(loose), result.root, loose[0])
        for r, p in zip(result.records, parts):
            r.gt = p[0] if len(p) >= 2 else None


def read_gt_csv(path: str | os.PathLike) -> dict[str, str]:
    """Ground truth CSV with columns path,label (path relative to the data root)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: ground-truth CSV not found")
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"path", "label"} <= cols:
                raise InputError(f"{p}: ground-truth CSV needs columns 'path' and 'label' (found: {', '.join(sorted(cols)) or 'none'})")
            return {row["path"].strip(): row["label"].strip() for row in reader if row.get("path")}
    except UnicodeDecodeError:
        raise InputError(f"{p}: ground-truth CSV is not UTF-8 text") from None
    except csv.Error as exc:
        raise InputError(f"{p}: malformed CSV ({exc})") from None


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash (BLAKE2b-128) of a file: the feature cache key, independent of name and location."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_rgb(path: str | os.PathLike, *, max_pixels: int = 100_000_000, display: str | None = None,
             draft_size: int | None = None) -> Image.Image:
    """Open an image safely: size check before decoding, EXIF orientation, first frame, RGB.

    `draft_size`: for JPEGs, let the decoder scale down by a power of two while both sides stay
    >= draft_size (DCT-domain scaling: a 12 MP photo decodes about 11x faster, measured in
    benchmarks/features.py); a no-op for images already that small.

    Raises ImageLoadError with a short reason for zero-byte, truncated, non-image, too large,
    or unreadable files.
    """
    name = display or str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageLoadError(name, f"cannot read: {exc.strerror}") from None
    if size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_header(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageLoadError(name, f"image too large ({w}x{h} = {w * h:,} pixels > limit {max_pixels:,}; raise ingest.max_pixels to allow)")
                if w < 1 or h < 1:
                    raise ImageLoadError(name, f"invalid size {w}x{h}")
                im.seek(0)  # first frame of GIF/WebP/TIFF stacks
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageLoadError:
        raise
    except PermissionError:
        raise ImageLoadError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            msg = f"truncated or corrupt image ({msg})"
        raise ImageLoadError(name, f"cannot decode: {msg}") from None


def _open_header(path):
    """Image.open with PIL's own bomb check off: it reads only the header, and our `max_pixels`
    check (with the image size in the message) runs before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: 16-bit scaled down, alpha composited on white, CMYK/P/L converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0 if hi > 0 else 1.0)
        im = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


class ImageDataset(Dataset):
    """Images of `records` through `transform`; a failing image yields None plus its error."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable[[Image.Image], torch.Tensor],
                 max_pixels: int = 100_000_000, draft_size: int | None = None) -> None:
        self.records = list(records)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        try:
            img = load_rgb(rec.path, max_pixels=self.max_pixels, display=rec.id, draft_size=self.draft_size)
            return self.transform(img), i, None
        except ImageLoadError as exc:
            return None, i, exc.reason
        except Exception as exc:  # a transform failing on a pathological image must not kill the run
            return None, i, f"cannot process: {type(exc).__name__}: {exc}"


def collate_skip(batch):
    """Stack the good samples; return (tensor|None, indices, [(index, reason), ...])."""
    good = [(x, i) for x, i, err in batch if err is None]
    bad = [(i, err) for x, i, err in batch if err is not None]
    if good:
        x = torch.stack([g[0] for g in good])
        idx = torch.tensor([g[1] for g in good], dtype=torch.long)
    else:
        x, idx = None, torch.empty(0, dtype=torch.long)
    return x, idx, bad


# --- GPU JPEG decoding (nvJPEG through torchvision.io.decode_jpeg) ---------------------------------
#
# On a GPU the forward outruns CPU decoding by 10-20x (issue 13), so JPEGs are decoded on the GPU in
# batches. A file goes this way only when nvJPEG decodes it as PIL would: a JPEG in YCbCr or grey
# (not CMYK/YCCK, which PIL inverts), within `max_pixels`. Everything else, and any file nvJPEG
# refuses, takes the CPU path (`load_rgb` + the backbone's transform) one by one. The EXIF orientation
# and the resize / crop / normalisation rules are the CPU path's (`orient`, `tensor_transform`); the
# only difference is that the GPU decodes at full size where the CPU path uses JPEG draft scaling.

EXIF_ORIENTATION = 0x0112
GPU_JPEG_MODES = frozenset({"RGB", "L"})


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a [C, H, W] tensor exactly as PIL's `ImageOps.exif_transpose`."""
    ops = {
        1: lambda t: t,
        2: lambda t: t.flip(-1),  # FLIP_LEFT_RIGHT
        3: lambda t: t.flip(-1).flip(-2),  # ROTATE_180
        4: lambda t: t.flip(-2),  # FLIP_TOP_BOTTOM
        5: lambda t: t.transpose(-1, -2),  # TRANSPOSE
        6: lambda t: torch.rot90(t, -1, dims=(-2, -1)),  # ROTATE_270 (PIL rotates counter-clockwise)
        7: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),  # TRANSVERSE
        8: lambda t: torch.rot90(t, 1, dims=(-2, -1)),  # ROTATE_90
    }
    return ops.get(int(orientation), ops[1])(x)


def tensor_transform(x: torch.Tensor, size: int, decode_size: int, mean, std) -> torch.Tensor:
    """The eval transform of `Backbone.make_transform(crop=True)` on a decoded uint8 [3, H, W] tensor
    (any device): short side to `decode_size` (antialiased), centre crop `size`, scale to [0, 1], normalise."""
    x = TF.resize(x.float(), decode_size, antialias=True)
    x = TF.center_crop(x, [size, size]) / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x.clamp_(0, 1) - m) / s


def gpu_jpeg_header(path: str | os.PathLike, max_pixels: int) -> int | None:
    """The EXIF orientation when `path` can be decoded on the GPU exactly as on the CPU, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _open_header(path) as im:
                w, h = im.size
                if im.format != "JPEG" or im.mode not in GPU_JPEG_MODES or not 0 < w * h <= max_pixels:
                    return None
                return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # unreadable headers are the CPU path's to report, with its reasons
        return None


class EncodedImages(Dataset):
    """For GPU decoding: a JPEG nvJPEG can take comes back as its bytes (uint8 tensor) plus its EXIF
    orientation; any other file is decoded here on the CPU as `ImageDataset` does.
    Items: (kind, payload, index, orientation | error) with kind 'jpeg' | 'tensor' | 'error'."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable[[Image.Image], torch.Tensor],
                 max_pixels: int = 100_000_000, draft_size: int | None = None) -> None:
        self.cpu = ImageDataset(records, transform, max_pixels=max_pixels, draft_size=draft_size)
        self.records = self.cpu.records
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        orientation = gpu_jpeg_header(rec.path, self.max_pixels)
        if orientation is not None:
            try:
                data = torch.frombuffer(bytearray(Path(rec.path).read_bytes()), dtype=torch.uint8)
                return "jpeg", data, i, orientation
            except OSError:
                pass  # the CPU path reports it
        x, i, err = self.cpu[i]
        return ("error", None, i, err) if err is not None else ("tensor", x, i, None)


def collate_encoded(batch):
    """Keep the items as a list (decoded per kind by `decode_encoded_batch`)."""
    return batch


def decode_encoded_batch(batch, device: torch.device, cpu_decode: Callable[[int], tuple], size: int, decode_size: int,
                         mean, std) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    """Decode a batch of `EncodedImages` items on `device`: the JPEGs together through nvJPEG, one by one
    when the batch call fails, and through `cpu_decode(index) -> (tensor | None, index, error)` when a file
    fails alone. Returns what `collate_skip` returns: (stacked tensor | None, indices, [(index, reason)])."""
    out: dict[int, torch.Tensor] = {}
    bad: list[tuple[int, str]] = []
    jpegs = [(data, i, o) for kind, data, i, o in batch if kind == "jpeg"]
    for kind, x, i, err in batch:
        if kind == "tensor":
            out[i] = x.to(device, non_blocking=True)
        elif kind == "error":
            bad.append((i, err))
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(decode_jpeg([d for d, _, _ in jpegs], mode=ImageReadMode.RGB, device=device)) if jpegs else []
    except Exception:  # one odd file fails the whole batch call: retry one by one
        decoded = []
        for d, _, _ in jpegs:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
    for img, (_, i, o) in zip(decoded, jpegs):
        if img is not None:
            out[i] = tensor_transform(orient(img, o), size, decode_size, mean, std)
            continue
        x, _, err = cpu_decode(i)
        if err is not None:
            bad.append((i, err))
        else:
            out[i] = x.to(device, non_blocking=True)
    if not out:
        return None, torch.empty(0, dtype=torch.long), bad
    order = sorted(out)
    return torch.stack([out[i] for i in order]), torch.tensor(order, dtype=torch.long), bad
