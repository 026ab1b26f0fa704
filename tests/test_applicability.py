"""The applicability gate: only whole-body planar views are classified.

The decision (node.dicom.applicability) on synthetic headers, the phantoms in every layout and
every real GE encoding; what storage records and decides (real SQLite); and end to end through
real associations: a node that stores a spot view, a dynamic or SPECT projections answers
Success, never classifies them (no SR at PACS), shows why in `python -m node status`, counts
them in /health and /metrics, classifies a mixed study on its whole-body views only, and with
`[admission].not_applicable = "refuse"` answers 0xC016 and stores nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer
from rich.console import Console

from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.__main__ import main
from node.config import ConfigError, config_from_dict, load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.dicom.applicability import (
    MAX_LENGTH_MM,
    MIN_LENGTH_MM,
    MIN_ROWS_WITHOUT_SPACING,
    whole_body_planar,
)
from node.dicom.codes import ACCEPTED_SOP_CLASSES, NM_IMAGE_STORAGE, SC_IMAGE_STORAGE
from node.dicom.pixels import accepted_transfer_syntaxes
from node.dicom.status import Status
from node.export.scu import Destination
from node.ops.status import WIDE_WIDTH, health_summary, status_table
from node.receive.handlers import StoreContext, handle_store
from node.service.health import health_report, metrics_text, summary_line
from node.service.node import Node
from storage.db import CompletionReason, Database, Instance, Job, Study, StudyState
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance, study_instances
from storage.reports import study_summaries, work_backlog
from storage.retention import purge_candidates, purgeable_studies
from tests.conftest import REPO
from tests.support.dicom import nm_dataset
from tests.support.net import free_port
from tests.support.nodeproc import NodeProc, write_config
from tests.support.nodes import CALLER, dest, node_config, wait_sr, wait_study
from tests.support.soak import node_sections

GE_SPACING = 2.26  # mm, the real GE scan's Pixel Spacing


# --- the decision, header only ---------------------------------------------------------------


def nm(image_type: str | None = "WHOLE BODY", frames: int = 1, rows: int = 1024,
       cols: int = 256, spacing: float | None = GE_SPACING, sop_class: str = NM_IMAGE_STORAGE,
       fourth: str = "EMISSION") -> Dataset:
    """An NM (or SC, Modality NM) header with the attributes the gate reads."""
    ds = nm_dataset(frames, rows=rows, cols=cols, sop_class=sop_class)
    if image_type is not None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, fourth]
    if spacing is not None:
        ds.PixelSpacing = [f"{spacing:.2f}", f"{spacing:.2f}"]
    return ds


@pytest.mark.parametrize("image_type, frames, rows, cols", [
    ("STATIC", 1, 256, 256),
    ("DYNAMIC", 24, 64, 64),  # a renal dynamic
    ("GATED", 16, 64, 64),
    ("TOMO", 32, 64, 64),  # SPECT projections
    ("RECON TOMO", 64, 64, 64),
    ("GATED TOMO", 32, 64, 64),
    ("RECON GATED TOMO", 64, 64, 64),
])
def test_nm_image_types_other_than_whole_body_are_not_applicable(
        image_type: str, frames: int, rows: int, cols: int) -> None:
    verdict = whole_body_planar(nm(image_type, frames, rows, cols))
    assert not verdict.applicable
    assert f"NM Image Type {image_type} (PS3.3 C.8.4.7)" in verdict.reason


def test_whole_body_image_type_on_a_whole_body_geometry_is_applicable() -> None:
    verdict = whole_body_planar(nm("WHOLE BODY", frames=2))
    assert verdict.applicable
    assert verdict.reason == ("whole-body planar: NM Image Type WHOLE BODY, 2 frame(s), "
                              "1024x256 at 2.26 mm = 2.31 m")


@pytest.mark.parametrize("ds, words", [
    (nm("WHOLE BODY", rows=100, cols=100, spacing=4.42), "100x100 is not elongated"),
    (nm(None, rows=256, cols=256), "256x256 is not elongated"),  # a spot view
    (nm("WHOLE BODY", rows=256, cols=1024), "256x1024 is landscape"),
    (nm("WHOLE BODY", rows=1024, cols=768), "not elongated enough"),
    (nm("WHOLE BODY", frames=3, rows=64, cols=16), "3 frames in one object"),
    (nm(None, frames=24, rows=128, cols=32), "24 frames in one object"),
    (nm("WHOLE BODY", rows=512, cols=128, spacing=1.0), "0.51 m; a whole-body view is 1.2-2.8"),
    (nm("WHOLE BODY", rows=1024, cols=256, spacing=4.0), "4.10 m; a whole-body view"),
    (nm("WHOLE BODY", rows=256, cols=64, spacing=None), "without Pixel Spacing: fewer rows"),
    (nm("WHOLE BODY", fourth="TRANSMISSION"), "value 4 TRANSMISSION"),
], ids=["small 100x100", "spot view 256x256", "landscape", "square-ish", "3 frames",
        "24 frames without Image Type", "too short", "too long", "small without spacing",
        "transmission"])
def test_geometry_frames_and_transmission_refuse(ds: Dataset, words: str) -> None:
    verdict = whole_body_planar(ds)
    assert not verdict.applicable and words in verdict.reason, verdict.reason


def test_length_bounds_are_inclusive_and_state_metres() -> None:
    rows = 1000  # Pixel Spacing is written with 2 decimals: these lengths are exact
    assert whole_body_planar(nm(rows=rows, spacing=MIN_LENGTH_MM / rows)).applicable
    assert whole_body_planar(nm(rows=rows, spacing=MAX_LENGTH_MM / rows)).applicable
    short = whole_body_planar(nm(rows=rows, spacing=MIN_LENGTH_MM / rows - 0.01))
    assert not short.applicable and "1.19 m; a whole-body view is 1.2-2.8 m long" in short.reason
    assert not whole_body_planar(nm(rows=rows, spacing=MAX_LENGTH_MM / rows + 0.01)).applicable
    # another camera's matrix: 512 x 128 at 4.42 mm is 2.26 m
    assert whole_body_planar(nm(rows=512, cols=128, spacing=4.42)).applicable


def test_missing_image_type_is_judged_by_geometry_and_says_so() -> None:
    verdict = whole_body_planar(nm(None))
    assert verdict.applicable
    assert "NM Image Type value 3 missing, judged by geometry" in verdict.reason
    unknown = nm("SOMETHING ELSE")
    assert whole_body_planar(unknown).applicable
    assert "not an NM term" in whole_body_planar(unknown).reason
    assert "SOMETHING" not in whole_body_planar(unknown).reason  # free text never echoed


def test_missing_pixel_spacing_falls_back_to_the_matrix_and_says_so() -> None:
    verdict = whole_body_planar(nm(spacing=None))
    assert verdict.applicable and "no usable Pixel Spacing" in verdict.reason
    assert whole_body_planar(nm(rows=MIN_ROWS_WITHOUT_SPACING, cols=128, spacing=None)
                             ).applicable
    bad = nm()
    bad.PixelSpacing = ["0", "0"]  # present but useless: as good as absent
    assert "no usable Pixel Spacing" in whole_body_planar(bad).reason


def test_secondary_capture_with_modality_nm_is_judged_by_geometry() -> None:
    whole = whole_body_planar(nm(None, sop_class=SC_IMAGE_STORAGE))
    assert whole.applicable and "Secondary Capture, judged by geometry" in whole.reason
    spot = whole_body_planar(nm(None, rows=256, cols=256, sop_class=SC_IMAGE_STORAGE))
    assert not spot.applicable and "256x256" in spot.reason
    # SC has no NM Image Type semantics, but a camera that writes STATIC there is believed
    said = whole_body_planar(nm("STATIC", sop_class=SC_IMAGE_STORAGE))
    assert not said.applicable and "an NM term in a Secondary Capture" in said.reason


@pytest.mark.parametrize("tag, vr, value", [
    (0x00080008, "SQ", b"\x01\x02\x03\x04"),  # Image Type that is not even text
    (0x00280010, "US", b"\x01\x02\x03"),  # Rows of a length US cannot have
])
def test_an_unreadable_header_is_not_applicable_and_never_raises(tag: int, vr: str,
                                                                 value: bytes) -> None:
    ds = nm()
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    verdict = whole_body_planar(ds)
    assert not verdict.applicable
    assert verdict.reason.startswith("header unreadable for the applicability check")


@pytest.mark.parametrize("layout", list(DicomLayout))
def test_phantoms_in_every_layout_are_applicable(layout: DicomLayout) -> None:
    for ds in study_datasets(generate_study("bone_metastasis", seed=5), layout):
        verdict = whole_body_planar(ds)
        assert verdict.applicable, (layout, verdict.reason)


@pytest.mark.parametrize("layout", [layout.value for layout in DicomLayout])
def test_files_of_python_m_node_phantoms_are_applicable(tmp_path: Path, layout: str) -> None:
    assert main(["phantoms", "--out", str(tmp_path), "--per-class", "1",
                 "--layout", layout]) == 0
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) >= 4
    for f in files:
        verdict = whole_body_planar(dcmread(f, stop_before_pixels=True))
        assert verdict.applicable, (f.name, verdict.reason)


def test_every_real_ge_encoding_is_applicable(realdata: Path) -> None:
    files = sorted(realdata.glob("*.dcm")) + [  # pydicom ships three more encodings of it
        Path(str(get_testdata_file(n)))
        for n in ("JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm")]
    assert len(files) == 11
    for f in files:
        verdict = whole_body_planar(dcmread(f, stop_before_pixels=True))
        assert verdict.applicable, (f.name, verdict.reason)
        assert "1024x256 at 2.26 mm = 2.31 m" in verdict.reason


# --- storage: what is recorded and decided -------------------------------------------------


STUDY = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'queue.db'}")
    database.create_all()
    yield database
    database.dispose()


def rec(sop: str, views: tuple[str, ...], applicable: bool, reason: str = "",
        study: str = STUDY) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid="1.2.3", sop_class_uid=NM_IMAGE_STORAGE,
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"/data/{sop}.dcm", views=views,
        n_frames=len(views), size_bytes=10, calling_ae="CAM", patient_key="pk",
        applicable=applicable, applicability_reason=reason or ("wb" if applicable else "spot"))


def study(db: Database, uid: str = STUDY) -> Study:
    with db.read_session() as s:
        row = s.get(Study, uid)
        assert row is not None
        return row


def jobs(db: Database, uid: str = STUDY) -> list[Job]:
    with db.read_session() as s:
        return list(s.query(Job).filter(Job.study_uid == uid))


def test_a_not_applicable_study_is_purged_after_retention_like_a_delivered_one(
        db: Database) -> None:
    """Never classified, nothing to deliver: its files must not be kept for ever."""
    record_instance(db, rec("1.1", ("anterior",), False, "NM Image Type DYNAMIC"))
    mark_complete(db, STUDY, CompletionReason.QUIET)
    now = datetime.now(UTC)
    assert purgeable_studies(db, now - timedelta(days=1), 10) == []  # still recent
    assert purgeable_studies(db, now + timedelta(days=1), 10) == [STUDY]
    assert [sop for sop, _ in purge_candidates(db, STUDY, now + timedelta(days=1)).instances] \
        == ["1.1"]


def test_spot_views_named_ant_and_post_do_not_complete_a_study(db: Database) -> None:
    out = record_instance(db, rec("1.1", ("anterior",), False, "NM Image Type STATIC"))
    assert not out.has_anterior
    out = record_instance(db, rec("1.2", ("posterior",), False, "NM Image Type STATIC"))
    assert not out.has_anterior and not out.has_posterior
    with db.read_session() as s:
        row = s.get(Instance, "1.1")
        assert row is not None and not row.applicable
        assert row.applicability_reason == "NM Image Type STATIC"


def test_a_study_without_whole_body_view_becomes_not_applicable_without_a_job(
        db: Database) -> None:
    record_instance(db, rec("1.1", ("anterior",), False, "NM Image Type DYNAMIC"))
    record_instance(db, rec("1.2", (), False, "NM Image Type STATIC"))
    assert not mark_complete(db, STUDY, CompletionReason.QUIET)  # no job queued
    st = study(db)
    assert st.state == StudyState.NOT_APPLICABLE and st.completion_reason == "quiet"
    assert st.applicability_reason == ("no whole-body planar view among 2 instance(s): "
                                       "NM Image Type DYNAMIC")
    assert jobs(db) == []
    assert not mark_complete(db, STUDY, CompletionReason.QUIET)  # once: it is no longer receiving
    assert study_instances(db, STUDY) == []
    assert len(study_instances(db, STUDY, include_not_applicable=True)) == 2
    summary = study_summaries(db)[0]
    assert summary.state is StudyState.NOT_APPLICABLE
    assert summary.applicability_reason == st.applicability_reason
    assert work_backlog(db).not_applicable_studies == 1


def test_a_mixed_study_is_classified_on_its_whole_body_views_only(db: Database) -> None:
    record_instance(db, rec("1.0", (), False, "NM Image Type DYNAMIC"))
    record_instance(db, rec("1.1", ("anterior",), True))
    out = record_instance(db, rec("1.2", ("posterior",), True))
    assert out.has_anterior and out.has_posterior
    assert mark_complete(db, STUDY, CompletionReason.BOTH_VIEWS)
    st = study(db)
    assert st.state == StudyState.COMPLETE and len(jobs(db)) == 1
    assert st.applicability_reason == ("classified on 2 whole-body instance(s); 1 other "
                                       "instance(s) left out: NM Image Type DYNAMIC")
    assert [i.sop_uid for i in study_instances(db, STUDY)] == ["1.1", "1.2"]
    assert work_backlog(db).not_applicable_studies == 0


def test_a_whole_body_view_reopens_a_not_applicable_study(db: Database) -> None:
    record_instance(db, rec("1.0", (), False))
    assert not mark_complete(db, STUDY, CompletionReason.QUIET)
    assert study(db).state == StudyState.NOT_APPLICABLE
    record_instance(db, rec("1.3", (), False))  # another spot view changes nothing
    assert study(db).state == StudyState.NOT_APPLICABLE
    out = record_instance(db, rec("1.1", ("anterior", "posterior"), True))
    assert out.study_state is StudyState.RECEIVING and not out.late
    st = study(db)
    assert st.state == StudyState.RECEIVING and st.applicability_reason is None
    assert st.completed_at is None and st.completion_reason is None
    assert mark_complete(db, STUDY, CompletionReason.BOTH_VIEWS) and len(jobs(db)) == 1


def test_health_counts_not_applicable_studies_without_degrading(db: Database,
                                                                tmp_path: Path) -> None:
    record_instance(db, rec("1.0", (), False))
    mark_complete(db, STUDY, CompletionReason.QUIET)
    cfg = config_from_dict({"storage": {"root": str(tmp_path), "min_free_mb": 0}})
    report = health_report(db, cfg, model=None, model_expected=False)
    assert report["status"] == "ok" and report["problems"] == []
    assert report["work"]["not_applicable_studies"] == 1
    assert "dscint_not_applicable_studies 1" in metrics_text(report)
    assert "1 study(ies) not applicable" in summary_line(report)


# --- configuration -------------------------------------------------------------------------


def test_admission_section_default_store_shipped_and_validated() -> None:
    shipped = load_config(REPO / "config.toml")
    assert shipped.admission == config_from_dict({}).admission
    assert shipped.admission.not_applicable == "store"
    assert not shipped.admission.refuses_not_applicable
    assert config_from_dict({"admission": {"not_applicable": "refuse"}}
                            ).admission.refuses_not_applicable
    with pytest.raises(ConfigError, match=r"\[admission\]\.not_applicable"):
        config_from_dict({"admission": {"not_applicable": "drop"}})


# --- end to end through real associations ------------------------------------------------


def like(source: Dataset, image_type: str, frames: int, rows: int, cols: int,
         spacing: float) -> Dataset:
    """A non-whole-body NM object of the same patient and study as `source` (a phantom
    view), in a series of its own."""
    ds = copy.deepcopy(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "EMISSION"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.PixelSpacing = [f"{spacing:.2f}", f"{spacing:.2f}"]
    for keyword in ("FrameIncrementPointer", "DetectorVector", "EnergyWindowVector"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.full((frames, rows, cols), 7, "<u2").tobytes()
    return ds


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_views(seed: int) -> list[Dataset]:
    """A whole-body phantom study, one NM object per view (anterior, posterior)."""
    return study_datasets(generate_study("normal", seed=seed), DicomLayout.PER_VIEW)


def spot_views_and_dynamic(seed: int) -> list[Dataset]:
    """Spot views named ANT and POST (their detector's View Code Sequence says so) and a
    renal dynamic: valid NM, no whole-body view."""
    ant, post = phantom_views(seed)
    return [like(ant, "STATIC", 1, 256, 256, GE_SPACING),
            like(post, "STATIC", 1, 256, 256, GE_SPACING),
            like(ant, "DYNAMIC", 24, 64, 64, 6.4)]


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as rsp:
        return rsp.status, rsp.read().decode()


def referenced_sops(sr: Dataset) -> set[str]:
    """The source instances the SR references (not the result image, its "Best illustration
    of finding", DCM 121080)."""
    found: set[str] = set()

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            names = item.get("ConceptNameCodeSequence", [])
            if names and names[0].CodeValue == "121080":
                continue
            for ref in item.get("ReferencedSOPSequence", []):
                found.add(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_node_stores_non_whole_body_study_never_classifies_it_and_shows_why(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> None:
    health_port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      health={"port": health_port}, storage={"min_free_mb": 0})
    spots = spot_views_and_dynamic(seed=21)
    not_applicable = str(spots[0].StudyInstanceUID)
    wb = phantom_views(seed=22)
    mixed = str(wb[0].StudyInstanceUID)
    dynamic = like(wb[0], "DYNAMIC", 24, 64, 64, 6.4)
    with Node(cfg) as n:
        # answered Success, as any stored instance
        assert send_paths(write(spots, tmp_path / "spots"), dest(n), CALLER) == [0, 0, 0]
        row = wait_study(n.db, not_applicable, "found not applicable", state="not_applicable")
        # the spot views named ANT and POST did not complete it: the quiet sweep did
        assert row.completion_reason == "quiet" and row.views == ""
        assert row.applicability_reason is not None
        assert row.applicability_reason.startswith(
            "no whole-body planar view among 3 instance(s): NM Image Type STATIC")
        assert jobs(n.db, not_applicable) == []
        # a mixed study: classified on its whole-body views only
        assert send_paths(write([dynamic, *wb], tmp_path / "mixed"), dest(n), CALLER) == [0] * 3
        sr = wait_sr(pacs, mixed)
        assert referenced_sops(sr) == {str(ds.SOPInstanceUID) for ds in wb}
        done = wait_study(n.db, mixed, "exported", state="classified", export_state="done")
        assert done.applicability_reason == ("classified on 2 whole-body instance(s); 1 other "
                                             "instance(s) left out: NM Image Type DYNAMIC "
                                             "(PS3.3 C.8.4.7): not a whole-body scan")
        # no SR ever reached PACS for the study that was not applicable
        assert set(pacs.by_study()) == {mixed}
        # the operator sees it: status table and health line, /health and /metrics
        console = Console(record=True, width=WIDE_WIDTH)  # as `status --wide` prints it
        console.print(status_table(cfg))
        table = console.export_text()
        assert "not_applicable" in table and "NM Image Type STATIC" in table
        assert "1 study(ies) not applicable" in health_summary(cfg)
        code, body = http_get(f"http://127.0.0.1:{health_port}/health")
        report = json.loads(body)
        assert code == 200 and report["status"] == "ok", report["problems"]
        assert report["work"]["not_applicable_studies"] == 1
        code, metrics = http_get(f"http://127.0.0.1:{health_port}/metrics")
        assert code == 200 and "dscint_not_applicable_studies 1" in metrics


def test_default_receiver_process_stores_spect_projections_and_status_shows_why(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> None:
    port = free_port()
    config = write_config(tmp_path / "config.toml", node_sections(
        tmp_path / "node", untrained_model, port, pacs.port,
        completion={"quiet_seconds": 1.0, "sweep_seconds": 0.2}))
    tomo = like(phantom_views(seed=31)[0], "TOMO", 32, 64, 64, 6.4)
    uid = str(tomo.StudyInstanceUID)
    proc = NodeProc(config, port, tmp_path / "node.log")
    proc.start()
    db = Database(f"sqlite:///{tmp_path / 'node' / 'dscint.db'}")
    try:
        assert send_paths(write([tomo], tmp_path / "tomo"), Destination("DSCINT", "127.0.0.1",
                                                                         port), CALLER) == [0]
        wait_study(db, uid, "found not applicable", state="not_applicable")
        out = subprocess.run([sys.executable, "-m", "node", "status", "--wide", "--config",
                              str(config)], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "COLUMNS": "400"})
        assert out.returncode == 0, out.stderr
        assert "not_applicable" in out.stdout and "NM Image Type TOMO" in out.stdout
        assert "1 study(ies) not applicable" in out.stdout
        assert uid not in pacs.by_study()
    finally:
        db.dispose()
        proc.stop()
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert "not classified: NM Image Type TOMO" in log


@pytest.fixture
def refusing_scp(tmp_path: Path) -> Iterator[tuple[int, StoreContext]]:
    """The node's C-STORE handler with `refuse_not_applicable`, behind a real SCP that
    accepts what the node accepts."""
    db = Database(f"sqlite:///{tmp_path / 'dscint.db'}")
    db.create_all()
    ctx = StoreContext(files=FileStore(tmp_path / "store"), db=db, patient_secret=b"test",
                       on_complete=lambda _uid: None, refuse_not_applicable=True)
    ae = AE(ae_title="DSCINT")
    for uid in sorted(ACCEPTED_SOP_CLASSES):
        ae.add_supported_context(uid, accepted_transfer_syntaxes())
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store, [ctx])])
    assert isinstance(server, ThreadedAssociationServer)
    try:
        yield int(server.server_address[1]), ctx
    finally:
        server.shutdown()
        db.dispose()


