"""Feature extraction with a content-addressed cache.

Cache layout: `<cache_root>/<backbone cache key>/shard-<id>.npy` (float32 [n, D]) plus
`shard-<id>.keys` (one content digest per row, written last, so a shard without keys is
ignored). Keys are file-content hashes, so renamed or moved files hit the cache and a
folder that grew by 10 % computes only the new 10 %. Shards are flushed every
`flush_every` images, so a killed run loses at most one shard of work.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .atomic import atomic_path, atomic_save_npy, atomic_write_text
from .backbones import Backbone
from .data import (EncodedImages, ImageDataset, ImageRecord, Skipped, collate_encoded, collate_skip, decode_encoded_batch,
                   file_digest)
from .devices import autocast_dtype, default_cache_root, default_num_workers, precision_name, resolve_device
from .digests import DigestMemo
from .engine import EngineSpec, make_runner, plan_engine
from .engine.runners import PARITY_IMAGES
from .errors import StorageError
from .progress import progress_bar

log = logging.getLogger(__name__)

GPU_DECODE_ENV = "SELFLABEL_GPU_DECODE"

# re-exported for callers that still import them from here (they live in selflabel/devices.py)
__all__ = ["CacheWriteError", "FeatureCache", "FeatureResult", "autocast_dtype", "default_cache_root",
           "default_num_workers", "extract_features", "feature_cache_key", "feature_matrix", "forward_global", "plan_features", "resolve_device"]


class CacheWriteError(StorageError):
    """The feature cache cannot be written (disk full, no permission): one line naming the path."""


def _cache_write_error(exc: OSError | StorageError, where: Path, n_cached: int) -> CacheWriteError:
    """`exc`: the OSError itself, or the StorageError `atomic_path` made of it (same errno and file)."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}.get(
        exc.errno, getattr(exc, "strerror", None) or str(exc))
    return CacheWriteError(f"{exc.filename or where}: cannot write the feature cache ({reason}); free space or fix "
                           f"the permissions (or pass --cache-dir) and rerun: the {n_cached} images cached so far are kept "
                           "and not computed again")


def feature_cache_key(backbone: Backbone, spec: EngineSpec, tta: str = "none") -> str:
    """Backbone, weights, preprocessing, engine, precision and test-time averaging: features from a bf16 or
    engine run are never served to an fp32 torch run (their cosine similarity is ~0.999, not 1)."""
    return f"{backbone.cache_key()}-{spec.tag}" + ("" if tta == "none" else f"-{tta}")


TTA_CHOICES = ("none", "flip")


def forward_global(runner, x: torch.Tensor, tta: str, pixels: bool) -> np.ndarray:
    """Global features of a batch (uint8 pixels or normalised floats); with tta='flip' the mean of the
    image's and its left-right mirror's, in one forward of the doubled batch."""
    if tta == "flip":
        x = torch.cat([x, x.flip(-1)])
    out = runner.pixels(x) if pixels else runner(x)
    g = out.global_feat.float().cpu().numpy()
    if tta == "flip":
        half = len(g) // 2
        g = (g[:half] + g[half:]) / 2
    return g


