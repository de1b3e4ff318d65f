import math

import numpy as np
import pytest

from mome_rec.metrics import auc, average_auc, logloss, task_metrics


def test_auc_counts_ordered_pairs():
    # positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) -> 3/4
    scores = np.array([0.8, 0.6, 0.4, 0.2])
    labels = np.array([1, 0, 1, 0])
    assert auc(scores, labels) == pytest.approx(0.75)


def test_auc_single_class_is_none(caplog):
    assert auc(np.array([0.1, 0.9]), np.array([1, 1]), "click") is None
    assert "single class" in caplog.text


def test_logloss_by_hand():
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert logloss(np.array([0.9, 0.2]), np.array([1.0, 0.0])) == pytest.approx(expected)


def test_average_auc_skips_undefined():
    metrics = task_metrics(
        np.array([[0.8, 0.1], [0.6, 0.2], [0.4, 0.3], [0.2, 0.4]]),
        np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=np.float32),
        ["click", "conversion"],
    )
    assert metrics["conversion"]["auc"] is None
    assert average_auc(metrics) == pytest.approx(0.75)
