"""Several backbones side by side: `backbone.name: mobilenet_v2+efficientnet_lite2`.

Each member computes (and caches) its own global features as if it ran alone; an image's ensemble
feature is every member's row L2-normalised, concatenated and divided by sqrt(members), so each
member weighs the same whatever its dimension or scale, and the row is a function of that image only
(a later `assign` of new images gets the same features). Centring is left to the clustering's own
geometry (x -> normalise(x - mean) of the concatenation). Measured against centring each member on
the data first (`benchmarks/quality.py --features concat`, 3 seeds): cifar10-test k-means 0.388 / 0.462
NMI / accuracy vs 0.378 / 0.454, imagenette-val 0.910 / 0.949 vs 0.903 / 0.945 (README "Backbones").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backbones import Backbone, create_backbone, list_backbones
from .data import ImageRecord, Skipped
from .errors import InputError
from .features import FeatureResult, feature_matrix

SEP = "+"


def member_names(name: str) -> list[str]:
    """The backbone names of `name`: ['a', 'b'] for 'a+b', ['a'] for a single backbone."""
    return [part.strip() for part in str(name).split(SEP)]


def is_ensemble(name: str) -> bool:
    return SEP in str(name)


def check_backbone_name(name: str, weights: str | None = None, image_size: int | None = None) -> None:
    """A known backbone, or two or more distinct known ones joined by '+' (then without `weights` or
    `image_size`, which name one network). Raises InputError naming the value and what is allowed."""
    known = list_backbones()
    names = member_names(name)
    bad = [n for n in names if n not in known]
    if bad:
        which = "" if len(names) == 1 else f"{bad[0]!r} is unknown; "
        raise InputError(f"config backbone.name: {name!r} is not allowed ({which}choose {', '.join(sorted(known))}, "
                         f"or several joined by '{SEP}'; see `selflabel backbones`)")
    if len(names) == 1:
        return
    if len(set(names)) != len(names):
        raise InputError(f"config backbone.name: {name!r} names a backbone twice (each member once)")
    if weights:
        raise InputError(f"config backbone.weights: {str(weights)!r} is not allowed with the ensemble {name!r} "
                         "(a weights file belongs to one network; each member uses its own offline weights)")
    if image_size:
        raise InputError(f"config backbone.image_size: {image_size!r} is not allowed with the ensemble {name!r} "
                         "(each member keeps its own input size)")


def write_unit_rows(block: np.ndarray, out: np.ndarray, scale: float = 1.0, chunk: int = 65_536) -> None:
    """out[i] = scale * block[i] / |block[i]| for every row of `block` [N, D] (float32, `chunk` rows at a time)."""
    for start in range(0, len(block), chunk):
        x = np.asarray(block[start:start + chunk], dtype=np.float32)
        out[start:start + chunk] = x * (scale / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def combine_blocks(blocks: Sequence[np.ndarray], out: np.ndarray | None = None, chunk: int = 65_536) -> np.ndarray:
    """Rows of every block [N, D_j] L2-normalised, concatenated and scaled by 1/sqrt(len(blocks)) ->
    [N, sum D_j] unit rows (written into `out` when given, `chunk` rows at a time)."""
    n = len(blocks[0])
    if any(len(b) != n for b in blocks):
        raise ValueError(f"ensemble blocks have different row counts: {[len(b) for b in blocks]}")
    dims = [b.shape[1] for b in blocks]
    if out is None:
        out = np.empty((n, sum(dims)), dtype=np.float32)
    scale = 1.0 / np.sqrt(len(blocks))
    col = 0
    for b, d in zip(blocks, dims):
        write_unit_rows(b, out[:, col:col + d], scale, chunk)
        col += d
    return out


@dataclass
class BackboneEnsemble:
    """The members of an ensemble, with the attributes a run records of its backbone."""

    members: list[Backbone]

    @property
    def name(self) -> str:
        return SEP.join(m.name for m in self.members)

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    @property
    def weights_id(self) -> str:
        return SEP.join(m.weights_id for m in self.members)

    @property
    def first(self) -> Backbone:
        """The member that gives dense maps and suggested names."""
        return self.members[0]

    def cache_key(self) -> str:
        return SEP.join(m.cache_key() for m in self.members)


FeatureSource = Backbone | BackboneEnsemble


def create_feature_source(name: str, weights: str | None = None, image_size: int | None = None,
                          crop_ratio: float | None = None) -> FeatureSource:
    """`create_backbone` for one name, a `BackboneEnsemble` of its members for 'a+b' (each at its own
    input size; `crop_ratio` applies to every member)."""
    if not is_ensemble(name):
        return create_backbone(name, weights, image_size, crop_ratio)
    check_backbone_name(name, weights, image_size)
    return BackboneEnsemble([create_backbone(n, crop_ratio=crop_ratio) for n in member_names(name)])


def first_backbone(source: FeatureSource) -> Backbone:
    """The network itself, or an ensemble's first member (dense maps, ImageNet-head names, fine-tuning)."""
    return source.first if isinstance(source, BackboneEnsemble) else source


def same_weights(source: FeatureSource, cache_key: str) -> bool:
    """Whether `cache_key` (a run's recorded backbone key) was made with the weights of `source`, member
    by member (the preprocessing part of the key may differ)."""
    members = source.members if isinstance(source, BackboneEnsemble) else [source]
    keys = cache_key.split(SEP)
    return len(keys) == len(members) and all(k.startswith(f"{m.name}-{m.weights_id}-") for m, k in zip(members, keys))


def ensemble_features(records: Sequence[ImageRecord], ensemble: BackboneEnsemble,
                      extract: Callable[[Sequence[ImageRecord], Backbone], FeatureResult],
                      out_path: str | Path | None = None) -> FeatureResult:
    """The ensemble's features of `records`: `extract(records, member)` for each member (its own cache),
    rows kept where every member read the image, combined by `combine_blocks`; with `out_path` written
    there atomically and returned memory-mapped. `n_computed` / `n_cached` count feature rows over the
    members (an image new to both members of a pair counts twice)."""
    results = [extract(records, m) for m in ensemble.members]
    kept = set.intersection(*({r.id for r in res.records} for res in results))
    skipped: dict[str, Skipped] = {}
    for res in results:
        for s in res.skipped:
            skipped.setdefault(s.path, s)
    order = [r for r in results[0].records if r.id in kept]
    n, dims = len(order), [m.dim for m in ensemble.members]

    def fill(out: np.ndarray) -> None:  # combine_blocks of the members' rows, one member's reordered copy at a time
        col, scale = 0, 1.0 / np.sqrt(len(results))
        for res, d in zip(results, dims):
            pos = {r.id: i for i, r in enumerate(res.records)}
            rows = np.fromiter((pos[r.id] for r in order), dtype=np.int64, count=n)
            write_unit_rows(np.asarray(res.features)[rows], out[:, col:col + d], scale)
            col += d

    feats = feature_matrix(out_path, (n, sum(dims)), fill)
    seconds: dict[str, float] = {}
    for res in results:
        for key, value in res.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
    return FeatureResult(
        features=feats, records=order, skipped=list(skipped.values()),
        n_computed=sum(res.n_computed for res in results), n_cached=sum(res.n_cached for res in results),
        seconds=seconds,
        computed_on={"device": results[0].computed_on.get("device", ""),
                     "engine": SEP.join(res.computed_on.get("engine", "") for res in results),
                     "precision": SEP.join(res.computed_on.get("precision", "") for res in results),
                     "members": {m.name: res.computed_on for m, res in zip(ensemble.members, results)}})
