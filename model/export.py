"""TorchScript export with the model's own metadata, and the checks made when loading it.

A model file carries what the node needs to trust it (as nanoGPT checkpoints carry their config):
class names and codes, input shape, preprocessing, version, weights sha256, training data and
headline metrics. The sha256 covers the weights only, so it is stable across re-serialisation.
The file always holds the fp32 weights; `precision` says in which precision to serve them
(FC1 in int8 or fp16, the fastest that agrees with fp32 on held-out images, `model.precision`),
with the check that chose it and those of the rungs refused before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.calibration import DEFAULT_TEMPERATURE, DEFAULT_THRESHOLD, MIN_THRESHOLD
from model.classes import CLASS_NAMES, DscintClass
from model.precision import (
    FP32,
    PRECISIONS,
    VERIFY_STUDIES,
    PrecisionCheck,
    climb,
    ladder_from,
)
from model.preprocess import PREPROCESS_VERSION, PreprocessParams

log = logging.getLogger(__name__)

METADATA_FILE = "dscint_metadata.json"
METADATA_FORMAT = "dscint-node/model/1"


class ModelFileError(Exception):
    """A model file is missing, unreadable, or its metadata does not match what we run."""


@dataclass(frozen=True)
class ModelMetadata:
    """Metadata embedded in every exported model."""

    version: str
    weights_sha256: str
    training_data: str
    trained_on_phantoms: bool
    name: str = "Dscint"
    arch: str = "dscint"
    class_names: tuple[str, ...] = CLASS_NAMES
    input_shape: tuple[int, int, int] = (1, 1024, 256)
    preprocessing: PreprocessParams = field(default_factory=PreprocessParams)
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    # temperature scaling and the "indeterminate" threshold (model.calibration); a file
    # exported before calibration loads with these defaults: probabilities as the network
    # gives them, indeterminate only below 0.5
    temperature: float = DEFAULT_TEMPERATURE
    indeterminate_below: float = DEFAULT_THRESHOLD
    calibration: dict[str, Any] = field(default_factory=dict)
    # the precision to serve in (model.precision) and the held-out check that chose it; files
    # exported before it load as fp32 with no check
    precision: str = FP32
    precision_check: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialised form stored next to the TorchScript code."""
        classes = [
            {"index": c.value.index, "name": c.value.name, "code_value": c.value.code_value,
             "code_meaning": c.value.code_meaning, "scheme": c.value.scheme}
            for c in DscintClass
        ]
        doc = {
            "format": METADATA_FORMAT, "name": self.name, "arch": self.arch,
            "version": self.version, "classes": classes, "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing.to_dict(), "weights_sha256": self.weights_sha256,
            "training_data": self.training_data, "trained_on_phantoms": self.trained_on_phantoms,
            "metrics": self.metrics, "train_config": self.train_config,
            "temperature": self.temperature, "indeterminate_below": self.indeterminate_below,
            "calibration": self.calibration,
            "precision": self.precision, "precision_check": self.precision_check,
            "created_at": self.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        }
        return json.dumps(doc, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse and validate; raises ModelFileError naming what is wrong."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFileError(f"model metadata is not JSON: {exc}") from exc
        if doc.get("format") != METADATA_FORMAT:
            raise ModelFileError(f"unsupported model metadata format {doc.get('format')!r}")
        names = tuple(c["name"] for c in sorted(doc["classes"], key=lambda c: c["index"]))
        if names != CLASS_NAMES:
            raise ModelFileError(f"model classes {names} differ from {CLASS_NAMES}")
        for c in doc["classes"]:
            expected = DscintClass.by_name(c["name"]).value
            if c["code_value"] != expected.code_value:
                raise ModelFileError(f"class {c['name']} has code {c['code_value']}, "
                                     f"expected {expected.code_value}")
        try:
            pre = PreprocessParams.from_dict(doc["preprocessing"])
        except ValueError as exc:
            raise ModelFileError(str(exc)) from exc
        if pre.version != PREPROCESS_VERSION:
            raise ModelFileError(f"model needs preprocessing v{pre.version}, "
                                 f"this node implements v{PREPROCESS_VERSION}")
        return cls(
            version=str(doc["version"]), weights_sha256=str(doc["weights_sha256"]),
            training_data=str(doc["training_data"]),
            trained_on_phantoms=bool(doc["trained_on_phantoms"]), name=str(doc["name"]),
            arch=str(doc.get("arch", "dscint")), class_names=names,
            input_shape=tuple(doc["input_shape"]),  # type: ignore[arg-type]
            preprocessing=pre, metrics=dict(doc.get("metrics", {})),
            train_config=dict(doc.get("train_config", {})), created_at=str(doc["created_at"]),
            **_calibration_fields(doc), **_precision_fields(doc),
        )


def _precision_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Serving precision and its check; fp32 when absent (older files); anything else invalid
    raises ModelFileError (a file may not ask for a precision nobody checked)."""
    precision = str(doc.get("precision", FP32))
    if precision not in PRECISIONS:
        raise ModelFileError(f"model precision {precision!r} is not one of {PRECISIONS}")
    check = dict(doc.get("precision_check") or {})
    if check:
        try:
            parsed = PrecisionCheck.from_dict(check)
        except ValueError as exc:
            raise ModelFileError(str(exc)) from exc
        if precision != FP32 and not (parsed.precision == precision and parsed.passed):
            raise ModelFileError(f"model precision {precision} lacks a passed check")
    elif precision != FP32:
        raise ModelFileError(f"model precision {precision} carries no precision_check")
    return {"precision": precision, "precision_check": check}


def _calibration_fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Temperature and threshold from metadata, defaults when absent (older files); invalid
    values raise ModelFileError rather than serve probabilities nobody validated."""
    try:
        temperature = float(doc.get("temperature", DEFAULT_TEMPERATURE))
        threshold = float(doc.get("indeterminate_below", DEFAULT_THRESHOLD))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"model calibration is not numeric: {exc}") from exc
    if not (math.isfinite(temperature) and temperature > 0):
        raise ModelFileError(f"model temperature {temperature} must be finite and > 0")
    if not MIN_THRESHOLD <= threshold <= 1.0:
        raise ModelFileError(f"model indeterminate_below {threshold} must be within "
                             f"[{MIN_THRESHOLD}, 1]")
    return {"temperature": temperature, "indeterminate_below": threshold,
            "calibration": dict(doc.get("calibration") or {})}


@contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """TorchScript is deprecated upstream (DeprecationWarning in torch 2.13, FutureWarning in
    2.14) but is our model format: silenced around our own calls to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def weights_sha256(module: nn.Module) -> str:
    """Hash of every tensor in the state dict (name, dtype, shape, bytes), in name order.

    The bytes are fed to hashlib straight from each tensor's memory (a C-contiguous numpy view
    is a buffer), not via `.tobytes()`: that made a full copy of every tensor and put 78 MB on
    the node's peak memory at load for FC1 alone. The digest is unchanged.
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; hashed as float32 (a copy)
            t = t.float()
        if t.numel():
            digest.update(t.numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()


def choose_precision(scripted: torch.jit.ScriptModule, meta: ModelMetadata, precision: str,
                     studies: int = VERIFY_STUDIES) -> tuple[str, dict[str, Any]]:
    """The precision to record and its check: the first rung of the ladder from `precision`
    (AUTO: int8, then fp16) whose check on held-out images passes, else fp32 (a WARNING for
    each rung refused, and one for the fp32 export). The record is the chosen rung's check
    (the last refused one's for fp32) with `ladder`: every check made, in order."""
    rungs = ladder_from(precision)  # ValueError for an unknown precision
    if not rungs:
        return FP32, {}
    who = f"model {meta.name} {meta.version}"
    with torchscript_deprecation_silenced():
        rung, checks = climb(scripted, meta.preprocessing, meta.temperature, rungs, who, studies)
    if not checks:
        return FP32, {}
    last = rung.check if rung else checks[-1]
    record = {**last.to_dict(), "layers": rung.layers if rung else [],
              "torch": torch.__version__,
              "ladder": [{**c.to_dict(), "passed": c.passed} for c in checks]}
    if rung is None:
        log.warning("%s exported for fp32 serving: %s", who,
                    "; ".join(c.summary() for c in checks))
        return FP32, record
    log.info("%s exported for %s serving: %s", who, rung.precision, rung.check.summary())
    return rung.precision, record


def export_torchscript(probabilities_module: nn.Module, path: Path, meta: ModelMetadata,
                       precision: str = FP32, verify_studies: int = VERIFY_STUDIES) -> Path:
    """Script the probability-emitting module and save it (fp32 weights) with metadata,
    atomically. `precision` AUTO (or a rung: INT8, FP16) records the fastest reduced precision
    whose copy passes its held-out check (`choose_precision`; ~5 s a rung for the default 100
    studies), else fp32."""
    probabilities_module = probabilities_module.eval()
    with torchscript_deprecation_silenced():
        scripted = torch.jit.script(probabilities_module)
    sha = weights_sha256(scripted)
    if meta.weights_sha256 and meta.weights_sha256 != sha:
        raise ModelFileError("metadata sha256 does not match the weights being exported")
    chosen, check = choose_precision(scripted, meta, precision, verify_studies)
    meta_json = ModelMetadata(**{**meta.__dict__, "weights_sha256": sha, "precision": chosen,
                                 "precision_check": check}).to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with torchscript_deprecation_silenced():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: meta_json})
    tmp.replace(path)
    log.info("exported TorchScript model %s (sha256 %s)", path, sha[:12])
    return path


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, ModelMetadata]:
    """Load a model and verify its metadata and weights hash; ModelFileError on any mismatch."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    extra = {METADATA_FILE: ""}
    try:
        with torchscript_deprecation_silenced():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise ModelFileError(f"cannot load TorchScript model {path}: {exc}") from exc
    if not extra[METADATA_FILE]:
        raise ModelFileError(f"model {path} carries no {METADATA_FILE}")
    meta = ModelMetadata.from_json(extra[METADATA_FILE])
    actual = weights_sha256(module)
    if actual != meta.weights_sha256:
        raise ModelFileError(f"model {path}: weights sha256 {actual[:12]} does not match "
                             f"metadata {meta.weights_sha256[:12]}")
    return module.eval(), meta
