"""Inference benchmark: Dscint eager vs TorchScript at batch 1 and 8, against the compute floor.

The floor is FLOPs per image divided by a matmul rate measured in the same run on the same
machine (these machines vary 1.6x within an hour, so only same-run ratios mean anything).
Prints a table and writes JSON: `python -m bench.inference [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from model.dscint import Dscint, DscintProbabilities
from model.export import ModelMetadata, export_torchscript, load_torchscript


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Best sustained float32 GEMM rate (GFLOP/s) over a few runs."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def dscint_flops() -> float:
    """Multiply-adds x 2 of one forward pass at 1024 x 256 (convolutions and linear layers)."""
    macs = 0
    x = torch.zeros(1, 1, 1024, 256)
    net = Dscint().eval()

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            macs += out.numel() * k
        elif isinstance(mod, torch.nn.Linear):
            macs += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return 2.0 * macs


def time_per_image(fn: torch.nn.Module, batch: int, seconds: float = 3.0) -> float:
    """Median ms per image over repeated calls after warm-up."""
    x = torch.rand(batch, 1, 1024, 256)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] / batch * 1000


def main() -> None:
    """Run and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eager = DscintProbabilities(Dscint()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(eager, Path(tmp) / "m.pt", ModelMetadata(
            version="bench", weights_sha256="", training_data="random", trained_on_phantoms=True))
        scripted, _ = load_torchscript(path)
    rate = matmul_gflops()
    flops = dscint_flops()
    floor_ms = flops / (rate * 1e9) * 1000
    rows = []
    for name, fn in (("eager", eager), ("torchscript", scripted)):
        for batch in (1, 8):
            ms = time_per_image(fn, batch)
            rows.append({"model": name, "batch": batch, "ms_per_image": round(ms, 2),
                         "floor_fraction": round(floor_ms / ms, 3)})
    print(f"matmul {rate:.0f} GFLOP/s; Dscint {flops / 1e9:.3f} GFLOP/image; "
          f"floor {floor_ms:.2f} ms/image; threads {args.threads}")
    print(f"{'model':<12}{'batch':>6}{'ms/image':>10}{'of floor':>10}")
    for r in rows:
        print(f"{r['model']:<12}{r['batch']:>6}{r['ms_per_image']:>10}"
              f"{r['floor_fraction']:>10.0%}")
    if args.json:
        args.json.write_text(json.dumps({"matmul_gflops": rate, "gflop_per_image": flops / 1e9,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
