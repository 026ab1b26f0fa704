"""Turn raw count images into the network's input; the same code serves training and inference.

Counts differ by an order of magnitude between patients, cameras and tracers, so each view is
scaled by a high percentile of its own counts and clipped. The parameters travel inside every
exported model and the classifier refuses a model whose parameters it does not implement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.classes import INPUT_COLS, INPUT_ROWS

PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides the input tensor; stored in model metadata."""

    version: int = PREPROCESS_VERSION
    rows: int = INPUT_ROWS
    cols: int = INPUT_COLS
    norm_percentile: float = 99.5
    clip_max: float = 4.0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-friendly form for model metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, float | int]) -> PreprocessParams:
        """Inverse of to_dict; unknown keys are an error so a newer model is not misread."""
        known = set(cls.__dataclass_fields__)
        extra = set(raw) - known
        if extra:
            raise ValueError(f"unknown preprocessing parameters: {sorted(extra)}")
        return cls(
            version=int(raw.get("version", PREPROCESS_VERSION)),
            rows=int(raw.get("rows", INPUT_ROWS)),
            cols=int(raw.get("cols", INPUT_COLS)),
            norm_percentile=float(raw.get("norm_percentile", 99.5)),
            clip_max=float(raw.get("clip_max", 4.0)),
        )


def _fit_geometry(img: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad to the target aspect ratio (centred), then resize bilinearly to rows x cols."""
    h, w = img.shape[-2:]
    if (h, w) == (rows, cols):
        return img
    target_ratio = rows / cols
    if h / w > target_ratio:  # too tall: pad columns
        new_w = round(h / target_ratio)
        pad = new_w - w
        img = F.pad(img, (pad // 2, pad - pad // 2, 0, 0))
    elif h / w < target_ratio:  # too wide: pad rows
        new_h = round(w * target_ratio)
        pad = new_h - h
        img = F.pad(img, (0, 0, pad // 2, pad - pad // 2))
    resized = F.interpolate(img[None, None], size=(rows, cols), mode="bilinear",
                            align_corners=False)
    return resized[0, 0]


def _percentile(img: torch.Tensor, q: float) -> float:
    """Nearest-rank percentile via kthvalue (a full sort is 5x slower on a 1024x256 view)."""
    flat = img.flatten()
    k = min(flat.numel(), max(1, int(np.ceil(q / 100.0 * flat.numel()))))
    return float(torch.kthvalue(flat, k).values)


def preprocess_view(counts: np.ndarray, params: PreprocessParams | None = None) -> torch.Tensor:
    """One 2-D count image -> float32 tensor (1, rows, cols) in [0, clip_max]."""
    p = params or PreprocessParams()
    if counts.ndim != 2:
        raise ValueError(f"expected a 2-D view, got shape {counts.shape}")
    img = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32))
    img = torch.clamp(img, min=0.0)  # signed storage and lossy codecs give small negatives
    img = _fit_geometry(img, p.rows, p.cols)
    scale = max(_percentile(img, p.norm_percentile), 1.0)
    return torch.clamp(img / scale, max=p.clip_max)[None].contiguous()


def preprocess_batch(views: Sequence[np.ndarray], params: PreprocessParams | None = None
                     ) -> torch.Tensor:
    """Several views -> (N, 1, rows, cols)."""
    return torch.stack([preprocess_view(v, params) for v in views])


def mirror(counts: np.ndarray) -> np.ndarray:
    """Left-right mirror (paper §2.2.1): stands in for a missing anterior/posterior view."""
    return np.ascontiguousarray(counts[:, ::-1])
