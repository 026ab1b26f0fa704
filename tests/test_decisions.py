"""The node's decisions as plain functions, with no association and no running node: the DIMSE
status table and how a peer's answer is judged, who may associate, when a study is complete
(on a real SQLite file), and the admission rules on datasets built in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom import Dataset, dcmwrite
from pydicom.uid import generate_uid

from node.config import CallerRule, ConfigError
from node.dicom.admission import (
    MAX_RESCALE,
    admission_rejection,
    charset_rejection,
    patient_conflict,
    rescale_rejection,
)
from node.dicom.codes import NM_IMAGE_STORAGE, SC_IMAGE_STORAGE
from node.dicom.status import TABLE, Kind, Status, describe, is_specific_refusal, kind_of
from node.export.scu import classify_status
from node.receive.handlers import StoreContext, _accept
from storage.db import CompletionReason, Database, Job, JobState, Study, StudyState
from storage.filestore import FileStore
from storage.intake import mark_complete, studies_due_quiet
from tests.support.dicom import ANT_CODE, POST_CODE, nm_dataset

ROWS, COLS = 16, 8  # the rules read headers: tiny pixel data is enough

# --------------------------------------------------------------------------------------------
# the status table (node.dicom.status) and how a PACS's answer is judged (node.export.scu)

WARNINGS = (Status.WARNING_COERCION, Status.WARNING_ELEMENTS_DISCARDED,
            Status.WARNING_DATASET_MISMATCH)
TRANSIENT = (0xA700, 0xA7FE, 0x0110)  # out of resources (known and unknown), processing failure
PERMANENT = (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0xC211, 0x0122, 0x0124)


def test_every_status_has_a_table_row_with_a_ps3_reference() -> None:
    assert set(TABLE) == set(Status)
    for status, info in TABLE.items():
        assert info.meaning, status
        assert info.reference.startswith(("PS3.4 ", "PS3.7 ")), (status, info.reference)
        assert isinstance(info.kind, Kind)


def test_node_specific_codes_sit_inside_cannot_understand_and_say_so() -> None:
    """0xC001-0xC210 refine PS3.4's 0xCxxx "cannot understand": marked node-specific."""
    for status, info in TABLE.items():
        if 0xC000 < status <= 0xCFFF:
            assert "node-specific" in info.reference, status
        else:
            assert "node-specific" not in info.reference, status


def test_kind_of_follows_the_table() -> None:
    for status, info in TABLE.items():
        assert kind_of(status) is info.kind, status
    assert kind_of(Status.SUCCESS) is Kind.STORED
    assert all(kind_of(w) is Kind.STORED for w in WARNINGS)
    assert kind_of(Status.OUT_OF_RESOURCES) is Kind.TRANSIENT
    assert kind_of(Status.SOP_CLASS_NOT_SUPPORTED) is Kind.PERMANENT
    assert kind_of(Status.NOT_AUTHORIZED) is Kind.PERMANENT


@pytest.mark.parametrize("status", (0x0001, 0x0107, 0x0116, 0xB001, 0xBFFF))
def test_unknown_warnings_mean_stored(status: int) -> None:
    """A PACS that answers a warning the table does not list still holds the SR: resending
    it until dead letter would be wrong."""
    assert kind_of(status) is Kind.STORED
    assert classify_status(status).acknowledged


@pytest.mark.parametrize("status", TRANSIENT)
def test_kind_of_transient(status: int) -> None:
    assert kind_of(status) is Kind.TRANSIENT


@pytest.mark.parametrize("status", PERMANENT)
def test_kind_of_permanent(status: int) -> None:
    """Codes outside the table are judged by their PS3.4 range: 0xA9xx and 0xCxxx never
    improve by retrying."""
    assert kind_of(status) is Kind.PERMANENT


def test_is_specific_refusal() -> None:
    assert not is_specific_refusal(None)  # no answer at all
    assert not is_specific_refusal(Status.SUCCESS)
    assert not any(is_specific_refusal(w) for w in WARNINGS)
    assert not is_specific_refusal(Status.OUT_OF_RESOURCES)  # out of resources, or a crash
    assert is_specific_refusal(Status.DATASET_MISMATCH)
    assert is_specific_refusal(0xA9FF) and is_specific_refusal(0xCFFF)
    # every refusal the node's own admission answers names the problem
    for status in Status:
        if status >= Status.CANNOT_UNDERSTAND:
            assert is_specific_refusal(status), status


def test_describe() -> None:
    assert describe(0xA700) == "0xA700 (Refused: out of resources, PS3.4 Table B.2-1)"
    assert describe(Status.PATIENT_CONFLICT).startswith(
        "0xC001 (Error: study UID already used for another patient, PS3.4 Table B.2-1")
    assert describe(0xA7FE) == "0xA7FE"  # not in the table: the code alone
    assert describe(0x0000) == "0x0000 (Success, PS3.4 Table B.2-1)"


