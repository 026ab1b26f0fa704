"""The SR goes out before the result image and the PDF are built: it references the image by
its deterministic UID, so it need not wait for the evidence map. The image and PDF are an
``objects`` job of their own, committed with the SR: a worker killed after the SR leaves it to
the next one, which builds them once. Real queue (SQLite and PostgreSQL), real model, real
associations to a PACS stand-in, a real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from model.classifier import Classifier, StudyClassification
from node.classify import worker
from node.classify.amend import amendment, restamp
from node.classify.result_image import ShownView, build_result_image, image_reference
from node.classify.sr import Classification, DeviceInfo, ModelInfo, build_sr, encode_sr
from node.classify.worker import (
    WorkerContext,
    after_failure,
    classify,
    classify_instances,
    run_once,
)
from node.config import load_config, with_overrides
from node.demo.pacs_standin import PacsStandIn
from node.export.delivery import ExportContext, deliver
from node.export.scu import Destination
from node.service.health import health_report
from node.service.node import Node
from storage.amend import ResultVersion, current_result, requeue_amendments
from storage.db import CompletionReason, Database, Export, ExportState, Job, JobState, Result
from storage.exports import ClaimedExport, claim_export
from storage.filestore import FileStore
from storage.intake import mark_complete
from storage.jobs import OBJECTS, claim_job, release_stale_claims, store_objects
from storage.objects import result_objects
from storage.reports import study_summaries
from tests.support.nodes import node_config
from tests.support.recorded import record_complete_study
from tests.test_amend import T0
from tests.test_amend import _reacquired as reacquired
from tests.test_amend import _stored as stored
from tests.test_amend import _study as amend_study

DEVICE = DeviceInfo("DSCINT", "0.1", "1.2.826.0.1.3680043.8.498.1", "host")
DEST = "PACS@127.0.0.1:104"
NOW = datetime(2026, 12, 2, 9, 0, 0)
PREFIX = "host:NODE"


@pytest.fixture
def files(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture
def clf(untrained_model: Path) -> Classifier:
    return Classifier(untrained_model)




def _ctx(db: Database, files: FileStore, clf: Classifier) -> WorkerContext:
    return WorkerContext(db=db, files=files, classifier=lambda: clf, device=DEVICE,
                         destination=DEST, on_result=lambda: None, result_image=True,
                         result_pdf=True)


def _jobs(db: Database, kind: str) -> list[tuple[str, str]]:
    with db.read_session() as s:
        return [(uid, state) for uid, state in s.execute(
            select(Job.study_uid, Job.state).where(Job.kind == kind).order_by(Job.id))]


def _exports(db: Database) -> list[tuple[str, str, bool]]:
    """(study, SOP Instance UID, is the SR) of every export row, in creation order."""
    with db.read_session() as s:
        return [(uid, sop, path is None) for uid, sop, path in s.execute(
            select(Export.study_uid, Export.sr_sop_uid, Export.object_path)
            .order_by(Export.id))]


def _illustration(sr: Dataset) -> tuple[str, str] | None:
    """(class, instance) the SR names as its best illustration of the finding."""
    for group in sr.ContentSequence[-1].ContentSequence:
        for item in group.get("ContentSequence", []):
            if item.ConceptNameCodeSequence[0].CodeValue == "121080":
                ref = item.ReferencedSOPSequence[0]
                return str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID)
    return None


# --- the SR, byte for byte -----------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_the_sr_naming_the_image_to_come_is_the_sr_naming_the_built_image(
        tmp_path: Path, files: FileStore, clf: Classifier, version: int) -> None:
    """The same inputs give the same SR bytes whether the SR names the built image (as it did
    before the image moved after it) or only its deterministic UIDs; an amended result's (v2,
    Predecessor Documents) too."""
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create_all()
    study_uid = record_complete_study(db, files, seed=31)
    study = StudyClassification(clf)
    headers, frames = classify_instances(db, study_uid, study)
    pred = study.result()
    m = clf.metadata
    info = ModelInfo(m.name, m.version, m.weights_sha256, m.training_data,
                     m.trained_on_phantoms)
    result = Classification("indeterminate", pred.probabilities,
                            {v.label: v.probabilities for v in pred.views}, threshold=0.55)
    ant, post = _pixels(files, study_uid)
    views = [ShownView("ANT", ant, None), ShownView("POST", post, None)]
    image = restamp(build_result_image(headers[0], views, result, info, DEVICE, NOW), version)
    prior = None if version == 1 else amendment(ResultVersion(
        result_id=1, study_uid=study_uid, version=version - 1, sr_series_uid="2.25.1",
        sr_sop_uid="2.25.2"))
    reference = image_reference(study_uid, info.sha256, version)
    with_image = build_sr(headers, frames, result, info, DEVICE, NOW, illustration=image,
                          amends=prior)
    with_reference = build_sr(headers, frames, result, info, DEVICE, NOW,
                              illustration=reference, amends=prior)
    assert encode_sr(with_reference) == encode_sr(with_image)
    assert _illustration(with_reference) == (str(SecondaryCaptureImageStorage),
                                             str(image.SOPInstanceUID))
    without = build_sr(headers, frames, result, info, DEVICE, NOW, amends=prior)
    assert _illustration(without) is None and encode_sr(without) != encode_sr(with_image)
    db.dispose()


def _pixels(files: FileStore, study_uid: str) -> list[np.ndarray]:
    """The stored study's two frames (anterior, posterior)."""
    (path,) = (files.studies / study_uid).rglob("*.dcm")
    return list(dcmread(path).pixel_array)


