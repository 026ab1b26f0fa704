"""The shadow runner: after the serving model classified a study, the version in shadow
classifies it too, and its result is stored beside the serving one; it builds no SR and sends
nothing.

It runs in one thread of its own below the workers' CPU priority, after the serving result
is stored (a study's report never waits for it). Its backlog is bounded: a study that finds
the backlog full is not shadowed, only counted, so a slow candidate costs comparisons, never
memory or the serving path's time. The backlog is in memory: studies waiting when the node
stops are not shadowed (a trial is a sample, not a record).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from model.calibration import decide, effective_threshold
from model.classifier import Classifier, StudyClassification
from node.classify.worker import WORKER_NICENESS, classify_instances, lower_priority
from node.logs import redacted
from node.runtime import trim_memory
from storage.db import Database
from storage.shadow import NewShadowResult, serving_result, store_shadow_result

log = logging.getLogger(__name__)

SHADOW_NICENESS = WORKER_NICENESS + 5  # below the workers, which are below the receiver


@dataclass(frozen=True)
class ShadowOutcome:
    """One study shadowed: for metrics. `shadow_class` None when the shadow run failed."""

    version: str
    serving_class: str
    shadow_class: str | None
    seconds: float


@dataclass(frozen=True)
class ShadowContext:
    """Dependencies of the runner, handed in explicitly."""

    db: Database
    model: Callable[[], tuple[str, Classifier] | None]  # the version in shadow, if any
    indeterminate_below: float = 0.0  # the node's threshold override, as the worker's
    on_outcome: Callable[[ShadowOutcome], None] = lambda _o: None  # must not raise
    on_skipped: Callable[[], None] = lambda: None  # a study not shadowed: backlog full


def shadow_study(ctx: ShadowContext, study_uid: str) -> ShadowOutcome | None:
    """Classify one study with the shadow model and store the result; None when there is
    nothing to compare (no trial, no serving result) or this version already compared it.
    A failure is stored as such."""
    current = ctx.model()
    if current is None:
        return None
    version, clf = current
    serving = serving_result(ctx.db, study_uid)
    if serving is None:
        return None
    started = time.monotonic()
    try:
        study = StudyClassification(clf)
        classify_instances(ctx.db, study_uid, study)
        pred = study.result()
        cls: str | None = decide(pred.probabilities, effective_threshold(
            clf.metadata.indeterminate_below, ctx.indeterminate_below))
        probabilities, error = dict(pred.probabilities), None
    except Exception as exc:  # a study the candidate cannot classify is a finding, too
        cls, probabilities, error = None, {}, redacted(exc)
        log.warning("shadow model %s failed on study %s: %s", version, study_uid, error)
    finally:
        trim_memory(collect=False)
    seconds = time.monotonic() - started
    if not store_shadow_result(ctx.db, NewShadowResult(
            study_uid=study_uid, version=version, serving=serving, predicted_class=cls,
            probabilities=probabilities, latency_ms=round(seconds * 1000), error=error)):
        return None  # classified again (requeue, amendment): the first comparison stands
    log.info("study %s shadowed by %s: %s (serving %s %s), %.0f ms", study_uid, version,
             cls or "failed", serving.version, serving.predicted_class, seconds * 1000)
    return ShadowOutcome(version, serving.predicted_class, cls, seconds)


class ShadowRunner:
    """One thread, a bounded backlog of study UIDs; `submit` never blocks."""

    def __init__(self, ctx: ShadowContext, backlog: int) -> None:
        self._ctx = ctx
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=backlog)
        self._thread: threading.Thread | None = None
        self.skipped = 0

    def submit(self, study_uid: str) -> bool:
        """Queue a study the serving model has classified; False when no trial runs or the
        backlog is full (counted)."""
        if self._ctx.model() is None or self._thread is None:
            return False
        try:
            self._queue.put_nowait(study_uid)
        except queue.Full:
            self.skipped += 1
            self._ctx.on_skipped()
            log.info("study %s not shadowed: %d studies already wait for the shadow model",
                     study_uid, self._queue.maxsize)
            return False
        return True

    def start(self) -> ShadowRunner:
        """Start the thread (daemon: a stop waits for the study in hand only)."""
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the study in hand; the backlog is dropped."""
        thread, self._thread = self._thread, None  # submit refuses from here on
        if thread is None:
            return
        while True:
            self._drain()
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:  # a submit that was already past its check
                continue
        thread.join(timeout)

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def idle(self) -> bool:
        """Nothing waiting (the study in hand may still run): for tests and benches."""
        return self._queue.empty()

    def _run(self) -> None:
        lower_priority(SHADOW_NICENESS)
        while (uid := self._queue.get()) is not None:
            try:
                outcome = shadow_study(self._ctx, uid)
                if outcome is not None:
                    self._ctx.on_outcome(outcome)
            except Exception:  # e.g. the database briefly unavailable: next study
                log.exception("shadow run of study %s failed", uid)
