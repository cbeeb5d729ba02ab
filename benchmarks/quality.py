"""Clustering quality: SeLa, SwAV and neighbour heads vs k-means, Ward and plain Sinkhorn clustering, on the same features.

Question: on frozen features of the default offline backbone (mobilenet_v2, cached by
`selflabel.features.extract_features`), does the SeLa trainer at least match scikit-learn k-means on
imagenette-val and beat it on cifar10-test? Every method sees the same preparation of the features
(centred and L2-normalised, `selflabel.cluster.prepare_features`; the trainers do the same inside their
input layer) and K = the number of classes. Scores: NMI, ARI, Hungarian accuracy; mean +- std over seeds.

    python -m benchmarks.quality [--quick] [--datasets imagenette-val cifar10-test] [--seeds 3] [--threads 1]
                                 [--backbone mobilenet_v2] [--methods k-means neighbors] [--features plain flip concat]
                                 [--image-size 160 224] [--crop 0.875 1] [--output NAME]

--methods: only the methods whose name contains one of these words (case-insensitive).
--features: feature variants, each a full table block: plain (the backbone's cached features), flip (the
library's `backbone.tta=flip`: the mean of the image's and its horizontal mirror's features), concat (mobilenet_v2 and efficientnet_lite2
features side by side, each row L2-normalised: the library's ensemble `--backbone mobilenet_v2+efficientnet_lite2`).
--image-size: the network's input side(s) (`backbone.image_size`: short side to size / 0.875, centre crop),
each a table block; several are compared side by side in one run. --crop: the share(s) of the short side
the centre crop keeps (`backbone.crop`: 0.875 ImageNet evaluation, 1 the whole short side), likewise.
--output: the result file's name (benchmarks/results/NAME.md) instead of the one built from --quick, --backbone,
--image-size and --methods (quality[-quick][-BACKBONE][-sSIZE...][-cropC...][-METHODS]), e.g. so that a concat-only run does not replace the plain
table of the same backbone and methods.

--quick: a class-balanced 2,000-image subset of each data set, 2 seeds and fewer epochs (a smoke run of
about a minute; results go to quality-quick.md).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import machine_info, markdown_table, shared_data, write_result

DATASETS = ("imagenette-val", "cifar10-test")
WARD_MAX = 10_000  # Ward is O(N^2) memory: subsample above this many images
FEATURES_FROM: dict[str, str] = {}  # "data set backbone[ tta]" -> "engine precision" of the features used


def input_setting(image_size: int | None, crop: float | None) -> str:
    """' at 160 px, crop 1' for a non-default input side and crop ('' for the backbone's own), in row names."""
    return (f" at {image_size} px" if image_size else "") + (f", crop {crop:g}" if crop else "")


def load_features(name: str, backbone: str = "mobilenet_v2", tta: str = "none",
                  image_size: int | None = None, crop: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cached backbone features of a shared data set and its ground truth (class folder names, asked for
    with gt="folders": folder names are not labels unless asked). `tta='flip'`: the library's flip
    test-time averaging (`backbone.tta`), cached apart. `image_size`: the network's input side
    (`backbone.image_size`; None: the backbone's own); `crop`: the share of the short side kept
    (`backbone.crop`; None: 0.875)."""
    from selflabel.backbones import create_backbone
    from selflabel.data import scan_folder
    from selflabel.features import extract_features

    scan = scan_folder(shared_data(name), gt="folders")
    fr = extract_features(scan.records, create_backbone(backbone, image_size=image_size, crop_ratio=crop), device="cpu",
                          show_progress=False, tta=tta)
    on = fr.computed_on  # the engine whose cache served them: an engine that fails its parity check falls back to torch
    FEATURES_FROM[f"{name} {backbone}" + ("" if tta == "none" else f" {tta}") + input_setting(image_size, crop)] = \
        f"{on.get('engine')} {on.get('precision')}"
    return np.asarray(fr.features, dtype=np.float32), np.array([r.gt for r in fr.records])


def feature_variant(name: str, variant: str, backbone: str, image_size: int | None = None,
                    crop: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, ground truth) of one feature variant (see --features) at input side `image_size`, centre crop `crop`."""
    from selflabel.ensemble import combine_blocks

    x, y = load_features(name, backbone, image_size=image_size, crop=crop)
    if variant == "plain":
        return x, y
    if variant == "flip":
        return load_features(name, backbone, tta="flip", image_size=image_size, crop=crop)
    if variant == "concat":
        other = "efficientnet_lite2" if backbone != "efficientnet_lite2" else "mobilenet_v2"
        x2, y2 = load_features(name, other)
        assert (y == y2).all(), "the two backbones list the images in different orders"
        return combine_blocks([x, x2]), y  # the library's `--backbone mobilenet_v2+efficientnet_lite2` features
    raise SystemExit(f"--features {variant!r}: choose plain, flip or concat")


def trainer_cfg(method: str, seed: int, quick: bool):
    """The library's default (tuned) frozen-feature settings for `method` (sela | swav | neighbors); 10 epochs in --quick."""
    from selflabel.config import RunConfig

    cfg = RunConfig()
    cfg.seed = seed
    if quick:
        getattr(cfg, method).epochs = 10
    return cfg


def scan_cfg(seed: int, quick: bool):
    """The neighbour trainer as SCAN has it: heads from a random start, a balanced self-labelling step."""
    cfg = trainer_cfg("neighbors", seed, quick)
    cfg.neighbors.init, cfg.neighbors.marginal = "random", "uniform"
    return cfg


def temi_cfg(seed: int, quick: bool):
    """The neighbour trainer with TEMI's weighted-PMI objective (larger lr: its EMA teacher starts slowly),
    from a random start as in the paper."""
    cfg = scan_cfg(seed, quick)
    cfg.neighbors.objective = "temi"
    cfg.neighbors.lr = 0.01
    return cfg


def methods(quick: bool) -> dict[str, Callable[[np.ndarray, int, int], np.ndarray]]:
    """name -> fn(features, k, seed) -> labels."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    from selflabel.cluster import prepare_features
    from selflabel.config import RunConfig
    from selflabel.methods import cluster_features
    from selflabel.train.neighbors import train_neighbors
    from selflabel.train.sela import train_sela
    from selflabel.train.swav import train_swav

    def kmeans(x, k, seed):  # the strong baseline a user runs: n_init=10 on the L2-normalised features
        xn = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit(xn).labels_

    def ward(x, k, seed):
        xp = prepare_features(x).numpy()
        if len(xp) <= WARD_MAX:
            return AgglomerativeClustering(n_clusters=k, linkage="ward").fit(xp).labels_
        rng = np.random.default_rng(seed)  # fit on a subsample, then nearest centroid for the rest
        sub = rng.choice(len(xp), WARD_MAX, replace=False)
        lab = AgglomerativeClustering(n_clusters=k, linkage="ward").fit(xp[sub]).labels_
        cent = np.stack([xp[sub][lab == c].mean(0) for c in range(k)])
        return ((xp[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)

    def transport(x, k, seed):  # `selflabel label --k K --method sinkhorn`: estimated cluster sizes, where the default starts
        cfg = RunConfig(seed=seed)
        cfg.cluster.method = "sinkhorn"
        return cluster_features(x, k, cfg, device="cpu").labels

    out = {
        "k-means (sklearn)": kmeans,
        "Ward": ward,
        "SeLa (frozen)": lambda x, k, seed: train_sela(x, k, trainer_cfg("sela", seed, quick)).labels,
        "SwAV (frozen)": lambda x, k, seed: train_swav(x, k, trainer_cfg("swav", seed, quick)).labels,
        "neighbors (SCAN, random start)": lambda x, k, seed: train_neighbors(x, k, scan_cfg(seed, quick)).labels,
        "neighbors (SCAN, from the clustering: default)":
            lambda x, k, seed: train_neighbors(x, k, trainer_cfg("neighbors", seed, quick)).labels,
        "neighbors (TEMI)": lambda x, k, seed: train_neighbors(x, k, temi_cfg(seed, quick)).labels,
        "transport clustering (--method sinkhorn, estimated sizes)": transport,
    }
    try:
        from selflabel.cluster import sinkhorn_cluster

        out["Sinkhorn clustering"] = lambda x, k, seed: sinkhorn_cluster(x, k, seed=seed).labels
    except ImportError:
        pass
    return out


def cpu_capability() -> str:
    """torch's CPU kernel level (e.g. AVX512) and whether bf16 is native: timings depend on both."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return f"{cap}, native bf16: {'yes' if bf16 else 'no'}"


def balanced_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of about `n` rows, the same number from every class (fixed seed)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    per = max(1, n // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in classes]))


def pm(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--max-images", type=int, default=None,
                    help="class-balanced subset of each data set of at most this many images (quick: 2000)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--methods", nargs="+", default=None, help="only methods whose name contains one of these")
    ap.add_argument("--image-size", type=int, nargs="+", default=[None],
                    help="the network's input side(s) in pixels, compared side by side (backbone.image_size; "
                         "default: the backbone's own)")
    ap.add_argument("--crop", type=float, nargs="+", default=[None],
                    help="share(s) of the short side the centre crop keeps, compared side by side (backbone.crop; default 0.875)")
    ap.add_argument("--features", nargs="+", default=["plain"], help="feature variants: plain flip concat")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and BLAS/OpenMP threads for every method (default: the libraries' own)")
    ap.add_argument("--output", default=None,
                    help="result file name in benchmarks/results (no .md; default: built from --quick, --backbone, --methods)")
    args = ap.parse_args(argv)
    # the feature extraction's progress and engine messages (cached / to compute, a torch fallback) on stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for logger in ("selflabel.features", "selflabel.engine"):  # not the trainers' per-epoch lines
        logging.getLogger(logger).setLevel(logging.INFO)
    if args.threads:  # the same budget for every method; on a shared, loaded CPU 1 thread is the fastest
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    from selflabel.metrics import cluster_metrics

    n_seeds = args.seeds or (2 if args.quick else 3)
    rows = []
    chosen = {m: fn for m, fn in methods(args.quick).items()
              if not args.methods or any(w.lower() in m.lower() for w in args.methods)}
    for name, variant, size, crop in [(d, v, s, c) for d in args.datasets for v in args.features for s in args.image_size
                                      for c in args.crop]:
        t0 = time.perf_counter()
        x, y = feature_variant(name, variant, args.backbone, size, crop)
        cap = args.max_images or (2000 if args.quick else None)
        if cap and cap < len(y):
            keep = balanced_subset(y, cap)
            x, y = x[keep], y[keep]
        k = len(set(y.tolist()))
        print(f"{name} ({variant}): {x.shape[0]} images, D={x.shape[1]}, K={k} (features {time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        for method, fn in chosen.items():
            seeds = [0] if method == "Ward" else range(n_seeds)  # Ward is deterministic (on the full set)
            scores: dict[str, list[float]] = {"nmi": [], "ari": [], "accuracy": [], "time": []}
            for seed in seeds:
                t = time.perf_counter()
                labels = fn(x, k, seed)
                scores["time"].append(time.perf_counter() - t)
                for key, v in cluster_metrics(y, labels).items():
                    scores[key].append(v)
            shown = name + ("" if variant == "plain" else f" ({variant})") + input_setting(size, crop)
            rows.append([shown, method, len(seeds), pm(scores["nmi"]), pm(scores["ari"]), pm(scores["accuracy"]),
                         f"{np.mean(scores['time']):.1f}"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr)
    table = markdown_table(["data set", "method", "seeds", "NMI", "ARI", "accuracy", "time (s)"], rows)
    text = "\n".join([
        f"# Clustering quality on frozen {args.backbone} features" + (" (quick)" if args.quick else ""), "",
        f"Machine: {machine_info()}; CPU capability {cpu_capability()}", "",
        f"Command: python -m benchmarks.quality {' '.join(argv if argv is not None else sys.argv[1:])}", "",
        "Features from (engine, precision): " + "; ".join(f"{k}: {v}" for k, v in FEATURES_FROM.items()), "",
        "Same features for every method (centred and L2-normalised; k-means: L2-normalised only); K = number of classes;"
        " mean ± std over seeds; accuracy = Hungarian-matched. k-means: scikit-learn KMeans(n_init=10) on the"
        " L2-normalised features (the baseline a user would run). Ward: scikit-learn AgglomerativeClustering."
        " neighbors: selflabel.train.neighbors with its defaults (20 mined neighbours, 10 linear heads, 30 epochs"
        " + 10 self-labelling epochs; the default starts the heads from the default clustering and trains them"
        " against its estimated sizes; 'random start' is SCAN's: random heads, the entropy term, a balanced"
        " self-labelling step), time includes the mining (and the starting clustering).", "",
        table, "",
    ])
    suffix = "" if args.backbone == "mobilenet_v2" else f"-{args.backbone}"
    suffix += "".join(f"-s{s}" for s in args.image_size if s) + "".join(f"-crop{c:g}" for c in args.crop if c)
    if args.methods:  # a subset of the methods keeps the full table as it is
        suffix += "-" + "-".join(w.lower().replace(" ", "-") for w in args.methods)
    write_result(args.output or (("quality-quick" if args.quick else "quality") + suffix), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
