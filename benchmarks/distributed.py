"""1 vs 2 processes (torchrun, gloo on CPU / nccl on GPUs): wall time of `selflabel label` and the equality check.

python -m benchmarks.distributed [--quick]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, markdown_table, write_result  # noqa: E402
from selflabel.runfiles import read_labels  # noqa: E402

DATA = Path(os.environ.get("SELFLABEL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, data: Path, out: Path, cache: Path, k: int) -> float:
    label = ["-m", "selflabel", "label", str(data), "--out", str(out), "--k", str(k), "--cache-dir", str(cache), "-q",
             "--device", "cpu"]  # CPU processes (gloo): the 1 vs 2 comparison on this machine's cores
    if nproc == 1:
        cmd = [sys.executable, *label]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_port()), *label]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="the packaged 100-image sample instead of imagenette-val")
    args = ap.parse_args(argv)
    if args.quick or not (DATA / "imagenette-val").is_dir():
        from selflabel.sample import sample_dir

        data, name = sample_dir(), "packaged sample (100 photos)"
    else:
        data, name = DATA / "imagenette-val", "imagenette-val (3,925 photos)"
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            for phase in ("fresh cache", "cached"):
                out = Path(tmp) / f"run{nproc}"
                sec = _run(nproc, data, out, Path(tmp) / f"cache{nproc}", 10)
                rows.append([nproc, phase, f"{sec:.1f}"])
            outs[nproc] = read_labels(out), np.load(out / "prototypes.npy")
        (l1, p1), (l2, p2) = outs[1], outs[2]
        same = [r.cluster for r in l1] == [r.cluster for r in l2]
        dproto = float(np.abs(p1 - p2).max())
    base = {r[1]: float(r[2]) for r in rows if r[0] == 1}
    for r in rows:
        r.append(f"{base[r[1]] / float(r[2]):.2f}x")
    table = markdown_table(["processes", "phase", "wall s", "speed-up vs 1"], rows)
    text = (f"## 1 vs 2 processes: `selflabel label` on {name}, k=10\n\n{machine_info()}\n\n{table}\n\n"
            f"Equality check: labels identical: **{same}**; max |prototype difference| = {dproto:.2e}.\n"
            "On a 2-core CPU both processes share the same cores, so no speed-up is expected here; the point is that\n"
            "the distributed path gives the same answer. On several GPUs extraction scales with the number of ranks.\n")
    write_result("distributed-quick" if args.quick else "distributed", text)
    return text


if __name__ == "__main__":
    main()