def test_refuse_answers_0xC016_quarantines_and_stores_nothing(
        tmp_path: Path, refusing_scp: tuple[int, StoreContext],
        caplog: pytest.LogCaptureFixture) -> None:
    port, ctx = refusing_scp
    spots = spot_views_and_dynamic(seed=41)
    wb = phantom_views(seed=42)
    with caplog.at_level(logging.INFO, logger="node.receive.handlers"):
        statuses = send_paths(write(spots + wb, tmp_path / "files"),
                              Destination("DSCINT", "127.0.0.1", port), CALLER)
    assert statuses == [Status.NOT_APPLICABLE] * 3 + [0, 0]
    refused = {str(ds.SOPInstanceUID) for ds in spots}
    with ctx.db.read_session() as s:
        stored = {i.sop_uid for i in s.query(Instance)}
        spot_study = s.get(Study, str(spots[0].StudyInstanceUID))
    assert stored == {str(ds.SOPInstanceUID) for ds in wb} and spot_study is None
    assert not list((tmp_path / "store").glob(f"studies/{spots[0].StudyInstanceUID}/**/*.dcm"))
    for sop in refused:
        assert list(ctx.files.quarantine_dir.glob(f"*_{sop}_*.dcm")), sop
        reasons = list(ctx.files.quarantine_dir.glob(f"*_{sop}_*.reason.txt"))
        assert reasons and "not a whole-body scan" in reasons[0].read_text()
        assert any(f"refused SOP {sop}" in r.getMessage() and "0xC016" in r.getMessage()
                   for r in caplog.records), sop


def test_node_configured_to_refuse_answers_0xC016(tmp_path: Path, untrained_model: Path,
                                                  pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      admission={"not_applicable": "refuse"})
    dynamic = spot_views_and_dynamic(seed=51)[2]
    with Node(cfg) as n:
        assert send_paths(write([dynamic], tmp_path / "dyn"), dest(n), CALLER) \
            == [Status.NOT_APPLICABLE]
        assert study_summaries(n.db) == []
