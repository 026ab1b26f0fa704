"""C-ECHO and C-STORE handlers: admission checks, durable write, queue row, then the status.

Order matters for "nothing lost": the bytes are written as received (temp file, fsync, rename),
the instance row is committed, and only then is Success returned. Every refusal gets a specific
status, a log line with the reason (UIDs and AE titles only, never patient data) and a
quarantined copy. Handlers never raise.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom.events import Event
from sqlalchemy import select

from node.dicom_io import (
    Rejection,
    check_dataset,
    decode_check,
    frame_views,
    is_valid_uid,
    patient_key,
)
from storage.db import Database, Study
from storage.filestore import FileStore
from storage.queue import InstanceRecord, mark_complete, record_instance

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PATIENT_CONFLICT = 0xC001  # study UID already used for another patient
BAD_PIXEL_MODULE = 0xC013  # as node.dicom_io's STATUS_BAD_PIXEL_MODULE
MAX_RESCALE = 1e20  # 16-bit counts times this stay far below float32's 3.4e38
# Specific Character Set defined terms (PS3.3 C.12.1.1.2, Tables C.12-2 to C.12-5). Spelled
# out so the receiver process need not import highdicom (19 MiB); the SR is written in the
# source's set where highdicom can write it, else in UTF-8 (node.sr.sr_character_set).
DEFINED_CHARSETS = frozenset({
    "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
    "ISO_IR 13", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
    "ISO_IR 203", "ISO 2022 IR 6", "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109",
    "ISO 2022 IR 110", "ISO 2022 IR 126", "ISO 2022 IR 127", "ISO 2022 IR 13",
    "ISO 2022 IR 138", "ISO 2022 IR 144", "ISO 2022 IR 148", "ISO 2022 IR 166",
    "ISO 2022 IR 203", "ISO 2022 IR 58", "ISO 2022 IR 87", "ISO 2022 IR 159",
    "ISO 2022 IR 149", "GB18030", "GBK",
})
# pydicom quotes element values in its messages ('DOE^JOHN' typed into a UID field, say)
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")
# A-ASSOCIATE-RJ (result, source, diagnostic) that pynetdicom itself sends, in words
_REJECT_REASONS: dict[tuple[object, object, object], str] = {
    (0x02, 0x03, 0x02): "too many simultaneous associations ([node].max_associations)",
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x01, 0x02, 0x02): "protocol version not supported",
}
# presentation context results (PS3.8 9.3.3.2)
_CONTEXT_REASONS = {0x01: "user rejection", 0x02: "no reason given",
                    0x03: "SOP class not supported", 0x04: "transfer syntaxes not supported"}


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
    sop_uid = shown_uid(getattr(event.request, "AffectedSOPInstanceUID", ""))
    try:
        return _store(event, ctx)
    except Exception as exc:  # last line of defence: the association must get an answer
        log.error("C-STORE of SOP %s from AE %s failed unexpectedly: %s\n%s", sop_uid,
                  _caller(event), redacted(exc), "".join(traceback.format_tb(exc.__traceback__)))
        _try_quarantine(event, ctx, f"unexpected error: {type(exc).__name__}: {exc}", sop_uid)
        return OUT_OF_RESOURCES


def shown_uid(value: object) -> str:
    """A UID from the network as it may appear in a log: invalid ones are not echoed (a
    sender may put anything there, a patient's name included)."""
    text = str(value or "")
    return text if is_valid_uid(text) else f"(invalid UID, length {len(text)})"


def redacted(exc: BaseException) -> str:
    """An exception in one line with quoted values blanked, for logs and refusal reasons."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {_QUOTED.sub('<value>', lines[0] if lines else '')}"[:300]


class RedactedTracebacks(logging.Filter):
    """Exception messages may quote element values (a name typed into the character set
    field, say): a logged traceback keeps its frames, its message loses quoted values."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's exception text; never drops a record."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.exc_text = ("Traceback (most recent call last):\n"
                               + "".join(traceback.format_tb(exc.__traceback__)) + redacted(exc))
            record.exc_info = None
        return True


def _requestor(event: Event) -> tuple[str, str]:
    try:
        return str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
    except AttributeError:
        return "?", "?"


def handle_rejected(event: Event) -> None:
    """Log associations pynetdicom itself refuses (mostly the association limit), with why.
    Never raises."""
    try:
        caller, address = _requestor(event)
        rj = getattr(event.assoc.acceptor, "primitive", None)
        key = (getattr(rj, "result", None), getattr(rj, "result_source", None),
               getattr(rj, "diagnostic", None))
        reason = _REJECT_REASONS.get(key, f"result {key[0]}, source {key[1]}, reason {key[2]}")
        log.warning("refused association from AE %s at %s: %s", caller, address, reason)
    except Exception:  # logging must not disturb the association
        log.exception("could not describe a refused association")


def handle_accepted(event: Event) -> None:
    """Log presentation contexts refused at negotiation: the sender cannot store those at
    all, and without this line nobody on our side would know why. Never raises."""
    try:
        caller, address = _requestor(event)
        for cx in getattr(event.assoc, "rejected_contexts", []):
            abstract = str(cx.abstract_syntax or "")
            name = UID(abstract).name if is_valid_uid(abstract) else shown_uid(abstract)
            syntaxes = ", ".join(shown_uid(ts) for ts in cx.transfer_syntax) or "none"
            log.warning("association from AE %s at %s: refused presentation context %s with "
                        "transfer syntax(es) %s: %s", caller, address, name, syntaxes,
                        _CONTEXT_REASONS.get(cx.result or 0, f"result {cx.result}"))
    except Exception:  # logging must not disturb the association
        log.exception("could not describe refused presentation contexts")


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
                  caller, OUT_OF_RESOURCES)
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
    except Exception as exc:  # readers raise anything (zlib.error, struct.error, ...): refuse
        return None, f"dataset cannot be parsed: {redacted(exc)}"


