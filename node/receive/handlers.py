"""C-ECHO and C-STORE handlers: admission checks, durable write, queue row, then the status.

pynetdicom writes each received dataset to a temp file (node.receive.server turns that on), so
a C-STORE costs memory for its parsed dataset only, and the encoded size is checked before
anything is parsed. A deflated body is inflated here with a bound, never by pydicom.

Order matters for "nothing lost, nothing left behind": the bytes as received are staged
durably (temp file, fsync), the instance row is committed, then the staged file is renamed
into place, and only then is Success returned. The staging runs in `StoreContext.stager`'s
threads while the dataset is parsed and checked (the fsync waits on the disk, the checks on
the CPU: one association's C-STORE no longer waits for both one after the other); the row is
committed only once the staged file is durable, and a refused instance's staged file is
removed before the handler returns. On SQLite the receiver's threads take turns to write
(`_write_turn`), so concurrent associations queue on a lock rather than in SQLite's sleeping
busy handler, and the rows of those waiting are committed together, one transaction and one
fsync (node.receive.rows: group commit). A refused row or a database locked for longer
than the C-STORE may wait leaves no file (a re-sent SOP's previous file is untouched). Every
refusal gets a specific status, a log line with the reason (UIDs and AE titles only, never
patient data) and a quarantined copy (of which only the prefix the quarantine keeps is read).

Every standard storage SOP class is negotiated (node.receive.server), so a PACS routing a whole
study never fails on one object. What is not an input (node.dicom.admission.ignore_reason: CT,
SR, presentation states, KOS, PDF, a Secondary Capture of another modality) and the node's own
objects routed back are answered Success and not kept: no file, no row, no study, no job; only
a count per SOP class (written once per association, see node.receive.association). Only its
header is read (pixel data and large values never), whatever its size. A site may refuse SOP
classes instead ([admission].refuse_sop_classes: 0x0122).
Handlers never raise.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.events import Event

from node.dicom.admission import Ignored, admission_rejection, ignore_reason, patient_conflict
from node.dicom.applicability import Applicability, whole_body_planar
from node.dicom.codes import ACCEPTED_SOP_CLASSES
from node.dicom.identity import is_valid_uid, patient_key, shown_uid
from node.dicom.pixels import pixel_geometry
from node.dicom.status import Rejection, Status
from node.dicom.views import frame_views
from node.logs import redacted, redacted_traceback
from node.receive.association import REFUSED, REFUSED_BY_SITE, STORED, Tallies
from node.receive.rows import GroupCommit
from storage.db import CompletionReason, Database, DatabaseBusy, StudyState, lock_wait_as_busy
from storage.filestore import FileStore
from storage.intake import (
    InstanceRecord,
    RecordOutcome,
    Refusal,
    StudyLimits,
    mark_complete,
    record_instance,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_INSTANCE_BYTES = 64 * MIB  # [admission].max_instance_mb's default
INFLATE_CHUNK = MIB  # a deflated body is inflated (and counted) in pieces this size
HEADER_DEFER_BYTES = 4096  # an ignored instance's header: longer values are never read
DEFER_BYTES = 64 * 1024  # an input's values longer than this are read from its file on use

NOT_JUDGED = Applicability(True, "not judged (admission skipped)")  # _accept called directly


@dataclass(frozen=True)
class StoreContext:
    """What the C-STORE handler needs, handed in explicitly."""

    files: FileStore
    db: Database
    patient_secret: bytes
    on_complete: Callable[[str], None]
    decode_on_admission: bool = True
    min_free_bytes: int = 0
    refuse_not_applicable: bool = False  # [admission].not_applicable = "refuse"
    max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES  # encoded (deflated: inflated)
    study_limits: StudyLimits = field(default_factory=StudyLimits)
    refused_sop_classes: frozenset[str] = frozenset()  # [admission].refuse_sop_classes (UIDs)
    tallies: Tallies | None = None  # per-association counts for the summary line
    # stages received files durably while they are parsed and checked (None: in turn)
    stager: Executor | None = None
    # SQLite: the receiver's threads take turns to write (see _write_turn); None: no turns
    write_turn: threading.Lock | None = None
    # SQLite: queue rows of concurrent C-STOREs committed together (node.receive.rows,
    # holding write_turn); None: each C-STORE commits its own
    rows: GroupCommit | None = None
    db_wait_seconds: float = 30.0  # [node].store_db_wait_seconds: the longest turn wait


def handle_echo(event: Event) -> int:
    """C-ECHO: the node is alive."""
    log.info("C-ECHO from AE %s", _caller(event))
    return Status.SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE entry point: never raises, always a status."""
    sop_uid = shown_uid(getattr(event.request, "AffectedSOPInstanceUID", ""))
    try:
        answer = _store(event, ctx)
    except Exception as exc:  # last line of defence: the association must get an answer
        log.error("C-STORE of SOP %s from AE %s failed unexpectedly: %s", sop_uid,
                  _caller(event), redacted_traceback(exc))
        _try_quarantine(event, ctx, f"unexpected error: {redacted(exc)}", sop_uid)
        answer = Status.OUT_OF_RESOURCES
    status = Status.SUCCESS if isinstance(answer, Ignored) else answer
    _tally(event, ctx, answer, status)
    return status