@pytest.mark.parametrize("status", [0x0000, *WARNINGS])
def test_classify_status_stored(status: int) -> None:
    outcome = classify_status(status)
    assert outcome.acknowledged and not outcome.permanent and outcome.error == ""
    assert outcome.status == status


@pytest.mark.parametrize("status", TRANSIENT)
def test_classify_status_transient(status: int) -> None:
    outcome = classify_status(status)
    assert not outcome.acknowledged and not outcome.permanent
    assert outcome.error == f"C-STORE failed (transient): status 0x{status:04X}"


@pytest.mark.parametrize("status", PERMANENT)
def test_classify_status_permanent(status: int) -> None:
    outcome = classify_status(status)
    assert not outcome.acknowledged and outcome.permanent
    assert outcome.error == f"C-STORE refused (permanent): status 0x{status:04X}"


@given(st.integers(0, 0xFFFF))
def test_the_scu_and_the_table_never_disagree(status: int) -> None:
    outcome = classify_status(status)
    kind = kind_of(status)
    assert outcome.acknowledged == (kind is Kind.STORED)
    assert outcome.permanent == (kind is Kind.PERMANENT)
    if is_specific_refusal(status):  # a refusal that names the problem is never retried
        assert kind is Kind.PERMANENT and not outcome.acknowledged


# --------------------------------------------------------------------------------------------
# who may associate (node.config.CallerRule)


def test_caller_rule_without_host_allows_the_title_from_anywhere() -> None:
    rule = CallerRule("CAM1")
    assert rule.allows("CAM1", "10.0.0.5") and rule.allows("CAM1", "127.0.0.1")
    assert rule.allows("CAM1  ", "10.0.0.5")  # AE titles arrive space-padded to 16
    assert rule.allows("  CAM1", "10.0.0.5")  # leading spaces are not significant either
    assert not rule.allows("CAM2", "10.0.0.5")
    assert not rule.allows("cam1", "10.0.0.5")  # AE titles are case-sensitive
    assert not rule.allows("", "10.0.0.5")


def test_caller_rule_pinned_to_a_host() -> None:
    rule = CallerRule("CAM1", "10.0.0.5")
    assert rule.allows("CAM1", "10.0.0.5")
    assert not rule.allows("CAM1", "10.0.0.6")
    assert not rule.allows("CAM2", "10.0.0.5")


@pytest.mark.parametrize("text, ae, host", [
    ("CAM1", "CAM1", None),
    ("CAM1@10.0.0.5", "CAM1", "10.0.0.5"),
    (" CAM1 @ 10.0.0.5 ", "CAM1", "10.0.0.5"),
    ("CAM1@", "CAM1", None),
    ("A" * 16, "A" * 16, None),
])
def test_caller_rule_parse(text: str, ae: str, host: str | None) -> None:
    assert CallerRule.parse(text) == CallerRule(ae, host)


@pytest.mark.parametrize("text", ["", "@10.0.0.5", "   ", "A" * 17])
def test_caller_rule_parse_refuses_invalid_titles(text: str) -> None:
    with pytest.raises(ConfigError, match=r"\[node\].allowed_callers"):
        CallerRule.parse(text)


# --------------------------------------------------------------------------------------------
# when a study is complete: the C-STORE handler's rule (node.receive.handlers._accept) and
# the transition it asks for (storage.intake.mark_complete), on a real SQLite file


@dataclass
class Intake:
    """The handler's context on a SQLite file and a file store under tmp_path."""

    ctx: StoreContext
    completed: list[str] = field(default_factory=list)

    @property
    def db(self) -> Database:
        return self.ctx.db

    def accept(self, ds: Dataset) -> int:
        """What the handler does with an instance that passed admission."""
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        return int(_accept(self.ctx, ds, buf.getvalue(), "TEST_CAMERA"))

    def study(self, uid: str) -> Study:
        with self.db.read_session() as s:
            row = s.get(Study, uid)
            assert row is not None
            return row

    def jobs(self, uid: str) -> list[Job]:
        with self.db.read_session() as s:
            return list(s.query(Job).filter(Job.study_uid == uid))


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    db = Database(f"sqlite:///{tmp_path / 'dscint.db'}")
    db.create_all()
    completed: list[str] = []
    ctx = StoreContext(files=FileStore(tmp_path / "store"), db=db, patient_secret=b"test",
                       on_complete=completed.append, decode_on_admission=False)
    yield Intake(ctx, completed)
    db.dispose()


def _view(code: Dataset | None, study_uid: str, patient_id: str = "PID-1") -> Dataset:
    """A single-frame NM object of one view (None: the header names no view)."""
    ds = nm_dataset(1, None, None if code is None else [code], rows=ROWS, cols=COLS)
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id
    return ds


