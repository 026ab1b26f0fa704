"""DICOM identifiers the node relies on: SOP classes (from pydicom's and pynetdicom's
constants, so no UID is typed twice), the projection codes and the View enum."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

NM_IMAGE_STORAGE = str(NuclearMedicineImageStorage)
SC_IMAGE_STORAGE = str(SecondaryCaptureImageStorage)
VERIFICATION = str(Verification)
# what a whole-body bone scan arrives as: NM Image Storage, or Secondary Capture with Modality NM
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset({NM_IMAGE_STORAGE, SC_IMAGE_STORAGE})
# Every standard storage SOP class (pynetdicom's table): the receiver negotiates them all, so a
# study-level route (CT, presentation states, KOS, SR, PDF, ...) never fails on a context; what
# is not an input is answered Success and ignored (node.dicom.admission.ignore_reason).
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(str(cx.abstract_syntax)
                                                for cx in AllStoragePresentationContexts)
# SR classes that can carry the node's TID 1500 result (it has no 3D coordinates), best first
SR_STORAGE_CLASSES: tuple[str, ...] = (str(Comprehensive3DSRStorage), str(ComprehensiveSRStorage),
                                       str(EnhancedSRStorage))

ENCAPSULATED_PDF_STORAGE = str(EncapsulatedPDFStorage)
# what each object of a result is, by its SOP class (status, web page, tests): the SR for
# machines, the result image (colour SC) and the PDF report for people
RESULT_OBJECT_KINDS: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys(SR_STORAGE_CLASSES, "SR"), SC_IMAGE_STORAGE: "image",
    ENCAPSULATED_PDF_STORAGE: "PDF"})

# The node's identity in the objects it writes (SR, result image, PDF), so that an object of its
# own routed back by PACS is recognised and ignored. Its UIDs are pydicom's generate_uid under
# pydicom's root: the root alone is shared with every pydicom user, so the manufacturer decides.
NODE_UID_ROOT = str(PYDICOM_ROOT_UID)
NODE_MANUFACTURER = "dscint-node"
NODE_MODEL_NAME = "dscint-node"


def storage_class_uid(name: str) -> str | None:
    """The UID of a standard storage SOP class given by UID or keyword, None otherwise."""
    if name in STORAGE_SOP_CLASSES:
        return name
    return next((u for u in STORAGE_SOP_CLASSES if UID(u).keyword == name), None)


def sop_class_keyword(uid: str) -> str:
    """'CTImageStorage' for a known SOP class, else the UID (logs, metrics labels)."""
    return UID(uid).keyword or uid


ANTERIOR_CODE = "399321004"  # SCT "Anterior projection"
POSTERIOR_CODE = "399001007"  # SCT "Posterior projection"


class View(StrEnum):
    """Projection of one whole-body frame."""

    ANTERIOR = "anterior"
    POSTERIOR = "posterior"
    UNKNOWN = "unknown"
