"""Classification worker: claims complete studies, runs Dscint off the association threads,
builds the SR and queues its export — result, export and an objects job in one transaction —
and then builds the result image and the PDF report (an evidence map each: most of a study's
time) and queues theirs.

The SR goes first: it references the result image by its deterministic UID, so it need not
wait for the image. The image and PDF are an ``objects`` job of their own (storage.jobs),
committed with the SR: a worker killed before building them leaves the job for the next (or
the restarted) one. The node's workers only classify (`classify_once`) and one pictures thread
below their priority builds the objects (`objects_once`), so no SR waits behind another
study's pictures; `run_once` does both, studies waiting to be classified first.

A study is decoded and classified instance by instance (its pixels freed before the next), so
the worker's memory is bounded by one instance, not by the study. A classification that fails
for a reason that may pass (a file unreadable now, a locked database) is retried after a
backoff up to a number of attempts; one that cannot improve (nothing decodable, not DICOM)
fails at once. Either way the study ends ``failed`` with the reason, redacted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from model.calibration import decide, effective_threshold
from model.classes import CLASS_NAMES
from model.classifier import Classifier, StudyClassification, StudyPrediction
from node.classify.amend import amendment, classified_instances, latest_per_view, restamp
from node.classify.inputs import InputProfile
from node.classify.pdf import build_pdf_report
from node.classify.result_image import (
    ShownView,
    build_result_image,
    encode_image,
    image_reference,
)
from node.classify.sr import (
    PHANTOM_NOTE,
    Classification,
    DeviceInfo,
    ModelInfo,
    SourceFrame,
    build_sr,
    encode_sr,
)
from node.dicom.pixels import DecodeError
from node.dicom.views import ViewImage, extract_views
from node.logs import redacted
from node.runtime import trim_memory
from storage.amend import current_result
from storage.db import Database
from storage.filestore import FileStore
from storage.intake import study_instances
from storage.jobs import (
    OBJECTS,
    ClaimedJob,
    NewResult,
    claim_job,
    classify_due,
    finish_job,
    retry_job,
    store_objects,
    store_result,
)
from storage.objects import ResultToPicture, result_to_picture

log = logging.getLogger(__name__)

WORKER_NICENESS = 5  # classification runs at nice +5: under CPU pressure the receiver goes first
PICTURES_NICENESS = 10  # the result image and PDF below that: a waiting study's SR goes first
# the data itself is wrong: another attempt reads the same bytes and fails the same way
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (DecodeError, InvalidDicomError, ValueError)


class NoDecodableViews(ValueError):
    """A study with no view to classify: no on-time instance, or none with pixels."""


class ModelChanged(ValueError):
    """The model that made a result is no longer served: its image and PDF (evidence map,
    UIDs, provenance) cannot be made by another one."""


@dataclass(frozen=True)
class WorkerContext:
    """Dependencies of a worker, handed in explicitly."""

    db: Database
    files: FileStore
    classifier: Callable[[], Classifier]  # returns the model currently served
    device: DeviceInfo
    destination: str
    on_result: Callable[[], None]
    max_attempts: int = 1  # attempts before a study whose classification keeps failing fails
    retry_delay: Callable[[int], float] = lambda _attempts: 0.0  # seconds after attempt n
    # observers (metrics, alerts, the web page): (study UID, class, probabilities, seconds),
    # (study UID, redacted reason), and a retry scheduled; they must not raise
    on_classified: Callable[[str, str, dict[str, float], float], None] = \
        lambda _uid, _cls, _p, _s: None
    on_failed: Callable[[str, str], None] = lambda _uid, _reason: None
    on_retry: Callable[[], None] = lambda: None
    indeterminate_below: float = 0.0  # threshold override; 0 = the model's own
    # the verified whole-file sha256 of a classifier `classifier` returned (the SR names it)
    file_sha256: Callable[[Classifier], str] = lambda _clf: ""
    # the result image (colour SC, referenced by the SR) and the PDF report beside the SR,
    # each with an export of its own ([results].image and .pdf; the service sets them)
    result_image: bool = False
    result_pdf: bool = False


def model_info(clf: Classifier, file_sha256: str = "") -> ModelInfo:
    """What the SR says about the model that made it; `file_sha256`: the whole file's hash
    the model holder verified before loading it."""
    m = clf.metadata
    return ModelInfo(name=m.name, version=m.version, sha256=m.weights_sha256,
                     training_data=m.training_data, trained_on_phantoms=m.trained_on_phantoms,
                     file_sha256=file_sha256)


def _instance_views(db: Database, study_uid: str) -> Iterator[tuple[Dataset, list[ViewImage]]]:
    """A study's instances to classify (on time, or late and amending the result; only the
    latest of each view: node.classify.amend), one at a time: each header (its encoded
    pixels dropped) with its decoded views; an instance whose every view was acquired again
    is skipped."""
    instances = classified_instances(study_instances(db, study_uid))
    latest = latest_per_view(instances)  # a view acquired again supersedes the earlier one
    for inst in instances:
        ds = dcmread(Path(inst.path))
        views = [v for v in extract_views(ds)
                 if latest.get(v.view.value, inst.sop_uid) == inst.sop_uid]
        if not views:  # each of its views was acquired again: not classified, not referenced
            continue
        del ds.PixelData  # the encoded copy; the decoded views go after prediction
        ds.buffer = None  # a deflated file's whole inflated copy (pydicom keeps it for reads
        # of deferred elements, which the worker never makes): one per instance otherwise
        yield ds, views


def classify_instances(db: Database, study_uid: str, study: StudyClassification,
                       profile: InputProfile | None = None
                       ) -> tuple[list[Dataset], list[SourceFrame]]:
    """Feed a study's instances to `study` one at a time: each is read, its views decoded and
    predicted, and its pixels dropped before the next is read. Returns the headers (without
    pixels) and frame references the SR needs; `profile` gathers the input characteristics
    drift is watched on."""
    headers: list[Dataset] = []
    frames: list[SourceFrame] = []
    for ds, views in _instance_views(db, study_uid):
        frames += [SourceFrame(str(ds.SOPClassUID), str(ds.SOPInstanceUID), v.frame_number,
                               v.view.value) for v in views]
        study.add([(v.view.value, v.pixels) for v in views])
        if profile is not None:
            profile.add(ds, views)
        del views
        headers.append(ds)
    return headers, frames


def shown_instances(db: Database, study_uid: str) -> tuple[Dataset, dict[str, np.ndarray]]:
    """What the result image shows, read again after the SR: the first classified instance's
    header (the objects' patient and study modules, as the SR's) and the first view of each
    kind (at most three, ~0.5 MiB each); reading stops once both planar views are in."""
    header: Dataset | None = None
    shown: dict[str, np.ndarray] = {}
    for ds, views in _instance_views(db, study_uid):
        header = ds if header is None else header
        for v in views:
            shown.setdefault(v.view.value, v.pixels)
        if {"anterior", "posterior"} <= shown.keys():  # what the image shows (_shown_views)
            break
    if header is None:
        raise NoDecodableViews(f"study {study_uid} has no decodable views left")
    return header, shown


def classify(ctx: WorkerContext, job: ClaimedJob) -> None:
    """One study: classify, build the SR (referencing the result image to come), store it
    with its export and, when an image or PDF is wanted, the objects job that builds them,
    close the job."""
    started = time.monotonic()
    clf = ctx.classifier()
    study = StudyClassification(clf)
    profile = InputProfile()
    headers, frames = classify_instances(ctx.db, job.study_uid, study, profile)
    if not study.count:
        raise NoDecodableViews(f"study {job.study_uid} has no decodable views")
    pred = study.result()
    current = current_result(ctx.db, job.study_uid)
    prior = amendment(current)  # None for the first result; else this one replaces it
    version = 1 if prior is None else prior.version
    info = model_info(clf, ctx.file_sha256(clf))
    result = _classification(pred, effective_threshold(clf.metadata.indeterminate_below,
                                                       ctx.indeterminate_below))
    illustration = image_reference(str(headers[0].StudyInstanceUID), info.sha256, version) \
        if ctx.result_image else None
    sr = build_sr(headers, frames, result, info, ctx.device, illustration=illustration,
                  amends=prior)
    data = encode_sr(sr)
    sr_path = ctx.files.write_sr(job.study_uid, str(sr.SOPInstanceUID), data)
    store_result(ctx.db, NewResult(
        study_uid=job.study_uid, job_id=job.job_id, model_version=info.version,
        model_sha256=info.sha256, predicted_class=result.predicted_class,
        probabilities=pred.probabilities,
        per_view={v.label: v.probabilities for v in pred.views},
        sr_sop_uid=str(sr.SOPInstanceUID), sr_series_uid=str(sr.SeriesInstanceUID),
        sr_path=str(sr_path), note=PHANTOM_NOTE if info.trained_on_phantoms else None,
        inputs=profile.inputs(), version=version,
        predecessor_id=None if current is None else current.result_id,
        objects_pending=ctx.result_image or ctx.result_pdf,
    ), ctx.destination)
    ctx.on_classified(job.study_uid, result.predicted_class, dict(pred.probabilities),
                      time.monotonic() - started)
    probs = ", ".join(f"{k} {v:.3f}" for k, v in pred.probabilities.items())
    log.info("study %s classified %s (%s) by %s %s%s%s", job.study_uid,
             result.predicted_class, probs, info.name, info.version,
             "" if prior is None else f"; amended result v{version} replaces SR {prior.sop_uid}",
             f" [{PHANTOM_NOTE}]" if info.trained_on_phantoms else "")


def build_objects(ctx: WorkerContext, job: ClaimedJob) -> None:
    """An objects job: the result image and the PDF report of the study's latest result, as
    its SR states it (class, probabilities, version), drawn by the model that made it, written
    and queued for export after the SR, the job closed with them."""
    target = result_to_picture(ctx.db, job.study_uid)
    if target is None:  # no result to picture (its study's records were removed)
        finish_job(ctx.db, job.job_id, ok=True)
        return
    wanted = not target.has_objects and (ctx.result_image or ctx.result_pdf)
    others = _picture(ctx, target) if wanted else ()
    if store_objects(ctx.db, job.job_id, target.result_id, others, ctx.destination):
        log.info("study %s: %d result object(s) queued after the SR", job.study_uid,
                 len(others))
    else:
        log.info("study %s: an amended result came while its objects were built; its "
                 "objects are built next", job.study_uid)


def _picture(ctx: WorkerContext, target: ResultToPicture) -> tuple[tuple[str, str], ...]:
    """Build and write the image and PDF of `target`; (SOP Instance UID, path) each."""
    clf = ctx.classifier()
    if clf.metadata.weights_sha256 != target.model_sha256:
        raise ModelChanged(f"the result of study {target.study_uid} was made by model "
                           f"{target.model_sha256[:12]}, model {clf.metadata.version} serves "
                           "now: no result image or PDF")
    header, shown = shown_instances(ctx.db, target.study_uid)
    info = model_info(clf, ctx.file_sha256(clf))
    result = Classification(
        predicted_class=target.predicted_class, probabilities=_in_class_order(
            target.probabilities), per_view=target.per_view,
        threshold=effective_threshold(clf.metadata.indeterminate_below,
                                      ctx.indeterminate_below))
    image = restamp(build_result_image(header, _shown_views(clf, shown, result.probabilities),
                                       result, info, ctx.device), target.version)
    del shown
    return _other_objects(ctx, target.study_uid, header, image, result, info, target.version)


def _in_class_order(probabilities: dict[str, float]) -> dict[str, float]:
    """Probabilities as the model lists them (the store keeps them sorted by name)."""
    known = {k: probabilities[k] for k in CLASS_NAMES if k in probabilities}
    return known | probabilities


def _other_objects(ctx: WorkerContext, study_uid: str, header: Dataset, image: Dataset,
                   result: Classification, info: ModelInfo, version: int = 1
                   ) -> tuple[tuple[str, str], ...]:
    """The result image and the PDF report, as configured, written to the store: (SOP
    Instance UID, path) each, in the order they are sent after the SR; an amended result's
    (`version` > 1) with UIDs of their own."""
    out: list[tuple[str, str]] = []
    if ctx.result_image:
        out.append((str(image.SOPInstanceUID), str(ctx.files.write_sr(
            study_uid, str(image.SOPInstanceUID), encode_image(image)))))
    if ctx.result_pdf:
        report = restamp(build_pdf_report(header, image, result, info, ctx.device), version)
        out.append((str(report.SOPInstanceUID), str(ctx.files.write_sr(
            study_uid, str(report.SOPInstanceUID), encode_image(report)))))
    return tuple(out)


_SHOWN_ORDER = {"anterior": ("ANT", 0), "posterior": ("POST", 1), "unknown": ("VIEW", 2)}


def _shown_views(clf: Classifier, shown: dict[str, np.ndarray],
                 probabilities: Mapping[str, float]) -> list[ShownView]:
    """The views the result image shows (anterior, posterior), each with its evidence map
    (`Classifier.explain`: SmoothGrad x input, on the view's own pixel grid) of the most
    probable class (for an indeterminate finding too: what the model leaned to)."""
    kinds = sorted(shown, key=lambda k: _SHOWN_ORDER.get(k, ("VIEW", 3))[1])[:2]
    top = max(probabilities, key=lambda k: probabilities[k])
    maps = clf.explain([shown[k] for k in kinds], top)
    return [ShownView(_SHOWN_ORDER.get(k, ("VIEW", 3))[0], shown[k], m)
            for k, m in zip(kinds, maps, strict=True)]


def _classification(pred: StudyPrediction, threshold: float) -> Classification:
    """The study's finding: its arg-max class, or indeterminate below the threshold."""
    return Classification(predicted_class=decide(pred.probabilities, threshold),
                          probabilities=pred.probabilities,
                          per_view={v.label: v.probabilities for v in pred.views},
                          threshold=threshold)


def run_once(ctx: WorkerContext, worker_id: str) -> bool:
    """Classify one waiting study (its SR stored and queued at once), then, unless another
    study waits to be classified, build one result's objects (image, PDF); False when there
    was nothing to do."""
    job = claim_job(ctx.db, worker_id)
    if job is not None:
        _attempt(ctx, job, classify)
        if classify_due(ctx.db):  # its SR first; pictures wait
            return True
    objects = claim_job(ctx.db, worker_id, OBJECTS)
    if objects is not None:
        _attempt(ctx, objects, build_objects, objects=True)
    return job is not None or objects is not None


def classify_once(ctx: WorkerContext, worker_id: str) -> bool:
    """Classify one waiting study, nothing else (the node's workers, when a pictures thread
    builds the objects: a study arriving while another's pictures are drawn is not kept
    waiting for them); False when none waits."""
    job = claim_job(ctx.db, worker_id)
    if job is not None:
        _attempt(ctx, job, classify)
    return job is not None


def objects_once(ctx: WorkerContext, worker_id: str) -> bool:
    """Build one classified study's result image and PDF (the pictures thread); False when
    none waits."""
    job = claim_job(ctx.db, worker_id, OBJECTS)
    if job is not None:
        _attempt(ctx, job, build_objects, objects=True)
    return job is not None


def _attempt(ctx: WorkerContext, job: ClaimedJob,
             step: Callable[[WorkerContext, ClaimedJob], None], objects: bool = False) -> None:
    """Run one claimed job's step; a failure is retried or ends the job (after_failure),
    never the worker. Each step stores its outcome and closes its job in one transaction."""
    try:
        step(ctx, job)
    except Exception as exc:  # a bad study must not stop the worker
        after_failure(ctx, job, exc, objects)
        return
    finally:
        trim_memory(collect=False)  # a study's decoded images and objects: back to the OS
    ctx.on_result()


def is_permanent(exc: BaseException) -> bool:
    """True when another attempt cannot do better: the data is wrong, not the moment. Reading
    errors (OSError) and anything unforeseen (a database error, a model's RuntimeError) may
    pass and are retried, a bounded number of times."""
    return not isinstance(exc, OSError) and isinstance(exc, PERMANENT_ERRORS)


def after_failure(ctx: WorkerContext, job: ClaimedJob, exc: Exception,
                  objects: bool = False) -> None:
    """After a failed attempt: the job back in the queue after a backoff, or, when the error
    cannot improve or the attempts are spent, the study failed with the reason (an objects
    job's failure fails the job only: the study keeps its delivered SR). The message may quote
    element values (a name in a date field): logged and stored redacted."""
    reason = redacted(exc)
    what = "building the result objects" if objects else "classification"
    if is_permanent(exc) or job.attempts >= ctx.max_attempts:
        why = "cannot improve" if is_permanent(exc) else f"{job.attempts} attempt(s)"
        log.error("%s of study %s failed (%s): %s", what, job.study_uid, why, reason,
                  exc_info=exc)
        finish_job(ctx.db, job.job_id, ok=False, error=reason)
        if not objects:
            ctx.on_failed(job.study_uid, reason)
        return
    delay = ctx.retry_delay(job.attempts)
    retry_job(ctx.db, job.job_id, reason, datetime.now(UTC) + timedelta(seconds=delay))
    if not objects:
        ctx.on_retry()
    log.warning("%s of study %s failed (attempt %d of %d): %s; retry in %.3g s", what,
                job.study_uid, job.attempts, ctx.max_attempts, reason, delay)


def lower_priority(increment: int = WORKER_NICENESS) -> int | None:
    """Make the calling thread (and the torch threads it starts, which inherit it) yield the
    CPU to the receiver: a camera waits for each C-STORE answer, a classification can wait a
    few milliseconds. On Linux nice() applies to the calling thread only. Returns the new
    niceness, None where the OS refuses or has no such call."""
    try:
        return os.nice(increment)
    except (OSError, AttributeError):
        return None


def run_forever(ctx: WorkerContext, worker_id: str, wake: threading.Event,
                stop: threading.Event, idle_seconds: float = 1.0,
                step: Callable[[WorkerContext, str], bool] = run_once,
                niceness: int = WORKER_NICENESS) -> None:
    """Loop `step` until stopped, below the receiver's CPU priority (`niceness`); woken early
    when there is work (a study completed, a result classified)."""
    lower_priority(niceness)
    while not stop.is_set():
        try:
            busy = step(ctx, worker_id)
        except Exception:  # e.g. database briefly unavailable: log, back off, go on
            log.exception("worker %s: queue error", worker_id)
            busy = False
        if not busy:
            wake.wait(idle_seconds)
            wake.clear()
