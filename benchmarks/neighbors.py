"""k nearest neighbours: exact chunked search vs faiss-cpu's IVF index, time, peak memory and recall.

Question: up to which N is the exact search (selflabel.neighbors.knn_exact, one chunked matrix product
per block) fast enough, and what does the approximate index (knn_faiss, IndexIVFFlat) buy beyond that,
at what recall? Features are clustered synthetic unit vectors (noisy copies of random centres, as
backbone features are); recall@k is measured against the exact search.

    python -m benchmarks.neighbors [--sizes 20000 50000] [--dim 1280] [--k 20] [--nprobe 8 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import machine_info, markdown_table, peak_rss_mb, write_result


def clustered(n: int, d: int, seed: int = 0, n_centres: int = 100, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d)).astype(np.float32)
    x = centres[rng.integers(0, n_centres, n)]
    x += noise * rng.normal(size=(n, d)).astype(np.float32)
    return x


def recall(exact: np.ndarray, approx: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, approx)]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 50_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    from selflabel.neighbors import faiss_available, knn_exact, knn_faiss

    rows = []
    for n in args.sizes:
        x = clustered(n, args.dim)
        t = time.perf_counter()
        exact = knn_exact(x, args.k, exclude_self=True)
        t_exact = time.perf_counter() - t
        rows.append([n, args.dim, "exact (chunked matmul)", "-", f"{t_exact:.1f}", 1.0, f"{peak_rss_mb():.0f}"])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr)
        if not faiss_available():
            continue
        for nprobe in args.nprobe:
            t = time.perf_counter()
            approx = knn_faiss(x, args.k, exclude_self=True, nprobe=nprobe)
            rows.append([n, args.dim, "faiss IVF-Flat", nprobe, f"{time.perf_counter() - t:.1f}",
                         recall(exact.indices, approx.indices), f"{peak_rss_mb():.0f}"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr)
    import torch as _t

    text = "\n".join([
        "# k nearest neighbours: exact vs faiss", "",
        f"Machine: {machine_info()}; CPU capability {_t.backends.cpu.get_cpu_capability()}", "",
        f"Command: python -m benchmarks.neighbors {' '.join(argv if argv is not None else sys.argv[1:])}", "",
        f"k = {args.k}, self excluded, clustered synthetic features; time includes normalisation (and for faiss"
        " training and adding the index); recall@k against the exact search; peak RSS of the process so far.", "",
        markdown_table(["N", "D", "search", "nprobe", "time (s)", "recall@k", "peak RSS (MiB)"], rows), "",
    ])
    write_result("neighbors", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
