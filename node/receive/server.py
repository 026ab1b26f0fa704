"""The C-ECHO/C-STORE SCP assembled from the configuration: AE, presentation contexts,
handlers, allowlist and TLS, serving in background threads of the calling process."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from node import tls
from node.config import Config
from node.dicom.codes import ACCEPTED_SOP_CLASSES, VERIFICATION
from node.dicom.pixels import accepted_transfer_syntaxes
from node.receive.allowlist import check_caller
from node.receive.association import handle_accepted, handle_rejected
from node.receive.handlers import StoreContext, handle_echo, handle_store
from storage.db import Database
from storage.filestore import FileStore

log = logging.getLogger(__name__)


def start_scp(cfg: Config, files: FileStore, db: Database,
              on_complete: Callable[[str], None]) -> ThreadedAssociationServer:
    """The C-ECHO/C-STORE SCP, serving in background threads of this process."""
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_pdu_size = cfg.node.max_pdu
    ae.maximum_associations = cfg.node.max_associations
    ae.acse_timeout = cfg.node.acse_timeout
    ae.dimse_timeout = cfg.node.dimse_timeout
    ae.network_timeout = cfg.node.network_timeout
    syntaxes = accepted_transfer_syntaxes()
    for uid in sorted(ACCEPTED_SOP_CLASSES):
        ae.add_supported_context(uid, syntaxes)
    ae.add_supported_context(VERIFICATION)
    ctx = StoreContext(files=files, db=db, patient_secret=patient_secret(cfg.storage_root),
                       on_complete=on_complete, min_free_bytes=cfg.min_free_bytes)
    handlers = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [ctx]),
                (evt.EVT_REQUESTED, partial(check_caller, cfg.caller_rules)),
                (evt.EVT_REJECTED, handle_rejected), (evt.EVT_ACCEPTED, handle_accepted)]
    return tls.start_scp(ae, (cfg.node.bind_address, cfg.node.port), handlers,
                         tls.server_context(cfg), cfg.node.acse_timeout)


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
