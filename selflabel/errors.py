"""Typed errors. The CLI turns each into one line and its exit code."""
from __future__ import annotations

import errno


class SelflabelError(Exception):
    """Base error with a message a user can act on."""

    exit_code = 1


class InputError(SelflabelError):
    """Bad user input: missing path, empty folder, invalid config or CSV."""

    exit_code = 2


class BackboneUnavailable(SelflabelError):
    """Backbone weights cannot be found locally nor downloaded (e.g. offline)."""

    exit_code = 3


class ImageLoadError(SelflabelError):
    """One image could not be decoded; carries the path and a short reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StorageError(SelflabelError):
    """A file could not be written: the disk is full or the folder is not writable. Finished work
    (cache shards, checkpoints, completed outputs) is kept, so the same command resumes once fixed."""

    exit_code = 4

    def __init__(self, message: str, errno_: int | None = None, filename: object = None) -> None:
        super().__init__(message)
        self.errno, self.filename = errno_, filename  # what the OSError said, for callers that re-word it


class RunBusy(SelflabelError):
    """Another `selflabel label` process holds the run folder's lock."""

    exit_code = 5


# errno values that mean "this storage cannot take the write", not a bug: one line and exit code 4
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def storage_error(exc: OSError, path: object = None) -> StorageError:
    """The one-line error for an OSError of STORAGE_ERRNOS, naming the file it happened on."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, then run the same command again (finished work is kept)"
    else:
        hint = "make it writable or choose another --out / --cache-dir, then run the command again"
    return StorageError(f"cannot write {where}: {reason} [{errno.errorcode.get(exc.errno, exc.errno)}]; {hint}",
                        exc.errno, where)
