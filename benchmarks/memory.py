"""Memory: peak RSS and time of the memory-mapped feature path at N = 100,000, and of near-duplicate search at 1,000,000.

Question: does labelling N = 100,000 feature vectors (D = 1280 float32, 512 MB: what
MobileNetV2 gives for 100k images) stay within a laptop's memory? Each step runs in a fresh
subprocess so its peak is its own: write the matrix with `numpy.lib.format.open_memmap` in chunks,
read it back memory-mapped in chunks, Sinkhorn over the N x K scores (`selflabel.ot.sinkhorn`),
and the whole balanced clustering (`selflabel.cluster.sinkhorn_cluster`). Loading the whole
array with `np.load` (no mmap) is the reference.

Peak RSS is the child's VmHWM (resident set high-water mark, which includes file pages of the
memory map); peak anonymous memory (heap, tensors) is sampled every 5 ms from RssAnon. MB = 10^6 bytes.

Near-duplicates at scale (second table): N synthetic D = 1280 float32 rows (`DUP_CLUSTERS` Gaussian
clusters) of which 1 % are planted noisy copies of other rows (cosine about 0.9 after centring), written
as a memory-mapped .npy in a temp dir. Per N and search, one fresh subprocess runs what a run's
curation does (`selflabel.curate`): centred unit rows, 10-NN of every row (`neighbours_of`: the exact
chunked search or the faiss IVF index), near-duplicate groups; per stage its time, the process's
peak RSS so far and the stage's anonymous peak, then the recall and precision of the planted pairs,
and for the index the recall@10 of its neighbours against the exact ones (where both ran).
The exact search is N^2 D (about 10 minutes at 100,000 on 2 cores), so it runs up to `--dup-exact`.

    python -m benchmarks.memory [--quick] [--n 100000] [--dup-n 100000 1000000] [--dup-exact 100000]
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


# --- near-duplicates at scale -----------------------------------------------------------------

DUP_CLUSTERS = 1000  # synthetic clusters of the near-duplicate rows (1,000 rows each at N = 1,000,000)
DUP_SHARE = 0.01  # planted copies: 1 % of the rows
DUP_COSINE = 0.9  # planted copy vs its original, after centring (noise of norm sqrt(1/c^2 - 1) x the row's)
DUP_K = 10  # neighbours per row, as a run (selflabel.curate.run.N_NEIGHBOURS)
DUP_STAGES = ("prepare", "knn", "groups")
DUP_TEXT = {
    "write": "synthetic rows (`synthetic_chunk`) into an `open_memmap` .npy, 8,192 at a time, then the planted copies",
    "prepare": "`centred_unit(memmap)`: centred, L2-normalised float32 copy (the run's curation geometry)",
    "knn": "`neighbours_of(x, method)`: 10-NN of every row, self excluded",
    "groups": "`duplicate_of`: threshold + margin pairs, connected components",
}


def plant_copies(path: Path, n: int, d: int, seed: int = 0) -> np.ndarray:
    """Write N x D synthetic rows to `path` and overwrite `DUP_SHARE` of them (in the second half) with noisy
    copies of rows of the first half; returns the planted pairs [copies, 2] as (copy, original)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, CHUNK):
        mm[s:s + CHUNK] = synthetic_chunk(s, min(n, s + CHUNK), d, DUP_CLUSTERS, seed)
    rng = np.random.default_rng([seed, n])
    mean = np.asarray(mm[:min(n, 65536)], dtype=np.float64).mean(0).astype(np.float32)
    copies = np.sort(rng.choice(np.arange(n // 2, n), max(1, int(n * DUP_SHARE)), replace=False))
    originals = rng.integers(0, n // 2, len(copies))
    ratio = float(np.sqrt(1.0 / DUP_COSINE ** 2 - 1.0))
    for s in range(0, len(copies), CHUNK):
        c, o = copies[s:s + CHUNK], originals[s:s + CHUNK]
        rows = np.asarray(mm[o]) - mean
        noise = rng.standard_normal(rows.shape, dtype=np.float32)
        noise *= ratio * np.linalg.norm(rows, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
        mm[c] = rows + noise + mean
    mm.flush()
    del mm
    return np.stack([copies, originals], 1)


def planted_recall_precision(dup: np.ndarray, pairs: np.ndarray) -> tuple[float, float]:
    """(share of planted (copy, original) pairs put in one group, share of flagged copies whose kept row is
    a planted partner) for `duplicate_of` output `dup` [N]."""
    n = len(dup)
    group = np.where(dup < 0, np.arange(n), dup)
    recall = float((group[pairs[:, 0]] == group[pairs[:, 1]]).mean())
    planted = np.arange(n)
    planted[pairs[:, 0]] = pairs[:, 1]  # originals come from the first half, copies from the second: no chains
    flagged = np.flatnonzero(dup >= 0)
    precision = float((planted[flagged] == planted[dup[flagged]]).mean()) if len(flagged) else 1.0
    return recall, precision


def neighbour_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact k neighbours that the approximate search also returned."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(1).sum(1)
    return float(hits.mean() / exact.shape[1])


def run_dup_step(path: Path, pairs_path: Path, method: str, out: Path) -> dict:
    """The curation stages on the memmap at `path` with one search `method`, in this process (call it in a
    fresh subprocess); writes the neighbour indices to `out` for the parent's recall@10."""
    from selflabel.curate.duplicates import duplicate_of
    from selflabel.curate.prepare import centred_unit
    from selflabel.curate.run import neighbours_of
    from selflabel.neighbors import choose_method

    stages = {}
    load0 = os.getloadavg()[0]
    x = np.load(path, mmap_mode="r", allow_pickle=False)
    for stage in DUP_STAGES:
        with AnonPeak() as anon:
            t = time.perf_counter()
            if stage == "prepare":
                x = centred_unit(x)
            elif stage == "knn":
                nb = neighbours_of(x, k=DUP_K, method=method)
            else:
                dup = duplicate_of(nb.indices, nb.similarities)
            seconds = time.perf_counter() - t
        stages[stage] = {"seconds": seconds, "hwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.peak_kb}
    np.save(out, nb.indices.astype(np.int32))
    recall, precision = planted_recall_precision(dup, np.load(pairs_path))
    import torch
    return {"method": choose_method(len(x), method), "stages": stages, "recall": recall, "precision": precision,
            "flagged": int((dup >= 0).sum()), "load": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads()}


def run_dup_write(path: Path, pairs_path: Path, n: int, d: int) -> dict:
    """Write the synthetic rows and the planted pairs, in this process; time and peak RSS."""
    with AnonPeak() as anon:
        t = time.perf_counter()
        np.save(pairs_path, plant_copies(path, n, d))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "hwm_kb": _status_kb("VmHWM"), "anon_peak_kb": anon.peak_kb}


def _child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def duplicates_at_scale(sizes: list[int], d: int, exact_max: int) -> str:
    """The near-duplicate table: per N the write, then per search (exact where N <= exact_max, and the index)
    each stage's time and memory, planted-pair recall/precision, the index's recall@10 against the exact search."""
    from benchmarks.common import markdown_table
    from selflabel.neighbors import ANN_NPROBE, EXACT_MAX_ROWS, ann_cells, faiss_available

    methods = ["exact"] + (["faiss"] if faiss_available() else [])
    rows, summary = [], []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="selflabel-bench-dup-") as tmp:
            path, pairs = Path(tmp) / "features.npy", Path(tmp) / "pairs.npy"
            w = _child(["--dup-write", str(path), str(pairs), "--n", str(n), "--d", str(d)])
            rows.append([f"{n:,}", "-", "write", DUP_TEXT["write"], f"{w['seconds']:.1f}", f"{mb(w['hwm_kb']):,.0f}",
                         f"{mb(w['anon_peak_kb']):,.0f}", ""])
            found = {}
            for method in methods:
                if method == "exact" and n > exact_max:
                    continue
                out = Path(tmp) / f"nb-{method}.npy"
                r = _child(["--dup-step", str(path), str(pairs), method, str(out)])
                found[method] = np.load(out)
                name = "exact" if method == "exact" else f"faiss IVF {ann_cells(n):,} cells, nprobe {ANN_NPROBE}"
                for stage in DUP_STAGES:
                    st = r["stages"][stage]
                    note = ""
                    if stage == "groups":
                        note = (f"planted pairs: recall {r['recall']:.3f}, precision {r['precision']:.3f}; "
                                f"{r['flagged']:,} rows flagged")
                        if method == "faiss" and "exact" in found:
                            note += f"; 10-NN recall vs exact {neighbour_recall(found['faiss'], found['exact']):.3f}"
                        note += f"; load {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
                    rows.append([f"{n:,}", name, stage, DUP_TEXT[stage], f"{st['seconds']:.1f}",
                                 f"{mb(st['hwm_kb']):,.0f}", f"{mb(st['anon_peak_kb']):,.0f}", note])
                total = sum(r["stages"][s]["seconds"] for s in DUP_STAGES)
                peak = max(r["stages"][s]["hwm_kb"] for s in DUP_STAGES)
                summary.append(f"N={n:,} {name}: {total:,.0f} s, peak RSS {mb(peak):,.0f} MB, "
                               f"planted recall {r['recall']:.3f} / precision {r['precision']:.3f}")
                print(summary[-1], file=sys.stderr, flush=True)
    return "\n".join([
        "## Near-duplicates at scale",
        "",
        f"N synthetic D = {d} float32 rows ({DUP_CLUSTERS:,} Gaussian clusters, non-negative) with {DUP_SHARE:.0%} "
        f"planted noisy copies (cosine {DUP_COSINE} after centring) of rows of the first half; each search in a fresh "
        f"subprocess. `method='auto'` (what a run uses) takes the exact search up to {EXACT_MAX_ROWS:,} rows and "
        "the faiss index beyond. Peak RSS = VmHWM so far in that process (includes the memmap's file pages); "
        "anon peak = that stage's heap and tensors (RssAnon sampled every 5 ms). Load = 1-minute load average "
        "at the start and end of the process.",
        "",
        markdown_table(["N", "search", "stage", "what", "time s", "peak RSS MB", "anon peak MB", "notes"], rows),
        "",
        *[f"- **{line}**" for line in summary],
        "",
    ])


def mb(kb: float) -> float:
    return kb * 1024 / 1e6


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 10,000")
    ap.add_argument("--n", type=int, default=None, help="feature vectors (default 100,000; quick 10,000)")
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dup-n", type=int, nargs="+", default=None,
                    help="near-duplicate table sizes (default 100,000 1,000,000; quick 10,000; 0: no table)")
    ap.add_argument("--dup-exact", type=int, default=100_000, help="run the exact search too up to this N")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--dup-write", nargs=2, help=argparse.SUPPRESS)  # child: PATH PAIRS
    ap.add_argument("--dup-step", nargs=4, help=argparse.SUPPRESS)  # child: PATH PAIRS METHOD OUT
    args = ap.parse_args(argv)
    n = args.n or (10_000 if args.quick else 100_000)
    if args.step:  # child: one step, one JSON line on stdout
        print(json.dumps(run_step(args.step, Path(args.path), n, args.d, args.k)))
        return ""
    if args.dup_write:
        print(json.dumps(run_dup_write(Path(args.dup_write[0]), Path(args.dup_write[1]), n, args.d)))
        return ""
    if args.dup_step:
        path, pairs, method, out = args.dup_step
        print(json.dumps(run_dup_step(Path(path), Path(pairs), method, Path(out))))
        return ""

    import torch

    from benchmarks.common import machine_info, markdown_table, write_result

    machine = f"{machine_info()}; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(machine, file=sys.stderr, flush=True)
    dup_sizes = [m for m in (args.dup_n or ([10_000] if args.quick else [100_000, 1_000_000])) if m > 0]

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
    dup_text = duplicates_at_scale(dup_sizes, args.d, args.dup_exact) if dup_sizes else ""
    text = "\n".join([
        "## Memory: the memory-mapped feature path" + (" (quick)" if args.quick else ""),
        "",
        f"Machine: {machine}",
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
        dup_text,
    ])
    write_result("memory" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
