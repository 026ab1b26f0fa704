"""C-STORE admission: every rule that decides whether an instance is kept, header first, and
the status and reason (without patient data) when it is not. Rules never raise."""

from __future__ import annotations

import re
from enum import StrEnum

from pydicom import Dataset

from node.dicom.codes import (
    ACCEPTED_SOP_CLASSES,
    NM_IMAGE_STORAGE,
    NODE_MANUFACTURER,
    NODE_UID_ROOT,
    SC_IMAGE_STORAGE,
)
from node.dicom.identity import is_valid_uid, shown_uid
from node.dicom.pixels import (
    NATIVE_TRANSFER_SYNTAXES,
    DecodeError,
    decode_frames,
    pixel_geometry,
    pixel_rejection,
)
from node.dicom.status import Rejection, Status
from node.dicom.values import text_of

MAX_RESCALE = 1e20  # 16-bit counts times this stay far below float32's 3.4e38
# Specific Character Set defined terms (PS3.3 C.12.1.1.2, Tables C.12-2 to C.12-5). Spelled
# out so the receiver process need not import highdicom; the SR is written in the
# source's set where highdicom can write it, else in UTF-8 (node.classify.sr.sr_character_set).
DEFINED_CHARSETS = frozenset({
    "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
    "ISO_IR 13", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192",
    "ISO_IR 203", "ISO 2022 IR 6", "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109",
    "ISO 2022 IR 110", "ISO 2022 IR 126", "ISO 2022 IR 127", "ISO 2022 IR 13",
    "ISO 2022 IR 138", "ISO 2022 IR 144", "ISO 2022 IR 148", "ISO 2022 IR 166",
    "ISO 2022 IR 203", "ISO 2022 IR 58", "ISO 2022 IR 87", "ISO 2022 IR 159",
    "ISO 2022 IR 149", "GB18030", "GBK",
})


class Ignored(StrEnum):
    """Why an instance is answered Success and not kept: it is not something the node
    classifies (a study-level route also carries CT, SR, presentation states, KOS, PDF...),
    or it is one of the node's own results that PACS routed back."""

    NOT_INPUT = "not_input"
    OWN_OBJECT = "own_object"


def ignore_reason(ds: Dataset | None, sop_class: str) -> Ignored | None:
    """None for a candidate input (the admission rules then decide), else why it is ignored.

    `sop_class` is the C-STORE request's; `ds` its header, None where it could not be read
    (an input class is then refused by admission; anything else is simply not an input).
    The node's own objects come first: whatever their class, they are never inputs.
    Never raises."""
    try:
        if ds is not None and is_own_object(ds):
            return Ignored.OWN_OBJECT
        if sop_class not in ACCEPTED_SOP_CLASSES:
            return Ignored.NOT_INPUT
        if ds is not None and sop_class == SC_IMAGE_STORAGE:
            modality = text_of(ds.get("Modality")).strip().upper()
            if modality and modality != "NM":  # a screenshot, a dose report: not a bone scan
                return Ignored.NOT_INPUT
    except Exception:  # a header pydicom cannot convert: admission answers for inputs
        return None if sop_class in ACCEPTED_SOP_CLASSES else Ignored.NOT_INPUT
    return None


def is_own_object(ds: Dataset) -> bool:
    """The node wrote it (SR, result image, PDF): a UID under the node's root and the node as
    manufacturer (of the equipment, or of the secondary capture device)."""
    uid = text_of(ds.get("SOPInstanceUID")).strip()
    makers = {text_of(ds.get(k)).strip() for k in ("Manufacturer",
                                                     "SecondaryCaptureDeviceManufacturer")}
    return uid.startswith(NODE_UID_ROOT) and NODE_MANUFACTURER in makers


def admission_rejection(ds: Dataset, sop_class: str, sop_uid: str, decode: bool = True
                        ) -> Rejection | None:
    """Every rule that decides whether a C-STORE is kept, in order; None means keep it.

    `sop_class` and `sop_uid` are the C-STORE request's. `decode` decodes compressed pixels
    once so an instance whose pixels cannot be read is refused now, not at classification.
    """
    rejection = check_dataset(ds, sop_class) or rescale_rejection(ds) or charset_rejection(ds)
    if rejection is not None:
        return rejection
    if str(ds.SOPInstanceUID) != sop_uid:
        return Rejection(Status.DATASET_MISMATCH,
                         f"SOP Instance UID in dataset {ds.SOPInstanceUID} differs from the "
                         f"C-STORE request's {shown_uid(sop_uid)}")
    return decode_check(ds) if decode else None


