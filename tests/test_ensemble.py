"""Backbone ensembles (`--backbone a+b`): features of every member, unit-normalised and concatenated."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from selflabel.assign import assign_folder
from selflabel.backbones import create_backbone
from selflabel.cli import app
from selflabel.config import RunConfig
from selflabel.data import ImageRecord, Skipped, scan_folder
from selflabel.ensemble import (BackboneEnsemble, check_backbone_name, combine_blocks, create_feature_source,
                                ensemble_features, same_weights)
from selflabel.errors import InputError
from selflabel.features import FeatureResult, extract_features
from selflabel.pipeline import label_folder
from selflabel.runfiles import read_labels

runner = CliRunner()


def test_combine_blocks_weighs_every_member_the_same():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (50, 4)) * 100 + 7, rng.normal(0, 1, (50, 9)) * 0.01
    out = combine_blocks([a, b], chunk=16)  # several chunks
    assert out.shape == (50, 13) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[:, :4], axis=1) ** 2, 0.5, atol=1e-6)  # half the norm each
    np.testing.assert_allclose(out[:, :4], a / np.linalg.norm(a, axis=1, keepdims=True) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(out[:, 4:], b / np.linalg.norm(b, axis=1, keepdims=True) / np.sqrt(2), atol=1e-6)


@pytest.mark.parametrize("name, kw, words", [
    ("tiny+nope", {}, "'nope' is unknown"),
    ("tiny+tiny", {}, "names a backbone twice"),
    ("tiny+tiny_vit", {"weights": "w.pth"}, "backbone.weights"),
    ("tiny+tiny_vit", {"image_size": 64}, "backbone.image_size"),
    ("nope", {}, r"'nope' is not allowed \(choose "),
])
def test_bad_ensemble_names_are_input_errors(name, kw, words):
    with pytest.raises(InputError, match=words):
        check_backbone_name(name, **kw)


def test_cli_refuses_a_bad_ensemble_and_finetuning_one_before_work(color_folder, tmp_path):
    res = runner.invoke(app, ["label", str(color_folder), "--out", str(tmp_path / "r"), "--backbone", "tiny+nope", "-q"])
    assert res.exit_code == 2 and "'nope' is unknown" in res.output and not (tmp_path / "r").exists()
    res = runner.invoke(app, ["label", str(color_folder), "--out", str(tmp_path / "r"), "--backbone", "tiny+tiny_vit",
                              "--method", "sela", "--finetune", "-q"])
    assert res.exit_code == 2 and "--finetune" in res.output and not (tmp_path / "r").exists()


def test_an_image_one_member_skips_is_left_out():
    recs = [ImageRecord(f"{i}.png", f"{i}.png") for i in range(4)]
    a, b = create_backbone("tiny"), create_backbone("tiny_vit")
    rng = np.random.default_rng(0)

    def extract(records, member):
        if member is a:
            return FeatureResult(rng.normal(0, 1, (4, a.dim)).astype(np.float32), list(records))
        kept = [records[i] for i in (0, 1, 3)]  # this member could not use 2.png
        return FeatureResult(rng.normal(0, 1, (3, b.dim)).astype(np.float32), kept, [Skipped("2.png", "truncated")])

    res = ensemble_features(recs, BackboneEnsemble([a, b]), extract)
    assert [r.id for r in res.records] == ["0.png", "1.png", "3.png"]
    assert [s.path for s in res.skipped] == ["2.png"] and res.features.shape == (3, a.dim + b.dim)


def test_label_and_assign_with_an_ensemble(color_folder, cache_dir, tmp_path):
    cfg = RunConfig(data=str(color_folder), out=str(tmp_path / "run"), seed=0)
    cfg.backbone.name, cfg.backbone.cache_dir, cfg.backbone.num_workers = "tiny+tiny_vit", str(cache_dir), 0
    cfg.cluster.k = 3
    summary = label_folder(cfg, show_progress=False)
    assert summary.n_images == 24
    ens = create_feature_source("tiny+tiny_vit")
    feats = np.load(tmp_path / "run" / "features.npy")
    assert feats.shape == (24, ens.dim)
    # each member's own cached features, unit-normalised, concatenated / sqrt(2): nothing computed twice
    records = scan_folder(color_folder).records
    alone = [extract_features(records, m, cache_dir=cache_dir, num_workers=0, show_progress=False) for m in ens.members]
    assert all(r.n_computed == 0 for r in alone)
    ids = [r.path for r in read_labels(tmp_path / "run")]
    blocks = [res.features[[[r.id for r in res.records].index(i) for i in ids]] for res in alone]
    np.testing.assert_allclose(feats, combine_blocks(blocks), atol=1e-6)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["backbone"]["name"] == "tiny+tiny_vit" and man["backbone"]["dim"] == ens.dim
    assert "+" in man["backbone"]["cache_key"] and same_weights(ens, man["backbone"]["cache_key"])
    assert not same_weights(create_backbone("tiny"), man["backbone"]["cache_key"])
    # three well separated colours: the ensemble's clusters are the colours
    by_colour = {}
    for r in read_labels(tmp_path / "run"):
        by_colour.setdefault(r.path.split("/")[0], set()).add(r.cluster)
    assert all(len(c) == 1 for c in by_colour.values()) and len(set.union(*by_colour.values())) == 3

    # assign the same images again: an image's ensemble feature depends on that image only
    assigned = assign_folder(tmp_path / "run", color_folder, tmp_path / "assigned", cache_dir=cache_dir,
                             show_progress=False)
    assert assigned.n_computed == 0 and assigned.n_images == 24
    again = {r.path: r.cluster for r in read_labels(tmp_path / "assigned")}
    assert again == {r.path: r.cluster for r in read_labels(tmp_path / "run")}
    np.testing.assert_allclose(np.load(tmp_path / "assigned" / "features.npy"), feats, atol=1e-6)
