"""Long-tailed folders and unknown K: cluster sizes estimated inside the transport vs the balanced step.

Question: on folders whose largest class has 10x or 100x the images of the smallest, does the
default (`--method neighbors`: neighbour heads started from the transport clustering with estimated
cluster sizes, `selflabel.imbalanced`) beat the baseline a user would run, scikit-learn `KMeans(n_init=10)` on the L2-normalised features, while staying within a point of
the balanced label step on balanced folders? The transport clustering alone (`--method sinkhorn`)
and SCAN's random start are rows beside it. And with no K given, how close is the chosen K
(`selflabel.kselect`) to the number of classes?

Long-tailed variants are drawn here from imagenette-val and cifar10-test (ground truth = class
folders, read with gt="folders"): exponential profile n_i = n_max * ratio^(-i / (C - 1)); the seed
chooses which classes are large and which images are kept. Features: cached mobilenet_v2.

    python -m benchmarks.longtail [--quick] [--datasets imagenette-val cifar10-test] [--ratios 1 10 100]
                                  [--seeds 3] [--sela-seeds 1] [--no-sela] [--no-neighbors] [--threads 1]

--quick: 1 seed, at most 150 images per class, SeLa for 10 epochs (results go to longtail-quick.md).
SeLa trains a network per run (minutes on 10,000 images with 2 cores): its rows use the first
--sela-seeds seeds (default 1), the other rows all of them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import machine_info, markdown_table, write_result

DATASETS = ("imagenette-val", "cifar10-test")
DEFAULT_ROW = "neighbour heads from the clustering (default, --method neighbors)"
RATIOS = (1, 10, 100)


def cpu_capability() -> str:
    """The CPU kind the numbers were measured on (vector ISA and native bf16)."""
    import torch

    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        bf16 = False
    return f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if bf16 else 'no'}"


def load_features(name: str, backbone: str = "mobilenet_v2") -> tuple[np.ndarray, np.ndarray]:
    """Cached features of a shared data set and its class-folder ground truth as integers."""
    from benchmarks.common import shared_data
    from selflabel.backbones import create_backbone
    from selflabel.data import scan_folder
    from selflabel.features import extract_features

    scan = scan_folder(shared_data(name), gt="folders")
    fr = extract_features(scan.records, create_backbone(backbone), device="cpu", show_progress=False)
    _, y = np.unique(np.array([r.gt for r in fr.records]), return_inverse=True)
    return np.asarray(fr.features, dtype=np.float32), y.astype(np.int64)


def longtail_subset(y: np.ndarray, ratio: float, seed: int, per_class: int | None = None) -> np.ndarray:
    """Sorted row indices of an exponentially long-tailed subset: the class of rank r (a seeded
    permutation) keeps round(n_max * ratio^(-r / (C - 1))) images, n_max = the smallest class size
    (capped by ``per_class``)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    n_max = min(int((y == c).sum()) for c in classes)
    if per_class:
        n_max = min(n_max, per_class)
    keep = []
    for rank, c in enumerate(rng.permutation(classes)):
        n = max(1, int(round(n_max * ratio ** (-rank / max(1, len(classes) - 1)))))
        keep.append(rng.choice(np.flatnonzero(y == c), n, replace=False))
    return np.sort(np.concatenate(keep))


def proportion_tv(y: np.ndarray, labels: np.ndarray) -> float:
    """Total variation between the true class proportions and the cluster sizes, clusters matched
    to classes by the Hungarian assignment (unmatched clusters or classes count as size 0)."""
    from scipy.optimize import linear_sum_assignment

    k = max(int(y.max()), int(labels.max())) + 1
    cont = np.zeros((k, k))
    np.add.at(cont, (y, labels), 1)
    r, c = linear_sum_assignment(-cont)
    true = np.bincount(y, minlength=k) / len(y)
    est = np.bincount(labels, minlength=k) / len(y)
    return 0.5 * float(np.abs(true[r] - est[c]).sum())


