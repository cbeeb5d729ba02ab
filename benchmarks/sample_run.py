"""A small synthetic run folder (coloured PNGs, labels, features), for tests and for trying the app.

A fixture for tests, benchmarks and trying the app; not part of the package.
`python -m benchmarks.sample_run OUT` writes OUT/images/<class>/*.png and the run files in OUT/run,
then prints the run folder. The labels are the true classes with a few deliberate mistakes, so a
reviewer has something to fix.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import networkx as nx

from selflabel.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json
from selflabel.runfiles import FEATURES, LabelRow, write_labels, write_manifest

CLASSES = ("red", "green", "blue", "yellow")
_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_sample_run(out: str | Path, *, per_class: int = 10, dim: int = 16, mistakes: int = 3,
                    dense: bool = False, seed: int = 0) -> Path:
    """Write a synthetic run under `out`; returns the run folder (`out/run`)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    data_root, run = out / "images", out / "run"
    centres = rng.normal(size=(len(CLASSES), dim)).astype(np.float32) * 3
    rows, feats = [], []
    for ci, name in enumerate(CLASSES):
        for j in range(per_class):
            px = np.clip(np.array(_RGB[name]) + rng.normal(0, 12, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, format="PNG")
            rel = f"{name}/{name}_{j:03d}.png"
            atomic_write_bytes(data_root / rel, buf.getvalue())
            conf = float(rng.uniform(0.4, 1.0))
            rows.append(LabelRow(rel, ci, conf, gt=name))
            feats.append(centres[ci] + rng.normal(size=dim).astype(np.float32))
    for i in rng.choice(len(rows), size=mistakes, replace=False):  # a few wrong, unsure labels
        rows[i].cluster = (rows[i].cluster + 1) % len(CLASSES)
        rows[i].confidence = float(rng.uniform(0.25, 0.35))
    write_labels(run / "labels.csv", rows)
    atomic_save_npy(run / FEATURES, np.stack(feats).astype(np.float32))
    write_manifest(run, {"data_root": str(data_root.resolve()), "counts": {"images": len(rows)},
                         "backbone": "synthetic", "config": {"cluster": {"method": "synthetic", "k": len(CLASSES)}}})
    if dense:
        _write_dense(run, rows, rng)
    return run


def _write_dense(run: Path, rows: list[LabelRow], rng: np.random.Generator) -> None:
    """A tiny dense/ folder in the layout of `dense.pipeline`: a part graph (networkx node-link) whose
    nodes carry their concept, concept label maps, and overlays for 4 images."""
    colors = ["#dc2828", "#28b43c", "#2846dc", "#e6d228"]
    g = nx.Graph()
    for part in range(8):  # two parts per concept
        g.add_node(part, concept=part // 2 + 1, area_fraction=float(rng.uniform(0.05, 0.2)), color=colors[part // 2])
    for u, v, w in ((0, 1, 0.9), (2, 3, 0.8), (4, 5, 0.7), (6, 7, 0.9), (0, 6, 0.3), (2, 4, 0.2)):
        g.add_edge(u, v, weight=w)
    atomic_write_json(run / "dense" / "graph.json", nx.node_link_data(g, edges="edges"))
    concepts = [{"id": i + 1, "name": f"concept_{i + 1:02d}", "kind": "thing", "n_images": 10} for i in range(4)]
    images = []
    for i, r in enumerate(rows[:: max(1, len(rows) // 4)][:4]):
        name = f"{i:05d}.png"
        mask = np.zeros((24, 24), dtype=np.uint8)
        mask[6:18, 6:18] = r.cluster + 1
        for sub, arr in (("maps", mask), ("overlays", np.stack([mask * 60] * 3, -1).astype(np.uint8))):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            atomic_write_bytes(run / "dense" / sub / name, buf.getvalue())
        images.append({"id": r.path, "map": f"maps/{name}", "overlay": f"overlays/{name}", "width": 24, "height": 24})
    atomic_write_json(run / "dense" / "dense.json", {"version": 1, "concepts": concepts, "images": images})


if __name__ == "__main__":  # pragma: no cover - convenience entry
    print(make_sample_run(sys.argv[1] if len(sys.argv) > 1 else "sample_run", dense="--dense" in sys.argv))


def make_scene_folder(out: str | Path, n: int = 8, seed: int = 0) -> Path:
    """`n` street-like 64x48 scenes (sky over road, one or two red cars) in `out`, for a real `--dense` run."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    colours = np.array([(70, 130, 220), (110, 110, 110), (200, 30, 30)], np.float32)
    for i in range(n):
        lab = np.ones((48, 64), np.uint8)
        horizon = int(rng.integers(18, 26))
        lab[:horizon] = 0
        for _ in range(int(rng.integers(1, 3))):
            y, x = int(rng.integers(horizon - 6, 34)), int(rng.integers(0, 44))
            lab[y : y + 12, x : x + 20] = 2
        img = (colours[lab] + rng.normal(0, 12, (48, 64, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        atomic_write_bytes(out / f"scene_{i:02d}.jpg", buf.getvalue())
    return out


def dense_label_command(images: str | Path, run: str | Path) -> list[str]:
    """`selflabel label --dense` with the tiny backbone and small settings: a real dense run in seconds."""
    return [sys.executable, "-m", "selflabel", "label", str(images), "--out", str(run), "--dense", "--backbone", "tiny",
            "--k", "3", "--device", "cpu", "-q", "--set", "dense.image_size=48", "--set", "dense.k_parts=12",
            "--set", "dense.pca_dim=16", "--set", "dense.min_area=16", "--set", "dense.n_overlays=4",
            "--set", "backbone.num_workers=0"]
