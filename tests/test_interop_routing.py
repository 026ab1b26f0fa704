"""Orthanc as the sender: a routing rule sends whole studies to the node with Orthanc's own
C-STORE SCU (REST /modalities/{id}/store). The study holds a whole-body NM scan, a CT series
and, from the second route on, the node's own results (SR, result image, PDF) that the node
exported to this same Orthanc. Every route succeeds, the node classifies the study once, and
Orthanc holds exactly one result SR.

Before this, the node refused every presentation context but NM and Secondary Capture, so
Orthanc failed the whole route ("Cannot transcode ... to one of [ ]") once the study held
anything else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.dicom.codes import RESULT_OBJECT_KINDS
from node.service.node import Node
from storage.common import CLASSIFY
from storage.db import Export, Instance, Job, Result
from storage.intake import ignored_totals
from storage.reports import StudySummary, study_summaries
from tests.support.interop import Orthanc, interop_node_config, require_tools, storescu
from tests.support.wait import wait_for

CAMERA = "GE_CAMERA"
NODE_AE = "DSCINT"
PACS_AE = "ORTHANC"
EXPORT_SECONDS = 60.0
CT_SLICES = 4


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require_tools("Orthanc", "storescu")
    server = Orthanc(tmp_path / "orthanc", ae_title=PACS_AE)
    try:
        yield server.start()
    finally:
        server.stop()


def _ct_series(study: Dataset, folder: Path) -> list[Path]:
    """A small CT series in the NM study (same patient), as a hybrid SPECT/CT would add."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for i in range(CT_SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                        "StudyID", "ReferringPhysicianName"):
            if keyword in study:
                setattr(ds, keyword, study[keyword].value)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = UID(series), 7, i + 1
        ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "OTHER VENDOR", ["ORIGINAL",
                                                                          "PRIMARY", "AXIAL"]
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((16, 16), 1000 + i, dtype=np.uint16).tobytes()
        path = folder / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _summary(node: Node, study_uid: str) -> StudySummary | None:
    return {s.study_uid: s for s in study_summaries(node.db)}.get(study_uid)


def _count(node: Node, table: type) -> int:
    """Rows of `table` (jobs: classify jobs only; a result's objects job follows its SR)."""
    stmt = select(func.count()).select_from(table)
    if table is Job:
        stmt = stmt.where(Job.kind == CLASSIFY)
    with node.db.read_session() as s:
        return int(s.execute(stmt).scalar_one())


def _all_exports_done(node: Node, study_uid: str) -> bool:
    """Classified, the result's image and PDF built (no job of the study left), and every
    object of the result (SR, image, PDF) acknowledged."""
    row = _summary(node, study_uid)
    if row is None or row.state != "classified":
        return False
    with node.db.read_session() as s:
        states = list(s.execute(select(Export.state).where(Export.study_uid == study_uid))
                      .scalars())
        working = s.execute(select(func.count()).select_from(Job).where(
            Job.study_uid == study_uid, Job.state.in_(["pending", "claimed"]))).scalar_one()
    return bool(states) and not working and all(state == "done" for state in states)


def test_orthanc_routes_whole_studies_twice_and_every_route_succeeds(
        tmp_path: Path, untrained_model: Path, orthanc: Orthanc,
        capfd: pytest.CaptureFixture[str]) -> None:
    nm = write_study(generate_study("bone_metastasis", seed=51), tmp_path / "nm",
                     DicomLayout.PER_VIEW)
    first = dcmread(nm[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    cts = _ct_series(first, tmp_path / "ct")
    done = storescu([*nm, *cts], CAMERA, PACS_AE, orthanc.dicom_port, ["-R"])
    assert done.returncode == 0, done.stdout + done.stderr
    orthanc_study, = orthanc.study_ids(study_uid)
    cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, orthanc.dicom_port)
    with Node(cfg) as node:
        orthanc.add_modality("dscint", NODE_AE, node.port)
        answer = orthanc.route("dscint", [orthanc_study])  # NM + CT
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        wait_for(lambda: _all_exports_done(node, study_uid), EXPORT_SECONDS,
                 "the result delivered to Orthanc")
        held = orthanc.study_instances(study_uid)
        own = [i for i in held if i.sop_class_uid in RESULT_OBJECT_KINDS
               and i.modality != "NM"]
        assert own, held  # the SR (and the result image / PDF where enabled) came back
        before = (_count(node, Job), _count(node, Result), _count(node, Instance))
        for _ in range(2):  # NM + CT + the node's own objects
            answer = orthanc.route("dscint", [orthanc_study])
            assert answer.get("FailedInstancesCount", 0) == 0, answer
            assert answer.get("InstancesCount", len(held)) == len(held), answer
        wait_for(lambda: sum(t.count for t in ignored_totals(node.db)
                             if t.kind == "own_object") >= 2 * len(own), 20,
                 "the own objects counted")
        after = (_count(node, Job), _count(node, Result), _count(node, Instance))
        totals = {(t.sop_class_uid, t.kind): t.count for t in ignored_totals(node.db)}
        assert _summary(node, study_uid).state == "classified"  # type: ignore[union-attr]
    assert after == before == (1, 1, 2), (before, after)
    assert totals[(str(CTImageStorage), "not_input")] == 3 * CT_SLICES, totals
    srs = [i for i in orthanc.study_instances(study_uid) if RESULT_OBJECT_KINDS.get(
        i.sop_class_uid) == "SR" and i.modality == "SR"]
    assert len(srs) == 1, srs  # exactly one current result
    assert len(orthanc.study_ids(study_uid)) == 1
    # the receiver process logs to its stderr: one line per association
    lines = [line for line in capfd.readouterr().err.splitlines()
             if "node.receive.association" in line]
    assert not any("refused presentation context" in line for line in lines), lines
    # Orthanc's SCU may use more than one association per route: one line each
    assert any("ignored (the node's own objects)" in line for line in lines), lines
    assert sum(f"ignored (not an input) {CT_SLICES}: CTImageStorage {CT_SLICES}" in line
               for line in lines) == 3, lines
