"""Study classification with an exported Dscint: views in, per-view and per-study probabilities out.

Probabilities are calibrated (the model's temperature, `model.calibration`) per view, then a
study's views are combined by averaging them (anterior and posterior). A missing anterior or
posterior view is stood in for by the left-right mirror of the other (paper §2.2.1), as during
training. `StudyClassification` takes the views instance by instance, so a caller holds one
instance's pixels at a time, with the same result.

The module served is an inference-optimised copy of the verified TorchScript model (frozen,
BatchNorm folded into the convolutions, convolutions and pooling on oneDNN): 1.8-1.9x faster
than the plain TorchScript module at batch 8 and 1.5x at batch 1 (2 threads, quiet machine),
checked against the verified module at load time (see `prepare_for_serving`).

A model exported for reduced-precision serving (`model.precision`: FC1 in int8 or fp16) is
checked again at load: the reduced copy is built from the verified fp32 weights and served only if
it predicts the fp32 class on at least 99.5 % of the held-out phantom images; otherwise the next
rung of the ladder (int8, fp16) is tried, and fp32 serves when none passes, each refusal a
WARNING. Once a reduced copy serves, the fp32 FC1 is released (78 MB); evidence maps take their
gradients through the packed layer (`model.precision.differentiable`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.calibration import apply_temperature
from model.explain import ExplainError, evidence_maps, to_view_grid
from model.export import (
    ModelFileError,
    ModelMetadata,
    load_torchscript,
    torchscript_deprecation_silenced,
)
from model.precision import (
    AUTO,
    FP32,
    PRECISIONS,
    VERIFY_STUDIES,
    PrecisionCheck,
    climb,
    differentiable,
    ladder_from,
)
from model.preprocess import mirror, preprocess_batch

log = logging.getLogger(__name__)

ANTERIOR, POSTERIOR, UNKNOWN = "anterior", "posterior", "unknown"
SERVING_BATCH = 4  # images per forward pass (a study's two views go in one)
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
    first_view, first_img = views[0]
    stand_in = stand_in_view(first_view, {v for v, _ in views}, len(views))
    if stand_in is not None:
        planned.append((stand_in, first_view, mirror(first_img)))
    return planned


def stand_in_view(first_view: str, present: set[str], count: int) -> str | None:
    """The view the first view's mirror stands in for, None when the study needs none: a lone
    view (of any kind) gets its opposite, and a study of anterior views only (or posterior
    only) gets the other side."""
    if count == 1:
        return _OPPOSITE.get(first_view, UNKNOWN)
    if present == {ANTERIOR} or present == {POSTERIOR}:
        return _OPPOSITE[first_view]
    return None


def _combine(names: Sequence[str], planned: Sequence[tuple[str, str | None]],
             probs: np.ndarray) -> StudyPrediction:
    """Per-view probabilities in plan order, their mean, and its arg-max class."""
    per_view = tuple(
        ViewPrediction(view, src, {n: float(p) for n, p in zip(names, row, strict=True)})
        for (view, src), row in zip(planned, probs, strict=True)
    )
    mean = probs.mean(axis=0)
    study = {n: float(p) for n, p in zip(names, mean, strict=True)}
    return StudyPrediction(names[int(np.argmax(mean))], study, per_view)


OPTIMIZED, TORCHSCRIPT = "optimized", "torchscript"
SERVING_TOLERANCE = 1e-4  # max |probability difference| allowed between optimised and verified
# torch.jit.optimize_for_inference without its last pass (linear -> matmul with a transposed
# copy of the weight): that pass leaves the original weight in the graph as a dead constant,
# so FC1 (78 MB) would be held twice, and the transposed matmul measured no faster here.
_OPTIMIZE_PASSES = ("_jit_pass_fuse_frozen_conv_add_relu", "_jit_pass_convert_frozen_ops_to_mkldnn")


def check_batch(meta: ModelMetadata) -> torch.Tensor:
    """Deterministic input for the load-time check: seeded noise and a smooth blob in the
    preprocessed range [0, clip_max], two views as a study has."""
    c, h, w = meta.input_shape
    gen = torch.Generator().manual_seed(20210507)
    noise = torch.rand(1, c, h, w, generator=gen) * meta.preprocessing.clip_max
    rows = torch.linspace(-1.0, 1.0, h)[:, None]
    cols = torch.linspace(-1.0, 1.0, w)[None, :]
    blob = torch.exp(-(rows**2 / 0.3 + cols**2 / 0.1)) * meta.preprocessing.clip_max
    return torch.cat([noise, blob.expand(1, c, h, w)])


def optimize_module(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Frozen copy sharing the weights (no copy of FC1), conv+BN folded, conv+add+ReLU fused
    (ResNet's residuals) and convolutions and pooling moved to oneDNN where this torch has the
    (private) passes for it; the load-time check in `prepare_for_serving` guards their use."""
    with torchscript_deprecation_silenced():
        frozen = torch.jit.freeze(module.eval())
    if not torch.backends.mkldnn.is_available():
        return frozen
    passes = [getattr(torch._C, name, None) for name in _OPTIMIZE_PASSES]
    if not all(callable(p) for p in passes):
        log.info("this torch lacks the oneDNN graph passes: serving the frozen model only")
        return frozen
    for graph_pass in passes:
        graph_pass(frozen.graph)  # type: ignore[misc]
    return frozen


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |difference|; NaN when the shapes differ (no broadcasting may hide that)."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return math.nan
    return float((got - want).abs().max())


