"""The running node: SCP, workers, exporter and scheduler wired from one validated Config."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from functools import partial

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from pynetdicom.transport import ThreadedAssociationServer

from model.classifier import Classifier
from node import tls
from node.classify import worker
from node.classify.sr import DeviceInfo
from node.config import Config
from node.export import delivery as exporter
from node.export.policy import backoff_delay
from node.export.scu import Destination
from node.logs import keep_phi_out_of_logs
from node.receive.process import ReceiverProcess
from node.receive.server import open_file_store, start_scp
from node.service import health, housekeeping
from node.service.models import ModelHolder
from storage.db import CompletionReason, Database
from storage.exports import release_stale_exports
from storage.filestore import FileStore
from storage.intake import mark_complete, studies_due_quiet
from storage.jobs import release_stale_claims

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"
STALE_CLAIM_SECONDS = 600.0


def device_info(cfg: Config) -> DeviceInfo:
    """Stable identity of this node as the SR's device observer."""
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
    db: Database = field(init=False)
    files: FileStore = field(init=False)
    models: ModelHolder = field(init=False)
    port: int = field(init=False, default=0)
    _server: ThreadedAssociationServer | None = field(init=False, default=None)
    _receiver: ReceiverProcess | None = field(init=False, default=None)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _work: threading.Event = field(init=False, default_factory=threading.Event)
    _export: threading.Event = field(init=False, default_factory=threading.Event)
    _scheduler: BackgroundScheduler | None = field(init=False, default=None)
    _health: health.HealthServer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        """Open storage and load the model; a broken model (or TLS file) stops start-up here.
        Process-wide settings are not made here: see node.service.startup."""
        tls.server_context(self.cfg)  # a missing or bad PEM file raises ConfigError here
        tls.client_context(self.cfg)
        self.files = open_file_store(self.cfg)
        self.db = Database(self.cfg.database_url)
        self.db.create_all()
        try:
            self.models = ModelHolder(self.db, self.cfg.model_path)
        except BaseException:
            self.db.dispose()
            raise

    @property
    def classifier(self) -> Classifier:
        """The model serving now."""
        return self.models.current()

    @property
    def model_version(self) -> str | None:
        """The registry version serving now; None for [model].path."""
        return self.models.version

    def current_classifier(self) -> Classifier:
        """The model to use for the next study; a job keeps the one it started with."""
        return self.models.current()

    def refresh_model(self) -> bool:
        """Follow a promotion or rollback without restart (see ModelHolder.refresh)."""
        return self.models.refresh()

    @property
    def worker_prefix(self) -> str:
        """Claims are tagged with host and AE so a restart can release its own."""
        return f"{socket.gethostname()}:{self.cfg.node.ae_title}"

    def recover(self) -> None:
        """Resume after a crash: drop temp files, re-queue work this node had claimed."""
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
            self._start_threads()
            self._start_scheduler()
            self._start_scp()
            self._start_health()
        except BaseException:  # e.g. the port is taken: nothing of ours keeps running
            self.stop()
            raise
        log.info("node %s listening on %s:%d, model %s %s", self.cfg.node.ae_title,
                 self.cfg.node.bind_address, self.port, self.classifier.metadata.name,
                 self.classifier.metadata.version)
        return self

    def _start_threads(self) -> None:
        n = self.cfg.node
        wctx = worker.WorkerContext(
            db=self.db, files=self.files, classifier=self.current_classifier,
            device=device_info(self.cfg), destination=self.cfg.pacs_destination,
            on_result=self._export.set, max_attempts=n.classify_max_attempts,
            retry_delay=partial(backoff_delay, base_seconds=n.classify_backoff_seconds,
                                cap_seconds=n.classify_backoff_cap_seconds))
        for i in range(self.cfg.node.worker_threads):
            self._spawn(f"worker-{i}", partial(worker.run_forever, wctx,
                                               f"{self.worker_prefix}:w{i}", self._work,
                                               self._stop))
        p = self.cfg.pacs
        dest = Destination(p.ae_title, p.host, p.port, tls=tls.client_context(self.cfg),
                           tls_server_name=tls.pacs_server_name(self.cfg))
        ectx = exporter.ExportContext(self.db, dest, self.cfg.node.ae_title, self.cfg.export)
        self._spawn("exporter", partial(exporter.run_forever, ectx, f"{self.worker_prefix}:x0",
                                        self._export, self._stop))

    def _spawn(self, name: str, target: partial[None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _start_scheduler(self) -> None:
        sched = BackgroundScheduler(timezone="UTC")
        sched.add_job(self.sweep, "interval", seconds=self.cfg.completion.sweep_seconds,
                      id="completion-sweep", max_instances=1, coalesce=True)
        sched.add_job(self.refresh_model, "interval", seconds=self.model_check_seconds,
                      id="model-watch", max_instances=1, coalesce=True)
        sched.add_job(partial(housekeeping.run_housekeeping, self.db, self.files,
                              self.cfg.storage), "interval",
                      seconds=self.cfg.storage.housekeeping_seconds, id="housekeeping",
                      max_instances=1, coalesce=True)
        sched.start()
        self._scheduler = sched

    def sweep(self) -> int:
        """Complete studies that went quiet; release claims of crashed peers. Returns count."""
        n = 0
        try:
            for uid in studies_due_quiet(self.db, self.cfg.completion.quiet_seconds):
                if mark_complete(self.db, uid, CompletionReason.QUIET):
                    log.info("study %s complete after %.0f s without new instances (not both "
                             "views seen)", uid, self.cfg.completion.quiet_seconds)
                    n += 1
            release_stale_claims(self.db, STALE_CLAIM_SECONDS)
            release_stale_exports(self.db, STALE_CLAIM_SECONDS)
        except Exception:  # the scheduler must keep running
            log.exception("completion sweep failed")
        if n:
            self._work.set()
        return n

    def _start_scp(self) -> None:
        """The receiver: a process of its own ([node].receiver_process) or threads here."""
        if self.cfg.node.receiver_process:
            self._receiver = ReceiverProcess(self.cfg, on_complete=self._work.set).start()
            self.port = self._receiver.port
            return
        self._server = start_scp(self.cfg, self.files, self.db,
                                 on_complete=lambda _uid: self._work.set())
        self.port = int(self._server.server_address[1])

    @property
    def receiver_pid(self) -> int | None:
        """The receiver process's id (None when receiving in threads of this process)."""
        return self._receiver.pid if self._receiver is not None else None

    def _start_health(self) -> None:
        """The HTTP health endpoint, when [health].port is set."""
        if self.cfg.health.port:
            self._health = health.HealthServer(self.cfg.health.bind_address,
                                               self.cfg.health.port, self.health).start()
            log.info("health endpoint on http://%s:%d/health", self.cfg.health.bind_address,
                     self._health.port)

    def health(self) -> health.Report:
        """Queue depth, dead letters, disk headroom and the model served (GET /health)."""
        m = self.current_classifier().metadata
        report = health.health_report(self.db, self.cfg,
                                      health.ModelSummary(m.name, m.version, m.weights_sha256))
        if self._receiver is not None:
            health.add_receiver(report, self._receiver.alive(), self._receiver.restarts)
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
        self._export.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for t in self._threads:
            t.join(timeout=30)
        self._threads.clear()
        self.db.dispose()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
