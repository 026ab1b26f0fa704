"""Study classification with an exported Dscint: views in, per-view and per-study probabilities out.

A study's views are classified in one batch and combined by averaging their probabilities
(anterior and posterior views combined). A missing anterior or posterior view is stood in for by
the left-right mirror of the other (paper §2.2.1), as during training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.export import ModelFileError, ModelMetadata, load_torchscript
from model.preprocess import mirror, preprocess_batch

log = logging.getLogger(__name__)

ANTERIOR, POSTERIOR, UNKNOWN = "anterior", "posterior", "unknown"
_OPPOSITE = {ANTERIOR: POSTERIOR, POSTERIOR: ANTERIOR}


@dataclass(frozen=True)
class ViewPrediction:
    """One classified view; `mirrored_from` names the view it was mirrored from, if any."""

    view: str
    mirrored_from: str | None
    probabilities: dict[str, float]

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'posterior (mirrored from anterior)'."""
        return f"{self.view} (mirrored from {self.mirrored_from})" if self.mirrored_from \
            else self.view


@dataclass(frozen=True)
class StudyPrediction:
    """Views combined: mean probability per class and the arg-max class."""

    predicted_class: str
    probabilities: dict[str, float]
    views: tuple[ViewPrediction, ...]


def plan_views(views: Sequence[tuple[str, np.ndarray]]
               ) -> list[tuple[str, str | None, np.ndarray]]:
    """Decide what to classify: every given view plus a mirrored stand-in for a missing one."""
    if not views:
        raise ValueError("a study needs at least one view to classify")
    planned: list[tuple[str, str | None, np.ndarray]] = [(v, None, img) for v, img in views]
    present = {v for v, _ in views}
    if len(views) == 1:
        (view, img), = views
        stand_in = _OPPOSITE.get(view, UNKNOWN)
        planned.append((stand_in, view, mirror(img)))
    elif present == {ANTERIOR} or present == {POSTERIOR}:
        first_view, first_img = views[0]
        planned.append((_OPPOSITE[first_view], first_view, mirror(first_img)))
    return planned


class Classifier:
    """Loads a TorchScript Dscint once and classifies studies under inference mode."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.path = path
        self.module, self.meta = load_torchscript(path)
        self._check_runs()
        log.info("loaded model %s version %s sha256 %s (%s)", path.name, self.meta.version,
                 self.meta.weights_sha256[:12], self.meta.training_data)

    @property
    def metadata(self) -> ModelMetadata:
        """The verified metadata embedded in the model file."""
        return self.meta

    def _check_runs(self) -> None:
        """One dummy forward at load time, so a broken model fails start-up, not a study."""
        c, h, w = self.meta.input_shape
        with torch.inference_mode():
            out = self.module(torch.zeros(1, c, h, w))
        if tuple(out.shape) != (1, len(self.meta.class_names)):
            raise ModelFileError(f"model output shape {tuple(out.shape)} does not match "
                                 f"{len(self.meta.class_names)} classes")

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N, classes) for raw count images."""
        batch = preprocess_batch(images, self.meta.preprocessing)
        with torch.inference_mode():
            probs = self.module(batch)
        return probs.double().numpy()

    def classify_study(self, views: Sequence[tuple[str, np.ndarray]]) -> StudyPrediction:
        """Classify all views of one study and combine them."""
        planned = plan_views(views)
        probs = self.predict_images([img for _, _, img in planned])
        names = self.meta.class_names
        per_view = tuple(
            ViewPrediction(view, src, {n: float(p) for n, p in zip(names, row, strict=True)})
            for (view, src, _), row in zip(planned, probs, strict=True)
        )
        mean = probs.mean(axis=0)
        study = {n: float(p) for n, p in zip(names, mean, strict=True)}
        return StudyPrediction(names[int(np.argmax(mean))], study, per_view)
