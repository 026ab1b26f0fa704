"""Identity without PHI: UID syntax (what may be logged or used in a path) and a keyed
patient fingerprint (what may be stored and compared)."""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from pydicom import Dataset

from node.dicom.values import text_of

MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: Any) -> bool:
    """DICOM UID syntax: digits and dots, no empty component, at most 64 characters.

    Leading zeros inside a component are tolerated: real devices emit them, and the check exists
    to keep identities and file paths sane, not to police the senders' UID roots.
    """
    return (isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH
            and _UID_RE.fullmatch(value) is not None)


def patient_key(ds: Dataset, secret: bytes) -> str | None:
    """Keyed hash of (Patient ID, Patient's Name, Birth Date): detects a study UID reused for
    another patient without storing or logging PHI.

    Returns None when all three are empty (nothing to compare) or unreadable. Names are
    normalised (case, surrounding spaces, trailing empty components) so one patient sent by two
    devices keeps one key. An empty secret raises ValueError: a keyless hash of names and
    birth dates could be reversed by guessing.
    """
    if not secret:
        raise ValueError("patient_key needs a non-empty secret")
    try:
        parts = (text_of(ds.get("PatientID")).strip(),
                 _normalise_name(text_of(ds.get("PatientName"))),
                 text_of(ds.get("PatientBirthDate")).strip())
    except Exception:  # undecodable character set or similar: identity cannot be compared
        return None
    if not any(parts):
        return None
    message = "\x1f".join(parts).encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def _normalise_name(name: str) -> str:
    """'Doe^John^^^ ' and 'DOE^JOHN' are the same person name."""
    groups = [g.strip().upper() for g in name.split("=")[0].split("^")]
    while groups and not groups[-1]:
        groups.pop()
    return "^".join(groups)



def shown_uid(value: object) -> str:
    """A UID from the network as it may appear in a log: invalid ones are not echoed (a
    sender may put anything there, a patient's name included)."""
    text = str(value or "")
    return text if is_valid_uid(text) else f"(invalid UID, length {len(text)})"
