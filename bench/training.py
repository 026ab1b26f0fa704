"""Training speed of Dscint on this CPU.

Throughput (default): images/s at the paper's batch 4 and larger batches, optimiser variants,
fp32 and bf16 autocast (AVX512-BF16 on this CPU), against the paper's ~3.3 images/s per core
(field notes §5: 233 ms per Adam step at batch 4). `python -m bench.training [--json out.json]`.

Time to accuracy: `python -m bench.training --to-accuracy 0.85` trains Dscint on the default
phantom benchmark (`python -m node train --patients 800 --seed 3`: 800 patients, difficulty 0.5,
7:3 split by patient) and prints the wall time until held-out study accuracy (views averaged,
as the node serves) first reaches the target, evaluated every half epoch, for the paper's
settings (Table 5: Adam lr 1e-3, weight decay 1e-4, batch 4) and "best" settings (batch 16,
lr 1e-3: 2.2x the images/s of batch 4 here; no wider search), each in fp32 and bf16
autocast. Wall time counts training and the evaluations (they are part of knowing the target
was reached), not data generation; the process's CPU seconds are printed beside it (a busy
machine stretches wall time, CPU time much less). Baselines (torchvision) need
`.venv-baselines`; this bench measures Dscint only.
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

from model.archs import Probabilities, build_network, set_channels_last
from model.augment import AugmentParams, augment_batch
from model.classes import CLASS_NAMES
from model.datasets import load_phantoms
from model.dscint import Dscint
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


def images_per_second(batch: int, fused: bool, channels_last: bool, precision: str = "fp32",
                      steps: int = 6, clock: Callable[[], float] = time.perf_counter) -> float:
    """Simple rate over `steps` Adam steps after two warm-up steps."""
    torch.manual_seed(0)
    net = Dscint()
    x = torch.rand(batch, 1, 1024, 256)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
    for i in range(steps + 2):
        if i == 2:
            t0 = clock()
        with autocast(precision):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (clock() - t0)


def throughput(args: argparse.Namespace, cores: int) -> None:
    """The images/s table."""
    rows = []
    variants = [(4, False, False, "fp32"), (4, True, False, "fp32"), (4, True, True, "fp32"),
                (4, True, True, "bf16"), (8, True, True, "fp32"), (16, True, True, "fp32"),
                (16, True, True, "bf16"), (32, True, True, "fp32")]
    if args.quick:  # the paper's batch and the best one, fp32 against bf16
        variants = [v for v in variants if v[1] and v[2] and v[0] in (4, 16)]
    for batch, fused, cl, precision in variants:
        ips = images_per_second(batch, fused, cl, precision, clock=CLOCKS[args.clock])
        rows.append({"batch": batch, "fused_adam": fused, "channels_last": cl,
                     "precision": precision, "images_per_s": round(ips, 1),
                     "per_core_vs_paper": round(ips / cores / PAPER_IMAGES_PER_S_PER_CORE, 1)})
    print(f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock (per core: images/s / {cores})")
    print(f"{'batch':>6}{'fused':>7}{'ch-last':>9}{'prec':>6}{'img/s':>8}{'x paper/core':>14}")
    for r in rows:
        print(f"{r['batch']:>6}{r['fused_adam']!s:>7}{r['channels_last']!s:>9}"
              f"{r['precision']:>6}{r['images_per_s']:>8}{r['per_core_vs_paper']:>14}")
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
    args = ap.parse_args()
    cores = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    if args.to_accuracy is None:
        throughput(args, cores)
    else:
        to_accuracy(args)


if __name__ == "__main__":
    main()
