"""Re-sends are idempotent, changes are amended (issue 20, item 3).

A view re-acquired after the result (patient motion) re-classifies the study once it is quiet
again and sends an amended SR: a new SOP Instance UID, the Predecessor Documents Sequence
naming the previous SR, references to the new instance. Identical re-sends change nothing; a
late view past [completion].amend_window_days is kept and counted late, never amended. Queue
tests run on SQLite and PostgreSQL (conftest `database_url`); the node and the PACS stand-in
talk over real associations.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from model.classifier import Classifier
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.classify.amend import header_time, latest_per_view, restamp
from node.classify.sr import DeviceInfo, sr_uids, versioned_uid
from node.classify.worker import WorkerContext, run_once
from node.config import ConfigError, load_config, with_overrides
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.ops.status import result_label
from node.service.node import Node
from storage.amend import current_result, requeue_amendments, result_versions
from storage.db import (
    CompletionReason,
    Database,
    Export,
    Job,
    JobState,
    Purge,
    Result,
    Study,
)
from storage.filestore import FileStore
from storage.intake import (
    InstanceInfo,
    InstanceRecord,
    StudyLimits,
    mark_complete,
    record_instance,
)
from storage.jobs import NewResult, claim_job, finish_job, release_stale_claims, store_result
from tests.support.interop import dciodvfy
from tests.support.nodes import CALLER, dest, node_config, study_row, wait_study
from tests.support.wait import wait_for

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
DEST = "PACS@127.0.0.1:104"
DEVICE = DeviceInfo("DSCINT", "0.1", "1.2.826.0.1.3680043.8.498.1", "host")
PROBS = {"normal": 0.4, "bone_metastasis": 0.3, "arthritis": 0.2, "thyroid_carcinoma": 0.1}


# --- helpers -------------------------------------------------------------------------------


def _study(seed: int = 5) -> list[Dataset]:
    """A phantom bone scan, one NM object per view: [anterior, posterior]."""
    return study_datasets(generate_study("bone_metastasis", seed=seed), DicomLayout.PER_VIEW)


def _reacquired(original: Dataset, minutes: int = 20, seed: int = 99) -> Dataset:
    """The same view acquired again later (patient moved): new series and instance, later
    acquisition time, other counts."""
    ds = copy.deepcopy(original)
    other = _study(seed)[0 if "ANT" in str(original.ImageID) else 1]
    ds.PixelData = other.PixelData
    key = [str(original.SOPInstanceUID), "re-acquired", str(minutes)]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*key, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=key)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    later = datetime.strptime(f"{ds.AcquisitionDate}{ds.AcquisitionTime}", "%Y%m%d%H%M%S") \
        + timedelta(minutes=minutes)
    ds.AcquisitionDate = ds.ContentDate = later.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = later.strftime("%H%M%S")
    return ds


def _write(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _rec(sop: str, views: tuple[str, ...], study: str = "1.2.3.4", path: str = "/x.dcm",
         applicable: bool = True) -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, study_uid=study, series_uid=f"{study}.1",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path=path, views=views,
                          n_frames=len(views), size_bytes=1, calling_ae="CAM", patient_key="p",
                          applicable=applicable)


def _stored(db: Database, files: FileStore, ds: Dataset, now: datetime,
            limits: StudyLimits | None = None) -> None:
    """What the receiver does with an accepted instance: its file, then its row."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    path = files.write_instance(study, series, sop, buf.getvalue())
    view = "anterior" if "ANT" in str(ds.ImageID) else "posterior"
    record_instance(db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path),
        views=(view,), n_frames=1, size_bytes=len(buf.getvalue()), calling_ae="CAM",
        patient_key="p"), now=now, limits=limits)


