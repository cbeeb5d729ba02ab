"""Shared fixtures: tiny generated image folders (unit tests never read ../shared/data)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SELFLABEL_SHARED_DATA", REPO.parent / "shared" / "data"))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(path: Path, color, size=(48, 40), seed=0, fmt=None, noise=20) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, noise, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


@pytest.fixture
def color_folder(tmp_path: Path) -> Path:
    """3 class folders x 8 images of noisy solid colours (trivially separable)."""
    root = tmp_path / "imgs"
    for ci, (name, color) in enumerate(COLORS.items()):
        for i in range(8):
            ext = [".png", ".jpg", ".JPEG", ".bmp"][i % 4]
            make_image(root / name / f"img_{i}{ext}", color, seed=ci * 100 + i)
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def shared(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_dir():
        pytest.skip(f"shared data set {p} not available")
    return p


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest swaps sys.modules['__main__'] for the app script; multiprocessing's spawn
    would then re-run the app in every child. Put the real one back after each test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


def planted_dense_features(n: int = 12, seed: int = 0):
    """Maps of three planted regions (sky band, road band, a salient car block), 8-d features around three
    well separated centres (DenseFeatures for the concept step, no backbone)."""
    from selflabel.data import ImageRecord
    from selflabel.dense.extract import DenseFeatures, Projector

    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, 8)) * 4
    feats, sal = [], []
    for _ in range(n):
        lab = np.ones((10, 12), np.int64)
        lab[: int(rng.integers(3, 6))] = 0
        y, x = int(rng.integers(5, 7)), int(rng.integers(0, 7))
        lab[y:y + 3, x:x + 4] = 2
        feats.append((centres[lab] + rng.normal(0, 0.6, lab.shape + (8,))).astype(np.float16))
        sal.append(np.where(lab == 2, 1.0, 0.05).astype(np.float32))
    recs = [ImageRecord(f"i{i}.png", Path(f"i{i}.png")) for i in range(n)]
    return DenseFeatures(recs, feats, sal, [(40, 48)] * n, [], Projector(np.zeros(8, np.float32), np.ones(8, np.float32), None))
