"""The one place every exporter reads a run through: review edits applied (renames, merges, splits,
moves), rejected images and images asked to be left out (e.g. duplicates) dropped, class names and
suggested names resolved. A new format is then one small function of an `ExportView`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

import numpy as np
from PIL import Image

from ..data import resolve_id
from ..errors import InputError
from ..naming import concept_name, default_name
from ..review.store import effective_review
from ..runfiles import DENSE, LabelRow, read_manifest
from ..suggest import SuggestedName, suggested_names

NAME_POLICIES = ("reviewed", "suggested")


@dataclass(frozen=True)
class ExportItem:
    """One exported image: path relative to the data root, reviewed cluster and its class name."""

    path: str
    cluster: int
    name: str
    confidence: float
    status: str  # "ok" | "unsure" | "rejected" (only with include_rejected)
    suggested_name: str = ""
    gt: str | None = None


@dataclass
class ExportView:
    run: Path
    data_root: Path
    items: list[ExportItem]
    names: dict[int, str]  # reviewed cluster -> the class name exports use
    suggested: dict[int, SuggestedName] = field(default_factory=dict)
    concepts: dict[int, str] = field(default_factory=dict)  # dense concept id -> name (review's over dense.json's)
    model_version: str = ""

    @property
    def classes(self) -> list[str]:
        """Distinct class names in cluster order (two clusters named alike are one class)."""
        return list(dict.fromkeys(self.names[c] for c in sorted({i.cluster for i in self.items})))

    def class_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.classes)}

    def source(self, item: ExportItem) -> Path:
        return resolve_id(self.data_root, item.path)

    def rows(self) -> list[LabelRow]:
        """The items as LabelRows, for exporters written against labels.csv rows."""
        return [LabelRow(i.path, i.cluster, i.confidence, i.gt) for i in self.items]

    @property
    def is_dense(self) -> bool:
        return (self.run / DENSE / "dense.json").is_file()

    def dense_maps(self) -> Iterator[tuple[ExportItem, dict, np.ndarray]]:
        """(item, dense.json entry, concept label map) for every exported image a dense run mapped."""
        meta = self.dense_meta()
        entries = {e["id"]: e for e in meta["images"]}
        for item in self.items:
            if item.path in entries:
                e = entries[item.path]
                yield item, e, np.asarray(Image.open(self.run / DENSE / e["map"]))

    def dense_meta(self) -> dict:
        p = self.run / DENSE / "dense.json"
        if not p.is_file():
            raise InputError(f"{self.run}: no dense/dense.json (run `selflabel segment` first)")
        return json.loads(p.read_text(encoding="utf-8"))

    def concept_kinds(self) -> dict[int, str]:
        return {int(c["id"]): c.get("kind", "thing") for c in self.dense_meta()["concepts"]}


def build_view(run_dir: str | Path, *, include_rejected: bool = False, names: str = "reviewed",
               leave_out: Collection[str] = ()) -> ExportView:
    """Read a run with its review applied.

    names: "reviewed" (the user's names, cluster_NN otherwise) or "suggested" (the user's names,
    else the suggested name, else cluster_NN). leave_out: image paths to drop (e.g. the duplicates of
    kept images). Rejected images are dropped unless include_rejected."""
    if names not in NAME_POLICIES:
        raise InputError(f"unknown names policy '{names}' (choose {', '.join(NAME_POLICIES)})")
    run = Path(run_dir)
    manifest = read_manifest(run)
    rows, reviewed, rejected, unsure, concept_edits = effective_review(run)
    suggested = suggested_names(run, np.array([r.cluster for r in rows], dtype=np.int64))
    class_names = {}
    for c in sorted({r.cluster for r in rows}):
        name = reviewed.get(c, default_name(c))
        if names == "suggested" and name == default_name(c) and c in suggested:
            name = suggested[c].name
        class_names[c] = name
    drop = set(leave_out)
    items = []
    for r in rows:
        status = "rejected" if r.path in rejected else "unsure" if r.path in unsure else "ok"
        if r.path in drop or r.cluster < 0 or (status == "rejected" and not include_rejected):
            continue
        items.append(ExportItem(r.path, r.cluster, class_names[r.cluster], r.confidence, status,
                                suggested[r.cluster].label if r.cluster in suggested else "", r.gt))
    concepts = {}
    if (run / DENSE / "dense.json").is_file():
        stored = json.loads((run / DENSE / "dense.json").read_text(encoding="utf-8"))["concepts"]
        concepts = {int(c["id"]): c.get("name") or concept_name(c["id"]) for c in stored} | concept_edits
    backbone = manifest.get("backbone")
    bname = backbone.get("name", "") if isinstance(backbone, dict) else str(backbone or "")
    method = (manifest.get("config") or {}).get("cluster", {}).get("method", "")
    version = f"selflabel-{manifest.get('selflabel_version', '')} {bname} {method}".strip()
    return ExportView(run, Path(manifest["data_root"]), items, class_names, suggested, concepts, " ".join(version.split()))