def _classified(db: Database, study: str = "1.2.3.4", now: datetime = T0) -> int:
    """A study with both views, classified with a v1 result stored at `now`; the result id."""
    record_instance(db, _rec(f"{study}.10", ("anterior",), study), now=now)
    record_instance(db, _rec(f"{study}.11", ("posterior",), study), now=now)
    assert mark_complete(db, study, CompletionReason.BOTH_VIEWS, now=now)
    job = claim_job(db, "w0", now=now)
    assert job is not None
    result_id, _ = store_result(db, NewResult(
        study_uid=study, job_id=job.job_id, model_version="v1", model_sha256="ab" * 32,
        predicted_class="normal", probabilities=PROBS, per_view={},
        sr_sop_uid=f"{study}.900", sr_series_uid=f"{study}.901", sr_path="/sr.dcm"),
        DEST, now=now)
    return result_id


def _study_flags(db: Database, study: str) -> tuple[str, bool, int]:
    with db.read_session() as s:
        row = s.get(Study, study)
        assert row is not None
        return row.state, row.amend_pending, row.late_instance_count


# --- the queue: when a study is amended ----------------------------------------------------


def test_identical_resend_of_a_classified_study_changes_nothing(db: Database) -> None:
    _classified(db)
    again = record_instance(db, _rec("1.2.3.4.10", ("anterior",)), now=T0 + timedelta(hours=1))
    assert again.duplicate and not again.late
    assert _study_flags(db, "1.2.3.4") == ("classified", False, 0)
    assert requeue_amendments(db, 1.0, now=T0 + timedelta(days=1)) == []


