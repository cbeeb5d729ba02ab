"""Atomic writes: write a temp file in the target's folder, fsync, then os.replace.

A reader (or a crash) never sees a half-written file. A temp name carries the writer's pid
(`.NAME.<pid>-XXXX.tmp`), so the leftovers of a killed writer are recognised and removed by the next
run (`remove_stale_temps`) while a live writer's are left alone. A full disk or an unwritable folder
raises `StorageError` naming the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import STORAGE_ERRNOS, storage_error

_UMASK = os.umask(0)
os.umask(_UMASK)

# `.NAME.<pid>-XXXX.tmp` (atomic_path) and `.NAME.tmp-<pid>` / `.NAME.old-<pid>` (trees renamed into place)
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^./]+\.tmp$")
_TEMP_TREE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")
_UNMARKED_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # written before temp names carried a pid


def temp_tree(target: Path, kind: str = "tmp") -> Path:
    """The sibling folder a tree is built in before it is renamed to `target` (`kind`: tmp or old)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, *, name: str | None = None, unmarked: bool = False) -> list[Path]:
    """Remove temp files and trees in `folder` left by writers that no longer run (their pid is gone);
    with `name`, only those of that target. `unmarked=True` also removes pid-less temp files of the
    older naming, for a folder the caller holds exclusively (the run lock). Returns what was removed."""
    root = Path(folder)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TEMP_FILE.match(p.name) or _TEMP_TREE.match(p.name)
        stale = m is not None and (name is None or m["name"] == name) and not pid_alive(int(m["pid"]))
        stale = stale or (unmarked and name is None and _UNMARKED_TEMP.match(p.name) is not None and p.is_file())
        if not stale:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    target = Path(path)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual mode
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, target) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
