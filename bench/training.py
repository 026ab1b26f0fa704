"""Training speed of Dscint and the paper's baselines on this CPU.

Throughput (default): images/s at the paper's batch 4 and larger batches, optimiser variants,
each in fp32 and bf16 autocast (AVX512-BF16 on this CPU), against the paper's ~3.3 images/s per
core (field notes §5: 233 ms per Adam step at batch 4). `--arch` picks networks (default
dscint); the baselines need `.venv-baselines` (a missing package is one "skipped" line).
fp32 and bf16 runs alternate on one network (`--repeats` rounds) so load that comes and goes
hits both alike; the table gives medians, the load average is printed at start and end:
`.venv-baselines/bin/python -m bench.training --arch alexnet resnet18 --quick --threads 1
--clock cpu [--json out.json]`.

Time to accuracy: `python -m bench.training --to-accuracy 0.85` trains Dscint on the default
phantom benchmark (`python -m node train --patients 800 --seed 3`: 800 patients, difficulty 0.5,
7:3 split by patient) and prints the wall time until held-out study accuracy (views averaged,
as the node serves) first reaches the target, evaluated every half epoch, for the paper's
settings (Table 5: Adam lr 1e-3, weight decay 1e-4, batch 4) and "best" settings (batch 16,
lr 1e-3: 2.2x the images/s of batch 4 here; no wider search), each in fp32 and bf16
autocast. Wall time counts training and the evaluations (they are part of knowing the target
was reached), not data generation; the process's CPU seconds are printed beside it (a busy
machine stretches wall time, CPU time much less). Time to accuracy is Dscint only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.archs import ARCHS, Probabilities, build_network, set_channels_last, unavailable_reason
from model.augment import AugmentParams, augment_batch
from model.classes import CLASS_NAMES
from model.datasets import load_phantoms
from model.export import ModelMetadata, choose_precision, torchscript_deprecation_silenced
from model.metrics import compute_metrics
from model.preprocess import PreprocessParams
from model.split import patient_split
from model.trainer import TrainConfig, epoch_order, predict, preprocess_all, study_level

PAPER_IMAGES_PER_S_PER_CORE = 3.3
PRECISIONS = ("fp32", "bf16")


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """bf16 autocast on the CPU (matmuls and convolutions in bf16, fp32 weights and optimiser
    state), or nothing for fp32."""
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          precision: str) -> None:
    """One Adam step, the forward pass under `precision`."""
    with autocast(precision):
        loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@dataclass(frozen=True)
class Variant:
    """One throughput configuration, measured in every precision."""

    batch: int
    fused: bool
    channels_last: bool


@dataclass
class Rig:
    """A network, its optimiser and one batch, reused by the interleaved runs so the only
    difference between an fp32 and a bf16 run is the precision (and the machine's load)."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def build(cls, arch: str, v: Variant) -> Rig:
        """Seeded network `arch` at the paper's input size (N, 1, 1024, 256)."""
        torch.manual_seed(0)
        net = build_network(arch)
        x = torch.rand(v.batch, 1, 1024, 256)
        if v.channels_last:
            net = set_channels_last(net)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4, fused=v.fused)
        return cls(net, opt, x, torch.randint(0, 4, (v.batch,)))

    def rate(self, precision: str, steps: int, warmup: int) -> dict[str, float]:
        """Images/s over `steps` Adam steps after `warmup` untimed ones, by wall and CPU clock."""
        for _ in range(warmup):
            _step(self.net, self.opt, self.x, self.y, precision)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _step(self.net, self.opt, self.x, self.y, precision)
        n = len(self.x) * steps
        return {"wall": n / (time.perf_counter() - t0), "cpu": n / (time.process_time() - c0)}


