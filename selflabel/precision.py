"""Which float precision a CPU runs fastest: bf16 only where the hardware supports it natively.

Without native bf16 (AVX2 laptops and cloud machines) bf16 is emulated and was measured 5x slower
than fp32 (issue 13); with AVX-512 BF16 or AMX it was 2.5x faster. The decision follows the hardware:
- oneDNN reports no bf16 support (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` False, typically
  `get_cpu_capability()` 'AVX2' or lower): fp32;
- the CPU flags list a native bf16 instruction set (avx512_bf16, amx_bf16): bf16;
- otherwise (oneDNN says yes but the flags do not show native support, or cannot be read): a short
  timed probe, fp32 against bf16 autocast on a small conv net, cached per machine and library version
  in `<cache root>/precision-probe.json` (atomic write), so it runs once per machine.
"""
from __future__ import annotations

import functools
import json
import logging
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

from .atomic import atomic_write_json

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")
PROBE_FILE = "precision-probe.json"
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 clearly: it also costs accuracy


def cpu_capability() -> str:
    """torch's view of the CPU's vector ISA ('AVX512', 'AVX2', 'DEFAULT', ...)."""
    return torch.backends.cpu.get_cpu_capability()


def mkldnn_bf16() -> bool:
    """Whether oneDNN will run bf16 kernels at all (False: bf16 would be emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from /proc/cpuinfo (None where that cannot be read: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return None


def cpu_model() -> str:
    """A name for this CPU kind, to key the probe cache."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_support() -> str:
    """'native' | 'none' | 'unknown' (the last one is settled by `probe_bf16_speedup`)."""
    if not mkldnn_bf16():
        return "none"
    flags = cpu_flags()
    if flags is not None and any(f in flags for f in NATIVE_BF16_FLAGS):
        return "native"
    return "unknown"


def cpu_summary() -> str:
    """One line for benchmark headers and logs: capability, oneDNN bf16, native flags, CPU model."""
    flags = cpu_flags() or set()
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    return (f"capability {cpu_capability()}, oneDNN bf16 {'yes' if mkldnn_bf16() else 'no'}, "
            f"native bf16 flags {', '.join(native) or 'none'} ({cpu_model()}, torch {torch.__version__})")


@torch.inference_mode()
def probe_bf16_speedup(batch: int = 8, size: int = 64, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv net on this CPU (best of `repeats`; ~1 s)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 3, 1, 1), nn.ReLU(),
                            nn.Conv2d(128, 128, 3, 1, 1), nn.AdaptiveAvgPool2d(1)).eval()
        x = torch.randn(batch, 3, size, size)

    def best(bf16: bool) -> float:
        times = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x)  # warm-up: kernel selection
            for _ in range(repeats):
                t = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t)
        return min(times)

    return best(False) / best(True)


def _probe_key() -> str:
    return f"{cpu_model()} | {cpu_capability()} | torch {torch.__version__}"


def probed_precision(cache_root: str | Path | None) -> str:
    """bf16 when the timed probe finds it clearly faster, else fp32; cached per machine and torch version."""
    path = Path(cache_root) / PROBE_FILE if cache_root is not None else None
    key = _probe_key()
    table: dict = {}
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if isinstance(table, dict) and isinstance(table.get(key), dict) and table[key].get("precision") in ("bf16", "fp32"):
            return table[key]["precision"]
    speedup = probe_bf16_speedup()
    choice = "bf16" if speedup >= PROBE_MIN_SPEEDUP else "fp32"
    log.info("precision probe: bf16 is %.2fx fp32 on this CPU (%s): using %s", speedup, key, choice)
    if path is not None:
        table = table if isinstance(table, dict) else {}
        table[key] = {"precision": choice, "bf16_speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            atomic_write_json(path, table)
        except OSError as exc:  # a read-only cache only costs the probe again next run
            log.warning("precision probe: cannot record the result in %s (%s)", path, exc.strerror or exc)
    return choice


@functools.lru_cache(maxsize=8)
def _choose_cached(cache_root: str | None, support: str) -> str:
    if support == "native":
        return "bf16"
    if support == "none":
        return "fp32"
    return probed_precision(cache_root)


def choose_precision(cache_root: str | Path | None = None) -> str:
    """'bf16' or 'fp32' for `--amp auto` on this CPU (see the module docstring)."""
    return _choose_cached(None if cache_root is None else str(cache_root), bf16_support())
