"""Suggested cluster names (ImageNet head votes) against the true classes.

imagenette-val: how many of the 10 clusters get the ImageNet name of the majority class of their
images (folders are synset ids like n01440764 or names like english_springer; both are mapped).
cifar10-test: the suggested names next to the majority true class (CIFAR classes are not ImageNet's).

    python -m benchmarks.suggested_names [--data imagenette-val cifar10-test] [--backbone mobilenet_v2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from selflabel.config import RunConfig
from selflabel.pipeline import label_folder
from selflabel.runfiles import read_labels
from selflabel.suggest import IMAGENET_CLASSES

from .common import machine_info, markdown_table, shared_data, write_result

# the ten imagenette synsets -> ImageNet-1k class index
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491, "n03028079": 497,
              "n03394916": 566, "n03417042": 569, "n03425413": 571, "n03445777": 574, "n03888605": 701}


def imagenet_name(folder: str) -> str | None:
    """The ImageNet class a folder stands for: its synset id, or its name with '_' as ' ' (any case)."""
    if folder in IMAGENETTE:
        return IMAGENET_CLASSES[IMAGENETTE[folder]]
    by_lower = {c.lower(): c for c in IMAGENET_CLASSES}
    return by_lower.get(folder.replace("_", " ").lower())


def evaluate(name: str, backbone: str, k: int, out: Path) -> tuple[list[list], int, int]:
    cfg = RunConfig()
    cfg.data, cfg.out = str(shared_data(name)), str(out)
    cfg.backbone.name, cfg.cluster.k = backbone, k
    label_folder(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    suggested = manifest["suggested_names"]
    members: dict[int, Counter] = {}
    for r in read_labels(out):
        members.setdefault(r.cluster, Counter())[r.gt] += 1
    rows, right, mappable = [], 0, 0
    for c in sorted(members):
        gt, n_gt = members[c].most_common(1)[0]
        n = sum(members[c].values())
        truth = imagenet_name(gt)
        s = suggested.get(str(c), {})
        ok = truth is not None and s.get("name") == truth
        mappable += truth is not None
        right += ok
        rows.append([c, n, f"{gt} ({100 * n_gt / n:.0f} %)", s.get("label", "-"),
                     ("yes" if ok else "no") if truth is not None else "n/a"])
    return rows, right, mappable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["imagenette-val", "cifar10-test"])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    text = [f"# Suggested names ({args.backbone} ImageNet head, k={args.k})", "", machine_info(), ""]
    for name in args.data:
        with tempfile.TemporaryDirectory() as tmp:
            rows, right, mappable = evaluate(name, args.backbone, args.k, Path(tmp) / "run")
        text += [f"## {name}: {right} of {mappable} clusters named after their majority class" if mappable
                 else f"## {name}", "",
                 markdown_table(["cluster", "images", "majority true class", "suggested name", "match"], rows), ""]
    out = "\n".join(text)
    print(out)
    write_result("suggested_names", out)


if __name__ == "__main__":
    main()
