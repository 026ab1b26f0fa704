"""Codestream headers of encapsulated frames, read before any decoder allocates.

Why: the Image Pixel module is checked against the node's limits, but decoders size their
buffers from the codestream (a 1 KB JPEG 2000 frame may declare 16384 x 16384 inside a 64 x 64
header, and tiny tiles make OpenJPEG allocate per tile). So each frame's own header is read here
(JPEG 2000 SIZ, bare or in a JP2 box; JPEG SOFn; JPEG-LS SOF55; the RLE segment table) and
compared with Rows, Columns, Samples per Pixel and Bits Allocated first.

Pure: bytes in, numbers out; no decoder is called, nothing beyond the header is read, and every
problem is a `CodestreamError` whose message quotes no bytes, only numbers.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

MAX_TILES = 1024  # OpenJPEG allocates a few KiB per tile before reading any tile data
MAX_SEGMENTS = 256  # JPEG marker segments searched for the frame header (real ones: < 20)
MAX_BOXES = 64  # JP2 boxes searched for the codestream box

_SOC, _SIZ = b"\xff\x4f", b"\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOI = b"\xff\xd8"
_SOF55 = 0xF7
_DHP = 0xDE
# SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC): the frame headers of ITU T.81
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_SCAN_OR_END = frozenset({0xDA, 0xD9})  # SOS, EOI: the frame header must come before
_FRAME_HEADERS = _SOF_MARKERS | {_SOF55, _DHP}


class Codec(StrEnum):
    """Codestream families of the encapsulated transfer syntaxes."""

    JPEG2000 = "JPEG 2000"
    JPEG = "JPEG"
    JPEG_LS = "JPEG-LS"
    RLE = "RLE"


CODEC_OF: dict[str, Codec] = {
    **{str(u): Codec.JPEG2000 for u in (JPEG2000Lossless, JPEG2000, JPEG2000MCLossless,
                                        JPEG2000MC, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)},
    **{str(u): Codec.JPEG for u in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                                    JPEGLosslessSV1)},
    **{str(u): Codec.JPEG_LS for u in (JPEGLSLossless, JPEGLSNearLossless)},
    str(RLELossless): Codec.RLE,
}


class CodestreamError(ValueError):
    """A frame's codestream header is unreadable or disagrees with the DICOM header.

    `too_large` marks a header declaring more than the node's limits (answered like an
    over-large DICOM header), as opposed to a merely inconsistent or broken one.
    """

    def __init__(self, reason: str, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


@dataclass(frozen=True)
class Expected:
    """What the DICOM header says a frame holds, and the node's limits."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    max_rows: int
    max_columns: int


@dataclass(frozen=True)
class FrameHeader:
    """What a codestream header declares. RLE declares no dimensions (None)."""

    codec: Codec
    rows: int | None
    columns: int | None
    samples: int
    precision: int  # bits per sample (RLE: 8 per byte segment)
    tiles: int = 1
    segments: int = 0  # RLE only


def codec_for(transfer_syntax: str) -> Codec | None:
    """The codestream family of an encapsulated transfer syntax; None when unknown."""
    return CODEC_OF.get(str(transfer_syntax))


