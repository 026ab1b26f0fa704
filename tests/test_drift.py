"""Drift: a shifted input set (another manufacturer and matrix, or another class mix) raises
the alarm in `status --drift` and makes a running node's /health degraded with the reason;
an unshifted set does not. The worker profiles what it classifies (real decode, real node)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from model.phantom_dicom import MANUFACTURER, DicomLayout, write_study
from model.phantoms import generate_study
from node.__main__ import main
from node.classify.inputs import InputProfile
from node.config import DriftSection
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.dicom.views import extract_views
from node.service.drift import DRIFT, NO_DRIFT, NO_VERDICT, compute_drift, total_variation
from node.service.node import Node
from storage.db import Database, StudyProfile
from storage.drift import StudyInputs, counts_band
from storage.intake import InstanceRecord, record_instance
from storage.jobs import NewResult, store_result
from tests.support.dicom import ANT_CODE, POST_CODE, nm_dataset
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study
from tests.support.wait import wait_for

CLASSES = ("normal", "bone_metastasis", "arthritis", "thyroid_carcinoma")
BASE = StudyInputs(manufacturer=MANUFACTURER, matrix="1024x256", pixel_spacing="2.40x2.40",
                   views=2, counts_anterior=8.0e5, counts_posterior=9.0e5)
OTHER = StudyInputs(manufacturer="OTHER CAMERA CO", matrix="512x128",
                    pixel_spacing="4.80x4.80", views=2, counts_anterior=2.0e5,
                    counts_posterior=2.5e5)
CFG = DriftSection(window_days=7.0, baseline_windows=3, threshold=0.25, min_studies=12,
                   check_seconds=900.0)
PER_WINDOW = 12


def seed(db: Database, n: int, start: datetime, inputs: StudyInputs,
         classes: tuple[str, ...] = CLASSES, tag: str = "1") -> None:
    """n classified studies through the real storage path, a quarter of an hour apart from
    `start`, each with its result and its profile; findings cycle through `classes`."""
    for i in range(n):
        when = start + timedelta(minutes=15 * i)
        uid = f"2.25.{tag}{int(start.timestamp())}{i:04d}"
        record_instance(db, InstanceRecord(
            sop_uid=f"{uid}.1", study_uid=uid, series_uid=f"{uid}.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"/nowhere/{uid}.dcm", views=("anterior", "posterior"), n_frames=2,
            size_bytes=1000, calling_ae="CAMERA", patient_key=None), now=when)
        store_result(db, NewResult(
            study_uid=uid, job_id=None, model_version="v1", model_sha256="ab" * 32,
            predicted_class=classes[i % len(classes)], probabilities={"normal": 1.0},
            per_view={}, sr_sop_uid=f"{uid}.3", sr_series_uid=f"{uid}.4",
            sr_path=f"/nowhere/{uid}.sr", inputs=inputs), "PACS@127.0.0.1:104", now=when)


def seed_weeks(db: Database, now: datetime, current: StudyInputs,
               current_classes: tuple[str, ...] = CLASSES) -> None:
    """Three previous weeks as the baseline, then the current week as given."""
    week = timedelta(days=7)
    for w in range(1, CFG.baseline_windows + 1):
        seed(db, PER_WINDOW, now - (w + 1) * week + timedelta(hours=1), BASE, tag=f"{w}")
    seed(db, PER_WINDOW, now - week + timedelta(hours=1), current, current_classes, tag="9")


def test_total_variation_distance() -> None:
    from collections import Counter
    assert total_variation(Counter(a=5), Counter(a=2)) == 0.0
    assert total_variation(Counter(a=1), Counter(b=7)) == 1.0
    assert total_variation(Counter(a=3, b=1), Counter(a=1, b=1)) == pytest.approx(0.25)
    assert total_variation(Counter(), Counter(a=1)) is None
    assert counts_band(8.0e5) == "3e+05-1e+06" and counts_band(2.0e5) == "1e+05-3e+05"
    assert counts_band(None) == "(none)" and counts_band(0.5) == "<1"


def test_profile_of_a_decoded_study() -> None:
    """What the worker records: header attributes and the sum of each decoded view."""
    ds = nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], rows=64, cols=32, Manufacturer="ACME ")
    ds.PixelSpacing = ["2.4", "2.4"]
    views = extract_views(ds)
    profile = InputProfile()
    profile.add(ds, views)
    got = profile.inputs()
    assert (got.manufacturer, got.matrix, got.pixel_spacing, got.views) == \
        ("ACME", "64x32", "2.40x2.40", 2)
    assert got.counts_anterior == pytest.approx(float(np.sum(views[0].pixels)))
    assert got.counts_posterior == pytest.approx(float(np.sum(views[1].pixels)))
    empty = InputProfile().inputs()
    assert empty.counts_anterior is None and empty.manufacturer == ""


@pytest.mark.parametrize("shift", ["camera", "classes", "none"])
def test_shifted_input_raises_the_alarm_unshifted_does_not(db: Database, shift: str) -> None:
    now = datetime.now(UTC)
    current = OTHER if shift == "camera" else BASE
    classes = ("bone_metastasis",) if shift == "classes" else CLASSES
    seed_weeks(db, now, current, classes)
    report = compute_drift(db, CFG, "test reference", now)
    assert report.current.studies == PER_WINDOW
    assert report.baseline_studies == PER_WINDOW * CFG.baseline_windows
    drifted = {c.characteristic for c in report.drifted()}
    if shift == "camera":
        assert report.verdict == DRIFT
        assert drifted == {"manufacturer", "matrix", "pixel spacing",
                           "counts per anterior view", "counts per posterior view"}
        assert "OTHER CAMERA CO 100%" in report.reason
    elif shift == "classes":
        assert report.verdict == DRIFT and drifted == {"predicted class"}
        assert "bone_metastasis 100%" in report.reason
    else:
        assert report.verdict == NO_DRIFT and not drifted
        assert all(c.distance == 0.0 for c in report.comparisons if c.distance is not None)


def test_a_characteristic_that_varies_every_week_is_not_drift(db: Database) -> None:
    """Two cameras taking turns week by week: this week's camera B is far from the pooled
    baseline (0.67) but no further than week 2 was from weeks 1 and 3 (1.00): usual."""
    now, week = datetime.now(UTC), timedelta(days=7)
    for w, inputs in ((1, BASE), (2, OTHER), (3, BASE)):
        seed(db, PER_WINDOW, now - (w + 1) * week + timedelta(hours=1), inputs, tag=f"{w}")
    seed(db, PER_WINDOW, now - week + timedelta(hours=1), OTHER, tag="9")
    report = compute_drift(db, CFG, "test reference", now)
    maker = next(c for c in report.comparisons if c.characteristic == "manufacturer")
    assert maker.distance == pytest.approx(2 / 3) and maker.usual == 1.0
    assert not maker.drifted and report.verdict == NO_DRIFT
    assert "or its usual variation" in report.reason


def test_too_few_studies_is_no_verdict(db: Database) -> None:
    now = datetime.now(UTC)
    seed(db, CFG.min_studies - 1, now - timedelta(days=2), OTHER)
    report = compute_drift(db, CFG, "test reference", now)
    assert report.verdict == NO_VERDICT and "11 study(ies) in the current window" in \
        report.reason
    seed(db, 1, now - timedelta(hours=1), OTHER, tag="5")
    report = compute_drift(db, CFG, "test reference", now)
    assert report.verdict == NO_VERDICT and "0 study(ies) in the previous windows" in \
        report.reason


def test_a_reclassified_study_replaces_its_profile(db: Database) -> None:
    now = datetime.now(UTC)
    seed(db, 1, now - timedelta(days=1), BASE)
    seed(db, 1, now - timedelta(hours=1), OTHER)  # same study UID pattern: same tag, i
    with db.read_session() as s:
        rows = s.query(StudyProfile).all()
    assert len(rows) == 2  # two studies (the start time is part of the UID)
    uid = rows[0].study_uid
    store_result(db, NewResult(
        study_uid=uid, job_id=None, model_version="v2", model_sha256="cd" * 32,
        predicted_class="indeterminate", probabilities={}, per_view={}, sr_sop_uid=f"{uid}.9",
        sr_series_uid=f"{uid}.8", sr_path="/nowhere", inputs=OTHER), "PACS@h:1", now=now)
    with db.read_session() as s:
        row = s.get(StudyProfile, uid)
        assert row is not None and row.model_version == "v2"
        assert row.predicted_class == "indeterminate" and row.manufacturer == OTHER.manufacturer
        assert s.query(StudyProfile).count() == 2


def _config_file(tmp_path: Path, database_url: str, **drift: Any) -> Path:
    path = tmp_path / "config.toml"
    lines = "\n".join(f"{k} = {v}" for k, v in {
        "window_days": 7.0, "baseline_windows": CFG.baseline_windows,
        "min_studies": CFG.min_studies, **drift}.items())
    path.write_text(f'[storage]\nroot = "{tmp_path / "node"}"\ndatabase = "{database_url}"\n'
                    f"[drift]\n{lines}\n")
    return path


@pytest.mark.parametrize("shift", [True, False])
def test_status_drift_shows_the_comparison(db: Database, database_url: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, shift: bool
                                           ) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per row: the assertions read lines
    seed_weeks(db, datetime.now(UTC), OTHER if shift else BASE)
    cfg_file = _config_file(tmp_path, database_url)
    capsys.readouterr()
    rc = main(["status", "--drift", "--config", str(cfg_file)])
    out = capsys.readouterr().out
    assert "reference: the served model: its metadata records no distribution" in out
    assert f"{PER_WINDOW} studies; previous windows: 3, {3 * PER_WINDOW} studies" in out
    if shift:
        assert rc == 1 and out.startswith("drift: DRIFT")
        row = next(line for line in out.splitlines() if line.startswith("manufacturer"))
        assert "1.00" in row and "DRIFT" in row and "OTHER CAMERA CO 100%" in row
    else:
        assert rc == 0 and out.startswith("drift: no drift")
    assert main(["status", "--drift", "--json", "--config", str(cfg_file)]) == rc
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == (DRIFT if shift else NO_DRIFT)
    assert doc["characteristics"]["matrix"]["drifted"] is shift
    # plain `status`: its health line says what GET /health would
    assert main(["status", "--config", str(cfg_file)]) == 0
    health = capsys.readouterr().out.split("health: ")[1]
    assert health.startswith("degraded" if shift else "ok")
    assert ("input drift over the last 7 d" in health) is shift


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("shift", [True, False])
def test_running_node_health_degrades_on_drift(tmp_path: Path, untrained_model: Path,
                                               pacs: PacsStandIn, shift: bool) -> None:
    """The node computes drift at start (then every check_seconds): /health reads it. A
    study it classifies is profiled from its real headers and pixels."""
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port, health={"port": port},
                      drift={"baseline_windows": CFG.baseline_windows,
                             "min_studies": CFG.min_studies})
    seeded = Database(cfg.database_url)
    seeded.create_all()
    seed_weeks(seeded, datetime.now(UTC), OTHER if shift else BASE)
    seeded.dispose()
    with Node(cfg) as n:
        assert n.drift is not None
        wait_for(lambda: n.drift is not None and n.drift.latest() is not None, 30,
                 "the first drift check")
        code, report = _health(port)
        drift_lines = [p for p in report["problems"] if p.startswith("input drift")]
        assert report["drift"]["verdict"] == (DRIFT if shift else NO_DRIFT)
        if shift:
            assert code == 503 and report["status"] == "degraded" and len(drift_lines) == 1
            assert "manufacturer 1.00 (OTHER CAMERA CO 100%; was DSCINT PHANTOM 100%)" in \
                drift_lines[0]
            assert "status --drift" in drift_lines[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert "dscint_drift 1" in r.read().decode()
        else:
            assert not drift_lines
        if not shift:
            return
        paths = write_study(generate_study("normal", seed=5), tmp_path / "s",
                            DicomLayout.MULTIFRAME)
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        assert send_paths(paths, dest(n), CALLER) == [0]
        wait_study(n.db, uid, "classified", state="classified")
        with n.db.read_session() as s:
            row = s.get(StudyProfile, uid)
            assert row is not None
            assert (row.manufacturer, row.matrix, row.views) == (MANUFACTURER, "1024x256", 2)
            assert row.pixel_spacing.startswith("2.") and row.counts_anterior and \
                row.counts_posterior and row.counts_anterior > 1000
            assert row.model_version == "test-0"


@pytest.mark.parametrize(("key", "value"), [("window_days", 0.0), ("baseline_windows", 0),
                                            ("baseline_windows", 53), ("threshold", 0.0),
                                            ("threshold", 1.5), ("min_studies", 0),
                                            ("check_seconds", -1.0)])
def test_invalid_drift_config_names_the_key(key: str, value: float) -> None:
    from node.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match=rf"\[drift\]\.{key}"):
        config_from_dict({"drift": {key: value}})
