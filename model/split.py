"""Patient-level, stratified, seeded train/test split (paper §3.1: never split a patient)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Labels = Sequence[int] | np.ndarray


class SplitError(ValueError):
    """The data cannot be split as asked (e.g. a patient carries two labels)."""


def patient_labels(patient_ids: Sequence[str], labels: Labels) -> dict[str, int]:
    """One label per patient; a patient in two classes is an error, not a silent choice."""
    out: dict[str, int] = {}
    for pid, lab in zip(patient_ids, labels, strict=True):
        if out.setdefault(pid, int(lab)) != int(lab):
            raise SplitError(f"patient {pid!r} appears with two labels ({out[pid]} and {lab})")
    return out


def patient_split(patient_ids: Sequence[str], labels: Labels, test_fraction: float = 0.3,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of images; each class's patients are split test_fraction : rest."""
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"test_fraction must be in (0, 1), got {test_fraction}")
    per_patient = patient_labels(patient_ids, labels)
    rng = np.random.default_rng(seed)
    test_patients: set[str] = set()
    for cls in sorted(set(per_patient.values())):
        members = sorted(p for p, c in per_patient.items() if c == cls)
        rng.shuffle(members)
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test_patients.update(members[:n_test])
    is_test = np.array([p in test_patients for p in patient_ids], dtype=bool)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)
