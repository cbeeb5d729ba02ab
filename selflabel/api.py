"""The Python API: `selflabel.label(folder, ...)` -> `Run`, the same options and defaults as `selflabel label`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig, apply_overrides, load_config
from .pipeline import label_folder
from .run import Run


def given(options: dict[str, Any]) -> dict[str, Any]:
    """`options` without those left unset (None), sections that end up empty dropped."""
    out = {}
    for key, val in options.items():
        if isinstance(val, dict):
            val = given(val)
        if val is not None and val != {}:
            out[key] = val
    return out


def run_config(folder: str | Path, out: str | Path = "runs/latest", *, k: int | None = None, method: str | None = None,
               heads: str | Sequence[int] | None = None, finetune: bool = False, dense: bool = False,
               backbone: str | None = None, weights: str | Path | None = None, config: str | Path | None = None,
               overrides: Sequence[str] | dict[str, Any] | None = None, seed: int | None = None,
               batch_size: int | None = None, device: str | None = None, amp: str | None = None,
               engine: str | None = None, cache_dir: str | Path | None = None, gt_csv: str | Path | None = None,
               gt: str | None = None) -> RunConfig:
    """The resolved config of a label run: defaults < YAML `config` < `overrides` ("sela.epochs=10" strings
    or a nested dict) < the named options, each checked by the config's own parsing (as the CLI does)."""
    cfg = load_config(config)
    if overrides:
        apply_overrides(cfg, list(overrides) if not isinstance(overrides, dict) else overrides)
    apply_overrides(cfg, given({
        "data": folder, "out": out, "seed": seed,
        "cluster": {"k": k, "method": method, "heads": list(heads) if isinstance(heads, (list, tuple)) else heads,
                    "finetune": finetune or None},
        "dense": {"enabled": dense or None},
        "backbone": {"name": backbone, "weights": weights, "batch_size": batch_size, "device": device, "amp": amp,
                     "engine": engine, "cache_dir": cache_dir},
        "ingest": {"gt_csv": gt_csv, "gt": gt}}))
    return cfg


def label(folder: str | Path, out: str | Path = "runs/latest", *, progress: bool = True, **options: Any) -> Run:
    """Label every image under `folder` and write the run folder `out`; returns it opened as a `Run`.

    `options` are those of `selflabel label` (k, method, heads, finetune, dense, backbone, weights, config,
    overrides, seed, batch_size, device, amp, engine, cache_dir, gt_csv, gt="folders"), with the same defaults:
    no `k` chooses K from the data, and folder names are ground truth only with gt="folders".
    """
    summary = label_folder(run_config(folder, out, **options), show_progress=progress)
    return Run(summary.out)
