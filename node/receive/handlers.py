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
from pynetdicom.events import Event

from node.dicom.admission import admission_rejection, patient_conflict
from node.dicom.identity import is_valid_uid, patient_key, shown_uid
from node.dicom.status import Rejection, Status
from node.dicom.views import frame_views
from node.logs import redacted, redacted_traceback
from storage.db import CompletionReason, Database, StudyState
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance
from storage.intake import patient_conflict as stored_patient_conflict

log = logging.getLogger(__name__)


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
    return Status.SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE entry point: never raises, always a status."""
    sop_uid = shown_uid(getattr(event.request, "AffectedSOPInstanceUID", ""))
    try:
        return _store(event, ctx)
    except Exception as exc:  # last line of defence: the association must get an answer
        log.error("C-STORE of SOP %s from AE %s failed unexpectedly: %s", sop_uid,
                  _caller(event), redacted_traceback(exc))
        _try_quarantine(event, ctx, f"unexpected error: {redacted(exc)}", sop_uid)
        return Status.OUT_OF_RESOURCES


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
        log.error("refused SOP %s from AE %s with status 0x%04X: free disk below the "
                  "watermark ([storage].min_free_mb); nothing written", shown_uid(sop_uid),
                  caller, Status.OUT_OF_RESOURCES)
        return Status.OUT_OF_RESOURCES
    raw = bytes(event.encoded_dataset(include_meta=True))
    ds, parse_error = _parse(raw)
    if ds is None:
        return _refuse(ctx, raw, Rejection(Status.CANNOT_UNDERSTAND, parse_error), sop_uid,
                       caller)
    rejection = admission_rejection(ds, sop_class, sop_uid, ctx.decode_on_admission)
    if rejection is not None:
        return _refuse(ctx, raw, rejection, sop_uid, caller)
    return _accept(ctx, ds, raw, caller)


def _parse(raw: bytes) -> tuple[Dataset | None, str]:
    """Parse the received bytes fully (pixel data stays encoded)."""
    try:
        ds = dcmread(BytesIO(raw), force=False)
        ds.ensure_file_meta()
        return ds, ""
    except Exception as exc:  # readers raise anything (zlib.error, struct.error, ...): refuse
        return None, f"dataset cannot be parsed: {redacted(exc)}"


def _accept(ctx: StoreContext, ds: Dataset, raw: bytes, caller: str) -> int:
    """Durable write, then the queue row, then (maybe) completion; Success only after both."""
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    views = tuple(v.value for v in frame_views(ds))
    key = patient_key(ds, ctx.patient_secret)
    existed = ctx.files.instance_path(study, series, sop).exists()
    # checked before a re-sent SOP's file would be replaced (a new SOP costs no extra read:
    # record_instance refuses it under lock)
    if existed and stored_patient_conflict(ctx.db, study, key):
        return _refuse(ctx, raw, patient_conflict(study), sop, caller)
    path = ctx.files.write_instance(study, series, sop, raw)
    outcome = record_instance(ctx.db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path), views=views,
        n_frames=len(views), size_bytes=len(raw), calling_ae=caller, patient_key=key,
    ))
    if outcome.patient_mismatch:  # lost a race with another association: same rule applies
        if not existed:
            path.unlink(missing_ok=True)
        return _refuse(ctx, raw, patient_conflict(study), sop, caller)
    log.info("stored SOP %s study %s views %s from AE %s%s", sop, study, ",".join(views),
             caller, " (late: study already classified)" if outcome.late else "")
    if outcome.has_anterior and outcome.has_posterior \
            and outcome.study_state is StudyState.RECEIVING \
            and mark_complete(ctx.db, study, CompletionReason.BOTH_VIEWS):
        log.info("study %s complete: anterior and posterior present", study)
        ctx.on_complete(study)
    return Status.SUCCESS


def _refuse(ctx: StoreContext, raw: bytes, rejection: Rejection, sop_uid: str,
            caller: str) -> int:
    """Log why, keep a quarantined copy, answer the failure status."""
    log.warning("refused SOP %s from AE %s with status 0x%04X: %s", shown_uid(sop_uid), caller,
                rejection.status, rejection.reason)
    try:
        # the file name (logged) carries the UID only when it is one: never a name sent in its place
        ctx.files.quarantine(raw, rejection.reason, sop_uid if is_valid_uid(sop_uid) else "invalid")
    except (OSError, ValueError):
        log.exception("could not quarantine SOP %s", shown_uid(sop_uid))
    return rejection.status


def _try_quarantine(event: Event, ctx: StoreContext, reason: str, sop_uid: str) -> None:
    try:
        raw = bytes(event.encoded_dataset(include_meta=True))
        ctx.files.quarantine(raw, reason, sop_uid)
    except Exception:  # quarantine is best effort once something already failed
        log.exception("could not quarantine SOP %s", sop_uid)