class FeatureCache:
    """Content-hash keyed store of feature vectors for one backbone + preprocessing."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.dir = Path(root) / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cache_write_error(exc, self.dir, 0) from None
        self._index: dict[str, tuple[Path, int]] = {}
        self.dim: int | None = None
        for keys_file in sorted(self.dir.glob("shard-*.keys")):
            npy = keys_file.with_suffix(".npy")
            digests = keys_file.read_text(errors="replace").split()
            problem = self._check_shard(npy, len(digests))
            if problem:
                log.warning("feature cache: ignoring %s (%s); its images will be recomputed", npy, problem)
                continue
            for row, digest in enumerate(digests):
                self._index[digest] = (npy, row)

    def _check_shard(self, npy: Path, n_keys: int) -> str | None:
        """Why a shard cannot be trusted (None if it can): only plain float32 2-D arrays, never pickles."""
        if not npy.is_file():
            return "array file missing"
        try:
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # object arrays (pickles), truncated or foreign files
            return f"unreadable: {exc}"
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != n_keys:
            return f"unexpected array {arr.dtype} {arr.shape} for {n_keys} keys"
        if self.dim is None:
            self.dim = arr.shape[1]
        elif arr.shape[1] != self.dim:
            return f"feature size {arr.shape[1]} differs from {self.dim}"
        return None

    def __contains__(self, digest: str) -> bool:
        return digest in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, digests: Sequence[str], feats: np.ndarray) -> None:
        """Write one shard atomically (array first, keys file last as the commit marker). A failed write
        (disk full, no permission) leaves no shard behind (the temporary file is removed, an array without
        its keys file is ignored when the cache is opened) and raises CacheWriteError."""
        if len(digests) == 0:
            return
        stem = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        npy = self.dir / f"{stem}.npy"
        try:
            atomic_save_npy(npy, feats.astype(np.float32, copy=False))
            atomic_write_text(self.dir / f"{stem}.keys", "\n".join(digests) + "\n")
        except (OSError, StorageError) as exc:
            with contextlib.suppress(OSError):
                npy.unlink(missing_ok=True)
            raise _cache_write_error(exc, self.dir, len(self._index)) from None
        for row, d in enumerate(digests):
            self._index[d] = (npy, row)

    def gather(self, digests: Sequence[str], out: np.ndarray) -> None:
        """Fill `out[i]` with the cached vector of `digests[i]` (memory-mapped shard reads)."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, d in enumerate(digests):
            shard, row = self._index[d]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            arr = np.load(shard, mmap_mode="r", allow_pickle=False)
            dst, src = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            order = np.argsort(src)
            out[dst[order]] = arr[src[order]]


@dataclass
class FeatureResult:
    features: np.ndarray  # float32 [N_ok, D], may be a memmap
    records: list[ImageRecord]  # the usable images, row-aligned with features
    skipped: list[Skipped] = field(default_factory=list)
    n_computed: int = 0
    n_cached: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    computed_on: dict[str, str] = field(default_factory=dict)  # device, engine, precision of this run's forward


DIGEST_MEMO = "digests.sqlite"  # beside the per-backbone cache folders (see selflabel/digests.py)


def digest_records(records: Iterable[ImageRecord], skipped: list[Skipped], memo: DigestMemo) -> list[tuple[ImageRecord, str]]:
    """Content digest per readable record, through `memo` (`DigestMemo(None, ...)` hashes every file);
    unreadable files go to `skipped`."""
    out = []
    for r in records:
        try:
            out.append((r, memo.digest(r.path)))
        except OSError as exc:
            skipped.append(Skipped(r.id, f"cannot read: {exc.strerror or exc}"))
    return out


