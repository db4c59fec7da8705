"""Binary classification metrics and threshold selection (scikit-learn based)."""

import logging

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from client_app.metric_keys import (
    ACCURACY,
    AUROC,
    F1_SCORE,
    FALSE_NEGATIVES,
    FALSE_POSITIVES,
    LOSS,
    NUM_SAMPLES,
    PRECISION,
    RECALL,
    TRUE_NEGATIVES,
    TRUE_POSITIVES,
)

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
THRESHOLD_EPS = 1e-6


class NonFiniteOutputError(ValueError):
    """A model produced NaN or infinite probabilities (its weights are not finite)."""


def binary_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    loss: float | None = None,
) -> dict[str, float]:
    """Compute binary metrics, predicting positive where ``probs >= threshold``.

    Every value is a Python float, counts included, so the dict goes straight
    into a Flower MetricRecord or JSON. AUROC is NaN when only one class is
    present; ``loss`` is included only when given.
    """
    labels, probs = _check_inputs(labels, probs)
    # The four counts directly: scikit-learn's confusion_matrix and
    # precision_recall_fscore_support re-validate their inputs on every call
    # (4 of this function's 6 ms, run twice per client and round) for the
    # same integers. Undefined ratios are 0, as with zero_division=0.
    predicted = probs >= threshold
    positive = labels == 1
    tp = int(np.count_nonzero(predicted & positive))
    fp = int(np.count_nonzero(predicted & ~positive))
    fn = int(np.count_nonzero(~predicted & positive))
    tn = len(labels) - tp - fp - fn
    metrics = {LOSS: float(loss)} if loss is not None else {}
    metrics |= {
        ACCURACY: (tp + tn) / len(labels),
        PRECISION: tp / (tp + fp) if tp + fp else 0.0,
        RECALL: tp / (tp + fn) if tp + fn else 0.0,
        F1_SCORE: 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        AUROC: _auroc(labels, probs),
        TRUE_POSITIVES: float(tp),
        TRUE_NEGATIVES: float(tn),
        FALSE_POSITIVES: float(fp),
        FALSE_NEGATIVES: float(fn),
        NUM_SAMPLES: float(len(labels)),
    }
    return metrics


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """Return the centre of the thresholds maximising Youden's J, else 0.5.

    J = TPR - FPR does not depend on prevalence, which shifts between the
    validation and test splits. Thresholds within one sample of the best J
    form a plateau when the classes are well separated; its centre (in logit
    space) leaves the widest margin on both sides instead of hugging one class.
    """
    labels, probs = _check_inputs(labels, probs)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return DEFAULT_THRESHOLD
    # All distinct scores, descending; thresholds[0] is inf and has J = 0
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    youden = tpr - fpr
    if youden.max() <= 0:
        logger.debug("No threshold beats chance (max J <= 0); using 0.5")
        return DEFAULT_THRESHOLD
    tolerance = min(1 / positives, 1 / negatives) + 1e-12
    near_best = np.flatnonzero(youden >= youden.max() - tolerance)
    # Each ROC threshold is a score; the cut sits halfway to the next lower one
    cuts = [
        (thresholds[i] + thresholds[min(i + 1, len(thresholds) - 1)]) / 2
        for i in near_best
        if np.isfinite(thresholds[i])
    ]
    if not cuts:
        return DEFAULT_THRESHOLD
    logits = _logit(np.clip(np.asarray(cuts), THRESHOLD_EPS, 1 - THRESHOLD_EPS))
    centre = (logits.min() + logits.max()) / 2
    return float(np.clip(1 / (1 + np.exp(-centre)), THRESHOLD_EPS, 1 - THRESHOLD_EPS))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def _check_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, ...]:
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(labels) != len(probs):
        raise ValueError(f"got {len(labels)} labels but {len(probs)} probabilities")
    if len(labels) == 0:
        raise ValueError("binary metrics need at least one sample")
    if not np.isin(labels, (0, 1)).all():
        bad = np.unique(labels[~np.isin(labels, (0, 1))])[:10].tolist()
        raise ValueError(f"labels outside {{0,1}}: {bad}")
    if not np.isfinite(probs).all():
        count = int((~np.isfinite(probs)).sum())
        raise NonFiniteOutputError(
            f"{count} of {len(probs)} probabilities are NaN or inf"
        )
    return labels.astype(np.int64), probs
