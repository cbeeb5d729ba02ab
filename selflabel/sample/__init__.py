"""A small sample of real photos (100 ImageNet validation images from the 10 imagenette
classes, resized to 256 px) shipped with the package, so `selflabel demo` works offline."""
from __future__ import annotations

from pathlib import Path


def sample_dir() -> Path:
    return Path(__file__).resolve().parent / "imagenette"
