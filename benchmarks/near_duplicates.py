"""Near-duplicate search at scale: time and peak memory for N synthetic feature rows.

    python -m benchmarks.near_duplicates [--n 100000 1000000] [--d 128]

Each N runs in a fresh subprocess (its own peak RSS): synthetic rows (200 Gaussian clusters) with
1 % planted copies (a row plus noise of 2 % of its norm) are written as a memory-mapped .npy, then
`selflabel.curate` does what a run does: centred unit rows, exact 10-NN by chunked matrix products
(`selflabel.neighbors.knn_exact`, one similarity block at a time), near-duplicate groups. Memory is
the centred copy (N x D float32) plus one block plus the N x 10 results, whatever N; time grows as N^2 D.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 65536


def make_rows(path: Path, n: int, d: int, seed: int = 0) -> np.ndarray:
    """Write N x D float32 rows to `path` in chunks; returns the planted copy pairs (copy, original)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(200, d)).astype(np.float32)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        x[s:e] = centres[rng.integers(0, 200, e - s)] + rng.normal(0, 1.0, (e - s, d)).astype(np.float32)
    copies = rng.choice(np.arange(n // 2, n), n // 100, replace=False)
    originals = rng.integers(0, n // 2, len(copies))
    for c, o in zip(copies, originals):
        row = np.asarray(x[o])
        x[c] = row + rng.normal(0, 0.02 * np.linalg.norm(row) / np.sqrt(d), d).astype(np.float32)
    x.flush()
    return np.stack([copies, originals], 1)


def child(path: str, pairs: str) -> None:
    from selflabel.curate.duplicates import duplicate_of
    from selflabel.curate.prepare import centred_unit
    from selflabel.curate.run import neighbours_of

    t0 = time.perf_counter()
    x = centred_unit(np.load(path, mmap_mode="r"))
    t1 = time.perf_counter()
    nb = neighbours_of(x, method="exact")  # this table times the exact search (benchmarks/memory.py: the index)
    t2 = time.perf_counter()
    dup = duplicate_of(nb.indices, nb.similarities)
    t3 = time.perf_counter()
    p = np.load(pairs)
    group = np.where(dup < 0, np.arange(len(dup)), dup)
    recall = float((group[p[:, 0]] == group[p[:, 1]]).mean())
    print(json.dumps({"prepare_s": t1 - t0, "knn_s": t2 - t1, "groups_s": t3 - t2, "recall": recall,
                      "flagged": int((dup >= 0).sum()), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    import torch

    from benchmarks.common import machine_info, markdown_table, write_result

    info = f"{machine_info()}; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(info, file=sys.stderr)
    rows = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            path, pairs = Path(tmp) / "x.npy", Path(tmp) / "pairs.npy"
            np.save(pairs, make_rows(path, n, args.d))
            out = subprocess.run([sys.executable, "-m", "benchmarks.near_duplicates", "--child", str(path), str(pairs)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([f"{n:,}", args.d, f"{n * args.d * 4 / 1e6:,.0f}", f"{r['prepare_s']:.1f}", f"{r['knn_s']:.1f}",
                     f"{r['groups_s']:.2f}", f"{r['peak_mb']:,.0f}", f"{r['recall']:.3f}", f"{r['flagged']:,}"])
        print(rows[-1], file=sys.stderr)
    text = "\n".join(["# Near-duplicate search at scale", "", info, "",
                      markdown_table(["rows", "D", "features MB", "centre+normalise s", "exact 10-NN s", "groups s",
                                      "peak RSS MB", "planted copies found", "rows flagged"], rows), ""])
    print(text)
    write_result("near_duplicates", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
