"""Dense object concepts for a folder (Leopart-style): patches -> parts -> foreground -> concepts -> COCO.

Steps, each a pure function in this package:
  1. `extract.extract_dense`   patch features (+ saliency) of every image, standardised + PCA;
  2. `parts.fit_part_prototypes` K Sinkhorn-balanced part prototypes on a patch sample;
  3. part maps: cosine scores upsampled bilinearly, argmax (at ~100 px for statistics, at mask size for output,
     there optionally `refine.refined_argmax` to the image's edges);
  4. `foreground`              CBFE: which part clusters are objects (things) and which background (stuff);
  5. `graph.merge_parts`       co-occurrence graph + Louvain: parts -> concepts (resolution fixed, or chosen
                               without labels by `resolution.choose_resolution`);
  6. per image: concept map (small regions filled), PNG maps, overlays, COCO instances.

Options: `dense.refine` (none | slic | guided, `refine`) snaps the part boundaries to image edges before the
argmax; `dense.select=stability` picks the Louvain resolution without labels (`resolution`), `dense.fg_cut=otsu`
the CBFE cut (`foreground.otsu_threshold`); both choices are written to settings.json.

Outputs under `out_dir/dense/`: dense.json, graph.json, coco.json, settings.json (the Louvain resolution, the
foreground cut, and how they were chosen), prototypes.npy, maps/*.png (concept ids, 0 = unassigned), parts/*.png (part ids + 1),
overlays/*.png.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import networkx as nx
import numpy as np
import torch

from ..atomic import atomic_path, atomic_save_npy, atomic_write_json
from ..data import ImageRecord, load_rgb
from ..devices import autocast_dtype, resolve_device
from ..errors import ImageLoadError, InputError
from ..annotations import coco_document, concept_name, label_map_annotations
from ..progress import progress_bar
from .extract import DenseFeatures, extract_dense
from .foreground import cluster_fg_precision, noisy_foreground, otsu_threshold, select_foreground
from .graph import LOUVAIN_METHODS, cooccurrence, graph_json, merge_parts, part_graph
from .masks import fill_small_regions, overlay, palette, resize_labels, upsampled_argmax
from .consensus import attach_absent, coassociation, majority_concepts
from .kparts import choose_k_parts, labelling_stability
from .parts import PartModel, fit_part_prototypes, part_scores
from .refine import REFINE_METHODS, refined_argmax
from .resolution import choose_resolution, stability_curve

log = logging.getLogger(__name__)

STATS_SIDE = 100  # long side of the part maps used for CBFE and co-occurrence (Leopart evaluates at 100 x 100)
OVERLAY_SIDE = 960  # overlays are downscaled to this long side


def _scaled(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled so the long side is at most `side` (never upscaled)."""
    if side <= 0 or max(h, w) <= side:
        return h, w
    f = side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _data_root(rec: ImageRecord) -> Path:
    depth = len(PurePosixPath(rec.id).parts)
    return Path(rec.path).parents[depth - 1] if depth >= 1 else Path(rec.path).parent


