"""Memory: peak RSS and time of the memory-mapped feature path at N = 100,000.

Question: does labelling N = 100,000 feature vectors (D = 1280 float32, 512 MB: what
MobileNetV2 gives for 100k images) stay within a laptop's memory? Each step runs in a fresh
subprocess so its peak is its own: write the matrix with `numpy.lib.format.open_memmap` in chunks,
read it back memory-mapped in chunks, Sinkhorn over the N x K scores (`selflabel.ot.sinkhorn`),
and the whole balanced clustering (`selflabel.cluster.sinkhorn_cluster`). Loading the whole
array with `np.load` (no mmap) is the reference.

Peak RSS is the child's VmHWM (resident set high-water mark, which includes file pages of the
memory map); peak anonymous memory (heap, tensors) is sampled every 5 ms from RssAnon. MB = 10^6 bytes.

    python -m benchmarks.memory [--quick] [--n 100000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHUNK = 8192
STEPS = ("imports", "write", "read", "load_full", "sinkhorn", "prepare", "prepare_8192", "sinkhorn_cluster")
STEP_TEXT = {
    "imports": "python + numpy + torch + selflabel imported, nothing else (the floor of every row)",
    "write": "`open_memmap` N x D float32, filled chunk by chunk (8,192 rows), flushed",
    "read": "`np.load(mmap_mode='r')`, one pass in chunks (column sums and norms, float64 accumulators)",
    "load_full": "reference: `np.load` of the whole array into RAM, same pass",
    "sinkhorn": "mmap -> cosine scores to K prototypes in chunks -> `selflabel.ot.sinkhorn(scores, eps=0.05)`",
    "prepare": "`selflabel.cluster.prepare_features(memmap)` alone (centre + L2-normalise into one float32 tensor; default chunk 65,536 rows)",
    "prepare_8192": "the same with `chunk=8192`",
    "sinkhorn_cluster": "`selflabel.cluster.sinkhorn_cluster(memmap, k)` (centre + normalise, alternate Sinkhorn / prototypes)",
}


def _status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (0 where unavailable, e.g. not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonPeak:
    """Samples RssAnon every `interval` s in a thread; `.peak_kb` is the highest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_kb = interval, _status_kb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))


