"""The paper's evaluation protocol and what it leaves out: ROC curves, calibration, repeated
runs reported as mean ± sd, k-fold by patient, and the promotion rule of the model registry.

Paper §3.1 reports the average of 10 runs; here each run is a fresh training with its own
seed (its own 7:3 patient split, initialisation and augmentation draws, or one fold of a
k-fold), and every network in a comparison sees the same split in the same run (paired).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.baseline import trivial_baseline
from model.calibration import Calibration
from model.classes import CLASS_NAMES
from model.export import load_torchscript
from model.metrics import ClassificationMetrics, compute_metrics
from model.preprocess import PreprocessParams
from model.split import patient_labels, patient_split
from model.trainer import (
    LabelledImages,
    TrainConfig,
    TrainResult,
    preprocess_all,
    study_level,
    train_model,
)

log = logging.getLogger(__name__)

OVERALL_KEYS: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
PER_CLASS_KEYS: tuple[str, ...] = ("precision", "recall", "specificity", "f1", "auc")
PROMOTION_METRICS: tuple[str, ...] = tuple(
    f"{level}_{k}" for level in ("study", "image") for k in OVERALL_KEYS)


# --- ROC and calibration -----------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """One-vs-rest ROC of one class; thresholds start at +inf (nothing predicted positive)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    auc: float


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> RocCurve:
    """Every distinct threshold, highest first (as sklearn's roc_curve without dropping)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, int)
    tps = np.cumsum(p)[last_of_run]
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(len(tps) + 1, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(len(fps) + 1, np.nan)
    auc = float(np.trapezoid(tpr, fpr)) if n_pos and n_neg else float("nan")
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=np.r_[np.inf, s[last_of_run]], auc=auc)


def roc_curves(y: np.ndarray, probs: np.ndarray,
               class_names: Sequence[str] = CLASS_NAMES) -> dict[str, RocCurve]:
    """One-vs-rest ROC per class (Figure 8)."""
    y = np.asarray(y)
    return {name: roc_curve(y == c, probs[:, c]) for c, name in enumerate(class_names)}


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin of a reliability diagram (top-class confidence vs accuracy)."""

    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float


def reliability_bins(y: np.ndarray, probs: np.ndarray, n_bins: int = 10
                     ) -> list[ReliabilityBin]:
    """Equal-width bins of the top-class probability; bin edges as sklearn's uniform strategy."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    total = np.bincount(ids, minlength=n_bins)
    conf_sum = np.bincount(ids, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(ids, weights=correct, minlength=n_bins)
    return [ReliabilityBin(float(edges[b]), float(edges[b + 1]), int(total[b]),
                           float(conf_sum[b] / total[b]) if total[b] else float("nan"),
                           float(corr_sum[b] / total[b]) if total[b] else float("nan"))
            for b in range(n_bins)]


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE: sum over bins of (bin share) x |accuracy - mean confidence|."""
    bins = reliability_bins(y, probs, n_bins)
    n = sum(b.count for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in bins if b.count))


# --- evaluation of one set of predictions ------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Everything the report shows about one model on one held-out set."""

    image: ClassificationMetrics
    study: ClassificationMetrics
    image_roc: dict[str, RocCurve]
    image_ece: float
    study_ece: float
    reliability: list[ReliabilityBin]

    def headline(self) -> dict[str, float]:
        """Flat metrics named as PROMOTION_METRICS (study_f1, image_auc, ...)."""
        out = {f"{lvl}_{k}": float(getattr(m, k))
               for lvl, m in (("study", self.study), ("image", self.image)) for k in OVERALL_KEYS}
        out.update(image_ece=self.image_ece, study_ece=self.study_ece)
        return out


def evaluate(labels: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str],
             class_names: Sequence[str] = CLASS_NAMES) -> Evaluation:
    """Image-level metrics (the paper's) and study-level ones (views averaged, as served)."""
    labels = np.asarray(labels, dtype=np.int64)
    y_st, p_st = study_level(patient_ids, labels, probs)
    return Evaluation(
        image=compute_metrics(labels, probs, class_names),
        study=compute_metrics(y_st, p_st, class_names),
        image_roc=roc_curves(labels, probs, class_names),
        image_ece=expected_calibration_error(labels, probs),
        study_ece=expected_calibration_error(y_st, p_st),
        reliability=reliability_bins(labels, probs),
    )


def predict_module(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   batch_size: int = 16) -> np.ndarray:
    """Probabilities of a module that already emits them (an exported model), batched."""
    outs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            outs.append(module(x[start:start + batch_size]))
    return torch.cat(outs).double().numpy() if outs else np.zeros((0, len(CLASS_NAMES)))


