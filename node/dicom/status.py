"""The one table of DIMSE statuses the node answers and reads, with their PS3.4/PS3.7
references, and how an answer from a peer is judged (stored, retry, give up).

The node answers C-STORE with these (as SCP) and reads a PACS's answers with the same table
(as SCU). Failure codes 0xC001-0xC210 are the node's own refinements inside the "Error: Cannot
understand" range (PS3.4 Table B.2-1, 0xCxxx), so a sender's log tells what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Status(IntEnum):
    """DIMSE status codes (C-STORE and C-ECHO)."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_MISMATCH = 0xB007
    CANNOT_UNDERSTAND = 0xC000
    PATIENT_CONFLICT = 0xC001
    NO_PATIENT_IDENTITY = 0xC002
    SOP_IN_OTHER_STUDY = 0xC003
    UNSUPPORTED_SOP_CLASS = 0xC010
    BAD_UID = 0xC011
    NO_PIXEL_DATA = 0xC012
    BAD_PIXEL_MODULE = 0xC013
    UNSUPPORTED_PIXELS = 0xC014
    TOO_LARGE = 0xC015
    NOT_APPLICABLE = 0xC016
    STUDY_LIMIT = 0xC017
    CANNOT_DECODE = 0xC210


class Kind(StrEnum):
    """What an answer means for the object sent: held, worth retrying, or never stored."""

    STORED = "stored"  # success or warning: the peer holds the object
    TRANSIENT = "transient"  # may succeed later (resources, processing failure)
    PERMANENT = "permanent"  # retrying cannot help (mismatch, cannot understand, refused)


@dataclass(frozen=True)
class StatusInfo:
    """One row of the table."""

    meaning: str
    reference: str
    kind: Kind


_B21 = "PS3.4 Table B.2-1"
_C = "PS3.7 Annex C"
_NODE = "PS3.4 Table B.2-1 (0xCxxx, node-specific)"
TABLE: dict[Status, StatusInfo] = {
    Status.SUCCESS: StatusInfo("Success", _B21, Kind.STORED),
    Status.SOP_CLASS_NOT_SUPPORTED: StatusInfo("Refused: SOP Class not supported", _C,
                                               Kind.PERMANENT),
    Status.NOT_AUTHORIZED: StatusInfo("Refused: not authorized", _C, Kind.PERMANENT),
    Status.OUT_OF_RESOURCES: StatusInfo("Refused: out of resources", _B21, Kind.TRANSIENT),
    Status.DATASET_MISMATCH: StatusInfo("Error: data set does not match SOP Class", _B21,
                                        Kind.PERMANENT),
    Status.WARNING_COERCION: StatusInfo("Warning: coercion of data elements", _B21,
                                        Kind.STORED),
    Status.WARNING_ELEMENTS_DISCARDED: StatusInfo("Warning: elements discarded", _B21,
                                                  Kind.STORED),
    Status.WARNING_DATASET_MISMATCH: StatusInfo("Warning: data set does not match SOP Class",
                                                _B21, Kind.STORED),
    Status.CANNOT_UNDERSTAND: StatusInfo("Error: cannot understand", _B21, Kind.PERMANENT),
    Status.PATIENT_CONFLICT: StatusInfo("Error: study UID already used for another patient",
                                        _NODE, Kind.PERMANENT),
    Status.NO_PATIENT_IDENTITY: StatusInfo(
        "Error: no patient identity, but the study or stored SOP has one", _NODE,
        Kind.PERMANENT),
    Status.SOP_IN_OTHER_STUDY: StatusInfo("Error: SOP Instance UID already stored under "
                                          "another study", _NODE, Kind.PERMANENT),
    Status.UNSUPPORTED_SOP_CLASS: StatusInfo("Error: SOP class not accepted by this node",
                                             _NODE, Kind.PERMANENT),
    Status.BAD_UID: StatusInfo("Error: missing or invalid UID", _NODE, Kind.PERMANENT),
    Status.NO_PIXEL_DATA: StatusInfo("Error: no pixel data", _NODE, Kind.PERMANENT),
    Status.BAD_PIXEL_MODULE: StatusInfo("Error: Image Pixel module inconsistent with the data",
                                        _NODE, Kind.PERMANENT),
    Status.UNSUPPORTED_PIXELS: StatusInfo("Error: colour, float, 1- or 32-bit pixels", _NODE,
                                          Kind.PERMANENT),
    Status.TOO_LARGE: StatusInfo("Error: over the node's size limits (dimensions, encoded or "
                                 "decoded size)", _NODE, Kind.PERMANENT),
    Status.NOT_APPLICABLE: StatusInfo("Error: not a whole-body planar scan (refused by "
                                      "[admission] setting)", _NODE, Kind.PERMANENT),
    Status.STUDY_LIMIT: StatusInfo("Error: study over the node's per-study limits", _NODE,
                                   Kind.PERMANENT),
    Status.CANNOT_DECODE: StatusInfo("Error: pixel data cannot be decoded", _NODE,
                                     Kind.PERMANENT),
}

# PS3.7 Annex C warnings a peer may answer to any DIMSE request: the operation was performed
GENERAL_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
# A-ASSOCIATE-RJ (result, source, diagnostic) in words (PS3.8 Table 9-21)
ASSOCIATION_REJECT_REASONS: dict[tuple[object, object, object], str] = {
    (0x02, 0x03, 0x02): "too many simultaneous associations ([node].max_associations)",
    (0x01, 0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x01, 0x02, 0x02): "protocol version not supported",
}
# presentation context results (PS3.8 Table 9-18)
CONTEXT_RESULTS = {0x01: "user rejection", 0x02: "no reason given",
                   0x03: "abstract syntax (SOP class) not supported",
                   0x04: "transfer syntaxes not supported"}


@dataclass(frozen=True)
class Rejection:
    """Why an instance is refused: the C-STORE status and a reason without patient data."""

    status: Status
    reason: str


def _known(status: int) -> StatusInfo | None:
    try:
        return TABLE.get(Status(status))
    except ValueError:  # not one of ours: judged by its range
        return None


def kind_of(status: int) -> Kind:
    """How to treat a peer's answer, by the table, else by the PS3.4/PS3.7 ranges: a warning
    (0xBxxx, or PS3.7's 0x0001, 0x0107, 0x0116) means the peer holds the object; 0xA9xx and
    0xCxxx will not improve; anything else unknown (0xA7xx, 0x01xx processing failures) may."""
    known = _known(status)
    if known is not None:
        return known.kind
    if (status >> 12) == 0xB or status in GENERAL_WARNINGS:
        return Kind.STORED
    if _names_the_problem(status):
        return Kind.PERMANENT
    return Kind.TRANSIENT


def is_specific_refusal(status: int | None) -> bool:
    """A failure status that names the problem (0xA9xx, 0xCxxx); 0xA700 means the node was out
    of resources or failed unexpectedly."""
    return status is not None and _names_the_problem(status)


def _names_the_problem(status: int) -> bool:
    return (status >> 8) == 0xA9 or (status >> 12) == 0xC


def describe(status: int) -> str:
    """'0xA700 (Refused: out of resources, PS3.4 Table B.2-1)' for logs and reasons."""
    known = _known(status)
    if known is None:
        return f"0x{status:04X}"
    return f"0x{status:04X} ({known.meaning}, {known.reference})"
