"""The applicability gate: is an instance a whole-body planar view, the only image Dscint was
trained on? Decided from the header alone (no pixels, no database, no network).

Why: a spot view, a renal dynamic, SPECT projections or a small image are valid NM objects
that admission stores, but a bone-scan diagnosis made on them is a patient-safety incident.

Evidence, in order:

1. NM Image Storage: Image Type (0008,0008) value 3 (PS3.3 C.8.4.7). WHOLE BODY goes on to
   the geometry checks; STATIC, DYNAMIC, GATED, TOMO, RECON TOMO, GATED TOMO and RECON GATED
   TOMO are not whole-body scans; value 4 TRANSMISSION is not an emission image. A missing or
   unknown value 3 is judged by geometry alone (and the reason says so).
2. Secondary Capture with Modality NM has no NM Image Type semantics (the real GE scan is SC
   with ORIGINAL\\PRIMARY\\WHOLE BODY\\EMISSION): geometry decides; only a value 3 that names
   one of the NM non-whole-body terms above refuses it outright, as the camera itself said so.
3. Frames: a whole-body NM object holds one frame per detector (view): 1 or 2. More frames
   mean a dynamic, gated or tomographic acquisition.
4. Geometry: head to foot along the rows, so much taller than wide (rows >= 2 x columns;
   landscape refused), and as long as a body: rows x Pixel Spacing within 1.2-2.8 m. Without
   a usable Pixel Spacing the matrix alone decides (at least 512 rows, and the shape).

Reasons name attributes and numbers, never patient data, and never echo free text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom import Dataset

from node.dicom.codes import NM_IMAGE_STORAGE
from node.dicom.values import as_float, as_int, text_of, values_of

log = logging.getLogger(__name__)

WHOLE_BODY = "WHOLE BODY"
# NM Image Type value 3 terms that are not whole-body scans (PS3.3 C.8.4.7).
NOT_WHOLE_BODY_TYPES = frozenset({"STATIC", "DYNAMIC", "GATED", "TOMO", "RECON TOMO",
                                  "GATED TOMO", "RECON GATED TOMO"})
TRANSMISSION = "TRANSMISSION"  # NM Image Type value 4: a transmission (not emission) image
MAX_FRAMES_PER_OBJECT = 2  # one frame per detector/view (anterior, posterior)
MIN_ASPECT = 2.0  # rows / columns: whole-body views are ~4 (1024 x 256); spot views are 1
# Physical length of a view, rows x row spacing. The GE scan is 1024 x 2.26 mm = 2.31 m and
# Siemens cameras store 1024 x 2.4 mm = 2.46 m: the camera pads to its full table travel, so
# a real whole-body view is 2-2.5 m long whatever the patient's height. 1.2 m leaves room for
# a shorter matrix (a child, a limited scan length); 2.8 m for the longest tables. A static
# or SPECT field of view (40-60 cm) falls far below.
MIN_LENGTH_MM = 1200.0
MAX_LENGTH_MM = 2800.0
# Without Pixel Spacing: whole-body matrices have 512 rows or more (512 x 128, 1024 x 256,
# 2048 x 512); dynamic and tomographic matrices have 64-256.
MIN_ROWS_WITHOUT_SPACING = 512


@dataclass(frozen=True)
class Applicability:
    """The gate's verdict on one instance; `reason` carries no patient data."""

    applicable: bool
    reason: str


def whole_body_planar(ds: Dataset) -> Applicability:
    """Is this instance a whole-body planar view? Header only; never raises (an unreadable
    header is not applicable: the gate errs towards not classifying)."""
    try:
        return _judge(ds)
    except Exception as exc:  # a malformed header of any kind
        log.debug("applicability check failed on a malformed header", exc_info=True)
        return Applicability(False, f"header unreadable for the applicability check "
                                    f"({type(exc).__name__})")


