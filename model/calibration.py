"""Temperature scaling and the "indeterminate" band: probabilities a physician can trust.

A network's softmax is over-confident after training; temperature scaling (Guo et al. 2017)
divides the logits by one scalar T fitted on held-out data (minimum negative log-likelihood),
which changes confidence, never the arg-max. The exported module emits probabilities, not
logits; log(p) differs from the logits by a per-row constant, which softmax ignores, so
softmax(log(p) / T) is exactly softmax(logits / T) and older model files need no re-export.

Below a threshold on the highest calibrated study probability the finding is "indeterminate":
the threshold is the lowest one (never below 0.5) at which the held-out studies still called
reach a stated accuracy. The code for it is SNOMED CT 280416009 "Indeterminate result", as
DICOM lists it in CID 6063 (checked in pydicom's `codes.cid6063.IndeterminateResult`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INDETERMINATE = "indeterminate"
INDETERMINATE_CODE = ("280416009", "SCT", "Indeterminate result")  # CID 6063
DEFAULT_TEMPERATURE = 1.0  # models exported before calibration: probabilities as they were
MIN_THRESHOLD = 0.5  # never a definite class below this, whatever a model or config says
DEFAULT_THRESHOLD = MIN_THRESHOLD  # models exported before calibration
TARGET_ACCURACY = 0.95  # study-level accuracy the chosen threshold must reach on held-out data
_T_RANGE = (0.05, 20.0)
_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Rows of probabilities rescaled as if their logits were divided by `temperature`."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or p.size == 0:
        return p
    z = np.log(np.clip(p, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10
                               ) -> float:
    """ECE over equal-width bins of the top probability (as model.evaluate, which imports the
    trainer and so cannot be imported from here); NaN with no data."""
    if len(labels) == 0:
        return math.nan
    conf = probs.max(axis=1)
    right = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    ids = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], conf)
    total = np.bincount(ids, minlength=n_bins)
    gap = np.abs(np.bincount(ids, weights=right, minlength=n_bins)
                 - np.bincount(ids, weights=conf, minlength=n_bins))
    return float(gap.sum() / total.sum())


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class)."""
    if len(labels) == 0:
        return 0.0
    picked = probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.clip(picked, _EPS, 1.0)).mean())


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """T minimising held-out NLL: a grid over log T, then golden-section search around the
    best point (the NLL is smooth and unimodal in log T). 1.0 with no data."""
    if len(labels) == 0:
        return DEFAULT_TEMPERATURE

    def nll(log_t: float) -> float:
        return negative_log_likelihood(labels, apply_temperature(probs, math.exp(log_t)))

    lo, hi = math.log(_T_RANGE[0]), math.log(_T_RANGE[1])
    grid = np.linspace(lo, hi, 41)
    best = int(np.argmin([nll(float(g)) for g in grid]))
    a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return round(math.exp((a + b) / 2), 4)


def choose_threshold(labels: np.ndarray, probs: np.ndarray,
                     target: float = TARGET_ACCURACY) -> float:
    """Lowest threshold (>= MIN_THRESHOLD) at which the studies whose highest probability
    reaches it are classified with at least `target` accuracy; 1.0 (everything
    indeterminate) when no threshold reaches it: a weak model must not look sure."""
    if len(labels) == 0:
        return DEFAULT_THRESHOLD
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.asarray(labels)
    for t in sorted({MIN_THRESHOLD, *(float(c) for c in conf if c >= MIN_THRESHOLD)}):
        called = conf >= t
        if called.any() and right[called].mean() >= target:
            return round(t, 4)
    return 1.0


def effective_threshold(model_threshold: float, override: float = 0.0) -> float:
    """The threshold in force: a configured override (0 = none) or the model's, never
    below MIN_THRESHOLD."""
    chosen = override if override > 0 else model_threshold
    return max(MIN_THRESHOLD, float(chosen))


def decide(probabilities: Mapping[str, float], threshold: float) -> str:
    """The finding: the most probable class, or INDETERMINATE below the threshold."""
    name, top = max(probabilities.items(), key=lambda kv: kv[1])
    return name if top >= max(threshold, MIN_THRESHOLD) else INDETERMINATE


@dataclass(frozen=True)
class Calibration:
    """What calibration found on the held-out part; stored in the model's metadata."""

    temperature: float
    threshold: float
    target_accuracy: float
    held_out_studies: int
    image_ece_before: float
    image_ece_after: float  # cross-fitted: T fitted on one half of the patients, ECE on the other
    study_ece_before: float
    study_ece_after: float
    indeterminate_share: float  # held-out studies called indeterminate at `threshold`
    accuracy_called: float  # accuracy on the rest (NaN when none called)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def study_means(groups: Sequence[Sequence[int]], probs: np.ndarray) -> np.ndarray:
    """Mean probability of each group of image rows (a study's views, as the node combines)."""
    if not groups:
        return np.zeros((0, probs.shape[1]))
    return np.stack([probs[list(g)].mean(axis=0) for g in groups])


def _cross_fitted(labels: np.ndarray, probs: np.ndarray, groups: Sequence[Sequence[int]]
                  ) -> np.ndarray:
    """Calibrated probabilities where each half of the studies is scaled by the T fitted on
    the other half: an honest 'after' figure from the same held-out part."""
    out = np.array(probs, dtype=np.float64, copy=True)
    halves = [groups[0::2], groups[1::2]]
    for fit_half, apply_half in ((halves[0], halves[1]), (halves[1], halves[0])):
        fit_rows = [i for g in fit_half for i in g]
        apply_rows = [i for g in apply_half for i in g]
        if not fit_rows or not apply_rows:
            continue
        t = fit_temperature(labels[fit_rows], probs[fit_rows])
        out[apply_rows] = apply_temperature(probs[apply_rows], t)
    return out


def calibrate(labels: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str],
              target: float = TARGET_ACCURACY) -> Calibration:
    """Fit T on held-out images, choose the threshold on held-out studies (views averaged
    after scaling, as the node does), and measure ECE before and after."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    index: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        index.setdefault(pid, []).append(i)
    groups = [index[k] for k in sorted(index)]
    y_study = np.array([labels[g[0]] for g in groups], dtype=np.int64)
    temperature = fit_temperature(labels, probs)
    scaled = apply_temperature(probs, temperature)
    study_scaled = study_means(groups, scaled)
    threshold = choose_threshold(y_study, study_scaled, target)
    crossed = _cross_fitted(labels, probs, groups)
    called = study_scaled.max(axis=1) >= threshold if len(groups) else np.zeros(0, bool)
    right = study_scaled.argmax(axis=1) == y_study if len(groups) else np.zeros(0, bool)
    return Calibration(
        temperature=temperature, threshold=threshold, target_accuracy=target,
        held_out_studies=len(groups),
        image_ece_before=round(expected_calibration_error(labels, probs), 4),
        image_ece_after=round(expected_calibration_error(labels, crossed), 4),
        study_ece_before=round(expected_calibration_error(y_study, study_means(groups, probs)),
                               4),
        study_ece_after=round(expected_calibration_error(y_study, study_means(groups, crossed)),
                              4),
        indeterminate_share=round(float(1 - called.mean()), 4) if len(groups) else 0.0,
        accuracy_called=round(float(right[called].mean()), 4) if called.any() else math.nan,
    )
