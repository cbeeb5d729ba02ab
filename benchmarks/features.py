"""Feature extraction: the whole pipeline vs the bare model forward.

Question: how close does `selflabel.features.extract_features` (hash, decode, resize, batch,
forward, cache write; fresh cache) get to the model alone running on random tensors of the same
shape? Goal: at least 0.8x. Each pipeline run is bracketed by a bare-forward run before and after
it, and the ratio is taken against their mean, so the slow drift of a shared machine cancels.
Then: what decoding costs for real photo sizes (imagenette ships 224 px JPEGs), with and without
JPEG draft decoding (which the library uses), and (when a ratio misses the goal) DataLoader workers vs torch threads.

    python -m benchmarks.features [--quick] [--n 256] [--rounds 2] [--device auto] [--workers-table always]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `selflabel` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from benchmarks.common import markdown_table, shared_data, write_result
from selflabel.backbones import Backbone, create_backbone
from selflabel.data import ImageRecord, load_rgb, scan_folder
from selflabel.features import autocast_dtype, extract_features, resolve_device

BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
QUICK_BACKBONES = ("tiny_vit",)
AMPS = ("fp32", "bf16")
GOAL = 0.8


def stratified(records: Sequence[ImageRecord], n: int | None) -> list[ImageRecord]:
    """The first n records taken round-robin over ground-truth classes (deterministic, balanced)."""
    if n is None or n >= len(records):
        return list(records)
    by_class: dict[str | None, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_class[r.gt].append(r)
    groups = [by_class[c] for c in sorted(by_class, key=str)]
    out: list[ImageRecord] = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out[:n]


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers), user + system."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def bare_forward_rate(backbone: Backbone, *, batch_size: int, n_batches: int, amp: str, device: torch.device,
                      with_cpu: bool = False):
    """Images/s of the model alone on a random batch already on the device (one warm-up batch);
    with `with_cpu`, (images per wall second, images per CPU second)."""
    dtype = autocast_dtype(amp, device)
    model = backbone.to(device).eval()
    x = torch.randn(batch_size, 3, backbone.image_size, backbone.image_size, device=device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x)
        _sync(device)
        t, c = time.perf_counter(), cpu_seconds()
        for _ in range(n_batches):
            model(x)
        _sync(device)
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    n = batch_size * n_batches
    return (n / wall, n / cpu) if with_cpu else n / wall


def pipeline_rate(records: Sequence[ImageRecord], backbone: Backbone, *, batch_size: int, amp: str,
                  device: torch.device, num_workers: int = -1) -> tuple[float, dict[str, float]]:
    """Images/s of extract_features on `records` with a fresh (empty) cache, and its own split plus
    'cpu_rate' (images per CPU second of this process and its DataLoader workers)."""
    with tempfile.TemporaryDirectory(prefix="selflabel-bench-cache-") as cache:
        t, c = time.perf_counter(), cpu_seconds()
        res = extract_features(records, backbone, batch_size=batch_size, num_workers=num_workers, device=device,
                               amp=amp, cache_dir=cache, show_progress=False)
        _sync(device)
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    if res.n_computed != len(records):
        raise RuntimeError(f"expected {len(records)} computed features, got {res.n_computed} ({len(res.skipped)} skipped)")
    return len(records) / wall, {**res.seconds, "cpu_rate": len(records) / cpu}


def bracketed(records, backbone, *, batch_size: int, amp: str, device: torch.device, bare_batches: int,
              num_workers: int = -1) -> dict[str, float]:
    """bare, pipeline, bare: the pipeline rate against the better of the two bare rates around it
    (other load only ever slows a run down, so the faster bare run is the cleaner one)."""
    (b1, c1) = bare_forward_rate(backbone, batch_size=batch_size, n_batches=bare_batches, amp=amp, device=device, with_cpu=True)
    p, split = pipeline_rate(records, backbone, batch_size=batch_size, amp=amp, device=device, num_workers=num_workers)
    (b2, c2) = bare_forward_rate(backbone, batch_size=batch_size, n_batches=bare_batches, amp=amp, device=device, with_cpu=True)
    bare, bare_cpu, pipe_cpu = max(b1, b2), max(c1, c2), split.pop("cpu_rate")
    return {"bare": bare, "bare_cpu": bare_cpu, "bare_spread": abs(b1 - b2) / bare, "pipeline": p, "pipeline_cpu": pipe_cpu,
            "ratio": p / bare, "cpu_ratio": pipe_cpu / bare_cpu, **split}


def rounds(n_rounds: int, records, backbone, **kw) -> dict[str, float]:
    """`n_rounds` bracketed measurements: best pipeline rate over best bare rate (best of each side),
    the range of the per-round ratios, and the median of the pipeline's own time split."""
    rs = [bracketed(records, backbone, **kw) for _ in range(n_rounds)]
    out = {k: statistics.median(r[k] for r in rs) for k in ("hash", "forward", "gather")}
    for k in ("bare", "bare_cpu", "pipeline", "pipeline_cpu", "bare_spread"):
        out[k] = max(r[k] for r in rs)
    out["ratio"], out["cpu_ratio"] = out["pipeline"] / out["bare"], out["pipeline_cpu"] / out["bare_cpu"]
    out["ratio_lo"], out["ratio_hi"] = min(r["ratio"] for r in rs), max(r["ratio"] for r in rs)
    return out