def prepare_for_serving(module: torch.jit.ScriptModule, meta: ModelMetadata,
                        optimize: bool = True) -> tuple[torch.jit.ScriptModule, str, float]:
    """The module to serve, which of the two it is, and its max |probability difference|.

    A broken model (wrong output shape, non-finite output) raises ModelFileError, so it fails
    start-up rather than a study. The optimised module is served only if, on `check_batch`, its
    probabilities are within SERVING_TOLERANCE of the verified module's (run twice: TorchScript
    re-plans on its second call; then once at batch 1). Otherwise, or if optimising fails (the
    oneDNN adaptive average pool of AlexNet and VGG refuses 1024 x 256 input), the node serves the
    verified module itself with a WARNING: a medical physicist wants the numbers the model was
    validated with, slower, rather than a faster path that differs (or a node that refuses to
    start over a speed-up: the verified module is the reference and is known good).
    """
    x = check_batch(meta)
    with torch.inference_mode():
        reference = module(x)
    expected = (x.shape[0], len(meta.class_names))
    if tuple(reference.shape) != expected:
        raise ModelFileError(f"model output shape {tuple(reference.shape)} does not match "
                             f"{len(meta.class_names)} classes")
    if not bool(torch.isfinite(reference).all()):
        raise ModelFileError("model gives non-finite probabilities on the load-time check input")
    if not optimize:
        return module, TORCHSCRIPT, 0.0
    try:
        fast = optimize_module(module)
        with torch.inference_mode():
            diffs = [_max_abs_diff(fast(x), reference) for _ in range(2)]
            diffs.append(_max_abs_diff(fast(x[:1]), reference[:1]))
        diff = math.nan if any(math.isnan(d) for d in diffs) else max(diffs)
    except Exception as exc:  # any failure of an optional speed-up means: serve the verified
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]  # not the traceback
        log.warning("model %s %s: inference optimisation failed (%s); serving the verified "
                    "TorchScript module unoptimised", meta.name, meta.version, reason)
        return module, TORCHSCRIPT, 0.0
    if not diff <= SERVING_TOLERANCE:  # also catches NaN
        log.warning("model %s %s: optimised module differs from the verified one by %.3g > %g "
                    "in probability; serving the verified TorchScript module unoptimised",
                    meta.name, meta.version, diff, SERVING_TOLERANCE)
        return module, TORCHSCRIPT, diff
    return fast, OPTIMIZED, diff


def wanted_precision(meta: ModelMetadata, precision: str) -> str:
    """AUTO: what the model's metadata chose at export; otherwise the precision asked for."""
    if precision == AUTO:
        return meta.precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {(AUTO, *PRECISIONS)}, got {precision!r}")
    return precision