def test_one_view_leaves_the_study_receiving(intake: Intake) -> None:
    uid = generate_uid()
    assert intake.accept(_view(ANT_CODE, uid)) == Status.SUCCESS
    study = intake.study(uid)
    assert study.state == StudyState.RECEIVING and study.has_anterior and not study.has_posterior
    assert intake.completed == [] and intake.jobs(uid) == []


def test_the_other_view_completes_the_study_with_one_job(intake: Intake) -> None:
    uid = generate_uid()
    intake.accept(_view(ANT_CODE, uid))
    posterior = _view(POST_CODE, uid)
    assert intake.accept(posterior) == Status.SUCCESS
    study = intake.study(uid)
    assert study.state == StudyState.COMPLETE
    assert study.completion_reason == CompletionReason.BOTH_VIEWS
    assert study.completed_at is not None
    assert intake.completed == [uid]
    assert [j.state for j in intake.jobs(uid)] == [JobState.PENDING]
    # the same posterior again, and a third view-less instance: no second completion
    assert intake.accept(posterior) == Status.SUCCESS
    assert intake.accept(_view(None, uid)) == Status.SUCCESS
    assert intake.completed == [uid] and len(intake.jobs(uid)) == 1
    assert intake.study(uid).instance_count == 3


def test_both_views_in_one_object_complete_at_once(intake: Intake) -> None:
    ds = nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], rows=ROWS, cols=COLS)
    assert intake.accept(ds) == Status.SUCCESS
    assert intake.completed == [str(ds.StudyInstanceUID)]


def test_two_anterior_objects_are_not_complete(intake: Intake) -> None:
    uid = generate_uid()
    intake.accept(_view(ANT_CODE, uid))
    intake.accept(_view(ANT_CODE, uid))
    assert intake.study(uid).state == StudyState.RECEIVING and intake.completed == []


def test_views_unknown_wait_for_the_quiet_sweep(intake: Intake) -> None:
    uid = generate_uid()
    intake.accept(_view(None, uid))
    assert intake.completed == [] and intake.study(uid).state == StudyState.RECEIVING
    later = datetime.now(UTC) + timedelta(seconds=61)
    assert studies_due_quiet(intake.db, 60.0, now=later) == [uid]
    assert studies_due_quiet(intake.db, 120.0, now=later) == []  # not quiet long enough
    assert mark_complete(intake.db, uid, CompletionReason.QUIET)
    assert intake.study(uid).completion_reason == CompletionReason.QUIET
    assert studies_due_quiet(intake.db, 60.0, now=later) == []  # only receiving studies


def test_another_patient_in_the_same_study_is_refused(intake: Intake) -> None:
    """A re-sent SOP whose file exists is checked before its file is replaced; a new SOP is
    refused under the row lock. Either way: 0xC001 and a quarantined copy."""
    uid = generate_uid()
    first = _view(ANT_CODE, uid)
    intake.accept(first)
    other = _view(POST_CODE, uid, patient_id="PID-2")
    assert intake.accept(other) == Status.PATIENT_CONFLICT
    resent = _view(ANT_CODE, uid, patient_id="PID-2")
    resent.SeriesInstanceUID, resent.SOPInstanceUID = first.SeriesInstanceUID, \
        first.SOPInstanceUID
    assert intake.accept(resent) == Status.PATIENT_CONFLICT
    assert intake.completed == [] and intake.study(uid).instance_count == 1
    assert len(list(intake.ctx.files.quarantine_dir.glob("*.dcm"))) == 2


def test_mark_complete_happens_once(intake: Intake) -> None:
    uid = generate_uid()
    assert not mark_complete(intake.db, uid, CompletionReason.BOTH_VIEWS)  # no such study
    intake.accept(_view(None, uid))
    assert mark_complete(intake.db, uid, CompletionReason.BOTH_VIEWS)
    # the quiet sweep racing the handler, or a second call: no second job
    assert not mark_complete(intake.db, uid, CompletionReason.QUIET)
    assert not mark_complete(intake.db, uid, CompletionReason.BOTH_VIEWS)
    assert intake.study(uid).completion_reason == CompletionReason.BOTH_VIEWS
    assert len(intake.jobs(uid)) == 1


# --------------------------------------------------------------------------------------------
# admission (node.dicom.admission)


def _valid() -> Dataset:
    return nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], rows=ROWS, cols=COLS)


def _admit(ds: Dataset, sop_class: str = NM_IMAGE_STORAGE, sop_uid: str | None = None
           ) -> Status | None:
    rejection = admission_rejection(ds, sop_class, sop_uid or str(ds.SOPInstanceUID))
    return None if rejection is None else rejection.status


