"""Pixel data of grey-scale NM images: the Image Pixel module checked before anything is
allocated (`pixel_geometry`), the transfer syntaxes the installed decoders read, and decoding to
float32 counts (pydicom's plugins first, GDCM directly for what they refuse).

Every size is checked before a decoder runs: the DICOM header's, and each encapsulated frame's
own codestream header (node.dicom.codestream), since decoders allocate what the codestream
declares. No message carries patient data (exception texts are redacted).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    AllTransferSyntaxes,
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

from node.dicom.codestream import CodestreamError, Expected, check_frame
from node.dicom.identity import is_valid_uid
from node.dicom.status import Rejection, Status
from node.dicom.values import as_float, as_int, text_of
from node.logs import redacted

log = logging.getLogger(__name__)

MAX_ROWS = 4096
MAX_COLUMNS = 4096
MAX_FRAMES = 64
MAX_DECODED_BYTES = 256 * 1024 * 1024  # of the float32 result

NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
     ExplicitVRBigEndian})
# Encapsulated syntaxes the direct-GDCM fallback decodes from memory.
GDCM_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
     JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless})

_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: first item of encapsulated data


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
    samples_per_pixel: int = 1  # grey-scale only: _format_rejection refuses anything else

    @property
    def decoded_bytes(self) -> int:
        """Size of the float32 result, checked before decoding."""
        return self.rows * self.columns * self.frames * 4

    @property
    def native_bytes(self) -> int:
        """Expected length of native (uncompressed) Pixel Data, without the padding byte."""
        return self.rows * self.columns * self.frames * self.bits_allocated // 8



def accepted_transfer_syntaxes() -> list[str]:
    """What the SCP accepts: Explicit VR Little Endian first (preferred), Implicit next, then
    every other syntax the installed decoders read."""
    first = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    rest = [str(u) for u in AllTransferSyntaxes if str(u) not in first]
    return [u for u in first + rest if transfer_syntax_decodable(u)]


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



def pixel_rejection(ds: Dataset) -> Rejection | None:
    """Pixel-module checks shared by admission and decoding: format, sizes, data length."""
    result = pixel_geometry(ds)
    return result if isinstance(result, Rejection) else None


def pixel_geometry(ds: Dataset) -> PixelGeometry | Rejection:
    """Validated Image Pixel attributes, or why they cannot be decoded safely. Never raises."""
    try:
        return _pixel_geometry(ds)
    except Exception as exc:
        return Rejection(Status.CANNOT_UNDERSTAND,
                         f"malformed Image Pixel module ({type(exc).__name__} while reading it)")


def _pixel_geometry(ds: Dataset) -> PixelGeometry | Rejection:
    """The checks in order: pixel element kind, format, size caps, syntax, data length."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return Rejection(Status.UNSUPPORTED_PIXELS,
                         "float pixel data (Float/Double Float Pixel Data) is not supported: "
                         "integer counts expected")
    if "PixelData" not in ds:
        return Rejection(Status.NO_PIXEL_DATA, "Pixel Data (7FE0,0010) missing")
    fields = {k: as_int(ds.get(k)) for k in (
        "Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel",
        "PixelRepresentation")}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        return Rejection(Status.BAD_PIXEL_MODULE,
                         f"Image Pixel attributes missing or not integers: {', '.join(missing)}")
    frames_value = ds.get("NumberOfFrames")
    frames = 1 if frames_value in (None, "") else as_int(frames_value)
    if frames is None:
        return Rejection(Status.BAD_PIXEL_MODULE, "Number of Frames is not an integer")
    rows, cols = int(fields["Rows"] or 0), int(fields["Columns"] or 0)
    rejection = (_format_rejection(ds, fields) or _size_rejection(rows, cols, frames))
    if rejection is not None:
        return rejection
    geometry = PixelGeometry(rows, cols, frames, int(fields["BitsAllocated"] or 0),
                             int(fields["BitsStored"] or 0),
                             int(fields["PixelRepresentation"] or 0), _transfer_syntax(ds) or "")
    return (_syntax_rejection(geometry) or _length_rejection(ds, geometry)
            or _codestream_rejection(ds, geometry) or geometry)


