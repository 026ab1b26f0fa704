"""Evidence maps: where Dscint looked, for the result image.

Class activation maps of one class from a feature layer's activations A and the gradient G of
that class's logit with respect to them (the served module is TorchScript: no hooks, so the
verified module's scripted children are called one by one, `net.features` up to the split,
then the rest and `net.classifier`, which gives the logits; the exported softmax is left out):

- Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c mean(G_c) A_c);
- HiResCAM (Draelos and Carin 2020): ReLU(sum_c G_c A_c), the element-wise product, which is
  faithful to what the layers after the split compute;
- Grad-CAM++ (Chattopadhay et al. 2018): channel weights from positive gradients with
  second- and third-order terms.

Also `gradient_x_input` (the input's gradient times the input, optionally averaged over noisy
copies, SmoothGrad) and `attention_map` (CBAM's spatial attention, class-agnostic). Each map is
resized to the network input, rectified and scaled by its own maximum to [0, 1];
`to_view_grid` maps it back onto a view's pixel grid, undoing the preprocessing's padding and
resize. `bench.explain` measures them all (pointing game on phantoms); `evidence_maps` is the
one the node shows, SmoothGrad x input: the class activation maps of the last convolution
(63 x 15 cells of ~16 pixels) peak off lesions a few pixels wide far more often. Only Dscint's
layout (`net.features`, `net.classifier`) is supported; other networks raise ExplainError and
get no map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LAST_CONV_SPLIT = 15  # after the last convolution block's ReLU: 63 x 15 cells of ~16 px
EARLY_SPLIT = 7  # after the second convolution's ReLU, before its pooling: 127 x 31 cells
ATTENTION_INDEX = 3  # features[3] is the hybrid (CBAM) attention
DSCINT_FEATURE_LAYERS = 16
SMOOTH_PIXELS = 9  # input-gradient maps are box-smoothed so one noisy pixel is not the peak

CamRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExplainError(Exception):
    """The module has no layout an evidence map can be computed from."""


def _parts(module: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    net = getattr(module, "net", None)
    features = getattr(net, "features", None)
    classifier = getattr(net, "classifier", None)
    if features is None or classifier is None:
        raise ExplainError("no net.features / net.classifier: not a Dscint")
    kids = list(features.children())
    if len(kids) != DSCINT_FEATURE_LAYERS:
        raise ExplainError(f"net.features has {len(kids)} layers, expected Dscint's "
                           f"{DSCINT_FEATURE_LAYERS}")
    return kids, classifier


def _check_class(module_out: torch.Tensor, class_index: int) -> None:
    if not 0 <= class_index < module_out.shape[1]:
        raise ExplainError(f"class index {class_index} outside the model's "
                           f"{module_out.shape[1]} classes")


def _normalise(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> (N, rows, cols) in [0, 1], each map scaled by its own maximum (an all-zero
    map stays zero: no evidence, not noise blown up)."""
    maps = maps.detach().float()
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    maps = F.relu(maps)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (maps / peak).clamp(0, 1).numpy().astype(np.float32)


