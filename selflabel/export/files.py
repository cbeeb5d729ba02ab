"""File placement shared by the folder exports: copy / hardlink / symlink, and a folder built beside
its target and renamed into place, so a crash never leaves a half-written export."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import InputError

MODES = ("copy", "hardlink", "symlink")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"file mode must be {', '.join(MODES)} (got {mode!r})")
    return mode


def place(src: Path, dst: Path, mode: str) -> None:
    """Put `src` at `dst` (parent created); a hardlink across file systems falls back to a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        dst.symlink_to(Path(src).resolve())
        return
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target`; on success it replaces `target`, on error it is removed."""
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
