"""Evidence maps: where Dscint looked, for the result image.

Grad-CAM (Selvaraju et al. 2017) for one class: the activations of a feature layer weighted
by the mean gradient of that class's logit, rectified, scaled to [0, 1] and resized to the
input. The served module is TorchScript (hooks are not available), so the verified module's
scripted children are called one by one: `net.features` up to the split, then the rest and
`net.classifier`, which gives the logits (the exported wrapper's softmax is left out).
`attention_map` is the alternative the issue asks to measure: CBAM's spatial attention.
Only Dscint's layout (`net.features`, `net.classifier`) is supported; other networks raise
ExplainError and get no map.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

GRADCAM_SPLIT = 15  # after the last convolution block's ReLU, before the last pooling
ATTENTION_INDEX = 3  # features[3] is the hybrid (CBAM) attention


class ExplainError(Exception):
    """The module has no layout an evidence map can be computed from."""


def _parts(module: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    net = getattr(module, "net", None)
    features = getattr(net, "features", None)
    classifier = getattr(net, "classifier", None)
    if features is None or classifier is None:
        raise ExplainError("no net.features / net.classifier: not a Dscint")
    kids = list(features.children())
    if len(kids) <= GRADCAM_SPLIT:
        raise ExplainError(f"net.features has {len(kids)} layers, expected Dscint's 16")
    return kids, classifier


def _normalise(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, rows, cols) in [0, 1], each map scaled by its own maximum."""
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (up / peak).clamp(0, 1).numpy().astype(np.float32)


def grad_cam(module: torch.nn.Module, batch: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM maps (N, rows, cols) in [0, 1] of `class_index` for a preprocessed batch."""
    kids, classifier = _parts(module)
    with torch.enable_grad():
        act = batch
        for layer in kids[:GRADCAM_SPLIT]:
            act = layer(act)
        act = act.detach().requires_grad_(True)
        out = act.clone()  # the next layer may be an in-place ReLU: never on the leaf
        for layer in kids[GRADCAM_SPLIT:]:
            out = layer(out)
        logits = classifier(out)
        (grad,) = torch.autograd.grad(logits[:, class_index].sum(), act)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.detach()).sum(dim=1))
    return _normalise(cam, (batch.shape[2], batch.shape[3]))


def attention_map(module: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """CBAM spatial attention (N, rows, cols) in [0, 1]: class-agnostic."""
    kids, _ = _parts(module)
    attention = kids[ATTENTION_INDEX]
    with torch.inference_mode():
        x = batch
        for layer in kids[:ATTENTION_INDEX]:
            x = layer(x)
        x = x * attention.channel(x)  # type: ignore[operator]
        spatial = attention.spatial(x)[:, 0]  # type: ignore[operator]
    return _normalise(spatial, (batch.shape[2], batch.shape[3]))
