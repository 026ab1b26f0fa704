"""The input characteristics of a study as the worker feeds it to the model, for drift
(storage.drift, node.service.drift): manufacturer, matrix, pixel spacing and total counts
per view. Gathered instance by instance while the views are decoded anyway, so profiling
costs one sum per view and keeps nothing but numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset

from node.dicom.views import ViewImage
from storage.drift import StudyInputs

log = logging.getLogger(__name__)


def _spacing(ds: Dataset) -> str:
    """Pixel Spacing (top level, else the first detector's) as "2.40x2.40" mm; "" if none."""
    value = ds.get("PixelSpacing")
    if value is None:
        detectors = ds.get("DetectorInformationSequence") or []
        value = detectors[0].get("PixelSpacing") if len(detectors) else None
    try:
        return "x".join(f"{float(v):.2f}" for v in value) if value is not None else ""
    except (TypeError, ValueError):
        return ""


@dataclass
class InputProfile:
    """Accumulates one study's characteristics; `inputs()` gives what storage keeps."""

    manufacturer: str = ""
    matrix: str = ""
    pixel_spacing: str = ""
    views: int = 0
    _counts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, ds: Dataset, views: Sequence[ViewImage]) -> None:
        """One instance's headers and decoded views (the first instance's headers win)."""
        if not self.manufacturer:
            self.manufacturer = str(ds.get("Manufacturer", "") or "").strip()
        if not self.matrix and views:
            rows, cols = views[0].pixels.shape[:2]
            self.matrix = f"{rows}x{cols}"
        if not self.pixel_spacing:
            self.pixel_spacing = _spacing(ds)
        for v in views:
            self.views += 1
            total = float(np.sum(v.pixels, dtype=np.float64))
            self._counts.setdefault(v.view.value, []).append(total)

    def _mean(self, view: str) -> float | None:
        values = self._counts.get(view)
        return sum(values) / len(values) if values else None

    def inputs(self) -> StudyInputs:
        """The study's characteristics as stored with its result."""
        return StudyInputs(manufacturer=self.manufacturer, matrix=self.matrix,
                           pixel_spacing=self.pixel_spacing, views=self.views,
                           counts_anterior=self._mean("anterior"),
                           counts_posterior=self._mean("posterior"))
