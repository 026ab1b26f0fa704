"""Metrics against scikit-learn; patient-level split; augmentation geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from model.augment import AugmentParams, augment_batch
from model.metrics import compute_metrics
from model.split import SplitError, patient_split

NAMES = ("a", "b", "c", "d")


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=8, max_value=80))
def test_metrics_match_sklearn(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    y[:4] = [0, 1, 2, 3]  # every class present, so AUC is defined
    logits = rng.normal(size=(n, 4)) + np.eye(4)[y] * rng.uniform(0, 3)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, probs, NAMES)
    pred = probs.argmax(1)
    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert m.precision == pytest.approx(
        skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m.recall == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m.f1 == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m.auc == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m.confusion == skm.confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()
    cm = np.array(m.confusion)
    for c, name in enumerate(NAMES):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        assert m.per_class[name].specificity == pytest.approx(tn / (tn + fp) if tn + fp else 0)


def test_auc_perfect_and_inverted() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert compute_metrics(y, np.eye(4)[y], NAMES).auc == 1.0
    assert compute_metrics(y, 1 - np.eye(4)[y], NAMES).auc == 0.0


def test_split_keeps_patients_whole_and_is_stratified() -> None:
    pids = [f"p{i // 2}" for i in range(400)]  # two views per patient
    labels = [(i // 2) % 4 for i in range(400)]
    train, test = patient_split(pids, labels, 0.3, seed=3)
    assert set(train).isdisjoint(test) and len(train) + len(test) == 400
    assert {pids[i] for i in train}.isdisjoint({pids[i] for i in test})
    for c in range(4):
        n_test = sum(1 for i in test if labels[i] == c)
        n_all = labels.count(c)
        assert abs(n_test / n_all - 0.3) < 0.02
    again = patient_split(pids, labels, 0.3, seed=3)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(patient_split(pids, labels, 0.3, seed=4)[1], test)


def test_split_refuses_a_patient_in_two_classes() -> None:
    with pytest.raises(SplitError, match="two labels"):
        patient_split(["p1", "p1", "p2"], [0, 1, 0])


def test_augmentation_mirror_only_flips_and_shift_moves() -> None:
    x = torch.zeros(1, 1, 64, 16)
    x[0, 0, 10, 2] = 1.0
    gen = torch.Generator().manual_seed(0)
    flipped = augment_batch(x, gen, AugmentParams(0, 0.0, 1.0))
    assert torch.allclose(flipped, torch.flip(x, dims=[3]), atol=1e-4)
    shifted = augment_batch(x, gen, AugmentParams(3, 0.0, 0.0))
    assert float(shifted.sum()) == pytest.approx(1.0, abs=1e-4)
    r, c = divmod(int(shifted.flatten().argmax()), 16)
    assert abs(r - 10) <= 3 and abs(c - 2) <= 3


def test_augmentation_rotation_keeps_mass_near_centre() -> None:
    x = torch.zeros(1, 1, 256, 64)
    x[0, 0, 100:156, 24:40] = 1.0
    out = augment_batch(x, torch.Generator().manual_seed(1), AugmentParams(0, 3.0, 0.0))
    assert float(out.sum()) == pytest.approx(float(x.sum()), rel=0.02)
    assert not torch.equal(out, x)
