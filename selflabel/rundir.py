"""Owning a run folder: one `selflabel label` at a time, and one configuration per folder.

`open_run` takes the folder's lock (`flock` on `RUN/.lock`, released by the kernel when the process
dies, so a killed run never blocks the next), removes temp files killed writers left, and compares
the requested configuration with the one the folder's run was started with (`run.json`):
  * the same configuration resumes (cached features, trainer checkpoints) and rewrites the outputs;
  * a different one is refused, unless `overwrite`, which removes the old run's outputs and moves
    the review database (the human work) aside to `previous-review-<time>/`, never deleting it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from .atomic import atomic_write_json, remove_stale_temps
from .config import RunConfig, from_dict, to_dict
from .errors import STORAGE_ERRNOS, InputError, RunBusy, storage_error
from .runfiles import CHECKPOINTS, DENSE, LOCK, MANIFEST, REVIEW_DB, RUN_JSON, RUN_OUTPUTS

log = logging.getLogger(__name__)

# settings that change how fast a run goes or where it keeps its cache, never its result
_NOT_IDENTITY = {("out",), ("backbone", "cache_dir"), ("backbone", "num_workers"), ("backbone", "batch_size"),
                 ("backbone", "flush_every"), ("backbone", "rehash"), ("backbone", "device")}


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """The settings that define a run's result, flattened to dotted keys (data as a resolved path)."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if (key, k) not in _NOT_IDENTITY})
        elif (key,) not in _NOT_IDENTITY:
            flat[key] = value
    flat["data"] = str(Path(cfg.data).resolve()) if cfg.data else ""
    return flat


def stored_identity(run: Path) -> dict[str, Any] | None:
    """The identity of the run a folder holds: `run.json`, or for a folder written before it existed the
    manifest's resolved config (None when the folder holds no run)."""
    for name in (RUN_JSON, MANIFEST):
        p = run / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if name == RUN_JSON:
            return data.get("identity")
        try:
            cfg = from_dict(data.get("config", {}))
        except InputError:
            return {"config": "unreadable"}
        ident = run_identity(cfg)
        ident["data"] = str(Path(data.get("data_root", cfg.data)).resolve())
        ident["legacy"] = True
        return ident
    return None


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (K resolved from the data matches an unset --k)."""
    legacy = old.get("legacy", False)
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "legacy" or (legacy and key == "cluster.k" and new.get(key) is None):
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def holds_outputs(run: Path) -> bool:
    """Whether the folder holds anything a run wrote besides its run.json (outputs, review edits)."""
    return any((run / n).exists() for n in (*RUN_OUTPUTS, REVIEW_DB) if n != RUN_JSON)


def _keep_review_aside(run: Path) -> Path | None:
    """Move review.sqlite (and its WAL files) to previous-review-<UTC time>/; returns the folder."""
    files = [run / f"{REVIEW_DB}{s}" for s in ("", "-wal", "-shm") if (run / f"{REVIEW_DB}{s}").exists()]
    if not files:
        return None
    aside = run / f"previous-review-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    aside.mkdir(exist_ok=True)
    for f in files:
        os.replace(f, aside / f.name)
    return aside


def clear_run(run: Path) -> Path | None:
    """Remove every output of the run in `run` (see runfiles.RUN_OUTPUTS); the review database goes aside.
    Returns where the review went, if there was one."""
    aside = _keep_review_aside(run)
    for name in RUN_OUTPUTS:
        p = run / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    return aside


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold `run/.lock` for the duration; a second holder gets RunBusy at once (no waiting)."""
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusy(f"{run}: another `selflabel label` (pid {holder}) is writing this run folder; wait for "
                          "it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # the lock is held once the file names this process
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next holder)


@contextlib.contextmanager
def open_run(cfg: RunConfig, overwrite: bool = False) -> Iterator[Path]:
    """Take the run folder `cfg.out` for this configuration (see the module docstring). Raises RunBusy
    when another process writes it and InputError when it holds another run and not `overwrite`."""
    run = Path(cfg.out)
    try:
        run.mkdir(parents=True, exist_ok=True)
        with run_lock(run):
            dense = run / DENSE
            for sub in (run, run / CHECKPOINTS, dense, *(p for p in dense.glob("*") if p.is_dir())):
                remove_stale_temps(sub, unmarked=True)
            new = run_identity(cfg)
            old = stored_identity(run) if holds_outputs(run) else None  # a run that wrote nothing holds nothing
            diff = identity_diff(old, new) if old is not None else []
            if diff and not overwrite:
                shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
                raise InputError(f"{run} holds another run ({shown}): choose another --out, or pass --overwrite to "
                                 "replace it (its review edits are kept aside, never deleted)")
            if overwrite and (old is not None or holds_outputs(run)):
                aside = clear_run(run)
                log.warning("--overwrite: removed the previous run's outputs in %s%s", run,
                            f" (review edits kept in {aside})" if aside else "")
            elif old is not None:
                log.info("%s: same configuration as the run it holds: resuming", run)
            atomic_write_json(run / RUN_JSON, {"identity": new, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            yield run
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, run) from None
        raise