def _admission(ds: Dataset, sop_class: str, sop_uid: str, ctx: StoreContext
               ) -> Rejection | None:
    """All checks that decide whether we keep the instance."""
    rejection = check_dataset(ds, sop_class) or _rescale_rejection(ds) or _charset_rejection(ds)
    if rejection is not None:
        return rejection
    if str(ds.SOPInstanceUID) != sop_uid:
        return Rejection(0xA900, f"SOP Instance UID in dataset {ds.SOPInstanceUID} differs from "
                                 f"the C-STORE request's {shown_uid(sop_uid)}")
    if ctx.decode_on_admission:
        rejection = decode_check(ds)
        if rejection is not None:
            return rejection
    return None


def _conflict_rejection(ctx: StoreContext, ds: Dataset) -> Rejection | None:
    """A study UID reused for another patient, checked before a re-sent SOP's file would be
    replaced (a new SOP costs no extra read: record_instance refuses it under lock)."""
    if _patient_conflict(ctx.db, str(ds.StudyInstanceUID), patient_key(ds, ctx.patient_secret)):
        return Rejection(PATIENT_CONFLICT, f"study {ds.StudyInstanceUID} already holds another "
                                           "patient's instances")
    return None


def _rescale_rejection(ds: Dataset) -> Rejection | None:
    """A Rescale Slope or Intercept that would overflow float32 counts into inf/NaN (the
    classifier would only fail later): refused at admission instead."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        try:
            value = abs(float(ds.get(keyword) or 0))
        except (TypeError, ValueError, OverflowError):
            continue  # not a number at all: check_dataset already refuses those
        if value > MAX_RESCALE:
            return Rejection(BAD_PIXEL_MODULE, f"{keyword} is out of range (|value| > 1e20)")
    return None


def _charset_rejection(ds: Dataset) -> Rejection | None:
    """Specific Character Set terms DICOM does not define: the text (names, IDs the SR
    copies) cannot be decoded with confidence. The value itself is never echoed."""
    value = ds.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str | bytes) else list(value or [])
    unknown = [t for t in terms if str(t).strip() and str(t).strip() not in DEFINED_CHARSETS]
    if unknown:
        return Rejection(CANNOT_UNDERSTAND, f"Specific Character Set has {len(unknown)} term(s) "
                                            "DICOM does not define (PS3.3 C.12.1.1.2)")
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
    rejection = _conflict_rejection(ctx, ds) if existed else None
    if rejection is not None:
        return _refuse(ctx, raw, rejection, sop, caller)
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
    log.warning("refused SOP %s from AE %s with status 0x%04X: %s", shown_uid(sop_uid), caller,
                rejection.status, rejection.reason)
    try:
        # the file name (logged) carries the UID only when it is one: never a name sent in its place
        ctx.files.quarantine(raw, rejection.reason, sop_uid if is_valid_uid(sop_uid) else "invalid")
    except (OSError, ValueError):
        log.exception("could not quarantine SOP %s", sop_uid)
    return rejection.status


def _try_quarantine(event: Event, ctx: StoreContext, reason: str, sop_uid: str) -> None:
    try:
        raw = bytes(event.encoded_dataset(include_meta=True))
        ctx.files.quarantine(raw, reason, sop_uid)
    except Exception:  # quarantine is best effort once something already failed
        log.exception("could not quarantine SOP %s", sop_uid)
