"""ImageFolder export: <out>/<cluster name>/<flattened path>, loadable by torchvision's ImageFolder."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

from ..atomic import remove_stale_temps, temp_tree
from ..data import resolve_id
from ..errors import STORAGE_ERRNOS, InputError, storage_error
from ..runfiles import LabelRow
from .names import default_name, flatten_path, sanitize_name

log = logging.getLogger(__name__)


def export_imagefolder(rows: Iterable[LabelRow], names: dict[int, str], data_root: str | Path, out_dir: str | Path,
                       rejected: set[str] = frozenset(), mode: str = "copy") -> int:
    """Copy (or hardlink/symlink) each non-rejected image into its cluster's folder.

    The tree is built in a temporary sibling folder (`.NAME.tmp-<pid>`) and renamed into place, so a
    crash never leaves a half-written export; the trees of killed exports are removed by the next one.
    A full disk or an unwritable target raises StorageError naming the file. Returns the number of
    images written."""
    if mode not in {"copy", "hardlink", "symlink"}:
        raise InputError(f"imagefolder mode must be copy, hardlink or symlink (got {mode!r})")
    root = Path(data_root).resolve()
    out = Path(out_dir)
    for stale in remove_stale_temps(out.parent, name=out.name):
        log.info("removed %s, left by a killed export", stale)
    tmp = temp_tree(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    folder_of: dict[int, str] = {}
    used: set[str] = set()
    n = 0
    try:
        tmp.mkdir(parents=True)
        for r in rows:
            if r.path in rejected:
                continue
            src = resolve_id(root, r.path).resolve()
            if not src.is_relative_to(root):
                raise InputError(f"{r.path}: path escapes the data root {root}")
            if r.cluster not in folder_of:
                base = sanitize_name(names.get(r.cluster, default_name(r.cluster)), default_name(r.cluster))
                name, i = base, 1
                while name.lower() in used:  # two clusters given the same name stay apart
                    i += 1
                    name = f"{base}_{i}"
                used.add(name.lower())
                folder_of[r.cluster] = name
            dst = tmp / folder_of[r.cluster] / flatten_path(r.path)
            dst.parent.mkdir(exist_ok=True)
            if mode == "copy":
                shutil.copy2(src, dst)
            elif mode == "hardlink":
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            else:
                dst.symlink_to(src)
            n += 1
        if out.exists():
            old = temp_tree(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, out) from None
        raise
    return n
