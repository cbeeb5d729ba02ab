"""Review edits in SQLite: an append-only edit log and the current state derived from it.

`run/review.sqlite` (WAL mode, busy_timeout) holds

- `edits`: one row per user action (rename, merge, split, move, status, undo). Rows are never
  updated or deleted (triggers enforce it). Each row stores the action's arguments and its
  exact changes as before/after pairs, so undo restores the previous state exactly.
- `images`, `names`: the current state, i.e. labels.csv with every active edit applied;
  `concept_names`: the user's names for a dense run's object concepts (COCO categories).
  `replay()` recomputes it from labels.csv and the log; the tests check that both agree.

Every edit is one `BEGIN IMMEDIATE` transaction that reads the rows it changes, writes them and
appends to the log, so a closed tab or a crash loses nothing and two tabs (or two processes)
editing at once are serialised by SQLite's lock. Undo removes the newest edit that is still
active (last in, first out); an undo is itself a log row pointing at the edit it undid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..errors import InputError, SelflabelError
from ..export.names import default_name
from ..geometry import feature_mean, mean_prototypes, prepare
from ..geometry_io import GEOMETRY, load_geometry
from ..kmeans import balanced_kmeans
from ..runfiles import FEATURES, LABELS, REVIEW_DB, LabelRow, read_labels

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "rejected", "unsure")
MOVED_CONFIDENCE = 1.0  # a person chose this label
SPLIT_TEMPERATURE = 0.1  # softmax temperature of split confidences, as ClusterConfig.temperature

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    idx INTEGER NOT NULL UNIQUE,            -- row in labels.csv and features.npy
    cluster INTEGER NOT NULL,
    confidence REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'rejected', 'unsure'))
);
CREATE INDEX IF NOT EXISTS images_cluster ON images (cluster, confidence);
CREATE TABLE IF NOT EXISTS names (cluster INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS concept_names (concept INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    summary TEXT NOT NULL,
    args TEXT NOT NULL,                     -- JSON
    changes TEXT NOT NULL,                  -- JSON list of ["i", path, before, after] / ["n" | "c", id, before, after]
    undoes INTEGER REFERENCES edits (id)
);
CREATE TRIGGER IF NOT EXISTS edits_no_update BEFORE UPDATE ON edits
BEGIN SELECT RAISE(ABORT, 'the edit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS edits_no_delete BEFORE DELETE ON edits
BEGIN SELECT RAISE(ABORT, 'the edit log is append-only'); END;
"""

_ACTIVE = "kind != 'undo' AND id NOT IN (SELECT undoes FROM edits WHERE undoes IS NOT NULL)"


class ConflictError(SelflabelError):
    """The data changed under an edit (another tab edited the same cluster); retry it."""


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    name: str
    size: int
    n_rejected: int
    n_unsure: int
    mean_confidence: float


@dataclass(frozen=True)
class Member:
    path: str
    idx: int
    cluster: int
    confidence: float
    status: str


