"""Metric names, in one place: what is measured, stored, shown and relayed.

Plain constants and one helper, no heavy imports: the read-only CLI commands
use them too.
"""

from functools import lru_cache

from persistence.repositories import SERVER_EVALUATION_FIELDS

LOSS = "loss"
ACCURACY = "accuracy"
PRECISION = "precision"
RECALL = "recall"
F1_SCORE = "f1_score"
AUROC = "auroc"
TRUE_POSITIVES = "true_positives"
TRUE_NEGATIVES = "true_negatives"
FALSE_POSITIVES = "false_positives"
FALSE_NEGATIVES = "false_negatives"
NUM_SAMPLES = "num_samples"

# The headline figures of a binary classifier, in the order reports show them.
HEADLINE_KEYS = (AUROC, ACCURACY, PRECISION, RECALL, F1_SCORE, LOSS)
THRESHOLD = "threshold"
# What binary_metrics measures: the server_evaluations columns but the
# threshold, which is chosen rather than measured.
SERVER_EVAL_KEYS = tuple(k for k in SERVER_EVALUATION_FIELDS if k != THRESHOLD)
SPLITS = ("train", "val", "test")


@lru_cache(maxsize=4096)
def dataset_type_of(metric_name: str) -> str:
    """Return the split a metric key belongs to (``val_auroc`` -> ``val``)."""
    prefix = metric_name.split("_", 1)[0]
    if prefix == "final":
        prefix = metric_name.split("_", 2)[1]
    return prefix if prefix in SPLITS else "other"
