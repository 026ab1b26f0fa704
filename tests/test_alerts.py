"""Webhook alerts against a real HTTP server on 127.0.0.1: dead letter, failed study, degraded
health and a configured finding; retried with backoff, given up when the hook stays down; no
patient data in the payload."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.config import AlertsSection
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.service.alerts import Alerter, post_json
from node.service.node import Node
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study
from tests.support.wait import wait_for


class Hook(ThreadingHTTPServer):
    """A webhook receiver: answers each POST with the next code of `codes` (then 200) and
    keeps the JSON bodies it accepted (2xx)."""

    daemon_threads = True

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.accepted: list[dict[str, Any]] = []
        self.attempts = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _HookHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def events(self) -> list[str]:
        with self.lock:
            return [a["event"] for a in self.accepted]


class _HookHandler(BaseHTTPRequestHandler):
    server: Hook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.attempts += 1
            code = self.server.codes.pop(0) if self.server.codes else 200
            if 200 <= code < 300:
                assert self.headers["Content-Type"] == "application/json"
                self.server.accepted.append(json.loads(body))
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    t = threading.Thread(target=h.serve_forever, daemon=True)
    t.start()
    yield h
    h.shutdown()
    h.server_close()


def alerter(url: str, **kw: Any) -> Alerter:
    section = AlertsSection(urls=(url,), events=("dead_letter", "failed_study", "degraded",
                                                 "finding"), findings=("bone_metastasis",),
                            timeout_seconds=2.0, max_attempts=3, backoff_seconds=0.05)
    for k, v in kw.items():
        section = AlertsSection(**{**section.__dict__, k: v})
    return Alerter(section, "DSCINT").start()


def test_retried_with_backoff_until_accepted(hook: Hook) -> None:
    hook.codes = [500, 503]
    a = alerter(hook.url)
    try:
        assert a.raise_alert("failed_study", "study 1.2.3 failed", study_uid="1.2.3")
        wait_for(lambda: hook.events() == ["failed_study"], 10, "the alert after two 5xx")
        assert hook.attempts == 3 and a.sent == 1
        assert hook.accepted[0]["node"] == "DSCINT" and hook.accepted[0]["details"] == {
            "study_uid": "1.2.3"}
    finally:
        a.stop()


def test_given_up_when_the_hook_stays_down(hook: Hook, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    hook.codes = [500] * 10
    dead_url = f"http://127.0.0.1:{free_port()}/nobody"
    a = alerter(hook.url)
    try:
        a.failed_study("1.2.3", "reason")
        wait_for(lambda: a.given_up == 1, 10, "the alert given up")
        assert hook.attempts == 3 and hook.accepted == []
        assert "given up after 3 attempt(s): HTTP 500" in caplog.text
    finally:
        a.stop()
    assert post_json(dead_url, {"event": "x"}, 2.0) is not None  # refused: said in words


def test_events_findings_and_degraded_once(hook: Hook) -> None:
    a = alerter(hook.url, events=("degraded", "finding"))
    try:
        assert not a.raise_alert("dead_letter", "not configured")
        a.classified("1.2.3", "normal", {"normal": 0.9})  # not a configured finding
        a.classified("1.2.4", "bone_metastasis", {"bone_metastasis": 0.8})
        a.health({"status": "degraded", "problems": ["no model loaded"]})
        a.health({"status": "degraded", "problems": ["no model loaded"]})  # still: no repeat
        a.health({"status": "ok", "problems": []})  # a moment ok: the same incident
        a.health({"status": "degraded", "problems": ["no model loaded"]})
        for _ in range(3):  # ok for three checks in a row: over
            a.health({"status": "ok", "problems": []})
        a.health({"status": "degraded", "problems": ["disk low"]})  # degraded again: alert
        wait_for(lambda: len(hook.accepted) == 3, 10, "three alerts")
        assert hook.events() == ["finding", "degraded", "degraded"]
        assert hook.accepted[0]["details"]["study_uid"] == "1.2.4"
        assert hook.accepted[2]["details"]["problems"] == ["disk low"]
    finally:
        a.stop()


def test_no_url_means_off() -> None:
    a = Alerter(AlertsSection(), "DSCINT").start()
    assert not a.enabled and not a.raise_alert("dead_letter", "x")
    a.stop()


def test_full_queue_drops_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # never started: nothing drains the queue
    a = Alerter(AlertsSection(urls=("http://127.0.0.1:9/",)), "DSCINT")
    queued = [a.raise_alert("failed_study", "x") for _ in range(300)]
    assert queued.count(True) == 256 and not queued[-1]
    assert "alert queue full" in caplog.text
    a.stop()


def test_dead_letter_and_degraded_from_a_running_node(tmp_path: Path, untrained_model: Path,
                                                      hook: Hook) -> None:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs_port = pacs.start()
    pacs.stop()  # PACS down: the SR is retried, then dead-lettered
    cfg = node_config(tmp_path / "node", untrained_model, pacs_port,
                      export={"max_attempts": 2, "backoff_base_seconds": 0.1,
                              "backoff_cap_seconds": 0.2},
                      alerts={"urls": [hook.url], "health_check_seconds": 0.2,
                              "backoff_seconds": 0.05},
                      results={"image": False, "pdf": False})  # the SR alone: one dead letter
    paths = write_study(generate_study("normal", seed=31), tmp_path / "out",
                        DicomLayout.MULTIFRAME)
    ds = dcmread(paths[0], stop_before_pixels=True)
    with Node(cfg) as n:
        assert send_paths(paths, dest(n), CALLER) == [0]
        uid = str(ds.StudyInstanceUID)
        wait_study(n.db, uid, "dead-lettered", export_state="dead", timeout=60)
        wait_for(lambda: {"dead_letter", "degraded"} <= set(hook.events()), 30,
                 "dead_letter and degraded alerts")
        metrics = n.metrics.text()
    dead = next(a for a in hook.accepted if a["event"] == "dead_letter")
    assert dead["details"]["study_uid"] == uid and dead["details"]["attempts"] == 2
    degraded = next(a for a in hook.accepted if a["event"] == "degraded")
    # it turned degraded once: exports being retried (then dead-lettered: no second alert)
    assert any("SR export(s)" in p for p in degraded["details"]["problems"])
    assert hook.events().count("degraded") == 1
    bodies = json.dumps(hook.accepted)
    assert str(ds.PatientID) not in bodies  # no patient data
    assert str(ds.PatientName).split("^")[0] not in bodies
    assert 'dscint_objects_total{outcome="dead"} 1.0' in metrics
    assert 'dscint_retries_total{stage="export"} 1.0' in metrics


def test_failed_study_and_finding_from_a_running_node(tmp_path: Path, untrained_model: Path,
                                                      pacs: PacsStandIn, hook: Hook) -> None:
    """A stored file turned to garbage fails its study at once: a failed_study alert with the
    redacted reason; every class is a finding here, so a good study raises one."""
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      completion={"quiet_seconds": 600.0},
                      alerts={"urls": [hook.url], "events": ["failed_study", "finding"],
                              "findings": ["normal", "arthritis", "bone_metastasis",
                                           "thyroid_carcinoma", "indeterminate"]})
    ant, post = write_study(generate_study("normal", seed=42), tmp_path / "s",
                            DicomLayout.PER_VIEW)
    good = write_study(generate_study("arthritis", seed=43), tmp_path / "g",
                       DicomLayout.MULTIFRAME)
    uid = str(dcmread(ant, stop_before_pixels=True).StudyInstanceUID)
    with Node(cfg) as n:
        assert send_paths([ant], dest(n), CALLER) == [0]
        stored = next((n.files.studies / uid).rglob("*.dcm"))
        stored.write_bytes(b"garbage, not DICOM " * 20)
        assert send_paths([post], dest(n), CALLER) == [0]
        wait_study(n.db, uid, "failed", state="failed")
        assert send_paths(good, dest(n), CALLER) == [0]
        wait_for(lambda: len(hook.events()) >= 2, 30, "two alerts")
        assert sorted(hook.events()) == ["failed_study", "finding"]
        metrics = n.metrics.text()
    failed = next(a for a in hook.accepted if a["event"] == "failed_study")
    assert failed["details"]["study_uid"] == uid
    assert failed["details"]["reason"].startswith("InvalidDicomError")
    finding = next(a for a in hook.accepted if a["event"] == "finding")
    assert set(finding["details"]["probabilities"]) >= {"normal", "arthritis"}
    assert 'dscint_studies_total{outcome="failed",predicted_class=""} 1.0' in metrics


def test_stop_reports_alerts_left_unposted(caplog: pytest.LogCaptureFixture) -> None:
    a = Alerter(AlertsSection(urls=("http://127.0.0.1:9/",)), "DSCINT")  # never started
    a.raise_alert("failed_study", "x")
    a.raise_alert("failed_study", "y")
    a.stop()
    assert "2 alert(s) not posted" in caplog.text