@dataclass(frozen=True)
class Edit:
    id: int
    ts: float
    kind: str
    summary: str
    args: dict[str, Any]
    undoes: int | None
    active: bool


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the database to WAL, retrying while another connection holds it: SQLite answers this
    pragma 'database is locked' at once instead of waiting for busy_timeout (two tabs opening a new
    review together hit it)."""
    deadline, delay = time.monotonic() + timeout_s, 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.1)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ReviewStore:
    """The review database of one run folder. Thread-safe (one lock around each call)."""

    def __init__(self, run_dir: str | Path, *, create: bool = True, timeout_s: float = 30.0) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / REVIEW_DB
        labels_path = self.run_dir / LABELS
        self.base_rows = read_labels(labels_path)
        if not create and not self.db_path.exists():
            raise InputError(f"{self.db_path}: no review database")
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(
            self.db_path, timeout=timeout_s, isolation_level=None, check_same_thread=False
        )
        self.conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if create:
            _enable_wal(self.conn, timeout_s)
        self.conn.execute("PRAGMA synchronous = NORMAL" if create else "PRAGMA query_only = 1")
        self._init(_digest(labels_path), create)

    # ---------------------------------------------------------------- setup
    def _init(self, digest: str, create: bool) -> None:
        with self._lock:
            if create:
                # executescript commits any open transaction itself, so the script carries its own.
                self.conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
                self._seed(digest)
            elif not self._has_meta():
                raise InputError(f"{self.db_path}: not a review database")
            have = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            if have.get("labels_sha256") != digest:
                raise InputError(
                    f"{self.db_path} holds edits for a different labels.csv (was the run redone?). "
                    "Move review.sqlite aside to start a fresh review."
                )

    def _has_meta(self) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None

    def _seed(self, digest: str) -> None:
        with self._tx():
            if self.conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0]:
                return  # another connection seeded it first
            paths = [r.path for r in self.base_rows]
            if len(set(paths)) != len(paths):
                raise InputError(f"{self.run_dir / LABELS}: duplicate paths; cannot review")
            self.conn.executemany(
                "INSERT INTO images (path, idx, cluster, confidence, status) VALUES (?, ?, ?, ?, 'ok')",
                [(r.path, i, int(r.cluster), float(r.confidence)) for i, r in enumerate(self.base_rows)],
            )
            next_id = max((int(r.cluster) for r in self.base_rows), default=-1) + 1
            self.conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema", str(SCHEMA_VERSION)), ("labels_sha256", digest), ("next_cluster", str(next_id))],
            )

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> "ReviewStore._Tx":
        return ReviewStore._Tx(self.conn)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "ReviewStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- reads
    def version(self) -> int:
        """Id of the newest log row (0 when none): changes whenever the state may have changed."""
        with self._lock:
            return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM edits").fetchone()[0])

    def names(self) -> dict[int, str]:
        """Name of every non-empty cluster: the user's name or `cluster_<id>`."""
        with self._lock:
            named = dict(self.conn.execute("SELECT cluster, name FROM names").fetchall())
            ids = [c for (c,) in self.conn.execute("SELECT DISTINCT cluster FROM images ORDER BY cluster")]
        return {c: named.get(c, default_name(c)) for c in ids}

    def concept_names(self) -> dict[int, str]:
        """The user's names of dense concepts (concept id -> name); concepts not renamed are absent."""
        with self._lock:
            if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'concept_names'").fetchone() is None:
                return {}  # a database written before concept names existed, opened read-only
            return dict(self.conn.execute("SELECT concept, name FROM concept_names").fetchall())

    def clusters(self) -> list[ClusterInfo]:
        """Every non-empty cluster, largest first."""
        with self._lock:
            named = dict(self.conn.execute("SELECT cluster, name FROM names").fetchall())
            rows = self.conn.execute(
                "SELECT cluster, COUNT(*), SUM(status = 'rejected'), SUM(status = 'unsure'), AVG(confidence) "
                "FROM images GROUP BY cluster ORDER BY COUNT(*) DESC, cluster"
            ).fetchall()
        return [ClusterInfo(c, named.get(c, default_name(c)), n, int(r), int(u), float(m)) for c, n, r, u, m in rows]

    def members(
        self, cluster: int, *, least_confident: bool = False, offset: int = 0, limit: int | None = None
    ) -> list[Member]:
        """Members of a cluster ordered by confidence (most confident first unless asked otherwise)."""
        order = "ASC" if least_confident else "DESC"
        with self._lock:
            rows = self.conn.execute(
                f"SELECT path, idx, cluster, confidence, status FROM images WHERE cluster = ? "
                f"ORDER BY confidence {order}, idx LIMIT ? OFFSET ?",
                (int(cluster), -1 if limit is None else int(limit), int(offset)),
            ).fetchall()
        return [Member(*r) for r in rows]

    def cluster_size(self, cluster: int) -> int:
        with self._lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM images WHERE cluster = ?", (int(cluster),)).fetchone()[0])

    def member(self, path: str) -> Member | None:
        with self._lock:
            r = self.conn.execute(
                "SELECT path, idx, cluster, confidence, status FROM images WHERE path = ?", (path,)
            ).fetchone()
        return Member(*r) if r else None

    def assignments(self) -> np.ndarray:
        """Current cluster of every image, in labels.csv / features.npy row order (int64 [N])."""
        with self._lock:
            rows = self.conn.execute("SELECT idx, cluster FROM images ORDER BY idx").fetchall()
        return np.array([c for _, c in rows], dtype=np.int64)

    def state(self) -> tuple[dict[str, tuple[int, float, str]], dict[int, str]]:
        """The stored current state: path -> (cluster, confidence, status), and explicit names."""
        with self._lock:
            imgs = {p: (c, f, s) for p, c, f, s in self.conn.execute("SELECT path, cluster, confidence, status FROM images")}
            names = dict(self.conn.execute("SELECT cluster, name FROM names").fetchall())
        return imgs, names

    def effective(self) -> tuple[list[LabelRow], dict[int, str], set[str], set[str]]:
        """labels.csv with every edit applied, the cluster names, the rejected and the unsure paths."""
        imgs, named = self.state()
        rows = []
        for r in self.base_rows:
            c, f, _s = imgs[r.path]
            rows.append(replace(r, cluster=int(c), confidence=float(f), extra=dict(r.extra)))
        rejected = {p for p, (_, _, s) in imgs.items() if s == "rejected"}
        unsure = {p for p, (_, _, s) in imgs.items() if s == "unsure"}
        names = {c: named.get(c, default_name(c)) for c in sorted({c for c, _, _ in imgs.values()})}
        return rows, names, rejected, unsure

    def history(self, limit: int = 50) -> list[Edit]:
        """The newest log rows first, each marked active or not."""
        with self._lock:
            undone = {u for (u,) in self.conn.execute("SELECT undoes FROM edits WHERE undoes IS NOT NULL")}
            rows = self.conn.execute(
                "SELECT id, ts, kind, summary, args, undoes FROM edits ORDER BY id DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [
            Edit(i, ts, k, s, json.loads(a), u, k != "undo" and i not in undone) for i, ts, k, s, a, u in rows
        ]

    def replay(self, concepts: bool = False):
        """Recompute the current state from labels.csv and the active edits' after-values:
        (images, cluster names), and with `concepts` also the concept names."""
        imgs = {r.path: (int(r.cluster), float(r.confidence), "ok") for r in self.base_rows}
        names: dict[str, dict[int, str]] = {"n": {}, "c": {}}
        with self._lock:
            logged = self.conn.execute(f"SELECT changes FROM edits WHERE {_ACTIVE} ORDER BY id").fetchall()
        for (changes,) in logged:
            for kind, key, _before, after in json.loads(changes):
                if kind == "i":
                    imgs[key] = (int(after[0]), float(after[1]), str(after[2]))
                elif after is None:
                    names[kind].pop(int(key), None)
                else:
                    names[kind][int(key)] = after
        return (imgs, names["n"], names["c"]) if concepts else (imgs, names["n"])

    # ---------------------------------------------------------------- writes
    def rename(self, cluster: int, name: str) -> int | None:
        name = name.strip()
        if not name:
            raise InputError("a cluster name cannot be empty")
        with self._lock, self._tx() as conn:
            self._require_clusters(conn, [cluster])
            before = self._name(conn, cluster)
            if before == name:
                return None
            return self._log(conn, "rename", f"rename {before or default_name(cluster)} -> {name}",
                             {"cluster": int(cluster), "name": name}, [["n", int(cluster), before, name]])

    def rename_concept(self, concept: int, name: str, known: Iterable[int] | None = None) -> int | None:
        """Name a dense object concept (its COCO category); `known`: the run's concept ids, to check against."""
        name = name.strip()
        if not name:
            raise InputError("a concept name cannot be empty")
        concept = int(concept)
        if known is not None and concept not in {int(c) for c in known}:
            raise InputError(f"concept {concept} does not exist in this run's dense outputs")
        with self._lock, self._tx() as conn:
            r = conn.execute("SELECT name FROM concept_names WHERE concept = ?", (concept,)).fetchone()
            before = r[0] if r else None
            if before == name:
                return None
            return self._log(conn, "rename_concept", f"rename concept {before or concept} -> {name}",
                             {"concept": concept, "name": name}, [["c", concept, before, name]])

    def merge(self, sources: Sequence[int], target: int) -> int | None:
        """Move every member of `sources` into `target` (which keeps its name and id)."""
        sources = sorted({int(s) for s in sources} - {int(target)})
        if not sources:
            return None
        with self._lock, self._tx() as conn:
            self._require_clusters(conn, [target, *sources])
            rows = conn.execute(
                f"SELECT path, cluster, confidence, status FROM images WHERE cluster IN ({','.join('?' * len(sources))})",
                sources,
            ).fetchall()
            changes = [["i", p, [c, f, s], [int(target), f, s]] for p, c, f, s in rows]
            tname = self._name(conn, target) or default_name(target)
            return self._log(conn, "merge", f"merge {len(sources)} cluster(s) ({len(rows)} images) into {tname}",
                             {"sources": sources, "target": int(target)}, changes)

    def move(self, paths: Iterable[str], target: int | None, *, name: str | None = None) -> int | None:
        """Move images to cluster `target`, or to a fresh cluster when `target` is None (optionally named)."""
        paths = list(dict.fromkeys(paths))
        if not paths:
            return None
        with self._lock, self._tx() as conn:
            cur = self._rows(conn, paths)
            changes: list[list[Any]] = []
            if target is None:
                target = self._fresh_ids(conn, 1)[0]
                if name and name.strip():
                    changes.append(["n", target, None, name.strip()])
            else:
                self._require_clusters(conn, [target])
            target = int(target)
            changes += [["i", p, [c, f, s], [target, MOVED_CONFIDENCE, s]] for p, (c, f, s) in cur.items() if c != target]
            if not any(ch[0] == "i" for ch in changes):
                return None
            tname = name or self._name(conn, target) or default_name(target)
            return self._log(conn, "move", f"move {len(cur)} image(s) to {tname}",
                             {"paths": paths, "target": target}, changes)

    def set_status(self, paths: Iterable[str], status: str) -> int | None:
        """Mark images `rejected`, `unsure` or back to `ok`."""
        if status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        paths = list(dict.fromkeys(paths))
        with self._lock, self._tx() as conn:
            cur = self._rows(conn, paths)
            changes = [["i", p, [c, f, s], [c, f, status]] for p, (c, f, s) in cur.items() if s != status]
            if not changes:
                return None
            return self._log(conn, "status", f"mark {len(changes)} image(s) {status}",
                             {"paths": paths, "status": status}, changes)

    def split(self, cluster: int, k: int, *, method: str = "kmeans", seed: int = 0) -> int | None:
        """Re-cluster one cluster's members into `k` fresh clusters from their rows of features.npy."""
        cluster, k = int(cluster), int(k)
        with self._lock:
            members = self.members(cluster)
        if k < 2 or k > len(members):
            raise InputError(f"cannot split a cluster of {len(members)} image(s) into {k}")
        feats = self._features([m.idx for m in members])
        mean, temperature = split_geometry(self.run_dir, self._all_features())
        labels, conf = split_labels(feats, k, method=method, seed=seed, mean=mean, temperature=temperature)
        part_of = {m.path: (int(lab), float(cf)) for m, lab, cf in zip(members, labels, conf)}
        with self._lock, self._tx() as conn:
            now = conn.execute("SELECT path, confidence, status FROM images WHERE cluster = ?", (cluster,)).fetchall()
            if {p for p, _, _ in now} != set(part_of):
                raise ConflictError("the cluster changed while it was being split (another tab?); split it again")
            order = np.argsort(-np.bincount(labels), kind="stable")  # largest part first
            new_ids = self._fresh_ids(conn, len(order))
            part_id = {int(part): new_ids[j] for j, part in enumerate(order)}
            old_name = self._name(conn, cluster)
            changes: list[list[Any]] = []
            if old_name:
                changes += [["n", part_id[int(part)], None, f"{old_name}.{j + 1}"] for j, part in enumerate(order)]
            changes += [
                ["i", p, [cluster, f, s], [part_id[part_of[p][0]], part_of[p][1], s]] for p, f, s in sorted(now)
            ]
            return self._log(conn, "split", f"split {old_name or default_name(cluster)} into {k}",
                             {"cluster": cluster, "k": k, "method": method, "seed": seed, "new": new_ids}, changes)

    def undo(self, n: int = 1) -> list[int]:
        """Undo the newest `n` active edits, newest first; returns the ids undone."""
        undone: list[int] = []
        for _ in range(int(n)):
            with self._lock, self._tx() as conn:
                row = conn.execute(
                    f"SELECT id, summary, changes FROM edits WHERE {_ACTIVE} ORDER BY id DESC LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                eid, summary, changes = row
                for kind, key, before, _after in reversed(json.loads(changes)):
                    self._apply(conn, kind, key, before)
                conn.execute(
                    "INSERT INTO edits (ts, kind, summary, args, changes, undoes) VALUES (?, 'undo', ?, '{}', '[]', ?)",
                    (time.time(), f"undo: {summary}", eid),
                )
                undone.append(eid)
        return undone

    # ---------------------------------------------------------------- helpers
    def _log(self, conn: sqlite3.Connection, kind: str, summary: str, args: dict, changes: list) -> int:
        for ch in changes:
            self._apply(conn, ch[0], ch[1], ch[3])
        cur = conn.execute(
            "INSERT INTO edits (ts, kind, summary, args, changes) VALUES (?, ?, ?, ?, ?)",
            (time.time(), kind, summary, json.dumps(args), json.dumps(changes)),
        )
        log.info("review edit %d: %s", cur.lastrowid, summary)
        return int(cur.lastrowid)

    @staticmethod
    def _apply(conn: sqlite3.Connection, kind: str, key: Any, value: Any) -> None:
        if kind == "i":
            conn.execute("UPDATE images SET cluster = ?, confidence = ?, status = ? WHERE path = ?",
                         (int(value[0]), float(value[1]), str(value[2]), key))
            return
        table, col = {"n": ("names", "cluster"), "c": ("concept_names", "concept")}[kind]
        if value is None:
            conn.execute(f"DELETE FROM {table} WHERE {col} = ?", (int(key),))
        else:
            conn.execute(f"INSERT OR REPLACE INTO {table} ({col}, name) VALUES (?, ?)", (int(key), value))

    @staticmethod
    def _name(conn: sqlite3.Connection, cluster: int) -> str | None:
        r = conn.execute("SELECT name FROM names WHERE cluster = ?", (int(cluster),)).fetchone()
        return r[0] if r else None

    @staticmethod
    def _rows(conn: sqlite3.Connection, paths: list[str]) -> dict[str, tuple[int, float, str]]:
        out: dict[str, tuple[int, float, str]] = {}
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            out.update({p: (c, f, s) for p, c, f, s in conn.execute(
                f"SELECT path, cluster, confidence, status FROM images WHERE path IN ({','.join('?' * len(chunk))})", chunk)})
        missing = [p for p in paths if p not in out]
        if missing:
            raise InputError(f"not in this run: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        return {p: out[p] for p in paths}

    @staticmethod
    def _require_clusters(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
        for c in ids:
            if conn.execute("SELECT 1 FROM images WHERE cluster = ? LIMIT 1", (int(c),)).fetchone() is None:
                raise InputError(f"cluster {c} does not exist (or is empty)")

    @staticmethod
    def _fresh_ids(conn: sqlite3.Connection, n: int) -> list[int]:
        """Cluster ids never used before in this run; the counter only grows (undo keeps it)."""
        start = int(conn.execute("SELECT value FROM meta WHERE key = 'next_cluster'").fetchone()[0])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_cluster'", (str(start + n),))
        return list(range(start, start + n))

    def _features(self, idx: list[int]) -> np.ndarray:
        return np.asarray(self._all_features()[np.asarray(idx, dtype=np.int64)], dtype=np.float32)

    def _all_features(self) -> np.ndarray:
        """features.npy, memory-mapped and checked against labels.csv."""
        path = self.run_dir / FEATURES
        if not path.is_file():
            raise InputError(f"{path}: missing; splitting needs the run's features")
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
        if feats.shape[0] != len(self.base_rows):
            raise InputError(f"{path}: {feats.shape[0]} rows for {len(self.base_rows)} labels")
        return feats


SPLIT_METHODS = ("kmeans", "sinkhorn")


def split_labels(features: np.ndarray, k: int, *, method: str = "kmeans", seed: int = 0, mean: np.ndarray | None = None,
                 temperature: float = SPLIT_TEMPERATURE) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows into k parts in the run's geometry; confidence = softmax(cosine / T) of the chosen part.

    Rows are centred on `mean` (the run's stored centring mean; default their own mean) and
    L2-normalised, as the clustering saw them. `kmeans`: scikit-learn's k-means; `sinkhorn`: the
    package's balanced spherical k-means (`selflabel.kmeans`), which gives parts of equal size.
    """
    x = prepare(features, feature_mean(features) if mean is None else mean)
    if method == "kmeans":
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x.numpy())
    elif method == "sinkhorn":
        labels = balanced_kmeans(x, k, seed=seed).labels.numpy()
    else:
        raise InputError(f"unknown split method {method!r}; choose from {', '.join(SPLIT_METHODS)}")
    labels = np.unique(labels, return_inverse=True)[1].astype(np.int64).reshape(-1)  # parts numbered 0..k'-1
    lab = torch.from_numpy(labels)
    probs = torch.softmax(x @ mean_prototypes(x, lab, int(labels.max()) + 1).T / temperature, dim=1)
    return labels, probs.gather(1, lab[:, None])[:, 0].numpy().astype(np.float32)


def split_geometry(run_dir: Path, features: np.ndarray) -> tuple[np.ndarray, float]:
    """(centring mean, temperature) of a run: its stored geometry, or for a run that stores none the
    mean of all its features and the default temperature."""
    if (run_dir / GEOMETRY).is_file():
        g = load_geometry(run_dir)
        return g.mean, g.temperature
    return feature_mean(features), SPLIT_TEMPERATURE


def effective_labels(run_dir: str | Path) -> tuple[list[LabelRow], dict[int, str], set[str], set[str]]:
    """labels.csv with the review's moves, merges and splits applied; names; rejected and unsure paths.

    Without a review database this is labels.csv as written, default names and no rejections.
    """
    return effective_review(run_dir)[:4]


def effective_review(run_dir: str | Path) -> tuple[list[LabelRow], dict[int, str], set[str], set[str], dict[int, str]]:
    """`effective_labels` plus the dense concept names, from one opening of the review database."""
    run_dir = Path(run_dir)
    if not (run_dir / REVIEW_DB).exists():
        rows = read_labels(run_dir / LABELS)
        return rows, {c: default_name(c) for c in sorted({r.cluster for r in rows})}, set(), set(), {}
    with ReviewStore(run_dir, create=False) as store:
        return (*store.effective(), store.concept_names())


def effective_concept_names(run_dir: str | Path) -> dict[int, str]:
    """The review's names for a dense run's concepts (concept id -> name); {} without a review database."""
    run_dir = Path(run_dir)
    if not (run_dir / REVIEW_DB).exists():
        return {}
    with ReviewStore(run_dir, create=False) as store:
        return store.concept_names()