def _format_rejection(ds: Dataset, fields: dict[str, int | None]) -> Rejection | None:
    """Grey-scale 8- or 16-bit integers only: colour, 1-bit and 32-bit pixels are refused."""
    spp, bits = fields["SamplesPerPixel"], fields["BitsAllocated"]
    stored, signed = fields["BitsStored"] or 0, fields["PixelRepresentation"]
    if spp != 1:
        return Rejection(Status.UNSUPPORTED_PIXELS,
                         f"Samples per Pixel {spp}: colour images are not supported")
    photometric = text_of(ds.get("PhotometricInterpretation")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric[:16] if re.fullmatch(r"[A-Z0-9_ ]*", photometric) else "?"
        return Rejection(Status.UNSUPPORTED_PIXELS,
                         f"Photometric Interpretation {shown or 'missing'}: MONOCHROME1/2 "
                         "expected")
    if bits not in (8, 16):
        return Rejection(Status.UNSUPPORTED_PIXELS,
                         f"Bits Allocated {bits}: only 8- or 16-bit integer counts are supported")
    if not 1 <= stored <= bits:
        return Rejection(Status.BAD_PIXEL_MODULE,
                         f"Bits Stored {stored} does not fit Bits Allocated {bits}")
    if signed not in (0, 1):
        return Rejection(Status.BAD_PIXEL_MODULE, f"Pixel Representation {signed} is not 0 or 1")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value not in (None, "") and as_float(value) is None:
            return Rejection(Status.BAD_PIXEL_MODULE, f"{keyword} is not a finite number")
    return None


def _size_rejection(rows: int, cols: int, frames: int) -> Rejection | None:
    """Memory-bomb guard: refuse absurd dimensions before anything is allocated."""
    if rows < 1 or cols < 1 or frames < 1:
        return Rejection(Status.BAD_PIXEL_MODULE,
                         f"empty image: Rows {rows}, Columns {cols}, Number of Frames {frames}")
    if rows > MAX_ROWS or cols > MAX_COLUMNS or frames > MAX_FRAMES:
        return Rejection(Status.TOO_LARGE,
                         f"dimensions {frames} x {rows} x {cols} exceed the limits "
                         f"({MAX_FRAMES} frames, {MAX_ROWS} x {MAX_COLUMNS})")
    if rows * cols * frames * 4 > MAX_DECODED_BYTES:
        return Rejection(Status.TOO_LARGE,
                         f"decoded size of {frames} x {rows} x {cols} exceeds "
                         f"{MAX_DECODED_BYTES // 2**20} MiB")
    return None


def _syntax_rejection(geometry: PixelGeometry) -> Rejection | None:
    """A transfer syntax some decoder handles (checked without decoding)."""
    uid = geometry.transfer_syntax
    if not uid:
        return Rejection(Status.CANNOT_DECODE, "Transfer Syntax UID missing: pixel data cannot "
                                               "be interpreted")
    if not transfer_syntax_decodable(uid):
        shown = uid if is_valid_uid(uid) else "(invalid UID)"
        return Rejection(Status.CANNOT_DECODE, f"no decoder for transfer syntax {shown}")
    return None


def _length_rejection(ds: Dataset, geometry: PixelGeometry) -> Rejection | None:
    """Native data: exact length (one padding byte allowed); encapsulated: starts with an item.
    Native data left unread by a header-only parse (a deferred value) is judged by the length
    in its element header: the receiver never reads the pixels of a native instance."""
    native = geometry.transfer_syntax in NATIVE_TRANSFER_SYNTAXES
    length = deferred_length(ds, "PixelData") if native else None
    data = ds.get("PixelData") if length is None else None
    if length is None:
        if not isinstance(data, bytes | bytearray):
            return Rejection(Status.NO_PIXEL_DATA, "Pixel Data is empty")
        length = len(data)
    if length == 0:
        return Rejection(Status.NO_PIXEL_DATA, "Pixel Data is empty")
    if native:
        expected = geometry.native_bytes
        if length not in (expected, expected + 1):
            return Rejection(Status.BAD_PIXEL_MODULE,
                             f"Pixel Data holds {length} bytes but {geometry.frames} x "
                             f"{geometry.rows} x {geometry.columns} x "
                             f"{geometry.bits_allocated} bits needs {expected}")
    elif data is None or bytes(data[:4]) != _ITEM_TAG:
        return Rejection(Status.BAD_PIXEL_MODULE,
                         "Pixel Data is not encapsulated although the transfer syntax is "
                         "compressed")
    return None


UNDEFINED_LENGTH = 0xFFFFFFFF  # an element's length field for a sequence-like value


def deferred_length(ds: Dataset, keyword: str) -> int | None:
    """The length of a value a header-only parse left unread (pydicom's deferred read, see
    node.receive.handlers), from its element header; None when it was read (or is absent)."""
    elem = ds.get_item(keyword, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None \
            and elem.length != UNDEFINED_LENGTH:
        return int(elem.length)
    return None


def _codestream_rejection(ds: Dataset, geometry: PixelGeometry) -> Rejection | None:
    """Each encapsulated frame's codestream header against the DICOM header, before any
    decoder sizes a buffer from it: over the limits answers 0xC015 like an over-large DICOM
    header (a bomb is a bomb wherever it is declared), anything else inconsistent 0xC210."""
    if geometry.transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        return None
    try:
        for _ in _checked_frames(ds, geometry):
            pass
    except _FrameRejected as exc:
        return exc.rejection
    return None


class _FrameRejected(DecodeError):
    """A frame's codestream header refused; carries the status for admission."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


def _expected(geometry: PixelGeometry) -> Expected:
    return Expected(geometry.rows, geometry.columns, geometry.samples_per_pixel,
                    geometry.bits_allocated, MAX_ROWS, MAX_COLUMNS)


def _checked_frames(ds: Dataset, geometry: PixelGeometry) -> Iterator[bytes]:
    """The encoded frames, each yielded only after its codestream header passed; raises
    _FrameRejected (a DecodeError) for the first that does not, or when the frames cannot be
    split."""
    expected = _expected(geometry)
    frames = _encapsulated_frames(ds, geometry)
    for index in range(1, geometry.frames + 1):
        try:
            frame = next(frames)
        except (DecodeError, StopIteration) as exc:  # _encapsulated_frames counts the frames
            raise _FrameRejected(Rejection(Status.CANNOT_DECODE, str(exc))) from exc
        try:
            check_frame(geometry.transfer_syntax, frame, expected)
        except CodestreamError as exc:
            status = Status.TOO_LARGE if exc.too_large else Status.CANNOT_DECODE
            raise _FrameRejected(Rejection(status, f"frame {index}: {exc}")) from exc
        yield frame
    try:
        next(frames)  # ends the count: more frames than the header says raises here
    except StopIteration:
        return
    except DecodeError as exc:
        raise _FrameRejected(Rejection(Status.CANNOT_DECODE, str(exc))) from exc



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
        raise DecodeError(f"decoding failed: {redacted(exc)}") from exc


def _decode_raw(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """Stored values as (frames, rows, cols); pydicom first, then direct GDCM."""
    try:
        arr = pixel_array(ds, decoding_plugin=_preferred_plugin(geometry))
    except Exception as exc:  # every installed plugin refused: try GDCM below
        if geometry.transfer_syntax not in GDCM_TRANSFER_SYNTAXES or not _gdcm_available():
            raise DecodeError(f"pydicom could not decode transfer syntax "
                              f"{geometry.transfer_syntax}: {redacted(exc)}") from exc
        log.debug("pydicom refused %s (%s): trying GDCM directly", geometry.transfer_syntax,
                  redacted(exc))
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
    gdcm.Image from the fragment bytes avoids any temporary file. Each frame's codestream header
    is checked before GDCM sees it. Raises only DecodeError.
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
              for i, src in enumerate(_checked_frames(ds, geometry))]
    return np.stack(frames)


def _encapsulated_frames(ds: Dataset, geometry: PixelGeometry) -> Iterator[bytes]:
    """The encoded bytes of each frame (Basic or Extended Offset Table when present), exactly
    as many as the header says: fewer or more is a DecodeError (never decoded one by one)."""
    data = ds.get("PixelData")
    if not isinstance(data, bytes | bytearray):
        raise DecodeError("Pixel Data is not a byte string")
    offsets = ds.get("ExtendedOffsetTable")
    lengths = ds.get("ExtendedOffsetTableLengths")
    extended = (offsets, lengths) if isinstance(offsets, bytes) and isinstance(
        lengths, bytes) else None
    count = 0
    try:
        for frame in generate_frames(bytes(data), number_of_frames=geometry.frames,
                                     extended_offsets=extended):
            count += 1
            if count > geometry.frames:
                raise DecodeError(f"Pixel Data holds more than the {geometry.frames} frame(s) "
                                  "the header says")
            yield frame
    except (ValueError, KeyError, TypeError, EOFError, struct.error) as exc:
        raise DecodeError(f"encapsulated Pixel Data cannot be split into frames: "
                          f"{redacted(exc)}") from exc
    if count < geometry.frames:
        raise DecodeError(f"Pixel Data holds {count} frame(s), the header says "
                          f"{geometry.frames}")


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
    slope = as_float(ds.get("RescaleSlope"))
    intercept = as_float(ds.get("RescaleIntercept"))
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept is not None and intercept != 0.0:
        out += np.float32(intercept)
    return out