def _tally(event: Event, ctx: StoreContext, answer: int | Ignored, status: int) -> None:
    """Count the answer for the association's summary line. Never raises."""
    if ctx.tallies is None:
        return
    try:
        sop_class = str(getattr(event.request, "AffectedSOPClassUID", ""))
        if isinstance(answer, Ignored):
            kind = answer.value
        elif status == Status.SUCCESS:
            kind = STORED
        elif sop_class in ctx.refused_sop_classes and status == Status.SOP_CLASS_NOT_SUPPORTED:
            kind = REFUSED_BY_SITE
        else:
            kind = f"{REFUSED} 0x{status:04X}"
        ctx.tallies.count(event.assoc, kind, sop_class)
    except Exception:  # counting must not change the answer
        log.exception("could not tally a C-STORE")


def handle_conn_close(event: Event) -> None:
    """A C-STORE cut off mid-transfer (the peer went away, or aborted): remove the file
    pynetdicom was writing its dataset to (it removes only those it hands to a handler, and
    would leave one per interrupted transfer). Never raises."""
    try:
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)  # pynetdicom 3's message in progress
        if partial is None:
            return
        partial.close()
        path = Path(partial.name)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        log.warning("association with AE %s closed during a C-STORE; its partial dataset "
                    "(%d bytes) removed", _caller(event), size)
    except Exception:  # cleaning up must not disturb the association's end
        log.exception("could not remove an interrupted C-STORE's partial dataset")


def received(event: Event) -> Path | bytes:
    """The received dataset, file meta included: the file pynetdicom wrote it to (deleted once
    the handler returns) where the receiver process turned that on
    (node.receive.server.receive_to_files), else its bytes."""
    path = event.dataset_path  # None when received in memory
    return Path(path) if path else bytes(event.encoded_dataset(include_meta=True))


