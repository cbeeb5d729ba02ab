"""A stat-keyed memo of file content digests, so a rerun does not read every image again.

The feature cache is keyed by content digests, which costs one full read of every file per run:
nothing for imagenette, hours for 100,000 camera photos on a network disk. Like git's index, a file
whose (size, mtime_ns, ctime_ns, inode, device) are unchanged since its digest was recorded is not
hashed again. A file modified less than `RACY_S` seconds before it was hashed is not recorded (a
write within the same timestamp tick could leave its stat unchanged: git's "racily clean" rule).

The memo is one SQLite file beside the feature cache (`<cache root>/digests.sqlite`). Any database
error disables it with a warning and the run hashes as before: the memo can save time, never change
a result.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

RACY_S = 2.0  # seconds: files modified this recently are hashed but not memoised
_FLUSH_EVERY = 10_000  # new entries per write transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL, dev INTEGER NOT NULL, digest TEXT NOT NULL
)
"""

StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """What must be unchanged for a recorded digest to stand."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def is_racy(st: os.stat_result, hashed_at: float) -> bool:
    """True when the file changed too shortly before it was hashed for its stat to vouch for its content."""
    return max(st.st_mtime_ns, st.st_ctime_ns) >= (hashed_at - RACY_S) * 1e9


class DigestMemo:
    """`digest(path)`: the memoised content digest of a file (`compute(path)` when the memo cannot vouch).

    `db_path=None` disables the memo (every call computes). Use as a context manager, or call `close()`,
    so the last new entries are written.
    """

    def __init__(self, db_path: str | Path | None, compute: Callable[[str | os.PathLike], str],
                 timeout_s: float = 30.0) -> None:
        self.compute = compute
        self.conn: sqlite3.Connection | None = None
        self.pending: list[tuple] = []
        self.hits = self.misses = 0
        self.db_path = db_path
        if db_path is None:
            return
        try:
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(db_path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        log.warning("digest memo %s unusable (%s): hashing every file", self.db_path, exc)
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
        self.conn, self.pending = None, []

    def digest(self, path: str | os.PathLike) -> str:
        """The content digest of `path`; raises OSError as reading the file would."""
        if self.conn is None:
            return self.compute(path)
        key_path = os.fsencode(os.path.abspath(path))  # bytes: any file name, UTF-8 or not
        st = os.stat(path)
        key = stat_key(st)
        try:
            row = self.conn.execute("SELECT size, mtime_ns, ctime_ns, ino, dev, digest FROM digests WHERE path = ?",
                                    (key_path,)).fetchone()
        except sqlite3.Error as exc:
            self._disable(exc)
            return self.compute(path)
        if row is not None and tuple(row[:5]) == key:
            self.hits += 1
            return row[5]
        self.misses += 1
        hashed_at = time.time()
        digest = self.compute(path)
        after = os.stat(path)
        if stat_key(after) == key and not is_racy(after, hashed_at):  # unchanged while we read it, and not racy
            self.pending.append((key_path, *key, digest))
            if len(self.pending) >= _FLUSH_EVERY:
                self.flush()
        return digest

    def flush(self) -> None:
        """Write the new entries (one transaction)."""
        if self.conn is None or not self.pending:
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", self.pending)
            self.conn.execute("COMMIT")
            self.pending = []
        except sqlite3.Error as exc:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._disable(exc)

    def close(self) -> None:
        self.flush()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "DigestMemo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
