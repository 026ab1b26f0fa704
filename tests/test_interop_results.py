"""All three objects of a result among real DICOM software: the node sends the SR, the result
image (colour Secondary Capture) and the PDF report (Encapsulated PDF) to Orthanc and to DCMTK
storescp; Orthanc files them in the study, renders the image and hands back the PDF, storescp
writes them bit for bit, dciodvfy finds no error in any, dcm2pdf extracts the report.

Each test starts its own servers on 127.0.0.1 (OS-picked ports, temporary folders) and stops
them by PID; it skips, naming the tool, only where DCMTK, Orthanc or dicom3tools is absent.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.dicom.codes import ENCAPSULATED_PDF_STORAGE, RESULT_OBJECT_KINDS, SC_IMAGE_STORAGE
from node.dicom.objects import object_kind
from node.service.node import Node
from storage.db import ExportState
from storage.objects import result_objects
from tests.support.interop import (
    COMPREHENSIVE_3D_SR,
    Orthanc,
    StoreSCP,
    dataset_bytes,
    dciodvfy,
    interop_node_config,
    require_tool,
    require_tools,
    run_tool,
    storescu,
)
from tests.support.wait import wait_for

CAMERA = "GE_CAMERA"
NODE_AE = "DSCINT"
PACS_AE = "ORTHANC"
EXPORT_SECONDS = 60.0
BEST_ILLUSTRATION = "121080"  # DCM "Best illustration of finding"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require_tools("Orthanc", "storescu", "dciodvfy")
    server = Orthanc(tmp_path / "orthanc", ae_title=PACS_AE)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    require_tools("storescp", "echoscu", "storescu", "dciodvfy", "dcm2pdf")
    server = StoreSCP(tmp_path / "storescp", ae_title="STORESCP")
    try:
        yield server.start()
    finally:
        server.stop()


def _study_to_node(node: Node, tmp_path: Path, seed: int) -> str:
    """storescu as the camera sends a phantom study to the node; its Study Instance UID."""
    paths = write_study(generate_study("bone_metastasis", seed=seed), tmp_path / "study",
                        DicomLayout.MULTIFRAME)
    done = storescu(paths, CAMERA, NODE_AE, node.port, ["-R"])
    assert done.returncode == 0, done.stdout + done.stderr
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _delivered(node: Node, study_uid: str) -> dict[str, Path]:
    """Wait until every object of the study's result is acknowledged; kind -> stored file."""
    def probe() -> dict[str, Path] | None:
        objs = result_objects(node.db, [study_uid]).get(study_uid, [])
        if len(objs) != 3 or any(o.state is not ExportState.DONE for o in objs):
            return None
        return {object_kind(o.path, o.is_sr): Path(o.path) for o in objs}
    return wait_for(probe, EXPORT_SECONDS, f"SR, image and PDF of {study_uid} acknowledged")


def _illustration(sr: Dataset) -> tuple[str, str]:
    """(SOP class, instance) the SR's "Best illustration of finding" IMAGE item names."""
    found: list[tuple[str, str]] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            if item.ValueType == "IMAGE" and \
                    item.ConceptNameCodeSequence[0].CodeValue == BEST_ILLUSTRATION:
                ref = item.ReferencedSOPSequence[0]
                found.append((str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID)))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    assert len(found) == 1, found
    return found[0]


def _raw(orthanc: Orthanc, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}{path}",
                                timeout=10) as rsp:
        return bytes(rsp.read())


def test_orthanc_files_sr_image_and_pdf_in_the_study(tmp_path: Path, untrained_model: Path,
                                                     orthanc: Orthanc) -> None:
    cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, orthanc.dicom_port)
    with Node(cfg) as node:
        study_uid = _study_to_node(node, tmp_path, 61)
        stored = _delivered(node, study_uid)
    instances = orthanc.study_instances(study_uid)
    by_class = {i.sop_class_uid: i for i in instances}
    assert len(instances) == 3 and set(by_class) == \
        {COMPREHENSIVE_3D_SR, SC_IMAGE_STORAGE, ENCAPSULATED_PDF_STORAGE}, instances
    sr, image, report = (by_class[c] for c in (COMPREHENSIVE_3D_SR, SC_IMAGE_STORAGE,
                                               ENCAPSULATED_PDF_STORAGE))
    assert (sr.modality, image.modality, report.modality) == ("SR", "OT", "DOC")
    assert len({sr.series_instance_uid, image.series_instance_uid,
                report.series_instance_uid}) == 3
    # the SR Orthanc holds references the image Orthanc holds
    sr_file = tmp_path / "orthanc-sr.dcm"
    sr_file.write_bytes(_raw(orthanc, f"/instances/{sr.orthanc_id}/file"))
    assert _illustration(dcmread(sr_file)) == (SC_IMAGE_STORAGE, image.sop_instance_uid)
    # Orthanc decodes the image (its preview is a PNG) and hands back the PDF as we made it
    assert _raw(orthanc, f"/instances/{image.orthanc_id}/preview").startswith(b"\x89PNG")
    ours = dcmread(stored["PDF"])
    pdf = _raw(orthanc, f"/instances/{report.orthanc_id}/pdf")
    assert pdf == bytes(ours.EncapsulatedDocument)[:ours.EncapsulatedDocumentLength]
    for kind in ("image", "PDF"):
        got = tmp_path / f"orthanc-{kind}.dcm"
        oid = (image if kind == "image" else report).orthanc_id
        got.write_bytes(_raw(orthanc, f"/instances/{oid}/file"))
        assert dataset_bytes(got) == dataset_bytes(stored[kind])


def test_storescp_gets_all_three_objects_bit_for_bit_and_dciodvfy_clean(
        tmp_path: Path, untrained_model: Path, storescp: StoreSCP) -> None:
    cfg = interop_node_config(tmp_path / "node", untrained_model, storescp.ae_title,
                              storescp.port)
    with Node(cfg) as node:
        study_uid = _study_to_node(node, tmp_path, 62)
        stored = _delivered(node, study_uid)
    received = {RESULT_OBJECT_KINDS[str(dcmread(p, stop_before_pixels=True).SOPClassUID)]: p
                for p in storescp.received()}
    assert set(received) == {"SR", "image", "PDF"} and len(storescp.received()) == 3
    for kind, path in received.items():
        assert dataset_bytes(path) == dataset_bytes(stored[kind]), kind
        verdict = dciodvfy(path)
        assert not verdict.errors, (kind, verdict.output)
    sr, image = dcmread(received["SR"]), dcmread(received["image"], stop_before_pixels=True)
    assert _illustration(sr) == (SC_IMAGE_STORAGE, str(image.SOPInstanceUID))
    assert image.BurnedInAnnotation == "NO"
    out = tmp_path / "report.pdf"
    done = run_tool((require_tool("dcm2pdf"), str(received["PDF"]), str(out)))
    assert done.returncode == 0, done.stdout + done.stderr
    ours = dcmread(stored["PDF"])
    assert out.read_bytes() == bytes(ours.EncapsulatedDocument)[:ours.EncapsulatedDocumentLength]
