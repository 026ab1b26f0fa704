"""Training throughput of Dscint on this CPU: images/s at the paper's batch 4 and larger
batches, optimiser variants, against the paper's ~3.3 images/s per core (field notes §5:
233 ms per Adam step at batch 4). `python -m bench.training [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from model.dscint import Dscint

PAPER_IMAGES_PER_S_PER_CORE = 3.3


def images_per_second(batch: int, fused: bool, channels_last: bool, steps: int = 6) -> float:
    """Median-free simple rate over `steps` Adam steps after two warm-up steps."""
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
            t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    rows = []
    variants = [(4, False, False), (4, True, False), (4, True, True), (8, True, True),
                (16, True, True), (32, True, True)]
    for batch, fused, cl in variants:
        ips = images_per_second(batch, fused, cl)
        rows.append({"batch": batch, "fused_adam": fused, "channels_last": cl,
                     "images_per_s": round(ips, 1),
                     "per_core_vs_paper": round(ips / cores / PAPER_IMAGES_PER_S_PER_CORE, 1)})
    print(f"{cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6}{'fused':>7}{'ch-last':>9}{'img/s':>8}{'x paper/core':>14}")
    for r in rows:
        print(f"{r['batch']:>6}{r['fused_adam']!s:>7}{r['channels_last']!s:>9}"
              f"{r['images_per_s']:>8}{r['per_core_vs_paper']:>14}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
