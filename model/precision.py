"""Serving precision: FC1 in int8 or fp16, verified against the fp32 model it came from.

FC1 (19,032 x 1,024, 95 % of Dscint's weights) dominates inference at batch 1: it streams 78 MB
of fp32 weights per call. Measured here (bench.inference on a trained Dscint, one thread, CPU
clock; ms per image for FC1 alone at batch 1 / 8): fp32 3.0 / 1.13, bf16 weights 2.8 / 0.36
(oneDNN's bf16 GEMV gains nothing at batch 1), int8 dynamic quantisation (fbgemm, per-channel
weights, 8-bit activations, one image per call) 0.41 / 0.42, fp16 weights (fbgemm's packed fp16
GEMM, fp32 activations) 1.25 / 0.33. Only large linear layers are reduced (the convolutions stay
fp32).

int8 is fastest but quantises FC1's input too (one scale for 19,032 activations): on trained
models it moves probabilities by ~0.01 (0.2 seen) and can flip a close call. fp16 keeps the
activations in fp32 and rounds the weights to 11 significant bits (probabilities move ~4e-5).
So the precisions form a ladder, fastest first (LADDER: int8, then fp16, then fp32): a rung
is served only when it predicts the fp32 model's class on at least MIN_AGREEMENT of held-out
images and moves no calibrated probability by more than MAX_PROB_DIFF, on phantom studies
regenerated from fixed seeds (above any seed a training set draws, so never trained on); a
rung that fails is logged with its figures and the next one is tried. The model
file keeps the fp32 weights: they are the reference the reduced copy is checked against, at
export and again at every load; the largest probability difference is recorded beside it.
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

FP32, INT8, FP16 = "fp32", "int8", "fp16"
PRECISIONS: tuple[str, ...] = (FP32, INT8, FP16)
LADDER: tuple[str, ...] = (INT8, FP16)  # reduced precisions, fastest first; fp32 below them
AUTO = "auto"  # at export: the fastest rung that passes; at load: what the metadata chose
MIN_AGREEMENT = 0.995  # share of held-out images on which a rung must predict fp32's class
# and no calibrated probability may move further than this on any of them: the SR, the image
# and the indeterminate threshold show probabilities, not only the class (0.22 was seen)
MAX_PROB_DIFF = 0.05
REDUCED_MIN_WEIGHTS = 4_000_000  # linear layers at least this large are reduced (FC1: 19.5 M)
VERIFY_STUDIES = 100  # held-out phantom studies (two views each: 200 images)
VERIFY_SEED_BASE = 3 * 2**40  # training draws study seeds below 2**41 (model.phantoms)
VERIFY_DIFFICULTY = 0.5
_CHUNK_STUDIES = 4  # studies generated and compared at a time: memory stays ~8 images
_GRAD_ROWS = 64  # FC1 rows unpacked at a time for an evidence map's backward pass


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
    max_allowed_diff: float = MAX_PROB_DIFF

    @property
    def passed(self) -> bool:
        """Enough images, enough agreement, and finite probabilities that stay close."""
        return self.images > 0 and math.isfinite(self.max_prob_diff) \
            and self.agreement >= self.min_agreement \
            and self.max_prob_diff <= self.max_allowed_diff

    def summary(self) -> str:
        """One log line's worth."""
        return (f"{self.precision} predicts the fp32 class on {self.agreement:.2%} of "
                f"{self.images} held-out images (needed {self.min_agreement:.1%}), largest "
                f"probability difference {self.max_prob_diff:.2g} (allowed "
                f"{self.max_allowed_diff:.2g})")

    def to_dict(self) -> dict[str, Any]:
        """Stored in the model's metadata."""
        return {"precision": self.precision, "images": self.images,
                "agreement": round(self.agreement, 6),
                "max_prob_diff": self.max_prob_diff if math.isfinite(self.max_prob_diff)
                else None,
                "min_agreement": self.min_agreement, "verification_set": self.verification_set,
                "max_allowed_diff": self.max_allowed_diff}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PrecisionCheck:
        """Parse metadata; ValueError naming what is wrong."""
        try:
            diff = doc.get("max_prob_diff")
            check = cls(precision=str(doc["precision"]), images=int(doc["images"]),
                        agreement=float(doc["agreement"]),
                        max_prob_diff=math.nan if diff is None else float(diff),
                        min_agreement=float(doc.get("min_agreement", MIN_AGREEMENT)),
                        verification_set=str(doc.get("verification_set", "")),
                        max_allowed_diff=float(doc.get("max_allowed_diff", MAX_PROB_DIFF)))
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
    the same speed. Where 8 bits would saturate, the held-out check sees it and the next rung
    serves. One image per call: fbgemm takes one activation scale per call, so in a batch an
    image's result would depend on its batch-mates (the check's 8-image chunks moved a trained
    model's probabilities 3x more than images alone) and the check would not test what serves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_params._packed_params
        rows = [torch.ops.quantized.linear_dynamic(x[i:i + 1], packed, reduce_range=False)
                for i in range(x.shape[0])]
        return torch.cat(rows) if rows else torch.ops.quantized.linear_dynamic(
            x, packed, reduce_range=False)


