"""Soft or hard M-step in the one balanced spherical k-means (`selflabel.kmeans.balanced_kmeans`)?

Question: `cluster.py` used a soft (plan-weighted) M-step for images, `dense/parts.py` a hard one
(arguing that soft prototypes collapse). On the same prepared mobilenet_v2 features, for K = the
classes (image labels) and K = 100 (overclustering, as parts), compare Hungarian accuracy / NMI,
the number of distinct prototypes (pairwise cosine < 0.99) and the nearest-prototype share of the
largest cluster, over seeds.

    python -m benchmarks.kmeans_mstep [--quick] [--datasets imagenette-val cifar10-test] [--seeds 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import machine_info, markdown_table, write_result
from benchmarks.quality import load_features


def distinct(protos: torch.Tensor, thr: float = 0.99) -> int:
    """Prototypes left after merging those with cosine >= thr (greedy)."""
    keep: list[int] = []
    for i in range(protos.shape[0]):
        if protos[i].norm() == 0:
            continue
        if all(float(protos[i] @ protos[j]) < thr for j in keep):
            keep.append(i)
    return len(keep)


def main(argv=None) -> None:
    from selflabel.geometry import prepare_features
    from selflabel.kmeans import balanced_kmeans
    from selflabel.metrics import hungarian_accuracy, nmi

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=["imagenette-val", "cifar10-test"])
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    for name in args.datasets:
        feats, gt = load_features(name)
        if args.quick:
            pick = np.random.default_rng(0).permutation(len(feats))[:2000]
            feats, gt = feats[pick], gt[pick]
        y = np.unique(gt, return_inverse=True)[1]
        x = prepare_features(feats)
        for k in (len(np.unique(y)), 100):
            for m_step in ("soft", "hard"):
                acc, nm, dis, big, secs = [], [], [], [], []
                for seed in range(args.seeds):
                    t = time.perf_counter()
                    fit = balanced_kmeans(x, k, seed=seed, m_step=m_step)
                    secs.append(time.perf_counter() - t)
                    lab = fit.labels.numpy()
                    near = (x @ fit.prototypes.T).argmax(1).numpy()
                    acc.append(hungarian_accuracy(y, lab))
                    nm.append(nmi(y, lab))
                    dis.append(distinct(fit.prototypes))
                    big.append(np.bincount(near, minlength=k).max() / len(near))
                rows.append([name, k, m_step, f"{np.mean(acc):.4f}", f"{np.mean(nm):.4f}", f"{np.mean(dis):.1f}",
                             f"{np.mean(big):.3f}", f"{np.mean(secs):.1f}"])
                print(rows[-1], flush=True)
    table = markdown_table(["data", "K", "M-step", "accuracy (balanced labels)", "NMI", "distinct prototypes",
                            "largest nearest-prototype share", "seconds"], rows)
    cap = f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    text = f"# balanced spherical k-means: soft vs hard M-step\n\n{machine_info()}; {cap}\n\n{table}\n"
    print(text)
    write_result("kmeans_mstep" + ("-quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