def default_workers(device: torch.device) -> int:
    """What extract_features uses for num_workers=-1 on `device` (the library's own function)."""
    from selflabel.features import default_num_workers

    return default_num_workers(device)


def library_amp(device: torch.device) -> str:
    """The precision the library's amp='auto' picks on `device`."""
    return "bf16" if autocast_dtype("auto", device) is not None else "fp32"


def _log(msg: str) -> None:
    print(f"[features] {msg}", file=sys.stderr, flush=True)


# --- decode cost with and without JPEG draft decoding ----------------------------------------

def load_rgb_full(path, **kw):
    """`selflabel.data.load_rgb` with draft decoding turned off: full-size decode, then resize."""
    kw["draft_size"] = None
    return load_rgb(path, **kw)


def make_photos(records: Sequence[ImageRecord], size: tuple[int, int], dst: Path) -> list[ImageRecord]:
    """JPEG copies (quality 90) of `records` resized to `size`, standing in for camera photos."""
    out = []
    for r in records:
        p = dst / f"{size[0]}x{size[1]}" / r.id
        p.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(r.path) as im:
            im.convert("RGB").resize(size, Image.BICUBIC).save(p, format="JPEG", quality=90)
        out.append(ImageRecord(r.id, p, r.gt))
    return out


def decode_ms(records: Sequence[ImageRecord], backbone: Backbone) -> tuple[float, float]:
    """ms per image of decode + the backbone's transform on one thread (what one worker does):
    (full decode, draft decode as the library does), passes alternating, best of three each."""
    tf = backbone.transform
    short = backbone.decode_size()
    loaders = (load_rgb, lambda p: load_rgb(p, draft_size=short))
    best = [float("inf")] * 2
    with torch_threads(1):
        for load in loaders:
            tf(load(records[0].path))
        for _ in range(3):  # other load only ever adds time
            for i, load in enumerate(loaders):
                t = time.perf_counter()
                for r in records:
                    tf(load(r.path))
                best[i] = min(best[i], time.perf_counter() - t)
    return best[0] / len(records) * 1000, best[1] / len(records) * 1000


@contextmanager
def full_decoding():
    """Turn the library's JPEG draft decoding off (DataLoader workers fork and inherit the swap)."""
    import selflabel.data as data

    data.load_rgb = load_rgb_full
    try:
        yield
    finally:
        data.load_rgb = load_rgb


