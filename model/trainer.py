"""Train Dscint with the paper's Table 5 settings on a patient-level split, then export it.

Images are preprocessed once (not every epoch); augmentation runs on the fly inside the training
part only. Evaluation reports image-level metrics (as the paper) and study-level metrics (views
combined, as the node serves). Under torchrun the same loop trains one slice of every global
batch per process (model.distributed); on CUDA and/or with a bf16 forward pass when asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.archs import Probabilities, build_network, get_arch, set_channels_last
from model.augment import AugmentParams, augment_batch
from model.calibration import Calibration, calibrate
from model.classes import CLASS_NAMES
from model.distributed import (
    DEVICES,
    World,
    autocast_dtype,
    check_batch,
    current_world,
    globalise_batchnorm,
    localise_batchnorm,
    shard_batch,
    sum_across,
    training_device,
)
from model.export import ModelMetadata, export_torchscript
from model.metrics import ClassificationMetrics, compute_metrics
from model.precision import AUTO
from model.preprocess import PreprocessParams, preprocess_view
from model.split import patient_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImages:
    """Training data as the trainer needs it; the CLI builds it from phantoms, DICOM or PNG."""

    images: Sequence[np.ndarray]  # raw counts, one 2-D view each
    labels: np.ndarray  # class index per image
    patient_ids: Sequence[str]  # one per image; a study's views share it
    views: Sequence[str]  # "anterior" / "posterior" / "unknown"
    description: str  # e.g. "simulated phantoms, 400 patients, difficulty 0.5, seed 1"
    trained_on_phantoms: bool


@dataclass(frozen=True)
class TrainConfig:
    """Table 5 defaults (Adam, lr 1e-3, weight decay 1e-4, batch 4); epochs configurable."""

    epochs: int = 5
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.3
    seed: int = 0
    augment: AugmentParams = field(default_factory=AugmentParams)
    threads: int | None = None
    progress: bool = True
    arch: str = "dscint"  # model.archs key: dscint or a baseline
    balance_classes: bool = False  # sample the training part toward TABLE3_PROPORTIONS
    channels_last: bool = True  # NHWC convolutions: measured faster on this CPU
    device: str = "cpu"  # cpu, cuda (each torchrun rank its local GPU) or auto
    # fp32, bf16 (forward pass under autocast, CPU or CUDA), or auto: the one measured
    # fastest for `arch` (model.distributed.training_precision)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; one of {', '.join(DEVICES)}")
        autocast_dtype(self.precision, self.arch)  # ValueError for an unknown precision


# Paper Table 3 (augmented dataset): normal, bone metastasis, arthritis, thyroid carcinoma.
TABLE3_PROPORTIONS: tuple[float, ...] = (1660 / 6530, 1582 / 6530, 1500 / 6530, 1788 / 6530)


@dataclass
class TrainResult:
    """A trained network, its held-out evaluation and how fast it trained."""

    net: nn.Module
    image_metrics: ClassificationMetrics
    study_metrics: ClassificationMetrics
    history: list[dict[str, float]]
    train_index: np.ndarray
    test_index: np.ndarray
    test_probabilities: np.ndarray
    images_per_second: float
    seconds: float
    inputs: torch.Tensor  # every image preprocessed, for baselines on the same split
    trained_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    calibration: Calibration | None = None  # temperature and threshold from the held-out part


def preprocess_all(images: Sequence[np.ndarray], params: PreprocessParams, progress: bool
                   ) -> torch.Tensor:
    """(N, 1, H, W) float32, computed once for all epochs."""
    out = torch.empty(len(images), 1, params.rows, params.cols)
    for i, img in enumerate(tqdm(images, desc="preprocess", disable=not progress, leave=False)):
        out[i] = preprocess_view(img, params)
    return out


def balanced_weights(labels: torch.Tensor, target: Sequence[float] = TABLE3_PROPORTIONS
                     ) -> torch.Tensor:
    """Per-image sampling weight target[c] / count[c]: classes drawn in Table 3 proportions."""
    counts = torch.bincount(labels, minlength=len(target)).double()
    per_class = torch.tensor(target, dtype=torch.float64) / counts.clamp(min=1)
    return per_class[labels]


def epoch_order(y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Indices into the training part for one epoch: a permutation, or a balanced draw."""
    if cfg.balance_classes and len(y):
        return torch.multinomial(balanced_weights(y), len(y), replacement=True, generator=gen)
    return torch.randperm(len(y), generator=gen)