def evaluate_model_file(path: Path, data: LabelledImages, index: np.ndarray,
                        progress: bool = False) -> Evaluation:
    """An exported model (e.g. the one serving now) on held-out images, with its own
    preprocessing, so a candidate and the current model are compared on the same set."""
    module, meta = load_torchscript(path)
    images = [data.images[i] for i in index]
    x = preprocess_all(images, meta.preprocessing, progress)
    probs = predict_module(module, x)
    labels = np.asarray(data.labels, dtype=np.int64)[index]
    return evaluate(labels, probs, [data.patient_ids[i] for i in index])


# --- splits ------------------------------------------------------------------------------


def patient_kfold(patient_ids: Sequence[str], labels: Sequence[int] | np.ndarray, k: int,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) image-index pairs; patients dealt round-robin per class (stratified)."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    per_patient = patient_labels(patient_ids, labels)
    if len(per_patient) < k:
        raise ValueError(f"{len(per_patient)} patient(s) cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for cls in sorted(set(per_patient.values())):
        members = sorted(p for p, c in per_patient.items() if c == cls)
        rng.shuffle(members)
        for i, pid in enumerate(members):
            fold_of[pid] = (offset + i) % k
        offset += len(members)  # keep fold sizes balanced across classes
    folds = np.array([fold_of[p] for p in patient_ids])
    return [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(k)]


def run_splits(data: LabelledImages, runs: int, seed: int, test_fraction: float,
               folds: int | None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(seed, train, test) per run: `runs` seeded 7:3 splits, or the k folds of one seed."""
    labels = np.asarray(data.labels, dtype=np.int64)
    if folds:
        return [(seed + f, tr, te) for f, (tr, te)
                in enumerate(patient_kfold(data.patient_ids, labels, folds, seed))]
    return [(seed + r, *patient_split(data.patient_ids, labels, test_fraction, seed + r))
            for r in range(runs)]


# --- repeated runs -----------------------------------------------------------------------


@dataclass
class RunRecord:
    """One training run of one network on one split."""

    arch: str
    run: int
    seed: int
    evaluation: Evaluation
    history: list[dict[str, float]]
    images_per_second: float
    seconds: float
    train_index: np.ndarray
    test_index: np.ndarray
    labels: np.ndarray  # held-out labels, image level
    probabilities: np.ndarray  # held-out probabilities, image level
    trivial: ClassificationMetrics | None = None
    result: TrainResult | None = None  # kept only for the run that gets exported
    calibration: Calibration | None = None  # temperature, threshold, ECE before and after


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over runs (sd is 0 for one run)."""

    mean: float
    sd: float
    n: int

    def fmt(self, digits: int = 4) -> str:
        """'0.9801 ± 0.0040' (only the mean when there was one run)."""
        if self.n <= 1 or math.isnan(self.sd):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def stat(values: Sequence[float]) -> Stat:
    """Mean ± sd ignoring NaNs (an AUC is NaN when a class is absent from a test part)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return Stat(float("nan"), float("nan"), 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))


@dataclass
class ArchSummary:
    """Mean ± sd over runs for one network (a column of Tables 8 and 9)."""

    arch: str
    runs: int
    image: dict[str, Stat]
    study: dict[str, Stat]
    per_class: dict[str, dict[str, Stat]]  # image level, Figure 5 / 7
    image_ece: Stat
    images_per_second: Stat
    seconds: Stat
    confusion: list[list[int]] = field(default_factory=list)  # summed over runs


def summarize(records: Sequence[RunRecord], class_names: Sequence[str] = CLASS_NAMES
              ) -> ArchSummary:
    """Aggregate one network's runs."""
    ev = [r.evaluation for r in records]
    cm = np.sum([np.asarray(e.image.confusion) for e in ev], axis=0)
    return ArchSummary(
        arch=records[0].arch, runs=len(records),
        image={k: stat([getattr(e.image, k) for e in ev]) for k in OVERALL_KEYS},
        study={k: stat([getattr(e.study, k) for e in ev]) for k in OVERALL_KEYS},
        per_class={c: {k: stat([getattr(e.image.per_class[c], k) for e in ev])
                       for k in PER_CLASS_KEYS} for c in class_names},
        image_ece=stat([e.image_ece for e in ev]),
        images_per_second=stat([r.images_per_second for r in records]),
        seconds=stat([r.seconds for r in records]),
        confusion=cm.tolist(),
    )


def summarize_trivial(records: Sequence[RunRecord]) -> dict[str, Stat] | None:
    """Mean ± sd of the logistic-regression baseline, where it was run (once per split)."""
    per_run = {r.run: r.trivial for r in records if r.trivial is not None}
    trivial = list(per_run.values())
    if not trivial:
        return None
    return {k: stat([getattr(m, k) for m in trivial]) for k in OVERALL_KEYS}


@dataclass(frozen=True)
class Protocol:
    """How to repeat training: networks, runs (or folds), and the Table 5 settings."""

    archs: tuple[str, ...] = ("dscint",)
    runs: int = 10
    folds: int | None = None
    trivial_baseline: bool = True
    keep_result_of: str = "dscint"  # the network whose run 0 is kept for export


def run_protocol(data: LabelledImages, protocol: Protocol, cfg: TrainConfig,
                 params: PreprocessParams | None = None,
                 on_run: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Train every network once per split; preprocessing is done once for all of them."""
    params = params or PreprocessParams()
    inputs = preprocess_all(data.images, params, cfg.progress)
    labels = np.asarray(data.labels, dtype=np.int64)
    splits = run_splits(data, protocol.runs, cfg.seed, cfg.test_fraction, protocol.folds)
    records: list[RunRecord] = []
    for run, (seed, train_idx, test_idx) in enumerate(splits):
        trivial = trivial_baseline(inputs, labels, train_idx, test_idx, seed) \
            if protocol.trivial_baseline else None
        for arch in protocol.archs:
            rec = _one_run(data, replace(cfg, seed=seed, arch=arch), params, inputs,
                           (train_idx, test_idx), run, trivial)
            if not (run == 0 and arch == protocol.keep_result_of):
                rec.result = None  # do not hold every network in memory
            records.append(rec)
            if on_run is not None:
                on_run(rec)
    return records


def _one_run(data: LabelledImages, cfg: TrainConfig, params: PreprocessParams,
             inputs: torch.Tensor, split: tuple[np.ndarray, np.ndarray], run: int,
             trivial: ClassificationMetrics | None) -> RunRecord:
    res = train_model(data, cfg, params, split=split, inputs=inputs)
    labels = np.asarray(data.labels, dtype=np.int64)[res.test_index]
    ev = evaluate(labels, res.test_probabilities,
                  [data.patient_ids[i] for i in res.test_index])
    log.info("%s run %d (seed %d): image accuracy %.4f, study F1 %.4f, %.2f img/s", cfg.arch,
             run, cfg.seed, ev.image.accuracy, ev.study.f1, res.images_per_second)
    return RunRecord(arch=cfg.arch, run=run, seed=cfg.seed, evaluation=ev, history=res.history,
                     images_per_second=res.images_per_second, seconds=res.seconds,
                     train_index=res.train_index, test_index=res.test_index, labels=labels,
                     probabilities=res.test_probabilities, trivial=trivial, result=res,
                     calibration=res.calibration)


# --- promotion rule ----------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a candidate may replace the serving model, and why (goes into the report)."""

    promote: bool
    metric: str
    candidate: float
    current: float | None
    margin: float
    forced: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"promote": self.promote, "metric": self.metric, "candidate": self.candidate,
                "current": self.current, "margin": self.margin, "forced": self.forced,
                "reason": self.reason}


def decide_promotion(candidate: Mapping[str, float], current: Mapping[str, float] | None,
                     metric: str = "study_f1", margin: float = 0.0, force: bool = False
                     ) -> PromotionDecision:
    """Promote when candidate >= current + margin on the same held-out set, or when forced."""
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"unknown promotion metric {metric!r}; expected one of "
                         f"{', '.join(PROMOTION_METRICS)}")
    cand = float(candidate[metric])
    cur = None if current is None else float(current[metric])
    if force:
        return PromotionDecision(True, metric, cand, cur, margin, True, "forced (--promote)")
    if cur is None:
        return PromotionDecision(True, metric, cand, None, margin, False,
                                 "no model is serving: the first one is promoted")
    if math.isnan(cand):
        return PromotionDecision(False, metric, cand, cur, margin, False,
                                 f"candidate {metric} is undefined on this held-out set")
    ok = math.isnan(cur) or cand >= cur + margin
    cmp = ">=" if ok else "<"
    reason = f"candidate {metric} {cand:.4f} {cmp} current {cur:.4f} + margin {margin:.4f}"
    return PromotionDecision(ok, metric, cand, cur, margin, False, reason)
