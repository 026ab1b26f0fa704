"""The paper's metrics (eq. 6-10) plus one-vs-rest AUC and the confusion matrix.

Written out rather than imported so every number is defined here; tests cross-check them against
scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    """One-vs-rest metrics of a single class."""

    precision: float
    recall: float
    specificity: float
    f1: float
    auc: float
    support: int


@dataclass(frozen=True)
class ClassificationMetrics:
    """Macro averages, per-class values and the confusion matrix (rows true, columns predicted)."""

    accuracy: float
    precision: float
    recall: float
    specificity: float
    f1: float
    auc: float
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]
    n: int

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows are the true class."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when a side is empty."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[positive].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def compute_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                    class_names: Sequence[str]) -> ClassificationMetrics:
    """All metrics from true labels and an (N, k) probability matrix."""
    y = np.asarray(y_true, dtype=np.int64)
    k = len(class_names)
    pred = np.argmax(probs, axis=1)
    cm = confusion_matrix(y, pred, k)
    per: dict[str, ClassMetrics] = {}
    for c, name in enumerate(class_names):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        tn = cm.sum() - tp - fp - fn
        prec, rec = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
        per[name] = ClassMetrics(
            precision=prec, recall=rec, specificity=_safe_div(tn, tn + fp),
            f1=_safe_div(2 * prec * rec, prec + rec), auc=binary_auc(y == c, probs[:, c]),
            support=int(cm[c, :].sum()),
        )
    aucs = [m.auc for m in per.values() if not np.isnan(m.auc)]
    return ClassificationMetrics(
        accuracy=_safe_div(np.trace(cm), cm.sum()),
        precision=float(np.mean([m.precision for m in per.values()])),
        recall=float(np.mean([m.recall for m in per.values()])),
        specificity=float(np.mean([m.specificity for m in per.values()])),
        f1=float(np.mean([m.f1 for m in per.values()])),
        auc=float(np.mean(aucs)) if aucs else float("nan"),
        per_class=per, confusion=cm.tolist(), n=len(y),
    )
