"""Crash-safety soak from the command line: many trials of tests/support/soak.py's
`run_trial` (senders, a node SIGKILLed at seeded random moments and restarted, hostile input;
then nothing may be lost: that module says what each trial checks), and a summary table.

`python -m bench.soak --trials 20 --seed 1` (about 40 s a trial on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tests.support import hostile
from tests.support.nodeproc import export_model
from tests.support.soak import TrialPlan, TrialReport, phantom_pool, run_trial

# --- the command ---------------------------------------------------------------------------


def trials(args: argparse.Namespace, workdir: Path) -> Iterator[TrialReport]:
    """Run the trials one after another."""
    model = Path(args.model) if args.model else export_model(workdir / "dscint.pt")
    pool = phantom_pool(args.pool, args.seed)
    base = hostile.base_dataset(args.seed)
    started = time.monotonic()
    for i in range(args.trials):
        if args.budget and time.monotonic() - started > args.budget:
            print(f"time budget of {args.budget:.0f} s used: stopping after {i} trial(s)")
            return
        plan = TrialPlan(seed=args.seed * 1000 + i, senders=args.senders,
                         studies_per_sender=args.studies, kills=args.kills,
                         hostile=args.hostile)
        yield run_trial(i, plan, pool, model, workdir / f"trial{i:03d}", base)


def _line(r: TrialReport) -> str:
    return (f"trial {r.trial:3d} seed {r.seed}: {'OK ' if r.ok else 'FAIL'} "
            f"{r.instances_acked}/{r.instances_sent} acked ({r.interrupted_attempts} "
            f"associations cut mid-transfer), {r.kills} kills (swept {r.temp_files_swept} "
            f"temp files, re-queued {r.jobs_requeued} jobs, {r.exports_requeued} exports), "
            f"{r.crashes} crashes, lost {len(r.lost)}, SRs missing {len(r.missing_srs)} "
            f"dup {len(r.duplicate_srs)} redelivered {r.sr_redeliveries}, hostile "
            f"{r.hostile_tried} ({len(r.hostile_unexpected)} unexpected), flood "
            f"{r.flood_connections} connections, peak RSS "
            f"{r.peak_rss_mib:.0f} MiB, {r.seconds:.0f} s")


def summarise(reports: list[TrialReport]) -> dict[str, object]:
    """Totals over all trials."""
    return {
        "trials": len(reports), "failed_trials": sum(not r.ok for r in reports),
        "studies": sum(r.studies for r in reports),
        "instances_sent": sum(r.instances_sent for r in reports),
        "instances_acked": sum(r.instances_acked for r in reports),
        "instances_lost": sum(len(r.lost) for r in reports),
        "kills": sum(r.kills for r in reports), "crashes": sum(r.crashes for r in reports),
        "hostile_tried": sum(r.hostile_tried for r in reports),
        "hostile_unexpected": sum(len(r.hostile_unexpected) for r in reports),
        "flood_connections": sum(r.flood_connections for r in reports),
        "missing_srs": sum(len(r.missing_srs) for r in reports),
        "duplicate_srs": sum(len(r.duplicate_srs) for r in reports),
        "sr_redeliveries": sum(r.sr_redeliveries for r in reports),
        "associations_cut_mid_transfer": sum(r.interrupted_attempts for r in reports),
        "sends_while_node_down": sum(r.unreachable_attempts for r in reports),
        "temp_files_swept": sum(r.temp_files_swept for r in reports),
        "jobs_requeued": sum(r.jobs_requeued for r in reports),
        "exports_requeued": sum(r.exports_requeued for r in reports),
        "partial_or_orphan_files": sum(len(r.partial_files) + len(r.orphan_files)
                                       for r in reports),
        "peak_rss_mib": max((r.peak_rss_mib for r in reports), default=0.0),
        "seconds": round(sum(r.seconds for r in reports), 1),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.soak --trials 20 --seed 1`; exit 1 when any trial failed."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--studies", type=int, default=5, help="studies per sender")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs per trial")
    ap.add_argument("--hostile", type=int, default=30, help="hostile inputs per trial")
    ap.add_argument("--pool", type=int, default=12, help="distinct phantom studies")
    ap.add_argument("--model", default="", help="TorchScript model (default: export one)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="stop starting trials after this many seconds (0 = no limit)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    ap.add_argument("--json", type=Path, default=None, help="write all reports here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused connects by design
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # reading back odd hostile inputs
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    with tempfile.TemporaryDirectory(prefix="dscint-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        reports = []
        for report in trials(args, workdir):
            reports.append(report)
            print(_line(report), flush=True)
            for problem in (report.lost + report.partial_files + report.orphan_files
                            + report.missing_srs + report.duplicate_srs
                            + report.hostile_unexpected + report.refused_valid
                            + report.errors_logged)[:10]:
                print(f"    {problem}")
    total = summarise(reports)
    print(json.dumps(total, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"total": total,
                                         "trials": [asdict(r) for r in reports]}, indent=2))
    return 0 if total["failed_trials"] == 0 and reports else 1


if __name__ == "__main__":
    sys.exit(main())