def interleaved(arch: str, v: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """fp32, bf16, fp32, bf16, ... (`--repeats` rounds) on one network, so load that comes and
    goes hits both precisions alike; warm-up steps only before each precision's first run."""
    rig = Rig.build(arch, v)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for r in range(args.repeats):
        for p in PRECISIONS:
            runs[p].append(rig.rate(p, args.steps, args.warmup if r == 0 else 0))
    med = {p: {c: float(np.median([run[c] for run in runs[p]])) for c in CLOCKS}
           for p in PRECISIONS}
    return {"arch": arch, "batch": v.batch, "fused_adam": v.fused,
            "channels_last": v.channels_last,
            **{f"{p}_images_per_s": round(med[p][args.clock], 2) for p in PRECISIONS},
            "bf16_over_fp32": round(med["bf16"][args.clock] / med["fp32"][args.clock], 2),
            "bf16_over_fp32_other_clock": round(
                med["bf16"][_other(args.clock)] / med["fp32"][_other(args.clock)], 2),
            "runs": {p: [{c: round(x, 2) for c, x in run.items()} for run in runs[p]]
                     for p in PRECISIONS}}


def _other(clock: str) -> str:
    return "cpu" if clock == "wall" else "wall"


def _variants(args: argparse.Namespace) -> list[Variant]:
    """--batches, else --quick (paper batch 4 and 16), else the fused/channels-last sweep."""
    if args.batches:
        return [Variant(b, True, True) for b in args.batches]
    if args.quick:
        return [Variant(4, True, True), Variant(16, True, True)]
    return [Variant(4, False, False), Variant(4, True, False), Variant(4, True, True),
            Variant(8, True, True), Variant(16, True, True), Variant(32, True, True)]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def throughput(args: argparse.Namespace, cores: int) -> None:
    """The images/s table: fp32 against bf16 autocast per network and batch (medians)."""
    print(f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, medians of {args.repeats} interleaved runs of {args.steps} "
          f"steps; load average {_load()} at start", flush=True)
    rows = []
    for arch in args.arch:
        reason = unavailable_reason(arch)
        if reason:
            print(f"skipped {arch}: {reason}", flush=True)
            continue
        for v in _variants(args):
            rows.append(interleaved(arch, v, args))
            r = rows[-1]
            print(f"  {arch} batch {v.batch}: fp32 {r['fp32_images_per_s']}, bf16 "
                  f"{r['bf16_images_per_s']} images/s (load {_load()})", flush=True)
    if not rows:
        return
    print(f"load average {_load()} at end (per core vs paper: fp32 images/s / {cores} / "
          f"{PAPER_IMAGES_PER_S_PER_CORE}, Dscint only)")
    other = _other(args.clock)
    print(f"{'arch':<13}{'batch':>6}{'fused':>7}{'ch-last':>9}{'fp32 img/s':>12}"
          f"{'bf16 img/s':>12}{'bf16/fp32':>11}{f'({other})':>8}{'x paper/core':>14}")
    for r in rows:
        paper = (f"{r['fp32_images_per_s'] / cores / PAPER_IMAGES_PER_S_PER_CORE:.1f}"
                 if r["arch"] == "dscint" else "-")
        print(f"{r['arch']:<13}{r['batch']:>6}{r['fused_adam']!s:>7}{r['channels_last']!s:>9}"
              f"{r['fp32_images_per_s']:>12}{r['bf16_images_per_s']:>12}"
              f"{r['bf16_over_fp32']:>11}{r['bf16_over_fp32_other_clock']:>8}{paper:>14}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


@dataclass(frozen=True)
class Setting:
    """One way to train: the name printed, batch size, learning rate, precision."""

    name: str
    batch: int
    learning_rate: float
    precision: str


@dataclass
class Benchmark:
    """The default phantom benchmark, generated and preprocessed once for every run."""

    x: torch.Tensor
    y: torch.Tensor
    labels: np.ndarray
    patient_ids: list[str]
    train: np.ndarray
    test: np.ndarray


def load_benchmark(patients: int, seed: int, difficulty: float) -> Benchmark:
    """`python -m node train`'s data and split for these arguments."""
    data = load_phantoms(patients, seed=seed, difficulty=difficulty)
    labels = np.asarray(data.labels, dtype=np.int64)
    train, test = patient_split(data.patient_ids, labels, TrainConfig().test_fraction, seed)
    x = preprocess_all(data.images, PreprocessParams(), progress=False)
    return Benchmark(x, torch.from_numpy(labels), labels, list(data.patient_ids), train, test)


def held_out_study_accuracy(net: torch.nn.Module, bench: Benchmark) -> float:
    """Study accuracy on the held-out patients, views averaged (as `train_model` reports)."""
    probs = predict(net, bench.x[bench.test])
    pids = [bench.patient_ids[i] for i in bench.test]
    y, p = study_level(pids, bench.labels[bench.test], probs)
    return compute_metrics(y, p, CLASS_NAMES).accuracy


def time_to_accuracy(bench: Benchmark, s: Setting, target: float, seed: int,
                     max_seconds: float, evals_per_epoch: int = 2) -> dict[str, Any]:
    """Train until held-out study accuracy reaches `target` (or `max_seconds` pass)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = set_channels_last(build_network("dscint"))
    opt = torch.optim.Adam(net.parameters(), lr=s.learning_rate, weight_decay=1e-4, fused=True)
    x_train, y_train = bench.x[bench.train], bench.y[bench.train]
    augment = AugmentParams()
    history: list[tuple[float, float, float, float]] = []  # epochs, wall s, CPU s, accuracy
    seen, train_seconds, t0, c0 = 0, 0.0, time.perf_counter(), time.process_time()
    every = max(1, len(x_train) // evals_per_epoch)
    while time.perf_counter() - t0 < max_seconds:
        net.train()
        order = epoch_order(y_train, TrainConfig(), gen)
        for start in range(0, len(order), s.batch):
            idx = order[start:start + s.batch]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            t_step = time.perf_counter()
            xb = augment_batch(x_train[idx], gen, augment).contiguous(
                memory_format=torch.channels_last)
            with autocast(s.precision):
                loss = F.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_seconds += time.perf_counter() - t_step
            before, seen = seen, seen + len(idx)
            if seen // every > before // every:
                acc = held_out_study_accuracy(net, bench)
                history.append((seen / len(x_train), time.perf_counter() - t0,
                                time.process_time() - c0, acc))
                net.train()
                if acc >= target:
                    return {**_reached(s, history, train_seconds, seen, True),
                            "int8_check": int8_check(net)}
            if time.perf_counter() - t0 >= max_seconds:
                break
    return _reached(s, history, train_seconds, seen, False)


def int8_check(net: torch.nn.Module) -> dict[str, Any]:
    """The export-time int8 check (`model.export.choose_precision`) on this trained network:
    does FC1 in int8 predict its class on the held-out phantom images?"""
    probs = Probabilities(set_channels_last(net, False)).eval()
    with torchscript_deprecation_silenced():
        scripted = torch.jit.script(probs)
    meta = ModelMetadata(version="bench", weights_sha256="", training_data="bench",
                         trained_on_phantoms=True)
    chosen, check = choose_precision(scripted, meta, "int8")
    set_channels_last(net, True)
    return {"chosen": chosen, **check}


def _reached(s: Setting, history: list[tuple[float, float, float, float]],
             train_seconds: float, seen: int, reached: bool) -> dict[str, Any]:
    last = history[-1] if history else (0.0, 0.0, 0.0, 0.0)
    return {"setting": s.name, "batch": s.batch, "lr": s.learning_rate,
            "precision": s.precision, "reached": reached, "epochs": round(last[0], 2),
            "wall_s": round(last[1], 1), "cpu_s": round(last[2], 1),
            "train_s": round(train_seconds, 1),
            "images_per_s": round(seen / max(train_seconds, 1e-9), 1),
            "accuracy": round(last[3], 4),
            "history": [[round(e, 2), round(t, 1), round(c, 1), round(a, 4)]
                        for e, t, c, a in history]}


SETTINGS = {
    "paper": (4, 1e-3),  # Table 5
    "best": (16, 1e-3),  # 2.2x the paper batch's images/s here (bench.training's table)
}


def to_accuracy(args: argparse.Namespace) -> None:
    """The time-to-accuracy table."""
    t = time.perf_counter()
    bench = load_benchmark(args.patients, args.seed, args.difficulty)
    print(f"default phantom benchmark: {args.patients} patients, difficulty {args.difficulty}, "
          f"seed {args.seed}; {len(bench.train)} training / {len(bench.test)} held-out images "
          f"(generated and preprocessed in {time.perf_counter() - t:.0f} s, not counted); "
          f"{torch.get_num_threads()} threads; target held-out study accuracy {args.to_accuracy}")
    rows = []
    for name in args.settings:
        batch, lr = SETTINGS[name]
        for precision in args.precisions:
            s = Setting(name, batch, lr, precision)
            rows.append(time_to_accuracy(bench, s, args.to_accuracy, args.seed,
                                         args.max_minutes * 60))
            r = rows[-1]
            print(f"  {name} {precision}: {'reached' if r['reached'] else 'NOT reached'} "
                  f"{r['accuracy']} at epoch {r['epochs']}, {r['wall_s']} s "
                  f"({r['cpu_s']} CPU s)", flush=True)
            if "int8_check" in r:
                c = r["int8_check"]
                print(f"    int8 check on the trained net: {c.get('chosen')}, agreement "
                      f"{c.get('agreement')} on {c.get('images')} held-out images, max prob "
                      f"diff {c.get('max_prob_diff')}", flush=True)
    print(f"{'setting':<8}{'batch':>6}{'lr':>8}{'prec':>6}{'reached':>9}{'wall s':>8}"
          f"{'CPU s':>8}{'train s':>9}{'epochs':>8}{'img/s':>8}{'acc':>7}")
    for r in rows:
        print(f"{r['setting']:<8}{r['batch']:>6}{r['lr']:>8}{r['precision']:>6}"
              f"{r['reached']!s:>9}{r['wall_s']:>8}{r['cpu_s']:>8}{r['train_s']:>9}"
              f"{r['epochs']:>8}{r['images_per_s']:>8}{r['accuracy']:>7}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


def main() -> None:
    """Print the throughput table, or the time-to-accuracy table with --to-accuracy."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--to-accuracy", type=float, default=None, metavar="ACC",
                    help="time Dscint to this held-out study accuracy instead")
    ap.add_argument("--patients", type=int, default=800)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--difficulty", type=float, default=0.5)
    ap.add_argument("--max-minutes", type=float, default=15.0, help="per run (wall)")
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["paper", "best"])
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--threads", type=int, default=None, help="default: one per core")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="throughput: cpu = process CPU time, for a busy machine (--threads 1)")
    ap.add_argument("--quick", action="store_true", help="throughput: batch 4 and 16 only")
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), default=["dscint"],
                    help="throughput: networks (baselines need .venv-baselines)")
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="throughput: these batches (fused Adam, channels-last) instead")
    ap.add_argument("--repeats", type=int, default=2, help="throughput: fp32/bf16 rounds")
    ap.add_argument("--steps", type=int, default=6, help="throughput: timed steps per run")
    ap.add_argument("--warmup", type=int, default=2,
                    help="throughput: untimed steps before each precision's first run")
    args = ap.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--repeats and --steps must be at least 1, --warmup at least 0")
    cores = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    if args.to_accuracy is None:
        throughput(args, cores)
    else:
        to_accuracy(args)


if __name__ == "__main__":
    main()
