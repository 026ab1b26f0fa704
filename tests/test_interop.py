"""The node among real DICOM software: DCMTK as the camera, Orthanc and storescp as the PACS,
dciodvfy and dsrdump as judges of every SR it writes.

Each test starts its own servers on 127.0.0.1 (OS-picked ports, temporary folders) and stops
them by PID. A test skips, naming the tool, only where DCMTK, Orthanc or dicom3tools is absent;
`make test` installs them (`.ci/system-deps.sh`).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread

from model.calibration import INDETERMINATE, INDETERMINATE_CODE
from model.classes import DscintClass
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.classify.sr import read_result
from node.config import Config
from node.dicom.objects import object_kind
from node.service.node import Node
from storage.objects import result_objects
from storage.reports import StudySummary, queue_depth, study_summaries
from tests.support.interop import (
    COMPREHENSIVE_3D_SR,
    REPO_ROOT,
    Orthanc,
    StoreSCP,
    config_toml,
    dataset_bytes,
    dciodvfy,
    dsrdump,
    echoscu,
    interop_node_config,
    require_tools,
    storescu,
)
from tests.support.wait import wait_for

SENDER_TOOLS = ("storescu", "dciodvfy", "dsrdump")
CAMERA = "GE_CAMERA"
NODE_AE = "DSCINT"
PACS_AE = "ORTHANC"
EXPORT_SECONDS = 30.0

# The real GE scan in several encodings; storescu flags that propose the file's own transfer
# syntax (and only the contexts the file needs), so the node receives it as the camera holds it.
GE_FILES = {
    "NM1_UNC.dcm": ["-R"],
    "NM1_J2KR.dcm": ["-R", "-xv"],
    "NM1_JLSL.dcm": ["-R", "-xt"],
    "NM1_RLE.dcm": ["-R", "-xr"],
}


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the module: its graceful stop takes ~3 s, too long to pay per test."""
    require_tools("Orthanc", *SENDER_TOOLS)
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), ae_title=PACS_AE)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def orthanc(shared_orthanc: Orthanc) -> Orthanc:
    """Orthanc as the PACS, emptied first; it takes C-STORE from anyone (camera and node)."""
    assert shared_orthanc.server is not None and shared_orthanc.server.alive(), \
        shared_orthanc.log_tail()
    shared_orthanc.clear()
    assert shared_orthanc.get("/instances") == []
    return shared_orthanc


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK storescp as the PACS, writing what it receives bit for bit."""
    require_tools("storescp", "echoscu", *SENDER_TOOLS)
    server = StoreSCP(tmp_path / "storescp", ae_title="STORESCP")
    try:
        yield server.start()
    finally:
        server.stop()


# --- helpers -------------------------------------------------------------------------------


def _exported(node: Node, study_uid: str, states: Sequence[str] = ("done",)) -> StudySummary:
    """Wait until the study's SR export reaches one of `states` (done: the PACS acked it)."""
    def probe() -> StudySummary | None:
        row = {s.study_uid: s for s in study_summaries(node.db)}.get(study_uid)
        return row if row is not None and row.export_state in states else None
    return wait_for(probe, EXPORT_SECONDS, f"export of study {study_uid} to reach {states}")


def _node_sr(node: Node, study_uid: str) -> Path:
    """The one SR file the node stored for the study under storage root `sr/` (the result
    image and the PDF report lie beside it)."""
    files = sorted(p for p in (node.cfg.storage_root / "sr" / study_uid).glob("*.dcm")
                   if object_kind(p) == "SR")
    assert len(files) == 1, files
    return files[0]


def _stored_transfer_syntaxes(node: Node) -> set[str]:
    """Transfer syntaxes of the instances the node wrote (as received)."""
    return {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in (node.cfg.storage_root / "studies").rglob("*.dcm")}


