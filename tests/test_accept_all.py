"""A whole study routed by PACS: every storage class is negotiated; what is not an input (CT,
KOS, presentation states, SR, a screenshot SC) and the node's own results coming back are
answered Success and ignored (no file, no study, no job), counted per SOP class, and each
association writes one summary line; a site's refuse list answers 0x0122 instead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)
from pynetdicom.events import Event
from sqlalchemy import func, select

from model.phantom_dicom import DicomLayout, study_datasets, write_study
from model.phantoms import generate_study
from node.config import ConfigError, load_config, with_overrides
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.receive.association import Tallies, handle_closed
from node.receive.listener import PeerLog
from node.service.health import health_report, metrics_text, summary_line
from node.service.node import Node
from storage.db import Database, Instance, Job, Result, Study
from storage.intake import count_ignored, ignored_totals
from tests.support.nodes import CALLER, dest, node_config, wait_study
from tests.support.wait import wait_for

ASSOCIATION_LOGGER = "node.receive.association"


@pytest.fixture
def pacs_standin() -> Iterator[PacsStandIn]:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs.start()
    yield pacs
    pacs.stop()


def _non_input(sop_class: str, modality: str, study_uid: str, folder: Path,
               name: str) -> Path:
    """A small object of another kind in the study (headers only: nothing reads more)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = UID(sop_class), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID, ds.Manufacturer = modality, "P1", "OTHER VENDOR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _screenshot(study_uid: str, folder: Path) -> Path:
    """A Secondary Capture of another modality (a dose report, say): not a bone scan."""
    sc = study_datasets(generate_study("normal", seed=7), DicomLayout.SECONDARY_CAPTURE)[0]
    sc.StudyInstanceUID, sc.Modality = study_uid, "OT"
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "screenshot.dcm"
    sc.save_as(path, enforce_file_format=True)
    return path


def _others(study_uid: str, folder: Path) -> list[Path]:
    return [_non_input(CTImageStorage, "CT", study_uid, folder, "ct"),
            _non_input(KeyObjectSelectionDocumentStorage, "KO", study_uid, folder, "kos"),
            _non_input(GrayscaleSoftcopyPresentationStateStorage, "PR", study_uid, folder, "pr"),
            _non_input(BasicTextSRStorage, "SR", study_uid, folder, "sr"),
            _screenshot(study_uid, folder)]


def _count(node: Node, table: type) -> int:
    with node.db.read_session() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def _totals(node: Node) -> dict[tuple[str, str], int]:
    return {(t.sop_class_uid, t.kind): t.count for t in ignored_totals(node.db)}


def _summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == ASSOCIATION_LOGGER and "association from AE" in r.getMessage()]


