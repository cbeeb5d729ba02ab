"""`selflabel assign` speed: images per second for new images, cold (features computed) and warm (cached).

Question: how fast does a reviewed run label images added later? imagenette-val split in two halves by
file name (as tests/integration/test_assign_imagenette.py); the first half is labelled, the second
assigned: warm = its features already in the cache (placement in the stored geometry, writing the run
folder and its review database), cold = a fresh cache, so the backbone runs (mobilenet_v2, the default).
Also the placement alone (`ReviewedClusters.place` on the features in memory).

    python -m benchmarks.assign [--quick] [--cold N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import machine_info, markdown_table, shared_data, write_result


def cpu_capability() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") else "?"
    return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (native bf16: {bf16})"


def split(src: Path, dst: Path, cold: int) -> None:
    """dst/A, dst/B (halves by a hash of the file name) and dst/C (the first `cold` images of B)."""
    n_cold = 0
    for cls in sorted(src.iterdir()):
        for f in sorted(cls.iterdir()):
            half = "AB"[zlib.crc32(f.name.encode()) % 2]
            for part in (half, "C") if half == "B" and n_cold < cold and f.name.endswith("0.JPEG") else (half,):
                d = dst / part / cls.name
                d.mkdir(parents=True, exist_ok=True)
                (d / f.name).symlink_to(f.resolve())
                n_cold += part == "C"


def main(argv=None) -> None:
    import selflabel
    from selflabel.assign import assign_folder, reviewed_clusters

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="cold pass on 64 images")
    ap.add_argument("--cold", type=int, default=256, help="images in the cold (fresh cache) pass")
    args = ap.parse_args(argv)
    cold = 64 if args.quick else args.cold
    tmp = Path(tempfile.mkdtemp(prefix="selflabel-assign-"))
    try:
        split(shared_data("imagenette-val"), tmp, cold)
        first = selflabel.label(tmp / "A", out=tmp / "first", k=10)
        rows = []
        t = time.perf_counter()
        clusters = reviewed_clusters(first.path)
        t_load = time.perf_counter() - t
        feats = np.asarray(first.features)
        t = time.perf_counter()
        clusters.place(feats)
        t_place = time.perf_counter() - t
        rows.append(["placement alone (features in memory)", len(feats), f"{t_place:.3f}", f"{len(feats) / t_place:,.0f}",
                     f"reviewed clusters built in {t_load:.2f} s"])
        for name, folder, cache in (("warm: features cached", tmp / "B", None),
                                    ("cold: fresh cache, backbone runs", tmp / "C", tmp / "fresh-cache")):
            t = time.perf_counter()
            s = assign_folder(first.path, folder, tmp / f"out-{folder.name}", cache_dir=cache, show_progress=False)
            secs = time.perf_counter() - t
            rows.append([name, s.n_images, f"{secs:.2f}", f"{s.n_images / secs:,.1f}",
                         f"features {s.timings['features']:.2f} s ({s.n_computed} computed), unsure {s.n_unsure}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown_table(["assign", "images", "seconds", "images / s", "notes"], rows)
    text = (f"# selflabel assign: images per second\n\n{machine_info()}; {cpu_capability()}\n\n"
            f"imagenette-val, mobilenet_v2, first half labelled (k=10), second half assigned.\n\n{table}\n")
    write_result("assign" + ("-quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
