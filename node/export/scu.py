"""C-STORE SCU: send one stored file to PACS and classify the outcome for the retry policy.

Status classes (PS3.4 Annex B / PS3.7 C): Success 0x0000 and Warnings 0xB000/0xB006/0xB007 mean
PACS holds the object. 0xA7xx (out of resources) and network trouble are transient: retry with
backoff. 0xA9xx (does not match SOP class), 0xCxxx (cannot understand), 0x0122 (SOP class not
supported), 0x0124 (not authorised) and a permanent association rejection will not improve by
retrying: dead-letter at once so an admin sees them. So will a stored SR that is missing or
unreadable. Every failure of `send_file` is an outcome the retry policy can judge.

The SR is offered in every SR class that can carry the node's TID 1500 content (Comprehensive
3D SR, Comprehensive SR, Enhanced SR: CODE, NUM, TEXT, IMAGE, UIDREF and CONTAINER items,
relationships by value, no coordinates; the destination's `sr_classes` may narrow or reorder
them) and sent in the best one the PACS accepts: as stored (byte for byte) when that is the
stored class, else re-encoded with that SOP Class and a SOP Instance UID derived from the stored
one and the class (`sr_uid_in_class`: a resend in the same class is the same object). The
outcome says which class and instance PACS acknowledged (recorded on the export row). A PACS
that accepts none of them is a permanent failure: "no presentation context accepted for ...".

Every failure's reason names what happened, in its first words (`failure_reason`): connection
refused, cannot connect, TLS handshake failed, association rejected (with the reason the PACS
gave), association aborted, no presentation context accepted, no C-STORE response, a failure
status, or a stored object that cannot be read.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node.dicom.codes import NODE_UID_ROOT, SR_STORAGE_CLASSES
from node.dicom.status import Kind, kind_of
from node.logs import redacted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    """A PACS (or any C-STORE SCP) to send to."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    tls_server_name: str = ""  # name the peer's certificate must carry; empty = host
    sr_classes: tuple[str, ...] = SR_STORAGE_CLASSES  # SR classes offered, best first

    @property
    def name(self) -> str:
        """'AE@host:port' for reasons and logs."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """What pynetdicom's associate() needs for DICOM over TLS (None: plain TCP)."""
        return (self.tls, self.tls_server_name or self.host) if self.tls else None


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one C-STORE attempt."""

    acknowledged: bool
    status: int | None
    error: str
    permanent: bool
    sop_class_uid: str = ""  # what was sent (acknowledged or not): class and instance
    sop_uid: str = ""


# first words of a failure's reason -> its kind (metrics label, status); one place for both
FAILURE_REASONS: tuple[tuple[str, str], ...] = (
    ("connection refused", "connection_refused"), ("cannot connect", "cannot_connect"),
    ("TLS handshake failed", "tls"), ("association rejected", "association_rejected"),
    ("association aborted", "association_aborted"),
    ("no answer to the association request", "association_timeout"),
    ("no presentation context accepted", "no_presentation_context"),
    ("no C-STORE response", "no_response"), ("C-STORE refused", "failure_status"),
    ("C-STORE failed", "failure_status"), ("C-STORE not sent", "not_sent"),
    ("cannot read stored", "unreadable"),
)


def failure_reason(error: str | None) -> str:
    """The kind of a failure from its reason text ('connection_refused', ...; 'other')."""
    text = error or ""
    return next((kind for prefix, kind in FAILURE_REASONS if text.startswith(prefix)), "other")


def classify_status(status: int) -> SendOutcome:
    """Map a C-STORE response status onto acknowledged / transient / permanent (the status
    table in node.dicom.status decides)."""
    kind = kind_of(status)
    if kind is Kind.STORED:
        return SendOutcome(True, status, "", False)
    perm = kind is Kind.PERMANENT
    what = "refused (permanent)" if perm else "failed (transient)"
    return SendOutcome(False, status, f"C-STORE {what}: status 0x{status:04X}", perm)


def send_file(path: Path, dest: Destination, calling_ae: str, timeout: float = 30.0,
              on_answer: Callable[[SendOutcome], None] | None = None) -> SendOutcome:
    """One association, one C-STORE of a stored object: as stored where the PACS accepts its
    class and transfer syntax, else (an SR) in the best SR class it accepts (module doc).

    `on_answer` runs as soon as the C-STORE is answered (or not), before the association is
    released: bookkeeping done there cannot be lost to a crash during the release, so an
    acknowledged SR is not sent again after a restart. A stored SR that is missing or not
    readable DICOM is a permanent failure, found before any association is opened.
    """
    try:
        stored = _stored(path)
    except Exception as exc:  # missing, a directory, garbage, truncated: will not improve
        return SendOutcome(False, None, f"cannot read stored SR {path.name}: {redacted(exc)}",
                           True)
    classes = offered_classes(stored.sop_class, dest)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for uid in classes:
        ae.add_requested_context(uid, _syntaxes(stored.transfer_syntax))
    opened: list[bool] = []
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=dest.tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda _e: opened.append(True))])
    if assoc.is_rejected:
        return _rejected(assoc.acceptor.primitive, dest)
    if not assoc.is_established:
        return _not_established(assoc, dest, classes, bool(opened), timeout)
    try:
        outcome = _store(assoc, path, stored, classes, dest)
        if on_answer is not None:
            on_answer(outcome)
    finally:
        assoc.release()
    return outcome


@dataclass(frozen=True)
class _Stored:
    sop_class: str
    sop_uid: str
    transfer_syntax: str


def _stored(path: Path) -> _Stored:
    """What is stored, read in full (an SR is small), so a file that is missing, not DICOM
    or cut short fails here rather than mid-association."""
    ds = dcmread(path)
    return _Stored(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                   str(ds.file_meta.TransferSyntaxUID))


def offered_classes(stored_class: str, dest: Destination) -> tuple[str, ...]:
    """The SR classes to propose, best first (the destination's list); another object (the
    result image, the PDF) in its own class only."""
    if stored_class in SR_STORAGE_CLASSES:
        return tuple(dest.sr_classes) or (stored_class,)
    return (stored_class,)


def _syntaxes(stored: str) -> list[str]:
    """The stored transfer syntax first; an Explicit VR Little Endian object may also travel
    as Implicit VR Little Endian (the PACS that knows no other)."""
    if stored == ExplicitVRLittleEndian:
        return [stored, str(ImplicitVRLittleEndian)]
    return [stored]


def sr_uid_in_class(stored_uid: str, sop_class: str) -> str:
    """The SOP Instance UID of the stored SR re-encoded in `sop_class`: derived from both, so
    every resend in that class is the same object, and never the stored SR's own."""
    return str(generate_uid(prefix=NODE_UID_ROOT,
                            entropy_srcs=["dscint-node", "sr-in-class", stored_uid, sop_class]))


