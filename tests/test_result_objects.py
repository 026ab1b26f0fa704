"""A result is three objects at PACS: the SR (for machines), the result image (colour Secondary
Capture, any viewer) and a one-page PDF report (document viewers, RIS), each delivered on its
own through the one export queue. Real node, real associations, real model, real dciodvfy."""

from __future__ import annotations

import inspect
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageDraw
from pydicom import Dataset, dcmread
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from model.classifier import Classifier
from model.phantom_dicom import DicomLayout, study_datasets, write_study
from model.phantoms import generate_study
from node.classify import pdf, result_image
from node.classify.pdf import MAX_IMAGE_PIXELS, build_pdf_report, pdf_uids, render_pdf
from node.classify.result_image import ShownView, build_result_image, encode_image
from node.classify.sr import Classification, DeviceInfo, ModelInfo
from node.classify.worker import WorkerContext, run_once
from node.demo.modality import send_paths
from node.demo.pacs_standin import RESULT_CLASSES, SR_CLASSES, PacsStandIn, Received
from node.dicom.codes import ENCAPSULATED_PDF_STORAGE, SC_IMAGE_STORAGE
from node.dicom.objects import object_kind
from node.ops.status import as_json, export_cell, objects_text
from node.service.housekeeping import purge_study
from node.service.node import Node
from node.service.web import PageSource, render_page, thumbnail_png
from storage.db import Database, ExportState
from storage.exports import claim_export, export_succeeded, requeue_dead_exports
from storage.filestore import FileStore
from storage.objects import result_objects
from storage.reports import queue_depth, study_summaries
from storage.retention import purge_candidates
from tests.support.interop import dciodvfy, find_tool
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study
from tests.support.wait import wait_for
from tests.test_result_image import _recorded_study

DEVICE = DeviceInfo("DSCINT", "0.1", "1.2.826.0.1.3680043.8.498.1", "host")
MODEL = ModelInfo("Dscint", "2026.12.01-1", "ab" * 32, "simulated phantoms", True)
PROBS = {"normal": 0.61, "bone_metastasis": 0.19, "arthritis": 0.12, "thyroid_carcinoma": 0.08}
NOW = datetime(2026, 12, 2, 9, 0, 0)
TOKEN = "s3cret-page-token"
SENTINEL_NAME = "Zebulonsentinel^Quentinsentinel"
SENTINEL_ID = "PIDSENTINEL77"
needs_dciodvfy = pytest.mark.skipif(find_tool("dciodvfy") is None,
                                    reason="dciodvfy not installed (.ci/system-deps.sh)")


def _source() -> tuple[Dataset, np.ndarray, np.ndarray]:
    study = generate_study("normal", seed=17)
    (ds,) = study_datasets(study, DicomLayout.MULTIFRAME)
    ds.PatientName, ds.PatientID = SENTINEL_NAME, SENTINEL_ID
    return ds, study.anterior, study.posterior


def _result() -> Classification:
    return Classification("normal", PROBS, {"anterior": PROBS, "posterior": PROBS},
                          threshold=0.55)


def _image_and_pdf() -> tuple[Dataset, Dataset, Dataset]:
    src, ant, post = _source()
    ev = np.zeros(ant.shape, np.float32)
    ev[300:340, 100:140] = 1.0
    image = build_result_image(src, [ShownView("ANT", ant, ev), ShownView("POST", post, ev)],
                               _result(), MODEL, DEVICE, NOW)
    return src, image, build_pdf_report(src, image, _result(), MODEL, DEVICE, NOW)


def _illustration(sr: Dataset) -> tuple[str, str]:
    """(SOP class, instance) of the SR's IMAGE item "Best illustration of finding"."""
    found = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.ValueType == "IMAGE" and \
                    item.ConceptNameCodeSequence[0].CodeValue == "121080":
                ref = item.ReferencedSOPSequence[0]
                found.append((str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID)))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    assert len(found) == 1, found
    return found[0]


def _by_kind(objects: list[Received]) -> dict[str, Received]:
    kinds = {SC_IMAGE_STORAGE: "image", ENCAPSULATED_PDF_STORAGE: "PDF"}
    out = {kinds.get(str(r.dataset.SOPClassUID), "SR"): r for r in objects}
    assert len(out) == len(objects), [str(r.dataset.SOPClassUID) for r in objects]
    return out


def _send_study(n: Node, tmp_path: Path, seed: int) -> str:
    paths = write_study(generate_study("arthritis", seed=seed), tmp_path / f"study{seed}",
                        DicomLayout.MULTIFRAME)
    assert send_paths(paths, dest(n), CALLER) == [0]
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- the objects as built ---------------------------------------------------------------


def test_pdf_report_in_the_study_with_its_own_series_and_deterministic_uids() -> None:
    src, image, report = _image_and_pdf()
    assert report.SOPClassUID == EncapsulatedPDFStorage and report.Modality == "DOC"
    assert report.StudyInstanceUID == src.StudyInstanceUID
    assert (report.PatientID, report.PatientName) == (src.PatientID, src.PatientName)
    assert len({report.SeriesInstanceUID, image.SeriesInstanceUID, src.SeriesInstanceUID}) == 3
    assert (str(report.SeriesInstanceUID), str(report.SOPInstanceUID)) == \
        pdf_uids(str(src.StudyInstanceUID), MODEL.sha256)
    doc = bytes(report.EncapsulatedDocument)
    assert doc.startswith(b"%PDF-") and report.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert doc[:report.EncapsulatedDocumentLength].rstrip().endswith(b"%%EOF")
    assert report.BurnedInAnnotation == "NO"
    again = build_pdf_report(src, image, _result(), MODEL, DEVICE, NOW)
    assert again.SOPInstanceUID == report.SOPInstanceUID
    assert bytes(again.EncapsulatedDocument) == doc  # repeatable: no creation date inside


@needs_dciodvfy
def test_dciodvfy_finds_no_error_in_the_pdf_report_and_the_image(tmp_path: Path) -> None:
    _, image, report = _image_and_pdf()
    for name, ds, iod in (("image.dcm", image, "SCImage"), ("report.dcm", report,
                                                            "EncapsulatedPDF")):
        path = tmp_path / name
        path.write_bytes(encode_image(ds))
        verdict = dciodvfy(path)
        assert iod in verdict.output and not verdict.errors, verdict.output


def test_rendering_inputs_never_include_the_patient_name_or_id(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every string drawn into the image's pixels and onto the PDF page is recorded (the real
    drawing calls, wrapped): none carries the patient's name or ID, which the source has."""
    drawn: list[str] = []
    real_draw, real_page = ImageDraw.ImageDraw.text, pdf.Page.text

    def draw_text(self: ImageDraw.ImageDraw, xy: object, text: str, *a: object,
                  **k: object) -> None:
        drawn.append(str(text))
        real_draw(self, xy, text, *a, **k)  # type: ignore[arg-type]

    def page_text(self: pdf.Page, x: float, y: float, s: str, *a: object, **k: object) -> None:
        drawn.append(str(s))
        real_page(self, x, y, s, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", draw_text)
    monkeypatch.setattr(pdf.Page, "text", page_text)
    _, image, report = _image_and_pdf()
    assert drawn and any("Finding" in t for t in drawn) and any("Dscint" in t for t in drawn)
    for part in (*SENTINEL_NAME.split("^"), SENTINEL_ID):
        assert not [t for t in drawn if part.lower() in t.lower()], part
    assert image.BurnedInAnnotation == "NO" == report.BurnedInAnnotation
    # the drawing functions cannot reach the header: they take pixels, result and model only
    for fn in (result_image.render, render_pdf, pdf.table_rows):
        assert "Dataset" not in str(inspect.signature(fn)), fn


def test_an_oversized_image_is_refused_before_drawing() -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 8
    with pytest.raises(ValueError, match="cannot go on the report"):
        render_pdf(np.zeros((side, side, 3), np.uint8), [], "w", True)


# --- through the worker: switches, retention, status ------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Database, FileStore, str]]:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create_all()
    files = FileStore(tmp_path / "store")
    yield db, files, _recorded_study(db, files)
    db.dispose()


def _run_worker(store: tuple[Database, FileStore, str], model: Path, image: bool,
                report: bool) -> list[str]:
    db, files, study = store
    clf = Classifier(model)
    ctx = WorkerContext(db=db, files=files, classifier=lambda: clf, device=DEVICE,
                        destination="PACS@127.0.0.1:104", on_result=lambda: None,
                        result_image=image, result_pdf=report)
    assert run_once(ctx, "test:w0")
    objs = result_objects(db)[study]
    return [object_kind(o.path, o.is_sr) for o in objs]


@pytest.mark.parametrize(("image", "report", "kinds"), [
    (True, True, ["SR", "image", "PDF"]), (True, False, ["SR", "image"]),
    (False, True, ["SR", "PDF"]), (False, False, ["SR"])])
def test_the_switches_decide_which_objects_are_queued(
        store: tuple[Database, FileStore, str], untrained_model: Path, image: bool,
        report: bool, kinds: list[str]) -> None:
    assert _run_worker(store, untrained_model, image, report) == kinds
    db, _, study = store
    sr = dcmread(result_objects(db)[study][0].path)
    referenced = "121080" in sr.to_json()  # Best illustration of finding
    assert referenced == image  # the SR references the image only when it is sent


def test_retention_deletes_the_image_and_pdf_with_the_study(
        store: tuple[Database, FileStore, str], untrained_model: Path) -> None:
    db, files, study = store
    _run_worker(store, untrained_model, True, True)
    paths = [Path(o.path) for o in result_objects(db)[study]]
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    cutoff = datetime.now(UTC) + timedelta(days=1)
    assert set(purge_candidates(db, study, cutoff).sr_paths) == {str(p) for p in paths}
    n_files, _ = purge_study(db, files, study, cutoff)
    assert n_files == 4  # the instance, the SR, the image, the PDF
    assert not any(p.exists() for p in paths)


def test_status_counts_each_object_and_lists_it(
        store: tuple[Database, FileStore, str], untrained_model: Path) -> None:
    db, _, study = store
    _run_worker(store, untrained_model, True, True)
    row = study_summaries(db)[0]
    objs = result_objects(db)[study]
    assert export_cell(row, objs) == "0/3 sent, pending"
    for _ in range(2):  # the SR and the image delivered, the PDF not yet
        claimed = claim_export(db, "test:x0")
        assert claimed is not None
        export_succeeded(db, claimed.export_id, 0)
    objs = result_objects(db)[study]
    assert export_cell(row, objs) == "2/3 sent, pending"
    assert objects_text(objs) == "done SR+image; pending PDF"
    doc = json.loads(as_json([row], {}, {}, datetime.now(UTC), {study: objs}))
    listed = doc["studies"][0]["objects"]
    assert [(o["kind"], o["state"]) for o in listed] == \
        [("SR", "done"), ("image", "done"), ("PDF", "pending")]
    assert listed[1]["sop_instance_uid"] == objs[1].sop_uid


def test_thumbnail_of_the_latest_result_image(store: tuple[Database, FileStore, str],
                                              untrained_model: Path) -> None:
    db, _, study = store
    _run_worker(store, untrained_model, True, True)
    image_path = next(o.path for o in result_objects(db)[study]
                      if object_kind(o.path) == "image")
    png = thumbnail_png(Path(image_path))
    assert png.startswith(b"\x89PNG") and len(png) < 150_000
    source = PageSource(db)
    latest = source.thumbnails.latest(db)
    assert latest == (study, png)
    html = source.render({"status": "ok", "ae_title": "<DSCINT>"})
    assert 'id="result-image"' in html and "data:image/png;base64," in html
    assert "&lt;DSCINT&gt;" in html and "0/3 sent" in html
    assert "no thumbnail" not in html
    assert thumbnail_png(Path(image_path).with_suffix(".missing")) == b""
    assert 'id="result-image"' not in render_page({"status": "ok"}, [], 10)


# --- the node and a PACS ----------------------------------------------------------------


def test_a_study_reaches_pacs_as_sr_image_and_pdf(tmp_path: Path, untrained_model: Path,
                                                  pacs: PacsStandIn) -> None:
    port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      health={"port": port, "token": TOKEN})
    with Node(cfg) as n:
        uid = _send_study(n, tmp_path, 51)
        assert pacs.wait_for(3, timeout=60, sop_classes=RESULT_CLASSES)
        got = _by_kind(pacs.by_study(None)[uid])
        assert set(got) == {"SR", "image", "PDF"}
        sr, image, report = (got[k].dataset for k in ("SR", "image", "PDF"))
        assert _illustration(sr) == (str(SecondaryCaptureImageStorage), str(image.SOPInstanceUID))
        assert len({sr.SeriesInstanceUID, image.SeriesInstanceUID,
                    report.SeriesInstanceUID}) == 3
        for ds in (image, report):
            assert ds.StudyInstanceUID == sr.StudyInstanceUID == uid
            assert (ds.PatientID, ds.PatientName) == (sr.PatientID, sr.PatientName)
        assert image.BurnedInAnnotation == "NO"
        row = wait_study(n.db, uid, "every object delivered", export_state="done")
        wait_for(lambda: all(o.state is ExportState.DONE
                             for o in result_objects(n.db)[uid]), 20, "3 objects done")
        assert export_cell(row, result_objects(n.db)[uid]) == "3/3 sent"
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/")[0] == 401  # the thumbnail is inside the page: same token
        code, html = _get(f"{base}/?token={TOKEN}")
        assert code == 200 and 'id="result-image"' in html and "3/3 sent" in html
        assert SENTINEL_ID not in html and str(sr.PatientID) not in html
    if find_tool("dciodvfy") is not None:
        for kind, r in got.items():
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(r.raw if kind == "SR" else encode_image(r.dataset))
            verdict = dciodvfy(path)
            assert not verdict.errors, (kind, verdict.output)
    assert len(pacs.srs) == 1 and len(pacs.received) == 3  # each once


def test_pdf_switched_off_sends_sr_and_image_only(tmp_path: Path, untrained_model: Path,
                                                  pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port, results={"pdf": False})
    with Node(cfg) as n:
        uid = _send_study(n, tmp_path, 52)
        assert pacs.wait_for(2, timeout=60, sop_classes=None)
        wait_for(lambda: all(o.state is ExportState.DONE
                             for o in result_objects(n.db).get(uid, [])), 20, "both done")
        assert len(result_objects(n.db)[uid]) == 2
    assert set(_by_kind(pacs.by_study(None)[uid])) == {"SR", "image"}


def test_pacs_without_sc_storage_gets_the_sr_and_the_image_is_dead_lettered(
        tmp_path: Path, untrained_model: Path) -> None:
    """A PACS that does not accept Secondary Capture: the SR and the PDF are delivered, the
    image is dead-lettered with its reason; `resend` tries it again, and no SR is ever sent
    twice."""
    pacs = PacsStandIn(ae_title="TEST_PACS",
                       accepted_classes=(*SR_CLASSES, ENCAPSULATED_PDF_STORAGE))
    pacs.start()
    try:
        cfg = node_config(tmp_path / "node", untrained_model, pacs.port)
        with Node(cfg) as n:
            uid = _send_study(n, tmp_path, 53)
            wait_for(lambda: queue_depth(n.db)["dead_exports"] == 1, 60, "the image dead")
            objs = {object_kind(o.path, o.is_sr): o for o in result_objects(n.db)[uid]}
            image = objs["image"]  # dead at once (no context) or after [export].max_attempts
            assert image.state is ExportState.DEAD and 1 <= image.attempts <= 3
            assert image.last_error  # the reason is kept for `status` and the alert
            row = wait_study(n.db, uid, "the SR delivered", export_state="done")
            wait_for(lambda: export_cell(row, result_objects(n.db)[uid])
                     .startswith("2/3 sent, dead"), 30, "the SR and the PDF delivered")
            assert requeue_dead_exports(n.db) == 1  # `resend`: only the dead image
            n._export.set()
            wait_for(lambda: queue_depth(n.db)["dead_exports"] == 1, 30, "dead again")
            kinds = [str(r.dataset.SOPClassUID) for r in pacs.received]
        assert kinds.count(str(EncapsulatedPDFStorage)) == 1
        assert len(pacs.srs) == 1 and SC_IMAGE_STORAGE not in kinds
    finally:
        pacs.stop()


def test_pacs_refusing_sc_for_now_retries_the_image_per_policy(
        tmp_path: Path, untrained_model: Path) -> None:
    """0xA700 (out of resources) for the image only: retried with backoff up to
    [export].max_attempts, then dead with that status; the SR went once."""
    pacs = PacsStandIn(ae_title="TEST_PACS", refuse_classes={SC_IMAGE_STORAGE: 0xA700})
    pacs.start()
    try:
        cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                          export={"max_attempts": 3, "backoff_base_seconds": 0.1,
                                  "backoff_cap_seconds": 0.2})
        with Node(cfg) as n:
            uid = _send_study(n, tmp_path, 54)
            wait_for(lambda: queue_depth(n.db)["dead_exports"] == 1, 60, "the image dead")
            objs = {object_kind(o.path, o.is_sr): o for o in result_objects(n.db)[uid]}
            assert objs["image"].attempts == 3 and "0xA700" in (objs["image"].last_error or "")
            assert objs["SR"].state is ExportState.DONE and objs["PDF"].state is ExportState.DONE
        assert len(pacs.srs) == 1 and len(pacs.received) == 2
    finally:
        pacs.stop()


def test_object_kinds_of_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    assert object_kind(junk) == "object" and object_kind(tmp_path / "gone.dcm") == "object"
    assert object_kind(tmp_path / "gone.dcm", is_sr=True) == "SR"
    _, image, report = _image_and_pdf()
    for ds, kind in ((image, "image"), (report, "PDF")):
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(encode_image(ds))
        assert object_kind(path) == kind