# --- the SR first, the pictures after ------------------------------------------------------


def test_waiting_studies_get_their_srs_to_pacs_before_any_image_is_built(
        database_url: str, files: FileStore, clf: Classifier, pacs: PacsStandIn) -> None:
    db = Database(database_url)
    db.create_all()
    studies = [record_complete_study(db, files, seed=40 + i, label=label)
               for i, label in enumerate(("normal", "arthritis", "bone_metastasis"))]
    ctx = _ctx(db, files, clf)
    # each call classifies one study; another waits, so no objects are built yet
    assert run_once(ctx, f"{PREFIX}:w0") and run_once(ctx, f"{PREFIX}:w0")
    assert _jobs(db, OBJECTS) == [(studies[0], "pending"), (studies[1], "pending")]
    assert [e[2] for e in _exports(db)] == [True, True]  # two SRs, nothing else queued
    exporter = ExportContext(db, Destination("TEST_PACS", "127.0.0.1", pacs.port), "DSCINT",
                             load_config(None).export)
    first = claim_export(db, "x0")
    assert first is not None and first.is_sr and first.study_uid == studies[0]
    assert deliver(exporter, first).acknowledged
    assert [str(r.dataset.StudyInstanceUID) for r in pacs.received] == [studies[0]]
    (sr_row,) = result_objects(db)[studies[0]]  # acknowledged, its image not built yet
    assert sr_row.is_sr and sr_row.state is ExportState.DONE
    referenced = _illustration(pacs.received[0].dataset)
    assert referenced is not None
    assert not files.sr_path(studies[0], referenced[1]).exists()
    # the last study's SR, then the objects, oldest first, one job per call
    assert run_once(ctx, f"{PREFIX}:w0")
    assert [e[2] for e in _exports(db)] == [True, True, True, False, False]
    while run_once(ctx, f"{PREFIX}:w0"):
        pass
    assert [state for _, state in _jobs(db, OBJECTS)] == ["done"] * 3
    while (job := claim_export(db, "x0")) is not None:
        assert deliver(exporter, job).acknowledged
    by_study = pacs.by_study(None)
    for uid in studies:
        got = {str(r.dataset.SOPClassUID): r.dataset for r in by_study[uid]}
        assert len(by_study[uid]) == 3 and len(got) == 3  # SR, image, PDF: each once
        sr = next(r.dataset for r in by_study[uid] if "SR" in r.dataset.Modality)
        image = got[str(SecondaryCaptureImageStorage)]
        assert _illustration(sr) == (str(SecondaryCaptureImageStorage),
                                     str(image.SOPInstanceUID))
    db.dispose()


# --- a worker killed after the SR ------------------------------------------------------------

