"""`selflabel label`: ingest -> features -> clustering -> run folder, timed per stage."""
from __future__ import annotations

import contextlib
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .cluster import LabelResult
from .config import RunConfig, to_dict, validate
from .data import scan_folder
from .dense.pipeline import segment
from .ensemble import (BackboneEnsemble, check_backbone_name, create_feature_source, ensemble_features, first_backbone,
                       is_ensemble)
from .errors import InputError
from .distributed import all_gather_objects, device_for, init_from_env, shard, shutdown, wait_for_main
from .features import extract_features, plan_features
from .curate.run import curate_run
from .geometry import prepare_features
from .geometry_io import save_geometry
from .kselect import KSelection, choose_k
from .kselect_io import save_k_selection_plot
from .methods import cluster_features
from .progress import progress_enabled, progress_shown
from .rundir import open_run
from .runfiles import FEATURES, LABELS, SKIPPED, LabelRow, write_labels, write_manifest, write_skipped
from .suggest import manifest_entry, suggest_for_run

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    out: Path
    n_images: int
    n_skipped: int
    k: int
    cluster_sizes: dict[int, int]
    timings: dict[str, float]
    n_computed: int
    n_cached: int
    metrics: dict[str, float] = field(default_factory=dict)
    dense: dict[str, Any] | None = None
    k_selection: dict[str, Any] | None = None  # KSelection.to_dict() when K was chosen from the data


