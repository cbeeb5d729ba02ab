"""Shared helpers for the benchmark scripts: machine description, timing, memory, result tables.

Every script prints a markdown table and keeps it in ``benchmarks/results/<name>.md``
(``write_result``) so numbers in the README can be traced to a run.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def shared_root() -> Path:
    """`../shared/data` beside the checkout, or $SELFLABEL_SHARED_DATA."""
    return Path(os.environ.get("SELFLABEL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_data(name: str) -> Path:
    """`<shared root>/<name>`; exits with a one-line message when it is missing."""
    path = shared_root() / name
    if not path.is_dir():
        raise SystemExit(f"{path}: data set not found (set SELFLABEL_SHARED_DATA to the folder holding {name}/)")
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """One line: CPU model and cores, load, RAM, Python/torch/numpy versions, GPU name if any."""
    import torch

    parts = [f"CPU {_cpu_model()} x {os.cpu_count()} cores",
             f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"numpy {np.__version__}", f"Python {platform.python_version()}"]
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.insert(1, f"{pages * size / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "getloadavg"):
        parts.append("load avg %.1f/%.1f/%.1f" % os.getloadavg())
    if torch.cuda.is_available():
        parts.append("GPU " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        parts.append("no GPU")
    return "; ".join(parts)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        return f"{x:.3g}" if (abs(x) < 1e-2 or abs(x) >= 1e4) and x != 0 else f"{x:.3f}".rstrip("0").rstrip(".")
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, NaN prints as '-'."""
    cells = [[_cell(c) for c in row] for row in rows]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, expected {len(headers)}: {row}")
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells])


def write_result(name: str, text: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` atomically and print the text."""
    from selflabel.atomic import atomic_write_text

    path = RESULTS_DIR / f"{name}.md"
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")
    print(text)
    print(f"[written to {path}]", file=sys.stderr)
    return path


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 0) -> tuple[float, float]:
    """(best, median) wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    Report the best on a shared machine: other load only ever adds time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def make_scores(n: int, k: int, dim: int = 64, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """Cosine similarities of n clustered unit features to k unit prototypes (float32 [n, k]):
    features are noisy copies of random prototypes, as after a few epochs of self-labelling."""
    import torch

    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    z = torch.randint(0, k, (n,), generator=g)
    x = torch.nn.functional.normalize(protos[z] + noise * torch.randn(n, dim, generator=g), dim=1)
    return (x @ protos.T).numpy()


def read_bandwidth_gbs(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Main-memory READ bandwidth in GB/s with every core: ``torch.sum`` over a large float32 array
    (torch's intra-op threads split it), best of ``repeat``. The floor of any pass that must read it."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best, _ = timeit(lambda: x.sum(), repeat=repeat)
    return x.numel() * 4 / best / 1e9


def memory_bandwidth_gbs(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    """Main-memory bandwidth in GB/s: bytes read + written by ``np.copyto`` of a large float32
    array (best of ``repeat``). The array must be much larger than the last-level cache."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best, _ = timeit(lambda: np.copyto(dst, src), repeat=repeat)
    return 2 * src.nbytes / best / 1e9
