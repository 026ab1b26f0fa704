"""The running node: SCP, workers, exporter and scheduler wired from one validated Config."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from pynetdicom.transport import ThreadedAssociationServer

from model.classifier import Classifier
from model.export import ModelFileError
from model.memory import release_library_pages, trim_memory, tune_malloc
from node import exporter, health, housekeeping, tls, worker
from node.config import Config
from node.dicom_io import ACCEPTED_SOP_CLASSES
from node.receiver import ReceiverProcess, keep_phi_out_of_logs, start_scp
from node.scu import Destination
from node.sr import DeviceInfo, slim_highdicom_tables
from storage.db import Database
from storage.filestore import FileStore
from storage.queue import (
    mark_complete,
    release_stale_claims,
    release_stale_exports,
    studies_due_quiet,
)
from storage.registry import ModelRecord, serving_model

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
    classifier: Classifier = field(init=False)
    model_version: str | None = field(init=False, default=None)  # None: [model].path
    _model_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _failed_model: str | None = field(init=False, default=None)
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
        """Open storage and load the model; a broken model (or TLS file) stops start-up here."""
        tune_malloc()  # before any of our threads exist: memory, see its docstring
        tls.server_context(self.cfg)  # a missing or bad PEM file raises ConfigError here
        tls.client_context(self.cfg)
        self.files = FileStore(self.cfg.storage_root)
        self.db = Database(self.cfg.database_url)
        self.db.create_all()
        slim_highdicom_tables(ACCEPTED_SOP_CLASSES)  # before the model: a lower memory peak
        trim_memory()
        release_library_pages()  # torch's start-up code, before the model: a lower peak too
        try:
            self.classifier, self.model_version = self._initial_classifier()
        except BaseException:
            self.db.dispose()
            raise
        release_library_pages()  # what loading and checking the model ran once

    def _initial_classifier(self) -> tuple[Classifier, str | None]:
        """The registry's serving version if there is one that loads, else [model].path."""
        rec = serving_model(self.db)
        if rec is not None:
            try:
                return self._load_registered(rec), rec.version
            except ModelFileError as exc:
                log.error("registry model %s does not load (%s): serving [model].path %s",
                          rec.version, exc, self.cfg.model_path)
        return Classifier(self.cfg.model_path, threads=self.cfg.node.torch_threads), None

    def _load_registered(self, rec: ModelRecord) -> Classifier:
        """Load and check fully (weights hash, dry run) before anything may use it."""
        clf = Classifier(Path(rec.path), threads=self.cfg.node.torch_threads)
        if clf.metadata.weights_sha256 != rec.weights_sha256:
            raise ModelFileError(f"{rec.path}: weights differ from registry entry {rec.version}")
        return clf

    def current_classifier(self) -> Classifier:
        """The model to use for the next study; a job keeps the one it started with."""
        with self._model_lock:
            return self.classifier

    def refresh_model(self) -> bool:
        """Follow a promotion or rollback without restart: load the new model completely,
        then swap the reference under the lock. True when the served model changed."""
        try:
            rec = serving_model(self.db)
        except Exception:  # the scheduler must keep running
            log.exception("model registry check failed")
            return False
        if rec is None or rec.version in (self.model_version, self._failed_model):
            return False
        try:
            new = self._load_registered(rec)
        except ModelFileError as exc:
            log.error("cannot serve model %s: %s; keeping %s", rec.version, exc,
                      self.classifier.metadata.version)
            self._failed_model = rec.version
            return False
        with self._model_lock:
            old, self.classifier, self.model_version = self.classifier, new, rec.version
        log.info("now serving model %s %s (was %s)", new.metadata.name, rec.version,
                 old.metadata.version)
        return True

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
        wctx = worker.WorkerContext(
            db=self.db, files=self.files, classifier=self.current_classifier,
            device=device_info(self.cfg), destination=self.cfg.pacs_destination,
            on_result=self._export.set)
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
                if mark_complete(self.db, uid, "quiet"):
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
