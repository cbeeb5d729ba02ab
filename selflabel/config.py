"""Run configuration: plain dataclasses, mirrored by YAML files in `configs/`.

Precedence: dataclass defaults < YAML file (`--config`) < dotted overrides (`--set a.b=v`) < explicit CLI flags.
The resolved config is saved in each run's manifest so the run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import InputError

# Closed sets of values: each enumerated setting is one of these, checked when the config is loaded.
# `Method` is the one list of clustering methods (CLI help, config checks); `cluster.cluster_features`
# dispatches on it, so a new method is added here and there.
Method = Literal["sinkhorn", "sela", "swav", "kmeans", "neighbors"]
Amp = Literal["auto", "bf16", "fp32"]
Engine = Literal["auto", "openvino", "onnxruntime", "torch"]
Tta = Literal["none", "flip"]  # test-time averaging of the global features
HeadKind = Literal["cosine", "linear", "mlp"]
HeadInit = Literal["sinkhorn", "kmeans++", "random"]
FinalAssign = Literal["argmax", "sinkhorn"]
Louvain = Literal["networkx", "python-louvain"]
Merge = Literal["auto", "modularity", "average"]
NeighborInit = Literal["clustering", "random"]
Fusion = Literal["none", "stride16"]  # dense maps: the last one only | with the stride-16 one beside it
NeighborObjective = Literal["scan", "temi"]
Marginal = Literal["estimated", "uniform"]  # cluster sizes: estimated from the data (selflabel.imbalanced) | equal
GtSource = Literal["none", "folders"]  # ground truth from class folder names only when asked
METHODS: tuple[str, ...] = get_args(Method)
AMPS: tuple[str, ...] = get_args(Amp)
ENGINES: tuple[str, ...] = get_args(Engine)
DEVICES = "auto | cpu | cuda | cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class IngestConfig:
    """How a folder becomes a list of images."""

    follow_symlinks: bool = True
    max_pixels: int = 100_000_000  # decompression-bomb limit (width * height)
    gt_csv: str | None = None  # optional CSV path,label of ground truth
    gt: GtSource = "none"  # "folders": the first-level folder names are ground truth (`--gt folders`)


@dataclass
class BackboneConfig:
    """Which network gives the features, and how it runs."""

    name: str = "mobilenet_v2"
    weights: str | None = None
    image_size: int | None = None  # None: the backbone's own
    crop: float = 0.875  # share of the short side the centre crop keeps: 0.875 ImageNet evaluation; 1.0 the whole short side (small, tightly framed images: README "Method: neighbour heads")
    batch_size: int = 64
    num_workers: int = -1  # -1: min(4, cpu count)
    amp: Amp = "auto"
    engine: Engine = "auto"  # CPU inference engine; auto: $SELFLABEL_ENGINE, else OpenVINO > ONNX Runtime > torch
    tta: Tta = "none"  # flip: average each image's features with its mirror image's (2x the forward)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by `validate`)
    cache_dir: str | None = None  # None: $SELFLABEL_CACHE or ~/.cache/selflabel
    flush_every: int = 1024  # images per cache shard: a killed run loses at most this much work
    rehash: bool = False  # hash every file again instead of trusting unchanged stats (size, mtime, ctime, inode)


@dataclass
class ClusterConfig:
    """Image-level pseudo-labelling."""

    method: Method = "neighbors"  # measured best on long-tailed and balanced folders (README "Clustering")
    k: int | None = None  # None: chosen from the data (selflabel.kselect), or len(prior); else at least 2
    heads: list[int] = field(default_factory=list)  # extra heads (SeLa hierarchy), e.g. [50, 100]
    eps: float = 0.05  # Sinkhorn entropic regularisation on cosine scores
    temperature: float = 0.1  # softmax temperature for confidences
    iters: int = 30  # alternations of assignment and prototype update
    finetune: bool = False  # end-to-end training of the backbone (SeLa/SwAV)
    prior: list[float] | None = None  # optional cluster-size prior (sums to 1), length k: fixed sizes
    marginal: Marginal = "estimated"  # without a prior: estimated from the data (long-tailed folders, the default) | uniform (balanced)
    min_mass: float = 0.1  # estimated sizes: every cluster keeps at least min_mass / K (guard against collapse)
    overcluster: int = 6  # estimated sizes: over-cluster into overcluster * K balanced clusters, then merge
    merge: Merge = "auto"  # estimated sizes: small clusters merged by their neighbour links (modularity) or their means (average); auto: links for small clusters of 5-20 images


@dataclass
class SelaConfig:
    """SeLa (Asano et al., ICLR 2020) on frozen features or end-to-end."""

    epochs: int = 30
    label_updates: int = 30  # number of Sinkhorn label re-optimisations over the schedule (30/30: every epoch)
    lamb: float = 25.0  # SeLa's lambda: P ** lamb, i.e. eps = 1 / lamb on log-probabilities
    lr: float = 0.05
    weight_decay: float = 1e-5
    batch_size: int = 256
    hidden_dim: int = 512
    head: HeadKind = "cosine"  # cosine (cos / temperature) | linear | mlp (one hidden layer) on L2-normalised features
    temperature: float = 0.1  # cosine head
    init: HeadInit = "sinkhorn"  # linear/cosine heads start as prototype classifiers: sinkhorn | kmeans++ | random (paper)
    init_temperature: float = 1.0  # head weights = prototypes / init_temperature
    feature_noise: float = 0.8  # augmentation in frozen-feature mode: noise norm vs unit-norm features
    feature_dropout: float = 0.3  # augmentation in frozen-feature mode: channel dropout rate
    final_assign: FinalAssign = "argmax"  # argmax: the trained head's prediction | sinkhorn: a last balanced label step
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    cpu_threads: int = 1  # torch threads for frozen-mode training on CPU (0: torch's default); see train/common.py


@dataclass
class SwavConfig:
    """SwAV (Caron et al., NeurIPS 2020)."""

    epochs: int = 30
    lr: float = 0.05
    weight_decay: float = 1e-6
    batch_size: int = 256
    eps: float = 0.05
    sinkhorn_iters: int = 3
    temperature: float = 0.1
    hidden_dim: int = 512
    proj_dim: int = 128
    queue_length: int = 0  # 0: automatic (enabled when batch_size < 4 * k)
    queue_start_epoch: int = 1
    freeze_prototypes_iters: int = 100
    nmb_crops: list[int] = field(default_factory=lambda: [2, 4])  # large, small views
    feature_noise: float = 0.05  # frozen mode, large views: noise norm vs unit-norm features
    feature_dropout: float = 0.0  # frozen mode, large views: channel dropout rate
    small_noise: float = 0.1  # frozen mode, small views ("small crops"): stronger noise
    small_dropout: float = 0.5  # frozen mode, small views: see only a random half of the channels
    final_assign: FinalAssign = "argmax"  # argmax: nearest prototype | sinkhorn: balanced assignment to tolerance
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    cpu_threads: int = 1  # torch threads for frozen-mode training on CPU (0: torch's default)


@dataclass
class NeighborsConfig:
    """Cluster heads trained on mined nearest neighbours of the cached features (SCAN / TEMI)."""

    objective: NeighborObjective = "scan"  # scan (Van Gansbeke et al. 2020) | temi (Adaloglou et al. 2023)
    neighbors: int | None = None  # mined neighbours per image (cosine); None: 20, or N // K - 1 when that is fewer (small folders)
    n_heads: int = 10  # heads trained together; the lowest-loss one is kept
    init: NeighborInit = "clustering"  # clustering: heads start from the run's transport clustering and keep its sizes | random (SCAN)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-4
    entropy_weight: float = 5.0  # scan: weight of the entropy of the mean prediction
    beta: float = 0.6  # temi: PMI exponent
    temperature: float = 0.1  # temi: student softmax temperature
    teacher_temperature: float = 0.1  # temi
    teacher_momentum: float = 0.99  # temi: EMA of the student, per step
    feature_noise: float = 0.5  # augmentation: noise norm vs unit-norm features
    self_label_epochs: int = 10  # SCAN's self-labelling on confident samples after the neighbour epochs
    confidence: float = 0.9  # self-labelling: minimum head probability of a sample to train on
    marginal: Marginal = "estimated"  # label step's cluster sizes: estimated (the start clustering's, or with init=random the head's own) | uniform (balanced: SCAN)
    lamb: float = 25.0  # label step: Sinkhorn on P ** lamb
    final_assign: FinalAssign = "argmax"  # argmax: the chosen head | sinkhorn: a balanced (or estimated-marginal) label step
    cpu_threads: int = 1  # torch threads on CPU (0: torch's default)


@dataclass
class DenseConfig:
    """Leopart-style dense concepts (Ziegler & Asano, CVPR 2022)."""

    enabled: bool = False
    image_size: int = 640  # short side fed to the backbone; larger -> more patches (finer masks; 640 measured best)
    keep_aspect: bool = True  # False: square image_size x image_size (Leopart)
    shift_stitch: int = 1  # f > 1: f*f shifted passes interleaved, stride / f (FCN shift-and-stitch)
    fusion: Fusion = "none"  # stride16: mobilenet_v2's stride-16 map beside the upsampled last one (finer masks)
    pca_dim: int = 50  # standardise + PCA of patch features (Leopart); 0: standardise only
    k_parts: int = 150  # part clusters (overclustering)
    k_parts_select: Literal["fixed", "stability"] = "fixed"  # stability: label-free, the K of k_parts_grid whose concepts agree most across part seeds
    k_parts_grid: list[int] = field(default_factory=lambda: [100, 150, 200, 300])  # k_parts_select=stability
    k_parts_seeds: int = 3  # k_parts_select=stability: part seeds per K (mean pairwise ARI of their concepts)
    k_parts_sample: int = 30_000  # k_parts_select=stability: patches each candidate fit sees (the chosen K is refitted on max_patches)
    eps: float = 0.05  # Sinkhorn entropic regularisation of the part assignment
    epochs: int = 20  # alternations of Sinkhorn assignment and prototype update
    max_patches: int = 100_000  # patch sample for fitting the part prototypes
    fg_mass: float = 0.65  # noisy foreground: most salient patches holding this share of saliency
    fg_cut: Literal["fixed", "otsu"] = "otsu"  # CBFE cut: otsu = label-free valley of the precisions; fixed = fg_threshold
    fg_threshold: float = 0.5  # CBFE (fg_cut=fixed): a cluster is foreground when this share of its pixels is salient
    split_fg: bool = False  # True: concepts never mix foreground and background parts (measured worse with CNN saliency)
    resolution: float = 1.0  # Louvain resolution: higher -> more, finer concepts
    edge_threshold: float = 0.0  # keep edge (i, j) when both co-occurrences reach this
    louvain: Louvain = "networkx"
    louvain_seeds: int = 5  # Louvain runs; the best modularity wins
    consensus: int = 5  # concept fits (part seeds) that vote: concepts by majority over them (evidence accumulation); 1: one fit
    consensus_cut: float = 0.5  # consensus > 1: average-linkage cut on 1 - co-association (0.5: join when most fits, on average, agree)
    select: Literal["fixed", "stability"] = "stability"  # stability: label-free, finer from r=1 while Louvain stays as stable
    resolution_grid: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0])  # select=stability
    select_seeds: int = 8  # select=stability: Louvain seeds per resolution (mean pairwise ARI)
    min_area: int = 64  # instance minimum area in pixels (smaller regions join their neighbours)
    mask_size: int = 1024  # long side of the score upsampling before the argmax (maps are saved at full size); 0: original
    refine: Literal["none", "slic", "guided"] = "guided"  # part scores snapped to image edges before the argmax
    slic_segments: int = 800  # refine=slic: superpixels per image
    slic_compactness: float = 10.0  # refine=slic: higher -> squarer superpixels, lower -> closer to colour edges
    guided_radius: int = 32  # refine=guided: window radius in mask pixels (>= the ~half-patch boundary offset)
    guided_eps: float = 0.001  # refine=guided: regulariser; lower -> follows weaker colour edges
    guided_subsample: int = 8  # refine=guided: coefficients on a grid this many times smaller (fast guided filter)
    guided_top: int = 2  # refine=guided: best channels per coarse cell that compete at full size
    n_overlays: int = 16


@dataclass
class RunConfig:
    """Everything a `selflabel label` run needs."""

    data: str = ""
    out: str = "runs/latest"
    seed: int = 0
    ingest: IngestConfig = field(default_factory=IngestConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sela: SelaConfig = field(default_factory=SelaConfig)
    swav: SwavConfig = field(default_factory=SwavConfig)
    neighbors: NeighborsConfig = field(default_factory=NeighborsConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The evaluated field types of a config dataclass (the annotations are strings here)."""
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to the field's declared type (closed sets included), or raise InputError."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise InputError(f"config {where}: null is not allowed")
        tp = next(a for a in args if a is not type(None))
        origin, args = get_origin(tp), get_args(tp)
    if value is None:
        raise InputError(f"config {where}: null is not allowed")
    if origin is Literal:
        if isinstance(value, bool) or str(value) not in args:
            raise InputError(f"config {where}: {value!r} is not allowed (choose {', '.join(args)})")
        return str(value)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError("expected a list")
            return [_scalar(v, args[0]) for v in value]
        return _scalar(value, tp)
    except (TypeError, ValueError) as exc:
        raise InputError(f"config {where}: {value!r} is not valid ({exc})") from None


