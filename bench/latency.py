"""Study latency: last instance acknowledged by the node -> SR acknowledged by PACS.

The node runs as its own process (`python -m node serve`); studies (both views, so the
completion rule "anterior and posterior present" fires) are sent one after another by a
pynetdicom SCU, each after the previous SR arrived; a PACS stand-in in this process timestamps
each SR. Also reports the node's memory, each process (classifier, receiver) and the sum: RSS
and PSS idle, peak while the studies run (sampled every 0.2 s), after the run, and the kernel's
peak RSS (VmHWM, start-up included). RSS counts a page shared by both processes (libraries,
the page cache of the same files) in each, so the sum of RSS double-counts it; PSS splits each
shared page among its sharers, so the sum of PSS is what the node really holds; anonymous memory
(heap, weights, Python objects) is the part no other process's libraries change.
`python -m bench.latency [--studies 100] [--precision int8]`: int8 exports the test model
for int8 serving (FC1 in int8, checked on held-out images at export and again at load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from bench.common import MemorySampler, export_bench_model, start_bench_node, tree_memory_mib
from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from tests.support.nodeproc import tree_rss_mib


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def prepare(work: Path, n: int, layout: DicomLayout) -> list[list[Path]]:
    """n phantom studies written to disk before timing starts."""
    return [write_study(generate_study(CLASS_NAMES[i % 4], seed=70_000 + i),
                        work / f"s{i}", layout) for i in range(n)]


def memory_rows(idle: list[tuple[float, float, float]], sampler: MemorySampler,
                after: list[tuple[float, float, float]], start_peaks: list[float],
                peaks: list[float]) -> dict[str, list[float]]:
    """{row: [classifier, receiver, ..., sum]} in MiB. A peak row's sum is the peak of the
    sum (sampled), except VmHWM's, which is the sum of each process's own peak."""
    def with_sum(values: list[float], total: float | None = None) -> list[float]:
        return [round(v, 1) for v in values] + [round(sum(values) if total is None
                                                      else total, 1)]
    return {
        "RSS idle": with_sum([m[0] for m in idle]),
        "PSS idle": with_sum([m[1] for m in idle]),
        "RSS peak during run": with_sum(sampler.peak_rss, sampler.peak_rss_sum),
        "PSS peak during run": with_sum(sampler.peak_pss, sampler.peak_pss_sum),
        "RSS after run": with_sum([m[0] for m in after]),
        "PSS after run": with_sum([m[1] for m in after]),
        "anonymous idle": with_sum([m[2] for m in idle]),
        "anonymous peak": with_sum(sampler.peak_anon, sampler.peak_anon_sum),
        "anonymous after run": with_sum([m[2] for m in after]),
        "VmHWM after start-up": with_sum(start_peaks),
        "VmHWM after run": with_sum(peaks),
    }


def print_memory(rows: dict[str, list[float]]) -> None:
    """The memory table: one column per process (classifier first), then the sum."""
    n = max(len(v) for v in rows.values()) - 1
    names = ["classifier", "receiver", *[f"child {i}" for i in range(2, n)]][:n]
    print(f"{'memory, MiB':<22}" + "".join(f"{x:>12}" for x in [*names, "sum"]))
    for label, values in rows.items():
        cells = [*values[:-1], *[float("nan")] * (n - len(values) + 1), values[-1]]
        print(f"{label:<22}" + "".join(f"{v:>12.1f}" for v in cells))
    print("  RSS double-counts pages both processes map (shared libraries, the same files' "
          "page cache);\n  PSS splits them among the sharers (sum of PSS = what the node "
          "holds; other processes on\n  the machine mapping the same libraries lower it); "
          "anonymous: memory the processes allocated\n  themselves. Peaks: sampled every "
          "0.2 s (peak of the sum); VmHWM: each process's own peak RSS,\n  summed.")


def main() -> None:
    """Run and print p50/p99."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--layout", default="multiframe", choices=[x.value for x in DicomLayout])
    ap.add_argument("--one-process", action="store_true",
                    help="receive in the classifier's process ([node].receiver_process = false)")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                    help="the precision the test model is exported for")
    ap.add_argument("--start-timeout", type=float, default=120.0,
                    help="seconds to wait for the node to answer C-ECHO after its start")
    ap.add_argument("--sr-timeout", type=float, default=30.0,
                    help="seconds to wait for a study's SR before counting it missed")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dscint-latency-") as tmp:
        work = Path(tmp)
        studies = prepare(work, args.studies, DicomLayout(args.layout))
        model = export_bench_model(work / "model.pt", args.precision)
        pacs = PacsStandIn(ae_title="BENCH_PACS")
        pacs.start()
        node = start_bench_node(work, model, pacs.port, receiver_process=not args.one_process,
                                start_timeout=args.start_timeout)
        dest = Destination("DSCINT", "127.0.0.1", node.port)
        try:
            time.sleep(2.0)
            idle = tree_memory_mib(node.pid)
            start_peaks = tree_rss_mib(node.pid, "VmHWM")  # start-up: imports, tables, model
            sampler = MemorySampler(node.pid).start()
            latencies, missed = [], 0
            for paths in studies:
                uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
                if send_paths(paths, dest, "BENCH_CAM") != [0] * len(paths):
                    raise RuntimeError("node refused a study")
                sent = time.time()
                deadline = time.monotonic() + args.sr_timeout
                while uid not in pacs.by_study() and time.monotonic() < deadline:
                    time.sleep(0.002)
                if uid not in pacs.by_study():
                    missed += 1  # counted, not timed: a later study's wait may include it
                    continue
                latencies.append(pacs.by_study()[uid][0].acknowledged_at - sent)
            sampler.stop()
            after = tree_memory_mib(node.pid)
            peaks = tree_rss_mib(node.pid, "VmHWM")
        finally:
            node.stop()
            pacs.stop()
        log = (work / "node.log").read_text(errors="replace") if (work / "node.log").exists() \
            else ""
        served = "fp32" if args.precision == "fp32" or "serving fp32" in log else "int8"
    if not latencies:
        raise SystemExit(f"no SR arrived within {args.sr_timeout} s for any study")
    result = {"studies": len(latencies), "missed": missed, "layout": args.layout,
              "precision": args.precision, "served": served,
              "processes": 1 if args.one_process else 2,
              "p50_s": round(statistics.median(latencies), 3),
              "p99_s": round(percentile(latencies, 99), 3),
              "max_s": round(max(latencies), 3),
              "memory_mib": memory_rows(idle, sampler, after, start_peaks, peaks)}
    print(f"model exported for {args.precision} serving; the node served {served}")
    print(f"{'studies':>8}{'layout':>12}{'p50 s':>8}{'p99 s':>8}{'max s':>8}")
    print(f"{result['studies']:>8}{args.layout:>12}{result['p50_s']:>8}{result['p99_s']:>8}"
          f"{result['max_s']:>8}")
    if missed:
        print(f"  {missed} studies had no SR within {args.sr_timeout} s (not in the figures)")
    print_memory(result["memory_mib"])  # type: ignore[arg-type]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