@dataclass(frozen=True)
class _Step:
    """Where and how one rank computes a training step."""

    world: World
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 cfg: TrainConfig, gen: torch.Generator, bar: tqdm,
                 seen: set[int] | None = None, step: _Step | None = None
                 ) -> tuple[float, float]:
    """One pass over the training part; returns (mean loss, accuracy) over all ranks.

    Every rank draws the same order and augments the whole global batch with the same
    generator (the draws stay in step with one process), then trains on its slice."""
    step = step or _Step(World(), torch.device("cpu"), None)
    net.train()
    loss_fn = nn.CrossEntropyLoss()
    order = epoch_order(y, cfg, gen)
    # summed on the device, read once per epoch: no wait for the GPU at every step
    total_loss = torch.zeros((), dtype=torch.float64, device=step.device)
    correct = torch.zeros((), dtype=torch.int64, device=step.device)
    for start in range(0, len(order), cfg.batch_size):
        idx, mine = shard_batch(order[start:start + cfg.batch_size], step.world)
        if len(idx) < 2:  # BatchNorm needs two samples in training mode
            continue
        if seen is not None:
            seen.update(int(i) for i in idx)
        xb = augment_batch(x[idx], gen, cfg.augment)[mine].to(step.device, non_blocking=True)
        yb = y[idx[mine]].to(step.device, non_blocking=True)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(step.device.type, dtype=step.amp or torch.bfloat16,
                            enabled=step.amp is not None):
            logits = net(xb)
            loss = loss_fn(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.detach().double() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        bar.update(len(idx))
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loss_sum, n_correct = sum_across([float(total_loss), float(correct)], step.device)
    return loss_sum / max(len(x), 1), n_correct / max(len(x), 1)


def predict(net: nn.Module, x: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Softmax probabilities for a preprocessed tensor, in eval mode and fp32, on the device
    the network is on (the node serves fp32 on the CPU)."""
    net.eval()
    device = next(net.parameters()).device
    outs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            outs.append(torch.softmax(net(xb), dim=1).cpu())
    return torch.cat(outs).double().numpy() if outs else np.zeros((0, len(CLASS_NAMES)))


def study_level(patient_ids: Sequence[str], labels: np.ndarray, probs: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Average the views of each patient's study (views combined, as the node does)."""
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(patient_ids):
        groups.setdefault(pid, []).append(i)
    keys = sorted(groups)
    y = np.array([labels[groups[k][0]] for k in keys], dtype=np.int64)
    p = np.stack([probs[groups[k]].mean(axis=0) for k in keys]) if keys else probs[:0]
    return y, p


def train_model(data: LabelledImages, cfg: TrainConfig,
                params: PreprocessParams | None = None,
                split: tuple[np.ndarray, np.ndarray] | None = None,
                inputs: torch.Tensor | None = None) -> TrainResult:
    """Split by patient, train with Adam, evaluate on held-out patients.

    `split` (train, test image indices, e.g. one k-fold) and `inputs` (preprocess_all output)
    let repeated runs reuse one split and one preprocessing pass.
    """
    params = params or PreprocessParams()
    world = current_world()
    check_batch(cfg.batch_size, world)
    step = _Step(world, training_device(cfg.device, world),
                 autocast_dtype(cfg.precision, cfg.arch))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = np.asarray(data.labels, dtype=np.int64)
    train_idx, test_idx = split if split is not None else patient_split(
        data.patient_ids, labels, cfg.test_fraction, cfg.seed)
    x_all = inputs if inputs is not None else preprocess_all(data.images, params, cfg.progress)
    y_all = torch.from_numpy(labels)
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    net, trained = _placed_network(cfg, step)
    # fused Adam: same update as Table 5's Adam, one kernel per step (3x faster on this CPU)
    opt = torch.optim.Adam(trained.parameters(), lr=cfg.learning_rate,
                           weight_decay=cfg.weight_decay, fused=True)
    history: list[dict[str, float]] = []
    seen: set[int] = set()
    t0 = time.perf_counter()
    with tqdm(total=cfg.epochs * len(train_idx), desc=f"train {get_arch(cfg.arch).display}",
              unit="img", disable=not cfg.progress or not world.main) as bar:
        for epoch in range(cfg.epochs):
            loss, acc = _train_epoch(trained, opt, x_train, y_train, cfg, gen, bar, seen, step)
            history.append({"epoch": epoch + 1, "loss": loss, "train_accuracy": acc})
            log.info("epoch %d/%d loss %.4f train accuracy %.3f", epoch + 1, cfg.epochs, loss, acc)
    seconds = time.perf_counter() - t0
    localise_batchnorm(net)
    probs = predict(net, x_all[test_idx])
    net.cpu()  # exported and served from the CPU
    test_pids = [data.patient_ids[i] for i in test_idx]
    y_study, p_study = study_level(test_pids, labels[test_idx], probs)
    return TrainResult(
        net=net, image_metrics=compute_metrics(labels[test_idx], probs, CLASS_NAMES),
        study_metrics=compute_metrics(y_study, p_study, CLASS_NAMES), history=history,
        train_index=train_idx, test_index=test_idx, test_probabilities=probs,
        images_per_second=cfg.epochs * len(train_idx) / max(seconds, 1e-9), seconds=seconds,
        inputs=x_all, trained_indices=np.asarray(train_idx)[sorted(seen)],
        calibration=calibrate(labels[test_idx], probs, test_pids),
    )


def _placed_network(cfg: TrainConfig, step: _Step) -> tuple[nn.Module, nn.Module]:
    """(the network, what trains it): the network itself for one process, else a
    DistributedDataParallel wrapper around it with BatchNorm over the global batch."""
    net = build_network(cfg.arch)
    if cfg.channels_last:
        set_channels_last(net)
    net.to(step.device)
    if step.world.size == 1:
        return net, net
    globalise_batchnorm(net)
    ids = [step.device.index] if step.device.type == "cuda" else None
    return net, DistributedDataParallel(net, device_ids=ids)


def headline(result: TrainResult) -> dict[str, Any]:
    """The metrics embedded in model metadata."""
    im, st = result.image_metrics, result.study_metrics
    return {
        "held_out_images": im.n, "held_out_studies": st.n,
        "image_accuracy": round(im.accuracy, 4), "image_f1_macro": round(im.f1, 4),
        "image_auc_macro": round(im.auc, 4), "study_accuracy": round(st.accuracy, 4),
        "study_f1_macro": round(st.f1, 4), "study_auc_macro": round(st.auc, 4),
        "train_images_per_second": round(result.images_per_second, 2),
    }


def default_version(now: datetime | None = None) -> str:
    """Sortable version string from the training time."""
    return (now or datetime.now(UTC)).strftime("%Y.%m.%d-%H%M%S")


def export_trained(result: TrainResult, data: LabelledImages, cfg: TrainConfig, path: Path,
                   version: str | None = None, params: PreprocessParams | None = None,
                   precision: str = AUTO) -> Path:
    """Write the TorchScript file with metadata (sha256 is filled in by the exporter), for
    serving in the fastest reduced precision that passes its held-out check (AUTO, see
    `model.precision`; fp32 when none does or the network is not a Dscint)."""
    cfg_dict = asdict(cfg)
    meta = ModelMetadata(
        version=version or default_version(), weights_sha256="",
        name=get_arch(cfg.arch).display, arch=cfg.arch,
        training_data=data.description, trained_on_phantoms=data.trained_on_phantoms,
        preprocessing=params or PreprocessParams(), metrics=headline(result),
        train_config=cfg_dict, **_calibration_metadata(result.calibration),
    )
    return export_torchscript(Probabilities(set_channels_last(result.net, False)), path, meta,
                              precision=precision)


def _calibration_metadata(cal: Calibration | None) -> dict[str, Any]:
    """ModelMetadata's calibration fields; none (the defaults) without a held-out part."""
    if cal is None or cal.held_out_studies == 0:
        return {}
    return {"temperature": cal.temperature, "indeterminate_below": cal.threshold,
            "calibration": cal.to_dict()}