_KILLED_WORKER = """
import os, signal, sys
from pathlib import Path
from model.classifier import Classifier
from node.classify.sr import DeviceInfo
from node.classify.worker import WorkerContext, classify
from storage.db import Database
from storage.filestore import FileStore
from storage.jobs import claim_job
url, store, model = sys.argv[1:4]
clf = Classifier(Path(model))
db = Database(url)
ctx = WorkerContext(db=db, files=FileStore(Path(store)), classifier=lambda: clf,
                    device=DeviceInfo("DSCINT", "0.1", "1.2.826.0.1.3680043.8.498.1", "host"),
                    destination="PACS@127.0.0.1:104", on_result=lambda: None,
                    result_image=True, result_pdf=True)
job = claim_job(db, "host:NODE:w0")
classify(ctx, job)  # the SR stored, its export and the objects job queued: then killed
claim_job(db, "host:NODE:w0", "objects")  # had begun the image
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_worker_killed_after_the_sr_leaves_the_image_and_pdf_to_be_built_once(
        database_url: str, tmp_path: Path, files: FileStore, clf: Classifier,
        untrained_model: Path) -> None:
    db = Database(database_url)
    db.create_all()
    study = record_complete_study(db, files, seed=51)
    child = subprocess.run([sys.executable, "-c", _KILLED_WORKER, database_url,
                            str(tmp_path / "store"), str(untrained_model)],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True,
                           timeout=300, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert [e[2] for e in _exports(db)] == [True]  # the SR, committed before the kill
    assert _jobs(db, OBJECTS) == [(study, "claimed")]
    # the restart: this node's claims go back to the queue, the study stays classified
    assert release_stale_claims(db, 0, prefix=PREFIX) == 1
    ctx = _ctx(db, files, clf)
    assert run_once(ctx, f"{PREFIX}:w0")
    assert not run_once(ctx, f"{PREFIX}:w0")
    assert _jobs(db, OBJECTS) == [(study, "done")]
    with db.read_session() as s:
        assert len(s.execute(select(Result.id)).all()) == 1  # no second SR
    objs = result_objects(db)[study]
    assert [o.is_sr for o in objs] == [True, False, False]
    assert all(Path(o.path).is_file() for o in objs)
    sr = dcmread(objs[0].path)
    assert _illustration(sr) == (str(SecondaryCaptureImageStorage), objs[1].sop_uid)
    assert str(dcmread(objs[1].path).SOPClassUID) == SecondaryCaptureImageStorage
    db.dispose()


# --- an amendment while the objects are built -----------------------------------------------


def test_objects_built_for_a_result_an_amendment_replaced_meanwhile_are_built_again(
        database_url: str, files: FileStore, clf: Classifier) -> None:
    db = Database(database_url)
    db.create_all()
    ant, post = amend_study()
    study = str(ant.StudyInstanceUID)
    for ds in (ant, post):
        stored(db, files, ds, T0)
    assert mark_complete(db, study, CompletionReason.BOTH_VIEWS)
    ctx = _ctx(db, files, clf)
    job = claim_job(db, f"{PREFIX}:w0")
    assert job is not None
    classify(ctx, job)
    v1 = current_result(db, study)
    building = claim_job(db, f"{PREFIX}:w1", OBJECTS)  # v1's objects being built...
    assert v1 is not None and building is not None
    stored(db, files, reacquired(ant), datetime.now(UTC))  # ...when a view is acquired again
    assert requeue_amendments(db, 0.0, now=datetime.now(UTC) + timedelta(seconds=1)) == [study]
    job = claim_job(db, f"{PREFIX}:w0")
    assert job is not None
    classify(ctx, job)
    assert _jobs(db, OBJECTS) == [(study, "claimed")]  # the one being built stands for both
    v2 = current_result(db, study)
    assert v2 is not None and v2.version == 2
    assert not store_objects(db, building.job_id, v1.result_id, (), DEST)  # back in the queue
    assert _jobs(db, OBJECTS) == [(study, "pending")]
    assert run_once(ctx, f"{PREFIX}:w1")
    assert not run_once(ctx, f"{PREFIX}:w1")
    assert _jobs(db, OBJECTS) == [(study, "done")]
    objs = result_objects(db)[study]  # the latest result's: SR v2, its image and PDF
    assert [o.is_sr for o in objs] == [True, False, False]
    sr = dcmread(objs[0].path)
    assert str(sr.SOPInstanceUID) == v2.sr_sop_uid and "PredecessorDocumentsSequence" in sr
    assert _illustration(sr) == (str(SecondaryCaptureImageStorage), objs[1].sop_uid)
    assert dcmread(objs[1].path).SOPInstanceUID == objs[1].sop_uid
    db.dispose()


# --- the latency metric ---------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path, untrained_model: Path) -> Iterator[Node]:
    n = Node(node_config(tmp_path / "node", untrained_model, 104))
    yield n
    n.db.dispose()


def test_the_latency_metric_times_the_sr_not_the_objects_after_it(node: Node) -> None:
    study = "1.2.826.0.1.3680043.8.498.99"
    folder = node.files.studies / study / "1.2.3"
    folder.mkdir(parents=True)
    (folder / "1.2.3.4.dcm").write_bytes(b"x")  # the last instance's arrival
    os.utime(folder / "1.2.3.4.dcm", (0, datetime.now(UTC).timestamp() - 5))

    def exported(is_sr: bool) -> ClaimedExport:
        return ClaimedExport(export_id=1, result_id=1, study_uid=study, sr_sop_uid="2.25.7",
                             sr_path="/x.dcm", destination="PACS", attempts=1, is_sr=is_sr)

    node._on_export(exported(False), "delivered", None)  # the image (its SR retried, say)
    assert _samples(node, "_count") == 0
    node._on_export(exported(True), "delivered", None)
    assert _samples(node, "_count") == 1 and _samples(node, "_sum") >= 5


def _samples(node: Node, suffix: str) -> float:
    (metric,) = node.metrics.ack_seconds.collect()
    return sum(s.value for s in metric.samples if s.name.endswith(suffix))


def test_an_objects_job_never_moves_its_study(database_url: str, files: FileStore,
                                              clf: Classifier) -> None:
    """Claiming, retrying and releasing an objects job leave the study classified (a classify
    job's claim makes it classifying)."""
    db = Database(database_url)
    db.create_all()
    study = record_complete_study(db, files, seed=71)
    job = claim_job(db, f"{PREFIX}:w0")
    assert job is not None
    classify(_ctx(db, files, clf), job)
    assert claim_job(db, f"{PREFIX}:w0", OBJECTS) is not None
    assert release_stale_claims(db, 0, prefix=PREFIX) == 1
    (row,) = [r for r in study_summaries(db) if r.study_uid == study]
    assert row.state.value == "classified"
    assert [s for _, s in _jobs(db, OBJECTS)] == [JobState.PENDING.value]
    db.dispose()


def test_a_thread_below_the_workers_draws_the_pictures(tmp_path: Path,
                                                       untrained_model: Path) -> None:
    """The workers only classify while result images or PDFs are on; one thread at a lower
    priority builds the objects (the end-to-end tests see its images and PDFs at PACS), so a
    study arriving while another's pictures are drawn is classified at once. Without
    pictures the workers run both steps as before and no such thread exists."""
    with Node(node_config(tmp_path / "on", untrained_model, 104)) as on:
        names = {t.name for t in on._threads}
        assert {"worker-0", "pictures"} <= names
    off_cfg = node_config(tmp_path / "off", untrained_model, 104,
                          results={"image": False, "pdf": False})
    with Node(off_cfg) as off:
        assert "pictures" not in {t.name for t in off._threads}
    assert worker.PICTURES_NICENESS > worker.WORKER_NICENESS


def test_pictures_that_cannot_be_built_make_the_node_degraded(
        database_url: str, files: FileStore, clf: Classifier) -> None:
    """An objects job that fails for good leaves a delivered SR naming an image PACS will
    never get: /health says so (degraded, the study and the reason), the study stays
    classified."""
    db = Database(database_url)
    db.create_all()
    study = record_complete_study(db, files, seed=72)
    ctx = _ctx(db, files, clf)
    job = claim_job(db, f"{PREFIX}:w0")
    assert job is not None
    classify(ctx, job)
    objects = claim_job(db, f"{PREFIX}:w0", OBJECTS)
    assert objects is not None
    after_failure(ctx, objects, ValueError("views unreadable"), objects=True)  # permanent
    cfg = with_overrides(load_config(None), storage={"root": str(files.root)})
    report = health_report(db, cfg, None, model_expected=False)
    assert report["status"] == "degraded"
    assert report["work"]["failed_pictures"] == 1
    assert report["work"]["last_pictures_failure"]["study_uid"] == study
    (line,) = [p for p in report["problems"] if "could not be built" in p]
    assert study in line and "views unreadable" in line and "SRs were delivered" in line
    (row,) = [r for r in study_summaries(db) if r.study_uid == study]
    assert row.state.value == "classified"
    db.dispose()
