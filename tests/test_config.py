from pathlib import Path

import pytest

from selflabel.config import RunConfig, from_dict, load_config, to_dict
from selflabel.errors import InputError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_default_yaml_mirrors_dataclass_defaults():
    cfg = load_config(CONFIGS / "default.yaml")
    d, ref = to_dict(cfg), to_dict(RunConfig())
    for section in ("ingest", "backbone", "cluster", "neighbors"):
        assert d[section] == ref[section]


def test_overrides_precedence_and_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\ncluster:\n  k: 7\n  heads: [10, 20]\n")
    cfg = load_config(y, ["cluster.k=2", "backbone.amp=fp32", "cluster.prior=[0.5, 0.5]"])
    assert (cfg.seed, cfg.cluster.k, cfg.cluster.heads, cfg.backbone.amp) == (3, 2, [10, 20], "fp32")
    assert cfg.cluster.prior == [0.5, 0.5]
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "text,match",
    [
        ("cluster: [1, 2]\n", "expected a mapping"),
        ("cluster:\n  k: 2.5\n", "cluster.k"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("cluster:\n  finetune: maybe\n", "cluster.finetune"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_config_gives_clear_error(tmp_path, text, match):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(InputError, match=match) as ei:
        load_config(y)
    assert str(ei.value).startswith(str(y))  # the message names the file


# every enumerated setting is a closed set, every number a range: (override, key, value, allowed) in the message
BAD_VALUES = [
    ("backbone.amp=fp16", "backbone.amp", "'fp16'", "auto, bf16, fp32"),
    ("cluster.method=kmeansx", "cluster.method", "'kmeansx'", "sinkhorn, sela, swav, kmeans"),
    ("sela.final_assign=balanced", "sela.final_assign", "'balanced'", "argmax, sinkhorn"),
    ("swav.final_assign=balanced", "swav.final_assign", "'balanced'", "argmax, sinkhorn"),
    ("sela.head=conv", "sela.head", "'conv'", "cosine, linear, mlp"),
    ("sela.init=kmeans", "sela.init", "'kmeans'", "sinkhorn, kmeans++, random"),
    ("dense.louvain=leiden", "dense.louvain", "'leiden'", "networkx, python-louvain"),
    ("backbone.device=gpu", "backbone.device", "'gpu'", "auto | cpu | cuda | cuda:N"),
    ("cluster.k=0", "cluster.k", "0", "at least 2; leave it unset"),
    ("cluster.k=1", "cluster.k", "1", "at least 2"),
    ("cluster.iters=0", "cluster.iters", "0", "at least 1"),
    ("cluster.heads=[10,1]", "cluster.heads", "[10, 1]", "at least 2"),
    ("cluster.eps=0", "cluster.eps", "0.0", "above 0"),
    ("sela.epochs=0", "sela.epochs", "0", "at least 1"),
    ("sela.lamb=-1", "sela.lamb", "-1.0", "above 0"),
    ("swav.nmb_crops=[1,4]", "swav.nmb_crops", "[1, 4]", "at least 2 large views"),
    ("swav.sinkhorn_iters=0", "swav.sinkhorn_iters", "0", "at least 1"),
    ("sela.feature_dropout=1.5", "sela.feature_dropout", "1.5", "between 0 and 1"),
    ("dense.k_parts=1", "dense.k_parts", "1", "at least 2"),
]


@pytest.mark.parametrize("override,key,value,allowed", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_setting_is_checked_at_load_time(override, key, value, allowed):
    with pytest.raises(InputError) as ei:
        load_config(None, [override])
    msg = str(ei.value)
    assert f"config {key}: {value} is not allowed" in msg and allowed in msg, msg


def test_prior_length_must_match_k():
    with pytest.raises(InputError, match=r"cluster.prior: \[0.5, 0.5\] is not allowed \(3 entries"):
        load_config(None, ["cluster.k=3", "cluster.prior=[0.5, 0.5]"])
    with pytest.raises(InputError, match="positive"):
        load_config(None, ["cluster.prior=[1, 0]"])


def test_closed_sets_come_from_the_config_types():
    from typing import get_args

    from selflabel import config

    assert config.METHODS == get_args(config.Method) == ("sinkhorn", "sela", "swav", "kmeans", "neighbors")
    from selflabel.methods import list_methods
    assert set(list_methods()) == set(config.METHODS)  # the registry and the closed set agree
    assert config.AMPS == ("auto", "bf16", "fp32")
    for ok in ("cuda", "cuda:1", "cpu", "auto"):
        assert load_config(None, [f"backbone.device={ok}"]).backbone.device == ok


def test_validate_catches_a_config_built_in_python():
    from selflabel.config import validate

    cfg = RunConfig()
    cfg.swav.final_assign = "nearest"
    with pytest.raises(InputError, match="swav.final_assign: 'nearest' is not allowed"):
        validate(cfg)
