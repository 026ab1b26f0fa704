"""Calibration of a model: ECE before and after temperature scaling, the share of studies
called indeterminate and the accuracy on the rest.

Two sources per model: the figures `model.calibration.calibrate` stored in the model at
training (its held-out part; 'after' cross-fitted), and a fresh test on phantoms of all four
classes that no model has seen (seeds from TEST_SEED, difficulty 0.5): image and study ECE
with T = 1 and with the model's T, studies indeterminate at the model's threshold, accuracy on
the rest and on all.

`python -m bench.calibration [--model PATH ...] [--per-class N]`; without --model it trains,
into a temporary folder, the demo's model (node/demo/run.py's budget, seed 1) and the model
`python -m node train` makes with its defaults (400 patients, 5 epochs, seed 0).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.calibration import (
    apply_temperature,
    effective_threshold,
    expected_calibration_error,
)
from model.classes import CLASS_NAMES
from model.classifier import Classifier
from model.phantoms import generate_study
from model.preprocess import preprocess_batch

TEST_SEED = 930_000  # fresh phantoms: training cohorts draw their seeds from [0, 2**40)


@dataclass(frozen=True)
class Fresh:
    """Figures on the fresh phantoms."""

    studies: int
    image_ece_before: float
    image_ece_after: float
    study_ece_before: float
    study_ece_after: float
    threshold: float
    indeterminate_share: float
    accuracy_called: float
    accuracy_all: float


def fresh_test(clf: Classifier, per_class: int) -> Fresh:
    """Classify `per_class` new phantoms of each class, views averaged as the node does."""
    raw_rows, labels, study_raw, study_cal = [], [], [], []
    temperature = clf.meta.temperature
    for c, label in enumerate(CLASS_NAMES):
        for i in range(per_class):
            study = generate_study(label, TEST_SEED + 1000 * c + i)
            batch = preprocess_batch([study.anterior, study.posterior], clf.meta.preprocessing)
            with torch.inference_mode():
                raw = clf.module(batch).double().numpy()
            raw_rows.append(raw)
            labels.append(c)
            study_raw.append(raw.mean(axis=0))
            study_cal.append(apply_temperature(raw, temperature).mean(axis=0))
    y = np.array(labels)
    image_raw = np.concatenate(raw_rows)
    image_y = np.repeat(y, 2)
    s_raw, s_cal = np.stack(study_raw), np.stack(study_cal)
    threshold = effective_threshold(clf.meta.indeterminate_below)
    called = s_cal.max(axis=1) >= threshold
    right = s_cal.argmax(axis=1) == y
    return Fresh(
        studies=len(y),
        image_ece_before=expected_calibration_error(image_y, image_raw),
        image_ece_after=expected_calibration_error(
            image_y, apply_temperature(image_raw, temperature)),
        study_ece_before=expected_calibration_error(y, s_raw),
        study_ece_after=expected_calibration_error(y, s_cal),
        threshold=threshold,
        indeterminate_share=float(1 - called.mean()),
        accuracy_called=float(right[called].mean()) if called.any() else math.nan,
        accuracy_all=float(right.mean()))


def stored_line(clf: Classifier) -> str:
    """The training-time figures the model carries."""
    cal = clf.meta.calibration
    if not cal:
        return "  at training: none stored (exported before calibration: T 1, threshold 0.5)"

    def f(key: str) -> str:
        v = cal.get(key)
        return "n/a" if v is None else f"{float(v):.3f}"
    return (f"  at training ({cal.get('held_out_studies')} held-out studies): "
            f"T {clf.meta.temperature:.2f}, threshold {clf.meta.indeterminate_below:.2f}, "
            f"image ECE {f('image_ece_before')} -> {f('image_ece_after')}, study ECE "
            f"{f('study_ece_before')} -> {f('study_ece_after')} (cross-fitted), "
            f"indeterminate {100 * float(cal.get('indeterminate_share') or 0):.0f}%, "
            f"accuracy on the rest {f('accuracy_called')}")


def fresh_line(r: Fresh) -> str:
    """The fresh phantoms' figures."""
    return (f"  fresh phantoms ({r.studies} studies): image ECE {r.image_ece_before:.3f} -> "
            f"{r.image_ece_after:.3f}, study ECE {r.study_ece_before:.3f} -> "
            f"{r.study_ece_after:.3f}, threshold {r.threshold:.2f}: indeterminate "
            f"{100 * r.indeterminate_share:.0f}%, accuracy on the rest "
            f"{r.accuracy_called:.3f}, accuracy on all {r.accuracy_all:.3f}")


def _models(paths: list[str]) -> list[tuple[str, Path]]:
    if paths:
        return [(p, Path(p)) for p in paths]
    from bench.explain import demo_model
    from node.ops.phantoms import train_on_phantoms
    default = Path(tempfile.mkdtemp()) / "train-default.pt"
    print(f"training `python -m node train`'s default model into {default}")
    train_on_phantoms(default, baseline=False, progress=False)
    return [("demo's model", demo_model()), ("`node train` defaults", default)]


def main(argv: list[str] | None = None) -> None:
    """Print, per model, its stored and its fresh calibration figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="TorchScript model (repeatable; default: train the two above)")
    ap.add_argument("--per-class", type=int, default=25, help="fresh phantoms per class")
    args = ap.parse_args(argv)
    for name, path in _models(args.model):
        clf = Classifier(path, optimize=False)
        print(f"{name}: {path} ({clf.meta.training_data})")
        print(stored_line(clf))
        print(fresh_line(fresh_test(clf, args.per_class)))


if __name__ == "__main__":
    main()
