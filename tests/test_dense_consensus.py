"""Concepts by majority over several fits (selflabel.dense.consensus, dense.consensus)."""
import dataclasses

import numpy as np
import pytest
from conftest import planted_dense_features

from selflabel.dense.consensus import attach_absent, coassociation, majority_concepts
from selflabel.config import DenseConfig
from selflabel.dense.pipeline import fit_concepts


def test_coassociation_is_the_share_of_fits_that_join_two_parts():
    parts = np.array([0, 0, 1, 1, 2, 2, 3])
    together = np.array([0, 0, 0, 0, 1, 1, 1])  # parts 0+1 and 2+3 in one concept each
    apart = np.array([0, 0, 1, 1, 2, 2, 2])  # 0 and 1 apart
    a, counts = coassociation(parts, [together, together, apart], 5)
    assert counts.tolist() == [2, 2, 2, 1, 0]
    assert a[0, 1] == pytest.approx(2 / 3) and a[2, 3] == pytest.approx(1.0) and a[0, 2] == pytest.approx(0.0)
    assert a[0, 0] == pytest.approx(1.0) and not a[4].any()  # a part without patches has a zero row
    mixed = np.array([0, 1, 0, 1, 2, 2, 2])  # part 0's patches split over two concepts
    a2, _ = coassociation(parts, [mixed], 5)
    assert a2[0, 0] == pytest.approx(0.5) and a2[0, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        coassociation(parts, [together[:-1]], 5)


def test_majority_joins_what_most_fits_join_and_only_that():
    parts = np.arange(4)
    fits = [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2]), np.array([0, 1, 2, 2]), np.array([0, 0, 1, 2])]
    a, _ = coassociation(parts, fits, 4)  # 0+1 in 3 of 4 fits; 2+3 in 2 of 4; 1+2 never
    labels = majority_concepts(a, 0.5)
    assert labels[0] == labels[1] and labels[1] != labels[2]
    assert labels[2] == labels[3]  # exactly half: distance 0.5 is within the cut
    assert len(set(majority_concepts(a, 0.3).tolist())) == 3  # stricter: only 0+1 (3/4 of fits) joins
    assert majority_concepts(np.ones((1, 1))).tolist() == [0]


def test_absent_parts_join_their_nearest_present_prototype():
    protos = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = attach_absent(np.array([4, 7, 0, 0]), np.array([True, True, False, False]), protos)
    assert labels.tolist() == [4, 7, 4, 7]


def test_pipeline_votes_over_fits_deterministically_and_records_it():
    feats = planted_dense_features()
    cfg = dataclasses.replace(DenseConfig(), k_parts=12, consensus=3, max_patches=1000, select="fixed", epochs=10)
    m1, m2 = fit_concepts(feats, cfg, seed=2), fit_concepts(feats, cfg, seed=2)
    assert m1.concept_of_part.tolist() == m2.concept_of_part.tolist()
    c = m1.settings["consensus"]
    assert c["n_fits"] == 3 and c["seeds"] == [2, 3, 4] and len(c["n_concepts_per_fit"]) == 3
    assert c["n_concepts"] == len(m1.concepts) == m1.settings["n_concepts"]
    assert sorted(p for cc in m1.concepts for p in cc["parts"]) == list(range(12))
    # the fits agree (the same 2 concepts from every seed): the vote keeps their partition
    assert c["n_concepts_per_fit"] == [2, 2, 2] and c["agreement"] > 0.95 and len(m1.concepts) == 2
    single = fit_concepts(feats, dataclasses.replace(cfg, consensus=1), seed=2)
    assert "consensus" not in single.settings