def test_non_inputs_answered_success_ignored_and_counted(
        tmp_path: Path, untrained_model: Path, pacs_standin: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    paths = _others("1.2.826.0.1.3680043.8.498.77", tmp_path / "others")
    with Node(node_config(tmp_path / "node", untrained_model, pacs_standin.port)) as node, \
            caplog.at_level(logging.INFO, logger=ASSOCIATION_LOGGER):
        assert send_paths(paths, dest(node), CALLER) == [0] * len(paths)
        totals = wait_for(lambda: _totals(node) or None, 10, "the ignored counts")
        assert not list((node.cfg.storage_root / "studies").rglob("*.dcm"))
        assert _count(node, Study) == _count(node, Instance) == _count(node, Job) == 0
        assert not list((node.cfg.storage_root / "quarantine").glob("*.dcm"))
        report = health_report(node.db, node.cfg, None, model_expected=False)
    assert report["work"]["ignored_instances"] == {"not_input": 5}
    assert report["work"]["ignored_by_sop_class"]["CTImageStorage"] == {"not_input": 1}
    assert 'dscint_ignored_instances{kind="not_input",sop_class="CTImageStorage"} 1' in \
        metrics_text(report)
    assert "ignored 5 instance(s) that are not inputs" in summary_line(report)
    assert totals == {(CTImageStorage, "not_input"): 1,
                      (KeyObjectSelectionDocumentStorage, "not_input"): 1,
                      (GrayscaleSoftcopyPresentationStateStorage, "not_input"): 1,
                      (BasicTextSRStorage, "not_input"): 1,
                      ("1.2.840.10008.5.1.4.1.1.7", "not_input"): 1}
    lines = _summaries(caplog)
    assert len(lines) == 1, lines
    assert "ignored (not an input) 5: " in lines[0] and "CTImageStorage 1" in lines[0]


def test_one_summary_line_per_association_not_one_per_instance(
        tmp_path: Path, untrained_model: Path, pacs_standin: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    """30 CT images and a whole-body NM study in one association: one line sums it up."""
    nm = write_study(generate_study("normal", seed=3), tmp_path / "nm", DicomLayout.PER_VIEW)
    study_uid = str(study_datasets(generate_study("normal", seed=3),
                                   DicomLayout.PER_VIEW)[0].StudyInstanceUID)
    cts = [_non_input(CTImageStorage, "CT", study_uid, tmp_path / "ct", f"ct{i}")
           for i in range(30)]
    with Node(node_config(tmp_path / "node", untrained_model, pacs_standin.port)) as node, \
            caplog.at_level(logging.INFO, logger=ASSOCIATION_LOGGER):
        assert send_paths([*nm, *cts], dest(node), CALLER) == [0] * 32
        wait_for(lambda: _totals(node) or None, 10, "the ignored counts")
        wait_study(node.db, study_uid, "classified", state="classified")
    lines = _summaries(caplog)
    assert len(lines) == 1, lines
    assert "stored 2: NuclearMedicineImageStorage 2" in lines[0], lines[0]
    assert "ignored (not an input) 30: CTImageStorage 30" in lines[0], lines[0]


def test_refuse_list_answers_sop_class_not_supported(
        tmp_path: Path, untrained_model: Path, pacs_standin: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    paths = _others("1.2.826.0.1.3680043.8.498.78", tmp_path / "others")[:2]  # CT, KOS
    cfg = node_config(tmp_path / "node", untrained_model, pacs_standin.port,
                      admission={"refuse_sop_classes": ["CTImageStorage"]})
    with Node(cfg) as node, caplog.at_level(logging.INFO, logger=ASSOCIATION_LOGGER):
        assert send_paths(paths, dest(node), CALLER) == [0x0122, 0]
        totals = wait_for(lambda: _totals(node) or None, 10, "the counts")
    assert totals == {(CTImageStorage, "refused_by_site"): 1,
                      (KeyObjectSelectionDocumentStorage, "not_input"): 1}
    line, = _summaries(caplog)
    assert "refused ([admission].refuse_sop_classes) 1: CTImageStorage 1" in line
    assert any(r.levelno == logging.WARNING for r in caplog.records
               if r.name == ASSOCIATION_LOGGER)


def test_the_nodes_own_objects_routed_back_create_nothing(
        tmp_path: Path, untrained_model: Path, pacs_standin: PacsStandIn) -> None:
    """PACS routes the study back with the node's SR (and result image, PDF) twice: no new
    job, result, study file or instance; each own object counted as such."""
    nm = write_study(generate_study("arthritis", seed=5), tmp_path / "nm", DicomLayout.PER_VIEW)
    study_uid = str(study_datasets(generate_study("arthritis", seed=5),
                                   DicomLayout.PER_VIEW)[0].StudyInstanceUID)
    with Node(node_config(tmp_path / "node", untrained_model, pacs_standin.port)) as node:
        assert send_paths(nm, dest(node), CALLER) == [0, 0]
        wait_study(node.db, study_uid, "delivered", state="classified", export_state="done")
        own = wait_for(lambda: [r for r in pacs_standin.received if
                                str(r.dataset.StudyInstanceUID) == study_uid] or None, 30,
                       "the node's objects at PACS")
        files = []
        for i, r in enumerate(own):
            files.append(tmp_path / f"own{i}.dcm")
            files[-1].write_bytes(r.raw if r.raw[128:132] == b"DICM" else b"")
            if not files[-1].stat().st_size:
                r.dataset.save_as(files[-1], enforce_file_format=True)
        before = (_count(node, Job), _count(node, Result), _count(node, Instance),
                  sorted((node.cfg.storage_root / "studies").rglob("*.dcm")))
        for _ in range(2):
            assert send_paths([*nm, *files], dest(node), CALLER) == [0] * (2 + len(files))
        want = {(str(r.dataset.SOPClassUID), "own_object") for r in own}
        totals = wait_for(lambda: _totals(node) if set(_totals(node)) >= want
                          and sum(_totals(node).values()) >= 2 * len(files) else None,
                          10, "the own-object counts")
        after = (_count(node, Job), _count(node, Result), _count(node, Instance),
                 sorted((node.cfg.storage_root / "studies").rglob("*.dcm")))
    assert after == before
    assert sum(totals.values()) == 2 * len(files)
    assert all(kind == "own_object" for _, kind in totals)


def test_an_unreadable_non_input_is_still_answered_success(
        tmp_path: Path, untrained_model: Path, pacs_standin: PacsStandIn) -> None:
    """A CT object whose body is garbage: its header cannot be read, it is not an input
    either way: Success, nothing kept, counted."""
    path = _non_input(CTImageStorage, "CT", "1.2.826.0.1.3680043.8.498.79", tmp_path, "ct")
    data = path.read_bytes()
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[:-20] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 12)
    with Node(node_config(tmp_path / "node", untrained_model, pacs_standin.port)) as node:
        assert send_paths([garbage], dest(node), CALLER) == [0]
        totals = wait_for(lambda: _totals(node) or None, 10, "the counts")
        assert _count(node, Study) == 0
    assert totals == {(CTImageStorage, "not_input"): 1}


def test_a_failing_recorder_does_not_disturb_the_association_end(
        caplog: pytest.LogCaptureFixture) -> None:
    """The close handler logs the summary even when recording the counts fails."""
    def broken(_counts: object, _ae: str) -> None:
        raise RuntimeError("database gone")

    assoc = SimpleNamespace(is_rejected=False, rejected_contexts=[], accepted_contexts=[],
                            requestor=SimpleNamespace(ae_title="CAM", address="127.0.0.1"))
    tallies = Tallies(broken)
    tallies.count(assoc, "not_input", CTImageStorage)
    event = cast(Event, SimpleNamespace(assoc=assoc))
    with caplog.at_level(logging.INFO, logger=ASSOCIATION_LOGGER):
        handle_closed(event, tallies, PeerLog())  # must not raise
    messages = [r.getMessage() for r in caplog.records]
    assert any("ignored (not an input) 1: CTImageStorage 1" in m for m in messages)
    assert any("could not summarise" in m for m in messages)


def test_ignored_counts_add_up_per_class_and_kind(database_url: str) -> None:
    """One transaction per association adds its counts (SQLite and PostgreSQL)."""
    db = Database(database_url)
    db.create_all()
    try:
        count_ignored(db, {(CTImageStorage, "not_input"): 120,
                           (BasicTextSRStorage, "own_object"): 1}, "ORTHANC")
        count_ignored(db, {(CTImageStorage, "not_input"): 3,
                           (CTImageStorage, "refused_by_site"): 0}, "ROUTER")
        got = {(t.sop_class_uid, t.kind): (t.count, t.last_calling_ae)
               for t in ignored_totals(db)}
    finally:
        db.dispose()
    assert got == {(CTImageStorage, "not_input"): (123, "ROUTER"),
                   (BasicTextSRStorage, "own_object"): (1, "ORTHANC")}


@pytest.mark.parametrize(("section", "values"), [
    ({"admission": {"refuse_sop_classes": ["NuclearMedicineImageStorage"]}}, "refuse_sop"),
    ({"admission": {"refuse_sop_classes": ["1.2.3.4"]}}, "refuse_sop"),
    ({"admission": {"refuse_sop_classes": ["NoSuchStorage"]}}, "refuse_sop"),
    ({"pacs": {"sr_classes": ["BasicTextSRStorage"]}}, "sr_classes"),
    ({"pacs": {"sr_classes": ["EnhancedSRStorage", "1.2.840.10008.5.1.4.1.1.88.22"]}},
     "sr_classes"),
], ids=["an input", "not a storage class", "unknown keyword", "sr class that cannot carry it",
        "twice"])
def test_sop_class_lists_are_validated(section: dict[str, dict[str, object]],
                                       values: str) -> None:
    with pytest.raises(ConfigError, match=values):
        with_overrides(load_config(None), **section)


def test_sop_class_lists_take_keywords_or_uids() -> None:
    cfg = with_overrides(load_config(None),
                         admission={"refuse_sop_classes": ["CTImageStorage",
                                                           "1.2.840.10008.5.1.4.1.1.88.59"]},
                         pacs={"sr_classes": ["ComprehensiveSRStorage"]})
    assert cfg.admission.refused_sop_class_uids == {CTImageStorage,
                                                    KeyObjectSelectionDocumentStorage}
    assert cfg.pacs.sr_class_uids == ("1.2.840.10008.5.1.4.1.1.88.33",)
    assert load_config(None).pacs.sr_class_uids[0] == "1.2.840.10008.5.1.4.1.1.88.34"