def test_a_valid_object_is_admitted() -> None:
    assert _admit(_valid()) is None
    sc = nm_dataset(1, sop_class=SC_IMAGE_STORAGE, rows=ROWS, cols=COLS)
    assert _admit(sc, SC_IMAGE_STORAGE) is None


def test_the_request_and_the_dataset_must_agree() -> None:
    ds = _valid()
    rejection = admission_rejection(ds, NM_IMAGE_STORAGE, generate_uid())
    assert rejection is not None and rejection.status == Status.DATASET_MISMATCH
    assert "differs from the C-STORE request's" in rejection.reason
    assert _admit(ds, SC_IMAGE_STORAGE) == Status.DATASET_MISMATCH


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


INVALID_VALUE_WARNING = "ignore:Invalid value for VR:UserWarning"  # pydicom, on purpose here


@pytest.mark.filterwarnings(INVALID_VALUE_WARNING)
@pytest.mark.parametrize("breaker, status", [
    (_set("Modality", "CT"), Status.DATASET_MISMATCH),
    (_set("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), Status.DATASET_MISMATCH),
    (_set("StudyInstanceUID", "not-a-uid"), Status.BAD_UID),
    (_set("RescaleSlope", 1e21), Status.BAD_PIXEL_MODULE),
    (_set("SpecificCharacterSet", "ISO_IR 999"), Status.CANNOT_UNDERSTAND),
    (_set("Rows", 17), Status.BAD_PIXEL_MODULE),
], ids=["modality", "sop-class", "study-uid", "rescale", "charset", "rows"])
def test_each_rule_answers_a_specific_refusal(breaker: Callable[[Dataset], None],
                                              status: Status) -> None:
    ds = _valid()
    breaker(ds)
    assert _admit(ds) == status
    assert is_specific_refusal(status) and kind_of(status) is Kind.PERMANENT


def test_header_rules_come_before_rescale_and_charset() -> None:
    ds = _valid()
    ds.Modality = "CT"
    ds.RescaleSlope = 1e21
    ds.SpecificCharacterSet = "ISO_IR 999"
    assert _admit(ds) == Status.DATASET_MISMATCH
    ds.Modality = "NM"
    assert _admit(ds) == Status.BAD_PIXEL_MODULE  # rescale before the character set
    del ds.RescaleSlope
    assert _admit(ds) == Status.CANNOT_UNDERSTAND


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
@pytest.mark.parametrize("value, refused", [
    (1e21, True), (-1e21, True), (MAX_RESCALE, False), (-MAX_RESCALE, False), (0, False),
    (1.5, False), (-1000, False),
])
def test_rescale_rejection(keyword: str, value: float, refused: bool) -> None:
    ds = _valid()
    setattr(ds, keyword, value)
    rejection = rescale_rejection(ds)
    if not refused:
        assert rejection is None
        return
    assert rejection is not None and rejection.status == Status.BAD_PIXEL_MODULE
    assert rejection.reason == f"{keyword} is out of range (|value| > 1e20)"


def test_rescale_rejection_leaves_absent_and_non_numbers_to_the_header_rules() -> None:
    ds = _valid()
    assert rescale_rejection(ds) is None
    ds.add_new("RescaleSlope", "LO", "abc")
    assert rescale_rejection(ds) is None


@pytest.mark.parametrize("value", [
    None, "", "ISO_IR 100", " ISO_IR 192 ", ["", "ISO 2022 IR 87"],
    ["ISO 2022 IR 6", "ISO 2022 IR 149"], "GB18030",
])
def test_charset_rejection_admits_defined_terms(value: str | list[str] | None) -> None:
    ds = _valid()
    if value is not None:
        ds.SpecificCharacterSet = value
    assert charset_rejection(ds) is None


@pytest.mark.filterwarnings(INVALID_VALUE_WARNING)
@pytest.mark.parametrize("value, unknown", [
    ("ISO_IR 999", 1), ("iso_ir 100", 1), (["ISO 2022 IR 6", "KLINGON"], 1),
    (["UTF-8", "LATIN1"], 2),
])
def test_charset_rejection_refuses_undefined_terms_without_echoing_them(
        value: str | list[str], unknown: int) -> None:
    ds = _valid()
    ds.SpecificCharacterSet = value
    rejection = charset_rejection(ds)
    assert rejection is not None and rejection.status == Status.CANNOT_UNDERSTAND
    assert f"{unknown} term(s) DICOM does not define" in rejection.reason
    for term in [value] if isinstance(value, str) else value:
        assert term not in rejection.reason


def test_patient_conflict_names_the_study() -> None:
    uid = generate_uid()
    rejection = patient_conflict(uid)
    assert rejection.status == Status.PATIENT_CONFLICT
    assert uid in rejection.reason and "another patient" in rejection.reason
    assert is_specific_refusal(rejection.status)