def _caller(event: Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"


def _store(event: Event, ctx: StoreContext) -> int | Ignored:
    caller = _caller(event)
    request = event.request
    sop_class = str(getattr(request, "AffectedSOPClassUID", ""))
    sop_uid = str(getattr(request, "AffectedSOPInstanceUID", ""))
    if sop_class in ctx.refused_sop_classes:  # the site's choice: counted, not quarantined
        return Status.SOP_CLASS_NOT_SUPPORTED
    if sop_class not in ACCEPTED_SOP_CLASSES:  # never kept: no disk or size check applies
        return ignore_reason(_header(received(event)), sop_class) or Ignored.NOT_INPUT
    if ctx.min_free_bytes and ctx.files.free_bytes() < ctx.min_free_bytes:
        log.error("refused SOP %s from AE %s with status 0x%04X: free disk below the "
                  "watermark ([storage].min_free_mb); nothing written", shown_uid(sop_uid),
                  caller, Status.OUT_OF_RESOURCES)
        return Status.OUT_OF_RESOURCES
    raw = received(event)
    size = _size(raw)
    if size > ctx.max_instance_bytes:
        return _refuse(ctx, raw, Rejection(
            Status.TOO_LARGE, f"encoded size {size} bytes is over [admission].max_instance_mb "
                              f"({ctx.max_instance_bytes // MIB} MiB); not parsed"),
            sop_uid, caller)
    staging = ctx.stager.submit(ctx.files.stage, raw) if ctx.stager is not None else None
    try:
        return _admit(ctx, raw, sop_class, sop_uid, caller, staging)
    finally:
        if staging is not None:  # always waited for: pynetdicom removes `raw` after return
            _discard_staged(ctx, staging)


def _admit(ctx: StoreContext, raw: Path | bytes, sop_class: str, sop_uid: str, caller: str,
           staging: Future[Path] | None) -> int | Ignored:
    """Parse, admission checks and the applicability gate, then _accept."""
    ds = _parse(raw, ctx.max_instance_bytes)
    if isinstance(ds, Rejection):
        return _refuse(ctx, raw, ds, sop_uid, caller)
    ignored = ignore_reason(ds, sop_class)
    if ignored is not None:
        return ignored
    rejection = admission_rejection(ds, sop_class, sop_uid, ctx.decode_on_admission)
    if rejection is not None:
        return _refuse(ctx, raw, rejection, sop_uid, caller)
    verdict = whole_body_planar(ds)
    if not verdict.applicable and ctx.refuse_not_applicable:
        return _refuse(ctx, raw, Rejection(Status.NOT_APPLICABLE, verdict.reason), sop_uid,
                       caller)
    return _accept(ctx, ds, raw, caller, verdict, staging)


def _discard_staged(ctx: StoreContext, staging: Future[Path]) -> None:
    """Wait for a staging started in _store; remove its file unless it was published. A
    staging that failed left nothing (its error is the answer's only where _accept used it)."""
    try:
        staged = staging.result()
    except Exception as exc:
        log.warning("staging a received file failed: %s", redacted(exc))
        return
    ctx.files.discard(staged)


def _parse(raw: Path | bytes, inflate_limit: int) -> Dataset | Rejection:
    """Parse the received dataset (pixel data stays encoded; from a file, long values are
    left on disk until used: the handler reads a native instance's header only, issue 18);
    a deflated body is inflated here with a bound (pydicom would inflate all of it at once,
    whatever its size)."""
    try:
        with raw.open("rb") if isinstance(raw, Path) else BytesIO(raw) as fp:
            meta = _file_meta(fp)
            if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                return _parse_deflated(fp, meta, inflate_limit)
            fp.seek(0)
            # a received file: values over DEFER_BYTES (the pixels) stay on disk, read only
            # if a check asks (a compressed instance's frames); a native one never is
            ds = dcmread(fp, force=False,
                         defer_size=DEFER_BYTES if isinstance(raw, Path) else None)
        ds.ensure_file_meta()
        return ds
    except Exception as exc:  # readers raise anything (zlib.error, struct.error, ...): refuse
        return Rejection(Status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {redacted(exc)}")


def _header(raw: Path | bytes) -> Dataset | None:
    """An ignored instance's header, to tell the node's own objects from others: pixel data
    and long values never read, a deflated body never inflated; None when unreadable."""
    try:
        with raw.open("rb") if isinstance(raw, Path) else BytesIO(raw) as fp:
            if _file_meta(fp).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                return None
            fp.seek(0)
            return dcmread(fp, stop_before_pixels=True, defer_size=HEADER_DEFER_BYTES)
    except Exception:  # whatever it is, it is not an input: answered Success all the same
        return None


def _file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The Part-10 file meta group, `fp` left just past it (at the body)."""
    read_preamble(fp, False)
    return FileMetaDataset(read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                        stop_when=_past_meta))


def _past_meta(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    """Stops reading at the first element after the file meta group (0002)."""
    return tag >> 16 != 2


def _parse_deflated(fp: BinaryIO, meta: FileMetaDataset, limit: int) -> Dataset | Rejection:
    """`fp` at the deflated body: its inflated size is counted in pieces first, and only a
    body within `limit` is inflated (into one buffer of exactly that size) and parsed as
    Explicit VR Little Endian."""
    body_at = fp.tell()
    size = inflated_size(fp, limit)
    if size is None:
        return Rejection(Status.TOO_LARGE, f"deflated body inflates to more than {limit} "
                                           "bytes ([admission].max_instance_mb); not parsed")
    fp.seek(body_at)
    body = zlib.decompress(fp.read(), -zlib.MAX_WBITS, max(size, 1))
    ds = read_dataset(BytesIO(body), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds


def inflated_size(fp: BinaryIO, limit: int) -> int | None:
    """Size of the raw deflate stream read from `fp`, inflated piece by piece and thrown away
    (memory stays at a piece whatever the ratio); None once it passes `limit`. zlib.error
    for a corrupt or truncated stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(INFLATE_CHUNK)
        out = inflater.decompress(data, INFLATE_CHUNK)
        if not data and not out:
            raise zlib.error("deflated body is truncated")
        total += len(out)
        if total > limit:
            return None
    return total


def _accept(ctx: StoreContext, ds: Dataset, raw: Path | bytes, caller: str,
            verdict: Applicability = NOT_JUDGED, staging: Future[Path] | None = None) -> int:
    """Staged durable copy, the queue row, the rename into place, then (maybe) completion:
    Success only after bytes and row are durable; a refused or unwritten row leaves no file.

    `raw` is the received file (or its bytes). `verdict` is the applicability gate's, judged
    in _store with admission; a caller that skips admission (tests of the completion rule)
    skips the gate too. `staging`: the durable copy _store started (waited for here, before
    the row); None stages it now."""
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    views = tuple(v.value for v in frame_views(ds))
    key = patient_key(ds, ctx.patient_secret)
    path = ctx.files.instance_path(study, series, sop)
    record = InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path),
        views=views, n_frames=len(views), size_bytes=_size(raw), calling_ae=caller,
        patient_key=key, applicable=verdict.applicable,
        applicability_reason=verdict.reason, decoded_bytes=_decoded_bytes(ds))
    staged = ctx.files.stage(raw) if staging is None else staging.result()
    try:
        outcome = _record_row(ctx, record)
        if outcome.refusal is None:
            ctx.files.publish(staged, study, series, sop)
    except DatabaseBusy:
        log.warning("refused SOP %s from AE %s with status 0x%04X: the queue database stayed "
                    "locked for [node].store_db_wait_seconds; nothing kept (the camera may "
                    "retry)", sop, caller, Status.OUT_OF_RESOURCES)
        return Status.OUT_OF_RESOURCES
    finally:
        ctx.files.discard(staged)  # nothing left once published
    if outcome.refusal is not None:
        return _refuse(ctx, raw, _intake_rejection(ctx, outcome, study), sop, caller)
    log.info("stored SOP %s study %s views %s from AE %s%s%s", sop, study, ",".join(views),
             caller, " (late: study already classified)" if outcome.late else "",
             "" if verdict.applicable else f" (not classified: {verdict.reason})")
    complete_if_both_views(ctx, study, outcome)
    return Status.SUCCESS