def test_views_after_the_result_amend_once_after_the_quiet_period(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    first = _classified(db)
    t1 = T0 + timedelta(hours=1)
    with caplog.at_level(logging.INFO, logger="storage.amend"):
        out = record_instance(db, _rec("1.2.3.4.20", ("anterior",)), now=t1)
        record_instance(db, _rec("1.2.3.4.21", ("posterior",)), now=t1 + timedelta(seconds=5))
    assert out.late and not out.duplicate and out.study_state == "classified"
    assert sum("classified again once quiet" in r.getMessage() for r in caplog.records) == 2
    assert _study_flags(db, "1.2.3.4") == ("classified", True, 2)
    # the quiet period counts from the last of them: nothing yet, then exactly one job
    assert requeue_amendments(db, 60, now=t1 + timedelta(seconds=30)) == []
    assert requeue_amendments(db, 60, now=t1 + timedelta(seconds=70)) == ["1.2.3.4"]
    assert requeue_amendments(db, 60, now=t1 + timedelta(seconds=90)) == []
    assert _study_flags(db, "1.2.3.4") == ("complete", False, 2)
    with db.read_session() as s:
        pending = s.execute(select(func.count()).select_from(Job)
                            .where(Job.state == JobState.PENDING.value)).scalar_one()
    assert pending == 1
    current = current_result(db, "1.2.3.4")
    assert current is not None and (current.result_id, current.version) == (first, 1)


def test_a_late_view_past_the_window_is_counted_late_and_not_amended(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    _classified(db)
    with caplog.at_level(logging.INFO, logger="storage.amend"):
        out = record_instance(db, _rec("1.2.3.4.20", ("anterior",)),
                              now=T0 + timedelta(days=7, minutes=1))
    assert out.late
    assert _study_flags(db, "1.2.3.4") == ("classified", False, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "not amended" in lines[0] and "1.2.3.4.20" in lines[0]
    assert requeue_amendments(db, 1.0, now=T0 + timedelta(days=30)) == []


def test_a_window_of_zero_never_amends(db: Database) -> None:
    _classified(db)
    record_instance(db, _rec("1.2.3.4.20", ("anterior",)), now=T0 + timedelta(seconds=1),
                    limits=StudyLimits(amend_window_days=0))
    assert _study_flags(db, "1.2.3.4") == ("classified", False, 1)


def test_a_purged_study_is_not_amended_on_its_new_view_alone(db: Database) -> None:
    _classified(db)
    with db.session() as s, s.begin():
        s.add(Purge(study_uid="1.2.3.4", purged_at=T0, files=2, size_bytes=2))
    record_instance(db, _rec("1.2.3.4.20", ("anterior",)), now=T0 + timedelta(hours=1))
    assert _study_flags(db, "1.2.3.4") == ("classified", False, 1)


def test_spot_views_and_failed_studies_are_not_amended(db: Database) -> None:
    _classified(db)
    record_instance(db, _rec("1.2.3.4.20", ("anterior",), applicable=False),
                    now=T0 + timedelta(hours=1))
    assert _study_flags(db, "1.2.3.4") == ("classified", False, 1)  # a spot view: late only
    record_instance(db, _rec("9.9.10", ("anterior", "posterior"), "9.9"), now=T0)
    assert mark_complete(db, "9.9", CompletionReason.BOTH_VIEWS, now=T0)
    job = claim_job(db, "w0", now=T0)
    assert job is not None
    finish_job(db, job.job_id, ok=False, error="ValueError: x", now=T0)
    record_instance(db, _rec("9.9.20", ("anterior",), "9.9"), now=T0 + timedelta(hours=1))
    assert _study_flags(db, "9.9") == ("failed", False, 1)  # no result to amend


def test_a_view_arriving_while_classifying_amends_the_coming_result(db: Database) -> None:
    record_instance(db, _rec("1.2.3.4.10", ("anterior", "posterior")), now=T0)
    assert mark_complete(db, "1.2.3.4", CompletionReason.BOTH_VIEWS, now=T0)
    job = claim_job(db, "w0", now=T0)
    assert job is not None
    record_instance(db, _rec("1.2.3.4.20", ("anterior",)), now=T0 + timedelta(seconds=1))
    assert _study_flags(db, "1.2.3.4") == ("classifying", True, 1)
    store_result(db, NewResult(
        study_uid="1.2.3.4", job_id=job.job_id, model_version="v1", model_sha256="ab" * 32,
        predicted_class="normal", probabilities=PROBS, per_view={}, sr_sop_uid="1.2.3.4.900",
        sr_series_uid="1.2.3.4.901", sr_path="/sr.dcm"), DEST, now=T0 + timedelta(seconds=2))
    assert requeue_amendments(db, 60, now=T0 + timedelta(seconds=62)) == ["1.2.3.4"]
    retried = claim_job(db, "w1", now=T0 + timedelta(seconds=63))  # the amendment's claim
    assert retried is not None
    assert _study_flags(db, "1.2.3.4") == ("classifying", False, 1)  # it reads every view


def test_the_database_refuses_a_second_result_of_one_version(db: Database) -> None:
    first = _classified(db)
    v2 = NewResult(study_uid="1.2.3.4", job_id=None, model_version="v1",
                   model_sha256="ab" * 32, predicted_class="normal", probabilities=PROBS,
                   per_view={}, sr_sop_uid="1.2.3.4.902", sr_series_uid="1.2.3.4.903",
                   sr_path="/sr2.dcm", version=2, predecessor_id=first)
    stored = store_result(db, v2, DEST, now=T0)
    assert store_result(db, v2, DEST, now=T0) == stored  # the same SR again: idempotent
    other = NewResult(**{**v2.__dict__, "sr_sop_uid": "1.2.3.4.904"})
    with pytest.raises(IntegrityError):
        store_result(db, other, DEST, now=T0)
    current = current_result(db, "1.2.3.4")
    assert current is not None and (current.version, current.sr_sop_uid) == (2, "1.2.3.4.902")
    assert result_versions(db, ["1.2.3.4", "5.5"]) == {"1.2.3.4": 2}


# --- which instance of a view is classified -------------------------------------------------


def _info(sop: str, views: tuple[str, ...], path: Path, late: bool = False) -> InstanceInfo:
    return InstanceInfo(sop_uid=sop, series_uid="1", sop_class_uid="1", path=str(path),
                        views=views, n_frames=len(views), late=late)


def test_the_latest_acquisition_of_a_view_wins_else_the_latest_arrival(tmp_path: Path) -> None:
    ant, post = _study()
    new_ant = _reacquired(ant)
    paths = {str(d.SOPInstanceUID): _write(d, tmp_path) for d in (ant, post, new_ant)}
    # the re-acquired anterior arrives before an old re-send: acquisition time decides
    order = [_info(str(new_ant.SOPInstanceUID), ("anterior",), paths[str(new_ant.SOPInstanceUID)]),
             _info(str(ant.SOPInstanceUID), ("anterior",), paths[str(ant.SOPInstanceUID)]),
             _info(str(post.SOPInstanceUID), ("posterior",), paths[str(post.SOPInstanceUID)])]
    assert latest_per_view(order) == {"anterior": str(new_ant.SOPInstanceUID),
                                      "posterior": str(post.SOPInstanceUID)}
    # without acquisition and content times, the one received last wins
    for d in (ant, new_ant):
        for kw in ("AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime"):
            del d[kw]
        _write(d, tmp_path)
    assert header_time(ant) is None
    assert latest_per_view(order)["anterior"] == str(ant.SOPInstanceUID)


def test_header_time_fallbacks() -> None:
    ds = Dataset()
    ds.ContentDate, ds.ContentTime = "20261201", "101500"
    assert header_time(ds) == datetime(2026, 12, 1, 10, 15)
    ds.AcquisitionDate, ds.AcquisitionTime = "20261201", "093000.5"
    assert header_time(ds) == datetime(2026, 12, 1, 9, 30, 0, 500000)
    ds.AcquisitionDateTime = "20261201110000"
    assert header_time(ds) == datetime(2026, 12, 1, 11)
    with pytest.warns(UserWarning):  # pydicom says so; the node must not care
        ds.AcquisitionDateTime = "not a time"
    assert header_time(ds) == datetime(2026, 12, 1, 9, 30, 0, 500000)


def test_amended_uids_are_new_and_repeatable() -> None:
    series1, sop1 = sr_uids("1.2.3", "ab" * 32)
    series2, sop2 = sr_uids("1.2.3", "ab" * 32, version=2)
    assert len({series1, series2, sop1, sop2}) == 4
    assert (series2, sop2) == sr_uids("1.2.3", "ab" * 32, version=2)
    assert versioned_uid(sop1, 1) == sop1 and len(versioned_uid(sop1, 3)) <= 64
    ds = _study()[0]
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    before = str(ds.SOPInstanceUID)
    restamp(ds, 2)
    assert str(ds.SOPInstanceUID) == versioned_uid(before, 2)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_config_window_is_validated() -> None:
    assert load_config(None).completion.amend_window_days == 7.0
    with pytest.raises(ConfigError, match="amend_window_days"):
        with_overrides(load_config(None), completion={"amend_window_days": -1})


# --- the worker: the amended result --------------------------------------------------------


def _sr_references(sr: Dataset) -> set[str]:
    found: set[str] = set()

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            for ref in item.get("ReferencedSOPSequence", []):
                found.add(str(ref.ReferencedSOPInstanceUID))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _predecessors(sr: Dataset) -> list[tuple[str, str, str, str]]:
    return [(str(st.StudyInstanceUID), str(se.SeriesInstanceUID),
             str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for st in sr.PredecessorDocumentsSequence
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]


def test_worker_amends_once_even_after_a_crash_and_a_late_finisher(
        tmp_path: Path, db: Database, untrained_model: Path) -> None:
    files = FileStore(tmp_path / "store")
    ant, post = _study()
    study = str(ant.StudyInstanceUID)
    for ds in (ant, post):
        _stored(db, files, ds, T0)
    assert mark_complete(db, study, CompletionReason.BOTH_VIEWS)
    clf = Classifier(untrained_model)
    ctx = WorkerContext(db=db, files=files, classifier=lambda: clf, device=DEVICE,
                        destination=DEST, on_result=lambda: None, result_image=True,
                        result_pdf=True)
    assert run_once(ctx, "host:NODE:w0")
    v1 = current_result(db, study)
    assert v1 is not None and v1.version == 1
    new_ant = _reacquired(ant)
    _stored(db, files, new_ant, datetime.now(UTC))
    assert requeue_amendments(db, 0.0, now=datetime.now(UTC) + timedelta(seconds=1)) == [study]
    # a worker claims the amendment and dies before storing anything; its claim is released
    assert claim_job(db, "host:NODE:w-dead") is not None
    assert release_stale_claims(db, 0, prefix="host:NODE:w-dead") == 1
    assert run_once(ctx, "host:NODE:w1")
    v2 = current_result(db, study)
    assert v2 is not None and v2.version == 2
    assert v2.sr_sop_uid == sr_uids(study, clf.metadata.weights_sha256, 2)[1]  # repeatable
    with db.read_session() as s:
        row = s.get(Result, v2.result_id)
        assert row is not None and row.predecessor_id == v1.result_id and row.job_id
        job_id = row.job_id
    # the presumed-dead worker finishes after all, with another model: nothing new stored
    late = NewResult(study_uid=study, job_id=job_id, model_version="other",
                     model_sha256="ef" * 32, predicted_class="normal", probabilities=PROBS,
                     per_view={}, sr_sop_uid=sr_uids(study, "ef" * 32, 2)[1],
                     sr_series_uid=sr_uids(study, "ef" * 32, 2)[0], sr_path="/late.dcm",
                     version=2, predecessor_id=v1.result_id)
    assert store_result(db, late, DEST)[0] == v2.result_id
    # a restart now (v2 stored, its export not yet sent): nothing is classified again
    assert release_stale_claims(db, 0, prefix="host:NODE") == 0
    assert requeue_amendments(db, 0.0, now=datetime.now(UTC) + timedelta(hours=1)) == []
    assert not run_once(ctx, "host:NODE:w2")
    with db.read_session() as s:
        versions = sorted(s.execute(select(Result.version).where(Result.study_uid == study))
                          .scalars())
        exports = s.execute(select(Export.sr_sop_uid, Export.result_id)).all()
    assert versions == [1, 2]
    v1_exports = [e for e in exports if e.result_id == v1.result_id]
    v2_exports = [e for e in exports if e.result_id == v2.result_id]
    assert len(v1_exports) == len(v2_exports) == 3  # SR, image, PDF; v1's not re-made
    assert not {e.sr_sop_uid for e in v1_exports} & {e.sr_sop_uid for e in v2_exports}
    sr = dcmread(_sr_file(db, v2.result_id))
    assert _predecessors(sr) == [(study, v1.sr_series_uid, Comprehensive3DSRStorage,
                                  v1.sr_sop_uid)]
    refs = _sr_references(sr)
    assert str(new_ant.SOPInstanceUID) in refs and str(post.SOPInstanceUID) in refs
    assert str(ant.SOPInstanceUID) not in refs  # superseded: kept, not classified
    assert sr.SeriesDescription.endswith(" v2")


def _sr_file(db: Database, result_id: int) -> str:
    with db.read_session() as s:
        row = s.get(Result, result_id)
        assert row is not None
        return row.sr_path


# --- end to end: camera -> node -> PACS ----------------------------------------------------


@pytest.fixture
def amend_node(tmp_path: Path, untrained_model: Path, pacs: PacsStandIn, database_url: str
               ) -> Iterator[Node]:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      storage={"database": database_url})
    with Node(cfg) as n:
        yield n


def _srs_of(pacs: PacsStandIn, study: str) -> list[Dataset]:
    return [r.dataset for r in pacs.by_study().get(study, [])]


def _settle(node: Node, pacs: PacsStandIn, study: str, n_srs: int) -> None:
    """Wait for `n_srs` SRs of the study, then long enough for another to be made."""
    wait_for(lambda: len(_srs_of(pacs, study)) >= n_srs or None, 60,
             f"{n_srs} SR(s) of study {study}")
    wait_study(node.db, study, "delivered", state="classified", export_state="done")
    quiet = node.cfg.completion.quiet_seconds + 3 * node.cfg.completion.sweep_seconds
    time.sleep(quiet + 1)
    wait_study(node.db, study, "still delivered", state="classified", export_state="done")


def test_a_reacquired_view_sends_exactly_one_amended_sr(
        tmp_path: Path, amend_node: Node, pacs: PacsStandIn) -> None:
    ant, post = _study(seed=7)
    study = str(ant.StudyInstanceUID)
    first = [_write(d, tmp_path / "cam") for d in (ant, post)]
    assert send_paths(first, dest(amend_node), CALLER) == [0, 0]
    _settle(amend_node, pacs, study, 1)
    # an identical re-send: Success, nothing new
    assert send_paths(first, dest(amend_node), CALLER) == [0, 0]
    _settle(amend_node, pacs, study, 1)
    (v1,) = _srs_of(pacs, study)
    row = study_row(amend_node.db, study)
    assert row is not None and row.late_instance_count == 0 and row.result_version == 1
    objects_v1 = len(pacs.objects(None))
    # the anterior view acquired again after the result
    new_ant = _reacquired(ant)
    assert send_paths([_write(new_ant, tmp_path / "cam2")], dest(amend_node), CALLER) == [0]
    _settle(amend_node, pacs, study, 2)
    srs = _srs_of(pacs, study)
    assert len(srs) == 2
    v2 = srs[1]
    assert v2.SOPInstanceUID != v1.SOPInstanceUID and v2.SeriesInstanceUID != v1.SeriesInstanceUID
    assert _predecessors(v2) == [(study, str(v1.SeriesInstanceUID), Comprehensive3DSRStorage,
                                  str(v1.SOPInstanceUID))]
    refs = _sr_references(v2)
    assert {str(new_ant.SOPInstanceUID), str(post.SOPInstanceUID)} <= refs
    assert str(ant.SOPInstanceUID) not in refs
    # the result's other objects (image, PDF) came again with UIDs of their own
    received = pacs.objects(None)
    assert len(received) == 2 * objects_v1
    assert len({str(r.dataset.SOPInstanceUID) for r in received}) == len(received)
    row = study_row(amend_node.db, study)
    assert row is not None and row.result_version == 2 and row.late_instance_count == 1
    assert result_label(row).endswith(" v2")
    if shutil.which("dciodvfy"):
        path = tmp_path / "v2.dcm"
        path.write_bytes(pacs.by_study()[study][1].raw)
        report = dciodvfy(path)
        assert not report.errors, report.output


def test_two_views_in_quick_succession_make_one_amendment(
        tmp_path: Path, amend_node: Node, pacs: PacsStandIn) -> None:
    ant, post = _study(seed=8)
    study = str(ant.StudyInstanceUID)
    assert send_paths([_write(d, tmp_path / "cam") for d in (ant, post)], dest(amend_node),
                      CALLER) == [0, 0]
    _settle(amend_node, pacs, study, 1)
    again = [_write(_reacquired(d), tmp_path / "cam2") for d in (ant, post)]
    assert send_paths(again[:1], dest(amend_node), CALLER) == [0]
    assert send_paths(again[1:], dest(amend_node), CALLER) == [0]  # a second association
    _settle(amend_node, pacs, study, 2)
    srs = _srs_of(pacs, study)
    assert len(srs) == 2  # one amendment for both views
    refs = _sr_references(srs[1])
    assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in again} <= refs
    assert not {str(ant.SOPInstanceUID), str(post.SOPInstanceUID)} & refs