def drop_label_maps(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """Leave out ground-truth label maps scanned as images: `<x>/labels/n.png` when `<x>/images/n.*` is a record
    (the layout `evaluate_dense` reads ground truth from)."""
    images = {(str(PurePosixPath(r.id).parent.parent), PurePosixPath(r.id).stem) for r in records
              if PurePosixPath(r.id).parent.name == "images"}
    kept = [r for r in records if not (PurePosixPath(r.id).parent.name == "labels"
                                       and (str(PurePosixPath(r.id).parent.parent), PurePosixPath(r.id).stem) in images)]
    if len(kept) < len(records):
        log.info("dense: left out %d ground-truth label maps (labels/ beside images/)", len(records) - len(kept))
    return kept


def _png_name(image_id: str, used: set[str]) -> str:
    name = PurePosixPath(image_id).with_suffix(".png").as_posix()
    if name in used:  # a.jpg and a.png in one folder
        name = image_id + ".png"
    used.add(name)
    return name


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:  # (creates the folder)
        Image.fromarray(array).save(tmp, format="PNG")


def _label_png(label_map: np.ndarray, n_labels: int) -> np.ndarray:
    return label_map.astype(np.uint8 if n_labels < 256 else np.uint16)


def concepts_from_parts(part_concept: np.ndarray, part_area: np.ndarray, foreground: np.ndarray
                        ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Renumber communities as concepts 1..M by decreasing area; kind = thing if most of its area is foreground.

    Returns (concept id per part [k], concept descriptions)."""
    comms = np.unique(part_concept)
    area = np.array([part_area[part_concept == c].sum() for c in comms])
    order = comms[np.argsort(-area, kind="stable")]
    remap = {int(c): i + 1 for i, c in enumerate(order)}
    concept_of_part = np.array([remap[int(c)] for c in part_concept], dtype=np.int64)
    concepts = []
    for cid in range(1, len(order) + 1):
        members = np.nonzero(concept_of_part == cid)[0]
        a = part_area[members]
        fg_share = float(a[foreground[members]].sum() / a.sum()) if a.sum() > 0 else float(foreground[members].mean())
        concepts.append({"id": cid, "name": concept_name(cid), "kind": "thing" if fg_share > 0.5 else "stuff",
                         "parts": [int(p) for p in members], "area_fraction": float(a.sum())})
    return concept_of_part, concepts


@dataclass
class ConceptModel:
    """Everything learnt from the patch features: part prototypes, foreground parts, the graph and the concepts."""

    parts: PartModel
    precision: np.ndarray  # CBFE foreground precision per part [k]
    n_images: np.ndarray  # images each part appears in [k]
    foreground: np.ndarray  # bool [k]
    adjacency: np.ndarray  # co-occurrence [k, k]
    graph: nx.Graph
    modularity: float
    part_area: np.ndarray  # share of all pixels per part [k]
    concept_of_part: np.ndarray  # concept id 1..M per part [k]
    concepts: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    resolution: float = 1.0  # the Louvain resolution used (dense.resolution, or the label-free choice)
    settings: dict[str, Any] = field(default_factory=dict)  # how it was chosen (rule, stability curve)

    @property
    def k(self) -> int:
        return self.parts.k

    @property
    def lut(self) -> np.ndarray:
        """Maps a part map value (part + 1, 0 = none) to its concept id."""
        return np.concatenate([[0], self.concept_of_part]).astype(np.int64)


def fit_concepts(feats: DenseFeatures, dcfg: Any, seed: int = 0, parts: PartModel | None = None) -> ConceptModel:
    """Steps 2-5 on extracted features: part prototypes (or `parts` given), CBFE, graph, Louvain."""
    timings: dict[str, float] = {}
    k_settings: dict[str, Any] = {"k_parts_select": "fixed", "k_parts": int(dcfg.k_parts)}
    t = time.perf_counter()
    if parts is None and dcfg.k_parts_select == "stability":
        k_parts, k_settings = select_k_parts(feats, dcfg, seed)
        dcfg = dataclasses.replace(dcfg, k_parts=k_parts)
        timings["select_k_parts"] = time.perf_counter() - t
        t = time.perf_counter()
    if parts is None:
        sample = feats.sample(dcfg.max_patches, seed)
        parts = fit_part_prototypes(sample, min(dcfg.k_parts, len(sample)), eps=dcfg.eps, iters=dcfg.epochs, seed=seed)
    else:
        k_settings = {"k_parts_select": "given", "k_parts": parts.k}
    protos = torch.from_numpy(parts.prototypes)
    k = parts.k
    timings["parts"] = time.perf_counter() - t

    t = time.perf_counter()
    small_maps, fg_masks = [], []
    for f, s, (H, W) in zip(feats.feats, feats.saliency, feats.sizes):
        hw = _scaled(H, W, STATS_SIDE)
        small_maps.append(upsampled_argmax(part_scores(f, protos), hw))
        fg = noisy_foreground(s, mass=dcfg.fg_mass)
        fg_masks.append(resize_labels(fg.astype(np.uint8), hw).astype(bool))
    precision, n_img = cluster_fg_precision(small_maps, fg_masks, k)
    fg_threshold = foreground_cut(precision, n_img, dcfg)
    foreground = select_foreground(precision, fg_threshold)
    timings["foreground"] = time.perf_counter() - t

    t = time.perf_counter()
    adj = cooccurrence(small_maps, k)
    fg_split = foreground if dcfg.split_fg else None
    resolution, settings = select_resolution(adj, fg_split, dcfg, seed)
    timings["select"] = time.perf_counter() - t
    t = time.perf_counter()
    communities, graph, modularity = merge_parts(
        adj, fg_split, resolution=resolution, threshold=dcfg.edge_threshold,
        seed=seed, n_seeds=dcfg.louvain_seeds, method=dcfg.louvain)
    part_pixels = sum(np.bincount(m.ravel(), minlength=k) for m in small_maps).astype(np.float64)
    part_area = part_pixels / max(part_pixels.sum(), 1.0)
    concept_of_part, concepts = concepts_from_parts(communities, part_area, foreground)
    timings["graph"] = time.perf_counter() - t
    if dcfg.consensus > 1:
        t = time.perf_counter()
        concept_of_part, concepts, settings["consensus"] = consensus_step(feats, dcfg, seed, parts, concept_of_part,
                                                                          part_area, foreground)
        timings["consensus"] = time.perf_counter() - t
    settings["n_concepts"] = len(concepts)
    settings["parts"] = k_settings
    settings["foreground"] = {"fg_cut": dcfg.fg_cut, "fg_threshold": round(fg_threshold, 4),
                              "n_foreground_parts": int(foreground.sum()),
                              "rule": "Otsu's cut of the parts' CBFE precisions (parts that appear)"
                              if dcfg.fg_cut == "otsu" else "dense.fg_threshold"}
    return ConceptModel(parts, precision, n_img, foreground, adj, graph, modularity, part_area, concept_of_part,
                        concepts, timings, resolution, settings)


def probe_concepts(model: ConceptModel, probe: torch.Tensor) -> np.ndarray:
    """The concept of every row of `probe` (unit patch features [n, d]) under a fitted model: nearest part's concept."""
    return model.concept_of_part[(probe @ torch.from_numpy(model.parts.prototypes).T).argmax(1).numpy()]


def consensus_step(feats: DenseFeatures, dcfg: Any, seed: int, parts: PartModel, concept_of_part: np.ndarray,
                   part_area: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Concepts of `parts` by majority over `dense.consensus` fits (`consensus`): this fit (`concept_of_part`)
    and fits with the next seeds, each labelling the same patch sample; average linkage of the parts'
    co-association cut at `dense.consensus_cut`. Returns (concept per part, concepts, settings)."""
    z = torch.nn.functional.normalize(torch.from_numpy(feats.sample(dcfg.max_patches, seed + 7919)), dim=1)
    main = (z @ torch.from_numpy(parts.prototypes).T).argmax(1).numpy()
    one = dataclasses.replace(dcfg, consensus=1, k_parts_select="fixed", k_parts=parts.k)
    labellings, sizes = [np.asarray(concept_of_part)[main]], [int(np.max(concept_of_part))]
    for s in range(seed + 1, seed + dcfg.consensus):
        m = fit_concepts(feats, one, s)
        labellings.append(probe_concepts(m, z))
        sizes.append(len(m.concepts))
    a, counts = coassociation(main, labellings, parts.k)
    present = counts > 0
    labels = np.zeros(parts.k, dtype=np.int64)
    labels[present] = majority_concepts(a[np.ix_(present, present)], dcfg.consensus_cut)
    labels = attach_absent(labels, present, parts.prototypes)
    out, concepts = concepts_from_parts(labels, part_area, foreground)
    mean, low = labelling_stability(labellings)
    log.info("dense: %d concepts by majority over %d fits (%s concepts each; agreement %.3f)", len(concepts),
             dcfg.consensus, "/".join(map(str, sizes)), mean)
    return out, concepts, {"n_fits": int(dcfg.consensus), "seeds": list(range(seed, seed + dcfg.consensus)),
                           "cut": float(dcfg.consensus_cut), "n_patches": int(len(main)),
                           "n_concepts_per_fit": sizes, "n_concepts": len(concepts),
                           "agreement": round(mean, 4), "agreement_min": round(low, 4),
                           "rule": "average linkage of the parts on 1 - co-association (the share of fits that put "
                                   "their patches in one concept), cut at consensus_cut"}


def select_k_parts(feats: DenseFeatures, dcfg: Any, seed: int = 0) -> tuple[int, dict[str, Any]]:
    """The number of parts by the label-free rule of `kparts`: for each K of `dense.k_parts_grid`, the concept
    step fitted with `k_parts_seeds` part seeds on `k_parts_sample` patches; each fit labels the same fixed
    patch sample with its concepts; the K whose labellings agree most wins. Returns (K, settings with the curve)."""
    probe = torch.nn.functional.normalize(torch.from_numpy(feats.sample(20_000, seed + 7919)), dim=1)
    small = dataclasses.replace(dcfg, k_parts_select="fixed", consensus=1, max_patches=min(dcfg.k_parts_sample, dcfg.max_patches))
    curve = []
    for k in sorted(set(int(k) for k in dcfg.k_parts_grid)):
        labellings, sizes = [], []
        for s in range(seed, seed + dcfg.k_parts_seeds):
            m = fit_concepts(feats, dataclasses.replace(small, k_parts=k), s)
            labellings.append(probe_concepts(m, probe))
            sizes.append(len(m.concepts))
        mean, low = labelling_stability(labellings)
        curve.append({"k_parts": k, "stability": round(mean, 4), "stability_min": round(low, 4), "n_concepts": sizes})
    chosen = choose_k_parts(curve)
    log.info("dense: label-free number of parts %d (concept stability %s)", chosen,
             ", ".join(f"{c['k_parts']}: {c['stability']:.3f}" for c in curve))
    return chosen, {"k_parts_select": "stability", "k_parts": chosen, "seed": seed, "n_seeds": dcfg.k_parts_seeds,
                    "sample": small.max_patches,
                    "rule": "for each K of the grid, the concept step fitted with several part seeds on a patch sample; "
                            "the stability of K is the mean pairwise ARI of the concept labels they give the same "
                            "sample of 20,000 patches; the most stable K wins (the smaller on a tie)",
                    "curve": curve}


def foreground_cut(precision: np.ndarray, n_images: np.ndarray, dcfg: Any) -> float:
    """CBFE's threshold on the part precisions: `dense.fg_threshold` (fg_cut=fixed) or Otsu's label-free cut of
    the precisions of the parts that appear (fg_cut=otsu, `foreground.otsu_threshold`)."""
    if dcfg.fg_cut == "fixed":
        return float(dcfg.fg_threshold)
    seen = np.asarray(precision)[np.asarray(n_images) > 0]
    return otsu_threshold(seen) if len(seen) >= 2 else float(dcfg.fg_threshold)


def select_resolution(adj: np.ndarray, foreground: np.ndarray | None, dcfg: Any, seed: int = 0
                      ) -> tuple[float, dict[str, Any]]:
    """The Louvain resolution: `dense.resolution` (select=fixed) or the label-free stability rule on the part
    graph (select=stability, `resolution.choose_resolution`). Returns (resolution, settings with the curve)."""
    if dcfg.select == "fixed":
        return float(dcfg.resolution), {"select": "fixed", "resolution": float(dcfg.resolution)}
    graph = part_graph(adj, foreground, dcfg.edge_threshold)
    curve = stability_curve(graph, dcfg.resolution_grid, seed=seed, n_seeds=dcfg.select_seeds, method=dcfg.louvain)
    chosen = choose_resolution(curve, graph)
    log.info("dense: label-free resolution %.3g (stability %s)", chosen,
             ", ".join(f"{c['resolution']:g}: {c['stability']:.3f}" for c in curve))
    return chosen, {"select": "stability", "resolution": chosen, "seed": seed, "n_seeds": dcfg.select_seeds,
                    "rule": "from the first resolution >= 1 whose partition has more communities than graph "
                            "components and at most half the nodes, step to the next finer such resolution while "
                            "its stability (mean pairwise ARI of Louvain partitions over seeds) drops by at most "
                            "0.01; stop at the first larger drop",
                    "curve": curve}


def refine_options(dcfg: Any) -> dict[str, Any]:
    """The `refine.refined_argmax` keyword arguments of a dense config."""
    return {"slic_segments_n": dcfg.slic_segments, "slic_compactness": dcfg.slic_compactness,
            "guided_radius": dcfg.guided_radius, "guided_eps": dcfg.guided_eps,
            "guided_subsample": dcfg.guided_subsample, "guided_top": dcfg.guided_top}


def part_map(feat: np.ndarray, prototypes: np.ndarray | torch.Tensor, size: tuple[int, int], mask_size: int = 0,
             *, rgb: np.ndarray | None = None, refine: str = "none", **refine_args: Any) -> np.ndarray:
    """Part map (part + 1) at `size` = (H, W): cosine scores upsampled bilinearly to the mask size
    (long side `mask_size`, 0 = H x W), argmax (refined to the edges of `rgb` [H, W, 3] when `refine` is
    slic or guided), then nearest-neighbour to (H, W)."""
    H, W = size
    hw = _scaled(H, W, mask_size)
    scores = part_scores(feat, prototypes)
    m = upsampled_argmax(scores, hw)
    if refine != "none" and rgb is not None:
        m = refined_argmax(scores, _resized_rgb(rgb, hw), refine, plain=m, **refine_args)
    return resize_labels(m + 1, (H, W))


def _resized_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [H, W, 3] resized (bilinear) to size (H', W') when it differs."""
    rgb = np.asarray(rgb)
    if rgb.shape[:2] == tuple(size):
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def concept_map(parts_map: np.ndarray, lut: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """Concept ids from a part map, regions under the image's minimum area filled from their neighbours.
    The minimum area is capped at 1/64 of the image so a small image keeps its regions. Returns (map, area)."""
    H, W = parts_map.shape
    area = int(min(min_area, max(1, H * W // 64)))
    return fill_small_regions(lut[parts_map], area), area


def write_outputs(feats: DenseFeatures, model: ConceptModel, dcfg: Any, out: Path, *, seed: int = 0,
                  max_pixels: int = 100_000_000, show_progress: bool = True) -> dict[str, Any]:
    """Step 6: per image concept and part maps (PNG), overlays, COCO; returns per-image entries and counts."""
    n, k = len(feats.records), model.k
    concepts = model.concepts
    n_concepts = len(concepts)
    protos = torch.from_numpy(model.parts.prototypes)
    things = {c["id"] for c in concepts if c["kind"] == "thing"}
    colours = palette(n_concepts + 1, seed=seed)
    overlay_idx = set(np.unique(np.linspace(0, n - 1, min(dcfg.n_overlays, n)).round().astype(int)).tolist()) \
        if dcfg.n_overlays > 0 else set()
    lut = model.lut
    used: set[str] = set()
    images, annotations, entries = [], [], []
    instances = np.zeros(n_concepts + 1, dtype=np.int64)
    presence = np.zeros(n_concepts + 1, dtype=np.int64)
    with progress_bar("dense maps", total=n, enabled=show_progress) as advance:
        for i, (rec, f, (H, W)) in enumerate(zip(feats.records, feats.feats, feats.sizes)):
            rgb = None
            if dcfg.refine != "none":
                try:
                    rgb = np.asarray(load_rgb(rec.path, max_pixels=max_pixels, display=rec.id))
                    if rgb.shape[:2] != (H, W):
                        rgb = None
                        log.warning("dense: %s changed size since its features were computed; not refined", rec.id)
                except ImageLoadError as exc:  # changed on disk since the features were computed
                    log.warning("dense: %s not refined: %s", rec.id, exc.reason)
            parts_map = part_map(f, protos, (H, W), dcfg.mask_size, rgb=rgb, refine=dcfg.refine, **refine_options(dcfg))
            cmap, area = concept_map(parts_map, lut, dcfg.min_area)
            name = _png_name(rec.id, used)
            _save_png(out / "maps" / name, _label_png(cmap, n_concepts + 1))
            _save_png(out / "parts" / name, _label_png(parts_map, k + 1))
            image_id = i + 1
            anns = label_map_annotations(cmap, image_id=image_id, first_id=len(annotations) + 1, min_area=area,
                                         instance_ids=things)
            annotations += anns
            np.add.at(instances, [a["category_id"] for a in anns], 1)
            presence[np.unique(cmap)] += 1
            images.append({"id": image_id, "file_name": rec.id, "width": int(W), "height": int(H)})
            entry = {"id": rec.id, "map": f"maps/{name}", "parts": f"parts/{name}", "width": int(W), "height": int(H),
                     "min_area": area, "n_annotations": len(anns)}
            if i in overlay_idx:
                try:
                    if rgb is None:
                        rgb = np.asarray(load_rgb(rec.path, max_pixels=max_pixels, display=rec.id))
                    oh, ow = _scaled(H, W, OVERLAY_SIDE)
                    if (oh, ow) != (H, W):
                        from PIL import Image

                        rgb = np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.Resampling.BILINEAR))
                    _save_png(out / "overlays" / name, overlay(rgb, resize_labels(cmap, (oh, ow)), colours))
                    entry["overlay"] = f"overlays/{name}"
                except ImageLoadError as exc:  # changed on disk since the features were computed
                    log.warning("dense: no overlay for %s: %s", rec.id, exc.reason)
            entries.append(entry)
            advance(1)

    for c in concepts:
        c["n_images"] = int(presence[c["id"]])
        c["n_annotations"] = int(instances[c["id"]])
        c["color"] = "#%02x%02x%02x" % tuple(int(v) for v in colours[c["id"]])
    categories = [{"id": c["id"], "name": c["name"], "supercategory": c["kind"]} for c in concepts]
    atomic_write_json(out / "coco.json", coco_document(images, annotations, categories,
                                                       "selflabel dense object concepts (unsupervised)"))
    node_attrs = {p: {"concept": int(model.concept_of_part[p]), "kind": "thing" if model.foreground[p] else "stuff",
                      "fg_precision": round(float(model.precision[p]), 4), "area_fraction": float(model.part_area[p]),
                      "n_images": int(model.n_images[p]), "color": concepts[int(model.concept_of_part[p]) - 1]["color"]}
                  for p in range(k)}
    atomic_write_json(out / "graph.json", graph_json(model.graph, node_attrs, resolution=model.resolution,
                                                     method=dcfg.louvain, modularity=model.modularity,
                                                     edge_threshold=dcfg.edge_threshold))
    atomic_save_npy(out / "prototypes.npy", model.parts.prototypes)
    return {"entries": entries, "n_annotations": len(annotations)}


def check_refine_select(dcfg: Any) -> None:
    """One-line InputErrors for the refinement and resolution-selection settings (key, value, what is allowed)."""
    if dcfg.refine not in REFINE_METHODS:
        raise InputError(f"dense.refine: '{dcfg.refine}' is not one of {', '.join(REFINE_METHODS)}")
    if dcfg.select not in ("fixed", "stability"):
        raise InputError(f"dense.select: '{dcfg.select}' is not one of fixed, stability")
    if dcfg.fg_cut not in ("fixed", "otsu"):
        raise InputError(f"dense.fg_cut: '{dcfg.fg_cut}' is not one of fixed, otsu")
    for key, low in (("slic_segments", 1), ("guided_radius", 1), ("guided_subsample", 1), ("guided_top", 1),
                     ("select_seeds", 2)):
        if getattr(dcfg, key) < low:
            raise InputError(f"dense.{key} must be at least {low} (got {getattr(dcfg, key)})")
    for key in ("slic_compactness", "guided_eps"):
        if not getattr(dcfg, key) > 0:
            raise InputError(f"dense.{key} must be above 0 (got {getattr(dcfg, key)})")
    if dcfg.k_parts_select not in ("fixed", "stability"):
        raise InputError(f"dense.k_parts_select: '{dcfg.k_parts_select}' is not one of fixed, stability")
    if dcfg.k_parts_select == "stability" and (not dcfg.k_parts_grid or min(dcfg.k_parts_grid) < 2):
        raise InputError(f"dense.k_parts_grid must hold numbers of parts of at least 2 (got {dcfg.k_parts_grid})")
    if dcfg.select == "stability" and (not dcfg.resolution_grid or min(dcfg.resolution_grid) <= 0):
        raise InputError(f"dense.resolution_grid must hold resolutions above 0 (got {dcfg.resolution_grid})")


@contextlib.contextmanager
def dense_fusion(backbone: torch.nn.Module, fusion: str):
    """The backbone's dense map with the stride-16 level beside the last one while the dense stage runs
    (`dense.fusion=stride16`); the image-level stage keeps the plain, cheaper outputs."""
    if fusion == "none":
        yield
        return
    if not hasattr(backbone, "fuse_stride16"):
        log.warning("dense.fusion=%s: %s has no stride-16 fusion; using its last map only", fusion,
                    getattr(backbone, "name", type(backbone).__name__))
        yield
        return
    was = backbone.fuse_stride16
    backbone.fuse_stride16 = True
    try:
        yield
    finally:
        backbone.fuse_stride16 = was


def segment(records: Sequence[ImageRecord], backbone: torch.nn.Module, cfg: Any, out_dir: str | Path,
            device: str | torch.device | None = None, *, show_progress: bool = True) -> dict[str, Any]:
    """Find dense object concepts in `records` and write them under `out_dir/dense/`. Returns a summary."""
    dcfg = cfg.dense
    if dcfg.louvain not in LOUVAIN_METHODS:
        raise InputError(f"dense.louvain: '{dcfg.louvain}' is not one of {', '.join(LOUVAIN_METHODS)}")
    if dcfg.k_parts < 2:
        raise InputError(f"dense.k_parts must be at least 2 (got {dcfg.k_parts})")
    if dcfg.shift_stitch < 1:
        raise InputError(f"dense.shift_stitch must be at least 1 (got {dcfg.shift_stitch})")
    check_refine_select(dcfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device or cfg.backbone.device)
    out = Path(out_dir) / "dense"
    out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)

    records = drop_label_maps(records)
    t = time.perf_counter()
    with dense_fusion(backbone, dcfg.fusion):
        feats = extract_dense(records, backbone, image_size=dcfg.image_size, device=dev, keep_aspect=dcfg.keep_aspect,
                              shift=dcfg.shift_stitch, pca_dim=dcfg.pca_dim, batch_size=min(cfg.backbone.batch_size, 16),
                              num_workers=cfg.backbone.num_workers, dtype=autocast_dtype(cfg.backbone.amp, dev),
                              seed=seed, max_pixels=cfg.ingest.max_pixels, show_progress=show_progress,
                              engine=None if cfg.backbone.engine == "auto" else cfg.backbone.engine)
    timings = {"features": time.perf_counter() - t}
    n = len(feats.records)
    if n == 0:
        raise InputError("dense: no readable images")

    model = fit_concepts(feats, dcfg, seed)
    timings.update(model.timings)
    t = time.perf_counter()
    written = write_outputs(feats, model, dcfg, out, seed=seed, max_pixels=cfg.ingest.max_pixels,
                            show_progress=show_progress)
    timings["maps"] = time.perf_counter() - t

    atomic_write_json(out / "settings.json", model.settings)
    concepts = model.concepts
    n_things = sum(c["kind"] == "thing" for c in concepts)
    summary = {
        "n_images": n,
        "n_skipped": len(feats.skipped),
        "k_parts": model.k,
        "n_concepts": len(concepts),
        "n_things": n_things,
        "n_stuff": len(concepts) - n_things,
        "n_foreground_parts": int(model.foreground.sum()),
        "n_annotations": written["n_annotations"],
        "modularity": round(float(model.modularity), 4),
        "resolution": model.resolution,
        "refine": dcfg.refine,
        "dir": str(out),
        "timings": {k_: round(v, 3) for k_, v in timings.items()},
    }
    meta = {
        "version": 1,
        "backbone": getattr(backbone, "name", type(backbone).__name__),
        "data_root": str(_data_root(feats.records[0])),
        "config": dataclasses.asdict(dcfg),
        "seed": seed,
        "features": {k_: (list(map(list, v)) if k_ == "input_sizes" else v) for k_, v in feats.info.items()},
        "parts": {"k": model.k, **{k_: v for k_, v in model.parts.info.items() if k_ != "history"}},
        "summary": summary,
        "settings": model.settings,
        "concepts": concepts,
        "part_concept": [int(c) for c in model.concept_of_part],
        "part_foreground": [bool(b) for b in model.foreground],
        "part_fg_precision": [round(float(p), 4) for p in model.precision],
        "images": written["entries"],
        "skipped": [{"path": p, "reason": r} for p, r in feats.skipped],
    }
    atomic_write_json(out / "dense.json", meta)
    log.info("dense: %d images -> %d parts -> %d concepts (%d things), %d annotations in %.1fs",
             n, model.k, len(concepts), n_things, written["n_annotations"], sum(timings.values()))
    return summary
