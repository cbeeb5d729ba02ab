"""Trainer checkpoints: one file per trainer, rewritten atomically after every epoch.

A checkpoint holds only plain containers, tensors and numbers (no pickled classes), so it loads with
`torch.load(..., weights_only=True)`. It records a fingerprint of the run (data shape, heads, seed,
config); a checkpoint whose fingerprint differs belongs to another run and is not resumed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path

log = logging.getLogger(__name__)


def fingerprint(**parts: Any) -> str:
    """A short stable hash of the things that must match for a resume to be valid."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "checkpoints" / f"{name}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, then os.replace: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, expect_fingerprint: str) -> dict[str, Any] | None:
    """The saved state if `path` exists and belongs to this run, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: train from scratch rather than fail the run
        log.warning("%s: cannot be read (%s); starting from scratch", path, exc)
        return None
    if state.get("fingerprint") != expect_fingerprint:
        log.warning("%s: written by a different run (data or config changed); starting from scratch", path)
        return None
    return state
