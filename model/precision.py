"""Serving precision: FC1 in int8, verified against the fp32 model it came from.

FC1 (19,032 x 1,024, 95 % of Dscint's weights) dominates inference at batch 1: it streams 78 MB
of fp32 weights per call. Measured here (bench.inference, one thread, CPU clock; ms per image
for FC1 alone at batch 1 / 8): fp32 3.1 / 1.25, bf16 weights 4.0 / 0.6 (oneDNN's bf16 GEMV is
no faster than fp32 at batch 1, even with AVX512-BF16), int8 dynamic quantisation (fbgemm,
per-channel weights) 0.5 / 0.17. So int8 it is, and only for large linear layers (the convolutions
stay fp32). The model file keeps the fp32 weights: they are the reference the int8 copy is checked
against, at export and again at every load, on held-out phantom studies regenerated from fixed
seeds (above any seed a training set draws, so never trained on). The int8 copy is served only
when it predicts the fp32 model's class on at least MIN_AGREEMENT of them; the largest
probability difference is recorded beside it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from model.calibration import apply_temperature
from model.classes import CLASS_NAMES
from model.phantoms import generate_study
from model.preprocess import PreprocessParams, preprocess_view

log = logging.getLogger(__name__)

FP32, INT8 = "fp32", "int8"
PRECISIONS: tuple[str, ...] = (FP32, INT8)
AUTO = "auto"  # what the model's metadata chose at export
MIN_AGREEMENT = 0.995  # share of held-out images on which int8 must predict fp32's class
INT8_MIN_WEIGHTS = 4_000_000  # linear layers at least this large go to int8 (FC1: 19.5 M)
VERIFY_STUDIES = 100  # held-out phantom studies (two views each: 200 images)
VERIFY_SEED_BASE = 3 * 2**40  # training draws study seeds below 2**41 (model.phantoms)
VERIFY_DIFFICULTY = 0.5
_CHUNK_STUDIES = 4  # studies generated and compared at a time: memory stays ~8 images
_GRAD_ROWS = 64  # FC1 rows dequantised at a time for an evidence map's backward pass


class PrecisionError(Exception):
    """This model cannot be served in the precision asked for."""


@dataclass(frozen=True)
class PrecisionCheck:
    """A low-precision copy compared with the fp32 model on held-out images."""

    precision: str
    images: int
    agreement: float  # share of images with the same arg-max class
    max_prob_diff: float  # largest |calibrated probability difference|, any image and class
    min_agreement: float = MIN_AGREEMENT
    verification_set: str = ""

    @property
    def passed(self) -> bool:
        """Enough images, enough agreement, and finite probabilities."""
        return self.images > 0 and math.isfinite(self.max_prob_diff) \
            and self.agreement >= self.min_agreement

    def summary(self) -> str:
        """One log line's worth."""
        return (f"{self.precision} predicts the fp32 class on {self.agreement:.2%} of "
                f"{self.images} held-out images (needed {self.min_agreement:.1%}), largest "
                f"probability difference {self.max_prob_diff:.2g}")

    def to_dict(self) -> dict[str, Any]:
        """Stored in the model's metadata."""
        return {"precision": self.precision, "images": self.images,
                "agreement": round(self.agreement, 6),
                "max_prob_diff": self.max_prob_diff if math.isfinite(self.max_prob_diff)
                else None,
                "min_agreement": self.min_agreement, "verification_set": self.verification_set}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PrecisionCheck:
        """Parse metadata; ValueError naming what is wrong."""
        try:
            diff = doc.get("max_prob_diff")
            check = cls(precision=str(doc["precision"]), images=int(doc["images"]),
                        agreement=float(doc["agreement"]),
                        max_prob_diff=math.nan if diff is None else float(diff),
                        min_agreement=float(doc.get("min_agreement", MIN_AGREEMENT)),
                        verification_set=str(doc.get("verification_set", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"precision check is malformed: {exc!r}") from exc
        if check.precision not in PRECISIONS:
            raise ValueError(f"precision check of unknown precision {check.precision!r}")
        return check


def verification_set(studies: int) -> str:
    """What the check ran on, in words (stored with it)."""
    return (f"{studies} phantom studies ({2 * studies} images), seeds {VERIFY_SEED_BASE}+i, "
            f"difficulty {VERIFY_DIFFICULTY}, classes in turn")


def _held_out_batch(params: PreprocessParams, first: int, stop: int) -> torch.Tensor:
    """Studies first..stop-1 of the verification set, both views, preprocessed."""
    views = []
    for i in range(first, stop):
        study = generate_study(CLASS_NAMES[i % len(CLASS_NAMES)], VERIFY_SEED_BASE + i,
                               VERIFY_DIFFICULTY)
        views += [preprocess_view(study.anterior, params), preprocess_view(study.posterior,
                                                                           params)]
    return torch.stack(views)


Module = Callable[[torch.Tensor], torch.Tensor]


def compare(reference: Module, candidate: Module, params: PreprocessParams, temperature: float,
            precision: str = INT8, studies: int = VERIFY_STUDIES,
            min_agreement: float = MIN_AGREEMENT) -> PrecisionCheck:
    """Run both modules on the held-out studies, a few at a time (bounded memory), and count
    agreement of the served (calibrated) probabilities' arg-max."""
    agree, images, worst = 0, 0, 0.0
    with torch.inference_mode():
        for first in range(0, studies, _CHUNK_STUDIES):
            x = _held_out_batch(params, first, min(first + _CHUNK_STUDIES, studies))
            want = apply_temperature(reference(x).double().numpy(), temperature)
            got = candidate(x)
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != want.shape:
                return PrecisionCheck(precision, 0, 0.0, math.nan, min_agreement,
                                      verification_set(studies))
            have = apply_temperature(got.double().numpy(), temperature)
            agree += int((have.argmax(axis=1) == want.argmax(axis=1)).sum())
            images += len(x)
            worst = max(worst, float(np.abs(have - want).max()))  # NaN propagates
    return PrecisionCheck(precision, images, agree / max(images, 1), worst, min_agreement,
                          verification_set(studies))


class _Net(nn.Module):
    """Dscint's layout: features, then classifier."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Softmax(nn.Module):
    """The exported wrapper's shape: `net`, probabilities out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


class Int8Linear(DynamicLinear):  # type: ignore[misc]
    """torch's dynamic int8 linear with 8-bit activations (torch's own uses 7 bits, a margin
    against overflow on CPUs without VNNI): FC1's output error 0.6x on this AVX512-VNNI CPU at
    the same speed. Where 8 bits would saturate, the held-out check sees it and fp32 serves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(  # type: ignore[no-any-return]
            x, self._packed_params._packed_params, reduce_range=False)


def _int8_linear(layer: nn.Module) -> nn.Module:
    """A dynamically quantised copy (int8 per-channel weights) of a scripted linear layer; the
    fp32 weight is read in place, not copied."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    weight = cast(torch.Tensor, layer.weight).detach()
    bias = cast(torch.Tensor | None, getattr(layer, "bias", None))
    eager = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device="meta")  # no 78 MB of fresh weights just to replace them
    eager.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        eager.bias = nn.Parameter(bias.detach(), requires_grad=False)
    eager.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensor types (a future
        warnings.filterwarnings("ignore", message=".*quantized tensor creation")  # release
        return Int8Linear.from_float(eager)  # without them fails here: fp32 then serves


def _is_large_linear(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return getattr(layer, "original_name", type(layer).__name__) == "Linear" \
        and isinstance(weight, torch.Tensor) and weight.numel() >= INT8_MIN_WEIGHTS


def int8_module(verified: nn.Module) -> tuple[nn.Module, list[str]]:
    """An eager module computing what `verified` (Dscint's layout: `net.features`,
    `net.classifier`) computes, with its large linear layers in int8; everything else is the
    verified module's own (scripted, fp32) layers, shared. Also the names of the layers made int8.
    PrecisionError when the layout is not Dscint's or nothing is large enough to matter."""
    net = getattr(verified, "net", None)
    features = getattr(net, "features", None)
    classifier = getattr(net, "classifier", None)
    if features is None or classifier is None:
        raise PrecisionError("no net.features / net.classifier: int8 serving supports "
                             "Dscint's layout only")
    kids, names = [], []
    for i, layer in enumerate(classifier.children()):
        if _is_large_linear(layer):
            kids.append(_int8_linear(layer))
            names.append(f"net.classifier.{i}")
        else:
            kids.append(layer)
    if not names:
        raise PrecisionError(f"no linear layer of {INT8_MIN_WEIGHTS} weights or more")
    return _Softmax(_Net(features, nn.Sequential(*kids))), names


class _Int8Backward(torch.autograd.Function):
    """Forward through the int8 layer; the input gradient from its dequantised weight, a few
    rows at a time (never a whole fp32 copy of FC1). Weights get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return cast(torch.Tensor, layer(x))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = grads
        qweight = ctx.layer.weight()  # (out, in) int8 with per-channel scales (unpacked)
        out = torch.zeros(grad.shape[0], qweight.shape[1], dtype=grad.dtype)
        for r in range(0, qweight.shape[0], _GRAD_ROWS):
            rows = slice(r, r + _GRAD_ROWS)
            out += grad[:, rows] @ qweight[rows].dequantize().to(grad.dtype)
        return out, None


class _DifferentiableInt8(nn.Module):
    """An int8 linear layer evidence maps can take gradients through."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _Int8Backward.apply(x, self.layer))


def differentiable(module: nn.Module) -> nn.Module:
    """The int8 module from `int8_module`, with gradients through its int8 layers (for
    Grad-CAM): the same layers and weights, nothing copied."""
    net = cast(_Net, cast(_Softmax, module).net)
    kids = [_DifferentiableInt8(k) if not isinstance(k, torch.jit.ScriptModule)
            and hasattr(k, "_packed_params") else k for k in net.classifier.children()]
    return _Softmax(_Net(net.features, nn.Sequential(*kids)))
