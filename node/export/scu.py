"""C-STORE SCU: send one stored file to PACS and classify the outcome for the retry policy.

Status classes (PS3.4 Annex B / PS3.7 C): Success 0x0000 and Warnings 0xB000/0xB006/0xB007 mean
PACS holds the object. 0xA7xx (out of resources) and network trouble are transient: retry with
backoff. 0xA9xx (does not match SOP class), 0xCxxx (cannot understand), 0x0122 (SOP class not
supported), 0x0124 (not authorised) and a permanent association rejection will not improve by
retrying: dead-letter at once so an admin sees them. So will a stored SR that is missing or
unreadable. Every failure of `send_file` is an outcome the retry policy can judge.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association

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
    """One association, one C-STORE of a Part-10 file as stored (no re-encoding).

    `on_answer` runs as soon as the C-STORE is answered (or not), before the association is
    released: bookkeeping done there cannot be lost to a crash during the release, so an
    acknowledged SR is not sent again after a restart. A stored SR that is missing or not
    readable DICOM is a permanent failure, found before any association is opened.
    """
    try:
        sop_class, ts = _stored_sr(path)
    except Exception as exc:  # missing, a directory, garbage, truncated: will not improve
        return SendOutcome(False, None, f"cannot read stored SR {path.name}: {redacted(exc)}",
                           True)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=dest.tls_args)
    if assoc.is_rejected:
        return _rejected(assoc.acceptor.primitive)
    if not assoc.is_established:
        tls = ", or TLS handshake failed" if dest.tls else ""
        return SendOutcome(False, None, f"cannot associate with {dest.ae_title}@{dest.host}:"
                           f"{dest.port} (connection refused, aborted or timed out{tls})", False)
    try:
        outcome = _store(assoc, path)
        if on_answer is not None:
            on_answer(outcome)
    finally:
        assoc.release()
    return outcome


def _stored_sr(path: Path) -> tuple[str, str]:
    """SOP Class and Transfer Syntax UIDs of the stored SR, read in full (an SR is small), so
    a file that is missing, not DICOM or cut short fails here rather than mid-association."""
    ds = dcmread(path)
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _store(assoc: Association, path: Path) -> SendOutcome:
    """The C-STORE on an established association; the SR's presentation context refused by
    PACS (ValueError) or the file gone meanwhile (OSError) will not improve: permanent."""
    try:
        status = getattr(assoc.send_c_store(path), "Status", None)
    except (OSError, ValueError, AttributeError) as exc:
        return SendOutcome(False, None, f"C-STORE not sent: {redacted(exc)}", True)
    if status is None:
        return SendOutcome(False, None, "no C-STORE response (timeout or abort)", False)
    return classify_status(int(status))


def _rejected(primitive: object) -> SendOutcome:
    """Association rejection: permanent (result 1) or transient (result 2)."""
    result = getattr(primitive, "result", None)
    source = getattr(primitive, "result_source", None)
    diag = getattr(primitive, "diagnostic", None)
    permanent = result == 0x01
    text = (f"association rejected ({'permanent' if permanent else 'transient'}, "
            f"source {source}, reason {diag})")
    return SendOutcome(False, None, text, permanent)