def methods(quick: bool, sela: bool, neighbors: bool = True) -> dict[str, Callable[[np.ndarray, int, int], np.ndarray]]:
    """name -> fn(features, k, seed) -> labels."""
    from sklearn.cluster import KMeans

    from selflabel.cluster import prepare_features, sinkhorn_cluster
    from selflabel.config import RunConfig
    from selflabel.imbalanced import estimated_marginal_cluster
    from selflabel.train.neighbors import train_neighbors
    from selflabel.train.sela import train_sela

    def kmeans(x, k, seed):
        xn = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(xn).labels_

    def default(x, k, seed):
        return estimated_marginal_cluster(prepare_features(x), k, seed=seed).labels.numpy()

    def by_means(x, k, seed):
        return estimated_marginal_cluster(prepare_features(x), k, seed=seed, merge="average").labels.numpy()

    def sela_fn(marginal):
        def fn(x, k, seed):
            cfg = RunConfig()
            cfg.seed = seed
            cfg.cluster.marginal = marginal
            if quick:
                cfg.sela.epochs = 10
            return train_sela(x, k, cfg).labels
        return fn

    out = {"k-means (sklearn, n_init=10)": kmeans,
           "balanced Sinkhorn (cluster.marginal=uniform)": lambda x, k, seed: sinkhorn_cluster(x, k, seed=seed).labels,
           "transport clustering, estimated sizes (--method sinkhorn)": default,
           "estimated sizes, merge by means (cluster.merge=average)": by_means}
    def neighbors_fn(init, marginal):
        def fn(x, k, seed):
            cfg = RunConfig()
            cfg.seed = seed
            cfg.neighbors.init, cfg.neighbors.marginal = init, marginal
            if quick:
                cfg.neighbors.epochs = 10
            return train_neighbors(x, k, cfg).labels
        return fn

    if neighbors:
        out["neighbour heads, random start (SCAN: neighbors.init=random, marginal=uniform)"] = neighbors_fn("random", "uniform")
        out[DEFAULT_ROW] = neighbors_fn("clustering", "estimated")
    if sela:
        out["SeLa, balanced (before)"] = sela_fn("uniform")
        out["SeLa, estimated sizes (after)"] = sela_fn("estimated")
    return out


