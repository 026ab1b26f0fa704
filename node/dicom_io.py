"""Incoming DICOM: admission rules, view detection and pixel decoding for whole-body NM scans.

SPECT cameras send whole-body bone scans either as NM Image Storage (often one multi-frame object
holding both views) or as Secondary Capture with Modality NM (the real GE file). This module
decides whether a received dataset can be kept (`check_dataset`, `decode_check`), which view each
frame shows (`frame_views`, header only) and turns the pixels into float32 counts
(`decode_frames`, `extract_views`).

Rules the network handlers rely on: header checks never raise (they return a `Rejection`), every
size is checked before anything is allocated, and no reason string carries patient data (UIDs are
allowed, names and IDs are not). Decoding works on in-memory datasets; nothing is written to disk.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)


class View(StrEnum):
    """Projection of one whole-body frame."""

    ANTERIOR = "anterior"
    POSTERIOR = "posterior"
    UNKNOWN = "unknown"


ANTERIOR_CODE = "399321004"  # SCT "Anterior projection"
POSTERIOR_CODE = "399001007"  # SCT "Posterior projection"

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_SOP_CLASSES: frozenset[str] = frozenset({NM_IMAGE_STORAGE, SC_IMAGE_STORAGE})

# C-STORE failure statuses (PS3.4 B.2.3 and pynetdicom's storescp conventions). 0xC001 is left
# free: node.scp uses it for "study UID already used for another patient".
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # dataset does not match SOP class
STATUS_CANNOT_UNDERSTAND = 0xC000  # header so malformed it cannot be read at all
STATUS_UNSUPPORTED_SOP_CLASS = 0xC010
STATUS_BAD_UID = 0xC011  # missing or invalid Study/Series/SOP Instance or SOP Class UID
STATUS_NO_PIXEL_DATA = 0xC012
STATUS_BAD_PIXEL_MODULE = 0xC013  # Image Pixel attributes missing or inconsistent with the data
STATUS_UNSUPPORTED_PIXELS = 0xC014  # colour, float, 1- or 32-bit pixels
STATUS_TOO_LARGE = 0xC015  # absurd dimensions: refused before anything is allocated
STATUS_CANNOT_DECODE = 0xC210

MAX_ROWS = 4096
MAX_COLUMNS = 4096
MAX_FRAMES = 64
MAX_DECODED_BYTES = 256 * 1024 * 1024  # of the float32 result
MAX_UID_LENGTH = 64

NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
     ExplicitVRBigEndian})
# Encapsulated syntaxes the direct-GDCM fallback decodes from memory.
GDCM_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
     JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless})

_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: first item of encapsulated data
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

# Text attributes searched for ANT/POST, most image-specific first. Study Description is left
# out on purpose: it describes the exam ("WB ANT/POST"), not the image in hand.
VIEW_TEXT_KEYWORDS: tuple[str, ...] = (
    "ImageID", "ImageComments", "DerivationDescription", "ViewPosition", "SeriesDescription",
    "ProtocolName", "AcquisitionDeviceProcessingDescription")
_ANTERIOR_WORDS = frozenset({"ANT", "ANTERIOR"})
_POSTERIOR_WORDS = frozenset({"POST", "POSTERIOR"})
# "POST" that means "after" (3H POST, POST INJECTION, POST OP) is not a view.
_TIME_BEFORE_POST = frozenset({"H", "HR", "HRS", "HOUR", "HOURS", "MIN", "MINS", "MINUTE",
                               "MINUTES", "D", "DAY", "DAYS", "WK", "WEEK", "WEEKS"})
_TIME_AFTER_POST = frozenset({"INJ", "INJECTION", "OP", "OPERATIVE", "SURGERY", "TX", "THERAPY",
                              "TREATMENT", "CONTRAST", "VOID", "VOIDING", "DOSE", "RT", "CHEMO",
                              "RADIOTHERAPY", "ABLATION"})
_SNOMED_SCHEMES = frozenset({"SCT", "SRT", "SNM3", ""})


@dataclass(frozen=True)
class Rejection:
    """Why an instance is refused: the C-STORE status and a reason without patient data."""

    status: int
    reason: str


@dataclass(frozen=True)
class ViewImage:
    """One frame's counts and the view it shows."""

    view: View
    frame_number: int | None  # None for single-frame objects; 1-based otherwise
    pixels: np.ndarray  # (rows, cols) float32


