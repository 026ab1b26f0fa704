"""The running node: SCP, workers, exporter and scheduler wired from one validated Config."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from pynetdicom.transport import ThreadedAssociationServer

from node import tls
from node.config import Config
from node.export import delivery as exporter
from node.export.policy import backoff_delay
from node.export.scu import Destination, failure_reason
from node.logs import keep_phi_out_of_logs
from node.receive.process import ReceiverProcess, StoreTimer
from node.receive.server import open_file_store, start_scp
from node.service import health, housekeeping
from node.service.alerts import Alerter
from node.service.drift import DriftMonitor, reference_text
from node.service.web import PageSource
from storage.amend import requeue_amendments
from storage.db import CompletionReason, Database
from storage.exports import ClaimedExport, release_stale_exports, renew_export_claims
from storage.feedback import feedback_labels
from storage.filestore import FileStore
from storage.intake import mark_complete, studies_due_quiet
from storage.jobs import release_stale_claims, renew_claims
from storage.notify import WorkListener, notify_work, supports_notify
from storage.shadow import active_shadow, shadow_summary

if TYPE_CHECKING:  # torch, highdicom and the model: imported where a classifying role uses
    # them, so `python -m node receive` never loads them (tests/test_roles.py checks its maps)
    from model.classifier import Classifier
    from node.classify.shadow import ShadowOutcome, ShadowRunner
    from node.classify.sr import DeviceInfo
    from node.service.models import ModelHolder

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
SHADOW_SUMMARY_SECONDS = 30.0  # how often /metrics' shadow agreement is read from the database


class Role(StrEnum):
    """What one node process runs. ``serve``: everything (one machine). ``receive``: the SCP
    and quiet-completion only, no model. ``worker``: classification, SR export,
    housekeeping, no SCP. Receivers and workers on several machines share the queue
    (PostgreSQL) and the file store ([storage].root, a mounted path)."""

    SERVE = "serve"
    RECEIVE = "receive"
    WORKER = "worker"

    @property
    def receives(self) -> bool:
        """Runs the SCP."""
        return self is not Role.WORKER

    @property
    def classifies(self) -> bool:
        """Loads the model and runs workers and the exporter."""
        return self is not Role.RECEIVE


def device_info(cfg: Config) -> DeviceInfo:
    """Stable identity of this node as the SR's device observer."""
    from node.classify.sr import DeviceInfo
    host = socket.gethostname()
    return DeviceInfo(ae_title=cfg.node.ae_title, software_version=SOFTWARE_VERSION,
                      station_name=host[:16],
                      device_uid=generate_uid(entropy_srcs=["dscint-node", host,
                                                            cfg.node.ae_title]))