def photos_section(records, backbone_name: str, bs: int, device: torch.device, bare_batches: int, n_photos: int,
                   n_rounds: int) -> str:
    """Decode cost by photo size, and the pipeline on 12 MP photos with and without draft decoding."""
    bb = create_backbone(backbone_name)
    amp = library_amp(device)
    bare = bare_forward_rate(bb, batch_size=bs, n_batches=bare_batches, amp=amp, device=device)
    fwd_ms = 1000 / bare
    sizes = [("imagenette as shipped (224x224; draft is a no-op)", None), ("1024x768 (0.8 MP)", (1024, 768)),
             ("4032x3024 (12 MP phone photo)", (4032, 3024))]
    rows, photos12 = [], None
    with tempfile.TemporaryDirectory(prefix="selflabel-bench-photos-") as tmp:
        for label, size in sizes:
            recs = list(records[:32]) if size is None else make_photos(records[:32], size, Path(tmp))
            lib, dra = decode_ms(recs, bb)
            rows.append([label, f"{lib:.1f}", f"{dra:.1f}", f"{lib / dra:.1f}x", f"{lib / fwd_ms:.2f}", f"{dra / fwd_ms:.2f}",
                         f"{expected_ratio(fwd_ms, lib, device):.2f} / {expected_ratio(fwd_ms, dra, device):.2f}"])
            _log(f"decode {label}: {lib:.1f} ms library, {dra:.1f} ms draft")
        photos12 = make_photos(records[:n_photos], (4032, 3024), Path(tmp))
        with full_decoding():
            lib_r = rounds(n_rounds, photos12, bb, batch_size=bs, amp=amp, device=device, bare_batches=bare_batches)
        _log(f"12 MP pipeline, full decode: {lib_r['ratio']:.2f}x")
        dra_r = rounds(n_rounds, photos12, bb, batch_size=bs, amp=amp, device=device, bare_batches=bare_batches)
        _log(f"12 MP pipeline with draft: {dra_r['ratio']:.2f}x")
    prow = [[name, f"{r['bare']:.1f}", f"{r['pipeline']:.1f}", f"**{r['ratio']:.2f}x**", f"{r['cpu_ratio']:.2f}x",
             f"{r['hash']:.2f} / {r['forward']:.2f}"]
            for name, r in (("full decode, then resize (draft off)", lib_r),
                            ("library as shipped (JPEG draft decoding)", dra_r))]
    return "\n".join([
        f"### Decode cost by photo size ({backbone_name} {amp}, {os.cpu_count()} CPU cores)",
        "",
        "Imagenette ships 224 px JPEGs, which decode in about a millisecond; real photo folders do not. "
        "The same 32 photos re-encoded larger (JPEG q90), decoded + resized + normalised on one thread (best of 3), "
        f"against the bare forward at {bare:.1f} img/s ({fwd_ms:.0f} ms/img). 'expected' is what the pipeline can "
        "reach at best: " + ("on a CPU the forward's torch threads and the decoding workers share the same cores, "
        "so decode CPU time adds to the forward's: T f / (T f + d), with T torch threads, f forward ms/img, d decode ms/img."
        if device.type == "cpu" else
        f"on a GPU the {default_workers(device)} workers decode in parallel with the forward: min(1, W f / d)."),
        "",
        markdown_table(["images", "decode ms/img (full)", "decode ms/img (draft)", "draft speed-up",
                        "decode / forward (full)", "decode / forward (draft)", "expected pipeline / bare (full / draft)"], rows),
        "",
        f"Pipeline vs bare on {len(photos12)} such 12 MP photos ({n_rounds} bracketed round(s) as above, workers {default_workers(device)}; "
        "the full-decode row turns the library's draft decoding off). "
        f"A DataLoader worker builds a whole batch, so each of the first {default_workers(device)} batches of {bs} images is "
        "decoded by one worker alone before the first forward: on a run this short that start-up weighs, and the "
        "ratios stay below the steady-state 'expected' column above.",
        "",
        markdown_table(["decode", "bare img/s", "pipeline img/s", "pipeline / bare", "same, per CPU second",
                        "pipeline s: hash / decode+forward"], prow),
    ])


def expected_ratio(forward_ms: float, decode_ms: float, device: torch.device) -> float:
    """Best pipeline / bare ratio given per-image forward and (one-thread) decode times."""
    if device.type == "cpu":
        cpu_forward = forward_ms * torch.get_num_threads()  # core-ms per image the forward uses
        return cpu_forward / (cpu_forward + decode_ms)
    return min(1.0, default_workers(device) * forward_ms / decode_ms)


