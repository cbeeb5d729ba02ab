"""Command line: thin commands over the library. Errors become one line and an exit code."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import AMPS, DEVICES, ENGINES, METHODS, apply_overrides, load_config, validate
from .errors import STORAGE_ERRNOS, SelflabelError, storage_error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Label an unannotated image folder: features, balanced pseudo-labels, review, export.")
console = Console()
err_console = Console(stderr=True)


def _fail(exc: SelflabelError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _errors_as_lines():
    """A typed error, or a full disk / unwritable folder met anywhere below, becomes one line and its exit code."""
    try:
        yield
    except SelflabelError as exc:
        _fail(exc)
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        _fail(storage_error(exc))


METHOD_HELP = " | ".join(METHODS)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def label(
    data: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to write.")] = Path("runs/latest"),
    k: Annotated[Optional[int], typer.Option(help="Number of clusters, at least 2 (default: chosen from the data, "
                                             "see k_selection.png; folder names never set it).")] = None,
    method: Annotated[Optional[str], typer.Option(help=f"{METHOD_HELP} (default neighbors).")] = None,
    heads: Annotated[Optional[str], typer.Option(help="Extra heads, e.g. 10,50,100 (SeLa hierarchy).")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="Train the backbone end to end (SeLa/SwAV).")] = False,
    dense: Annotated[bool, typer.Option("--dense", help="Also find dense object concepts (Leopart) with masks and COCO.")] = False,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone name, or several joined by '+' (see `selflabel backbones`).")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Local weights file for the backbone.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: --set sela.epochs=10")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Feature extraction batch size.")] = None,
    device: Annotated[Optional[str], typer.Option(help=DEVICES)] = None,
    amp: Annotated[Optional[str], typer.Option(help=" | ".join(AMPS))] = None,
    engine: Annotated[Optional[str], typer.Option(help=" | ".join(ENGINES) + " (CPU inference engine)")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default ~/.cache/selflabel).")] = None,
    gt_csv: Annotated[Optional[Path], typer.Option(help="Ground truth CSV (path,label) for `eval`.")] = None,
    gt: Annotated[Optional[str], typer.Option("--gt", help="folders: the first-level folder names are ground truth "
                                              "(for `eval`; never used to set K). Default: none.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run --out holds (its review edits are moved "
                                            "to previous-review-<time>/). Without it, the same command resumes and a "
                                            "different configuration is refused.")] = False,
) -> None:
    """Label every image under DATA and write labels.csv, manifest.json and features to --out."""
    from .pipeline import label_folder

    _setup_logging(verbose)
    with _errors_as_lines():
        cfg = load_config(config, set_ or [])
        # the flags given on the command line, over the config; the config's own parsing checks them
        flags = {"data": data, "out": out, "seed": seed,
                 "cluster": {"k": k, "method": method, "heads": heads, "finetune": finetune or None},
                 "dense": {"enabled": dense or None},
                 "backbone": {"name": backbone, "weights": weights, "batch_size": batch_size, "device": device,
                              "amp": amp, "engine": engine, "cache_dir": cache_dir},
                 "ingest": {"gt_csv": gt_csv, "gt": gt}}
        validate(apply_overrides(cfg, _given(flags)))
        summary = label_folder(cfg, show_progress=not quiet, overwrite=overwrite)
    if not quiet:
        _print_summary(summary)


def _given(flags: dict) -> dict:
    """`flags` without the options left unset (None), sections that end up empty dropped."""
    out = {}
    for key, val in flags.items():
        if isinstance(val, dict):
            val = _given(val)
        if val is not None and val != {}:
            out[key] = val
    return out


def _print_summary(s) -> None:
    if s.k_selection:
        console.print(f"chosen {s.k_selection['reason']} (plot: {s.out / 'k_selection.png'}; --k N forces N)")
    t = Table(title=f"selflabel: {s.n_images} images -> {s.k} clusters ({s.out})")
    t.add_column("cluster", justify="right")
    t.add_column("images", justify="right")
    t.add_column("share", justify="right")
    for c, n in sorted(s.cluster_sizes.items(), key=lambda kv: -kv[1])[:30]:
        t.add_row(str(c), str(n), f"{n / max(s.n_images, 1):.1%}")
    if len(s.cluster_sizes) > 30:
        t.add_row("...", f"{len(s.cluster_sizes) - 30} more", "")
    console.print(t)
    st = Table(title="time per stage")
    st.add_column("stage")
    st.add_column("seconds", justify="right")
    for stage, sec in s.timings.items():
        st.add_row(stage, f"{sec:.2f}")
    st.add_row("[bold]total", f"[bold]{sum(s.timings.values()):.2f}")
    console.print(st)
    console.print(f"features: {s.n_computed} computed, {s.n_cached} from cache; skipped files: {s.n_skipped}"
                  + (f" (see {s.out / 'skipped.csv'})" if s.n_skipped else ""))
    if s.dense:
        console.print(f"dense: {json.dumps({k: v for k, v in s.dense.items() if not isinstance(v, (dict, list))})}")


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder written by `selflabel label`.")],
    gt_csv: Annotated[Optional[Path], typer.Option(help="Ground truth CSV with columns path,label.")] = None,
    gt: Annotated[Optional[str], typer.Option("--gt", help="folders: score against the first-level folder names "
                                              "of the image paths.")] = None,
    reviewed: Annotated[bool, typer.Option("--reviewed", help="Score the labels after review edits.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """NMI, ARI and Hungarian accuracy (and mIoU for dense runs) against ground truth."""
    from .evaluate import evaluate_run

    with _errors_as_lines():
        res = evaluate_run(run, str(gt_csv) if gt_csv else None, reviewed=reviewed, gt=gt)
    if as_json:
        print(json.dumps(res, indent=2, default=float))
        return
    t = Table(title=f"evaluation of {run}")
    for col in ("labels", "NMI", "ARI", "accuracy"):
        t.add_column(col, justify="right")
    if "image" in res:
        m = res["image"]
        t.add_row(f"main (k={res['k']})", f"{m['nmi']:.4f}", f"{m['ari']:.4f}", f"{m['accuracy']:.4f}")
        for h, m in res.get("heads", {}).items():
            t.add_row(f"head k={h}", f"{m['nmi']:.4f}", f"{m['ari']:.4f}", f"{m['accuracy']:.4f}")
        console.print(t)
    if "dense" in res:
        console.print_json(json.dumps(res["dense"], default=float))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder.")],
    format: Annotated[str, typer.Option("--format", "-f", help="csv | imagefolder | coco | labelstudio | yolo-cls | yolo-seg | hf")] = "csv",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Target file/folder (default: RUN/exports/...).")] = None,
    include_rejected: Annotated[bool, typer.Option(help="CSV: keep images rejected in review.")] = False,
    mode: Annotated[str, typer.Option(help="Folder formats: copy | hardlink | symlink")] = "copy",
    names: Annotated[str, typer.Option(help="reviewed | suggested (clusters not renamed take their suggested name)")] = "reviewed",
    url_prefix: Annotated[Optional[str], typer.Option(help="labelstudio: URL the images are served under (default: Label Studio's local files).")] = None,
    val_fraction: Annotated[float, typer.Option(help="yolo: share of each class put in val/.")] = 0.2,
    vocab: Annotated[Optional[Path], typer.Option(help="Words file (one per line): zero-shot suggested names with open_clip.")] = None,
    duplicates: Annotated[bool, typer.Option("--duplicates/--no-duplicates", help="--no-duplicates: leave out near-duplicate copies (labels.csv duplicate_of), one image of each group kept.")] = True,
) -> None:
    """Export labels (with review edits) as CSV, ImageFolder, COCO, Label Studio, YOLO or Hugging Face imagefolder."""
    from .export import export_run

    with _errors_as_lines():
        target, n = export_run(run, format, out, include_rejected=include_rejected, mode=mode, names=names,
                               url_prefix=url_prefix, val_fraction=val_fraction, vocab=vocab,
                               include_duplicates=duplicates)
    console.print(f"exported {n} images as {format} to {target}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/demo"),
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "neighbors",
    k: Annotated[Optional[int], typer.Option(help="Clusters (the sample holds 10 ImageNet classes).")] = 10,
    choose_k: Annotated[bool, typer.Option("--choose-k", help="Choose K from the data instead of 10.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run --out holds (see `label --help`).")] = False,
) -> None:
    """Label the small sample of real photos shipped in the package (10 classes, 10 photos each; or K
    chosen from the data with --choose-k), then evaluate against its class folders (offline)."""
    from .sample import sample_dir

    label(sample_dir(), out=out, method=method, k=None if choose_k else k, overwrite=overwrite, gt="folders")
    eval_(out, gt_csv=None, gt="folders", reviewed=False, as_json=False)


@app.command()
def segment(
    data: Annotated[Path, typer.Argument(help="Folder of images.")],
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/latest"),
    backbone: Annotated[Optional[str], typer.Option()] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or table.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run --out holds (see `label --help`).")] = False,
) -> None:
    """Same as `label --dense`: image labels plus dense object concepts, masks and COCO."""
    label(data, out=out, dense=True, backbone=backbone, config=config, set_=set_, quiet=quiet, overwrite=overwrite)


@app.command("app")
def app_(
    run: Annotated[Path, typer.Argument(help="Run folder to review.")],
    host: Annotated[str, typer.Option(help="Address to listen on. Beyond loopback the app asks for an access token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    token: Annotated[Optional[str], typer.Option(envvar="SELFLABEL_TOKEN", help=(
        "Access token the app asks for (at least 16 characters). Default: none on loopback, "
        "a fresh random one printed at start on any other address."))] = None,
) -> None:
    """Open the review app (Streamlit) on a run. The process becomes the server: Ctrl-C or SIGTERM stops it."""
    from .review.launch import access_token, launch

    try:
        raise typer.Exit(launch(run, host=host, port=port, token=access_token(host, token),
                                announce=lambda url: console.print(f"review app: {url}", highlight=False, soft_wrap=True)))
    except SelflabelError as exc:
        _fail(exc)


@app.command()
def assign(
    run: Annotated[Path, typer.Argument(help="Reviewed run folder (its clusters, names and rejections are used).")],
    data: Annotated[Path, typer.Argument(help="Folder of new images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New run folder to write (the review app opens it).")],
    unsure_quantile: Annotated[float, typer.Option(help="Unsure below this quantile of a cluster's own members (cosine or margin).")] = 0.05,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: the run's).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N (default: the run's)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")] = False,
) -> None:
    """Label images added later with a reviewed run's clusters (through its stored geometry)."""
    from .assign import assign_folder

    try:
        s = assign_folder(run, data, out, unsure_quantile=unsure_quantile, cache_dir=cache_dir, device=device,
                          show_progress=not quiet)
    except SelflabelError as exc:
        _fail(exc)
        return
    if not quiet:
        console.print(f"assigned {s.n_images} images to {len(s.cluster_sizes)} clusters of {run} -> {s.out}: "
                      f"{s.n_unsure} unsure, {s.n_rejected} in rejected clusters, {s.n_skipped} skipped; "
                      f"features {s.n_computed} computed, {s.n_cached} from cache")


@app.command()
def backbones() -> None:
    """List the available backbones."""
    from .backbones import DEFAULT_BACKBONE, list_backbones

    for name, desc in list_backbones().items():
        console.print(f"{name:20s} {desc}" + ("  [bold](default)" if name == DEFAULT_BACKBONE else ""))
    console.print("several joined by '+' (e.g. mobilenet_v2+efficientnet_lite2): each image's features from every "
                  "member, unit-normalised and concatenated")


@app.command()
def bench(quick: Annotated[bool, typer.Option("--quick", help="A two-minute pass.")] = False) -> None:
    """Run every benchmark in benchmarks/ (from a source checkout) and write benchmarks/results/."""
    import runpy

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        _fail(SelflabelError("benchmarks/ not found: run `selflabel bench` from a source checkout"))
    sys.path.insert(0, str(root))
    sys.argv = ["benchmarks"] + (["--quick"] if quick else [])
    runpy.run_module("benchmarks", run_name="__main__")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
