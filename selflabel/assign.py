"""`selflabel assign`: label images added later with a reviewed run's clusters, through its stored geometry.

The reviewed clusters are the run's labels with every review edit applied (renames, merges, splits,
moves, rejections; `selflabel.review.store.effective_labels`). Each one's prototype is the normalised
mean of its members' features in the run's geometry (centring mean, L2 normalisation, temperature:
`selflabel.geometry`). A new image goes to the cluster with the nearest prototype, with
confidence softmax(cos / T) of that cluster. It is `unsure` when it is further from that cluster,
or nearer to a second one, than all but an `unsure_quantile` share of the cluster's own members:
its cosine or its margin (cosine to the nearest minus to the second nearest prototype) is below the
members' quantile. A novel kind of thing is far from every cluster or sits between them: on
imagenette-val (mobilenet_v2, half labelled, half assigned, q = 0.05) 6% of the assigned half and
78% of CamVid street scenes come back unsure (the cosine alone flagged 42% of CamVid, the margin
alone 80%, measured before the image M-step was settled) (tests/integration/test_assign_imagenette.py). A cluster the review rejected (most of its members rejected) passes the rejection on.
The result is a run folder of its own (labels.csv, features.npy, geometry, manifest, review.sqlite
holding the carried-over names and statuses), so the review app, `export`, `eval` and a further
`assign` all work on it. Only features the cache lacks are computed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .ensemble import BackboneEnsemble, create_feature_source, ensemble_features, same_weights
from .config import from_dict
from .data import scan_folder
from .errors import InputError
from .naming import default_name
from .features import extract_features
from .geometry import Geometry
from .geometry_io import load_geometry, save_geometry
from .review.store import ReviewStore, effective_labels
from .runfiles import FEATURES, LABELS, REVIEW_DB, SKIPPED, LabelRow, read_manifest, write_labels, write_manifest, write_skipped

log = logging.getLogger(__name__)

UNSURE_QUANTILE = 0.05  # a new image is unsure below the 5th percentile of its cluster's own members (cosine or margin)
MIN_MEMBERS_FOR_OWN_THRESHOLD = 20  # smaller clusters use the threshold of all members together
REJECTED_SHARE = 0.5  # a cluster whose members are more than half rejected is a rejected cluster


@dataclass
class ReviewedClusters:
    """A reviewed run's clusters in its geometry: prototypes (cluster ids in `geometry.cluster_ids`),
    names, the rejected ones, and the cosine and margin below which a new member is unsure."""

    geometry: Geometry
    names: dict[int, str]
    rejected: set[int]
    cos_threshold: np.ndarray  # float32 [K], aligned with geometry.cluster_ids
    margin_threshold: np.ndarray  # float32 [K]

    def place(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(cluster id, confidence, cosine, unsure) of each row."""
        s = torch.from_numpy(self.geometry.scores(features))
        row, cos, margin = nearest_and_margin(s)
        conf = torch.softmax(s / self.geometry.temperature, dim=1).gather(1, row[:, None])[:, 0].numpy()
        row, cos, margin = row.numpy(), cos.numpy(), margin.numpy()
        unsure = (cos < self.cos_threshold[row]) | (margin < self.margin_threshold[row])
        return self.geometry.cluster_ids[row], conf.astype(np.float32), cos.astype(np.float32), unsure


def nearest_and_margin(scores: torch.Tensor, own: torch.Tensor | None = None):
    """Per row: the cluster (`own`, default the nearest), its cosine, and that minus the best other cosine
    (+inf with one cluster)."""
    row = scores.argmax(1) if own is None else own
    cos = scores.gather(1, row[:, None])[:, 0]
    if scores.shape[1] < 2:
        return row, cos, torch.full_like(cos, float("inf"))
    other = scores.scatter(1, row[:, None], float("-inf")).max(1).values
    return row, cos, cos - other


def member_quantiles(values: np.ndarray, groups: np.ndarray, k: int, q: float) -> np.ndarray:
    """The q-quantile of `values` within each group 0..k-1; small groups use that of all members."""
    overall = float(np.quantile(values, q))
    return np.array([float(np.quantile(values[groups == j], q)) if (groups == j).sum() >= MIN_MEMBERS_FOR_OWN_THRESHOLD
                     else overall for j in range(k)], dtype=np.float32)


def reviewed_clusters(run_dir: str | Path, unsure_quantile: float = UNSURE_QUANTILE) -> ReviewedClusters:
    """The clusters of `run_dir` after review, placed in its stored geometry (pure maths on its files)."""
    if not 0 <= unsure_quantile < 1:
        raise InputError(f"unsure_quantile must be in [0, 1), not {unsure_quantile}")
    run_dir = Path(run_dir)
    base = load_geometry(run_dir)
    rows, names, rejected_paths, _unsure = effective_labels(run_dir)
    feats = np.load(run_dir / FEATURES, mmap_mode="r", allow_pickle=False)
    if feats.shape[0] != len(rows):
        raise InputError(f"{run_dir / FEATURES}: {feats.shape[0]} rows for {len(rows)} labels")
    x = base.prepare(feats)
    lab = np.array([r.cluster for r in rows], dtype=np.int64)
    ids, inverse = np.unique(lab, return_inverse=True)
    idx = torch.from_numpy(inverse.astype(np.int64))
    protos = torch.nn.functional.normalize(torch.zeros(len(ids), x.shape[1]).index_add_(0, idx, x), dim=1)
    _, own, margin = nearest_and_margin(x @ protos.T, idx)  # each member against its own cluster
    cos_threshold = member_quantiles(own.numpy(), inverse, len(ids), unsure_quantile)
    margin_threshold = member_quantiles(margin.numpy(), inverse, len(ids), unsure_quantile)
    is_rej = np.array([r.path in rejected_paths for r in rows])
    rejected = {int(c) for j, c in enumerate(ids) if is_rej[inverse == j].mean() > REJECTED_SHARE}
    geometry = base.with_clusters(protos.numpy(), ids)
    return ReviewedClusters(geometry, {int(c): names.get(int(c), default_name(int(c))) for c in ids}, rejected,
                            cos_threshold, margin_threshold)