def synthetic_chunk(start: int, stop: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows start..stop of a fixed synthetic feature matrix: k Gaussian clusters, non-negative
    like post-ReLU CNN features (deterministic per chunk, so any chunking gives the same matrix)."""
    centers = np.random.default_rng(seed).standard_normal((k, d), dtype=np.float32)
    rng = np.random.default_rng([seed, start])
    z = np.arange(start, stop) % k
    x = centers[z] + rng.standard_normal((stop - start, d), dtype=np.float32)
    return np.abs(x, out=x)


def _chunked_pass(x: np.ndarray) -> float:
    """Column sums and squared norms, float64 accumulators, no float64 copy of a chunk."""
    total = np.zeros(x.shape[1])
    sq = 0.0
    for s in range(0, x.shape[0], CHUNK):
        c = x[s:s + CHUNK]
        total += c.sum(0, dtype=np.float64)
        sq += float(np.einsum("ij,ij->", c, c, dtype=np.float64))
    return sq + float(total.sum())


def run_step(step: str, path: Path, n: int, d: int, k: int) -> dict:
    """One step in this process (call it in a fresh subprocess); timings exclude imports."""
    import torch
    import torch.nn.functional as F

    from selflabel.cluster import prepare_features, sinkhorn_cluster
    from selflabel.ot import sinkhorn

    rss0 = _status_kb("VmRSS")
    info: dict = {}
    with AnonPeak() as anon:
        t = time.perf_counter()
        if step == "write":
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
            for s in range(0, n, CHUNK):
                mm[s:s + CHUNK] = synthetic_chunk(s, min(n, s + CHUNK), d, k)
            mm.flush()
            del mm
        elif step == "read":
            _chunked_pass(np.load(path, mmap_mode="r", allow_pickle=False))
        elif step == "load_full":
            _chunked_pass(np.load(path, allow_pickle=False))
        elif step == "sinkhorn":
            x = np.load(path, mmap_mode="r", allow_pickle=False)
            protos = F.normalize(torch.from_numpy(synthetic_chunk(0, k, d, k)), dim=1)
            scores = torch.empty((n, k))
            for s in range(0, n, CHUNK):
                scores[s:s + CHUNK] = F.normalize(torch.from_numpy(np.array(x[s:s + CHUNK])), dim=1) @ protos.T
            scores -= scores.mean(0)  # cosine scores relative to each prototype's mean
            t_scores = time.perf_counter() - t
            res = sinkhorn(scores, eps=0.05)
            info = {"scores_s": t_scores, "sinkhorn_s": time.perf_counter() - t - t_scores, "n_iters": int(res.n_iters),
                    "marginal_err": float(res.marginal_err), "converged": bool(res.converged)}
        elif step in ("prepare", "prepare_8192"):
            x = np.load(path, mmap_mode="r", allow_pickle=False)
            prepare_features(x, **({"chunk": 8192} if step == "prepare_8192" else {}))
        elif step in ("prepare", "prepare_8192"):
            x = np.load(path, mmap_mode="r", allow_pickle=False)
            prepare_features(x, **({"chunk": 8192} if step == "prepare_8192" else {}))
        elif step == "sinkhorn_cluster":
            x = np.load(path, mmap_mode="r", allow_pickle=False)
            res = sinkhorn_cluster(x, k)
            info = {"alternations": int(res.info.get("alternations", 0)),
                    "cluster_sizes": np.bincount(res.labels, minlength=k).tolist()}
        elif step != "imports":
            raise ValueError(f"unknown step {step}")
        seconds = time.perf_counter() - t
    return {"step": step, "seconds": seconds, "rss_start_kb": rss0, "hwm_kb": _status_kb("VmHWM"),
            "anon_peak_kb": anon.peak_kb, "torch_threads": torch.get_num_threads(), **info}


def run_in_subprocess(step: str, path: Path, n: int, d: int, k: int) -> dict:
    """Run one step in a fresh interpreter and return its JSON report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "benchmarks.memory", "--step", step, "--path", str(path),
           "--n", str(n), "--d", str(d), "--k", str(k)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(kb: float) -> float:
    return kb * 1024 / 1e6


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 10,000")
    ap.add_argument("--n", type=int, default=None, help="feature vectors (default 100,000; quick 10,000)")
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n or (10_000 if args.quick else 100_000)
    if args.step:  # child: one step, one JSON line on stdout
        print(json.dumps(run_step(args.step, Path(args.path), n, args.d, args.k)))
        return ""

    from benchmarks.common import markdown_table, write_result

    nbytes = n * args.d * 4
    with tempfile.TemporaryDirectory(prefix="selflabel-bench-mem-") as tmp:
        path = Path(tmp) / "features.npy"
        reports = {}
        for step in STEPS:
            reports[step] = run_in_subprocess(step, path, n, args.d, args.k)
    floor = reports["imports"]["hwm_kb"]
    rows = []
    for step, r in reports.items():
        extra = ""
        if step == "sinkhorn":
            extra = (f"scores {r['scores_s']:.2f} s + Sinkhorn {r['sinkhorn_s']:.2f} s, {r['n_iters']} iterations, "
                     f"marginal err {r['marginal_err']:.1e}, converged {r['converged']}")
        elif step == "sinkhorn_cluster":
            extra = f"{r['alternations']} alternations, cluster sizes {min(r['cluster_sizes']):,}-{max(r['cluster_sizes']):,}"
        rows.append([step, STEP_TEXT[step], f"{mb(r['hwm_kb']):,.0f}", f"{mb(r['hwm_kb'] - floor):+,.0f}",
                     f"{mb(r['anon_peak_kb']):,.0f}", f"{(r['hwm_kb'] - floor) * 1024 / nbytes:.2f}",
                     f"{r['seconds']:.2f}", extra])
    cl = reports["sinkhorn_cluster"]
    line = f"N={n:,}: peak RSS {mb(cl['hwm_kb']):,.0f} MB, time {cl['seconds']:.1f} s"
    text = "\n".join([
        "## Memory: the memory-mapped feature path" + (" (quick)" if args.quick else ""),
        "",
        f"N = {n:,} synthetic feature vectors, D = {args.d} float32 = **{nbytes / 1e6:,.0f} MB**, K = {args.k}; "
        f"each step in a fresh subprocess (torch threads {reports['imports']['torch_threads']}). "
        "Peak RSS = the child's VmHWM (includes the memory map's file pages, which the kernel can drop); "
        "'anon peak' = heap and tensors only (RssAnon, sampled every 5 ms). "
        "'matrices over floor' = (peak RSS - import floor) / matrix size: 1.00 = one copy of the data resident.",
        "",
        markdown_table(["step", "what", "peak RSS MB", "over import floor MB", "anon peak MB",
                        "matrices over floor", "time s", "notes"], rows),
        "",
        f"**{line}** (`sinkhorn_cluster`, the whole clustering of the memory-mapped matrix).",
        "",
    ])
    write_result("memory" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
