"""`python -m node status` as an admin runs it: in an 80-column terminal and in a pipe every
line fits, no cell is broken across lines, filters work, --json parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from node.ops.status import age_text, parse_since, short_uid
from storage.db import Database
from storage.intake import InstanceRecord, mark_complete, record_instance
from storage.jobs import NewResult, claim_job, store_result

ROOT = Path(__file__).resolve().parent.parent
# long, realistic UIDs: the old table broke these over several lines
CLASSIFIED = "1.2.826.0.1.3680043.8.498.10958744328817731231298841702734"
RECEIVING = "1.2.826.0.1.3680043.8.498.55512398712398712398798123987129"
OLD = "1.2.826.0.1.3680043.8.498.99999999999999999999999999999999"


def _rec(study: str, sop: str, view: str) -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, study_uid=study, series_uid=study + ".1",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/data/{sop}.dcm",
                          views=(view,), n_frames=1, size_bytes=1000, calling_ae="CAMERA",
                          patient_key="pk-" + study[-4:])


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    """A node's storage with a classified study, one receiving and one two days old."""
    root = tmp_path / "store"
    root.mkdir()
    db = Database(f"sqlite:///{root / 'queue.sqlite3'}")
    db.create_all()
    now = datetime.now(UTC)
    record_instance(db, _rec(CLASSIFIED, CLASSIFIED + ".1", "anterior"), now=now)
    record_instance(db, _rec(CLASSIFIED, CLASSIFIED + ".2", "posterior"), now=now)
    assert mark_complete(db, CLASSIFIED, "both_views", now=now)
    job = claim_job(db, "w", now=now)
    assert job is not None
    store_result(db, NewResult(study_uid=CLASSIFIED, job_id=job.job_id, model_version="v1",
                               model_sha256="ab" * 32, predicted_class="metastatic",
                               probabilities={"normal": 0.1, "metastatic": 0.9},
                               per_view={}, sr_sop_uid="2.25.1", sr_series_uid="2.25.2",
                               sr_path="/sr/2.25.1.dcm"), "PACS", now=now)
    record_instance(db, _rec(RECEIVING, RECEIVING + ".1", "anterior"), now=now)
    record_instance(db, _rec(OLD, OLD + ".1", "anterior"), now=now - timedelta(days=2))
    db.dispose()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[storage]\nroot = "{root}"\ndatabase = "sqlite:///{root / "queue.sqlite3"}"'
                   f'\nmin_free_mb = 0\n')
    return cfg


def run_status(cfg: Path, *args: str, columns: int = 80) -> str:
    """The command in a pipe (stdout is not a terminal), COLUMNS as a terminal would set."""
    env = {**os.environ, "COLUMNS": str(columns)}
    env.pop("LINES", None)
    done = subprocess.run([sys.executable, "-m", "node", "status", "--config", str(cfg), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compact_fits_80_columns_and_cells_stay_whole(config_file: Path) -> None:
    out = run_status(config_file)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    # one line per study: the UID ending, state and result on the same line, unbroken
    row = next(line for line in lines if short_uid(CLASSIFIED) in line)
    assert "classified" in row and "metastatic" in row and "pending" in row
    assert any(short_uid(RECEIVING) in line and "receiving" in line for line in lines)
    assert not any(line.strip() in ("clas", "sifi", "ed") for line in lines)
    assert "3 study(ies) shown: 1 classified, 2 receiving" in out
    assert "health:" in out


def test_wide_is_one_whole_line_per_study_even_in_80_columns(config_file: Path) -> None:
    """--wide is for `less -S` or a wide window: every cell whole, never wrapped or cropped."""
    lines = run_status(config_file, "--wide").splitlines()
    assert "applicability" in lines[0]
    rows = [line for line in lines if line.startswith("1.2.")]
    assert len(rows) == 3 and sum(" receiving " in r for r in rows) == 2  # a line per study
    row = next(line for line in lines if CLASSIFIED in line)
    assert "both_views" in row and "metastatic" in row and "anterior,posterior" in row
    # the summary and health lines still fit the terminal
    assert all(len(line) <= 80 for line in lines if not line.startswith(("study", "1.2")))


def test_filters(config_file: Path) -> None:
    out = run_status(config_file, "--state", "classified")
    assert short_uid(CLASSIFIED) in out and short_uid(RECEIVING) not in out
    assert "1 study(ies) shown: 1 classified" in out
    out = run_status(config_file, "--since", "1h")
    assert short_uid(OLD) not in out and short_uid(RECEIVING) in out
    out = run_status(config_file, "--study", OLD[-10:])
    assert short_uid(OLD) in out and short_uid(CLASSIFIED) not in out


def test_json_parses(config_file: Path) -> None:
    doc = json.loads(run_status(config_file, "--json"))
    by_uid = {s["study_uid"]: s for s in doc["studies"]}
    assert set(by_uid) == {CLASSIFIED, RECEIVING, OLD}
    assert by_uid[CLASSIFIED]["result"] == "metastatic"
    assert by_uid[CLASSIFIED]["export_state"] == "pending"
    assert by_uid[OLD]["age_seconds"] >= 2 * 86400 - 60
    assert doc["health"]["status"] in ("ok", "degraded") and "queue" in doc


def test_bad_since_is_refused_with_the_form(config_file: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "node", "status", "--config", str(config_file),
                           "--since", "yesterday"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "expected a number" in done.stderr


def test_helpers() -> None:
    assert parse_since("90s") == timedelta(seconds=90)
    assert parse_since("2h") == timedelta(hours=2)
    with pytest.raises(ValueError):
        parse_since("2w")
    assert age_text(42) == "42s" and age_text(7200) == "2h" and age_text(3 * 86400) == "3d"
    assert short_uid("1.2.3") == "1.2.3" and short_uid(CLASSIFIED).endswith(CLASSIFIED[-12:])


def test_version_and_console_script() -> None:
    done = subprocess.run([sys.executable, "-m", "node", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "0.1.0" in done.stdout
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dscint-node = "node.__main__:main"' in text


def test_a_roomy_terminal_gets_whole_uids_and_the_last_error(config_file: Path) -> None:
    out = run_status(config_file, columns=160)
    assert max(len(line) for line in out.splitlines()) <= 160
    header = out.splitlines()[0]
    assert "last error" in header
    assert any(CLASSIFIED in line and "metastatic" in line for line in out.splitlines())
