"""A picture of dense concept masks before and after refinement to image edges, for the README.

One CamVid val frame (downscaled), its concept masks as the plain argmax of the upsampled part scores and
refined by SLIC superpixels and by the guided filter (`dense.refine`), side by side, concept borders in
white. The part prototypes and concepts are fitted on the first `--images` val images with the default
config (refine aside), exactly as the pipeline does. CamVid is for research use: only this one
illustrative, downscaled frame goes into docs/.

    python -m benchmarks.dense_picture [--frame 0] [--images 30] [--out docs/dense_refine.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.common import shared_root

PANEL_W = 320  # each panel's width in the picture (CamVid 480 x 360 -> 320 x 240)


def panel(rgb: np.ndarray, cmap: np.ndarray, colours: np.ndarray, title: str, width: int = PANEL_W) -> Image.Image:
    """One captioned overlay of a concept map, downscaled to `width`."""
    from selflabel.dense.masks import overlay, resize_labels

    h = round(rgb.shape[0] * width / rgb.shape[1])
    small = np.asarray(Image.fromarray(rgb).resize((width, h), Image.Resampling.BILINEAR))
    im = Image.fromarray(overlay(small, resize_labels(cmap, (h, width)), colours))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width, 16), fill=(0, 0, 0))
    draw.text((4, 2), title, fill=(255, 255, 255))
    return im


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dense_picture", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="CamVid split with images/ (default: shared camvid/val)")
    ap.add_argument("--images", type=int, default=30, help="images the parts and concepts are fitted on")
    ap.add_argument("--frame", type=int, default=0, help="which of them to draw")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "dense_refine.png")
    args = ap.parse_args(argv)

    from selflabel.backbones import create_backbone
    from selflabel.config import RunConfig
    from selflabel.data import load_rgb, scan_folder
    from selflabel.dense.extract import extract_dense
    from selflabel.dense.masks import palette
    from selflabel.dense.pipeline import concept_map, fit_concepts, part_map, refine_options

    data = args.data or shared_root() / "camvid" / "val"
    records = scan_folder(data / "images").records[:args.images]
    cfg = RunConfig()
    d = cfg.dense
    feats = extract_dense(records, create_backbone("mobilenet_v2"), image_size=d.image_size, device=torch.device("cpu"),
                          keep_aspect=d.keep_aspect, pca_dim=d.pca_dim, batch_size=16, seed=cfg.seed, show_progress=False)
    model = fit_concepts(feats, d, cfg.seed)
    i = min(args.frame, len(feats.records) - 1)
    rec, f, (H, W) = feats.records[i], feats.feats[i], feats.sizes[i]
    rgb = np.asarray(load_rgb(rec.path))
    protos = torch.from_numpy(model.parts.prototypes)
    colours = palette(len(model.concepts) + 1, seed=cfg.seed)
    panels = []
    for refine, title in (("none", "plain argmax (refine=none)"), ("slic", "refine=slic"), ("guided", "refine=guided")):
        pm = part_map(f, protos, (H, W), d.mask_size, rgb=rgb, refine=refine, **refine_options(d))
        panels.append(panel(rgb, concept_map(pm, model.lut, d.min_area)[0], colours, title))
    pic = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), (255, 255, 255))
    x = 0
    for p in panels:
        pic.paste(p, (x, 0))
        x += p.width + 4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pic.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"{args.out}: frame {rec.id}, {len(model.concepts)} concepts, {args.out.stat().st_size // 1024} KiB")
    return args.out


if __name__ == "__main__":
    main()
