"""Parametric augmentation of paper §2.2: mirroring, translation by ±t px, rotation by ±r degrees.

Applied on the fly to training batches only (the paper augmented before splitting, which leaks
near-copies of test images into training; this never does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """t (pixels), r (degrees) and the mirroring probability."""

    max_shift_px: int = 5
    max_rotation_deg: float = 3.0
    mirror_probability: float = 0.5


def augment_batch(x: torch.Tensor, gen: torch.Generator, p: AugmentParams) -> torch.Tensor:
    """Random mirror, shift and rotation per image of an (N, 1, H, W) batch."""
    n, _, h, w = x.shape
    if p.max_shift_px == 0 and p.max_rotation_deg == 0 and p.mirror_probability == 0:
        return x
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(p.max_rotation_deg)
    shift = torch.randint(-p.max_shift_px, p.max_shift_px + 1, (n, 2), generator=gen).float()
    flip = torch.where(torch.rand(n, generator=gen) < p.mirror_probability, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid works in normalised coordinates; correct rotation for the 4:1 aspect ratio.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * w / h * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = shift[:, 0] * 2 / w
    theta[:, 1, 2] = shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