def versions() -> dict[str, str]:
    """Library versions recorded in the manifest, so a run can be reproduced."""
    import networkx
    import ot
    import sklearn
    import torch
    import torchvision

    out = {"selflabel": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__, "pot": ot.__version__,
           "scikit-learn": sklearn.__version__, "networkx": networkx.__version__, "platform": platform.platform()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def engine_choice(cfg: RunConfig) -> str | None:
    """The inference engine asked for: None for 'auto' (then $SELFLABEL_ENGINE, else the fastest installed)."""
    return None if cfg.backbone.engine == "auto" else cfg.backbone.engine


def check_runnable(cfg: RunConfig) -> None:
    """What can be checked before any work, beyond the config's own values: the backbone name and
    the device. Raises InputError naming the setting, the value and what is allowed."""
    validate(cfg)
    check_backbone_name(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.image_size)
    if is_ensemble(cfg.backbone.name) and cfg.cluster.finetune:
        raise InputError(f"--finetune: not allowed with the ensemble backbone {cfg.backbone.name!r} (fine-tuning trains "
                         "one network; choose one backbone)")
    dev = str(cfg.backbone.device)
    if dev.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if index >= n:
            raise InputError(f"config backbone.device: {dev!r} is not available ({n} CUDA device(s) visible); "
                             "use --device auto or cpu")


def label_folder(cfg: RunConfig, show_progress: bool = True, overwrite: bool = False) -> RunSummary:
    """Label every image under cfg.data and write the run folder cfg.out.

    Rerunning the same configuration into the same folder resumes (cached features, checkpoints); a
    folder holding another run is refused unless `overwrite` (see selflabel/rundir.py), and a folder
    another process is writing raises RunBusy."""
    check_runnable(cfg)
    ctx = init_from_env(cfg.backbone.device)
    owner = open_run(cfg, overwrite) if ctx.is_main else contextlib.nullcontext()  # rank 0 writes the folder
    with progress_enabled(show_progress), owner:
        return _label_folder(cfg, ctx)


def _label_folder(cfg: RunConfig, ctx) -> RunSummary:
    import torch

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    show_progress = progress_shown()

    t = time.perf_counter()
    scan = scan_folder(cfg.data, follow_symlinks=cfg.ingest.follow_symlinks, gt_csv=cfg.ingest.gt_csv,
                       gt=None if cfg.ingest.gt == "none" else cfg.ingest.gt)
    timings["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    device = device_for(ctx, cfg.backbone.device)
    backbone = create_feature_source(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.image_size, cfg.backbone.crop)
    timings["load_backbone"] = time.perf_counter() - t

    t = time.perf_counter()
    extract = dict(batch_size=cfg.backbone.batch_size, num_workers=cfg.backbone.num_workers, device=device,
                   amp=cfg.backbone.amp, engine=engine_choice(cfg), cache_dir=cfg.backbone.cache_dir, max_pixels=cfg.ingest.max_pixels,
                   flush_every=cfg.backbone.flush_every, rehash=cfg.backbone.rehash, tta=cfg.backbone.tta)
    if isinstance(backbone, BackboneEnsemble):
        feats = ensemble_features(scan.records, backbone,
                                  lambda recs, member: _extract(recs, member, ctx, extract, None, show_progress),
                                  out_path=out / FEATURES if ctx.is_main else None)
    else:
        feats = _extract(scan.records, backbone, ctx, extract, out / FEATURES if ctx.is_main else None, show_progress)
    timings["features"] = time.perf_counter() - t
    skipped = scan.skipped + feats.skipped
    if ctx.is_main:
        write_skipped(out / SKIPPED, skipped)
    n = len(feats.records)
    if n == 0:
        raise InputError(f"{cfg.data}: none of the {len(scan.records)} images could be read (see {out / SKIPPED})")
    t = time.perf_counter()
    k, selection = choose_run_k(cfg, feats.features, n, device)
    if selection is not None:
        timings["choose_k"] = time.perf_counter() - t
        if ctx.is_main:
            save_k_selection_plot(out, selection)
    cfg.cluster.k = k

    t = time.perf_counter()
    result = cluster_features(feats.features, k, cfg, out_dir=out, device=device, records=feats.records,
                              backbone=None if isinstance(backbone, BackboneEnsemble) else backbone, ctx=ctx)
    timings["cluster"] = time.perf_counter() - t

    t = time.perf_counter()
    suggested = {}
    if ctx.is_main:  # only rank 0 writes outputs
        names_x, names_backbone = _naming_features(feats, backbone, extract)
        suggested = suggest_for_run(out, names_x, result.labels, names_backbone, cfg.backbone.weights)
        write_labels(out / LABELS, _rows(feats.records, result, {c: s.label for c, s in suggested.items()}))
        save_geometry(out, result.geometry)  # prototypes.npy, feature_mean.npy, geometry.json
        curate_run(out, device=str(device))  # near-duplicates, outlier scores, neighbours (selflabel.curate)
    timings["write"] = time.perf_counter() - t

    dense_summary = None
    if cfg.dense.enabled:
        t = time.perf_counter()
        if ctx.is_main:
            dense_summary = segment(feats.records, first_backbone(backbone), cfg, out, device, show_progress=show_progress)
        wait_for_main(ctx)  # the other ranks wait for the dense stage however long it takes
        timings["dense"] = time.perf_counter() - t

    sizes = np.bincount(result.labels, minlength=k)
    summary = RunSummary(out=out, n_images=n, n_skipped=len(skipped), k=k,
                         cluster_sizes={i: int(s) for i, s in enumerate(sizes)}, timings=timings,
                         n_computed=feats.n_computed, n_cached=feats.n_cached, dense=dense_summary,
                         k_selection=selection.to_dict() if selection is not None else None)
    if ctx.is_main:
        write_manifest(out, {
            "selflabel_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data_root": str(scan.root),
            "config": to_dict(cfg),
            "backbone": {"name": backbone.name, "cache_key": backbone.cache_key(), "dim": backbone.dim},
            "device": str(device),
            "seed": cfg.seed,
            "k": k,
            "k_selection": summary.k_selection,  # how K was chosen when none was given (selflabel.kselect)
            "n_images": n,
            "n_skipped": len(skipped),
            "has_gt": any(r.gt is not None for r in feats.records),
            "features": {"computed": feats.n_computed, "cached": feats.n_cached, "seconds": feats.seconds,
                         "computed_on": feats.computed_on},
            "timings": timings,
            "method_info": _jsonable(result.info),
            "heads": sorted(result.head_labels),
            "suggested_names": manifest_entry(suggested),
            "dense": dense_summary,
            "versions": versions(),
            "world_size": ctx.world_size,
        })
    shutdown(ctx)  # (its barrier: no rank exits before rank 0 has written)
    return summary


def _extract(records, backbone, ctx, extract: dict[str, Any], out_path: Path | None, show_progress: bool):
    """`extract_features` of one backbone for the run: under torchrun each rank computes its shard into the
    shared cache first (with the engine rank 0 planned), then every rank gathers the whole matrix."""
    extract = dict(extract)
    n_sharded = 0
    if ctx.enabled:
        # rank 0 settles the engine and precision (probe, export, parity check) and every rank runs that:
        # ranks deciding alone can disagree (a timed probe, a check on other images) and then store their
        # blocks under different cache keys, computing everything twice
        plan = plan_features(records, backbone, **{k: extract[k] for k in ("device", "amp", "engine", "cache_dir",
                                                                                "max_pixels")}) if ctx.is_main else None
        extract["spec"] = all_gather_objects(plan, ctx)[0]
        # each rank computes a disjoint block into the (shared) cache, then all read the whole store
        part = extract_features(shard(records, ctx), backbone, show_progress=show_progress and ctx.is_main, **extract)
        ran = all_gather_objects((part.n_computed, part.computed_on.get("engine")), ctx)  # (a collective: every rank is done)
        n_sharded = int(sum(n for n, _ in ran))
        if ctx.is_main and any(n and e != extract["spec"].engine for n, e in ran):
            log.warning("a rank's engine fell back to torch during the sharded pass (ranks ran %s): rank 0 computes "
                        "the blocks it cannot read", sorted({e for _, e in ran}))
    feats = extract_features(records, backbone, out_path=out_path,
                             show_progress=show_progress and not ctx.enabled, **extract)
    if ctx.enabled:
        if feats.n_computed:
            log.warning("rank %d computed %d features after the sharded pass: is the cache folder on storage "
                        "shared by all ranks? (set --cache-dir)", ctx.rank, feats.n_computed)
        feats.n_computed, feats.n_cached = n_sharded, len(feats.records) - n_sharded
    return feats


def _naming_features(feats, backbone, extract: dict[str, Any]) -> tuple[np.ndarray, str]:
    """(features, backbone name) for the ImageNet-head names: the run's own, or for an ensemble its first
    member's raw features of the same images (from that member's cache, no forward)."""
    if not isinstance(backbone, BackboneEnsemble):
        return feats.features, backbone.name
    first = backbone.first
    return extract_features(feats.records, first, show_progress=False, **extract).features, first.name


def choose_run_k(cfg: RunConfig, features: np.ndarray, n: int, device) -> tuple[int, KSelection | None]:
    """K for the run: `cluster.k` when given, else the length of `cluster.prior`, else chosen from the
    data (`selflabel.kselect`, returned with its curve). Folder names never set K. Every rank computes
    the same choice (deterministic on the same features)."""
    if cfg.cluster.k is not None:
        if cfg.cluster.k > n:
            raise InputError(f"--k {cfg.cluster.k} is larger than the number of readable images ({n}); "
                             f"give at most {n} or leave --k out to choose K from the data")
        return cfg.cluster.k, None
    if cfg.cluster.prior is not None:
        k = len(cfg.cluster.prior)
        if k > n:
            raise InputError(f"cluster.prior has {k} entries but only {n} images could be read (at most {n} clusters)")
        return k, None
    selection = choose_k(prepare_features(features, device), seed=cfg.seed, eps=cfg.cluster.eps)
    log.info("choosing K: %s", selection.reason)
    return selection.k, selection


def _rows(records, result: LabelResult, suggested: dict[int, str]) -> list[LabelRow]:
    rows, heads = [], sorted(result.head_labels.items())
    for i, r in enumerate(records):
        extra = {f"head_{h}": str(int(lab[i])) for h, lab in heads}
        if suggested:
            extra["suggested_name"] = suggested.get(int(result.labels[i]), "")
        rows.append(LabelRow(r.id, int(result.labels[i]), float(result.confidence[i]), r.gt, extra))
    return rows


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 1000 else f"array{list(obj.shape)}"
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