@torch.inference_mode()
def extract_features(
    records: Sequence[ImageRecord],
    backbone: Backbone,
    *,
    batch_size: int = 64,
    num_workers: int = -1,
    device: str | torch.device = "auto",
    amp: str = "auto",
    cache_dir: str | Path | None = None,
    max_pixels: int = 100_000_000,
    flush_every: int = 1024,
    out_path: str | Path | None = None,
    show_progress: bool = True,
    rehash: bool = False,
    engine: str | None = None,
    spec: EngineSpec | None = None,
    tta: str = "none",
) -> FeatureResult:
    """Global features for `records`, computing only what the cache lacks.

    Images that fail to decode are returned in `skipped` with their reason. With `out_path`,
    the row-aligned matrix is written there (atomically, via a memory-mapped .npy) and
    returned memory-mapped, so N x D never has to fit in RAM twice. Files whose stat is unchanged since
    an earlier run are not read again to hash them (`selflabel/digests.py`) unless `rehash`.

    `engine` (None: $SELFLABEL_ENGINE, else 'auto'): on a CPU the forward runs in OpenVINO or ONNX
    Runtime when installed (selflabel/engine), torch otherwise or when the engine fails; the engine and
    the precision (`amp`, chosen by the hardware for 'auto') are part of the cache key. `spec` (from
    `plan_features`) replaces that choice: the ranks of a torchrun job all run what rank 0 planned.
    `tta='flip'` averages each image's features with its mirror image's (README 'Features').
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta '{tta}' is not one of {', '.join(TTA_CHOICES)}")
    t0 = time.perf_counter()
    dev = resolve_device(str(device))
    spec = spec or plan_engine(engine, dev, precision_name(amp, dev))
    root = Path(cache_dir or default_cache_root())
    cache = FeatureCache(root, feature_cache_key(backbone, spec, tta))
    skipped: list[Skipped] = []
    with DigestMemo(None if rehash else root / DIGEST_MEMO, file_digest) as memo:
        pairs = digest_records(records, skipped, memo)
    if memo.hits or memo.misses:
        log.info("digests: %d unchanged files not re-read, %d hashed", memo.hits, memo.misses)
    t_hash = time.perf_counter() - t0

    todo = _missing(pairs, cache)
    runner = None
    t1 = time.perf_counter()
    if todo:
        runner = make_runner(backbone, dev, spec, root)
        if spec.engine != "torch" and not _warm_up(runner, todo, backbone, max_pixels):
            spec = runner.active  # the engine fell back to torch (logged): serve and store torch's features
            cache = FeatureCache(root, feature_cache_key(backbone, spec, tta))
            todo = _missing(pairs, cache)
    n_cached = len(pairs) - len(todo)
    log.info("features: %d images, %d cached, %d to compute (%s)", len(pairs), n_cached, len(todo),
             feature_cache_key(backbone, spec, tta))

    failed: dict[str, str] = {}
    stores = [cache]  # the engine's cache, then torch's if the engine fails part-way
    if todo:
        failed = _compute_missing(todo, runner, backbone, stores, dev, batch_size, num_workers, max_pixels, flush_every,
                                  show_progress, tta)
    t_forward = time.perf_counter() - t1

    t2 = time.perf_counter()
    ok = [(r, d) for r, d in pairs if d not in failed]
    skipped += [Skipped(r.id, failed[d]) for r, d in pairs if d in failed]
    digests = [d for _, d in ok]
    feats = feature_matrix(out_path, (len(ok), backbone.dim), lambda out: gather_from(stores, digests, out))
    t_gather = time.perf_counter() - t2
    return FeatureResult(
        features=feats,
        records=[r for r, _ in ok],
        skipped=skipped,
        n_computed=len(todo) - len(failed),
        n_cached=n_cached,
        seconds={"hash": t_hash, "forward": t_forward, "gather": t_gather},
        computed_on={"device": str(dev), "engine": (runner.active if runner is not None else spec).engine,
                     "precision": (runner.active if runner is not None else spec).precision},
    )


def feature_matrix(out_path: str | Path | None, shape: tuple[int, int], fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """A float32 matrix of `shape` filled by `fill(out)`: with `out_path`, written there atomically through a
    memory-mapped .npy and returned memory-mapped (N x D never twice in RAM); else in memory."""
    if out_path is None:
        out = np.empty(shape, dtype=np.float32)
        fill(out)
        return out
    try:
        with atomic_path(out_path) as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            fill(mm)
            mm.flush()
            del mm
    except OSError as exc:
        raise CacheWriteError(f"{exc.filename or out_path}: cannot write the run's feature matrix "
                              f"({exc.strerror or exc}); the feature cache is complete, a rerun only gathers it") from None
    return np.load(out_path, mmap_mode="r", allow_pickle=False)


def _missing(pairs: Sequence[tuple[ImageRecord, str]], cache: FeatureCache) -> dict[str, ImageRecord]:
    """digest -> one record, for the digests `cache` lacks (each content once)."""
    todo: dict[str, ImageRecord] = {}
    for r, d in pairs:
        if d not in cache and d not in todo:
            todo[d] = r
    return todo


def plan_features(records: Sequence[ImageRecord], backbone: Backbone, *, device: str | torch.device = "auto",
                  amp: str = "auto", engine: str | None = None, cache_dir: str | Path | None = None,
                  max_pixels: int = 100_000_000) -> EngineSpec:
    """The engine and precision `extract_features` will run, decided once: precision resolved (the probe
    runs here if it must), the engine exported, compiled and checked against torch on the first images of
    `records` (torch after a failed check). Rank 0 of a torchrun job calls it and sends the answer to the
    others, so no two ranks store their blocks under different engines or precisions."""
    dev = resolve_device(str(device))
    spec = plan_engine(engine, dev, precision_name(amp, dev))
    if spec.engine == "torch" or not records:
        return spec
    runner = make_runner(backbone, dev, spec, Path(cache_dir or default_cache_root()))
    _warm_up(runner, {str(i): r for i, r in enumerate(records[:64])}, backbone, max_pixels)
    return runner.active


def _warm_up(runner, todo: dict[str, ImageRecord], backbone: Backbone, max_pixels: int) -> bool:
    """Export, compile and check the engine on the first few decodable images of `todo` before any
    shard is written; False when it fell back to torch."""
    ds = ImageDataset(list(todo.values())[:64], backbone.make_pixels(), max_pixels=max_pixels,
                      draft_size=backbone.decode_size())
    sample = []
    for i in range(len(ds)):
        x, _, err = ds[i]
        if err is None:
            sample.append(x)
        if len(sample) == PARITY_IMAGES:
            break
    if sample:
        runner.pixels(torch.stack(sample))  # the path the extraction runs: uint8 pixels in
    return runner.active == runner.spec


def gpu_decode_enabled() -> bool:
    """GPU JPEG decoding on CUDA devices unless SELFLABEL_GPU_DECODE=0 (then workers decode on the CPU)."""
    return os.environ.get(GPU_DECODE_ENV, "1") != "0"


def gather_from(stores: Sequence[FeatureCache], digests: Sequence[str], out: np.ndarray) -> None:
    """`FeatureCache.gather` over several caches: each digest from the first cache that holds it."""
    if len(stores) == 1:
        stores[0].gather(digests, out)
        return
    rows: list[list[int]] = [[] for _ in stores]
    for i, d in enumerate(digests):
        rows[next(j for j, c in enumerate(stores) if d in c)].append(i)
    for c, idx in zip(stores, rows):
        if idx:
            part = np.empty((len(idx), out.shape[1]), dtype=out.dtype)
            c.gather([digests[i] for i in idx], part)
            out[np.array(idx)] = part


def _compute_missing(todo, runner, backbone, stores, dev, batch_size, num_workers, max_pixels, flush_every,
                     show_progress, tta: str = "none") -> dict[str, str]:
    """Forward passes for cache misses, flushing shards as they fill. Returns {digest: reason} of failures.

    `stores[-1]` is the cache being written. If the engine falls back to torch part-way (it logs why),
    what it computed is flushed to its own cache and the rest goes to torch's, appended to `stores`:
    no shard ever mixes two engines' features under one key."""
    cache = stores[-1]
    spec = runner.active
    digests = list(todo)
    records = [todo[d] for d in digests]
    gpu_decode = dev.type == "cuda" and gpu_decode_enabled()
    if gpu_decode:
        ds = EncodedImages(records, backbone.transform, max_pixels=max_pixels, draft_size=backbone.decode_size())
    else:  # the workers ship uint8 crops; whole batches are normalised here (less worker CPU, 4x less IPC)
        ds = ImageDataset(records, backbone.make_pixels(), max_pixels=max_pixels, draft_size=backbone.decode_size())
    workers = default_num_workers(dev) if num_workers < 0 else num_workers
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_encoded if gpu_decode else collate_skip,
                        pin_memory=dev.type == "cuda" and not gpu_decode, persistent_workers=False)
    batches = iter(loader)
    if gpu_decode:  # JPEG bytes from the workers, decoded on the GPU in the main process
        size = backbone.image_size
        batches = (decode_encoded_batch(b, dev, ds.cpu.__getitem__, size, backbone.decode_size(size), backbone.mean,
                                        backbone.std) for b in batches)
    failed: dict[str, str] = {}
    buf_keys: list[str] = []
    buf_feats: list[np.ndarray] = []
    with progress_bar("features", total=len(ds), enabled=show_progress) as advance:
        for x, idx, bad in batches:
            for i, reason in bad:
                failed[digests[i]] = reason
                log.warning("skipped %s: %s", ds.records[i].id, reason)
            if x is not None:  # normalised floats from the GPU decoder, else uint8 pixels
                g = forward_global(runner, x, tta, pixels=not gpu_decode)
                if runner.active != spec:  # this batch already came from torch: earlier ones did not
                    if buf_keys:
                        cache.add(buf_keys, np.concatenate(buf_feats))
                        buf_keys, buf_feats = [], []
                    log.warning("the %s engine failed after part of the images: the rest are computed by %s and "
                                "cached under its own key", spec.tag, runner.active.tag)
                    spec = runner.active
                    cache = FeatureCache(cache.dir.parent, feature_cache_key(backbone, spec, tta))  # beside it
                    stores.append(cache)
                buf_feats.append(g)
                buf_keys += [digests[i] for i in idx.tolist()]
            if len(buf_keys) >= flush_every:
                cache.add(buf_keys, np.concatenate(buf_feats))
                buf_keys, buf_feats = [], []
            advance(len(idx) + len(bad))
    if buf_keys:
        cache.add(buf_keys, np.concatenate(buf_feats))
    return failed