def small_folders(args, fns, n_seeds: int) -> list[list]:
    """The same methods (SeLa aside) on folders of at most ``args.small`` images per class."""
    from selflabel.metrics import cluster_metrics

    rows = []
    for name in args.datasets:
        x_all, y_all = load_features(name)
        n_classes = len(np.unique(y_all))
        for ratio in (1, 10):
            subsets = [longtail_subset(y_all, ratio, s, args.small) for s in range(n_seeds)]
            for method, fn in fns.items():
                if method.startswith("SeLa"):
                    continue
                scores = [cluster_metrics(y_all[keep], np.asarray(fn(x_all[keep], n_classes, seed)))
                          for seed, keep in enumerate(subsets)]
                rows.append([name, f"{ratio:g}", int(np.mean([len(s) for s in subsets])), method, n_seeds,
                             mean([m["nmi"] for m in scores]), mean([m["accuracy"] for m in scores]),
                             " ".join(f"{m['accuracy']:.3f}" for m in scores)])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr)
    return rows


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--no-sela", action="store_true", help="skip the SeLa rows (the slowest)")
    ap.add_argument("--no-neighbors", action="store_true", help="skip the neighbour-heads rows")
    ap.add_argument("--sela-seeds", type=int, default=1, help="seeds for the SeLa rows (the first of --seeds)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1: a shared CPU)")
    ap.add_argument("--small", type=int, default=100,
                    help="also draw folders of at most this many images per class (0: skip that table)")
    args = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    from selflabel.cluster import prepare_features
    from selflabel.imbalanced import estimated_marginal_cluster
    from selflabel.kselect import choose_k
    from selflabel.metrics import cluster_metrics

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    n_seeds = args.seeds or (1 if args.quick else 3)
    per_class = 150 if args.quick else None
    fns = methods(args.quick, not args.no_sela, not args.no_neighbors)
    rows, krows = [], []
    for name in args.datasets:
        x_all, y_all = load_features(name)
        n_classes = len(np.unique(y_all))
        for ratio in args.ratios:
            subsets = [longtail_subset(y_all, ratio, s, per_class) for s in range(n_seeds)]
            size = int(np.mean([len(s) for s in subsets]))
            tag = f"{name} x{ratio:g}"
            print(f"{tag}: {size} images, {n_classes} classes", file=sys.stderr)
            for method, fn in fns.items():
                sc: dict[str, list[float]] = {"nmi": [], "ari": [], "accuracy": [], "tv": [], "time": []}
                runs = subsets[:args.sela_seeds] if method.startswith("SeLa") else subsets
                for seed, keep in enumerate(runs):
                    x, y = x_all[keep], y_all[keep]
                    t = time.perf_counter()
                    labels = np.asarray(fn(x, n_classes, seed))
                    sc["time"].append(time.perf_counter() - t)
                    for key, v in cluster_metrics(y, labels).items():
                        sc[key].append(v)
                    sc["tv"].append(proportion_tv(y, labels))
                rows.append([name, f"{ratio:g}", size, method, len(runs), mean(sc["nmi"]), mean(sc["ari"]),
                             mean(sc["accuracy"]), mean(sc["tv"]), mean(sc["time"])])
                print(" | ".join(map(str, rows[-1])), file=sys.stderr)
            ks, sc = [], {"nmi": [], "ari": [], "accuracy": [], "tv": [], "t_nmi": [], "t_accuracy": []}
            for seed, keep in enumerate(subsets):
                x, y = prepare_features(x_all[keep]), y_all[keep]
                sel = choose_k(x, seed=seed)
                ks.append(sel.k)
                start = cluster_metrics(y, estimated_marginal_cluster(x, sel.k, seed=seed).labels.numpy())
                sc["t_nmi"].append(start["nmi"])
                sc["t_accuracy"].append(start["accuracy"])
                if DEFAULT_ROW in fns:  # not with --no-neighbors
                    labels = np.asarray(fns[DEFAULT_ROW](x_all[keep], sel.k, seed))
                    for key, v in cluster_metrics(y, labels).items():
                        sc[key].append(v)
                    sc["tv"].append(proportion_tv(y, labels))
            err = max(abs(k - n_classes) / n_classes for k in ks)
            krows.append([name, f"{ratio:g}", size, n_classes, " ".join(map(str, ks)), f"{100 * err:.0f}%",
                          mean(sc["nmi"]), mean(sc["ari"]), mean(sc["accuracy"]), mean(sc["tv"]),
                          f"{mean(sc['t_nmi']):.3f} / {mean(sc['t_accuracy']):.3f}"])
            print(" | ".join(map(str, krows[-1])), file=sys.stderr)
    srows = small_folders(args, fns, n_seeds) if args.small and not args.quick else []
    table = markdown_table(["data set", "ratio", "images", "method", "seeds", "NMI", "ARI", "accuracy", "size TV", "time (s)"],
                           rows)
    ktable = markdown_table(["data set", "ratio", "images", "classes", "chosen K (per seed)", "worst error",
                             "NMI", "ARI", "accuracy", "size TV", "--method sinkhorn NMI / accuracy"], krows)
    text = "\n".join([
        "# Long-tailed folders and unknown K" + (" (quick)" if args.quick else ""), "",
        f"Machine: {machine_info()}", "", f"CPU capability: {cpu_capability()}", "",
        f"Command: python -m benchmarks.longtail {' '.join(argv if argv is not None else sys.argv[1:])}", "",
        f"Frozen mobilenet_v2 features; exponential long tail (ratio = largest / smallest class); mean of "
        f"{n_seeds} seed(s) (SeLa: the first {min(args.sela_seeds, n_seeds)}), each seed also choosing which classes "
        "are large. K = number of classes. "
        "Accuracy Hungarian-matched; size TV = total variation between the true class proportions and the "
        "matched cluster sizes. k-means: scikit-learn KMeans(n_init=10) on L2-normalised features.", "",
        table, "",
        "## K unknown (chosen by selflabel.kselect), scores of the default (neighbour heads) at that K, "
        "and of the transport clustering it starts from", "",
        ktable, "",
    ] + ([f"## Small folders: at most {args.small} images per class (60 small clusters of 5 to 20 images: "
          "the transport clustering merges them by their neighbour links)", "",
          markdown_table(["data set", "ratio", "images", "method", "seeds", "NMI", "accuracy", "per-seed accuracy"], srows), ""]
         if srows else []))
    write_result("longtail-quick" if args.quick else "longtail", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