def check_frame(transfer_syntax: str, frame: bytes, expected: Expected) -> FrameHeader:
    """Read one frame's codestream header and compare it with the DICOM header.

    Raises CodestreamError (too_large set when the declared size exceeds the limits)."""
    codec = codec_for(transfer_syntax)
    if codec is None:
        raise CodestreamError(f"no codestream check for transfer syntax {transfer_syntax}")
    header = read_header(codec, frame, expected.bits_allocated // 8 or 1)
    _check_limits(header, expected)
    _check_agreement(header, expected)
    return header


def read_header(codec: Codec, frame: bytes, bytes_per_sample: int = 2) -> FrameHeader:
    """The header of one frame; CodestreamError when it cannot be read."""
    if codec is Codec.JPEG2000:
        return read_j2k(frame)
    if codec is Codec.RLE:
        return read_rle(frame, bytes_per_sample)
    return read_jpeg(frame, codec)


def _check_limits(header: FrameHeader, expected: Expected) -> None:
    """Declared sizes over the node's limits: refused like an over-large DICOM header."""
    if header.rows is not None and header.columns is not None and (
            header.rows > expected.max_rows or header.columns > expected.max_columns
            or header.rows * header.columns * header.samples
            > expected.max_rows * expected.max_columns):
        raise CodestreamError(
            f"{header.codec} codestream declares {header.rows} x {header.columns} x "
            f"{header.samples} sample(s), over the limits ({expected.max_rows} x "
            f"{expected.max_columns})", too_large=True)
    if header.tiles > MAX_TILES:
        raise CodestreamError(f"{header.codec} codestream declares {header.tiles} tiles, over "
                              f"the limit of {MAX_TILES}", too_large=True)


def _check_agreement(header: FrameHeader, expected: Expected) -> None:
    """Dimensions, components and bits as the DICOM header says."""
    if header.codec is Codec.RLE:
        want = expected.samples * (expected.bits_allocated // 8)
        if header.segments != want:
            raise CodestreamError(
                f"RLE header has {header.segments} segment(s), Samples per Pixel "
                f"{expected.samples} x {expected.bits_allocated // 8} byte(s) needs {want}")
        return
    if (header.rows, header.columns) != (expected.rows, expected.columns):
        raise CodestreamError(
            f"{header.codec} codestream declares {header.rows} x {header.columns}, the DICOM "
            f"header {expected.rows} x {expected.columns}")
    if header.samples != expected.samples:
        raise CodestreamError(f"{header.codec} codestream has {header.samples} component(s), "
                              f"Samples per Pixel is {expected.samples}")
    if not 1 <= header.precision <= expected.bits_allocated:
        raise CodestreamError(f"{header.codec} codestream precision {header.precision} bits "
                              f"does not fit Bits Allocated {expected.bits_allocated}")


# --- byte access ---------------------------------------------------------------------------


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    """Big-endian fields at `offset`, or CodestreamError naming what was cut off."""
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise CodestreamError(f"codestream truncated in the {what} ({len(data)} bytes)")
    return struct.unpack_from(fmt, data, offset)


# --- JPEG 2000 -----------------------------------------------------------------------------


def read_j2k(frame: bytes) -> FrameHeader:
    """SIZ of a bare codestream (SOC first) or of the codestream box of a JP2 file."""
    if frame[:12] == _JP2_SIGNATURE:
        frame = _jp2_codestream(frame)
    if frame[:2] != _SOC:
        raise CodestreamError("JPEG 2000 codestream does not start with SOC (FF4F)")
    if frame[2:4] != _SIZ:
        raise CodestreamError("JPEG 2000 SOC is not followed by SIZ (FF51)")
    return _siz(frame, 2)


def _jp2_codestream(data: bytes) -> bytes:
    """The payload of the first 'jp2c' box among the top-level boxes."""
    pos = 0
    for _ in range(MAX_BOXES):
        if pos >= len(data):
            break
        (length,) = _unpack(">I", data, pos, "JP2 box header")
        kind = data[pos + 4:pos + 8]
        head = 8
        if length == 1:
            (length,) = _unpack(">Q", data, pos + 8, "JP2 box header")
            head = 16
        elif length == 0:  # the last box: to the end of the data
            length = len(data) - pos
        if length < head:
            raise CodestreamError(f"JP2 box of {length} bytes is shorter than its header")
        if kind == b"jp2c":
            return data[pos + head:pos + length]
        pos += length
    raise CodestreamError("JP2 file without a codestream box (jp2c) in its first "
                          f"{MAX_BOXES} boxes")


def _siz(data: bytes, at: int) -> FrameHeader:
    """Image and tile size, components and precision (ITU T.800 A.5.1)."""
    (lsiz, _rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz) = _unpack(
        ">HHIIIIIIIIH", data, at + 2, "SIZ marker segment")
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz:
        raise CodestreamError(f"SIZ length {lsiz} does not fit {csiz} component(s)")
    if xsiz <= xo or ysiz <= yo or xt == 0 or yt == 0 or xto > xo or yto > yo \
            or xto + xt <= xo or yto + yt <= yo:
        raise CodestreamError("SIZ image or tile geometry is inconsistent")
    tiles = _ceil(xsiz - xto, xt) * _ceil(ysiz - yto, yt)
    components = [_unpack(">BBB", data, at + 40 + 3 * c, "SIZ component list")
                  for c in range(csiz)]
    if any(dx == 0 or dy == 0 for _, dx, dy in components):
        raise CodestreamError("SIZ has a component with a zero subsampling factor")
    # a component's size: ceil(Ysiz/YRsiz) - ceil(YOsiz/YRsiz), likewise X (the largest one)
    rows, columns = max(((_ceil(ysiz, dy) - _ceil(yo, dy), _ceil(xsiz, dx) - _ceil(xo, dx))
                         for _, dx, dy in components), key=lambda size: size[0] * size[1])
    precision = max((ssiz & 0x7F) + 1 for ssiz, _, _ in components)
    return FrameHeader(Codec.JPEG2000, rows, columns, csiz, precision, tiles)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


# --- JPEG and JPEG-LS ----------------------------------------------------------------------


def read_jpeg(frame: bytes, codec: Codec = Codec.JPEG) -> FrameHeader:
    """The first frame header (SOFn, DHP or SOF55) before the first scan."""
    if frame[:2] != _SOI:
        raise CodestreamError(f"{codec} codestream does not start with SOI (FFD8)")
    pos = 2
    for _ in range(MAX_SEGMENTS):
        pos = _next_marker(frame, pos, codec)
        marker = frame[pos + 1]
        pos += 2
        if marker in _STANDALONE:
            continue
        if marker in (0x00, 0xD8):  # a stuffed byte or a second SOI: not a header marker
            raise CodestreamError(f"{codec} codestream has marker FF{marker:02X} before its "
                                  "frame header")
        if marker in _SCAN_OR_END:
            raise CodestreamError(f"{codec} codestream reaches its scan before a frame header")
        (length,) = _unpack(">H", frame, pos, f"marker FF{marker:02X}")
        if length < 2:
            raise CodestreamError(f"{codec} marker FF{marker:02X} has length {length}")
        if marker in _FRAME_HEADERS:
            return _sof(frame, pos, length, marker, codec)
        pos += length
    raise CodestreamError(f"{codec} frame header not found in the first {MAX_SEGMENTS} "
                          "marker segments")


def _next_marker(data: bytes, pos: int, codec: Codec) -> int:
    """Position of the next marker's FF (fill bytes FF skipped)."""
    if pos + 1 >= len(data):
        raise CodestreamError(f"{codec} codestream truncated before its frame header")
    if data[pos] != 0xFF:
        raise CodestreamError(f"{codec} codestream: marker expected at byte {pos}")
    while pos + 1 < len(data) and data[pos + 1] == 0xFF:  # fill bytes
        pos += 1
    if pos + 1 >= len(data):
        raise CodestreamError(f"{codec} codestream truncated before its frame header")
    return pos


def _sof(data: bytes, pos: int, length: int, marker: int, codec: Codec) -> FrameHeader:
    """Lf, P, Y, X, Nf of a frame header (ITU T.81 B.2.2, T.87 C.2.2)."""
    if (marker == _SOF55) != (codec is Codec.JPEG_LS):
        found = "SOF55 (JPEG-LS)" if marker == _SOF55 else f"FF{marker:02X} (JPEG)"
        raise CodestreamError(f"{codec} transfer syntax but the frame header is {found}")
    precision, rows, columns, components = _unpack(">BHHB", data, pos + 2, "frame header")
    if length != 8 + 3 * components or components == 0:
        raise CodestreamError(f"{codec} frame header length {length} does not fit "
                              f"{components} component(s)")
    _unpack(f">{3 * components}B", data, pos + 8, "frame header components")
    if rows == 0:
        raise CodestreamError(f"{codec} frame header defers the number of lines to a DNL "
                              "marker (not supported)")
    if columns == 0:
        raise CodestreamError(f"{codec} frame header declares 0 samples per line")
    return FrameHeader(codec, rows, columns, components, precision)


# --- RLE -----------------------------------------------------------------------------------


def read_rle(frame: bytes, bytes_per_sample: int = 2) -> FrameHeader:
    """The 64-byte RLE header (PS3.5 G.3.1): segment count and increasing offsets inside the
    frame. It declares no dimensions: the segment count is what must fit the DICOM header."""
    if len(frame) < 64:
        raise CodestreamError(f"RLE frame of {len(frame)} bytes is shorter than its 64-byte "
                              "header")
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header declares {count} segments (1-15 allowed)")
    used = offsets[:count]
    if used[0] != 64:
        raise CodestreamError(f"RLE first segment starts at {used[0]}, not 64")
    for before, after in itertools.pairwise(used):
        if after <= before:
            raise CodestreamError("RLE segment offsets do not increase")
    if used[-1] >= len(frame):
        raise CodestreamError(f"RLE segment offset {used[-1]} lies outside the frame of "
                              f"{len(frame)} bytes")
    samples = max(1, count // max(1, bytes_per_sample))
    return FrameHeader(Codec.RLE, None, None, samples, 8 * bytes_per_sample, segments=count)
