"""Study latency: last instance acknowledged by the node -> SR acknowledged by PACS.

The node runs as its own process (`python -m node serve`); studies (both views, so the
completion rule "anterior and posterior present" fires) are sent one after another by a
pynetdicom SCU, each after the previous SR arrived; a PACS stand-in in this process timestamps
each SR. Also reports node RSS idle and after the run (all its processes: the sum, and each
process's figure, classifier first). `python -m bench.latency [--studies 100]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from bench.common import start_bench_node
from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from tests.support.nodeproc import export_model, tree_rss_mib


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
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dscint-latency-") as tmp:
        work = Path(tmp)
        studies = prepare(work, args.studies, DicomLayout(args.layout))
        model = export_model(work / "model.pt")
        pacs = PacsStandIn(ae_title="BENCH_PACS")
        pacs.start()
        node = start_bench_node(work, model, pacs.port, receiver_process=not args.one_process)
        dest = Destination("DSCINT", "127.0.0.1", node.port)
        try:
            time.sleep(2.0)
            idle = tree_rss_mib(node.pid)
            start_peaks = tree_rss_mib(node.pid, "VmHWM")  # start-up: imports, tables, model
            latencies = []
            for paths in studies:
                uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
                if send_paths(paths, dest, "BENCH_CAM") != [0] * len(paths):
                    raise RuntimeError("node refused a study")
                sent = time.time()
                deadline = time.monotonic() + 30
                while uid not in pacs.by_study() and time.monotonic() < deadline:
                    time.sleep(0.002)
                latencies.append(pacs.by_study()[uid][0].acknowledged_at - sent)
            after = tree_rss_mib(node.pid)
            peaks = tree_rss_mib(node.pid, "VmHWM")
        finally:
            node.stop()
            pacs.stop()
    result = {"studies": len(latencies), "layout": args.layout,
              "processes": 1 if args.one_process else 2,
              "p50_s": round(statistics.median(latencies), 3),
              "p99_s": round(percentile(latencies, 99), 3),
              "max_s": round(max(latencies), 3), "rss_idle_mib": round(sum(idle), 1),
              "rss_after_mib": round(sum(after), 1),
              "rss_peak_start_mib": round(sum(start_peaks), 1),
              "rss_peak_mib": round(sum(peaks), 1),
              "by_process_mib": {"idle": idle, "after": after, "peak_start": start_peaks,
                                 "peak": peaks}}
    print(f"{'studies':>8}{'layout':>12}{'p50 s':>8}{'p99 s':>8}{'max s':>8}"
          f"{'RSS idle':>10}{'RSS after':>11}{'peak start':>12}{'RSS peak':>10}")
    print(f"{result['studies']:>8}{args.layout:>12}{result['p50_s']:>8}{result['p99_s']:>8}"
          f"{result['max_s']:>8}{result['rss_idle_mib']:>10}{result['rss_after_mib']:>11}"
          f"{result['rss_peak_start_mib']:>12}{result['rss_peak_mib']:>10}")
    for name, values in result["by_process_mib"].items():  # type: ignore[union-attr]
        print(f"  {name:<11} by process (classifier + receiver): "
              + " + ".join(f"{v:.1f}" for v in values) + " MiB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