@dataclass
class Node:
    """Start with `start()`, stop with `stop()`; also a context manager."""

    cfg: Config
    model_check_seconds: float = 5.0  # how often the registry's serving version is checked
    role: Role = Role.SERVE
    worker_idle_seconds: float = 1.0  # an idle worker polls this often (woken sooner, below)
    db: Database = field(init=False)
    files: FileStore = field(init=False)
    models: ModelHolder | None = field(init=False, default=None)
    port: int = field(init=False, default=0)
    _server: ThreadedAssociationServer | None = field(init=False, default=None)
    _receiver: ReceiverProcess | None = field(init=False, default=None)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _work: threading.Event = field(init=False, default_factory=threading.Event)
    # a result classified: its image and PDF can be drawn (the pictures thread)
    _pictures: threading.Event = field(init=False, default_factory=threading.Event)
    _export: threading.Event = field(init=False, default_factory=threading.Event)
    _scheduler: BackgroundScheduler | None = field(init=False, default=None)
    _health: health.HealthServer | None = field(init=False, default=None)
    _listener: WorkListener | None = field(init=False, default=None)  # PostgreSQL workers
    metrics: health.Metrics = field(init=False, default_factory=health.Metrics)
    alerts: Alerter = field(init=False)
    drift: DriftMonitor | None = field(init=False, default=None)  # classifying roles only
    shadow: ShadowRunner | None = field(init=False, default=None)  # classifying roles only

    def __post_init__(self) -> None:
        """Open storage and load the model; a broken model (or TLS file) stops start-up here.
        Process-wide settings are not made here: see node.service.startup."""
        tls.server_context(self.cfg)  # a missing or bad PEM file raises ConfigError here
        tls.client_context(self.cfg)
        self.files = open_file_store(self.cfg)
        self.alerts = Alerter(self.cfg.alerts, self.cfg.node.ae_title)
        self.db = Database(self.cfg.database_url)
        self.db.create_all()
        if not self.role.classifies:
            return  # a receiver never loads the model
        from node.service.models import ModelHolder
        try:
            self.models = ModelHolder(self.db, self.cfg.model_path, self.cfg.storage_root)
        except BaseException:
            self.db.dispose()
            raise

    def _holder(self) -> ModelHolder:
        if self.models is None:
            raise RuntimeError("a receive-only node has no model")
        return self.models

    @property
    def classifier(self) -> Classifier:
        """The model serving now."""
        return self._holder().current()

    @property
    def model_version(self) -> str | None:
        """The registry version serving now; None for [model].path."""
        return self._holder().version

    def current_classifier(self) -> Classifier:
        """The model to use for the next study; a job keeps the one it started with."""
        return self._holder().current()

    def refresh_model(self) -> bool:
        """Follow a promotion or rollback without restart (see ModelHolder.refresh)."""
        return self._holder().refresh()

    @property
    def worker_prefix(self) -> str:
        """Claims are tagged with host and AE so a restart can release its own. A worker
        role process adds its process id: several on one host must not release each other's
        claims at start-up (a dead one's go back when its lease runs out)."""
        base = f"{socket.gethostname()}:{self.cfg.node.ae_title}"
        return base if self.role is Role.SERVE else f"{base}:{self.role.value}{os.getpid()}"

    def heartbeat(self) -> int:
        """Renew the leases of the studies and exports this process works on; how many.
        Never raises (the scheduler must keep running): a missed beat is logged, and the
        lease (three beats long) survives it."""
        try:
            return renew_claims(self.db, self.worker_prefix) + \
                renew_export_claims(self.db, self.worker_prefix)
        except Exception:
            log.exception("claim heartbeat failed")
            return 0

    def recover(self) -> None:
        """Resume after a crash: drop temp files, re-queue work this node had claimed. Only
        a ``serve`` node owns the whole file store's temp files and its claims' prefix;
        role processes share them with peers, whose dead claims their leases free."""
        if self.role is not Role.SERVE:
            return
        removed = self.files.sweep_temp()
        jobs = release_stale_claims(self.db, 0.0, prefix=self.worker_prefix)
        exports = release_stale_exports(self.db, 0.0, prefix=self.worker_prefix)
        if removed or jobs or exports:
            log.warning("recovered after restart: %d temp file(s) removed, %d job(s) and %d "
                        "export(s) re-queued", removed, jobs, exports)

    def start(self) -> Node:
        """Recover, start workers, exporter, scheduler, the SCP and the health endpoint."""
        keep_phi_out_of_logs()
        self.recover()
        try:
            self.alerts.start()
            if self.role.classifies:
                self._start_threads()
            self._start_scheduler()
            if self.role.receives:
                self._start_scp()
            self._start_health()
        except BaseException:  # e.g. the port is taken: nothing of ours keeps running
            self.stop()
            raise
        if not self.role.classifies:
            log.info("node %s (receive) listening on %s:%d", self.cfg.node.ae_title,
                     self.cfg.node.bind_address, self.port)
        elif not self.role.receives:
            log.info("node %s (worker) classifying with model %s %s", self.cfg.node.ae_title,
                     self.classifier.metadata.name, self.classifier.metadata.version)
        else:
            log.info("node %s listening on %s:%d, model %s %s", self.cfg.node.ae_title,
                     self.cfg.node.bind_address, self.port, self.classifier.metadata.name,
                     self.classifier.metadata.version)
        return self

    def _start_threads(self) -> None:
        from node.classify import worker
        n = self.cfg.node
        wctx = worker.WorkerContext(
            db=self.db, files=self.files, classifier=self.current_classifier,
            device=device_info(self.cfg), destination=self.cfg.pacs_destination,
            on_result=self._on_result, max_attempts=n.classify_max_attempts,
            retry_delay=partial(backoff_delay, base_seconds=n.classify_backoff_seconds,
                                cap_seconds=n.classify_backoff_cap_seconds),
            on_classified=self._on_classified, on_failed=self._on_failed,
            on_retry=partial(self.metrics.observe_retry, "classify"),
            indeterminate_below=self.cfg.model.indeterminate_below,
            result_image=self.cfg.results.image, result_pdf=self.cfg.results.pdf,
            file_sha256=self._holder().file_sha256)
        self._start_shadow()
        pictures = self.cfg.results.image or self.cfg.results.pdf
        for i in range(self.cfg.node.worker_threads):  # with pictures on, classify only
            self._spawn(f"worker-{i}", partial(
                worker.run_forever, wctx, f"{self.worker_prefix}:w{i}", self._work, self._stop,
                self.worker_idle_seconds, worker.classify_once if pictures else worker.run_once))
        if pictures:  # one thread below the workers draws the result images and PDFs
            self._spawn("pictures", partial(
                worker.run_forever, wctx, f"{self.worker_prefix}:p0", self._pictures,
                self._stop, self.worker_idle_seconds, worker.objects_once,
                worker.PICTURES_NICENESS))
        if supports_notify(self.db):  # a receiver on another machine wakes us at once
            self._listener = WorkListener(self.db, self._work.set).start()
        p = self.cfg.pacs
        dest = Destination(p.ae_title, p.host, p.port, tls=tls.client_context(self.cfg),
                           tls_server_name=tls.pacs_server_name(self.cfg),
                           sr_classes=self.cfg.pacs.sr_class_uids)
        ectx = exporter.ExportContext(self.db, dest, self.cfg.node.ae_title, self.cfg.export,
                                      on_outcome=self._on_export)
        self._spawn("exporter", partial(exporter.run_forever, ectx, f"{self.worker_prefix}:x0",
                                        self._export, self._stop))

    def _on_result(self) -> None:
        """A job done: its SR (or image, PDF) is queued for the exporter, and a classified
        study's pictures may be drawn."""
        self._export.set()
        self._pictures.set()

    def _on_classified(self, study_uid: str, predicted_class: str,
                       probabilities: Mapping[str, float], seconds: float) -> None:
        """A study classified: counted, maybe alerted, then shadowed when a trial runs."""
        self.metrics.observe_classified(predicted_class, seconds)
        self.alerts.classified(study_uid, predicted_class, probabilities)
        if self.shadow is not None:
            self.shadow.submit(study_uid)

    def _start_shadow(self) -> None:
        """The shadow runner (node.classify.shadow): idle until a trial names a version."""
        from node.classify.shadow import ShadowContext, ShadowRunner

        def model() -> tuple[str, Classifier] | None:
            s = self._holder().shadow()
            return (s.version, s.classifier) if s is not None else None

        def outcome(o: ShadowOutcome) -> None:
            self.metrics.observe_shadow(o.version, o.serving_class, o.shadow_class, o.seconds)

        self.shadow = ShadowRunner(ShadowContext(
            self.db, model, self.cfg.model.indeterminate_below, on_outcome=outcome,
            on_skipped=self.metrics.shadow_skipped.inc), self.cfg.model.shadow_backlog).start()

    def refresh_shadow_metrics(self) -> None:
        """The running trial's agreement and accuracy against feedback, from the database,
        into /metrics. Never raises (the scheduler must keep running)."""
        try:
            version = active_shadow(self.db)
            if version is None:
                self.metrics.set_shadow_summary(None, 0, None, None, None)
                return
            s = shadow_summary(self.db, version, feedback_labels(self.db))
            self.metrics.set_shadow_summary(version, s.studies, s.agreement, s.shadow_accuracy,
                                            s.serving_accuracy)
        except Exception:
            log.exception("shadow summary for /metrics failed")

    def _on_failed(self, study_uid: str, reason: str) -> None:
        """A study failed classification: counted and alerted."""
        self.metrics.observe_failed()
        self.alerts.failed_study(study_uid, reason)

    def _on_export(self, job: ClaimedExport, outcome: str, error: str | None) -> None:
        """An export attempt's outcome: counted (with the latency when an SR is acknowledged:
        the result's latency; the image and PDF built after it are not); a dead letter
        alerted."""
        ack = self._since_last_instance(job.study_uid) \
            if outcome == "delivered" and job.is_sr else None
        self.metrics.observe_export(outcome, job.study_uid, ack)
        if outcome != "delivered":
            self.metrics.observe_export_failure(failure_reason(error))
        if outcome == "dead":
            self.alerts.dead_letter(job.study_uid, job.sr_sop_uid, job.attempts, error)

    def _since_last_instance(self, study_uid: str) -> float | None:
        """Seconds since the study's newest instance file was written (its arrival); None
        when no file is left to tell."""
        try:
            newest = max((p.stat().st_mtime for p in (self.files.studies / study_uid)
                          .rglob("*.dcm")), default=None)
        except OSError:  # retention removed it meanwhile
            return None
        return None if newest is None else max(time.time() - newest, 0.0)

    def check_health(self) -> None:
        """The periodic check behind the "degraded" alert."""
        try:
            self.alerts.health(self.health())
        except Exception:  # the scheduler must keep running
            log.exception("health check for alerts failed")

    def _spawn(self, name: str, target: partial[None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _start_scheduler(self) -> None:
        sched = BackgroundScheduler(timezone="UTC")
        sched.add_job(self.sweep, "interval", seconds=self.cfg.completion.sweep_seconds,
                      id="completion-sweep", max_instances=1, coalesce=True)
        if self.role.classifies:
            sched.add_job(self.heartbeat, "interval",
                          seconds=self.cfg.node.claim_lease_seconds / 3, id="claim-heartbeat",
                          max_instances=1, coalesce=True)
            sched.add_job(self.refresh_model, "interval", seconds=self.model_check_seconds,
                          id="model-watch", max_instances=1, coalesce=True)
            sched.add_job(self.refresh_shadow_metrics, "interval",
                          seconds=max(self.model_check_seconds, SHADOW_SUMMARY_SECONDS),
                          id="shadow-summary", max_instances=1, coalesce=True)
            self._schedule_drift(sched)
            sched.add_job(partial(housekeeping.run_housekeeping, self.db, self.files,
                                  self.cfg.storage), "interval",
                          seconds=self.cfg.storage.housekeeping_seconds, id="housekeeping",
                          max_instances=1, coalesce=True)
        if self.alerts.wants("degraded"):
            sched.add_job(self.check_health, "interval",
                          seconds=self.cfg.alerts.health_check_seconds, id="health-alerts",
                          max_instances=1, coalesce=True)
        sched.start()
        self._scheduler = sched

    def _schedule_drift(self, sched: BackgroundScheduler) -> None:
        """The drift check ([drift].check_seconds; 0 = off): once at start, then periodically;
        GET /health reads its latest verdict."""
        if self.cfg.drift.check_seconds <= 0:
            return
        self.drift = DriftMonitor(self.db, self.cfg.drift, self._drift_reference)
        sched.add_job(self.drift.refresh, "interval", seconds=self.cfg.drift.check_seconds,
                      id="drift", max_instances=1, coalesce=True,
                      next_run_time=datetime.now(UTC))

    def _drift_reference(self) -> str:
        """What drift is measured against, naming the model served now."""
        m = self.current_classifier().metadata
        return reference_text(m.version, m.training_data, self.cfg.drift.baseline_windows)

    def sweep(self) -> int:
        """Complete studies that went quiet, queue quiet ones with new views after their
        result for an amended one; release claims of crashed peers. Returns count."""
        n = 0
        try:
            for uid in studies_due_quiet(self.db, self.cfg.completion.quiet_seconds):
                if mark_complete(self.db, uid, CompletionReason.QUIET):
                    log.info("study %s complete after %.0f s without new instances (not both "
                             "views seen)", uid, self.cfg.completion.quiet_seconds)
                    n += 1
            n += len(requeue_amendments(self.db, self.cfg.completion.quiet_seconds))
            lease = self.cfg.node.claim_lease_seconds
            if release_stale_claims(self.db, lease):
                self.work_queued()
            release_stale_exports(self.db, lease)
        except Exception:  # the scheduler must keep running
            log.exception("completion sweep failed")
        if n:
            self.work_queued()
        return n

    def work_queued(self) -> None:
        """A study is ready to classify: wake this process's workers and, on PostgreSQL,
        every worker process's listener (other machines included)."""
        self._work.set()
        notify_work(self.db)

    def _start_scp(self) -> None:
        """The receiver: a process of its own ([node].receiver_process) or threads here."""
        if self.cfg.node.receiver_process:
            self._receiver = ReceiverProcess(self.cfg, on_complete=self.work_queued,
                                             on_stored=self.metrics.observe_store).start()
            self.port = self._receiver.port
            return
        self._server = start_scp(self.cfg, self.files, self.db,
                                 on_complete=lambda _uid: self.work_queued())
        StoreTimer(self.metrics.observe_store).bind(self._server)
        self.port = int(self._server.server_address[1])

    @property
    def receiver_pid(self) -> int | None:
        """The receiver process's id (None when receiving in threads of this process)."""
        return self._receiver.pid if self._receiver is not None else None

    def _start_health(self) -> None:
        """The HTTP health endpoint, when [health].port is set."""
        if self.cfg.health.port:
            h = self.cfg.health
            page = PageSource(self.db, h.page_refresh_seconds)
            extras = health.Extras(metrics=self.metrics, page=page.render, token=h.token)
            self._health = health.HealthServer(h.bind_address, h.port, self.health,
                                               extras=extras).start()
            log.info("health endpoint on http://%s:%d/health", self.cfg.health.bind_address,
                     self._health.port)

    def health(self) -> health.Report:
        """Queue depth, dead letters, disk headroom and the model served (GET /health)."""
        if self.models is None:  # a receiver: no model to report, none expected
            report = health.health_report(self.db, self.cfg, None, model_expected=False)
        else:
            m = self.current_classifier().metadata
            report = health.health_report(
                self.db, self.cfg, health.ModelSummary(m.name, m.version, m.weights_sha256))
        if self._receiver is not None:
            health.add_receiver(report, self._receiver.alive(), self._receiver.restarts)
        health.add_drift(report, self.drift.latest() if self.drift is not None else None)
        return report

    def stop(self) -> None:
        """Stop accepting, let threads finish their current item, close the database."""
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None
        self._stop.set()
        self._work.set()
        self._pictures.set()
        self._export.set()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self.shadow is not None:
            self.shadow.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()
        self.alerts.stop()
        self.db.dispose()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