def patient_conflict(study_uid: str) -> Rejection:
    """A study UID reused for another patient: never merge two patients' images."""
    return Rejection(Status.PATIENT_CONFLICT,
                     f"study {study_uid} already holds another patient's instances")


def rescale_rejection(ds: Dataset) -> Rejection | None:
    """A Rescale Slope or Intercept that would overflow float32 counts into inf/NaN (the
    classifier would only fail later): refused at admission instead."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        try:
            value = abs(float(ds.get(keyword) or 0))
        except (TypeError, ValueError, OverflowError):
            continue  # not a number at all: check_dataset already refuses those
        if value > MAX_RESCALE:
            return Rejection(Status.BAD_PIXEL_MODULE,
                             f"{keyword} is out of range (|value| > 1e20)")
    return None


def charset_rejection(ds: Dataset) -> Rejection | None:
    """Specific Character Set terms DICOM does not define: the text (names, IDs the SR
    copies) cannot be decoded with confidence. The value itself is never echoed."""
    value = ds.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str | bytes) else list(value or [])
    unknown = [t for t in terms if str(t).strip() and str(t).strip() not in DEFINED_CHARSETS]
    if unknown:
        return Rejection(Status.CANNOT_UNDERSTAND,
                         f"Specific Character Set has {len(unknown)} term(s) DICOM does not "
                         "define (PS3.3 C.12.1.1.2)")
    return None

def check_dataset(ds: Dataset, sop_class_uid: str | None = None) -> Rejection | None:
    """C-STORE admission rules, header only (no decoding); None means keep it. Never raises.

    sop_class_uid is the SOP class of the C-STORE request (the presentation context's).
    """
    try:
        return (_check_identity(ds, sop_class_uid) or _check_uids(ds)
                or pixel_rejection(ds))
    except Exception as exc:  # a header pydicom cannot even convert
        return Rejection(Status.CANNOT_UNDERSTAND,
                         f"malformed header ({type(exc).__name__} while reading it)")


def _check_identity(ds: Dataset, sop_class_uid: str | None) -> Rejection | None:
    """SOP class supported and agreeing with the request; Modality NM for both classes."""
    ds_class = ds.get("SOPClassUID")
    if not is_valid_uid(ds_class):
        return Rejection(Status.BAD_UID, "SOP Class UID missing or invalid in the dataset")
    ds_class = str(ds_class)
    if sop_class_uid is not None and ds_class != str(sop_class_uid):
        return Rejection(Status.DATASET_MISMATCH,
                         f"SOP Class UID in dataset {ds_class} differs from the request's "
                         f"{sop_class_uid}")
    if ds_class not in ACCEPTED_SOP_CLASSES:
        return Rejection(Status.UNSUPPORTED_SOP_CLASS,
                         f"SOP class {ds_class} not accepted (NM Image Storage or Secondary "
                         "Capture with Modality NM only)")
    modality = text_of(ds.get("Modality")).strip().upper()
    if modality != "NM":
        name = "NM Image Storage" if ds_class == NM_IMAGE_STORAGE else "Secondary Capture"
        shown = modality[:16] if re.fullmatch(r"[A-Z0-9 _]*", modality) else "?"
        return Rejection(Status.DATASET_MISMATCH,
                         f"{name} with Modality {shown or 'missing'}: only NM is accepted")
    return None


def _check_uids(ds: Dataset) -> Rejection | None:
    """Study, Series and SOP Instance UIDs present and syntactically valid."""
    for keyword, label in (("StudyInstanceUID", "Study Instance UID"),
                           ("SeriesInstanceUID", "Series Instance UID"),
                           ("SOPInstanceUID", "SOP Instance UID")):
        value = ds.get(keyword)
        if value is None or text_of(value) == "":
            return Rejection(Status.BAD_UID, f"{label} missing")
        if not is_valid_uid(value):  # the value itself may be garbage or PHI: never echo it
            return Rejection(Status.BAD_UID,
                             f"{label} is not a valid UID (length {len(text_of(value))})")
    return None


def decode_check(ds: Dataset) -> Rejection | None:
    """Decode compressed pixels fully once, so an instance whose pixels cannot be read is
    refused at admission.

    Header problems keep their own status; a decoding failure answers 0xC210. Native
    (uncompressed) data is not decoded: once the pixel module checks passed, its exact length
    included, reading it cannot fail, and decoding would cost a float copy twice the data's
    size on every C-STORE. Never raises.
    """
    geometry = pixel_geometry(ds)
    if isinstance(geometry, Rejection):
        return geometry
    if geometry.transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        return None
    try:
        decode_frames(ds)
    except DecodeError as exc:
        return Rejection(Status.CANNOT_DECODE, f"pixel data cannot be decoded: {exc}")
    return None


