"""The C-ECHO/C-STORE SCP assembled from the configuration: AE, presentation contexts,
handlers, allowlist and TLS, serving in background threads of the calling process."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from node import tls
from node.config import Config
from node.dicom.codes import ACCEPTED_SOP_CLASSES, STORAGE_SOP_CLASSES, VERIFICATION
from node.dicom.pixels import accepted_transfer_syntaxes
from node.receive.allowlist import check_caller, refused_caller
from node.receive.association import IgnoredCounts, Tallies, handle_closed, handle_rejected
from node.receive.handlers import (
    MIB,
    StoreContext,
    handle_conn_close,
    handle_echo,
    handle_store,
)
from node.receive.listener import GateLimits, PeerLog, start_server
from node.receive.rows import GroupCommit
from storage.db import Database, DatabaseBusy
from storage.filestore import FileStore, QuarantineLimits
from storage.intake import StudyLimits, count_ignored

log = logging.getLogger(__name__)


def start_scp(cfg: Config, files: FileStore, db: Database,
              on_complete: Callable[[str], None]) -> ThreadedAssociationServer:
    """The C-ECHO/C-STORE SCP behind the listener's gate, serving in background threads of
    this process."""
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_pdu_size = cfg.node.max_pdu
    ae.maximum_associations = cfg.node.max_associations
    ae.acse_timeout = cfg.node.acse_timeout
    ae.dimse_timeout = cfg.node.dimse_timeout
    ae.network_timeout = cfg.node.network_timeout
    add_storage_contexts(ae)
    recorder = partial(record_ignored, db.with_lock_wait(cfg.node.store_db_wait_seconds))
    store_db = db.with_lock_wait(cfg.node.store_db_wait_seconds)
    limits = StudyLimits(cfg.admission.max_study_instances,
                         cfg.admission.max_study_decoded_mb * MIB,
                         cfg.completion.amend_window_days)
    turn = threading.Lock() if db.dialect == "sqlite" else None  # SQLite: one writer
    ctx = StoreContext(files=files, db=store_db,
                       patient_secret=patient_secret(cfg.storage_root),
                       on_complete=on_complete, min_free_bytes=cfg.min_free_bytes,
                       max_instance_bytes=cfg.admission.max_instance_mb * MIB,
                       study_limits=limits,
                       refuse_not_applicable=cfg.admission.refuses_not_applicable,
                       refused_sop_classes=cfg.admission.refused_sop_class_uids,
                       tallies=Tallies(recorder), stager=stager(cfg),
                       write_turn=turn, db_wait_seconds=cfg.node.store_db_wait_seconds,
                       rows=None if turn is None else GroupCommit(
                           store_db, limits, turn, cfg.node.store_db_wait_seconds))
    peer_log = PeerLog(cfg.node.log_lines_per_address, cfg.node.log_window_seconds)
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ctx]),
                (evt.EVT_CONN_CLOSE, handle_conn_close),
                (evt.EVT_REQUESTED, partial(check_caller, cfg.caller_rules, peer_log)),
                (evt.EVT_REJECTED, handle_rejected, [peer_log]),
                (evt.EVT_CONN_CLOSE, handle_closed, [ctx.tallies, peer_log])]
    screen = partial(refused_caller, cfg.caller_rules, peer_log) if cfg.caller_rules else None
    return start_server(ae, (cfg.node.bind_address, cfg.node.port), handlers,
                        tls.server_context(cfg), GateLimits.from_config(cfg), peer_log, screen)


def stager(cfg: Config) -> ThreadPoolExecutor:
    """Threads that stage received files durably while their C-STOREs are parsed and
    checked (node.receive.handlers): at most one per association the SCP accepts at once,
    each idle until a C-STORE needs it."""
    return ThreadPoolExecutor(max_workers=max(1, cfg.node.max_associations),
                              thread_name_prefix="dscint-stage")


def add_storage_contexts(ae: AE) -> None:
    """Inputs (NM, SC) in the transfer syntaxes the node can decode; every other standard
    storage class in any transfer syntax (only its header is ever read, see
    node.receive.handlers); Verification."""
    syntaxes = accepted_transfer_syntaxes()
    every = [str(u) for u in AllTransferSyntaxes]
    for uid in sorted(STORAGE_SOP_CLASSES | ACCEPTED_SOP_CLASSES):
        ae.add_supported_context(uid, syntaxes if uid in ACCEPTED_SOP_CLASSES else every)
    ae.add_supported_context(VERIFICATION)


def record_ignored(db: Database, counts: IgnoredCounts, calling_ae: str) -> None:
    """One association's ignored counts into the database (a count lost to a locked database
    is logged, never an error for the sender, who was answered long ago)."""
    try:
        count_ignored(db, counts, calling_ae)
    except DatabaseBusy:
        log.warning("ignored-instance counts of an association from AE %s not recorded: the "
                    "queue database stayed locked", calling_ae)


def receive_to_files(directory: Path) -> None:
    """Process-wide, in the receiver process's start-up (never at import): pynetdicom writes
    each C-STORE's dataset to a temp file in `directory` (the store's ``receiving/``) in
    pieces instead of one growing buffer that the handler then copies, so the size cap is
    checked before anything is read and a large instance costs one copy of itself in memory
    (its parsed dataset) instead of three. Every C-STORE SCP and temp file of the process is
    affected, so a process that also hosts another SCP (a PACS stand-in reading
    `encoded_dataset`) must not call it: the in-process receiver keeps memory buffers."""
    tempfile.tempdir = str(directory)  # pynetdicom names no directory of its own
    _config.STORE_RECV_CHUNKED_DATASET = True


def patient_secret(root: Path) -> bytes:
    """Per-installation key for patient fingerprints (never stored with the data it hides)."""
    path = root / "patient-key.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this node made it first
            return _read_secret(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
    return _read_secret(path)


def _read_secret(path: Path, wait_seconds: float = 5.0) -> bytes:
    """The key, once its writer has finished (an empty key is never used)."""
    deadline = time.monotonic() + wait_seconds
    while not (data := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    if not data:
        raise RuntimeError(f"{path} is empty")
    return data


def open_file_store(cfg: Config) -> FileStore:
    """The node's file store with its configured quarantine bounds (both processes)."""
    return FileStore(cfg.storage_root, QuarantineLimits(cfg.quarantine_max_copy_bytes,
                                                        cfg.quarantine_quota_bytes))