def check_sr(path: Path) -> tuple[str, ...]:
    """dciodvfy finds no error, dsrdump renders the finding. dciodvfy's warnings do not fail
    the test but show in pytest's warnings summary, so they are seen and can be fixed."""
    report = dciodvfy(path)
    assert not report.errors, report.output
    for line in report.warnings:
        warnings.warn(f"dciodvfy {path.name}: {line}", UserWarning, stacklevel=2)
    predicted, _ = read_result(dcmread(path))
    code = INDETERMINATE_CODE[0] if predicted == INDETERMINATE else \
        DscintClass.by_name(predicted).value.code_value
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert f'<contains CODE:(,,"Finding")=({code},SCT,' in dump.stdout, dump.stdout
    return report.warnings


def _send(paths: Sequence[Path], called: str, port: int, flags: Sequence[str] = ("-R",)) -> None:
    """storescu as the camera; every file must be acknowledged."""
    done = storescu(paths, CAMERA, called, port, flags)
    assert done.returncode == 0, done.stdout + done.stderr


def _camera_to_node_and_orthanc(node: Node, orthanc: Orthanc, paths: Sequence[Path],
                                flags: Sequence[str]) -> str:
    """The camera stores the images in Orthanc and in the node; the SR must join them there.

    Returns the study UID after checking Orthanc holds one study with the images and
    exactly one SR (Modality SR, Comprehensive 3D SR) in its own series, the node's SR.
    """
    _send(paths, PACS_AE, orthanc.dicom_port, flags)
    _send(paths, NODE_AE, node.port, flags)
    sources = [dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(sources[0].StudyInstanceUID)
    row = _exported(node, study_uid)
    assert row.state == "classified", row
    assert len(orthanc.study_ids(study_uid)) == 1, orthanc.log_tail()
    instances = orthanc.study_instances(study_uid)
    srs = [i for i in instances if i.sop_class_uid == COMPREHENSIVE_3D_SR]
    ours = {o.sop_uid for o in result_objects(node.db)[study_uid]}  # SR, image, PDF
    images = {i.sop_instance_uid for i in instances
              if i not in srs and i.sop_instance_uid not in ours}
    assert images == {str(s.SOPInstanceUID) for s in sources}
    assert len(srs) == 1 and srs[0].modality == "SR", instances
    assert srs[0].series_instance_uid not in {str(s.SeriesInstanceUID) for s in sources}
    sr_file = _node_sr(node, study_uid)
    assert srs[0].sop_instance_uid == str(dcmread(sr_file).SOPInstanceUID)
    check_sr(sr_file)
    return study_uid


# --- tests ---------------------------------------------------------------------------------


def test_echoscu_verifies_the_node(tmp_path: Path, untrained_model: Path) -> None:
    """A camera's first step: C-ECHO from DCMTK to the node's AE title."""
    require_tools("echoscu")
    cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, 104)
    with Node(cfg) as node:
        done = echoscu(CAMERA, NODE_AE, node.port)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(GE_FILES))
def test_real_ge_file_from_storescu_to_orthanc(tmp_path: Path, untrained_model: Path,
                                               realdata: Path, orthanc: Orthanc,
                                               name: str) -> None:
    """The GE scan arrives in its own transfer syntax, is stored as received, and the SR
    lands in Orthanc beside it (one file per node: the encodings share one study UID)."""
    require_tools(*SENDER_TOOLS)
    src = realdata / name
    cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, orthanc.dicom_port)
    with Node(cfg) as node:
        _camera_to_node_and_orthanc(node, orthanc, [src], GE_FILES[name])
        original = str(dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert _stored_transfer_syntaxes(node) == {original}


@pytest.mark.parametrize("layout", [DicomLayout.MULTIFRAME, DicomLayout.PER_VIEW,
                                    DicomLayout.SECONDARY_CAPTURE])
def test_phantom_study_from_storescu_to_orthanc(tmp_path: Path, untrained_model: Path,
                                                orthanc: Orthanc, layout: DicomLayout) -> None:
    """Multi-frame NM, one NM object per view, and SC (views named in text): each becomes
    one SR in the study, completed because both views arrived."""
    require_tools(*SENDER_TOOLS)
    paths = write_study(generate_study("bone_metastasis", seed=41), tmp_path / "study", layout)
    cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, orthanc.dicom_port,
                              completion={"quiet_seconds": 30.0})
    with Node(cfg) as node:
        study_uid = _camera_to_node_and_orthanc(node, orthanc, paths, ["-R"])
        row = {s.study_uid: s for s in study_summaries(node.db)}[study_uid]
        assert row.completion_reason == "both_views", row  # not the 30 s quiet fallback


