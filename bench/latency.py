"""Study latency: last instance acknowledged by the node -> SR acknowledged by PACS.

The node runs as its own process (`python -m node serve`); studies (both views, so the
completion rule "anterior and posterior present" fires) are sent one after another by a
pynetdicom SCU, each after the previous SR arrived; a PACS stand-in in this process timestamps
each SR. Also reports node RSS idle and after the run (all its processes: the sum, and each
process's figure, classifier first). `python -m bench.latency [--studies 100]
[--precision int8]`: int8 exports the test model for int8 serving (FC1 in int8, checked on
held-out images at export and again when the node loads it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from bench.common import export_bench_model, start_bench_node
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
            idle = tree_rss_mib(node.pid)
            start_peaks = tree_rss_mib(node.pid, "VmHWM")  # start-up: imports, tables, model
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
            after = tree_rss_mib(node.pid)
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
              "max_s": round(max(latencies), 3), "rss_idle_mib": round(sum(idle), 1),
              "rss_after_mib": round(sum(after), 1),
              "rss_peak_start_mib": round(sum(start_peaks), 1),
              "rss_peak_mib": round(sum(peaks), 1),
              "by_process_mib": {"idle": idle, "after": after, "peak_start": start_peaks,
                                 "peak": peaks}}
    print(f"model exported for {args.precision} serving; the node served {served}")
    print(f"{'studies':>8}{'layout':>12}{'p50 s':>8}{'p99 s':>8}{'max s':>8}"
          f"{'RSS idle':>10}{'RSS after':>11}{'peak start':>12}{'RSS peak':>10}")
    print(f"{result['studies']:>8}{args.layout:>12}{result['p50_s']:>8}{result['p99_s']:>8}"
          f"{result['max_s']:>8}{result['rss_idle_mib']:>10}{result['rss_after_mib']:>11}"
          f"{result['rss_peak_start_mib']:>12}{result['rss_peak_mib']:>10}")
    if missed:
        print(f"  {missed} studies had no SR within {args.sr_timeout} s (not in the figures)")
    for name, values in result["by_process_mib"].items():  # type: ignore[union-attr]
        print(f"  {name:<11} by process (classifier + receiver): "
              + " + ".join(f"{v:.1f}" for v in values) + " MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
