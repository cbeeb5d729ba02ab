"""Label Studio export: tasks JSON with pre-annotations as *predictions* (each with a score and the
model version, so reviewers correct them rather than take them as ground truth), the matching
labelling config, and a note on serving the images.

Image-level labels are `choices`; a dense run's concept instances are `polygonlabels` in percent
coordinates (https://labelstud.io/guide/predictions, https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks).
"""
from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from ..annotations import label_map_annotations, mask_polygons, rle_to_mask
from ..atomic import atomic_write_json, atomic_write_text
from ..naming import concept_name
from .files import staged_dir
from .view import ExportItem, ExportView

TASKS, CONFIG, NOTE = "tasks.json", "config.xml", "SERVING.md"
LOCAL_FILES = "/data/local-files/?d="


def image_url(path: str, url_prefix: str | None) -> str:
    """Where Label Studio fetches an image: `url_prefix` + path, or its local-files endpoint with the
    data root as LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    quoted = urllib.parse.quote(path)
    return f"{url_prefix.rstrip('/')}/{quoted}" if url_prefix else f"{LOCAL_FILES}{quoted}"


def labeling_config(classes: list[str], concepts: list[str]) -> str:
    """The XML config: single-choice image classes, plus polygon labels for dense concepts."""
    lines = ['<View>', '  <Image name="image" value="$image" zoom="true"/>',
             '  <Choices name="label" toName="image" choice="single" showInline="true">']
    lines += [f"    <Choice value={quoteattr(c)}/>" for c in classes]
    lines.append('  </Choices>')
    if concepts:
        lines.append('  <PolygonLabels name="objects" toName="image" strokeWidth="2">')
        lines += [f"    <Label value={quoteattr(c)}/>" for c in concepts]
        lines.append('  </PolygonLabels>')
    lines.append('</View>')
    return "\n".join(lines) + "\n"


def choice_result(name: str) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}


def polygon_results(label_map, names: dict[int, str], min_area: int, prefix: str) -> list[dict[str, Any]]:
    """One polygon per connected component of each concept, in percent of the map's width / height."""
    H, W = label_map.shape
    out = []
    for ann in label_map_annotations(label_map, image_id=0, first_id=1, min_area=min_area):
        poly = mask_polygons(rle_to_mask(ann["segmentation"]))
        if not poly:
            continue
        pts = [[round(100 * float(x) / W, 3), round(100 * float(y) / H, 3)] for x, y in poly[0]]
        out.append({"id": f"{prefix}-{ann['id']}", "from_name": "objects", "to_name": "image", "type": "polygonlabels",
                    "original_width": int(W), "original_height": int(H), "image_rotation": 0,
                    "value": {"points": pts, "closed": True, "polygonlabels": [names.get(ann["category_id"], concept_name(ann["category_id"]))]}})
    return out


def task(item: ExportItem, view: ExportView, url_prefix: str | None, dense: list[dict] | None = None) -> dict[str, Any]:
    data = {"image": image_url(item.path, url_prefix), "path": item.path, "cluster": item.cluster,
            "status": item.status, "suggested_name": item.suggested_name}
    result = [choice_result(item.name)] + (dense or [])
    return {"data": data, "predictions": [{"model_version": view.model_version, "score": round(item.confidence, 6),
                                           "result": result}]}


def export_labelstudio(view: ExportView, out_dir: str | Path, url_prefix: str | None = None) -> int:
    """Write <out>/tasks.json, config.xml and SERVING.md. Returns the number of tasks."""
    dense: dict[str, list[dict]] = {}
    concepts: list[str] = []
    if view.is_dense:
        concepts = list(dict.fromkeys(view.concepts.values()))
        for item, entry, lm in view.dense_maps():
            dense[item.path] = polygon_results(lm, view.concepts, int(entry.get("min_area", 1)), f"{len(dense)}")
    tasks = [task(i, view, url_prefix, dense.get(i.path)) for i in view.items]
    with staged_dir(out_dir) as tmp:
        atomic_write_json(tmp / TASKS, tasks)
        atomic_write_text(tmp / CONFIG, labeling_config(view.classes, concepts))
        atomic_write_text(tmp / NOTE, serving_note(view, url_prefix))
    return len(tasks)


def serving_note(view: ExportView, url_prefix: str | None) -> str:
    if url_prefix:
        how = f"Images are fetched from `{url_prefix.rstrip('/')}/<path>`; serve `{view.data_root}` there."
    else:
        how = ("Images are served by Label Studio itself from local files. Start it with\n\n"
               "    LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \\\n"
               f"    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={view.data_root} label-studio start\n\n"
               "and add a Local Files storage for that folder to the project (Settings > Cloud Storage),\n"
               "or export again with `--url-prefix http://host/images` to serve them yourself.")
    return ("# Importing into Label Studio\n\n"
            f"1. Create a project; under Settings > Labeling Interface > Code, paste `{CONFIG}`.\n"
            f"2. Import `{TASKS}`: each image comes with a *prediction* (score = selflabel's confidence,\n"
            f"   model version `{view.model_version}`), not an annotation: accept or correct it.\n\n{how}\n")