def workers_section(records, backbone_name: str, bs: int, device: torch.device, bare_batches: int) -> str:
    """DataLoader workers vs torch threads on this machine's cores."""
    bb = create_backbone(backbone_name)
    amp = library_amp(device)
    sub = records[: max(bs * 4, len(records) // 2)]
    cores = os.cpu_count() or 1
    variants = [("library default", -1, None), ("workers=0 (decode in the main process)", 0, None), ("workers=1", 1, None)]
    if cores > 1:
        t = max(1, cores - 1)
        variants += [(f"workers={default_workers(device)}, torch threads {t}", -1, t), (f"workers=1, torch threads {t}", 1, t)]
    rows = []
    for label, workers, threads in variants:
        with torch_threads(threads):
            r = bracketed(sub, bb, batch_size=bs, amp=amp, device=device, bare_batches=bare_batches, num_workers=workers)
            rows.append([label, default_workers(device) if workers < 0 else workers, torch.get_num_threads(),
                         f"{r['bare']:.1f}", f"{r['pipeline']:.1f}", f"**{r['ratio']:.2f}x**", f"{r['cpu_ratio']:.2f}x"])
        _log(f"variant {label}: {r['ratio']:.2f}x")
    return "\n".join([
        f"### DataLoader workers vs torch threads ({backbone_name} {amp}, {len(sub)} images, {cores} CPU cores)",
        "",
        "Each row is its own bracketed measurement (bare, pipeline, bare) under its own thread setting; compare the ratios.",
        "",
        markdown_table(["variant", "DataLoader workers", "torch threads", "bare img/s", "pipeline img/s", "pipeline / bare",
                        "same, per CPU second"], rows),
    ])


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.features", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny_vit only, 128 images, one round, no photo/worker sections")
    ap.add_argument("--n", type=int, default=None, help="images of imagenette-val per round (default 256, quick 128)")
    ap.add_argument("--rounds", type=int, default=None, help="bracketed measurements per row (default 2, quick 1)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    ap.add_argument("--backbones", nargs="+", default=None, help=f"default {' '.join(BACKBONES)}")
    ap.add_argument("--photos", type=int, default=128, help="12 MP photos for the decode section (0: skip it)")
    ap.add_argument("--workers-table", choices=("auto", "always", "never"), default="auto",
                    help="vary DataLoader workers / torch threads (auto: when a median ratio misses the goal)")
    args = ap.parse_args(argv)
    n = args.n or (128 if args.quick else 256)
    n_rounds = args.rounds or (1 if args.quick else 2)
    backbones = args.backbones or (QUICK_BACKBONES if args.quick else BACKBONES)
    device = resolve_device(args.device)
    bs = args.batch_size
    bare_batches = 1 if device.type == "cpu" else 20

    records = stratified(scan_folder(shared_data("imagenette-val"), gt="folders").records, n)
    rows, missed = [], []
    for name in backbones:
        bb = create_backbone(name)
        for amp in AMPS:
            r = rounds(n_rounds, records, bb, batch_size=bs, amp=amp, device=device, bare_batches=bare_batches)
            _log(f"{name} {amp}: bare {r['bare']:.1f} img/s, pipeline {r['pipeline']:.1f} img/s, ratio {r['ratio']:.2f}")
            if r["ratio"] < GOAL:
                missed.append(f"{name} {amp}")
            spread = "" if n_rounds == 1 else f" ({r['ratio_lo']:.2f}-{r['ratio_hi']:.2f})"
            rows.append([name, amp, f"{r['bare']:.1f}", f"{r['bare_spread']:.0%}", f"{r['pipeline']:.1f}",
                         f"**{r['ratio']:.2f}x**{spread}", "yes" if r["ratio"] >= GOAL else "no", f"{r['cpu_ratio']:.2f}x",
                         f"{r['hash']:.2f} / {r['forward']:.2f} / {r['gather']:.2f}"])
    headers = ["backbone", "amp", "bare forward img/s", "bare drift", "pipeline img/s",
               "pipeline / bare" + ("" if n_rounds == 1 else " (range)"), f">= {GOAL}x", "same, per CPU second",
               "pipeline s: hash / decode+forward / gather"]
    parts = [
        "## Feature extraction: pipeline vs bare model" + (" (quick)" if args.quick else ""),
        "",
        f"{len(records)} imagenette-val images (224 px JPEGs) per round, {n_rounds} round(s); "
        f"device {device}, batch {bs}, DataLoader workers {default_workers(device)} (library default), torch threads "
        f"{torch.get_num_threads()}. Pipeline = `extract_features` with a fresh temporary cache (hash + decode + "
        "resize + forward + cache write). Bare = the same model on a random tensor already on the device, "
        f"{bare_batches} batch(es) right before and right after each pipeline run. The ratio is the best pipeline rate "
        "over the best bare rate (other load only ever slows a run down); '(range)' = the per-round ratios; "
        "'bare drift' = how much the two bare runs of a round "
        "differed (the machine's noise: other processes share these cores). 'Per CPU second' compares images per "
        "CPU second (this process plus its DataLoader workers) instead of per wall second: less sensitive to "
        "other load, but it also counts the threads' spin-waiting.",
        "",
        markdown_table(headers, rows),
    ]
    if "tiny_vit" in backbones:
        parts += ["", "tiny_vit is a random-init test model at 64 px: its forward outruns JPEG decoding and the "
                  "DataLoader start-up, so its row checks the harness, not the goal."]
    if not args.quick and args.photos > 0:
        parts += ["", photos_section(records, backbones[0], bs, device, bare_batches, args.photos, n_rounds)]
    if args.workers_table == "always" or (args.workers_table == "auto" and missed and not args.quick):
        parts += ["", workers_section(records, backbones[0], bs, device, bare_batches)]
    text = "\n".join(parts) + "\n"
    write_result("features" + ("-quick" if args.quick else ""), text)
    return text


if __name__ == "__main__":
    main()
