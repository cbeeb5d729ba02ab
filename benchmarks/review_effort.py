"""How much human work turns the clusters into a correct labelled data set? (issue 18)

    python -m benchmarks.review_effort [--quick]

A simulated reviewer who knows the true class of every image it looks at uses only the app's
operations (rename, merge, move a selection, accept or dismiss a suggestion). Cost model: one
action per operation, one per image ticked in a selection, one per image looked at. Accuracy: the
share of images whose cluster's name is their true class. The policy, the same for every row:

1. Name: for each cluster, look at its 12 most typical images, rename it to their majority class;
   clusters given one name are merged (one action each).
2. Suggestions (only the "with suggestions" rows): take the open suggestions best first; for each,
   look at up to 8 of its images (8 per part for a split); accept when what it sees agrees (a move's
   images are mostly of the target's class; a merge's two clusters show one class; a split's parts
   show different classes, which are then named as in 1), else dismiss. Three rounds, suggestions
   recomputed between rounds; a suggestion accepted or dismissed is not shown again (its `key`, as in the app).
3. Sweep: clusters largest first, each page of 24 images least confident first (softmax of the
   cosine to the cluster centre, T = 0.1, for every method alike): look at the page, tick the
   wrong images and move them to the cluster named with their class (one move per class on the page).
   Stop at 99 % or when every image was looked at.

Rows: scikit-learn KMeans(n_init=10) on centred L2-normalised features without suggestions, the
transport clustering alone (`--method sinkhorn`, estimated sizes) without suggestions, our default
(`--method neighbors`: neighbour heads started from that clustering) without and with suggestions; K = number of classes; frozen
mobilenet_v2 features (cached). Data: imagenette-val, cifar10-test and cifar10-test long-tailed
(class c keeps 0.1^(c/9) of its images).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.cluster import KMeans

from benchmarks.common import machine_info, markdown_table, shared_data, write_result
from selflabel.backbones import create_backbone
from selflabel.cluster import prepare_features
from selflabel.config import RunConfig
from selflabel.curate.prepare import centred_unit
from selflabel.curate.run import neighbours_of
from selflabel.curate.suggestions import suggest
from selflabel.data import scan_folder
from selflabel.features import extract_features
from selflabel.imbalanced import estimated_marginal_cluster
from selflabel.train.neighbors import train_neighbors

TARGETS = (0.90, 0.95, 0.99)
LOOK_NAME, LOOK_SUGGESTION, PAGE = 12, 8, 24
ROUNDS = 3
DATA = ("imagenette-val", "cifar10-test", "cifar10-test-lt")


@dataclass
class Reviewer:
    """The state the simulated reviewer edits, and what it has spent."""

    x: np.ndarray  # unit features
    y: np.ndarray  # true classes (ints)
    labels: np.ndarray
    names: dict[int, int] = field(default_factory=dict)  # cluster -> class it was named
    cost: int = 0
    reached: dict[float, int] = field(default_factory=dict)

    def accuracy(self) -> float:
        named = np.array([self.names.get(int(c), -1) for c in range(int(self.labels.max()) + 1)])
        return float((named[self.labels] == self.y).mean())

    def spend(self, n: int) -> None:
        self.cost += n
        acc = self.accuracy()
        for t in TARGETS:
            if acc >= t and t not in self.reached:
                self.reached[t] = self.cost

    def confidence(self) -> np.ndarray:
        k = int(self.labels.max()) + 1
        c = np.zeros((k, self.x.shape[1]))
        np.add.at(c, self.labels, self.x)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        logits = self.x @ c.T / 0.1
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[np.arange(len(self.x)), self.labels]

    def look_majority(self, rows: np.ndarray, n: int) -> int:
        rows = rows[:n]
        self.cost += len(rows)
        return Counter(self.y[rows].tolist()).most_common(1)[0][0]

    def name(self, c: int) -> None:
        rows = np.flatnonzero(self.labels == c)
        conf = self.confidence()[rows]
        self.names[c] = self.look_majority(rows[np.argsort(-conf)], LOOK_NAME)
        self.spend(1)

    def merge_same_names(self) -> None:
        by_class: dict[int, list[int]] = {}
        for c in np.unique(self.labels):
            by_class.setdefault(self.names[int(c)], []).append(int(c))
        for cs in by_class.values():
            for c in cs[1:]:
                self.labels[self.labels == c] = cs[0]
                self.spend(1)

    def cluster_of(self, cls: int) -> int:
        for c in np.unique(self.labels):
            if self.names.get(int(c)) == cls:
                return int(c)
        new = int(self.labels.max()) + 1 + len(self.names)
        self.names[new] = cls
        self.cost += 1  # naming the new cluster
        return new

    def suggestions(self) -> None:
        decided: set[str] = set()  # keys accepted or dismissed: the app does not show them again
        for _ in range(ROUNDS):
            nb = neighbours_of(self.x).indices
            touched: set[int] = set()
            changed = False
            for s in suggest(self.x, self.labels, nb):
                if s.key in decided:
                    continue
                if touched & set(s.clusters):
                    continue  # an earlier acceptance changed these clusters: wait for the next round
                decided.add(s.key)
                if s.kind == "move":
                    rows = np.array(s.rows)
                    ok = self.look_majority(rows, LOOK_SUGGESTION) == self.names[s.clusters[1]]
                    if ok:
                        self.labels[rows] = s.clusters[1]
                elif s.kind == "merge":
                    a = self.look_majority(np.flatnonzero(self.labels == s.clusters[0]), LOOK_SUGGESTION)
                    ok = a == self.names[s.clusters[1]]
                    if ok:
                        self.labels[self.labels == s.clusters[0]] = s.clusters[1]
                else:
                    c = s.clusters[0]
                    part = np.array(s.rows)
                    rest = np.setdiff1d(np.flatnonzero(self.labels == c), part)
                    ok = self.look_majority(part, LOOK_SUGGESTION) != self.look_majority(rest, LOOK_SUGGESTION)
                    if ok:
                        new = int(max(self.labels.max(), max(self.names)) + 1)
                        self.labels[part] = new
                        self.spend(1)
                        self.name(new)
                        self.merge_same_names()
                self.spend(1)
                if ok:
                    touched |= set(s.clusters)
                    changed = True
            if not changed:
                return

    def sweep(self) -> None:
        conf = self.confidence()
        for c in [int(c) for c, _ in Counter(self.labels.tolist()).most_common()]:
            rows = np.flatnonzero(self.labels == c)
            rows = rows[np.argsort(conf[rows])]
            for s in range(0, len(rows), PAGE):
                if 0.99 in self.reached:
                    return
                page = rows[s:s + PAGE]
                self.cost += len(page)
                wrong = page[self.y[page] != self.names[c]]
                for cls in np.unique(self.y[wrong]):
                    pick = wrong[self.y[wrong] == cls]
                    self.labels[pick] = self.cluster_of(int(cls))
                    self.cost += len(pick)  # ticking each image
                    self.spend(1)  # the move
                self.spend(0)


def review(x: np.ndarray, y: np.ndarray, labels: np.ndarray, with_suggestions: bool) -> tuple[dict[float, int], float]:
    r = Reviewer(x, y, np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64))
    for c in np.unique(r.labels):
        r.name(int(c))
    r.merge_same_names()
    start = r.accuracy()
    if with_suggestions:
        r.suggestions()
    r.sweep()
    return r.reached, start


def load(name: str, quick: bool) -> tuple[np.ndarray, np.ndarray]:
    scan = scan_folder(shared_data(name.replace("-lt", "")), gt="folders")  # the reviewer knows the true classes
    recs = scan.records
    fr = extract_features(recs, create_backbone("mobilenet_v2"), device="cpu", num_workers=0, show_progress=False)
    classes = sorted({r.gt for r in fr.records})
    if len(classes) < 2 or None in classes:
        raise SystemExit(f"{name}: the reviewer needs every image's class from its folder name (found {classes[:5]})")
    y = np.array([classes.index(r.gt) for r in fr.records])
    x = np.asarray(fr.features, dtype=np.float32)
    rng = np.random.default_rng(0)
    keep = np.arange(len(y))
    if name.endswith("-lt"):
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, int((y == c).sum() * 0.1 ** (c / 9)))]
                               for c in range(len(classes))])
    if quick:
        keep = rng.permutation(keep)[: min(len(keep), 2000)]
    keep = np.sort(keep)
    return x[keep], y[keep]


def default_clustering(x: np.ndarray, k: int) -> np.ndarray:
    """`--method sinkhorn` with its defaults (cluster sizes estimated from the data), seed 0."""
    return estimated_marginal_cluster(prepare_features(x), k, seed=0).labels.numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 images per data set")
    ap.add_argument("--data", nargs="+", choices=DATA, default=list(DATA), help="data sets (default: all three)")
    args = ap.parse_args(argv)
    info = f"{machine_info()}; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(info, file=sys.stderr)
    rows = []
    for name in args.data:
        x, y = load(name, args.quick)
        k = len(np.unique(y))
        u = centred_unit(x)
        clusterings = {"k-means": KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(u),
                       "--method sinkhorn": default_clustering(x, k),
                       "default": np.asarray(train_neighbors(x, k, RunConfig()).labels)}
        for method, sugg in (("k-means", False), ("--method sinkhorn", False), ("default", False), ("default", True)):
            reached, start = review(u, y, clusterings[method], sugg)
            row = [name, len(y), f"{method} {'with' if sugg else 'without'} suggestions", f"{start:.3f}"]
            rows.append(row + [reached.get(t, "-") for t in TARGETS])
            print(rows[-1], file=sys.stderr)
    table = markdown_table(["data", "images", "clusters, review", "accuracy after naming",
                            "actions to 90 %", "actions to 95 %", "actions to 99 %"], rows)
    text = "\n".join(["# Review effort" + (" (quick)" if args.quick else ""), "", info, "",
                      "Cost = operations + images ticked + images looked at; policy in benchmarks/review_effort.py.", "",
                      table, ""])
    print(text)
    subset = "" if list(args.data) == list(DATA) else "-" + "-".join(args.data)  # a part never overwrites the whole
    write_result("review_effort" + ("-quick" if args.quick else "") + subset, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
