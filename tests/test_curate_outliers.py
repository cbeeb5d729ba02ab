"""Outlier scores on real photos: 100 CamVid street frames and 100 cifar10 images mixed into
imagenette-val surface first (ROC AUC of the score for the inserted images)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import shared
from selflabel.backbones import create_backbone
from selflabel.cluster import sinkhorn_cluster
from selflabel.curate.outliers import outlier_scores
from selflabel.curate.prepare import centred_unit
from selflabel.data import scan_folder
from selflabel.features import extract_features

AUC_MIN = 0.9


def features(name: str, n: int | None = None) -> np.ndarray:
    recs = scan_folder(shared(name)).records
    if n is not None:
        recs = recs[:: len(recs) // n][:n]
    fr = extract_features(recs, create_backbone("mobilenet_v2"), device="cpu", num_workers=0, show_progress=False)
    return np.asarray(fr.features, dtype=np.float32)


@pytest.mark.integration
@pytest.mark.slow
def test_inserted_out_of_domain_images_score_high() -> None:
    x = np.concatenate([features("imagenette-val"), features("camvid/train/images", 100), features("cifar10-test", 100)])
    inserted = np.r_[np.zeros(len(x) - 200), np.ones(200)]
    labels = np.asarray(sinkhorn_cluster(x, 10, seed=0).labels)  # the default clustering, K = imagenette's classes
    score = outlier_scores(centred_unit(x), labels)
    auc = roc_auc_score(inserted, score)
    print(f"outlier ROC AUC {auc:.3f} (CamVid {roc_auc_score(inserted[:-100], score[:-100]):.3f}, "
          f"cifar10 {roc_auc_score(np.r_[inserted[:-200], np.ones(100)], np.r_[score[:-200], score[-100:]]):.3f})")
    assert auc >= AUC_MIN


def test_the_atypical_member_of_each_cluster_scores_highest() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32) * 5
    x = np.concatenate([centres[c] + rng.normal(0, 0.3, (50, 16)) for c in range(4)]).astype(np.float32)
    x[[10, 70]] = rng.normal(0, 3, (2, 16))  # two junk rows
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(4), 50)
    s = outlier_scores(x, labels)
    assert set(np.argsort(-s)[:2]) == {10, 70}
    assert abs(np.median(s[labels == 2])) < 1e-6  # centred per cluster
