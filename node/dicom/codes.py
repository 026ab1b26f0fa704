"""DICOM identifiers the node relies on: SOP classes (from pydicom's and pynetdicom's
constants, so no UID is typed twice), the projection codes and the View enum."""

from __future__ import annotations

from enum import StrEnum

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

NM_IMAGE_STORAGE = str(NuclearMedicineImageStorage)
SC_IMAGE_STORAGE = str(SecondaryCaptureImageStorage)
VERIFICATION = str(Verification)
# what a whole-body bone scan arrives as: NM Image Storage, or Secondary Capture with Modality NM
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset({NM_IMAGE_STORAGE, SC_IMAGE_STORAGE})
# SR classes that can carry the node's TID 1500 result (it has no 3D coordinates)
SR_STORAGE_CLASSES: tuple[str, ...] = (str(Comprehensive3DSRStorage), str(ComprehensiveSRStorage),
                                       str(EnhancedSRStorage))

ANTERIOR_CODE = "399321004"  # SCT "Anterior projection"
POSTERIOR_CODE = "399001007"  # SCT "Posterior projection"


class View(StrEnum):
    """Projection of one whole-body frame."""

    ANTERIOR = "anterior"
    POSTERIOR = "posterior"
    UNKNOWN = "unknown"
