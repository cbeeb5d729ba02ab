"""Suggested cluster names, offline: each image's top ImageNet class from the backbone's own classifier
head, and per cluster the class most of its members agree on, with the share ("church (87 %)").

Optionally, zero-shot names from a user's vocabulary with an open_clip model (cached or downloadable;
fails fast offline with BackboneUnavailable, as the DINO backbone does).

The per-image votes are kept in RUN/suggested_names.json, so names can be recomputed for the reviewed
clusters (after merges, splits and moves) without the model: `suggested_names(run, assignments)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.models._meta import _IMAGENET_CATEGORIES

from .atomic import atomic_write_json
from .backbones import DOWNLOAD_TIMEOUT_S, imagenet_head
from .errors import BackboneUnavailable, InputError
from .data import load_rgb, resolve_id
from .errors import ImageLoadError
from .runfiles import read_labels, read_manifest
from .progress import progress_bar

log = logging.getLogger(__name__)

SUGGESTED = "suggested_names.json"
IMAGENET_CLASSES: tuple[str, ...] = tuple(_IMAGENET_CATEGORIES)
CLIP_MODEL, CLIP_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"


@dataclass(frozen=True)
class SuggestedName:
    """A cluster's suggested name, the share of its members that voted for it, and the runners-up."""

    name: str
    share: float
    n: int
    alternatives: tuple[tuple[str, float], ...] = field(default=())

    @property
    def label(self) -> str:
        return f"{self.name} ({self.share * 100:.0f} %)"


