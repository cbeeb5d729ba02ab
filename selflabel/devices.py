"""Devices, precision and CPU sharing, decided once at the edge (bottom layer: imports only torch and precision).

`resolve_device` turns a flag into a torch.device, `autocast_dtype` turns `--amp` into an autocast
dtype by the hardware (selflabel/precision.py), and `default_num_workers` / `engine_threads` split
the cores between JPEG decoding (DataLoader workers) and the forward pass.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .precision import choose_precision

AMP_CHOICES = ("auto", "bf16", "fp32")


def default_cache_root() -> Path:
    """Where feature caches, exported models and the precision probe live: $SELFLABEL_CACHE or ~/.cache/selflabel."""
    return Path(os.environ.get("SELFLABEL_CACHE", Path.home() / ".cache" / "selflabel"))


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def precision_name(amp: str, device: torch.device) -> str:
    """'bf16' | 'fp16' | 'fp32': what `--amp` means on `device` ('auto': bf16 only with native support)."""
    if amp == "fp32":
        return "fp32"
    if amp == "bf16":
        return "bf16"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return choose_precision(default_cache_root())


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: fp32, no autocast)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision_name(amp, device)]


def dtype_precision(dtype: torch.dtype | None) -> str:
    """Inverse of `autocast_dtype`: the precision name of an autocast dtype."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers for `num_workers=-1`. On a CPU the forward's threads want the cores too, so at
    most 4; on a GPU decoding is the bottleneck (an H100 runs MobileNetV2 at ~10,000 img/s; one core
    decodes ~400 224-px JPEGs/s), so every core but one, up to 16."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        return min(4, cores)
    return max(1, min(16, cores - 1))


def engine_threads() -> int:
    """Intra-op threads of the CPU forward (torch or an inference engine): torch's own setting, which
    the user can lower with OMP_NUM_THREADS / torch.set_num_threads. DataLoader workers run with one
    torch thread each (PyTorch's default), so decoding adds at most `workers` busy threads."""
    return max(1, torch.get_num_threads())
