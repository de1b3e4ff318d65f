"""Per-task AUC and log loss over a whole split."""

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

logger = logging.getLogger(__name__)

# Probabilities are clipped to [EPS, 1 - EPS] before the log, as scikit-learn's log_loss does.
EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray, name: str = "") -> Optional[float]:
    """Area under the ROC curve, or None with a warning when only one class is present."""
    if labels.size == 0 or labels.min() == labels.max():
        logger.warning("AUC of %s is undefined: the split holds a single class", name or "a task")
        return None
    value = binary_auroc(torch.from_numpy(scores.astype(np.float64)), torch.from_numpy(labels.astype(np.int64)))
    return float(value)


def logloss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``scores`` against 0/1 ``labels``."""
    clipped = np.clip(scores.astype(np.float64), EPS, 1.0 - EPS)
    return float(-np.mean(labels * np.log(clipped) + (1.0 - labels) * np.log(1.0 - clipped)))


def task_metrics(scores: np.ndarray, labels: np.ndarray, tasks: List[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """AUC and log loss per task for ``scores`` and ``labels`` of shape ``N x T``."""
    result: Dict[str, Dict[str, Optional[float]]] = {}
    for index, task in enumerate(tasks):
        result[task] = {
            "auc": auc(scores[:, index], labels[:, index], task),
            "logloss": logloss(scores[:, index], labels[:, index]),
        }
    return result


def average_auc(metrics: Dict[str, Dict[str, Optional[float]]]) -> Optional[float]:
    """Mean AUC over the tasks whose AUC is defined; None if none is."""
    values = [task["auc"] for task in metrics.values() if task["auc"] is not None]
    return float(np.mean(values)) if values else None