class Classifier:
    """Loads a TorchScript Dscint once and classifies studies under inference mode.

    `serving` says which module answers: OPTIMIZED, or TORCHSCRIPT when the optimised one was
    refused (see `prepare_for_serving`); `optimize=False` serves the verified module as loaded
    (fp32). `precision` (AUTO: the model's own choice, FP32, INT8, FP16) is what is asked for,
    the top of the ladder tried; `self.precision` is what serves, and `precision_check` the last
    load-time check made (None when none was).
    """

    def __init__(self, path: Path, optimize: bool = True, precision: str = AUTO,
                 verify_studies: int = VERIFY_STUDIES) -> None:
        self.path = path
        verified, self.meta = load_torchscript(path)
        self.precision = FP32
        self.precision_check: PrecisionCheck | None = None
        if optimize and self._serve_reduced(verified, wanted_precision(self.meta, precision),
                                            verify_studies):
            del verified  # the fp32 FC1 goes with it: nothing else refers to it
        else:
            self.module, self.serving, self.check_diff = prepare_for_serving(
                verified, self.meta, optimize)
            # kept for evidence maps (gradients need the unfrozen module); the frozen copy
            # shares its weights, so this holds no second copy of FC1
            self._verified: torch.nn.Module = verified
        log.info("loaded model %s version %s sha256 %s (%s), serving %s %s", path.name,
                 self.meta.version, self.meta.weights_sha256[:12], self.meta.training_data,
                 self.serving, self.precision)

    def _serve_reduced(self, verified: torch.jit.ScriptModule, wanted: str, studies: int
                       ) -> bool:
        """Climb the ladder from `wanted` (`model.precision.climb`: each rung checked against
        `verified` on held-out images, each refusal a WARNING) and serve the first rung that
        passes, optimised as fp32 would be; False means serve fp32 (said why when a rung was
        tried)."""
        name = f"model {self.meta.name} {self.meta.version}"
        rungs = ladder_from(wanted)
        if not rungs:
            return False
        with torchscript_deprecation_silenced():
            rung, checks = climb(verified, self.meta.preprocessing, self.meta.temperature,
                                 rungs, f"{name} at load", studies)
        self.precision_check = rung.check if rung else (checks[-1] if checks else None)
        if rung is None:
            log.warning("%s: no reduced precision passed its check at load; serving fp32", name)
            return False
        self.module, self.serving, self.check_diff = prepare_for_serving(
            rung.scripted, self.meta, optimize=True)
        self._verified = differentiable(rung.module)
        self.precision = rung.precision
        log.info("%s: %s check passed at load: %s", name, rung.precision, rung.check.summary())
        return True

    @property
    def metadata(self) -> ModelMetadata:
        """The verified metadata embedded in the model file."""
        return self.meta

    def predict_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N, classes) for raw count images, at most SERVING_BATCH per forward
        pass: a study of many instances (a camera re-sending, a backlog) costs time, not a
        memory peak that grows with its size (activations are ~4 MiB per image)."""
        parts = [np.zeros((0, len(self.meta.class_names)))]
        for start in range(0, len(images), SERVING_BATCH):
            parts.append(self.predict_batch(preprocess_batch(images[start:start + SERVING_BATCH],
                                                             self.meta.preprocessing)))
        return np.concatenate(parts)

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities (N, classes) for a preprocessed batch (N, 1, rows, cols):
        the module's softmax rescaled by the model's temperature (1 for older files)."""
        with torch.inference_mode():
            raw = self.module(batch).double().numpy()
        return apply_temperature(raw, self.meta.temperature)

    @property
    def verified_module(self) -> torch.nn.Module:
        """The unfrozen module of the served precision (the verified TorchScript module in
        fp32; with int8, its fp32 layers and the checked int8 FC1): gradients for evidence
        maps flow through it."""
        return self._verified

    def explain(self, images: Sequence[np.ndarray], class_name: str
                ) -> list[np.ndarray | None]:
        """Evidence maps (`model.explain.evidence_maps`) of `class_name` for raw count images,
        each on its image's own pixel grid, in [0, 1]; None for each when this network has no
        layout a map can be computed from."""
        if not images:
            return []
        batch = preprocess_batch(images, self.meta.preprocessing)
        try:
            maps = evidence_maps(self._verified, batch, self.meta.class_names.index(class_name))
        except ExplainError as exc:
            log.info("no evidence map for model %s: %s", self.meta.name, exc)
            return [None] * len(images)
        return [to_view_grid(m, img.shape[:2]) for m, img in zip(maps, images, strict=True)]

    def classify_study(self, views: Sequence[tuple[str, np.ndarray]]) -> StudyPrediction:
        """Classify all views of one study and combine them."""
        planned = plan_views(views)
        probs = self.predict_images([img for _, _, img in planned])
        return _combine(self.meta.class_names, [(v, src) for v, src, _ in planned], probs)


class StudyClassification:
    """One study classified instance by instance: `add` each instance's views as they are
    decoded (they are predicted at once and may then be freed), `result` at the end.

    The result is `Classifier.classify_study` on all the views at once (same per-view order,
    same mirrored stand-in, same mean), up to batch-composition rounding (< 1e-5). Only the
    first view's mirror is kept meanwhile, preprocessed (one input image, ~1 MiB), and only
    while the study may still need it as a stand-in.
    """

    def __init__(self, classifier: Classifier) -> None:
        self._clf = classifier
        self._planned: list[tuple[str, str | None]] = []
        self._rows: list[np.ndarray] = []
        self._present: set[str] = set()
        self._first: str | None = None
        self._mirror: torch.Tensor | None = None  # preprocessed mirror of the first view

    @property
    def count(self) -> int:
        """Views added so far."""
        return len(self._planned)

    def add(self, views: Sequence[tuple[str, np.ndarray]]) -> None:
        """Predict these views (one instance's) and remember only their probabilities."""
        if not views:
            return
        if self._first is None:
            self._first = views[0][0]
            self._mirror = preprocess_batch([mirror(views[0][1])], self._clf.meta.preprocessing)
        self._rows.append(self._clf.predict_images([img for _, img in views]))
        self._planned += [(v, None) for v, _ in views]
        self._present.update(v for v, _ in views)
        if self._stand_in() is None:
            self._mirror = None  # more views can only keep it unneeded

    def _stand_in(self) -> str | None:
        return None if self._first is None else \
            stand_in_view(self._first, self._present, self.count)

    def result(self) -> StudyPrediction:
        """The study's prediction; ValueError when no view was added."""
        if self._first is None:
            raise ValueError("a study needs at least one view to classify")
        planned, rows = list(self._planned), list(self._rows)
        stand_in = self._stand_in()
        if stand_in is not None and self._mirror is not None:
            planned.append((stand_in, self._first))
            rows.append(self._clf.predict_batch(self._mirror))
        return _combine(self._clf.meta.class_names, planned, np.concatenate(rows))