def _judge(ds: Dataset) -> Applicability:
    """Image Type first, then frames and geometry; the first objection decides."""
    is_nm = text_of(ds.get("SOPClassUID")).strip() == NM_IMAGE_STORAGE
    type_note = _image_type(ds, is_nm)
    if isinstance(type_note, Applicability):
        return type_note
    frames = _frames(ds)
    if frames > MAX_FRAMES_PER_OBJECT:
        return Applicability(False, f"{frames} frames in one object: a whole-body object has "
                                    f"one frame per view (at most {MAX_FRAMES_PER_OBJECT}); "
                                    "dynamic, gated or tomographic")
    ok, geometry = _geometry(ds)
    prefix = "whole-body planar" if ok else "not whole-body planar"
    return Applicability(ok, f"{prefix}: {type_note}, {frames} frame(s), {geometry}")


def image_type_values(ds: Dataset) -> list[str]:
    """Image Type values upper-cased and stripped (a backslash-joined string is split too)."""
    values = values_of(ds.get("ImageType"))
    if len(values) == 1 and isinstance(values[0], str | bytes):
        values = text_of(values[0]).split("\\")
    return [text_of(v).strip().upper() for v in values]


def _image_type(ds: Dataset, is_nm: bool) -> Applicability | str:
    """A refusal from Image Type, or what it says for the verdict's reason."""
    values = image_type_values(ds)
    third = values[2] if len(values) > 2 else ""
    fourth = values[3] if len(values) > 3 else ""
    label = "NM Image Type" if is_nm else "Image Type"
    if third in NOT_WHOLE_BODY_TYPES:
        semantics = "PS3.3 C.8.4.7" if is_nm else "an NM term in a Secondary Capture"
        return Applicability(False, f"{label} {third} ({semantics}): not a whole-body scan")
    if is_nm and fourth == TRANSMISSION:
        return Applicability(False, f"{label} value 4 {TRANSMISSION}: not an emission image")
    if is_nm:
        if third == WHOLE_BODY:
            return f"{label} {WHOLE_BODY}"
        return f"{label} value 3 {'not an NM term' if third else 'missing'}, judged by geometry"
    said = f" ({WHOLE_BODY} in Image Type)" if third == WHOLE_BODY else ""
    return f"Secondary Capture{said}, judged by geometry"


def _frames(ds: Dataset) -> int:
    """Number of Frames; absent (single-frame objects) is 1. Admission already refused an
    unreadable value; here it counts as 1 and geometry still decides."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    n = as_int(value)
    return n if n is not None and n > 0 else 1


def _geometry(ds: Dataset) -> tuple[bool, str]:
    """Shape (portrait, elongated) and length; (passes, description)."""
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    if not rows or not cols or rows <= 0 or cols <= 0:
        return False, "Rows or Columns missing"
    matrix = f"{rows}x{cols}"
    if rows < cols:
        return False, (f"{matrix} is landscape: a whole-body view runs head to foot along the "
                       "rows")
    if rows < MIN_ASPECT * cols:
        return False, (f"{matrix} is not elongated enough for a whole-body view "
                       f"(rows >= {MIN_ASPECT:g} x columns)")
    spacing = row_spacing_mm(ds)
    if spacing is None:
        if rows < MIN_ROWS_WITHOUT_SPACING:
            return False, (f"{matrix} without Pixel Spacing: fewer rows than a whole-body "
                           f"matrix has (>= {MIN_ROWS_WITHOUT_SPACING})")
        return True, f"{matrix}, no usable Pixel Spacing: judged by matrix shape and size only"
    length = rows * spacing
    measured = f"{matrix} at {spacing:.2f} mm = {length / 1000:.2f} m"
    if not MIN_LENGTH_MM <= length <= MAX_LENGTH_MM:
        return False, (f"{measured}; a whole-body view is {MIN_LENGTH_MM / 1000:g}-"
                       f"{MAX_LENGTH_MM / 1000:g} m long")
    return True, measured


def row_spacing_mm(ds: Dataset) -> float | None:
    """Pixel Spacing's first value (distance between rows, mm); None when absent, unreadable
    or not a positive number."""
    try:
        values = values_of(ds.get("PixelSpacing"))
    except Exception:  # a value pydicom cannot convert: as good as absent
        return None
    spacing = as_float(values[0]) if values else None
    return spacing if spacing is not None and spacing > 0 else None