class DecodeError(Exception):
    """Pixel data could not be decoded; the message says why (no patient data)."""


@dataclass(frozen=True)
class PixelGeometry:
    """The Image Pixel attributes decoding depends on, validated."""

    rows: int
    columns: int
    frames: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax: str

    @property
    def decoded_bytes(self) -> int:
        """Size of the float32 result, checked before decoding."""
        return self.rows * self.columns * self.frames * 4

    @property
    def native_bytes(self) -> int:
        """Expected length of native (uncompressed) Pixel Data, without the padding byte."""
        return self.rows * self.columns * self.frames * self.bits_allocated // 8


# --------------------------------------------------------------------------------------------
# small value helpers: header values may be of any type after a malformed transfer


def _as_int(value: Any) -> int | None:
    """An integer from an int/IS/str value, None when it is not one (bools and floats too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?[0-9]{1,10}", text):
            return int(text)
    return None


def _as_float(value: Any) -> float | None:
    """A finite float from a DS/number/str value, None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    """Any text-like element value (including multi-valued) as one string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    if isinstance(value, Iterable):
        return " ".join(_text(v) for v in value)
    return str(value)


def _values(value: Any) -> list[Any]:
    """A multi-valued element as a list (a single value becomes a one-item list)."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def is_valid_uid(value: Any) -> bool:
    """DICOM UID syntax: digits and dots, no empty component, at most 64 characters.

    Leading zeros inside a component are tolerated: real devices emit them, and the check exists
    to keep identities and file paths sane, not to police the senders' UID roots.
    """
    return (isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH
            and _UID_RE.fullmatch(value) is not None)