# ----------------------------------------------------------------------------- pure
def top_classes(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Each row's arg-max class (int64 [N])."""
    return np.asarray(torch.as_tensor(logits).argmax(1), dtype=np.int64)


def vote_names(votes: np.ndarray, clusters: np.ndarray, classes: Sequence[str], n_alternatives: int = 2
               ) -> dict[int, SuggestedName]:
    """Per cluster (>= 0), the class most of its members voted for, with its share and runners-up.
    A vote of -1 (image not seen) counts for nothing."""
    votes, clusters = np.asarray(votes, dtype=np.int64), np.asarray(clusters, dtype=np.int64)
    if votes.shape != clusters.shape:
        raise ValueError(f"vote_names: {votes.shape[0]} votes for {clusters.shape[0]} images")
    out: dict[int, SuggestedName] = {}
    valid = (clusters >= 0) & (votes >= 0)
    for c in np.unique(clusters[valid]):
        counts = np.bincount(votes[valid & (clusters == c)], minlength=len(classes))
        order = np.argsort(-counts, kind="stable")
        n = int(counts.sum())
        alts = tuple((classes[i], counts[i] / n) for i in order[1:1 + n_alternatives] if counts[i])
        out[int(c)] = SuggestedName(classes[order[0]], float(counts[order[0]] / n), n, tuple((a, float(s)) for a, s in alts))
    return out


# ----------------------------------------------------------------------------- ImageNet heads
@torch.no_grad()
def imagenet_votes(features: np.ndarray, backbone: str, weights: str | None = None, batch: int = 8192) -> np.ndarray:
    """Top-1 ImageNet class of each pooled feature row, from the backbone's own classifier head."""
    w, b = imagenet_head(backbone, weights)
    if features.shape[1] != w.shape[1]:
        raise InputError(f"features have {features.shape[1]} dims but the {backbone} head takes {w.shape[1]}")
    votes = [top_classes(torch.from_numpy(np.array(features[i:i + batch], dtype=np.float32)) @ w.T + b)
             for i in range(0, len(features), batch)]
    return np.concatenate(votes) if votes else np.zeros(0, dtype=np.int64)


def suggest_for_run(run_dir: str | Path, features: np.ndarray, clusters: np.ndarray, backbone: str,
                    weights: str | None = None) -> dict[int, SuggestedName]:
    """Vote with the backbone's ImageNet head, write RUN/suggested_names.json, return the names per cluster.
    {} (logged) for backbones without a head, so labelling never fails for want of names."""
    try:
        votes = imagenet_votes(features, backbone, weights)
    except BackboneUnavailable as exc:
        log.info("no suggested names: %s", exc)
        return {}
    write_votes(run_dir, votes, IMAGENET_CLASSES, source=f"{backbone} ImageNet-1k head")
    return vote_names(votes, clusters, IMAGENET_CLASSES)


# ----------------------------------------------------------------------------- the run's file
def write_votes(run_dir: str | Path, votes: np.ndarray, classes: Sequence[str], source: str, **extra) -> None:
    """RUN/suggested_names.json: the vocabulary, one vote per labels.csv row, and where they came from."""
    atomic_write_json(Path(run_dir) / SUGGESTED, {"version": 1, "source": source, "classes": list(classes),
                                                 "votes": [int(v) for v in votes], **extra})


def read_votes(run_dir: str | Path) -> tuple[np.ndarray, list[str], str] | None:
    """(votes, classes, source) from RUN/suggested_names.json, or None when the run has none."""
    p = Path(run_dir) / SUGGESTED
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        return np.asarray(doc["votes"], dtype=np.int64), list(doc["classes"]), str(doc.get("source", ""))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{p}: corrupt suggested names ({exc}); delete it to drop the suggestions") from None


def suggested_names(run_dir: str | Path, assignments: np.ndarray | None = None) -> dict[int, SuggestedName]:
    """Suggested name per cluster for the review app and the exporters.

    `assignments`: the current cluster of each labels.csv row (e.g. `ReviewStore.assignments()`), so the
    names follow the review's merges, splits and moves; default: the clusters the run wrote.
    {} when the run has no votes (a backbone without an ImageNet head and no zero-shot names)."""
    found = read_votes(run_dir)
    if found is None:
        return {}
    votes, classes, _ = found
    if assignments is None:
        assignments = np.array([r.cluster for r in read_labels(run_dir)], dtype=np.int64)
    if len(assignments) != len(votes):
        log.warning("%s: %d votes for %d images; suggested names left out", run_dir, len(votes), len(assignments))
        return {}
    return vote_names(votes, assignments, classes)


def manifest_entry(names: Mapping[int, SuggestedName]) -> dict[str, dict]:
    """The manifest's `suggested_names`: cluster id (str) -> name, share, n, alternatives, label."""
    return {str(c): {**asdict(s), "label": s.label} for c, s in sorted(names.items())}


# ----------------------------------------------------------------------------- zero-shot (open_clip)
def read_vocab(path: str | Path) -> list[str]:
    """One name per line (blank lines and '#' comments skipped, duplicates dropped); at least two."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: vocabulary file not found (one class name per line)")
    words = list(dict.fromkeys(w.strip() for w in p.read_text(encoding="utf-8").splitlines()
                               if w.strip() and not w.lstrip().startswith("#")))
    if len(words) < 2:
        raise InputError(f"{p}: a vocabulary needs at least two names, one per line (found {len(words)})")
    return words


def load_clip(model: str = CLIP_MODEL, pretrained: str = CLIP_PRETRAINED):
    """(model, preprocess, tokenizer) from open_clip; BackboneUnavailable when it is not installed, or
    its weights are neither cached nor downloadable (checked with a short connect timeout first)."""
    try:
        import open_clip
    except ImportError:
        raise BackboneUnavailable("zero-shot names need open_clip: pip install 'selflabel[names]' (open_clip_torch)") from None
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(DOWNLOAD_TIMEOUT_S)))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(DOWNLOAD_TIMEOUT_S)))
    if not _clip_cached(open_clip, model, pretrained) and not _reachable("huggingface.co"):
        raise BackboneUnavailable(
            f"open_clip {model}/{pretrained}: weights not cached and huggingface.co is unreachable (offline?). "
            "Copy the checkpoint into the Hugging Face cache, or use the offline ImageNet-head names.")
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as exc:  # hub errors, corrupt cache, unknown tag
        raise BackboneUnavailable(f"open_clip {model}/{pretrained}: cannot load ({exc})") from None
    return net.eval(), preprocess, tokenizer


def _clip_cached(open_clip, model: str, pretrained: str) -> bool:
    """True when the Hugging Face cache holds a snapshot of the model's hub repository."""
    repo = open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub", "").strip("/")
    if not repo:
        return False
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return any((hub / f"models--{repo.replace('/', '--')}").glob("snapshots/*/*"))


def _reachable(host: str, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=DOWNLOAD_TIMEOUT_S):
            return True
    except OSError:
        return False


@torch.no_grad()
def zero_shot_votes(images, vocab: Sequence[str], clip, batch: int = 64) -> np.ndarray:
    """Each image's nearest vocabulary word by CLIP cosine similarity ("a photo of a {word}.")."""
    net, preprocess, tokenizer = clip
    text = net.encode_text(tokenizer([f"a photo of a {w}." for w in vocab]))
    text = text / text.norm(dim=-1, keepdim=True)
    votes, buf = [], []
    for im in images:
        buf.append(preprocess(im))
        if len(buf) == batch:
            votes.append(_nearest(net, torch.stack(buf), text))
            buf = []
    if buf:
        votes.append(_nearest(net, torch.stack(buf), text))
    return np.concatenate(votes) if votes else np.zeros(0, dtype=np.int64)


def _nearest(net, x: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    f = net.encode_image(x)
    return top_classes((f / f.norm(dim=-1, keepdim=True)) @ text.T)


def vocab_key(words: Sequence[str], model: str, pretrained: str) -> str:
    return hashlib.blake2b("\n".join([model, pretrained, *words]).encode(), digest_size=8).hexdigest()


def zero_shot_for_run(run_dir: str | Path, vocab_path: str | Path, model: str = CLIP_MODEL,
                      pretrained: str = CLIP_PRETRAINED) -> str:
    """Replace the run's votes by zero-shot CLIP votes over the words in `vocab_path` (one per line).

    Checks the vocabulary and loads the model before touching any image; reuses the votes when the
    same words and model were used before. An unreadable image votes -1 (no cluster counts it).
    Returns the votes' source line."""
    run = Path(run_dir)
    words = read_vocab(vocab_path)
    key = vocab_key(words, model, pretrained)
    if (found := _votes_doc(run)) is not None and found.get("key") == key:
        return found["source"]
    clip = load_clip(model, pretrained)
    root = read_manifest(run)["data_root"]
    rows = read_labels(run)
    votes = np.full(len(rows), -1, dtype=np.int64)
    with progress_bar("zero-shot names", total=len(rows)) as advance:
        for start in range(0, len(rows), 256):
            ok, images = [], []
            for i, r in enumerate(rows[start:start + 256], start=start):
                try:
                    images.append(load_rgb(resolve_id(root, r.path), display=r.path))
                    ok.append(i)
                except ImageLoadError as exc:
                    log.warning("zero-shot names: %s skipped (%s)", r.path, exc.reason)
            votes[ok] = zero_shot_votes(images, words, clip)
            advance(len(rows[start:start + 256]))
    source = f"open_clip {model}/{pretrained} zero-shot over {Path(vocab_path).name} ({len(words)} names)"
    write_votes(run, votes, words, source, key=key)
    return source


def _votes_doc(run: Path) -> dict | None:
    p = run / SUGGESTED
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except json.JSONDecodeError:
        return None
