"""The trivial baseline the phantom benchmark must stay clearly above: logistic regression on
8x-downsampled, preprocessed images, on the same patient-level split as Dscint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from model.classes import CLASS_NAMES
from model.metrics import ClassificationMetrics, compute_metrics


def downsample(x: torch.Tensor, factor: int = 8) -> np.ndarray:
    """(N, 1, H, W) -> (N, H*W/factor^2) by average pooling."""
    return F.avg_pool2d(x, factor).flatten(1).numpy().astype(np.float64)


def trivial_baseline(x: torch.Tensor, labels: np.ndarray, train_idx: np.ndarray,
                     test_idx: np.ndarray, seed: int = 0) -> ClassificationMetrics:
    """Fit on the training part, report image-level metrics on the held-out part."""
    feats = downsample(x)
    scaler = StandardScaler().fit(feats[train_idx])
    clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed)
    clf.fit(scaler.transform(feats[train_idx]), labels[train_idx])
    probs = np.zeros((len(test_idx), len(CLASS_NAMES)))
    probs[:, clf.classes_] = clf.predict_proba(scaler.transform(feats[test_idx]))
    return compute_metrics(labels[test_idx], probs, CLASS_NAMES)