def _scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in {"1", "true", "yes", "on"}:
            return True
        if str(value).lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true/false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if tp is str:
        return str(value)
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise InputError(f"config {prefix or 'root'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise InputError(f"config: unknown key '{where}' (known: {', '.join(sorted(hints))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


# ----------------------------------------------------------------------------- value checks
# Lower bounds of numeric settings (inclusive). Floats marked "> 0" must be strictly positive.
_AT_LEAST: dict[str, float] = {
    "cluster.iters": 1, "cluster.overcluster": 1, "backbone.batch_size": 1, "backbone.flush_every": 1, "backbone.num_workers": -1,
    "ingest.max_pixels": 1,
    "sela.epochs": 1, "sela.label_updates": 1, "sela.batch_size": 1, "sela.hidden_dim": 1, "sela.finetune_epochs": 0,
    "sela.cpu_threads": 0, "sela.weight_decay": 0, "sela.finetune_lr": 0, "sela.feature_noise": 0,
    "swav.epochs": 1, "swav.batch_size": 1, "swav.sinkhorn_iters": 1, "swav.hidden_dim": 1, "swav.proj_dim": 1,
    "swav.queue_length": 0, "swav.queue_start_epoch": 0, "swav.freeze_prototypes_iters": 0, "swav.finetune_epochs": 0,
    "swav.cpu_threads": 0, "swav.weight_decay": 0, "swav.finetune_lr": 0, "swav.feature_noise": 0, "swav.small_noise": 0,
    "dense.image_size": 16, "dense.shift_stitch": 1, "dense.pca_dim": 0, "dense.k_parts": 2, "dense.epochs": 1,
    "dense.max_patches": 1, "dense.k_parts_seeds": 2, "dense.consensus": 1, "dense.k_parts_sample": 2, "dense.louvain_seeds": 1, "dense.min_area": 0, "dense.mask_size": 0, "dense.n_overlays": 0,
    "dense.edge_threshold": 0,
}
_POSITIVE = ("cluster.eps", "cluster.temperature", "sela.lamb", "sela.lr", "sela.temperature", "sela.init_temperature",
             "swav.lr", "swav.eps", "swav.temperature", "dense.eps", "dense.resolution")
_FRACTION = ("sela.feature_dropout", "swav.feature_dropout", "swav.small_dropout", "dense.fg_threshold", "dense.consensus_cut")  # in [0, 1]


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value against its allowed set or range (the closed sets again, for a config built in
    Python); raises InputError naming the key, the value and what is allowed. Returns `cfg`."""
    def bad(key: str, value: Any, allowed: str) -> InputError:
        return InputError(f"config {key}: {value!r} is not allowed ({allowed})")

    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        for name, tp in _hints(type(obj)).items():
            value = getattr(obj, name)
            tp = next((a for a in get_args(tp) if get_origin(a) is Literal), tp)
            if get_origin(tp) is Literal and value not in get_args(tp):
                raise bad(f"{section.name}.{name}", value, "choose " + ", ".join(get_args(tp)))
    for key, low in _AT_LEAST.items():
        value = _get(cfg, key)
        if value < low:
            raise bad(key, value, f"at least {low:g}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise bad(key, _get(cfg, key), "a number above 0")
    for key in _FRACTION:
        if not 0 <= _get(cfg, key) <= 1:
            raise bad(key, _get(cfg, key), "between 0 and 1")
    c = cfg.cluster
    if c.k is not None and c.k < 2:
        raise bad("cluster.k", c.k, "at least 2; leave it unset to choose K from the data")
    for h in c.heads:
        if h < 2:
            raise bad("cluster.heads", c.heads, "every head's K at least 2")
    if not 0 <= c.min_mass < 1:
        raise bad("cluster.min_mass", c.min_mass, "at least 0 and below 1 (a share of 1/K)")
    if c.prior is not None:
        if not c.prior:
            raise bad("cluster.prior", c.prior, "one positive share per cluster")
        if any(not math.isfinite(p) for p in c.prior):
            raise bad("cluster.prior", c.prior, "finite numbers, no NaN or inf")
        if all(p == 0 for p in c.prior):
            raise bad("cluster.prior", c.prior, "positive cluster shares, not all zero")
        if any(not p > 0 for p in c.prior):
            raise bad("cluster.prior", c.prior, "positive cluster shares")
        if c.k is not None and len(c.prior) != c.k:
            raise bad("cluster.prior", c.prior, f"{c.k} entries, one per cluster (k = {c.k})")
    if not 0 < cfg.dense.fg_mass <= 1:
        raise bad("dense.fg_mass", cfg.dense.fg_mass, "above 0, at most 1")
    crops = cfg.swav.nmb_crops
    if not 1 <= len(crops) <= 2 or crops[0] < 2 or min(crops) < 0:
        raise bad("swav.nmb_crops", crops, "[large, small]: at least 2 large views, small views 0 or more")
    if not 0.5 <= cfg.backbone.crop <= 1.0:
        raise bad("backbone.crop", cfg.backbone.crop, "a share of the short side in [0.5, 1.0]: 0.875 ImageNet's centre crop, 1.0 no margin cut")
    if cfg.backbone.image_size is not None and cfg.backbone.image_size < 16:
        raise bad("backbone.image_size", cfg.backbone.image_size, "at least 16, or null for the backbone's own")
    if not _DEVICE_RE.fullmatch(str(cfg.backbone.device)):
        raise bad("backbone.device", cfg.backbone.device, DEVICES)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict[str, Any]) -> RunConfig:
    """Apply `a.b=value` strings (YAML-parsed values) or a nested dict to `cfg` in place."""
    if isinstance(overrides, dict):
        _apply(cfg, overrides)
        return cfg
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: expected KEY=VALUE, e.g. cluster.k=10")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        nested: dict[str, Any] = {}
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        _apply(cfg, nested)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then dotted overrides; every value checked (`validate`)."""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{p}: not valid YAML ({exc})") from None
        try:
            _apply(cfg, data)
        except InputError as exc:
            raise InputError(f"{p}: {exc}") from None
    if overrides:
        apply_overrides(cfg, overrides)
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a manifest's `config` entry."""
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg
