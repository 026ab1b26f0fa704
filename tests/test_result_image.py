"""The result image (colour Secondary Capture), its evidence map, and its way to PACS: built by
a real worker from a real study and model, referenced by the SR, one export per object,
delivered over a real association, never duplicated."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select
from torch import nn

from model.classifier import Classifier
from model.explain import ExplainError, attention_map, grad_cam
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.classify.result_image import (
    BANNER_ROWS,
    FOOTER_ROWS,
    PANEL_ROWS,
    ShownView,
    build_result_image,
    encode_image,
    window,
)
from node.classify.sr import Classification, DeviceInfo, ModelInfo
from node.classify.worker import WorkerContext, run_once
from node.export.scu import Destination, send_file
from storage.db import Database, Export
from storage.exports import claim_export, export_succeeded
from storage.filestore import FileStore
from storage.jobs import NewResult, store_result
from tests.support.net import free_port
from tests.support.recorded import record_complete_study

DEVICE = DeviceInfo("DSCINT", "0.1", "1.2.826.0.1.3680043.8.498.1", "host")
MODEL = ModelInfo("Dscint", "2026.12.01-1", "cd" * 32, "simulated phantoms", True)
PROBS = {"normal": 0.31, "bone_metastasis": 0.29, "arthritis": 0.22, "thyroid_carcinoma": 0.18}
NOW = datetime(2026, 12, 1, 10, 0, 0)


def _source() -> tuple[Dataset, np.ndarray, np.ndarray]:
    study = generate_study("bone_metastasis", seed=11)
    (ds,) = study_datasets(study, DicomLayout.MULTIFRAME)
    return ds, study.anterior, study.posterior


def _image(evidence: np.ndarray | None = None, phantoms: bool = True) -> Dataset:
    src, ant, post = _source()
    ev = evidence if evidence is not None else np.linspace(0, 1, ant.size).reshape(ant.shape)
    model = MODEL if phantoms else ModelInfo(MODEL.name, MODEL.version, MODEL.sha256,
                                             MODEL.training_data, False)
    return build_result_image(src, [ShownView("ANT", ant, ev), ShownView("POST", post, ev)],
                              Classification("indeterminate", PROBS, {"anterior": PROBS},
                                             threshold=0.7), model, DEVICE, NOW)


def test_image_is_rgb_in_the_study_with_its_own_series_and_no_burned_in_identity() -> None:
    src, _, _ = _source()
    img = dcmread(BytesIO(encode_image(_image())))
    assert img.SOPClassUID == SecondaryCaptureImageStorage
    assert (img.SamplesPerPixel, img.PhotometricInterpretation) == (3, "RGB")
    assert img.StudyInstanceUID == src.StudyInstanceUID and img.PatientID == src.PatientID
    assert img.PatientName == src.PatientName
    assert img.SeriesInstanceUID != src.SeriesInstanceUID
    assert img.BurnedInAnnotation == "NO"
    assert img.pixel_array.shape == (BANNER_ROWS + PANEL_ROWS + FOOTER_ROWS, 1024, 3)
    banner = img.pixel_array[:BANNER_ROWS // 2, :5]
    assert (banner[..., 0] > 150).all() and (banner[..., 1] < 30).all()  # red: not for diagnosis


def test_uids_are_deterministic_and_the_pixels_repeatable() -> None:
    a, b = _image(), _image()
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.PixelData == b.PixelData


def test_views_are_inverted_and_windowed() -> None:
    counts = np.zeros((8, 8), np.uint16)
    counts[2, 2] = 1000
    grey = window(counts)
    assert grey[0, 0] == 255 and grey[2, 2] == 0  # background white, hot spot black
    assert window(np.zeros((4, 4), np.uint16)).min() == 255


def test_evidence_is_drawn_only_on_the_overlaid_panel() -> None:
    ev = np.zeros((1024, 256), np.float32)
    ev[500:520, 100:120] = 1.0
    px = _image(ev).pixel_array
    plain, overlaid = px[BANNER_ROWS + 510, 110], px[BANNER_ROWS + 510, 256 + 110]
    assert plain[0] == plain[1] == plain[2]  # grey
    assert not overlaid[0] == overlaid[1] == overlaid[2]  # coloured


def test_no_views_is_refused() -> None:
    src, _, _ = _source()
    with pytest.raises(ValueError, match="at least one view"):
        build_result_image(src, [], Classification("normal", PROBS, {}), MODEL, DEVICE, NOW)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_dciodvfy_reports_no_errors(tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    path.write_bytes(encode_image(_image()))
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "SCImage" in report
    assert not [line for line in report.splitlines() if "Error" in line], report


def test_grad_cam_and_attention_maps(untrained_model: Path) -> None:
    clf = Classifier(untrained_model)
    study = generate_study("arthritis", seed=3)
    maps = clf.explain([study.anterior, study.posterior], "arthritis")
    assert len(maps) == 2
    for m in maps:
        assert m is not None and m.shape == (1024, 256)
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    batch = torch.rand(1, 1, 1024, 256)
    att = attention_map(clf.verified_module, batch)
    assert att.shape == (1, 1024, 256) and float(att.max()) == pytest.approx(1.0)


def test_a_network_without_dscint_layout_gets_no_map() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x), dim=1)

    with pytest.raises(ExplainError):
        grad_cam(Flat(), torch.rand(1, 1, 4, 4), 0)


def _recorded_study(db: Database, files: FileStore) -> str:
    return record_complete_study(db, files, seed=21)


def test_worker_sends_sr_and_image_each_once_and_the_sr_references_the_image(
        tmp_path: Path, untrained_model: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create_all()
    files = FileStore(tmp_path / "store")
    study_uid = _recorded_study(db, files)
    clf = Classifier(untrained_model)
    ctx = WorkerContext(db=db, files=files, classifier=lambda: clf, device=DEVICE,
                        destination="PACS@127.0.0.1:104", on_result=lambda: None,
                        result_image=True)
    assert run_once(ctx, "test:w0")
    got: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        got.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        for _ in range(2):
            claimed = claim_export(db, "test:e0")
            assert claimed is not None
            outcome = send_file(Path(claimed.sr_path), Destination("PACS", "127.0.0.1", port),
                                "DSCINT")
            assert outcome.status == 0x0000
            export_succeeded(db, claimed.export_id, 0)
        assert claim_export(db, "test:e0") is None  # two objects, two exports, both done
    finally:
        server.shutdown()
        db.dispose()
    sr, image = got  # the SR goes first
    assert sr.StudyInstanceUID == image.StudyInstanceUID == study_uid
    assert image.SOPClassUID == SecondaryCaptureImageStorage
    assert str(image.SOPInstanceUID) in sr.to_json()
    evidence = {str(i.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for i in series.ReferencedSOPSequence}
    assert str(image.SOPInstanceUID) in evidence


def test_storing_the_same_result_again_makes_no_second_export(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create_all()
    files = FileStore(tmp_path / "store")
    study_uid = _recorded_study(db, files)
    new = NewResult(study_uid=study_uid, job_id=None, model_version="v", model_sha256="0" * 64,
                    predicted_class="indeterminate", probabilities=PROBS, per_view={},
                    sr_sop_uid=generate_uid(), sr_series_uid=generate_uid(), sr_path="/sr.dcm",
                    other_objects=((generate_uid(), "/image.dcm"),))
    first = store_result(db, new, "PACS@127.0.0.1:104")
    assert store_result(db, new, "PACS@127.0.0.1:104") == first
    with db.read_session() as s:
        rows = s.execute(select(Export.id, Export.sr_sop_uid, Export.object_path)).all()
    db.dispose()
    assert len(rows) == 2
    assert first[1] == min(r.id for r in rows)  # the SR's export, created first
    assert {r.object_path for r in rows} == {None, "/image.dcm"}


def test_a_model_not_trained_on_phantoms_gets_the_device_banner() -> None:
    banner = _image(phantoms=False).pixel_array[:BANNER_ROWS // 2, :5]
    assert (banner[..., 0] > 100).all() and (banner[..., 1] > 60).all()  # amber, not red
