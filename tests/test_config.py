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
    for section in ("ingest", "backbone", "cluster"):
        assert d[section] == ref[section]


def test_overrides_precedence_and_types(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\ncluster:\n  k: 7\n  heads: [10, 20]\n")
    cfg = load_config(y, ["cluster.k=9", "backbone.amp=fp32", "cluster.prior=[0.5, 0.5]"])
    assert (cfg.seed, cfg.cluster.k, cfg.cluster.heads, cfg.backbone.amp) == (3, 9, [10, 20], "fp32")
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
    assert "bad.yaml" in str(ei.value) or "config" in str(ei.value)