def _transfer_syntax(ds: Dataset) -> str | None:
    """The dataset's Transfer Syntax UID from its file meta, None when absent."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return None
    value = meta.get("TransferSyntaxUID")
    return str(value) if value else None


def _gdcm_available() -> bool:
    """True where python-gdcm is installed (checked without importing it)."""
    return importlib.util.find_spec("gdcm") is not None


def transfer_syntax_decodable(uid: str) -> bool:
    """True if pydicom's installed plugins or the direct-GDCM fallback can decode this syntax."""
    if uid in NATIVE_TRANSFER_SYNTAXES:
        return True
    if uid in GDCM_TRANSFER_SYNTAXES and _gdcm_available():
        return True
    try:
        return bool(get_decoder(UID(uid)).is_available)
    except (NotImplementedError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------------------------
# views


def frame_views(ds: Dataset) -> tuple[View, ...]:
    """The view of every frame, from the header only; UNKNOWN where the header does not say.

    Order of evidence: View Code Sequence of the frame's detector (NM), a top-level View Code
    Sequence (single-frame objects), then words in text attributes. Never raises.
    """
    n_frames = _frame_count_for_views(ds)
    try:
        return _frame_views(ds, n_frames)
    except Exception:  # malformed header of any kind: the view is simply unknown
        log.debug("view lookup failed on a malformed header", exc_info=True)
        return (View.UNKNOWN,) * n_frames


def _frame_count_for_views(ds: Dataset) -> int:
    """Number of frames clamped to 1..MAX_FRAMES so a bad header cannot build a huge tuple."""
    try:
        value = ds.get("NumberOfFrames")
    except Exception:
        return 1
    n = 1 if value in (None, "") else _as_int(value)
    return min(max(n or 1, 1), MAX_FRAMES)


def _frame_views(ds: Dataset, n_frames: int) -> tuple[View, ...]:
    """Per-frame decision: coded views first, then a text decision where it is safe."""
    detectors = _detector_vector(ds, n_frames)
    coded = [_detector_view(ds, d) if d is not None else View.UNKNOWN for d in detectors]
    if n_frames == 1 and coded[0] is View.UNKNOWN:
        coded[0] = _top_level_view(ds)
    if all(v is not View.UNKNOWN for v in coded):
        return tuple(coded)
    text_view = _text_view(ds)
    if text_view is View.UNKNOWN or not _text_applies_to_all_frames(detectors):
        return tuple(coded)
    return tuple(text_view if v is View.UNKNOWN else v for v in coded)


def _text_applies_to_all_frames(detectors: list[int | None]) -> bool:
    """Object-level text may name a view for every frame only if all frames share a detector."""
    if len(detectors) == 1:
        return True
    return None not in detectors and len(set(detectors)) == 1


def _detector_vector(ds: Dataset, n_frames: int) -> list[int | None]:
    """Detector number (1-based) of each frame; None where the header does not tell.

    Detector Vector has one value per frame (PS3.3 C.8.4.9); Frame Increment Pointer naming it
    confirms this but a vector of the right length is used even without it.
    """
    vector = [_as_int(v) for v in _values(ds.get("DetectorVector"))]
    if len(vector) == n_frames:
        return vector
    if n_frames == 1:  # one frame and one detector item: that detector took it
        items = _sequence(ds, "DetectorInformationSequence")
        return [1 if len(items) == 1 else None]
    if vector:
        log.debug("Detector Vector has %d values for %d frames: ignored", len(vector), n_frames)
    return [None] * n_frames


def _sequence(ds: Dataset, keyword: str) -> list[Dataset]:
    """Items of a sequence, or [] when it is absent or not a sequence of datasets."""
    value = ds.get(keyword)
    if value is None or isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return []
    return [item for item in value if isinstance(item, Dataset)]


def _detector_view(ds: Dataset, detector: int) -> View:
    """View Code Sequence of the detector's item (1-based) in Detector Information Sequence."""
    items = _sequence(ds, "DetectorInformationSequence")
    if not 1 <= detector <= len(items):
        return View.UNKNOWN
    return _coded_view(_sequence(items[detector - 1], "ViewCodeSequence"))


def _top_level_view(ds: Dataset) -> View:
    """A View Code Sequence at the top level (SC and other single-frame objects)."""
    return _coded_view(_sequence(ds, "ViewCodeSequence"))


def _coded_view(items: list[Dataset]) -> View:
    """The view named by the first code item: SCT code value, else its meaning."""
    if not items:
        return View.UNKNOWN
    item = items[0]
    value = _text(item.get("CodeValue")).strip()
    scheme = _text(item.get("CodingSchemeDesignator")).strip().upper()
    if scheme in _SNOMED_SCHEMES:
        if value == ANTERIOR_CODE:
            return View.ANTERIOR
        if value == POSTERIOR_CODE:
            return View.POSTERIOR
    return _meaning_view(_text(item.get("CodeMeaning")))


def _meaning_view(meaning: str) -> View:
    """'Anterior projection' / 'Posterior projection' from any scheme; obliques do not count."""
    words = set(_words(meaning))
    if words & {"OBLIQUE", "LATERAL"}:
        return View.UNKNOWN
    named = {view for word, view in (("ANTERIOR", View.ANTERIOR), ("POSTERIOR", View.POSTERIOR))
             if word in words}
    return _decide(named)


def _words(text: str) -> list[str]:
    """Upper-case words of a free text: split at non-letters, digits and camelCase humps."""
    return [w.upper() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", text)]


def views_in_text(text: str) -> set[View]:
    """Views a free text names as whole words (ANT, ANTERIOR, POST, POSTERIOR).

    Word boundaries keep POSTOP, ANTECUBITAL and POSITION out; a POST that means "after"
    (3H POST, POST INJECTION) is ignored.
    """
    words = _words(text)
    found: set[View] = set()
    for i, word in enumerate(words):
        if word in _ANTERIOR_WORDS:
            found.add(View.ANTERIOR)
        elif word in _POSTERIOR_WORDS and not _temporal_post(words, i):
            found.add(View.POSTERIOR)
    return found


def _temporal_post(words: list[str], i: int) -> bool:
    """True when words[i] is a POST that means 'after' rather than 'posterior'."""
    if words[i] != "POST":
        return False
    before = words[i - 1] if i > 0 else ""
    after = words[i + 1] if i + 1 < len(words) else ""
    return before in _TIME_BEFORE_POST or after in _TIME_AFTER_POST


def _decide(views: set[View]) -> View:
    """Exactly one view named decides; none or both do not."""
    return next(iter(views)) if len(views) == 1 else View.UNKNOWN


def _text_view(ds: Dataset) -> View:
    """The first text attribute naming exactly one view decides; one naming both is skipped."""
    for keyword in VIEW_TEXT_KEYWORDS:
        try:
            text = _text(ds.get(keyword))
        except Exception:  # one unreadable attribute must not hide the others
            continue
        view = _decide(views_in_text(text))
        if view is not View.UNKNOWN:
            return view
    return View.UNKNOWN


# --------------------------------------------------------------------------------------------
# admission


def check_dataset(ds: Dataset, sop_class_uid: str | None = None) -> Rejection | None:
    """C-STORE admission rules, header only (no decoding); None means keep it. Never raises.

    sop_class_uid is the SOP class of the C-STORE request (the presentation context's).
    """
    try:
        return (_check_identity(ds, sop_class_uid) or _check_uids(ds)
                or pixel_rejection(ds))
    except Exception as exc:  # a header pydicom cannot even convert
        return Rejection(STATUS_CANNOT_UNDERSTAND,
                         f"malformed header ({type(exc).__name__} while reading it)")


def _check_identity(ds: Dataset, sop_class_uid: str | None) -> Rejection | None:
    """SOP class supported and agreeing with the request; Modality NM for both classes."""
    ds_class = ds.get("SOPClassUID")
    if not is_valid_uid(ds_class):
        return Rejection(STATUS_BAD_UID, "SOP Class UID missing or invalid in the dataset")
    ds_class = str(ds_class)
    if sop_class_uid is not None and ds_class != str(sop_class_uid):
        return Rejection(STATUS_DATASET_MISMATCH,
                         f"SOP Class UID in dataset {ds_class} differs from the request's "
                         f"{sop_class_uid}")
    if ds_class not in ACCEPTED_SOP_CLASSES:
        return Rejection(STATUS_UNSUPPORTED_SOP_CLASS,
                         f"SOP class {ds_class} not accepted (NM Image Storage or Secondary "
                         "Capture with Modality NM only)")
    modality = _text(ds.get("Modality")).strip().upper()
    if modality != "NM":
        name = "NM Image Storage" if ds_class == NM_IMAGE_STORAGE else "Secondary Capture"
        shown = modality[:16] if re.fullmatch(r"[A-Z0-9 _]*", modality) else "?"
        return Rejection(STATUS_DATASET_MISMATCH,
                         f"{name} with Modality {shown or 'missing'}: only NM is accepted")
    return None


def _check_uids(ds: Dataset) -> Rejection | None:
    """Study, Series and SOP Instance UIDs present and syntactically valid."""
    for keyword, label in (("StudyInstanceUID", "Study Instance UID"),
                           ("SeriesInstanceUID", "Series Instance UID"),
                           ("SOPInstanceUID", "SOP Instance UID")):
        value = ds.get(keyword)
        if value is None or _text(value) == "":
            return Rejection(STATUS_BAD_UID, f"{label} missing")
        if not is_valid_uid(value):  # the value itself may be garbage or PHI: never echo it
            return Rejection(STATUS_BAD_UID,
                             f"{label} is not a valid UID (length {len(_text(value))})")
    return None


def pixel_rejection(ds: Dataset) -> Rejection | None:
    """Pixel-module checks shared by admission and decoding: format, sizes, data length."""
    result = pixel_geometry(ds)
    return result if isinstance(result, Rejection) else None


def pixel_geometry(ds: Dataset) -> PixelGeometry | Rejection:
    """Validated Image Pixel attributes, or why they cannot be decoded safely. Never raises."""
    try:
        return _pixel_geometry(ds)
    except Exception as exc:
        return Rejection(STATUS_CANNOT_UNDERSTAND,
                         f"malformed Image Pixel module ({type(exc).__name__} while reading it)")


def _pixel_geometry(ds: Dataset) -> PixelGeometry | Rejection:
    """The checks in order: pixel element kind, format, size caps, syntax, data length."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return Rejection(STATUS_UNSUPPORTED_PIXELS,
                         "float pixel data (Float/Double Float Pixel Data) is not supported: "
                         "integer counts expected")
    if "PixelData" not in ds:
        return Rejection(STATUS_NO_PIXEL_DATA, "Pixel Data (7FE0,0010) missing")
    fields = {k: _as_int(ds.get(k)) for k in (
        "Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
        "PixelRepresentation")}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        return Rejection(STATUS_BAD_PIXEL_MODULE,
                         f"Image Pixel attributes missing or not integers: {', '.join(missing)}")
    frames_value = ds.get("NumberOfFrames")
    frames = 1 if frames_value in (None, "") else _as_int(frames_value)
    if frames is None:
        return Rejection(STATUS_BAD_PIXEL_MODULE, "Number of Frames is not an integer")
    rows, cols = int(fields["Rows"] or 0), int(fields["Columns"] or 0)
    rejection = (_format_rejection(ds, fields) or _size_rejection(rows, cols, frames))
    if rejection is not None:
        return rejection
    geometry = PixelGeometry(rows, cols, frames, int(fields["BitsAllocated"] or 0),
                             int(fields["BitsStored"] or 0),
                             int(fields["PixelRepresentation"] or 0), _transfer_syntax(ds) or "")
    return _syntax_rejection(geometry) or _length_rejection(ds, geometry) or geometry


def _format_rejection(ds: Dataset, fields: dict[str, int | None]) -> Rejection | None:
    """Grey-scale 8- or 16-bit integers only: colour, 1-bit and 32-bit pixels are refused."""
    spp, bits = fields["SamplesPerPixel"], fields["BitsAllocated"]
    stored, signed = fields["BitsStored"] or 0, fields["PixelRepresentation"]
    if spp != 1:
        return Rejection(STATUS_UNSUPPORTED_PIXELS,
                         f"Samples per Pixel {spp}: colour images are not supported")
    photometric = _text(ds.get("PhotometricInterpretation")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric[:16] if re.fullmatch(r"[A-Z0-9_ ]*", photometric) else "?"
        return Rejection(STATUS_UNSUPPORTED_PIXELS,
                         f"Photometric Interpretation {shown or 'missing'}: MONOCHROME1/2 "
                         "expected")
    if bits not in (8, 16):
        return Rejection(STATUS_UNSUPPORTED_PIXELS,
                         f"Bits Allocated {bits}: only 8- or 16-bit integer counts are supported")
    if not 1 <= stored <= bits:
        return Rejection(STATUS_BAD_PIXEL_MODULE,
                         f"Bits Stored {stored} does not fit Bits Allocated {bits}")
    if signed not in (0, 1):
        return Rejection(STATUS_BAD_PIXEL_MODULE, f"Pixel Representation {signed} is not 0 or 1")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value not in (None, "") and _as_float(value) is None:
            return Rejection(STATUS_BAD_PIXEL_MODULE, f"{keyword} is not a finite number")
    return None


def _size_rejection(rows: int, cols: int, frames: int) -> Rejection | None:
    """Memory-bomb guard: refuse absurd dimensions before anything is allocated."""
    if rows < 1 or cols < 1 or frames < 1:
        return Rejection(STATUS_BAD_PIXEL_MODULE,
                         f"empty image: Rows {rows}, Columns {cols}, Number of Frames {frames}")
    if rows > MAX_ROWS or cols > MAX_COLUMNS or frames > MAX_FRAMES:
        return Rejection(STATUS_TOO_LARGE,
                         f"dimensions {frames} x {rows} x {cols} exceed the limits "
                         f"({MAX_FRAMES} frames, {MAX_ROWS} x {MAX_COLUMNS})")
    if rows * cols * frames * 4 > MAX_DECODED_BYTES:
        return Rejection(STATUS_TOO_LARGE,
                         f"decoded size of {frames} x {rows} x {cols} exceeds "
                         f"{MAX_DECODED_BYTES // 2**20} MiB")
    return None


def _syntax_rejection(geometry: PixelGeometry) -> Rejection | None:
    """A transfer syntax some decoder handles (checked without decoding)."""
    uid = geometry.transfer_syntax
    if not uid:
        return Rejection(STATUS_CANNOT_DECODE, "Transfer Syntax UID missing: pixel data cannot "
                                               "be interpreted")
    if not transfer_syntax_decodable(uid):
        shown = uid if is_valid_uid(uid) else "(invalid UID)"
        return Rejection(STATUS_CANNOT_DECODE, f"no decoder for transfer syntax {shown}")
    return None


def _length_rejection(ds: Dataset, geometry: PixelGeometry) -> Rejection | None:
    """Native data: exact length (one padding byte allowed); encapsulated: starts with an item."""
    data = ds.get("PixelData")
    if not isinstance(data, bytes | bytearray) or len(data) == 0:
        return Rejection(STATUS_NO_PIXEL_DATA, "Pixel Data is empty")
    if geometry.transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        expected = geometry.native_bytes
        if len(data) not in (expected, expected + 1):
            return Rejection(STATUS_BAD_PIXEL_MODULE,
                             f"Pixel Data holds {len(data)} bytes but {geometry.frames} x "
                             f"{geometry.rows} x {geometry.columns} x "
                             f"{geometry.bits_allocated} bits needs {expected}")
    elif bytes(data[:4]) != _ITEM_TAG:
        return Rejection(STATUS_BAD_PIXEL_MODULE,
                         "Pixel Data is not encapsulated although the transfer syntax is "
                         "compressed")
    return None


# --------------------------------------------------------------------------------------------
# decoding


def decode_frames(ds: Dataset) -> np.ndarray:
    """All frames as (n_frames, rows, cols) float32 counts, Rescale Slope/Intercept applied.

    pydicom's plugins are tried first; what they all refuse (12-bit JPEG Extended, notably) goes
    to GDCM directly, from memory. Signed counts stay signed. Raises only DecodeError.
    """
    geometry = pixel_geometry(ds)
    if isinstance(geometry, Rejection):
        raise DecodeError(geometry.reason)
    try:
        counts = _decode_raw(ds, geometry)
        return _rescale(ds, counts)
    except DecodeError:
        raise
    except Exception as exc:  # decoders raise assorted types (MemoryError included)
        raise DecodeError(f"decoding failed: {type(exc).__name__}: {exc}") from exc


def _decode_raw(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """Stored values as (frames, rows, cols); pydicom first, then direct GDCM."""
    try:
        arr = pixel_array(ds, decoding_plugin=_preferred_plugin(geometry))
    except Exception as exc:  # every installed plugin refused: try GDCM below
        if geometry.transfer_syntax not in GDCM_TRANSFER_SYNTAXES or not _gdcm_available():
            raise DecodeError(f"pydicom could not decode transfer syntax "
                              f"{geometry.transfer_syntax}: {_first_line(exc)}") from exc
        log.debug("pydicom refused %s (%s): trying GDCM directly", geometry.transfer_syntax,
                  _first_line(exc))
        return decode_with_gdcm(ds, geometry)
    return _shaped(np.asarray(arr), geometry)


def _preferred_plugin(geometry: PixelGeometry) -> str:
    """'' (all plugins) except for 12-bit JPEG Extended: pydicom's gdcm and pillow plugins
    refuse it by rule and each refusal is logged at ERROR with a traceback; only pylibjpeg can
    try, and direct GDCM catches what it fails on."""
    if geometry.transfer_syntax == JPEGExtended12Bit and geometry.bits_stored > 8:
        try:
            plugins = get_decoder(JPEGExtended12Bit).available_plugins
        except (NotImplementedError, ValueError):
            return ""
        return "pylibjpeg" if "pylibjpeg" in plugins else ""
    return ""


def _first_line(exc: BaseException) -> str:
    """First line of an exception message (pydicom lists every plugin's error on later lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _shaped(arr: np.ndarray, geometry: PixelGeometry) -> np.ndarray:
    """(frames, rows, cols) or DecodeError when the decoder produced another shape."""
    want = (geometry.frames, geometry.rows, geometry.columns)
    if arr.ndim == 2 and geometry.frames == 1:
        arr = arr[np.newaxis]
    if arr.shape != want:
        raise DecodeError(f"decoded shape {arr.shape} differs from the header's {want}")
    return arr


def decode_with_gdcm(ds: Dataset, geometry: PixelGeometry | None = None) -> np.ndarray:
    """Decode encapsulated frames with GDCM from memory, one gdcm.Image per frame.

    pydicom's own GDCM plugin refuses 12-bit JPEG Extended, but GDCM decodes it; building the
    gdcm.Image from the fragment bytes avoids any temporary file. Raises only DecodeError.
    """
    if geometry is None:
        checked = pixel_geometry(ds)
        if isinstance(checked, Rejection):
            raise DecodeError(checked.reason)
        geometry = checked
    if geometry.transfer_syntax not in GDCM_TRANSFER_SYNTAXES:
        raise DecodeError(f"GDCM fallback does not handle transfer syntax "
                          f"{geometry.transfer_syntax}")
    try:
        import gdcm  # imported lazily: heavy, and only needed for what pydicom refuses
    except ImportError as exc:
        raise DecodeError("python-gdcm is not installed") from exc
    frames = [_gdcm_frame(gdcm, src, geometry, i)
              for i, src in enumerate(_encapsulated_frames(ds, geometry))]
    if len(frames) != geometry.frames:
        raise DecodeError(f"Pixel Data holds {len(frames)} frames, the header says "
                          f"{geometry.frames}")
    return np.stack(frames)


def _encapsulated_frames(ds: Dataset, geometry: PixelGeometry) -> Iterator[bytes]:
    """The encoded bytes of each frame (Basic or Extended Offset Table when present)."""
    data = ds.get("PixelData")
    if not isinstance(data, bytes | bytearray):
        raise DecodeError("Pixel Data is not a byte string")
    offsets = ds.get("ExtendedOffsetTable")
    lengths = ds.get("ExtendedOffsetTableLengths")
    extended = (offsets, lengths) if isinstance(offsets, bytes) and isinstance(
        lengths, bytes) else None
    try:
        yield from generate_frames(bytes(data), number_of_frames=geometry.frames,
                                   extended_offsets=extended)
    except (ValueError, KeyError, TypeError, EOFError) as exc:
        raise DecodeError(f"encapsulated Pixel Data cannot be split into frames: "
                          f"{type(exc).__name__}: {exc}") from exc


def _gdcm_frame(gdcm: Any, src: bytes, geometry: PixelGeometry, index: int) -> np.ndarray:
    """One frame through gdcm.Image; GDCM returns None (not an exception) when it fails."""
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((geometry.columns, geometry.rows, 1))
    image.SetDataElement(element)
    pi_type = gdcm.PhotometricInterpretation.GetPIType("MONOCHROME2")
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    image.SetTransferSyntax(gdcm.TransferSyntax(
        gdcm.TransferSyntax.GetTSType(geometry.transfer_syntax)))
    image.SetPixelFormat(gdcm.PixelFormat(1, geometry.bits_allocated, geometry.bits_stored,
                                          geometry.bits_stored - 1,
                                          geometry.pixel_representation))
    buffer = image.GetBuffer()
    if not buffer:
        raise DecodeError(f"GDCM could not decode frame {index + 1} "
                          f"({geometry.transfer_syntax})")
    raw = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str
    return _frame_from_bytes(raw, geometry, index)


def _frame_from_bytes(raw: bytes, geometry: PixelGeometry, index: int) -> np.ndarray:
    """Little-endian samples to a (rows, cols) array, sign-extended when stored < allocated."""
    size = geometry.bits_allocated // 8
    if len(raw) != geometry.rows * geometry.columns * size:
        raise DecodeError(f"GDCM returned {len(raw)} bytes for frame {index + 1}, expected "
                          f"{geometry.rows * geometry.columns * size}")
    signed = geometry.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{size}")
    frame = np.frombuffer(raw, dtype=dtype).reshape(geometry.rows, geometry.columns)
    if signed and geometry.bits_stored < geometry.bits_allocated:
        shift = 32 - geometry.bits_stored
        frame = (frame.astype(np.int32) << shift) >> shift
    return frame


def _rescale(ds: Dataset, counts: np.ndarray) -> np.ndarray:
    """float32 counts with Rescale Slope/Intercept applied where the header has them."""
    out = counts.astype(np.float32)
    slope = _as_float(ds.get("RescaleSlope"))
    intercept = _as_float(ds.get("RescaleIntercept"))
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept is not None and intercept != 0.0:
        out += np.float32(intercept)
    return out


def extract_views(ds: Dataset) -> list[ViewImage]:
    """Every frame with its view; frame_number is None for single-frame objects.

    Raises DecodeError when the pixels cannot be decoded.
    """
    pixels = decode_frames(ds)
    views = frame_views(ds)
    if len(views) != pixels.shape[0]:  # cannot happen after pixel_geometry; keep it explicit
        views = (View.UNKNOWN,) * pixels.shape[0]
    if pixels.shape[0] == 1:
        return [ViewImage(views[0], None, pixels[0])]
    return [ViewImage(view, i + 1, pixels[i]) for i, view in enumerate(views)]


def decode_check(ds: Dataset) -> Rejection | None:
    """Decode compressed pixels fully once, so an instance whose pixels cannot be read is
    refused at admission.

    Header problems keep their own status; a decoding failure answers 0xC210. Native
    (uncompressed) data is not decoded: once the pixel module checks passed, its exact length
    included, reading it cannot fail, and decoding cost ~0.5 ms and a float copy twice the
    data's size on every C-STORE. Never raises.
    """
    geometry = pixel_geometry(ds)
    if isinstance(geometry, Rejection):
        return geometry
    if geometry.transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        return None
    try:
        decode_frames(ds)
    except DecodeError as exc:
        return Rejection(STATUS_CANNOT_DECODE, f"pixel data cannot be decoded: {exc}")
    return None


# --------------------------------------------------------------------------------------------
# patient identity without PHI


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
        parts = (_text(ds.get("PatientID")).strip(),
                 _normalise_name(_text(ds.get("PatientName"))),
                 _text(ds.get("PatientBirthDate")).strip())
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