def activations_and_gradients(module: torch.nn.Module, batch: torch.Tensor, class_index: int,
                              split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations after `net.features[:split]` and the gradient of `class_index`'s logit."""
    kids, classifier = _parts(module)
    if not 0 < split < len(kids):
        raise ExplainError(f"split {split} outside net.features (1..{len(kids) - 1})")
    with torch.enable_grad():
        act = batch
        for layer in kids[:split]:
            act = layer(act)
        act = act.detach().requires_grad_(True)
        out = act.clone()  # the next layer may be an in-place ReLU: never on the leaf
        for layer in kids[split:]:
            out = layer(out)
        logits = classifier(out)
        _check_class(logits, class_index)
        (grad,) = torch.autograd.grad(logits[:, class_index].sum(), act)
    return act.detach(), grad


def grad_cam_rule(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: channels weighted by their mean gradient."""
    return (grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1)


def hires_cam_rule(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """HiResCAM: gradient times activation, element-wise, summed over channels."""
    return (grad * act).sum(dim=1)


def grad_cam_pp_rule(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ with the exponential-logit closed form of its alpha coefficients."""
    g2, g3 = grad.pow(2), grad.pow(3)
    total = act.sum(dim=(2, 3), keepdim=True)
    denominator = 2 * g2 + total * g3
    alpha = g2 / denominator.where(denominator != 0, torch.ones_like(denominator))
    weights = (alpha * F.relu(grad)).sum(dim=(2, 3), keepdim=True)
    return (weights * act).sum(dim=1)


CAM_RULES: dict[str, CamRule] = {"grad-cam": grad_cam_rule, "hirescam": hires_cam_rule,
                                 "grad-cam++": grad_cam_pp_rule}


def class_activation_map(module: torch.nn.Module, batch: torch.Tensor, class_index: int,
                         split: int = LAST_CONV_SPLIT, rule: str = "grad-cam") -> np.ndarray:
    """Maps (N, rows, cols) in [0, 1] of `class_index` for a preprocessed batch."""
    if rule not in CAM_RULES:
        raise ExplainError(f"unknown map rule {rule!r}; expected one of {sorted(CAM_RULES)}")
    act, grad = activations_and_gradients(module, batch, class_index, split)
    return _normalise(CAM_RULES[rule](act, grad), (batch.shape[2], batch.shape[3]))


def grad_cam(module: torch.nn.Module, batch: torch.Tensor, class_index: int,
             split: int = LAST_CONV_SPLIT) -> np.ndarray:
    """Grad-CAM maps (N, rows, cols) in [0, 1] of `class_index` for a preprocessed batch."""
    return class_activation_map(module, batch, class_index, split, "grad-cam")


def gradient_x_input(module: torch.nn.Module, batch: torch.Tensor, class_index: int,
                     samples: int = 1, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """ReLU(input x gradient of the class logit) (N, rows, cols) in [0, 1], the gradient
    summed over `samples` copies with Gaussian noise of sd `noise` (SmoothGrad), box-smoothed
    over SMOOTH_PIXELS. One copy at a time: the peak stays one batch's backward pass (+24 MiB
    for two views; all 4 copies in one pass: +89 MiB, and no faster by the minimum, 0.71 s
    against 0.73 s for a study on the 2 shared cores)."""
    kids, classifier = _parts(module)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(batch)
    for _ in range(max(1, samples)):
        x = batch + noise * torch.randn(batch.shape, generator=gen) if noise else batch.clone()
        x.requires_grad_(True)
        with torch.enable_grad():
            out = x
            for layer in kids:
                out = layer(out)
            logits = classifier(out)
            _check_class(logits, class_index)
            (grad,) = torch.autograd.grad(logits[:, class_index].sum(), x)
        total += grad
    saliency = F.relu(total * batch)
    smooth = F.avg_pool2d(saliency, SMOOTH_PIXELS, 1, SMOOTH_PIXELS // 2)[:, 0]
    return _normalise(smooth, (batch.shape[2], batch.shape[3]))


def attention_map(module: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """CBAM spatial attention (N, rows, cols) in [0, 1]: class-agnostic."""
    kids, _ = _parts(module)
    attention = kids[ATTENTION_INDEX]
    if not (hasattr(attention, "channel") and hasattr(attention, "spatial")):
        raise ExplainError(f"net.features[{ATTENTION_INDEX}] is not a CBAM attention")
    with torch.inference_mode():
        x = batch
        for layer in kids[:ATTENTION_INDEX]:
            x = layer(x)
        x = x * attention.channel(x)  # type: ignore[operator]
        spatial = attention.spatial(x)[:, 0]  # type: ignore[operator]
    return _normalise(spatial, (batch.shape[2], batch.shape[3]))


def to_view_grid(evidence: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (rows, cols) map on the network's input grid put back on a view of `shape`: the
    inverse of `model.preprocess` (centred padding to the input's aspect ratio, then a
    bilinear resize), so the map lies over the pixels it was computed from."""
    rows, cols = evidence.shape
    h, w = shape
    if (h, w) == (rows, cols):
        return evidence
    padded_h, padded_w = h, w
    if h / w > rows / cols:
        padded_w = round(h / (rows / cols))
    elif h / w < rows / cols:
        padded_h = round(w * (rows / cols))
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(evidence))[None, None],
                       size=(padded_h, padded_w), mode="bilinear", align_corners=False)[0, 0]
    top, left = (padded_h - h) // 2, (padded_w - w) // 2
    return up[top:top + h, left:left + w].clamp(0, 1).numpy().astype(np.float32)


EVIDENCE_SAMPLES = 4  # SmoothGrad copies: one forward and backward pass of the batch each
EVIDENCE_NOISE = 0.6  # their noise sd: 15 % of the preprocessed range [0, clip_max = 4]
EVIDENCE_NAME = "SmoothGrad x input"  # what the result image calls its overlay
EVIDENCE_METHOD = f"{EVIDENCE_NAME}, {EVIDENCE_SAMPLES} samples, noise sd {EVIDENCE_NOISE}"


def evidence_maps(module: torch.nn.Module, batch: torch.Tensor, class_index: int
                  ) -> np.ndarray:
    """The map the node shows, (N, rows, cols) in [0, 1]: SmoothGrad x input, which found the
    lesions of phantoms best of the maps `bench.explain` measures (Grad-CAM's 63 x 15 cells
    of the last convolution are too coarse for lesions a few pixels wide). Seeded: the same
    study gives the same map."""
    return gradient_x_input(module, batch, class_index, EVIDENCE_SAMPLES, EVIDENCE_NOISE)
