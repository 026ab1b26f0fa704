"""Every PACS gets the result: the SR is offered in Comprehensive 3D SR, Comprehensive SR and
Enhanced SR and sent in the best class the PACS accepts (dciodvfy clean in each); a PACS that
accepts none dead-letters it at once with "no presentation context accepted for ..."; a
refused connection and a rejected association say so."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from model.phantom_dicom import DicomLayout, study_datasets, write_study
from model.phantoms import generate_study
from node.classify.sr import encode_sr
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.dicom.codes import SR_STORAGE_CLASSES
from node.export.scu import Destination, failure_reason, send_file, sr_uid_in_class
from node.service.health import Metrics
from node.service.node import Node
from storage.db import Export
from tests.support.interop import dciodvfy, require_tools
from tests.support.net import free_port
from tests.support.nodes import CALLER, dest, node_config, wait_study
from tests.test_sr import build

# value types Enhanced SR allows (PS3.3 A.35.2; no SCOORD3D, no by-reference relationships):
# the node's TID 1500 content must stay inside them for the re-encoding to be valid
ENHANCED_SR_VALUE_TYPES = {"TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF",
                           "PNAME", "COMPOSITE", "IMAGE", "WAVEFORM", "SCOORD", "TCOORD",
                           "CONTAINER"}


@dataclass
class LimitedPacs:
    """A pynetdicom SCP that accepts only `classes` and keeps what it receives as Part-10
    files (file meta as negotiated), like a PACS that does not know every SR class."""

    workdir: Path
    classes: tuple[str, ...]
    syntaxes: tuple[str, ...] = ()
    ae_title: str = "OLD_PACS"
    received: list[Path] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> LimitedPacs:
        ae = AE(ae_title=self.ae_title)
        for uid in self.classes:
            ae.add_supported_context(uid, list(self.syntaxes) or None)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            path = self.workdir / f"got{len(self.received)}.dcm"
            self.received.append(path)
        ds.save_as(path, enforce_file_format=True)
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def stored_sr(tmp_path: Path) -> Path:
    """An SR as the node stores it (Comprehensive 3D SR, Explicit VR Little Endian)."""
    sr, _ = build("nm")
    path = tmp_path / "stored-sr.dcm"
    path.write_bytes(encode_sr(sr))
    return path


@pytest.fixture
def limited(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LimitedPacs]:
    pacs = LimitedPacs(tmp_path / "pacs", tuple(request.param)).start()
    pacs.workdir.mkdir()
    yield pacs
    pacs.stop()


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_the_nodes_content_is_valid_in_every_offered_class(stored_sr: Path) -> None:
    """CODE, NUM, TEXT, IMAGE, UIDREF, CONTAINER only, every relationship by value: what
    Enhanced SR (the narrowest of the three) allows."""
    items = list(_content_items(dcmread(stored_sr)))
    assert items
    assert {str(i.ValueType) for i in items} <= ENHANCED_SR_VALUE_TYPES - {"SCOORD", "TCOORD"}
    assert not any("ReferencedContentItemIdentifier" in i for i in items)


@pytest.mark.parametrize("limited", [(ComprehensiveSRStorage,), (EnhancedSRStorage,)],
                         indirect=True, ids=["comprehensive", "enhanced"])
def test_a_pacs_without_comprehensive_3d_sr_gets_one_sr_of_a_class_it_accepts(
        stored_sr: Path, limited: LimitedPacs) -> None:
    require_tools("dciodvfy")
    stored = dcmread(stored_sr)
    wanted = limited.classes[0]
    outcome = send_file(stored_sr, Destination("OLD_PACS", "127.0.0.1", limited.port), "DSCINT")
    assert outcome.acknowledged, outcome
    assert outcome.sop_class_uid == wanted
    assert outcome.sop_uid == sr_uid_in_class(str(stored.SOPInstanceUID), wanted)
    got, = limited.received
    ds = dcmread(got)
    assert ds.SOPClassUID == wanted and ds.SOPInstanceUID == outcome.sop_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == outcome.sop_uid
    assert ds.ContentSequence == stored.ContentSequence  # same content, other class
    report = dciodvfy(got)
    assert not report.errors, report.output


@pytest.mark.parametrize("limited", [SR_STORAGE_CLASSES], indirect=True, ids=["all"])
def test_a_pacs_with_every_class_gets_the_stored_sr_unchanged(
        stored_sr: Path, limited: LimitedPacs) -> None:
    outcome = send_file(stored_sr, Destination("OLD_PACS", "127.0.0.1", limited.port), "DSCINT")
    assert outcome.acknowledged and outcome.sop_class_uid == Comprehensive3DSRStorage
    assert outcome.sop_uid == dcmread(stored_sr).SOPInstanceUID


@pytest.mark.parametrize("limited", [SR_STORAGE_CLASSES], indirect=True, ids=["all"])
def test_the_destination_order_overrides_the_default(stored_sr: Path,
                                                     limited: LimitedPacs) -> None:
    to = Destination("OLD_PACS", "127.0.0.1", limited.port,
                     sr_classes=(EnhancedSRStorage, ComprehensiveSRStorage))
    outcome = send_file(stored_sr, to, "DSCINT")
    assert outcome.acknowledged and outcome.sop_class_uid == EnhancedSRStorage


def test_an_implicit_vr_only_pacs_gets_the_sr_in_implicit_vr(tmp_path: Path,
                                                             stored_sr: Path) -> None:
    pacs = LimitedPacs(tmp_path, (Comprehensive3DSRStorage,), (ImplicitVRLittleEndian,)).start()
    try:
        outcome = send_file(stored_sr, Destination("OLD_PACS", "127.0.0.1", pacs.port),
                            "DSCINT")
    finally:
        pacs.stop()
    assert outcome.acknowledged and outcome.sop_uid == dcmread(stored_sr).SOPInstanceUID
    assert dcmread(pacs.received[0]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


@pytest.mark.parametrize("limited", [(BasicTextSRStorage, SecondaryCaptureImageStorage,
                                      EncapsulatedPDFStorage)], indirect=True, ids=["old"])
def test_a_pacs_with_no_usable_sr_class_fails_permanently_with_that_reason(
        stored_sr: Path, limited: LimitedPacs) -> None:
    outcome = send_file(stored_sr, Destination("OLD_PACS", "127.0.0.1", limited.port), "DSCINT")
    assert not outcome.acknowledged and outcome.permanent
    assert outcome.error.startswith("no presentation context accepted for Comprehensive 3D "
                                    "SR Storage or Comprehensive SR Storage or Enhanced SR "
                                    "Storage by OLD_PACS@127.0.0.1:"), outcome.error
    assert failure_reason(outcome.error) == "no_presentation_context"
    assert limited.received == []


def test_connection_refused_says_so(stored_sr: Path) -> None:
    outcome = send_file(stored_sr, Destination("PACS", "127.0.0.1", free_port()), "DSCINT", 5.0)
    assert not outcome.acknowledged and not outcome.permanent
    assert outcome.error.startswith("connection refused: cannot associate with PACS@"), \
        outcome.error
    assert failure_reason(outcome.error) == "connection_refused"


def test_association_rejected_gives_the_pacs_reason(stored_sr: Path) -> None:
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        outcome = send_file(stored_sr, Destination("PICKY", "127.0.0.1",
                                                   int(server.server_address[1])), "DSCINT")
    finally:
        server.shutdown()
    assert not outcome.acknowledged and outcome.permanent
    assert outcome.error.startswith("association rejected by PICKY@127.0.0.1:"), outcome.error
    assert "Calling AE title not recognised" in outcome.error, outcome.error
    assert failure_reason(outcome.error) == "association_rejected"


def _export_rows(node: Node) -> list[Export]:
    from sqlalchemy import select
    with node.db.read_session() as s:
        rows = list(s.execute(select(Export)).scalars())
        s.expunge_all()
        return rows


def test_the_node_records_which_class_the_pacs_holds(tmp_path: Path,
                                                     untrained_model: Path) -> None:
    """A PACS that takes Comprehensive SR (and images, PDF): the export row says it holds
    the SR as Comprehensive SR under its derived UID; a PACS that takes no SR class at all
    dead-letters the SR at the first attempt, naming why."""
    pacs = PacsStandIn(ae_title="TEST_PACS", accepted_classes=(
        ComprehensiveSRStorage, SecondaryCaptureImageStorage, EncapsulatedPDFStorage))
    pacs.start()
    paths = write_study(generate_study("normal", seed=8), tmp_path / "nm", DicomLayout.PER_VIEW)
    study_uid = str(study_datasets(generate_study("normal", seed=8),
                                   DicomLayout.PER_VIEW)[0].StudyInstanceUID)
    try:
        with Node(node_config(tmp_path / "node", untrained_model, pacs.port)) as node:
            assert send_paths(paths, dest(node), CALLER) == [0, 0]
            wait_study(node.db, study_uid, "delivered", state="classified", export_state="done")
            sr_row = next(r for r in _export_rows(node) if r.object_path is None)
        srs = pacs.srs
        assert len(srs) == 1 and srs[0].dataset.SOPClassUID == ComprehensiveSRStorage
        assert sr_row.delivered_sop_class_uid == ComprehensiveSRStorage
        assert sr_row.delivered_sop_uid == srs[0].dataset.SOPInstanceUID
        assert sr_row.delivered_sop_uid == sr_uid_in_class(sr_row.sr_sop_uid,
                                                           ComprehensiveSRStorage)
    finally:
        pacs.stop()
    none = PacsStandIn(ae_title="TEST_PACS", accepted_classes=(BasicTextSRStorage,))
    none.start()
    try:
        cfg = node_config(tmp_path / "node2", untrained_model, none.port,
                          export={"max_attempts": 5})
        with Node(cfg) as node:
            assert send_paths(paths, dest(node), CALLER) == [0, 0]
            row = wait_study(node.db, study_uid, "dead letter", state="classified",
                             export_state="dead")
            sr_row = next(r for r in _export_rows(node) if r.object_path is None)
        assert sr_row.attempts == 1, sr_row.attempts
        assert row.last_error is not None and \
            row.last_error.startswith("no presentation context accepted for "), row.last_error
    finally:
        none.stop()


def test_failure_reasons_are_counted_by_kind_in_metrics() -> None:
    metrics = Metrics()
    metrics.observe_export_failure(failure_reason("connection refused: cannot associate with "
                                                  "PACS@127.0.0.1:104"))
    metrics.observe_export_failure(failure_reason("C-STORE refused (permanent): status 0xA900"))
    text = metrics.text()
    assert 'dscint_export_failures_total{reason="connection_refused"} 1.0' in text
    assert 'dscint_export_failures_total{reason="failure_status"} 1.0' in text
    assert failure_reason("something new") == "other"
