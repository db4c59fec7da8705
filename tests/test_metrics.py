"""Tests for client_app.metrics against hand counts and scikit-learn."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from client_app.metric_keys import AUROC, SERVER_EVAL_KEYS
from client_app.metrics import binary_metrics, youden_threshold

LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 1])
PROBS = np.array([0.9, 0.8, 0.4, 0.6, 0.3, 0.7, 0.1, 0.55, 0.5, 0.2])


def test_binary_metrics_match_hand_counts() -> None:
    metrics = binary_metrics(LABELS, PROBS, threshold=0.5, loss=0.42)
    # Predicted positive: 0.9 0.8 0.6 0.7 0.55 0.5 -> TP 4, FP 2; FN 0.4 0.2 -> 2
    assert metrics["true_positives"] == 4
    assert metrics["false_positives"] == 2
    assert metrics["false_negatives"] == 2
    assert metrics["true_negatives"] == 2
    assert metrics["num_samples"] == 10
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["precision"] == pytest.approx(4 / 6)
    assert metrics["recall"] == pytest.approx(4 / 6)
    assert metrics["f1_score"] == pytest.approx(4 / 6)
    assert metrics["loss"] == pytest.approx(0.42)
    assert metrics[AUROC] == pytest.approx(roc_auc_score(LABELS, PROBS))
    assert set(metrics) == set(SERVER_EVAL_KEYS)
    assert all(type(value) is float for value in metrics.values())
    json.dumps(metrics)


def test_binary_metrics_threshold_and_no_loss() -> None:
    metrics = binary_metrics(LABELS, PROBS, threshold=0.95)
    assert "loss" not in metrics
    assert metrics["true_positives"] == 0 and metrics["precision"] == 0.0
    assert metrics["f1_score"] == 0.0


def test_one_class_auroc_is_nan(recwarn: pytest.WarningsRecorder) -> None:
    metrics = binary_metrics(np.ones(4), np.array([0.2, 0.6, 0.7, 0.9]))
    assert math.isnan(metrics[AUROC])
    assert metrics["recall"] == pytest.approx(0.75)
    assert len(recwarn) == 0


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], [0.5], "2 labels but 1 probabilities"),
        ([], [], "at least one sample"),
        ([0, 2], [0.1, 0.2], r"labels outside \{0,1\}: \[2\]"),
        ([0, 1], [0.1, float("nan")], "1 of 2 probabilities are NaN"),
    ],
)
def test_binary_metrics_rejects_bad_input(
    labels: list, probs: list, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(np.array(labels), np.array(probs))


def test_youden_threshold_separates_classes() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.25, 0.3, 0.6, 0.8, 0.95])
    threshold = youden_threshold(labels, probs)
    assert 0.3 < threshold < 0.6
    assert binary_metrics(labels, probs, threshold=threshold)["accuracy"] == 1.0


def test_youden_threshold_falls_back_and_clips() -> None:
    assert youden_threshold(np.ones(3), np.array([0.2, 0.5, 0.9])) == 0.5
    # Anti-correlated scores: no threshold beats chance
    assert youden_threshold(np.array([1, 0]), np.array([0.2, 0.9])) == 0.5
    threshold = youden_threshold(np.array([0, 1]), np.array([0.0, 1.0]))
    assert 0.0 < threshold < 1.0
    edge = youden_threshold(np.array([0, 0, 1]), np.array([0.0, 0.0, 0.0]) + 1e-9)
    assert 0.0 < edge < 1.0


def test_youden_threshold_sits_in_the_middle_of_the_plateau() -> None:
    # Perfectly separated: every cut between 0.02 and 0.98 gives J = 1, so
    # the threshold should be near the middle (in logit space), not at an edge.
    labels = np.array([0] * 50 + [1] * 50)
    probs = np.concatenate([np.full(50, 0.02), np.full(50, 0.98)])
    assert youden_threshold(labels, probs) == pytest.approx(0.5, abs=1e-6)
    skewed = np.concatenate([np.linspace(0.001, 0.01, 50), np.linspace(0.3, 0.99, 50)])
    threshold = youden_threshold(labels, skewed)
    assert 0.01 < threshold < 0.3