def sr_in_class(ds: Dataset, sop_class: str, transfer_syntax: str) -> Dataset:
    """The stored SR as an object of `sop_class` (same content and header), for the PACS that
    accepts only that class; `transfer_syntax` is the one negotiated for it."""
    if str(ds.SOPClassUID) != sop_class:
        uid = sr_uid_in_class(str(ds.SOPInstanceUID), sop_class)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    out = Dataset(ds)  # forgets the encoding it was read in: pynetdicom encodes it anew
    out.file_meta = ds.file_meta
    out.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return out


def _best_context(assoc: Association, classes: Sequence[str]) -> PresentationContext | None:
    """The accepted context of the first class in preference order."""
    accepted = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
    return next((accepted[uid] for uid in classes if uid in accepted), None)


def _store(assoc: Association, path: Path, stored: _Stored, classes: Sequence[str],
           dest: Destination) -> SendOutcome:
    """The C-STORE on an established association, in the best accepted class: the file as
    stored when class and transfer syntax are its own, else re-encoded. The file gone
    meanwhile (OSError) or a context refused after all (ValueError) will not improve:
    permanent."""
    cx = _best_context(assoc, classes)
    if cx is None:
        return _no_context(classes, dest.name)
    sop_class, ts = str(cx.abstract_syntax), str(cx.transfer_syntax[0])
    sent = stored.sop_uid if sop_class == stored.sop_class else \
        sr_uid_in_class(stored.sop_uid, sop_class)
    try:
        if (sop_class, ts) == (stored.sop_class, stored.transfer_syntax):
            rsp = assoc.send_c_store(path)
        else:
            rsp = assoc.send_c_store(sr_in_class(dcmread(path), sop_class, ts))
        status = getattr(rsp, "Status", None)
    except (OSError, ValueError, AttributeError) as exc:
        return SendOutcome(False, None, f"C-STORE not sent: {redacted(exc)}", True,
                           sop_class, sent)
    if status is None:
        return SendOutcome(False, None, "no C-STORE response (timeout or abort)", False,
                           sop_class, sent)
    outcome = classify_status(int(status))
    return SendOutcome(outcome.acknowledged, outcome.status, outcome.error, outcome.permanent,
                       sop_class, sent)


def _no_context(classes: Sequence[str], peer: str) -> SendOutcome:
    names = " or ".join(UID(u).name for u in classes)
    return SendOutcome(False, None, f"no presentation context accepted for {names} by {peer}",
                       True)


def _not_established(assoc: Association, dest: Destination, classes: Sequence[str],
                     opened: bool, timeout: float) -> SendOutcome:
    """Why no association: the PACS accepted none of the proposed contexts (pynetdicom
    then aborts: permanent), aborted, never answered, or the connection itself failed."""
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return _no_context(classes, dest.name)
    if opened:
        what = "association aborted by" if assoc.is_aborted else \
            "no answer to the association request from"
        return SendOutcome(False, None, f"{what} {dest.name}", False)
    return SendOutcome(False, None, f"{_connect_error(dest, timeout)}: cannot associate with "
                                    f"{dest.name}", False)


def _connect_error(dest: Destination, timeout: float) -> str:
    """pynetdicom logs why the connection failed but does not say: one plain TCP connect
    tells refused from timed out (and, when it succeeds, a TLS handshake that failed)."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=min(timeout, 5.0)):
            pass
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return "cannot connect (timed out)"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or type(exc).__name__})"
    return "TLS handshake failed" if dest.tls else "cannot connect (it answered a moment later)"


def _rejected(primitive: object, dest: Destination) -> SendOutcome:
    """Association rejection, with the reason the PACS gave: permanent (result 1) or
    transient (result 2)."""
    result = getattr(primitive, "result", None)
    source = getattr(primitive, "result_source", None)
    diag = getattr(primitive, "diagnostic", None)
    permanent = result == 0x01
    try:  # PS3.8 Table 9-21 in pynetdicom's words
        reason = f"{primitive.source_str}: {primitive.reason_str}"  # type: ignore[attr-defined]
    except (AttributeError, KeyError, ValueError):
        reason = f"source {source}, reason {diag}"
    text = (f"association rejected by {dest.name} "
            f"({'permanent' if permanent else 'transient'}): {reason}")
    return SendOutcome(False, None, text, permanent)
