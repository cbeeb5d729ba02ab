import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from selflabel.cli import app

runner = CliRunner()


def _label(args, cache_dir):
    return runner.invoke(app, ["label", *args, "--backbone", "tiny", "--cache-dir", str(cache_dir), "-q"])


def test_label_writes_run_and_eval_scores(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    (color_folder / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = _label([str(color_folder), "--out", str(out), "--method", "kmeans", "--k", "3", "--seed", "1",
                  "--gt", "folders"], cache_dir)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 24 and set(rows[0]) == {"path", "cluster", "confidence", "gt", "duplicate_of", "outlier"}
    assert all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)
    skipped = list(csv.DictReader(open(out / "skipped.csv")))
    assert [s["path"] for s in skipped] == ["green/broken.jpg"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["seed"] == 1 and man["config"]["cluster"]["k"] == 3
    assert man["backbone"]["name"] == "tiny" and "torch" in man["versions"]
    assert set(man["timings"]) >= {"ingest", "features", "cluster"}
    assert np.load(out / "features.npy").shape == (24, 64)
    ev = runner.invoke(app, ["eval", str(out), "--json"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads(ev.output)["image"]
    assert metrics["accuracy"] == pytest.approx(1.0) and metrics["nmi"] == pytest.approx(1.0)


def test_heads_option_takes_one_or_several_k(color_folder, cache_dir, tmp_path):
    for heads, want in (("2", [2]), ("2,4", [2, 4])):  # a single K once failed as "expected a list"
        out = tmp_path / heads
        res = _label([str(color_folder), "--out", str(out), "--k", "3", "--heads", heads], cache_dir)
        assert res.exit_code == 0, res.output
        assert json.loads((out / "manifest.json").read_text())["config"]["cluster"]["heads"] == want


def test_label_missing_and_empty_folder_exit_2(tmp_path, cache_dir):
    res = _label([str(tmp_path / "nope"), "--out", str(tmp_path / "o")], cache_dir)
    assert res.exit_code == 2 and "no such file" in res.output and "Traceback" not in res.output
    (tmp_path / "empty").mkdir()
    res = _label([str(tmp_path / "empty"), "--out", str(tmp_path / "o")], cache_dir)
    assert res.exit_code == 2 and "no images found" in res.output


def test_bad_config_override_exit_2(color_folder, tmp_path, cache_dir):
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--set", "cluster.kk=3"], cache_dir)
    assert res.exit_code == 2 and "unknown key 'cluster.kk'" in res.output
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--set", "cluster.k=abc"], cache_dir)
    assert res.exit_code == 2 and "cluster.k" in res.output


def test_k_larger_than_images_exit_2(color_folder, tmp_path, cache_dir):
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--k", "500"], cache_dir)
    assert res.exit_code == 2 and "--k 500 is larger than the number of readable images (24)" in res.output
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--k", "0"], cache_dir)
    assert res.exit_code == 2 and "cluster.k: 0" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("prior, words", [
    ("[0.5,0.5]", "3 entries, one per cluster (k = 3)"),
    ("[0.5,-0.2,0.7]", "positive cluster shares"),
    ("[0,0,0]", "not all zero"),
    ("[0.5,.nan,0.5]", "no NaN"),
])
def test_bad_prior_exit_2(color_folder, tmp_path, cache_dir, prior, words):
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--k", "3", "--set", f"cluster.prior={prior}"],
                 cache_dir)
    assert res.exit_code == 2 and "cluster.prior" in res.output and words in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_class_folders_without_gt_flag_are_not_ground_truth(color_folder, cache_dir, tmp_path):
    """No --gt folders: no gt column, no K from the folders; eval asks for ground truth, --gt folders gives it."""
    out = tmp_path / "run"
    res = _label([str(color_folder), "--out", str(out), "--method", "kmeans", "--k", "3"], cache_dir)
    assert res.exit_code == 0, res.output
    columns = set(next(csv.DictReader(open(out / "labels.csv"))))
    assert "gt" not in columns and {"path", "cluster", "confidence"} <= columns
    assert json.loads((out / "manifest.json").read_text())["has_gt"] is False
    res = runner.invoke(app, ["eval", str(out)])
    assert res.exit_code == 2 and "--gt folders" in res.output
    ev = runner.invoke(app, ["eval", str(out), "--gt", "folders", "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["image"]["accuracy"] == pytest.approx(1.0)
    res = runner.invoke(app, ["eval", str(out), "--gt", "names"])
    assert res.exit_code == 2 and "unknown ground-truth source" in res.output
    res = _label([str(color_folder), "--out", str(tmp_path / "o2"), "--gt", "names"], cache_dir)
    assert res.exit_code == 2 and "ingest.gt" in res.output


def test_k_chosen_from_the_data_is_printed_plotted_and_recorded(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["label", str(color_folder), "--out", str(out), "--backbone", "tiny",
                              "--cache-dir", str(cache_dir)])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    sel = man["k_selection"]
    assert man["k"] == sel["k"] == 3  # three colours
    assert "chosen K = 3: highest modularity" in " ".join(res.output.split())
    assert [c["k"] for c in sel["candidates"]][0] == 2 and sel["criterion"].startswith("max modularity")
    assert (out / "k_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(set(r["cluster"] for r in csv.DictReader(open(out / "labels.csv")))) == 3


def test_folder_of_identical_images_gives_one_cluster(tmp_path, cache_dir):
    from conftest import make_image

    for i in range(12):
        make_image(tmp_path / "same" / f"{i}.png", (90, 90, 90), seed=0, noise=0)
    out = tmp_path / "run"
    res = _label([str(tmp_path / "same"), "--out", str(out)], cache_dir)
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["k"] == 1 and "distinct" in man["k_selection"]["reason"]
    assert {r["cluster"] for r in csv.DictReader(open(out / "labels.csv"))} == {"0"}


def test_eval_without_gt_and_not_a_run(tmp_path, cache_dir):
    from conftest import make_image

    for i in range(6):
        make_image(tmp_path / "flat" / f"{i}.png", (i * 40, 0, 0), seed=i)
    out = tmp_path / "run"
    assert _label([str(tmp_path / "flat"), "--out", str(out), "--method", "kmeans", "--k", "2"], cache_dir).exit_code == 0
    res = runner.invoke(app, ["eval", str(out)])
    assert res.exit_code == 2 and "no ground truth" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "not a selflabel run" in res.output


def test_export_csv_and_imagefolder(color_folder, cache_dir, tmp_path):
    out = tmp_path / "run"
    assert _label([str(color_folder), "--out", str(out), "--method", "kmeans", "--k", "3"], cache_dir).exit_code == 0
    res = runner.invoke(app, ["export", str(out), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "exports" / "labels.csv")))
    assert len(rows) == 24 and rows[0]["name"].startswith("cluster_")
    res = runner.invoke(app, ["export", str(out), "--format", "imagefolder", "--out", str(tmp_path / "tree")])
    assert res.exit_code == 0, res.output
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(tmp_path / "tree"))
    assert len(ds) == 24 and len(ds.classes) == 3
    res = runner.invoke(app, ["export", str(out), "--format", "parquet"])
    assert res.exit_code == 2 and "unknown export format" in res.output


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "selflabel", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "label" in proc.stdout and "export" in proc.stdout


@pytest.mark.parametrize("flags,message", [
    (["--k", "0"], "config cluster.k: 0 is not allowed (at least 2; leave it unset to choose K from the data)"),
    (["--method", "kmeansx"], "config cluster.method: 'kmeansx' is not allowed (choose sinkhorn, sela, swav, kmeans, neighbors)"),
    (["--amp", "fp16"], "config backbone.amp: 'fp16' is not allowed (choose auto, bf16, fp32)"),
    (["--engine", "tensorrt"], "config backbone.engine: 'tensorrt' is not allowed (choose auto, openvino, onnxruntime, torch)"),
    (["--device", "gpu"], "config backbone.device: 'gpu' is not allowed (auto | cpu | cuda | cuda:N)"),
    (["--set", "swav.final_assign=nearest"], "config swav.final_assign: 'nearest' is not allowed (choose argmax, sinkhorn)"),
    (["--set", "swav.nmb_crops=[1]"], "config swav.nmb_crops: [1] is not allowed"),
    (["--backbone", "resnet9000"], "config backbone.name: 'resnet9000' is not allowed (choose "),
])
def test_bad_option_exits_2_before_any_work(color_folder, tmp_path, cache_dir, flags, message):
    res = runner.invoke(app, ["label", str(color_folder), "--out", str(tmp_path / "o"), "--cache-dir", str(cache_dir),
                              "-q", *flags])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not cache_dir.exists() and not (tmp_path / "o").exists()  # nothing read, nothing written


def test_cuda_without_a_gpu_is_a_clear_error(color_folder, tmp_path, cache_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = _label([str(color_folder), "--out", str(tmp_path / "o"), "--device", "cuda:1"], cache_dir)
    assert res.exit_code == 2 and "config backbone.device: 'cuda:1' is not available (0 CUDA device(s) visible)" in res.output


def test_help_lists_the_choices():
    res = runner.invoke(app, ["label", "--help"], terminal_width=200)
    for choices in ("sinkhorn | sela | swav | kmeans", "auto | bf16 | fp32", "auto | cpu | cuda | cuda:N"):
        assert choices in res.output
