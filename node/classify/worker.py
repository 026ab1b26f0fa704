"""Classification worker: claims complete studies, runs Dscint off the association threads,
builds the SR and queues its export — result and export row in one transaction.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread

from model.classifier import Classifier, StudyPrediction
from node.classify.sr import (
    PHANTOM_NOTE,
    Classification,
    DeviceInfo,
    ModelInfo,
    SourceFrame,
    build_sr,
    encode_sr,
)
from node.dicom.views import extract_views
from node.logs import redacted
from node.runtime import trim_memory
from storage.db import Database
from storage.filestore import FileStore
from storage.intake import study_instances
from storage.jobs import ClaimedJob, NewResult, claim_job, finish_job, store_result

log = logging.getLogger(__name__)

WORKER_NICENESS = 5  # classification runs at nice +5: under CPU pressure the receiver goes first


@dataclass(frozen=True)
class WorkerContext:
    """Dependencies of a worker, handed in explicitly."""

    db: Database
    files: FileStore
    classifier: Callable[[], Classifier]  # returns the model currently served
    device: DeviceInfo
    destination: str
    on_result: Callable[[], None]


def model_info(clf: Classifier) -> ModelInfo:
    """What the SR says about the model that made it."""
    m = clf.metadata
    return ModelInfo(name=m.name, version=m.version, sha256=m.weights_sha256,
                     training_data=m.training_data, trained_on_phantoms=m.trained_on_phantoms)


def load_study(db: Database, study_uid: str
               ) -> tuple[list[Dataset], list[SourceFrame], list[tuple[str, object]]]:
    """Headers, frame references and (view, pixels) of a study's on-time instances."""
    headers: list[Dataset] = []
    frames: list[SourceFrame] = []
    views: list[tuple[str, object]] = []
    for inst in study_instances(db, study_uid):
        if inst.late:
            continue
        ds = dcmread(Path(inst.path))
        for v in extract_views(ds):
            frames.append(SourceFrame(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                      v.frame_number, v.view.value))
            views.append((v.view.value, v.pixels))
        del ds.PixelData
        headers.append(ds)
    return headers, frames, views


def classify(ctx: WorkerContext, job: ClaimedJob) -> None:
    """One study: classify, build and store the SR, queue the export."""
    clf = ctx.classifier()
    headers, frames, views = load_study(ctx.db, job.study_uid)
    if not views:
        raise ValueError(f"study {job.study_uid} has no decodable views")
    pred = clf.classify_study(views)  # type: ignore[arg-type]
    info = model_info(clf)
    sr = build_sr(headers, frames, _classification(pred), info, ctx.device)
    data = encode_sr(sr)
    sr_path = ctx.files.write_sr(job.study_uid, str(sr.SOPInstanceUID), data)
    store_result(ctx.db, NewResult(
        study_uid=job.study_uid, job_id=job.job_id, model_version=info.version,
        model_sha256=info.sha256, predicted_class=pred.predicted_class,
        probabilities=pred.probabilities,
        per_view={v.label: v.probabilities for v in pred.views},
        sr_sop_uid=str(sr.SOPInstanceUID), sr_series_uid=str(sr.SeriesInstanceUID),
        sr_path=str(sr_path), note=PHANTOM_NOTE if info.trained_on_phantoms else None,
    ), ctx.destination)
    probs = ", ".join(f"{k} {v:.3f}" for k, v in pred.probabilities.items())
    log.info("study %s classified %s (%s) by %s %s%s", job.study_uid, pred.predicted_class, probs,
             info.name, info.version, f" [{PHANTOM_NOTE}]" if info.trained_on_phantoms else "")


def _classification(pred: StudyPrediction) -> Classification:
    return Classification(predicted_class=pred.predicted_class,
                          probabilities=pred.probabilities,
                          per_view={v.label: v.probabilities for v in pred.views})


def run_once(ctx: WorkerContext, worker_id: str) -> bool:
    """Claim and process one job; False when the queue is empty."""
    job = claim_job(ctx.db, worker_id)
    if job is None:
        return False
    try:
        classify(ctx, job)
    except Exception as exc:  # a bad study must not stop the worker
        log.exception("classification of study %s failed", job.study_uid)
        # the message may quote element values (a name in a date field): stored redacted
        finish_job(ctx.db, job.job_id, ok=False, error=redacted(exc))
        return True
    finally:
        trim_memory(collect=False)  # a study's decoded images and SR: back to the OS
    finish_job(ctx.db, job.job_id, ok=True)
    ctx.on_result()
    return True


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
                stop: threading.Event, idle_seconds: float = 1.0) -> None:
    """Loop until stopped, below the receiver's CPU priority; woken early when a study
    completes."""
    lower_priority()
    while not stop.is_set():
        try:
            busy = run_once(ctx, worker_id)
        except Exception:  # e.g. database briefly unavailable: log, back off, go on
            log.exception("worker %s: queue error", worker_id)
            busy = False
        if not busy:
            wake.wait(idle_seconds)
            wake.clear()