def _record_row(ctx: StoreContext, record: InstanceRecord) -> RecordOutcome:
    """The instance's queue row, committed: with the rows of other associations' C-STOREs
    waiting for the same turn where the receiver groups commits (SQLite), else alone."""
    if ctx.rows is not None:
        return ctx.rows.record(record)
    with _write_turn(ctx):
        return record_instance(ctx.db, record, limits=ctx.study_limits)


def complete_if_both_views(ctx: StoreContext, study: str, outcome: RecordOutcome) -> None:
    """Both views in a receiving study: complete it now. The instance is already stored, so a
    database locked past the C-STORE's wait leaves completion to the quiet sweep."""
    if not (outcome.has_anterior and outcome.has_posterior
            and outcome.study_state is StudyState.RECEIVING):
        return
    try:
        with _write_turn(ctx), lock_wait_as_busy("mark_complete"):
            queued = mark_complete(ctx.db, study, CompletionReason.BOTH_VIEWS)
    except DatabaseBusy:
        log.warning("study %s has both views but the queue database stayed locked; the quiet "
                    "sweep completes it", study)
        return
    if queued:
        log.info("study %s complete: anterior and posterior present", study)
        ctx.on_complete(study)


@contextmanager
def _write_turn(ctx: StoreContext) -> Iterator[None]:
    """SQLite has one writer at a time. Concurrent C-STOREs of this process wait for their
    turn on a lock, woken the moment the writer before them commits, instead of in SQLite's
    busy handler, which sleeps 1, 2, 5, 10, ... 100 ms between tries whatever happened
    meanwhile (issue 18: four associations queued behind each other's commits). The turn
    waits at most [node].store_db_wait_seconds (DatabaseBusy after that, as SQLite's wait);
    SQLite's own wait then covers other processes only."""
    if ctx.write_turn is None:
        yield
        return
    if not ctx.write_turn.acquire(timeout=ctx.db_wait_seconds):
        raise DatabaseBusy("waited [node].store_db_wait_seconds for the receiver's write turn")
    try:
        yield
    finally:
        ctx.write_turn.release()


