"""Training across processes: `torchrun --nproc-per-node N -m node retrain ...`.

Every process (rank) draws the same epoch order and the same augmentation from the same seed,
cuts each global batch of `batch_size` images into equal slices, one per rank, and trains a
DistributedDataParallel copy of the network on its slice; gradients are averaged across ranks
(gloo on CPU, nccl on CUDA). BatchNorm statistics are taken over the whole global batch
(`GlobalBatchNorm2d`), so N processes with batch B/N each make the same update as one process
with batch B, up to floating-point summation order. Only rank 0 writes files or the registry.

torch's own DistributedSampler shards an epoch, not each batch, and knows no class-balanced
draw, and its SyncBatchNorm refuses CPU tensors; hence the slicing and the BatchNorm here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
# `auto`: the precision each network trains fastest in on this CPU (AVX512-BF16), measured by
# `bench.training --arch ...` (issue 18): Dscint fp32 (bf16 autocast 0.76-0.83x at batch 4,
# 1.0x at 16); every torchvision baseline bf16 (1.2-3.2x)
FASTEST_TRAINING_PRECISION = {"dscint": "fp32"}
BASELINE_TRAINING_PRECISION = "bf16"
INIT_TIMEOUT = timedelta(minutes=10)  # ranks wait this long for each other at a collective


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files, the report and the registry."""
        return self.rank == 0


def world_from_env(environ: Mapping[str, str]) -> World:
    """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (one process if unset)."""
    try:
        world = World(int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")),
                      int(environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise ValueError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers: {exc}") \
            from None
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: rank {world.rank} of "
                         f"{world.size}, local rank {world.local_rank}")
    return world


def resolve_device(requested: str, cuda_available: bool) -> str:
    """'cpu' or 'cuda' for --device cpu|cuda|auto; asking for CUDA without one is an error."""
    if requested not in DEVICES:
        raise ValueError(f"unknown device {requested!r}; one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ValueError("--device cuda but torch sees no CUDA device here "
                         f"(torch {torch.__version__})")
    return requested


def backend_for(device: str) -> str:
    """The collective backend for a device type: nccl on CUDA, gloo on CPU."""
    return "nccl" if device == "cuda" else "gloo"


def training_precision(precision: str, arch: str) -> str:
    """fp32 or bf16 for --precision fp32|bf16|auto and the network trained."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return FASTEST_TRAINING_PRECISION.get(arch, BASELINE_TRAINING_PRECISION)


def autocast_dtype(precision: str, arch: str = "dscint") -> torch.dtype | None:
    """The autocast dtype for --precision and the network (None: plain fp32, no autocast)."""
    return torch.bfloat16 if training_precision(precision, arch) == "bf16" else None


def start_world(requested_device: str, environ: Mapping[str, str]) -> World:
    """Join torchrun's process group (once, at the CLI's start); nothing to do for one process.
    On CUDA each rank takes its local GPU and talks nccl; on the CPU, gloo."""
    world = world_from_env(environ)
    device = resolve_device(requested_device, torch.cuda.is_available())
    if world.size == 1 or (dist.is_available() and dist.is_initialized()):
        return world
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size,
                            timeout=INIT_TIMEOUT)
    log.info("rank %d of %d joined the %s process group", world.rank, world.size,
             backend_for(device))
    return world


def stop_world() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_world() -> World:
    """The process group this process joined (rank 0 of 1 when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local = torch.cuda.current_device() if dist.get_backend() == "nccl" else 0
    return World(dist.get_rank(), dist.get_world_size(), local)


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    if current_world().size > 1:
        dist.barrier()


def training_device(requested: str, world: World) -> torch.device:
    """Where this rank trains: the CPU, or its own GPU (local rank)."""
    kind = resolve_device(requested, torch.cuda.is_available())
    return torch.device("cuda", world.local_rank) if kind == "cuda" else torch.device("cpu")


def check_batch(batch_size: int, world: World) -> None:
    """The global batch must split evenly: each rank's slice is batch_size / ranks."""
    if batch_size % world.size:
        raise ValueError(f"batch size {batch_size} does not split over {world.size} "
                         "processes: use a multiple of --nproc-per-node")


def shard_batch(idx: Tensor, world: World) -> tuple[Tensor, slice]:
    """(global batch trimmed to a multiple of the ranks, this rank's slice of it). Trimming
    only touches an epoch's last, short batch; one process keeps every index."""
    keep = len(idx) - len(idx) % world.size
    per = keep // world.size
    return idx[:keep], slice(world.rank * per, (world.rank + 1) * per)


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (the epoch's loss and accuracy counts)."""
    if current_world().size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


# --- BatchNorm over the global batch ------------------------------------------------------


class _SumAcross(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: each rank's input feeds
    every rank's output."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _sum_across(x: Tensor) -> Tensor:
    out: Tensor = _SumAcross.apply(x)
    return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's slice (two-pass mean and
    variance, all-reduced with autograd, in fp32); plain BatchNorm2d outside a process group
    and in eval mode. Works with gloo (CPU) and nccl (CUDA)."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or current_world().size == 1:
            return super().forward(input)
        x = input.float()
        dims = [0, 2, 3]
        n = float(x.numel() // x.shape[1] * current_world().size)  # slices are equal (shard_batch)
        mean = _sum_across(x.sum(dims)) / n
        centred = x - mean[None, :, None, None]
        var = _sum_across((centred * centred).sum(dims)) / n
        self._update_running(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: float) -> None:
        """Running statistics as BatchNorm2d keeps them (unbiased variance)."""
        if not self.track_running_stats or self.running_mean is None \
                or self.running_var is None or self.num_batches_tracked is None:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None \
            else 1.0 / float(self.num_batches_tracked.item())
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = var * n / max(n - 1, 1.0)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _device_of(module: nn.Module) -> torch.device:
    """Where a module's tensors live (the CPU when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _swap_batchnorm(net: nn.Module, source: type[nn.BatchNorm2d],
                    target: type[nn.BatchNorm2d]) -> int:
    """Replace every module of exactly `source` type by `target` with the same state."""
    swapped = 0
    for name, child in net.named_children():
        if type(child) is source:
            new = target(child.num_features, child.eps, child.momentum, child.affine,
                         child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(_device_of(child))
            new.train(child.training)
            setattr(net, name, new)
            swapped += 1
        else:
            swapped += _swap_batchnorm(child, source, target)
    return swapped


def globalise_batchnorm(net: nn.Module) -> int:
    """Make every plain BatchNorm2d global (in place); how many. A subclass (timm's
    BatchNormAct2d in Inception-v4) keeps per-rank statistics, which is logged."""
    swapped = _swap_batchnorm(net, nn.BatchNorm2d, GlobalBatchNorm2d)
    others = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and type(m) not in (nn.BatchNorm2d, GlobalBatchNorm2d) for m in net.modules())
    if others:
        log.warning("%d BatchNorm layer(s) of other types keep per-process statistics: N "
                    "processes then differ from one by more than rounding", others)
    return swapped


def localise_batchnorm(net: nn.Module) -> int:
    """Back to plain BatchNorm2d (for export and inference), in place; how many."""
    return _swap_batchnorm(net, GlobalBatchNorm2d, nn.BatchNorm2d)