def test_storescp_receives_the_sr_bytes_the_node_stored(tmp_path: Path, untrained_model: Path,
                                                         storescp: StoreSCP) -> None:
    """What reaches a DCMTK PACS is byte for byte the SR the node keeps under `sr/`."""
    paths = write_study(generate_study("arthritis", seed=42), tmp_path / "study",
                        DicomLayout.PER_VIEW)
    cfg = interop_node_config(tmp_path / "node", untrained_model, storescp.ae_title,
                              storescp.port)
    with Node(cfg) as node:
        _send(paths, NODE_AE, node.port)
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        _exported(node, study_uid)
        stored = _node_sr(node, study_uid)
    received = [p for p in storescp.received() if object_kind(p) == "SR"]
    assert len(received) == 1, received  # the image and the PDF: tests/test_interop_results
    got, ours = dcmread(received[0]), dcmread(stored)
    assert got.SOPInstanceUID == ours.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
    assert dataset_bytes(received[0]) == dataset_bytes(stored)
    check_sr(received[0])


def test_refusing_orthanc_dead_letters_then_resend_delivers_once(
        tmp_path: Path, untrained_model: Path) -> None:
    """Orthanc that does not know the node's AE rejects it: dead letter with the reason.
    The admin registers the node in Orthanc, runs `python -m node resend`: one SR arrives."""
    require_tools("Orthanc", *SENDER_TOOLS)
    pacs = Orthanc(tmp_path / "orthanc", ae_title=PACS_AE, allow_unknown=False,
                   modalities={"camera": (CAMERA, "127.0.0.1", 104)})
    try:
        pacs.start()
        cfg = interop_node_config(tmp_path / "node", untrained_model, PACS_AE, pacs.dicom_port,
                                  export={"max_attempts": 2})
        paths = write_study(generate_study("normal", seed=43), tmp_path / "study",
                            DicomLayout.MULTIFRAME)
        with Node(cfg) as node:
            _send(paths, PACS_AE, pacs.dicom_port)  # the camera is known: images stored
            _send(paths, NODE_AE, node.port)
            study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
            dead = _exported(node, study_uid, ("dead",))
            assert dead.last_error and "rejected" in dead.last_error, dead
            assert pacs.sr_instances(study_uid) == []
            pacs.restart(modalities={"camera": (CAMERA, "127.0.0.1", 104),
                                     "dscint": (NODE_AE, "127.0.0.1", node.port)})
            wait_for(lambda: queue_depth(node.db)["dead_exports"] == 3, EXPORT_SECONDS,
                     "the SR, the result image and the PDF report dead-lettered")
            _resend(cfg, tmp_path / "config.toml", 3)  # `resend` covers every object
            _exported(node, study_uid)
            srs = wait_for(lambda: pacs.sr_instances(study_uid), EXPORT_SECONDS, "the SR")
            assert len(srs) == 1 and srs[0].modality == "SR", srs
            assert srs[0].sop_instance_uid == str(dcmread(_node_sr(node, study_uid))
                                                  .SOPInstanceUID)
            check_sr(_node_sr(node, study_uid))
            wait_for(lambda: all(o.state == "done" for o in result_objects(node.db)[study_uid]),
                     EXPORT_SECONDS, "the result image and the PDF report delivered too")
        assert len(pacs.sr_instances(study_uid)) == 1
        # the camera's image, one SR, the result image, the PDF report: no duplicate
        assert len(pacs.get("/instances")) == 4
    finally:
        pacs.stop()


def _resend(cfg: Config, toml_path: Path, expected: int) -> None:
    """`python -m node resend --config` as an admin runs it, against the live node's DB."""
    toml_path.write_text(config_toml(cfg))
    done = subprocess.run([sys.executable, "-m", "node", "resend", "--config", str(toml_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"re-queued {expected} " in done.stdout, done.stdout