def _intake_rejection(ctx: StoreContext, outcome: RecordOutcome, study: str) -> Rejection:
    """The status and reason of a row record_instance refused (nothing was kept)."""
    limits, detail = ctx.study_limits, outcome.detail
    if outcome.refusal is Refusal.NO_PATIENT_IDENTITY:
        return Rejection(Status.NO_PATIENT_IDENTITY,
                         f"no patient attributes (Patient ID, Name and Birth Date empty) but "
                         f"{detail}: an instance that cannot be matched to it is not added")
    if outcome.refusal is Refusal.SOP_IN_OTHER_STUDY:
        return Rejection(Status.SOP_IN_OTHER_STUDY,
                         f"SOP Instance UID already {detail}; not moved to study {study}")
    if outcome.refusal is Refusal.STUDY_INSTANCES:
        return Rejection(Status.STUDY_LIMIT, f"{detail}: [admission].max_study_instances is "
                                             f"{limits.max_instances}")
    if outcome.refusal is Refusal.STUDY_DECODED_BYTES:
        return Rejection(Status.STUDY_LIMIT,
                         f"{detail}: over [admission].max_study_decoded_mb "
                         f"({limits.max_decoded_bytes // MIB} MiB)")
    return patient_conflict(study)  # lost a race with another association: same rule applies


def _decoded_bytes(ds: Dataset) -> int:
    """rows x columns x frames x 4, what the per-study cap sums (0 when admission was
    skipped and the pixel module is unusable)."""
    geometry = pixel_geometry(ds)
    return 0 if isinstance(geometry, Rejection) else geometry.decoded_bytes


def _size(raw: Path | bytes) -> int:
    return len(raw) if isinstance(raw, bytes) else raw.stat().st_size


def _quarantine(files: FileStore, raw: Path | bytes, reason: str, hint: str) -> None:
    """Only the prefix the quarantine keeps is read: an oversize instance never whole."""
    limit = files.quarantine_limits.max_copy_bytes
    if isinstance(raw, bytes):
        prefix = raw[:limit]
    else:
        with raw.open("rb") as fh:
            prefix = fh.read(limit)
    files.quarantine(prefix, reason, hint, received_bytes=_size(raw))


def _refuse(ctx: StoreContext, raw: Path | bytes, rejection: Rejection, sop_uid: str,
            caller: str) -> int:
    """Log why, keep a quarantined copy, answer the failure status."""
    log.warning("refused SOP %s from AE %s with status 0x%04X: %s", shown_uid(sop_uid), caller,
                rejection.status, rejection.reason)
    try:
        # the file name (logged) carries the UID only when it is one: never a name sent in its place
        _quarantine(ctx.files, raw, rejection.reason,
                    sop_uid if is_valid_uid(sop_uid) else "invalid")
    except (OSError, ValueError):
        log.exception("could not quarantine SOP %s", shown_uid(sop_uid))
    return rejection.status


def _try_quarantine(event: Event, ctx: StoreContext, reason: str, sop_uid: str) -> None:
    try:
        _quarantine(ctx.files, received(event), reason, sop_uid)
    except Exception:  # quarantine is best effort once something already failed
        log.exception("could not quarantine SOP %s", sop_uid)
