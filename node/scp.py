"""C-ECHO and C-STORE handlers: admission checks, durable write, queue row, then the status.

Order matters for "nothing lost": the bytes are written as received (temp file, fsync, rename),
the instance row is committed, and only then is Success returned. Every refusal gets a specific
status, a log line with the reason (UIDs and AE titles only, never patient data) and a
quarantined copy. Handlers never raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom.events import Event
from sqlalchemy import select

from node.dicom_io import Rejection, check_dataset, decode_check, frame_views, patient_key
from storage.db import Database, Study
from storage.filestore import FileStore
from storage.queue import InstanceRecord, mark_complete, record_instance

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PATIENT_CONFLICT = 0xC001  # study UID already used for another patient


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, handed in explicitly."""

    files: FileStore
    db: Database
    patient_secret: bytes
    on_complete: Callable[[str], None]
    decode_on_admission: bool = True
    min_free_bytes: int = 0


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is alive."""
    log.info("C-ECHO from AE %s", _caller(event))
    return SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE entry point: never raises, always a status."""
    sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "?")
    try:
        return _store(event, ctx)
    except Exception as exc:  # last line of defence: the association must get an answer
        log.exception("C-STORE of SOP %s from AE %s failed unexpectedly: %s", sop_uid,
                      _caller(event), type(exc).__name__)
        _try_quarantine(event, ctx, f"unexpected error: {type(exc).__name__}: {exc}", sop_uid)
        return OUT_OF_RESOURCES


def _caller(event: Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"


def _store(event: Event, ctx: StoreContext) -> int:
    caller = _caller(event)
    request = event.request
    sop_class = str(getattr(request, "AffectedSOPClassUID", ""))
    sop_uid = str(getattr(request, "AffectedSOPInstanceUID", ""))
    if ctx.min_free_bytes and ctx.files.free_bytes() < ctx.min_free_bytes:
        log.error("refused SOP %s from AE %s: free disk below watermark", sop_uid, caller)
        return OUT_OF_RESOURCES
    raw = bytes(event.encoded_dataset(include_meta=True))
    ds, parse_error = _parse(raw)
    if ds is None:
        return _refuse(ctx, raw, Rejection(CANNOT_UNDERSTAND, parse_error), sop_uid, caller)
    rejection = _admission(ds, sop_class, sop_uid, ctx)
    if rejection is not None:
        return _refuse(ctx, raw, rejection, sop_uid, caller)
    return _accept(ctx, ds, raw, caller)


def _parse(raw: bytes) -> tuple[Dataset | None, str]:
    """Parse the received bytes fully (pixel data stays encoded)."""
    try:
        ds = dcmread(BytesIO(raw), force=False)
        ds.ensure_file_meta()
        return ds, ""
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OSError) as exc:
        return None, f"dataset cannot be parsed: {type(exc).__name__}: {exc}"


def _admission(ds: Dataset, sop_class: str, sop_uid: str, ctx: StoreContext
               ) -> Rejection | None:
    """All checks that decide whether we keep the instance."""
    rejection = check_dataset(ds, sop_class)
    if rejection is not None:
        return rejection
    if str(ds.SOPInstanceUID) != sop_uid:
        return Rejection(0xA900, f"SOP Instance UID in dataset {ds.SOPInstanceUID} differs from "
                                 f"the C-STORE request's {sop_uid}")
    if ctx.decode_on_admission:
        rejection = decode_check(ds)
        if rejection is not None:
            return rejection
    key = patient_key(ds, ctx.patient_secret)
    if _patient_conflict(ctx.db, str(ds.StudyInstanceUID), key):
        return Rejection(PATIENT_CONFLICT, f"study {ds.StudyInstanceUID} already holds another "
                                           "patient's instances")
    return None


def _patient_conflict(db: Database, study_uid: str, key: str | None) -> bool:
    """A study UID reused for a different patient must not merge two patients' images."""
    with db.read_session() as s:
        stored = s.execute(select(Study.patient_key).where(Study.study_uid == study_uid)
                           ).scalar_one_or_none()
    return stored is not None and key is not None and stored != key


def _accept(ctx: StoreContext, ds: Dataset, raw: bytes, caller: str) -> int:
    """Durable write, then the queue row, then (maybe) completion; Success only after both."""
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    views = tuple(v.value for v in frame_views(ds))
    existed = ctx.files.instance_path(study, series, sop).exists()
    path = ctx.files.write_instance(study, series, sop, raw)
    outcome = record_instance(ctx.db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path), views=views,
        n_frames=len(views), size_bytes=len(raw), calling_ae=caller,
        patient_key=patient_key(ds, ctx.patient_secret),
    ))
    if outcome.patient_mismatch:  # lost a race with another association: same rule applies
        if not existed:
            path.unlink(missing_ok=True)
        return _refuse(ctx, raw, Rejection(PATIENT_CONFLICT, f"study {study} already holds "
                                           "another patient's instances"), sop, caller)
    log.info("stored SOP %s study %s views %s from AE %s%s", sop, study, ",".join(views),
             caller, " (late: study already classified)" if outcome.late else "")
    if outcome.has_anterior and outcome.has_posterior and outcome.study_state == "receiving" \
            and mark_complete(ctx.db, study, "both_views"):
        log.info("study %s complete: anterior and posterior present", study)
        ctx.on_complete(study)
    return SUCCESS


def _refuse(ctx: StoreContext, raw: bytes, rejection: Rejection, sop_uid: str,
            caller: str) -> int:
    """Log why, keep a quarantined copy, answer the failure status."""
    log.warning("refused SOP %s from AE %s with status 0x%04X: %s", sop_uid, caller,
                rejection.status, rejection.reason)
    try:
        ctx.files.quarantine(raw, rejection.reason, sop_uid)
    except (OSError, ValueError):
        log.exception("could not quarantine SOP %s", sop_uid)
    return rejection.status


def _try_quarantine(event: Event, ctx: StoreContext, reason: str, sop_uid: str) -> None:
    try:
        raw = bytes(event.encoded_dataset(include_meta=True))
        ctx.files.quarantine(raw, reason, sop_uid)
    except Exception:  # quarantine is best effort once something already failed
        log.exception("could not quarantine SOP %s", sop_uid)
