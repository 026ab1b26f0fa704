"""The four Dscint classes and their SNOMED CT codes (field notes §3).

The order is the order of the network's outputs; it is stored in every exported model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class ClassCode:
    """A class as the network sees it (index, name) and as DICOM codes it (SCT)."""

    index: int
    name: str
    code_value: str
    code_meaning: str
    scheme: str = "SCT"


class DscintClass(Enum):
    """Output classes in network order."""

    NORMAL = ClassCode(0, "normal", "17621005", "Normal")
    BONE_METASTASIS = ClassCode(
        1, "bone_metastasis", "94222008", "Secondary malignant neoplasm of bone"
    )
    ARTHRITIS = ClassCode(2, "arthritis", "3723001", "Arthritis")
    THYROID_CARCINOMA = ClassCode(
        3, "thyroid_carcinoma", "363478007", "Malignant neoplasm of thyroid gland"
    )

    @classmethod
    def by_name(cls, name: str) -> DscintClass:
        """Look a class up by its snake_case name; raises ValueError naming the valid ones."""
        for member in cls:
            if member.value.name == name:
                return member
        valid = ", ".join(m.value.name for m in cls)
        raise ValueError(f"unknown class {name!r}; expected one of: {valid}")


CLASS_NAMES: tuple[str, ...] = tuple(m.value.name for m in DscintClass)
NUM_CLASSES = len(CLASS_NAMES)

# Image geometry of a GE whole-body scan: Rows x Columns (the paper's "256 x 1024" is W x H).
INPUT_ROWS = 1024
INPUT_COLS = 256
