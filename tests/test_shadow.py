"""Shadow trials on real parts: a node in the test's process with tiny TorchScript models,
studies sent over real associations, SRs to the PACS stand-in, a real SQLite file. A study
classified while a candidate runs in shadow gets one SR (the serving model's) and a stored
shadow result; `models` shows the comparison; /metrics has the shadow series; `models shadow
--stop` ends it; promotion waits for a trial when configured; the backlog is bounded."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from model.classifier import Classifier
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.__main__ import main
from node.classify.shadow import ShadowContext, ShadowRunner, shadow_study
from node.config import load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.service.models import read_metadata
from node.service.node import Node
from node.service.web import render_page
from storage.db import Database, Result, ShadowResult, Study
from storage.feedback import record_feedback
from storage.registry import NewModel, file_sha256, get_model, register_model
from storage.shadow import (
    NewShadowResult,
    ServingResult,
    ShadowSummary,
    active_shadow,
    serving_result,
    shadow_summary,
    shadow_versions,
    start_shadow,
    stop_shadow,
    store_shadow_result,
)
from tests.support.net import free_port
from tests.support.nodeproc import write_config
from tests.support.nodes import CALLER, dest, wait_sr
from tests.support.tiny_models import export_tiny
from tests.support.wait import wait_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _config(tmp_path: Path, model_file: Path, pacs_port: int, **extra: dict[str, object]
            ) -> Path:
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0, "receiver_process": False},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(tmp_path / "node")}, "model": {"path": str(model_file)},
        "completion": {"quiet_seconds": 1.0, "sweep_seconds": 0.2},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 1.0, "max_attempts": 3},
        "results": {"image": False, "pdf": False},  # the SR only: what a shadow must not add to
    }
    for name, values in extra.items():
        sections[name] = {**sections.get(name, {}), **values}
    return write_config(tmp_path / "config.toml", sections)


def _register(db: Database, root: Path, src: Path, version: str) -> None:
    meta = read_metadata(src)
    register_model(db, root, src, NewModel(version=version, weights_sha256=meta.weights_sha256,
                                           data_description="tiny", metrics={}))


def _send(node: Node, tmp_path: Path, seed: int) -> str:
    paths = write_study(generate_study("normal", seed=seed), tmp_path / f"s{seed}",
                        DicomLayout.MULTIFRAME)
    assert send_paths(paths, dest(node), CALLER) == [0]
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
        return rsp.read().decode()


def _health(port: int) -> dict[str, object]:
    """/health's JSON, whatever its status (503 when degraded)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as rsp:
            return dict(json.loads(rsp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def _summary_with_studies(db: Database, version: str) -> ShadowSummary | None:
    s = shadow_summary(db, version)
    return s if s.studies or s.failed else None


def _metrics_with(port: int, line: str) -> str | None:
    text = _metrics(port)
    return text if line in text else None


def _value(text: str, pattern: str) -> float:
    m = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m is not None, f"{pattern} not in /metrics"
    return float(m.group(1))


def test_shadow_result_is_stored_never_sent_shown_and_exported(
        tmp_path: Path, pacs: PacsStandIn, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the `models` table at a terminal's width
    serving = export_tiny(tmp_path / "in" / "serving.pt", seed=1, version="serving-1")
    health_port = free_port()
    cfg_file = _config(tmp_path, serving, pacs.port, health={"port": health_port})
    cfg = load_config(cfg_file)
    db = Database(cfg.database_url)
    db.create_all()
    _register(db, cfg.storage_root, export_tiny(tmp_path / "in" / "cand.pt", seed=2,
                                                version="cand-1"), "cand-1")
    assert main(["models", "shadow", "cand-1", "--config", str(cfg_file)]) == 0
    assert active_shadow(db) == "cand-1"
    with Node(cfg, model_check_seconds=0.2) as node:
        assert node.models is not None and node.models.shadow() is not None
        assert _health(health_port)["shadow_trial"] == "cand-1"  # the monitor sees the trial
        assert "shadow trial: version cand-1" in render_page(_health(health_port), [], 10)
        uid = _send(node, tmp_path, 1)
        sr = wait_sr(pacs, uid)
        summary = wait_for(lambda: _summary_with_studies(db, "cand-1"), 60,
                           "the shadow result of the study")
        assert summary.failed == 0 and summary.median_ms is not None
        # the SR is the serving model's and names its verified file hash
        raw = pacs.by_study()[uid][0].raw
        assert f"file_sha256={file_sha256(serving)}".encode() in raw
        assert b"cand-1" not in raw and str(sr.StudyInstanceUID) == uid

        node.refresh_shadow_metrics()  # the scheduler does it every 30 s
        text = wait_for(lambda: _metrics_with(health_port, "dscint_shadow_seconds_count 1.0"),
                        30, "the shadow run counted in /metrics")  # counted after it is stored
        agree = sum(_value(text, rf'dscint_shadow_studies_total\{{outcome="{o}",'
                                 r'version="cand-1"\}') for o in ("agree", "disagree")
                    if f'outcome="{o}"' in text)
        assert agree == 1.0
        assert _value(text, r'dscint_shadow_trial_studies\{version="cand-1"\}') == 1.0
        assert _value(text, r'dscint_shadow_agreement\{version="cand-1"\}') in (0.0, 1.0)
        assert _value(text, r"dscint_shadow_seconds_count") == 1.0

        served = serving_result(db, uid)  # the physician agrees with the serving model
        assert served is not None and served.version == "serving-1"
        record_feedback(db, uid, served.predicted_class)
        node.refresh_shadow_metrics()
        text = _metrics(health_port)
        assert _value(text, r'dscint_shadow_accuracy\{model="serving",version="cand-1"\}') \
            == 1.0
        assert _value(text, r'dscint_shadow_accuracy\{model="shadow",version="cand-1"\}') \
            == _value(text, r'dscint_shadow_agreement\{version="cand-1"\}')

        capsys.readouterr()
        assert main(["models", "--config", str(cfg_file)]) == 0
        out = capsys.readouterr().out
        assert "candidate + shadow" in out and "shadow cand-1 (running)" in out
        assert "agreement" in out and "against feedback (1 labelled)" in out

        assert main(["models", "shadow", "--stop", "--config", str(cfg_file)]) == 0
        wait_for(lambda: node.models is not None and node.models.shadow() is None, 30,
                 "the node to drop the shadow model")
        assert _health(health_port)["shadow_trial"] is None
        uid2 = _send(node, tmp_path, 2)
        wait_sr(pacs, uid2)
        assert node.shadow is not None
        wait_for(node.shadow.idle, 30, "the shadow backlog to drain")
    assert shadow_summary(db, "cand-1").studies == 1  # nothing shadowed after the stop
    assert active_shadow(db) is None
    # one SR per study, none from the shadow model
    received = pacs.by_study(None)
    assert len(pacs.by_study()[uid]) == 1 and len(pacs.by_study()[uid2]) == 1
    assert not any(b"cand-1" in r.raw for objs in received.values() for r in objs)
    capsys.readouterr()
    assert main(["models", "--config", str(cfg_file)]) == 0
    assert "shadow cand-1 (stopped)" in capsys.readouterr().out
    db.dispose()


def _study(db: Database, uid: str, serving_class: str = "normal") -> None:
    """A study row and the serving model's result, as the worker leaves them."""
    with db.session() as s, s.begin():
        s.add(Study(study_uid=uid, first_seen_at=T0, last_instance_at=T0))
        s.flush()
        s.add(Result(study_uid=uid, model_version="serving-1", model_sha256="0" * 64,
                     predicted_class=serving_class, probabilities="{}", per_view="{}",
                     sr_sop_uid=f"{uid}.9", sr_series_uid=f"{uid}.8", sr_path="-",
                     created_at=T0))


def test_promotion_waits_for_enough_agreeing_shadow_studies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serving = export_tiny(tmp_path / "in" / "serving.pt", seed=1)
    cfg_file = _config(tmp_path, serving, 104, model={"promote_min_shadow_studies": 3,
                                                      "promote_min_agreement": 0.75})
    cfg = load_config(cfg_file)
    db = Database(cfg.database_url)
    db.create_all()
    _register(db, cfg.storage_root, export_tiny(tmp_path / "in" / "c.pt", seed=2), "cand")
    capsys.readouterr()
    assert main(["models", "promote", "cand", "--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert "0 shadow studies" in err and "promote_min_shadow_studies is 3" in err

    for i, said in enumerate(("normal", "normal", "arthritis")):
        _study(db, f"1.2.3.{i}")
        assert store_shadow_result(db, NewShadowResult(
            f"1.2.3.{i}", "cand", ServingResult("serving-1", "normal"), said,
            {said: 0.9}, latency_ms=100 + i))
    assert not store_shadow_result(db, NewShadowResult(  # once per study and version
        "1.2.3.0", "cand", ServingResult("serving-1", "normal"), "normal", {}, 1))
    assert main(["models", "promote", "cand", "--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert "66.7% of 3 shadow studies" in err and "promote_min_agreement is 75%" in err

    assert main(["models", "promote", "cand", "--force", "--config", str(cfg_file)]) == 0
    assert "forced past the shadow requirements" in capsys.readouterr().out
    rec = get_model(db, "cand")
    assert rec.state == "serving" and rec.note and "--force" in rec.note
    s = shadow_summary(db, "cand", {"1.2.3.2": "arthritis", "1.2.3.1": "normal"})
    assert (s.studies, s.agreed, s.with_feedback) == (3, 2, 2)
    assert s.confusion == {("normal", "normal"): 2, ("normal", "arthritis"): 1}
    assert s.shadow_accuracy == 1.0 and s.serving_accuracy == 0.5
    assert main(["models", "shadow", "cand", "--config", str(cfg_file)]) == 1  # serving now
    assert "is serving" in capsys.readouterr().err
    db.dispose()


def test_backlog_is_bounded_and_failures_are_stored(tmp_path: Path) -> None:
    """A shadow model slower than the studies: beyond the backlog a study is skipped and
    counted, never queued; a study it cannot classify is stored as failed, not lost."""
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    db.create_all()
    clf = Classifier(export_tiny(tmp_path / "c.pt", seed=2, version="cand"))
    release = threading.Event()
    skipped: list[int] = []

    def model() -> tuple[str, Classifier] | None:
        if threading.current_thread().name == "shadow":
            release.wait(30)  # the shadow model is busy until the test lets it go
        return "cand", clf

    for i in range(4):
        _study(db, f"1.2.4.{i}")  # a result, but no instances: the shadow run fails
    runner = ShadowRunner(ShadowContext(db, model, on_skipped=lambda: skipped.append(1)),
                          backlog=1).start()
    accepted = [runner.submit(f"1.2.4.{i}") for i in range(4)]
    assert accepted[0] and accepted.count(False) >= 2
    assert runner.skipped == len(skipped) == accepted.count(False)
    release.set()
    wait_for(lambda: shadow_summary(db, "cand").failed == accepted.count(True), 30,
             "the accepted studies to be shadowed")
    runner.stop()
    assert not runner.submit("1.2.4.0")  # stopped: refused, not queued
    s = shadow_summary(db, "cand")
    assert s.studies == 0 and s.failed == accepted.count(True)
    with db.read_session() as session:
        errors = session.execute(select(ShadowResult.error)).scalars().all()
    assert len(errors) == accepted.count(True)
    assert all(e and "at least one view" in e for e in errors)
    assert shadow_study(ShadowContext(db, lambda: None), "1.2.4.0") is None  # no trial
    again = ShadowContext(db, lambda: ("cand", clf))
    assert shadow_study(again, "1.2.4.0") is None  # compared once: the first result stands
    assert shadow_summary(db, "cand").failed == accepted.count(True)
    db.dispose()


def test_trials_and_results_on_both_databases(database_url: str) -> None:
    """One trial runs at a time (starting another stops it; the partial unique index holds
    it so); a study is compared once per version; the summary counts what was stored."""
    db = Database(database_url)
    db.create_all()
    assert active_shadow(db) is None and stop_shadow(db) is None
    assert start_shadow(db, "a", now=T0) is None
    assert start_shadow(db, "a", now=T0) == "a"  # already running: unchanged
    assert start_shadow(db, "b", now=T0) == "a" and active_shadow(db) == "b"
    for i, said in enumerate(("normal", None, "arthritis")):
        _study(db, f"1.2.5.{i}")
        served = serving_result(db, f"1.2.5.{i}")
        assert served == ServingResult("serving-1", "normal")
        assert store_shadow_result(db, NewShadowResult(
            f"1.2.5.{i}", "b", served, said, {}, latency_ms=10 * (i + 1),
            error=None if said else "x" * 1000))
    assert not store_shadow_result(db, NewShadowResult(
        "1.2.5.0", "b", ServingResult("serving-1", "normal"), "normal", {}, 1))
    s = shadow_summary(db, "b", {"1.2.5.1": "normal"})
    assert (s.studies, s.failed, s.agreed, s.with_feedback) == (2, 1, 1, 0)
    assert s.agreement == 0.5 and s.median_ms == 20.0 and s.p95_ms == 30.0
    assert shadow_versions(db) == ["b", "a"]
    assert stop_shadow(db) == "b" and active_shadow(db) is None
    assert serving_result(db, "9.9.9") is None
    db.dispose()


def test_retrain_leaves_a_better_model_a_candidate_until_it_was_shadowed(
        tmp_path: Path) -> None:
    """With a shadow requirement configured, retrain's automatic promotion (a margin any
    candidate meets) keeps the new version a candidate and says why."""
    serving = export_tiny(tmp_path / "in" / "serving.pt", seed=1)
    cfg_file = _config(tmp_path, serving, 104, model={"promote_min_shadow_studies": 1})
    common = ["retrain", "--config", str(cfg_file), "--phantoms", "8", "--epochs", "1",
              "--runs", "1", "--quiet", "--margin", "-1"]
    assert main([*common, "--version", "gated-1"]) == 0
    cfg = load_config(cfg_file)
    db = Database(cfg.database_url)
    assert get_model(db, "gated-1").state == "candidate"
    doc = json.loads((cfg.storage_root / "reports" / "gated-1" / "metrics.json").read_text())
    assert not doc["promotion"]["promote"]
    assert "0 shadow studies" in doc["promotion"]["reason"]
    db.dispose()
