"""The label-free number of parts (selflabel.dense.kparts, dense.k_parts_select=stability)."""
import dataclasses

import numpy as np
import pytest
from conftest import planted_dense_features

from selflabel.config import DenseConfig
from selflabel.dense.kparts import choose_k_parts, labelling_stability
from selflabel.dense.pipeline import check_refine_select, fit_concepts, select_k_parts
from selflabel.errors import InputError


def test_stability_is_the_mean_and_min_pairwise_ari():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert labelling_stability([a, (a + 1) % 3, a]) == (1.0, 1.0)  # renamed labels agree fully
    mean, low = labelling_stability([a, a, np.array([0, 1, 0, 1, 0, 1])])
    assert low < 0 < mean < 1 and mean == pytest.approx((1.0 + 2 * low) / 3)
    with pytest.raises(ValueError):
        labelling_stability([a])


def test_choice_is_the_most_stable_k_and_the_smaller_on_a_tie():
    curve = [{"k_parts": 300, "stability": 0.5}, {"k_parts": 100, "stability": 0.4}, {"k_parts": 200, "stability": 0.6}]
    assert choose_k_parts(curve) == 200
    curve[0]["stability"] = 0.6
    assert choose_k_parts(curve) == 200  # tie with 300: the smaller
    curve[1]["stability"] = 0.7
    assert choose_k_parts(curve) == 100
    with pytest.raises(ValueError):
        choose_k_parts([])


def _cfg(**kw) -> DenseConfig:
    return dataclasses.replace(DenseConfig(), k_parts_select="stability", k_parts_grid=[3, 6, 40], k_parts_seeds=3,
                               k_parts_sample=800, max_patches=1000, select="fixed", epochs=10, **kw)


def test_rule_is_deterministic_for_a_seed_and_recorded_in_the_settings():
    feats = planted_dense_features()
    k1, s1 = select_k_parts(feats, _cfg(), seed=4)
    k2, s2 = select_k_parts(feats, _cfg(), seed=4)
    assert (k1, s1) == (k2, s2)
    assert [c["k_parts"] for c in s1["curve"]] == [3, 6, 40] and k1 == choose_k_parts(s1["curve"])
    assert all(-1 <= c["stability"] <= 1 and len(c["n_concepts"]) == 3 for c in s1["curve"])
    # three parts of three well separated kinds of patch: every part seed gives the same concepts
    assert s1["curve"][0]["stability"] == pytest.approx(1.0)
    model = fit_concepts(feats, _cfg(), seed=4)
    assert model.k == k1 and model.settings["parts"]["curve"] == s1["curve"]
    fixed = fit_concepts(feats, dataclasses.replace(_cfg(), k_parts_select="fixed", k_parts=6), seed=4)
    assert fixed.k == 6 and fixed.settings["parts"] == {"k_parts_select": "fixed", "k_parts": 6}


def test_bad_rule_settings_fail_with_the_key():
    with pytest.raises(InputError, match="dense.k_parts_select"):
        check_refine_select(dataclasses.replace(DenseConfig(), k_parts_select="best"))
    with pytest.raises(InputError, match="dense.k_parts_grid"):
        check_refine_select(dataclasses.replace(DenseConfig(), k_parts_select="stability", k_parts_grid=[1, 50]))
    with pytest.raises(InputError, match="dense.k_parts_grid"):
        check_refine_select(dataclasses.replace(DenseConfig(), k_parts_select="stability", k_parts_grid=[]))
