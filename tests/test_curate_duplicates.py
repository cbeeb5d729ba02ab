"""Near-duplicates on real photos: imagenette-val plus transformed copies made here (JPEG quality 30,
half size, 10 % crop, horizontal flip) of 40 of its images; the copies are found, distinct photos are not grouped."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import shared
from selflabel.backbones import create_backbone
from selflabel.curate.duplicates import DUPLICATE_THRESHOLD, duplicate_of, duplicate_pairs, without_duplicates
from selflabel.curate.prepare import centred_unit
from selflabel.curate.run import neighbours_of
from selflabel.data import scan_folder
from selflabel.features import extract_features
from selflabel.runfiles import LabelRow

N_ORIGINALS = 40


def transforms(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=30)
    dx, dy = int(w * 0.05), int(h * 0.05)
    return {"jpeg30": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "half": im.resize((w // 2, h // 2), Image.BILINEAR),
            "crop10": im.crop((dx, dy, w - dx, h - dy)),
            "flip": ImageOps.mirror(im)}


@pytest.mark.integration
@pytest.mark.slow
def test_transformed_copies_are_found_and_distinct_photos_are_not(tmp_path: Path) -> None:
    root = shared("imagenette-val")
    scan = scan_folder(root)
    picked = scan.records[:: len(scan.records) // N_ORIGINALS][:N_ORIGINALS]
    copies = tmp_path / "copies"
    for r in picked:
        with Image.open(root / r.id) as im:
            for name, t in transforms(im.convert("RGB")).items():
                out = copies / f"{Path(r.id).stem}__{name}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                t.save(out)
    bb = create_backbone("mobilenet_v2")
    orig = extract_features(scan.records, bb, device="cpu", num_workers=0, show_progress=False)
    cop = extract_features(scan_folder(copies).records, bb, device="cpu", num_workers=0, show_progress=False)
    assert len(orig.records) == len(scan.records) and len(cop.records) == 4 * N_ORIGINALS
    x = centred_unit(np.concatenate([np.asarray(orig.features), np.asarray(cop.features)]))
    n = len(orig.records)
    ids = [r.id for r in orig.records] + [r.id for r in cop.records]
    row_of = {r.id: i for i, r in enumerate(orig.records)}
    source = np.array([row_of[next(p.id for p in picked if Path(p.id).stem == Path(c.id).stem.split("__")[0])]
                       for c in cop.records])
    nb = neighbours_of(x)
    dup = duplicate_of(nb.indices, nb.similarities)
    # recall: each copy is in the group of its original
    group = lambda i: i if dup[i] < 0 else dup[i]  # noqa: E731
    found = np.array([group(n + j) == group(source[j]) for j in range(len(source))])
    sims = np.einsum("nd,nd->n", x[n:], x[source])
    assert found.mean() >= 0.95, (found.mean(), sorted(zip(sims[~found].round(3), np.array(ids[n:])[~found]))[:8])
    # precision: distinct originals are not put in one group
    i, j = duplicate_pairs(nb.indices, nb.similarities)
    distinct = {(min(a, b), max(a, b)) for a, b in zip(i, j) if a < n and b < n}
    grouped = {a for pair in distinct for a in pair}
    assert 1 - len(grouped) / n >= 0.95, (len(grouped), DUPLICATE_THRESHOLD)
    # exports can leave the copies out: one image per group remains
    rows = [LabelRow(p, 0, 1.0, extra={"duplicate_of": ids[dup[k]] if dup[k] >= 0 else ""}) for k, p in enumerate(ids)]
    kept = without_duplicates(rows)
    assert len(kept) == len(rows) - int((dup >= 0).sum()) and {r.path for r in kept} >= {ids[s] for s in source}
    print(f"copy recall {found.mean():.3f}; copy cosine min {sims.min():.3f} median {np.median(sims):.3f}; "
          f"originals grouped {len(grouped)} of {n}")


def test_duplicate_groups_keep_the_lowest_row() -> None:
    idx = np.array([[1, 2], [0, 3], [0, 1], [1, 2]])
    sim = np.array([[0.95, 0.2], [0.95, 0.5], [0.2, 0.1], [0.93, 0.1]], dtype=np.float32)
    assert duplicate_of(idx, sim, 0.9, 0.1).tolist() == [-1, 0, -1, 0]  # 0-1 and 1-3: one group, 0 kept
    assert duplicate_of(idx, sim, 0.99, 0.1).tolist() == [-1, -1, -1, -1]
    # the margin over the 2nd neighbours (0.2, 0.5, 0.1, 0.1): 0-1 stands out by 0.45, 1-3 by 0.43
    assert duplicate_of(idx, sim, 0.9, 0.44).tolist() == [-1, 0, -1, -1]
    assert duplicate_of(idx, sim, 0.9, 0.5).tolist() == [-1, -1, -1, -1]