def _reduced_linear(layer: nn.Module, precision: str) -> nn.Module:
    """A copy of a scripted linear layer for fbgemm: int8 per-channel weights (dynamic 8-bit
    activations) or fp16 weights (fp32 activations); the fp32 weight is read in place, not
    copied."""
    from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig

    weight = cast(torch.Tensor, layer.weight).detach()
    bias = cast(torch.Tensor | None, getattr(layer, "bias", None))
    eager = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device="meta")  # no 78 MB of fresh weights just to replace them
    eager.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        eager.bias = nn.Parameter(bias.detach(), requires_grad=False)
    int8 = precision == INT8
    eager.qconfig = per_channel_dynamic_qconfig if int8 \
        else float16_dynamic_qconfig  # type: ignore[assignment]
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensor types (a future
        warnings.filterwarnings("ignore", message=".*quantized tensor creation")  # release
        # without them fails here: the next rung then serves)
        return (Int8Linear if int8 else DynamicLinear).from_float(eager)


def _is_large_linear(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return getattr(layer, "original_name", type(layer).__name__) == "Linear" \
        and isinstance(weight, torch.Tensor) and weight.numel() >= REDUCED_MIN_WEIGHTS


def reduced_module(verified: nn.Module, precision: str) -> tuple[nn.Module, list[str]]:
    """An eager module computing what `verified` (Dscint's layout: `net.features`,
    `net.classifier`) computes, with its large linear layers in `precision` (INT8 or FP16);
    everything else is the verified module's own (scripted, fp32) layers, shared. Also the
    names of the layers reduced. PrecisionError when the layout is not Dscint's or nothing is
    large enough to matter."""
    if precision not in LADDER:
        raise ValueError(f"no reduced module in {precision!r}; one of {LADDER}")
    net = getattr(verified, "net", None)
    features = getattr(net, "features", None)
    classifier = getattr(net, "classifier", None)
    if features is None or classifier is None \
            or getattr(net, "original_name", type(net).__name__) != "Dscint":
        raise PrecisionError("not a Dscint (net.features, then net.classifier): "
                             "reduced-precision serving supports Dscint's layout only")
    kids, names = [], []
    for i, layer in enumerate(classifier.children()):
        if _is_large_linear(layer):
            kids.append(_reduced_linear(layer, precision))
            names.append(f"net.classifier.{i}")
        else:
            kids.append(layer)
    if not names:
        raise PrecisionError(f"no linear layer of {REDUCED_MIN_WEIGHTS} weights or more")
    return _Softmax(_Net(features, nn.Sequential(*kids))), names


def int8_module(verified: nn.Module) -> tuple[nn.Module, list[str]]:
    """`reduced_module` in int8."""
    return reduced_module(verified, INT8)


def ladder_from(precision: str) -> tuple[str, ...]:
    """The rungs to try for a request: AUTO the whole ladder, a reduced precision itself and
    the rungs below it, FP32 none. ValueError for anything else."""
    if precision == AUTO:
        return LADDER
    if precision == FP32:
        return ()
    if precision not in LADDER:
        raise ValueError(f"precision must be one of {(AUTO, *PRECISIONS)}, got {precision!r}")
    return LADDER[LADDER.index(precision):]


@dataclass(frozen=True)
class Rung:
    """A reduced-precision copy that passed its held-out check."""

    precision: str
    module: nn.Module  # eager: its fp32 layers are the verified module's own
    scripted: torch.jit.ScriptModule  # the same, scripted: what serves and what was checked
    layers: list[str]
    check: PrecisionCheck


def climb(verified: torch.jit.ScriptModule, params: PreprocessParams, temperature: float,
          rungs: tuple[str, ...], who: str, studies: int = VERIFY_STUDIES
          ) -> tuple[Rung | None, list[PrecisionCheck]]:
    """Try `rungs` in order (fastest first) against `verified` on the held-out studies: the
    first that passes, or None (serve fp32), and every check made. Each refusal is a WARNING
    naming the rung and why (its figures, or the error building it); `who` starts each line."""
    checks: list[PrecisionCheck] = []
    for precision in rungs:
        try:
            module, layers = reduced_module(verified, precision)
            scripted = torch.jit.script(module)
            check = compare(verified, scripted, params, temperature, precision, studies)
        except PrecisionError as exc:  # the layout: no rung can help
            log.info("%s: no reduced precision (%s)", who, exc)
            return None, checks
        except Exception as exc:  # a torch or CPU without this rung's kernels: the next one
            log.warning("%s: %s unavailable (%s)", who, precision,
                        (str(exc).strip().splitlines() or [type(exc).__name__])[-1])
            continue
        checks.append(check)
        if check.passed:
            return Rung(precision, module, scripted, layers, check), checks
        log.warning("%s: %s refused: %s", who, precision, check.summary())
    return None, checks


class _PackedBackward(torch.autograd.Function):
    """Forward through the packed (int8 or fp16) layer; the input gradient from its unpacked
    weight, a few rows at a time (for int8 never a whole fp32 copy of FC1; fbgemm unpacks fp16
    to a transient fp32 copy). Weights get no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return cast(torch.Tensor, layer(x))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = grads
        weight = ctx.layer.weight()  # (out, in): int8 with per-channel scales, or fp32
        out = torch.zeros(grad.shape[0], weight.shape[1], dtype=grad.dtype)
        for r in range(0, weight.shape[0], _GRAD_ROWS):
            rows = slice(r, r + _GRAD_ROWS)
            out += grad[:, rows] @ weight[rows].dequantize().to(grad.dtype)
        return out, None


class _DifferentiablePacked(nn.Module):
    """A packed linear layer evidence maps can take gradients through."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _PackedBackward.apply(x, self.layer))


def differentiable(module: nn.Module) -> nn.Module:
    """The module from `reduced_module`, with gradients through its packed layers (for
    Grad-CAM): the same layers and weights, nothing copied."""
    net = cast(_Net, cast(_Softmax, module).net)
    kids = [_DifferentiablePacked(k) if not isinstance(k, torch.jit.ScriptModule)
            and hasattr(k, "_packed_params") else k for k in net.classifier.children()]
    return _Softmax(_Net(net.features, nn.Sequential(*kids)))
