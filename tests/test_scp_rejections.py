"""Every bad-input path: a specific failure status, a reason in the log, a quarantined copy,
and the node keeps serving (C-ECHO and a good study still work afterwards)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from model.phantom_dicom import DicomLayout, study_datasets, write_study
from model.phantoms import generate_study
from node.demo.modality import echo, send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.node import Node
from tests.support.nodes import CALLER, node_config


@pytest.fixture
def served(tmp_path: Path, untrained_model: Path) -> Iterator[tuple[Node, PacsStandIn]]:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs.start()
    with Node(node_config(tmp_path / "node", untrained_model, pacs.port)) as n:
        yield n, pacs
    pacs.stop()


def _base() -> Dataset:
    """A valid single-view NM object to break in one way per test."""
    return study_datasets(generate_study("normal", seed=42), DicomLayout.PER_VIEW)[0]


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _wrong_modality(ds: Dataset) -> Dataset:
    """NM Image Storage that says it is CT: the data set does not match its class. (A
    Secondary Capture of another modality is simply not an input: ignored, see below.)"""
    ds.Modality = "CT"
    return ds


def _no_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


def _short_pixels(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def _wrong_rows(ds: Dataset) -> Dataset:
    ds.Rows = 2048
    return ds


def _colour(ds: Dataset) -> Dataset:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    return ds


def _memory_bomb(ds: Dataset) -> Dataset:
    ds.Rows = 60000
    ds.Columns = 60000
    return ds


def _undecodable_j2k(ds: Dataset) -> Dataset:
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    return ds


def _bad_study_uid(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID = "not..a.uid/../../etc"
    return ds


CASES: list[tuple[str, Callable[[Dataset], Dataset], set[int]]] = [
    ("wrong modality", _wrong_modality, {0xA900}),
    ("no pixel data", _no_pixels, set(range(0xC000, 0xD000))),
    ("short pixel data", _short_pixels, set(range(0xC000, 0xD000)) | {0xA900}),
    ("rows inconsistent", _wrong_rows, set(range(0xC000, 0xD000)) | {0xA900}),
    ("colour", _colour, set(range(0xC000, 0xD000)) | {0xA900}),
    ("memory bomb", _memory_bomb, set(range(0xC000, 0xD000)) | {0xA900}),
    ("undecodable JPEG 2000", _undecodable_j2k, {0xC210}),
    ("invalid study UID", _bad_study_uid, set(range(0xC000, 0xD000))),
]


@pytest.mark.parametrize("name, breaker, statuses", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_failure_status_log_and_quarantine(
        tmp_path: Path, served: tuple[Node, PacsStandIn], caplog: pytest.LogCaptureFixture,
        name: str, breaker: Callable[[Dataset], Dataset], statuses: set[int]) -> None:
    node, _ = served
    dest = Destination("DSCINT", "127.0.0.1", node.port)
    path = _save(breaker(_base()), tmp_path / "bad.dcm")
    with caplog.at_level(logging.WARNING, logger="node.receive.handlers"):
        status = send_paths([path], dest, CALLER)[0]
    assert status in statuses, f"{name}: got {status!r}"
    assert any("refused SOP" in r.getMessage() and f"0x{status:04X}" in r.getMessage()
               for r in caplog.records)
    quarantined = list((node.cfg.storage_root / "quarantine").glob("*.dcm"))
    assert len(quarantined) == 1
    assert echo(dest, CALLER) == 0  # still serving
    assert not list((node.cfg.storage_root / "studies").rglob("*.dcm"))  # nothing admitted


def test_truncated_file_is_refused(tmp_path: Path, served: tuple[Node, PacsStandIn]) -> None:
    node, _ = served
    good = write_study(generate_study("normal", seed=1), tmp_path / "g", DicomLayout.PER_VIEW)[0]
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 300_000])
    status = send_paths([cut], Destination("DSCINT", "127.0.0.1", node.port), CALLER)[0]
    assert status is not None and status != 0
    assert list((node.cfg.storage_root / "quarantine").glob("*.dcm"))


def test_study_uid_reused_for_another_patient(tmp_path: Path,
                                              served: tuple[Node, PacsStandIn]) -> None:
    node, _ = served
    dest = Destination("DSCINT", "127.0.0.1", node.port)
    first = _base()
    assert send_paths([_save(first, tmp_path / "a.dcm")], dest, CALLER) == [0]
    other = study_datasets(generate_study("arthritis", seed=999), DicomLayout.PER_VIEW)[1]
    other.StudyInstanceUID = first.StudyInstanceUID
    other.SOPInstanceUID = generate_uid()
    status = send_paths([_save(other, tmp_path / "b.dcm")], dest, CALLER)[0]
    assert status == 0xC001
    assert len(list((node.cfg.storage_root / "studies").rglob("*.dcm"))) == 1


def test_resent_sop_uid_for_another_patient_keeps_the_stored_file(
        tmp_path: Path, served: tuple[Node, PacsStandIn]) -> None:
    """A re-send would replace the stored file: the patient check must come before the write."""
    node, _ = served
    dest = Destination("DSCINT", "127.0.0.1", node.port)
    first = _base()
    assert send_paths([_save(first, tmp_path / "a.dcm")], dest, CALLER) == [0]
    stored, = (node.cfg.storage_root / "studies").rglob("*.dcm")
    before = stored.read_bytes()
    other = study_datasets(generate_study("arthritis", seed=998), DicomLayout.PER_VIEW)[1]
    other.StudyInstanceUID, other.SeriesInstanceUID = first.StudyInstanceUID, \
        first.SeriesInstanceUID
    other.SOPInstanceUID = first.SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert send_paths([_save(other, tmp_path / "b.dcm")], dest, CALLER) == [0xC001]
    assert stored.read_bytes() == before


def test_ct_and_a_ct_screenshot_are_answered_success_and_not_kept(
        tmp_path: Path, served: tuple[Node, PacsStandIn]) -> None:
    """A study-level route carries CT and Secondary Captures of other modalities: negotiated,
    answered Success (the route does not fail), never stored, quarantined or classified."""
    node, _ = served
    ds = _base()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "CT"
    sc = study_datasets(generate_study("normal", seed=42), DicomLayout.SECONDARY_CAPTURE)[0]
    sc.Modality = "CT"
    paths = [_save(ds, tmp_path / "ct.dcm"), _save(sc, tmp_path / "sc.dcm")]
    assert send_paths(paths, Destination("DSCINT", "127.0.0.1", node.port), CALLER) == [0, 0]
    assert not list((node.cfg.storage_root / "studies").rglob("*.dcm"))
    assert not list((node.cfg.storage_root / "quarantine").glob("*.dcm"))
    assert echo(Destination("DSCINT", "127.0.0.1", node.port), CALLER) == 0


def test_resent_instance_is_idempotent(tmp_path: Path, served: tuple[Node, PacsStandIn]) -> None:
    node, _ = served
    dest = Destination("DSCINT", "127.0.0.1", node.port)
    path = _save(_base(), tmp_path / "a.dcm")
    assert send_paths([path, path], dest, CALLER) == [0, 0]
    stored = list((node.cfg.storage_root / "studies").rglob("*.dcm"))
    assert len(stored) == 1
    assert np.array_equal(dcmread(stored[0]).pixel_array, dcmread(path).pixel_array)
