"""Inference benchmark: Dscint eager, plain TorchScript and the module the node serves
(`model.classifier.Classifier`: frozen, oneDNN) in fp32 and with FC1 on each reduced rung of
`model.precision`'s ladder (int8, fp16), at batch 1 and 8, against the compute floor; with each
rung's held-out check (agreement with fp32, largest probability difference) beside it.

The floor is FLOPs per image divided by a matmul rate measured in the same run on the same
machine (these machines vary 1.6x within an hour, so only same-run ratios mean anything); the
variants are timed in blocks taken in turn, so a noisy neighbour slows them all alike. FC1 (the
19032 x 1024 linear layer, 94.8% of the weights) is also timed alone: at batch 8 it streams
78 MB of weights per call and is a large share of the total; it is timed in fp32, with bf16
weights (AVX512-BF16 on this CPU), int8 (dynamic quantisation) and fp16 weights (fbgemm), the
measurement that chose the ladder.
Random weights agree with fp32 on every rung; trained ones need not (int8 moves probabilities
by up to 0.2 on some): `--weights net.sd` times and checks a trained Dscint (a state dict saved
with `torch.save(net.state_dict(), ...)`) instead.
On a busy machine wall-clock times with 2 threads swing 10x (a descheduled OpenMP thread
stalls the other at every barrier): `--threads 1 --clock cpu` times the process's CPU seconds
instead, floor included, which a neighbour barely moves.
Prints a table and writes JSON: `python -m bench.inference [--weights net.sd] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.classifier import Classifier, prepare_for_serving
from model.dscint import Dscint, DscintProbabilities
from model.export import (
    ModelMetadata,
    export_torchscript,
    load_torchscript,
    torchscript_deprecation_silenced,
)
from model.precision import FP32, LADDER, VERIFY_STUDIES, PrecisionCheck, compare, reduced_module

BATCHES = (1, 8)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def matmul_gflops(n: int = 1024, repeats: int = 20,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Best sustained float32 GEMM rate (GFLOP/s) over a few runs."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        a @ b
        best = min(best, clock() - t)
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


def fc1_only(net: Dscint) -> Callable[[torch.Tensor], torch.Tensor]:
    """FC1 by itself, fed a flattened feature map of the right width for any batch."""
    fc1 = net.classifier[1]
    assert isinstance(fc1, torch.nn.Linear)

    def run(x: torch.Tensor) -> torch.Tensor:
        return fc1(x.reshape(x.shape[0], -1)[:, :fc1.in_features])

    return run


def fc1_bf16(net: Dscint) -> Callable[[torch.Tensor], torch.Tensor]:
    """FC1 with bf16 weights (half the bytes to stream): bf16 in, fp32 out."""
    fc1 = net.classifier[1]
    assert isinstance(fc1, torch.nn.Linear)
    weight, bias = fc1.weight.detach().bfloat16(), fc1.bias.detach().bfloat16()

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)[:, :fc1.in_features].bfloat16()
        return torch.nn.functional.linear(flat, weight, bias).float()

    return run


def fc1_reduced(scripted: torch.jit.ScriptModule, precision: str
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """FC1 as the node serves it on a rung (int8: per-channel weights, dynamic activations;
    fp16: fp16 weights, fp32 activations)."""
    module, _ = reduced_module(scripted, precision)
    fc1 = list(module.net.classifier.children())[1]  # type: ignore[union-attr]
    width = int(fc1.in_features)

    def run(x: torch.Tensor) -> torch.Tensor:
        return fc1(x.reshape(x.shape[0], -1)[:, :width])  # type: ignore[no-any-return]

    return run


def time_interleaved(variants: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                     seconds: float, clock: Callable[[], float] = time.perf_counter,
                     rounds: int = 6) -> dict[tuple[str, int], float]:
    """Median ms per image of each (variant, batch), timed in blocks taken round-robin.

    Within a block calls follow each other, so the weights stay in cache as they did when each
    variant ran alone for `seconds` (the earlier figures); its first call is not timed. Taking
    the blocks in turn spreads a neighbour's burst over all variants instead of one.
    """
    inputs = {b: torch.rand(b, 1, 1024, 256) for b in BATCHES}
    times: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in BATCHES}
    block = seconds / rounds
    with torch.inference_mode():
        for fn in variants.values():
            for x in inputs.values():
                for _ in range(3):
                    fn(x)
        for _ in range(rounds):
            for (name, batch), samples in times.items():
                fn, x = variants[name], inputs[batch]
                fn(x)
                end = time.perf_counter() + block
                n = 0
                while time.perf_counter() < end or n < 2:
                    t = clock()
                    fn(x)
                    samples.append((clock() - t) / batch * 1000)
                    n += 1
    return {key: statistics.median(samples) for key, samples in times.items()}


def forced_rung(scripted: torch.jit.ScriptModule, meta: ModelMetadata, precision: str,
                studies: int) -> tuple[torch.jit.ScriptModule, PrecisionCheck]:
    """The module the node would serve on this rung (optimised as `Classifier` does), whether
    or not its check passes, and the check."""
    with torchscript_deprecation_silenced():
        module, _ = reduced_module(scripted, precision)
        candidate = torch.jit.script(module)
    check = compare(scripted, candidate, meta.preprocessing, meta.temperature, precision, studies)
    served, _, _ = prepare_for_serving(candidate, meta, optimize=True)
    return served, check


def load_net(weights: Path | None) -> Dscint:
    """Dscint with trained weights from a state dict, or as initialised."""
    net = Dscint()
    if weights is not None:
        net.load_state_dict(torch.load(weights, map_location="cpu"))
    return net.eval()


def main() -> None:
    """Run and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="per variant and batch")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: process CPU time, for a busy machine (with --threads 1)")
    ap.add_argument("--verify-studies", type=int, default=VERIFY_STUDIES,
                    help="held-out phantom studies of each rung's check (export and load)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="state dict of a trained Dscint (default: random initial weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = load_net(args.weights)
    eager = DscintProbabilities(net).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(eager, Path(tmp) / "m.pt", ModelMetadata(
            version="bench", weights_sha256="", training_data=str(args.weights or "random"),
            trained_on_phantoms=True), precision="auto", verify_studies=args.verify_studies)
        scripted, meta = load_torchscript(path)
        served = Classifier(path, precision=FP32)
    rungs = {p: forced_rung(scripted, meta, p, args.verify_studies) for p in LADDER}
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager": eager, "torchscript": scripted, "served": served.module,
        **{f"served {p}": module for p, (module, _) in rungs.items()},
        "fc1 only": fc1_only(net), "fc1 bf16": fc1_bf16(net),
        **{f"fc1 {p}": fc1_reduced(scripted, p) for p in LADDER}}
    clock = CLOCKS[args.clock]
    rate = matmul_gflops(clock=clock)
    flops = dscint_flops()
    floor_ms = flops / (rate * 1e9) * 1000
    ms = time_interleaved(variants, args.seconds, clock)
    models = ("eager", "torchscript", "served", *(f"served {p}" for p in LADDER))
    rows = [{"model": name, "batch": batch, "ms_per_image": round(ms[(name, batch)], 2),
             "floor_fraction": round(floor_ms / ms[(name, batch)], 3),
             "speedup_vs_torchscript": round(ms[("torchscript", batch)] / ms[(name, batch)], 2)}
            for name in models for batch in BATCHES]
    fc1 = {batch: {"ms_per_image": round(ms[("fc1 only", batch)], 2),
                   "share_of_served": round(ms[("fc1 only", batch)] / ms[("served", batch)], 3),
                   "bf16_ms_per_image": round(ms[("fc1 bf16", batch)], 2),
                   **{f"{p}_ms_per_image": round(ms[(f"fc1 {p}", batch)], 2) for p in LADDER}}
           for batch in BATCHES}
    checks = {p: check for p, (_, check) in rungs.items()}
    print(f"matmul {rate:.0f} GFLOP/s; Dscint {flops / 1e9:.3f} GFLOP/image; "
          f"floor {floor_ms:.2f} ms/image; threads {args.threads}; {args.clock} clock; "
          f"weights {args.weights or 'random'}")
    print(f"served = {served.serving} (max |prob diff| {served.check_diff:.1e} vs torchscript "
          f"on the load-time check); exported for {meta.precision} serving (ladder "
          f"{' -> '.join((*LADDER, FP32))})")
    for p, check in checks.items():
        print(f"served {p}: {'passes' if check.passed else 'REFUSED'}: {check.summary()}")
    print(f"{'model':<13}{'batch':>6}{'ms/image':>10}{'of floor':>10}{'speed-up':>10}")
    for r in rows:
        print(f"{r['model']:<13}{r['batch']:>6}{r['ms_per_image']:>10}"
              f"{r['floor_fraction']:>10.0%}{r['speedup_vs_torchscript']:>9}x")
    for batch, f in fc1.items():
        print(f"FC1 alone at batch {batch}: fp32 {f['ms_per_image']} ms/image "
              f"({f['share_of_served']:.0%} of served), bf16 {f['bf16_ms_per_image']}, "
              + ", ".join(f"{p} {f[f'{p}_ms_per_image']}" for p in LADDER))
    if args.json:
        args.json.write_text(json.dumps({
            "matmul_gflops": rate, "gflop_per_image": flops / 1e9, "floor_ms": floor_ms,
            "threads": args.threads, "clock": args.clock, "served": served.serving,
            "weights": str(args.weights or "random"), "exported_precision": meta.precision,
            "served_max_prob_diff": served.check_diff, "rows": rows,
            "rungs": {p: c.to_dict() | {"passed": c.passed} for p, c in checks.items()},
            "fc1_only": {str(b): f for b, f in fc1.items()}}, indent=2))


if __name__ == "__main__":
    main()
