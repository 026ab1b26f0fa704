"""The running node: SCP, workers, exporter and scheduler wired from one validated Config."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from model.classifier import Classifier
from node import exporter, worker
from node.config import Config
from node.dicom_io import NM_IMAGE_STORAGE, SC_IMAGE_STORAGE
from node.scp import StoreContext, handle_echo, handle_store
from node.scu import Destination
from node.sr import DeviceInfo
from node.transfer_syntaxes import accepted_transfer_syntaxes
from storage.db import Database
from storage.filestore import FileStore
from storage.queue import (
    mark_complete,
    release_stale_claims,
    release_stale_exports,
    studies_due_quiet,
)

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
SOFTWARE_VERSION = "0.1.0"
STALE_CLAIM_SECONDS = 600.0


def patient_secret(root: Path) -> bytes:
    """Per-installation key for patient fingerprints (never stored with the data it hides)."""
    path = root / "patient-key.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


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
    db: Database = field(init=False)
    files: FileStore = field(init=False)
    classifier: Classifier = field(init=False)
    port: int = field(init=False, default=0)
    _server: ThreadedAssociationServer | None = field(init=False, default=None)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _work: threading.Event = field(init=False, default_factory=threading.Event)
    _export: threading.Event = field(init=False, default_factory=threading.Event)
    _scheduler: BackgroundScheduler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        """Open storage and load the model; a broken model stops start-up here."""
        self.classifier = Classifier(self.cfg.model_path, threads=self.cfg.node.torch_threads)
        self.files = FileStore(self.cfg.storage_root)
        self.db = Database(self.cfg.database_url)
        self.db.create_all()

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
        """Recover, start workers, exporter, scheduler and the SCP (in that order)."""
        self.recover()
        self._start_threads()
        self._start_scheduler()
        self._start_scp()
        log.info("node %s listening on %s:%d, model %s %s", self.cfg.node.ae_title,
                 self.cfg.node.bind_address, self.port, self.classifier.metadata.name,
                 self.classifier.metadata.version)
        return self

    def _start_threads(self) -> None:
        wctx = worker.WorkerContext(
            db=self.db, files=self.files, classifier=lambda: self.classifier,
            device=device_info(self.cfg), destination=self.cfg.pacs_destination,
            on_result=self._export.set)
        for i in range(self.cfg.node.worker_threads):
            self._spawn(f"worker-{i}", partial(worker.run_forever, wctx,
                                               f"{self.worker_prefix}:w{i}", self._work,
                                               self._stop))
        p = self.cfg.pacs
        ectx = exporter.ExportContext(self.db, Destination(p.ae_title, p.host, p.port),
                                      self.cfg.node.ae_title, self.cfg.export)
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
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.maximum_pdu_size = self.cfg.node.max_pdu
        ae.maximum_associations = self.cfg.node.max_associations
        ae.acse_timeout = self.cfg.node.acse_timeout
        ae.dimse_timeout = self.cfg.node.dimse_timeout
        ae.network_timeout = self.cfg.node.network_timeout
        syntaxes = accepted_transfer_syntaxes()
        for uid in (NM_IMAGE_STORAGE, SC_IMAGE_STORAGE):
            ae.add_supported_context(uid, syntaxes)
        ae.add_supported_context(VERIFICATION)
        ctx = StoreContext(files=self.files, db=self.db,
                           patient_secret=patient_secret(self.cfg.storage_root),
                           on_complete=lambda _uid: self._work.set())
        handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ctx]),
                    (evt.EVT_REQUESTED, self._on_requested)]
        server = ae.start_server((self.cfg.node.bind_address, self.cfg.node.port), block=False,
                                 evt_handlers=handlers)  # type: ignore[arg-type]
        if server is None:
            raise RuntimeError("SCP did not start")
        self._server = server
        self.port = int(server.server_address[1])

    def _on_requested(self, event: Event) -> None:
        """Calling-AE allowlist with optional host pinning; refusals are logged with why."""
        rules = self.cfg.caller_rules
        if not rules:
            return
        primitive = event.assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "")).strip()
        address = str(event.assoc.requestor.address)
        if any(rule.allows(calling, address) for rule in rules):
            return
        log.warning("refused association from AE %s at %s: not in [node].allowed_callers",
                    calling, address)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)

    def stop(self) -> None:
        """Stop accepting, let threads finish their current item, close the database."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
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
