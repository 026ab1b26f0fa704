"""The web page at GET / in a real headless browser (Debian's chromium driven by Playwright;
skipped where either is missing): it renders, a classified study appears, values are
escaped, the token guards it, /live stays open."""

from __future__ import annotations

import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.service.node import Node
from node.service.web import render_page
from storage.db import StudyState
from storage.reports import StudySummary
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "s3cret-token"
SCREENSHOT = Path(os.environ.get("DSCINT_DASHBOARD_PNG", "/tmp/dashboard.png"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium from the system (.ci/system-deps.sh installs it); never downloaded."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        pytest.skip("chromium not installed (.ci/system-deps.sh installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dashboard_shows_a_classified_study(tmp_path: Path, untrained_model: Path,
                                            pacs: PacsStandIn, browser: Any) -> None:
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      health={"port": port, "token": TOKEN, "page_refresh_seconds": 2})
    paths = write_study(generate_study("bone_metastasis", seed=21), tmp_path / "out",
                        DicomLayout.MULTIFRAME)
    base = f"http://127.0.0.1:{port}"
    with Node(cfg) as n:
        page = browser.new_page()
        failed: list[str] = []  # any request leaving the node (external assets) fails it
        page.on("request", lambda r: None if r.url.startswith(base) else failed.append(r.url))
        page.goto(f"{base}/?token={TOKEN}")
        assert page.title().startswith("dscint-node")
        assert page.inner_text("#health") in ("ok", "degraded")
        assert "no studies yet" in page.inner_text("#studies")
        assert send_paths(paths, dest(n), CALLER) == [0]
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        row = wait_study(n.db, uid, "exported", export_state="done")
        # the page reloads itself (meta refresh): the study appears without our help
        row_shown = page.locator(f'tr[data-study="{uid}"]')
        expect = pytest.importorskip("playwright.sync_api").expect
        expect(row_shown).to_contain_text("done", timeout=15000)  # retried across reloads
        text = row_shown.inner_text()
        assert "classified" in text and str(row.predicted_class) in text and "done" in text
        assert re.search(r"\bnormal [01]\.\d\d\b", text)  # the probabilities
        assert n.classifier.metadata.version in page.inner_text("#model")
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert failed == []
        # no patient data on the page
        ds = dcmread(paths[0], stop_before_pixels=True)
        html = page.content()
        assert str(ds.PatientID) not in html
        assert str(ds.PatientName).split("^")[0] not in html
        # the token: required by /, by query or Bearer header; /live and /health stay open
        assert get(f"{base}/")[0] == 401
        assert get(f"{base}/?token=wrong")[0] == 401
        code, body = get(f"{base}/", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and uid in body
        assert get(f"{base}/live")[0] == 200
        assert get(f"{base}/health")[0] in (200, 503)


def test_every_value_is_escaped() -> None:
    evil = "<script>alert(1)</script>"
    now = datetime.now(UTC)
    row = StudySummary(study_uid="1.2.3", state=StudyState.FAILED, instance_count=1,
                       late_instance_count=0, views="anterior", completion_reason=None,
                       predicted_class=evil, model_version=evil, export_state=None,
                       export_attempts=None, next_attempt_at=None, last_error=evil,
                       last_instance_at=now, acked_at=None, first_seen_at=now,
                       completed_at=None)
    report = {"status": "degraded", "problems": [evil], "ae_title": evil, "queue": {evil: 1},
              "model": {"name": evil, "version": evil, "sha256": evil}}
    html = render_page(report, [row], 10, now)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_dashboard_failure_is_a_500_page(tmp_path: Path, untrained_model: Path,
                                         pacs: PacsStandIn) -> None:
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port, health={"port": port})
    with Node(cfg) as n:
        n.db.dispose()
        (tmp_path / "node" / "dscint.db").unlink()  # the database is gone under the node
        (tmp_path / "node" / "dscint.db").mkdir()  # and cannot be opened again
        code, body = get(f"http://127.0.0.1:{port}/")
        assert code == 500 and "dashboard failed" in body
        (tmp_path / "node" / "dscint.db").rmdir()
