"""Crash safety, one short trial of `python -m bench.soak` (the trial is tests/support/soak.py):
a node in its own process is killed with SIGKILL at seeded random moments while several senders
send, and restarted. Every instance that got Success must be in the database and on disk
(pixels identical), no temp or partial file may be left where data lives or be referenced,
every study must get exactly one SR, hostile input on the side must be answered as expected,
and the node must never die on its own."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from tests.support import hostile
from tests.support.soak import TrialPlan, phantom_pool, run_trial


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, untrained_model: Path) -> None:
    plan = TrialPlan(seed=20_251, senders=3, studies_per_sender=4, kills=3, hostile=12,
                     kill_after=(0.1, 1.2), pause=0.3)
    report = run_trial(0, plan, phantom_pool(6, seed=11), untrained_model, tmp_path,
                       hostile.base_dataset(11), time_limit=240.0, corpus=False)
    print(f"\n{report.instances_acked}/{report.instances_sent} instances acknowledged over "
          f"{report.kills} SIGKILLs ({report.interrupted_attempts} associations cut, "
          f"{report.temp_files_swept} temp files swept, {report.jobs_requeued} jobs and "
          f"{report.exports_requeued} exports re-queued), {report.hostile_tried} hostile "
          f"inputs, peak RSS {report.peak_rss_mib:.0f} MiB, {report.seconds:.0f} s")
    assert report.kills == plan.kills and report.node_starts == plan.kills + 1
    assert report.crashes == 0
    assert report.flood_connections > 0  # the cameras were served while it ran
    assert report.instances_acked == report.instances_sent
    assert report.lost == [] and report.partial_files == [] and report.orphan_files == []
    assert report.missing_srs == [] and report.duplicate_srs == []
    assert report.ok, asdict(report)