@dataclass
class AssignSummary:
    out: Path
    n_images: int
    n_skipped: int
    n_unsure: int
    n_rejected: int
    cluster_sizes: dict[int, int]
    n_computed: int
    n_cached: int
    timings: dict[str, float] = field(default_factory=dict)


def assign_folder(run_dir: str | Path, folder: str | Path, out: str | Path, *, unsure_quantile: float = UNSURE_QUANTILE,
                  cache_dir: str | Path | None = None, device: str | None = None, batch_size: int | None = None,
                  show_progress: bool = True) -> AssignSummary:
    """Label every image under `folder` with the reviewed clusters of `run_dir`; write the run folder `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise InputError(f"{out}: the new run must not overwrite the reviewed run {run_dir}")
    if (out / REVIEW_DB).exists():
        raise InputError(f"{out / REVIEW_DB}: {out} already holds review edits; choose another --out")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    manifest = read_manifest(run_dir)
    cfg = from_dict(manifest["config"])
    clusters = reviewed_clusters(run_dir, unsure_quantile)  # checks the run before any long work
    scan = scan_folder(folder, follow_symlinks=cfg.ingest.follow_symlinks,
                       gt=None if cfg.ingest.gt == "none" else cfg.ingest.gt)  # as the labelling run was asked
    b = cfg.backbone
    backbone = create_feature_source(b.name, b.weights, b.image_size, b.crop)
    labelled_with = str(manifest["backbone"]["cache_key"])
    if not same_weights(backbone, labelled_with):  # the weights, not the preprocessing
        raise InputError(f"backbone {b.name}: its weights differ from the ones {run_dir} was labelled with "
                         f"({backbone.cache_key()} != {labelled_with})")
    if labelled_with != backbone.cache_key():
        log.warning("%s was labelled with an earlier preprocessing (%s); the new images get today's (%s), whose "
                    "features differ by resize rounding only", run_dir, labelled_with, backbone.cache_key())
    timings["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    extract = dict(batch_size=batch_size or b.batch_size, num_workers=b.num_workers, device=device or b.device, amp=b.amp,
                   cache_dir=cache_dir or b.cache_dir, max_pixels=cfg.ingest.max_pixels, flush_every=b.flush_every,
                   engine=None if b.engine == "auto" else b.engine, tta=b.tta, show_progress=show_progress)
    if isinstance(backbone, BackboneEnsemble):
        feats = ensemble_features(scan.records, backbone, lambda recs, m: extract_features(recs, m, **extract),
                                  out_path=out / FEATURES)
    else:
        feats = extract_features(scan.records, backbone, out_path=out / FEATURES, **extract)
    timings["features"] = time.perf_counter() - t
    skipped = scan.skipped + feats.skipped
    write_skipped(out / SKIPPED, skipped)
    if not feats.records:
        raise InputError(f"{folder}: none of the {len(scan.records)} images could be read (see {out / SKIPPED})")

    t = time.perf_counter()
    ids, conf, cos, unsure = clusters.place(feats.features)
    timings["assign"] = time.perf_counter() - t

    t = time.perf_counter()
    status = ["rejected" if int(c) in clusters.rejected else "unsure" if u else "ok" for c, u in zip(ids, unsure)]
    write_labels(out / LABELS, [
        LabelRow(r.id, int(c), float(p), r.gt, {"name": clusters.names[int(c)], "similarity": f"{float(s):.6f}",
                                                  "unsure": str(int(u)), "status": st})
        for r, c, p, s, u, st in zip(feats.records, ids, conf, cos, unsure, status)])
    save_geometry(out, clusters.geometry)
    write_manifest(out, {
        **{key: manifest[key] for key in ("config", "backbone", "seed", "versions") if key in manifest},
        "selflabel_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_root": str(scan.root), "k": clusters.geometry.k, "n_images": len(feats.records),
        "n_skipped": len(skipped), "has_gt": any(r.gt is not None for r in feats.records), "heads": [],
        "features": {"computed": feats.n_computed, "cached": feats.n_cached, "seconds": feats.seconds},
        "timings": timings, "method_info": {"method": "assign"},
        "assigned_from": {"run": str(run_dir.resolve()), "data_root": manifest.get("data_root"),
                          "unsure_quantile": unsure_quantile, "rejected_clusters": sorted(clusters.rejected)},
    })
    carry_review(out, clusters, [r.id for r in feats.records], status)
    timings["write"] = time.perf_counter() - t
    return AssignSummary(out, len(feats.records), len(skipped), int(sum(s == "unsure" for s in status)),
                         int(sum(s == "rejected" for s in status)),
                         {int(c): int(n) for c, n in zip(*np.unique(ids, return_counts=True))},
                         feats.n_computed, feats.n_cached, timings)


def carry_review(out: Path, clusters: ReviewedClusters, paths: list[str], status: list[str]) -> None:
    """The new run's review database: the reviewed names, and the rejected and unsure images marked, as
    edits the reviewer sees (and can undo) in the app."""
    with ReviewStore(out) as store:
        present = set(store.names())
        for c, name in clusters.names.items():
            if c in present and name != default_name(c):
                store.rename(c, name)
        for st in ("rejected", "unsure"):
            marked = [p for p, s in zip(paths, status) if s == st]
            if marked:
                store.set_status(marked, st)
