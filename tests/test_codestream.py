"""node.dicom.codestream: each encapsulated frame's own header (JPEG 2000 SIZ, bare or in a JP2
box; JPEG SOFn; JPEG-LS SOF55; the RLE segment table) read and compared with the DICOM header
before any decoder allocates, and its wiring into every decode path of node.dicom.pixels.

Streams are genuine encodings of one 64 x 64 image (tests/support/hostile.py) with their
headers rewritten: bombs declaring 16384 x 16384, wrong component counts, truncations."""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from node.dicom.admission import admission_rejection, check_dataset, decode_check
from node.dicom.codestream import (
    MAX_BOXES,
    MAX_SEGMENTS,
    MAX_TILES,
    Codec,
    CodestreamError,
    Expected,
    FrameHeader,
    check_frame,
    codec_for,
    read_header,
    read_j2k,
    read_jpeg,
    read_rle,
)
from node.dicom.pixels import (
    NATIVE_TRANSFER_SYNTAXES,
    DecodeError,
    accepted_transfer_syntaxes,
    decode_frames,
    decode_with_gdcm,
    pixel_geometry,
)
from node.dicom.status import Rejection, Status
from tests.support import hostile

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "wg04-nm1"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
D, BIG = hostile.FRAME_SIZE, hostile.BOMB_SIZE
GREY16 = Expected(D, D, 1, 16, 4096, 4096)
GREY8 = Expected(D, D, 1, 8, 4096, 4096)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base() -> Dataset:
    return hostile.base_dataset(3)


@pytest.fixture(scope="module")
def streams(base: Dataset) -> dict[str, bytes]:
    """Genuine J2K, JPEG-LS, RLE (16-bit) and JPEG baseline (8-bit, grey and RGB) frames."""
    return hostile._streams(base, 3)


def _error(read: Callable[[], object]) -> CodestreamError:
    with pytest.raises(CodestreamError) as info:
        read()
    return info.value


# --- JPEG 2000 -----------------------------------------------------------------------------


def test_j2k_siz_of_a_genuine_stream(streams: dict[str, bytes]) -> None:
    header = read_j2k(streams["j2k"])
    assert (header.codec, header.rows, header.columns, header.samples, header.tiles) == \
        (Codec.JPEG2000, D, D, 1, 1)
    assert 1 <= header.precision <= 16
    assert check_frame(JPEG2000Lossless, streams["j2k"], GREY16) == header


def test_j2k_bomb_is_too_large_before_anything_else(streams: dict[str, bytes]) -> None:
    bomb = hostile.with_siz(streams["j2k"], BIG, BIG)
    assert (read_j2k(bomb).rows, read_j2k(bomb).columns) == (BIG, BIG)
    error = _error(lambda: check_frame(JPEG2000Lossless, bomb, GREY16))
    assert error.too_large and "16384 x 16384" in str(error)


def test_j2k_in_a_jp2_box_is_read_from_its_codestream_box(streams: dict[str, bytes]) -> None:
    """The ihdr box says 64 x 64; what the decoder uses is the codestream's SIZ."""
    wrapped = hostile.jp2_wrapped(hostile.with_siz(streams["j2k"], BIG, BIG), D, D)
    assert (read_j2k(wrapped).rows, read_j2k(wrapped).columns) == (BIG, BIG)
    assert _error(lambda: check_frame(JPEG2000Lossless, wrapped, GREY16)).too_large
    genuine = hostile.jp2_wrapped(streams["j2k"], D, D)
    assert check_frame(JPEG2000Lossless, genuine, GREY16).rows == D


def test_jp2_boxes_with_extended_and_open_lengths(streams: dict[str, bytes]) -> None:
    """XLBox (length 1) and a last box running to the end (length 0) are followed."""
    extended = (hostile.JP2_SIGNATURE + struct.pack(">I4sQ", 1, b"xml ", 16 + 4) + b"<a/>"
                + struct.pack(">I4s", 0, b"jp2c") + streams["j2k"])
    assert read_j2k(extended).rows == D


@pytest.mark.parametrize("stream, words", [
    (hostile.JP2_SIGNATURE + struct.pack(">I4s", 12, b"ftyp") + b"jp2 ", "without a codestream"),
    (hostile.JP2_SIGNATURE + struct.pack(">I4s", 4, b"ftyp"), "shorter than its header"),
    (hostile.JP2_SIGNATURE + struct.pack(">I4s", 8, b"free") * (MAX_BOXES + 1),
     "without a codestream box"),
    (hostile.JP2_SIGNATURE + b"\x00\x00", "truncated in the JP2 box header"),
])
def test_broken_jp2_boxes(stream: bytes, words: str) -> None:
    assert words in str(_error(lambda: read_j2k(stream)))


def test_j2k_tiles_over_the_limit_are_too_large(streams: dict[str, bytes]) -> None:
    """4096 tiles of 1 x 1 inside the DICOM header's 64 x 64: OpenJPEG would allocate per tile."""
    tiled = hostile.with_siz(streams["j2k"], D, D, tile=1)
    assert read_j2k(tiled).tiles == D * D > MAX_TILES
    error = _error(lambda: check_frame(JPEG2000Lossless, tiled, GREY16))
    assert error.too_large and "4096 tiles" in str(error)
    assert check_frame(JPEG2000Lossless, hostile.with_siz(streams["j2k"], D, D, tile=16),
                       GREY16).tiles == 16


@pytest.mark.parametrize("change, words", [
    (lambda s: hostile.with_siz(s, 4096, 4096), "declares 4096 x 4096, the DICOM header 64 x 64"),
    (lambda s: hostile.with_siz(s, D, D, components=3), "3 component(s), Samples per Pixel is 1"),
    (lambda s: hostile.with_siz(s, D, D, precision=24), "precision 24 bits does not fit"),
])
def test_j2k_mismatch_is_not_too_large(streams: dict[str, bytes],
                                       change: Callable[[bytes], bytes], words: str) -> None:
    error = _error(lambda: check_frame(JPEG2000Lossless, change(streams["j2k"]), GREY16))
    assert not error.too_large and words in str(error)


def _siz(xsiz: int, ysiz: int, xo: int = 0, yo: int = 0, tile: tuple[int, int, int, int] | None
         = None, components: tuple[tuple[int, int, int], ...] = ((15, 1, 1),),
         length: int | None = None) -> bytes:
    """SOC and a SIZ built field by field (tile: XTsiz, YTsiz, XTOsiz, YTOsiz)."""
    xt, yt, xto, yto = tile or (xsiz, ysiz, 0, 0)
    body = struct.pack(">HIIIIIIIIH", 0, xsiz, ysiz, xo, yo, xt, yt, xto, yto, len(components))
    body += b"".join(bytes(c) for c in components)
    return b"\xff\x4f\xff\x51" + struct.pack(">H", length or 2 + len(body)) + body


def test_j2k_image_offset_and_subsampling_give_the_component_size() -> None:
    """Component size is ceil(Xsiz/XRsiz) - ceil(XOsiz/XRsiz) (ITU T.800 B.2)."""
    header = read_j2k(_siz(110, 74, xo=10, yo=10))
    assert (header.rows, header.columns) == (64, 100)
    header = read_j2k(_siz(128, 64, components=((7, 2, 1),)))
    assert (header.rows, header.columns, header.precision) == (64, 64, 8)


@pytest.mark.parametrize("stream, words", [
    (b"\xff\xd8" + bytes(60), "does not start with SOC"),
    (b"\xff\x4f\xff\x52" + bytes(60), "not followed by SIZ"),
    (_siz(64, 64, length=40), "SIZ length 40 does not fit 1 component"),
    (_siz(64, 64, components=()), "does not fit 0 component"),
    (_siz(64, 64, xo=64), "geometry is inconsistent"),
    (_siz(64, 64, tile=(0, 64, 0, 0)), "geometry is inconsistent"),
    (_siz(64, 64, xo=8, tile=(4, 64, 0, 0)), "geometry is inconsistent"),  # origin not tiled
    (_siz(64, 64, components=((15, 0, 1),)), "zero subsampling factor"),
])
def test_broken_siz(stream: bytes, words: str) -> None:
    assert words in str(_error(lambda: read_j2k(stream)))


def test_every_truncation_of_a_j2k_header_is_a_codestream_error(streams: dict[str, bytes]
                                                                ) -> None:
    end = 4 + struct.unpack_from(">H", streams["j2k"], 4)[0]  # SOC + SIZ
    for n in range(end):
        _error(lambda n=n: read_j2k(streams["j2k"][:n]))
    assert read_j2k(streams["j2k"][:end]).rows == D  # the header alone is enough


# --- JPEG and JPEG-LS ----------------------------------------------------------------------


def test_jpeg_sof_of_genuine_streams(streams: dict[str, bytes]) -> None:
    grey = read_jpeg(streams["jpeg"])
    assert (grey.rows, grey.columns, grey.samples, grey.precision) == (D, D, 1, 8)
    assert read_jpeg(streams["jpeg-rgb"]).samples == 3
    jls = read_jpeg(streams["jls"], Codec.JPEG_LS)
    assert (jls.codec, jls.rows, jls.columns, jls.samples) == (Codec.JPEG_LS, D, D, 1)
    assert check_frame(JPEGLSLossless, streams["jls"], GREY16) == jls


@pytest.mark.parametrize("ts, key, expected", [
    (JPEGBaseline8Bit, "jpeg", GREY8), (JPEGLSLossless, "jls", GREY16)])
def test_jpeg_bombs_are_too_large(streams: dict[str, bytes], ts: str, key: str,
                                  expected: Expected) -> None:
    bomb = hostile.with_sof(streams[key], BIG, BIG)
    error = _error(lambda: check_frame(ts, bomb, expected))
    assert error.too_large and "16384 x 16384" in str(error)


def test_every_frame_header_marker_is_read(streams: dict[str, bytes]) -> None:
    """SOF0-SOF15 less DHT, JPG and DAC; DHP too."""
    for marker in [*range(0xC0, 0xD0), 0xDE]:
        if marker in (0xC4, 0xC8, 0xCC):
            continue
        stream = hostile.with_sof(streams["jpeg"], 100, 200, marker=marker)
        assert (read_jpeg(stream).rows, read_jpeg(stream).columns) == (100, 200), hex(marker)


def test_jpeg_markers_before_the_frame_header_are_skipped(streams: dict[str, bytes]) -> None:
    """Fill bytes, standalone markers (RST, TEM), comments and application segments."""
    jpeg = streams["jpeg"]
    extra = b"\xff\xff\xff\xd0" + b"\xff\x01" + b"\xff\xfe\x00\x06note" + b"\xff\xe1\x00\x02"
    assert read_jpeg(jpeg[:2] + extra + jpeg[2:]).rows == D


def _jpeg(*segments: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(segments)


def _sof(marker: int, precision: int, rows: int, cols: int, components: int,
         length: int | None = None) -> bytes:
    body = struct.pack(">BHHB", precision, rows, cols, components) + bytes(3 * components)
    return bytes([0xFF, marker]) + struct.pack(">H", length or 2 + len(body)) + body


@pytest.mark.parametrize("stream, words", [
    (b"\x00\xd8" + _sof(0xC0, 8, 8, 8, 1), "does not start with SOI"),
    (_jpeg(b"\xff\xda\x00\x08" + bytes(6)), "reaches its scan before a frame header"),
    (_jpeg(b"\xff\xd9"), "reaches its scan before a frame header"),
    (_jpeg(b"\xff\x00"), "marker FF00 before its frame header"),
    (_jpeg(b"\xff\xd8"), "marker FFD8 before its frame header"),
    (_jpeg(b"\x12\x34"), "marker expected at byte 2"),
    (_jpeg(b"\xff\xe0\x00\x01"), "marker FFE0 has length 1"),
    (_jpeg(b"\xff\xfe\x00\x02" * (MAX_SEGMENTS + 1)), "not found in the first 256"),
    (_jpeg(_sof(0xC0, 8, 0, 8, 1)), "DNL marker"),
    (_jpeg(_sof(0xC0, 8, 8, 0, 1)), "0 samples per line"),
    (_jpeg(_sof(0xC0, 8, 8, 8, 1, length=20)), "length 20 does not fit 1 component"),
    (_jpeg(_sof(0xC0, 8, 8, 8, 0)), "does not fit 0 component"),
    (_jpeg(b"\xff\xff\xff"), "truncated before its frame header"),
    (_jpeg(_sof(0xF7, 8, 8, 8, 1)), "JPEG transfer syntax but the frame header is SOF55"),
])
def test_broken_jpeg(stream: bytes, words: str) -> None:
    assert words in str(_error(lambda: read_jpeg(stream)))


def test_jpeg_frame_header_under_a_jpeg_ls_syntax_is_refused(streams: dict[str, bytes]) -> None:
    error = _error(lambda: check_frame(JPEGLSLossless, streams["jpeg"], GREY8))
    assert "JPEG-LS transfer syntax but the frame header is FFC0" in str(error)


def test_jpeg_component_and_precision_mismatch(streams: dict[str, bytes]) -> None:
    error = _error(lambda: check_frame(JPEGBaseline8Bit, streams["jpeg-rgb"], GREY8))
    assert not error.too_large and "3 component(s)" in str(error)
    twelve = _jpeg(_sof(0xC1, 12, D, D, 1))
    assert "precision 12 bits does not fit Bits Allocated 8" in str(
        _error(lambda: check_frame(JPEGBaseline8Bit, twelve, GREY8)))
    assert check_frame(JPEGBaseline8Bit, twelve, GREY16).precision == 12


def test_every_truncation_of_a_jpeg_header_is_a_codestream_error(streams: dict[str, bytes]
                                                                 ) -> None:
    for key, codec in (("jpeg", Codec.JPEG), ("jls", Codec.JPEG_LS)):
        stream = streams[key]
        end = next(n for n in range(len(stream)) if _reads(stream[:n], codec))
        for n in range(end):
            _error(lambda n=n, s=stream, c=codec: read_jpeg(s[:n], c))


def _reads(stream: bytes, codec: Codec) -> bool:
    try:
        read_jpeg(stream, codec)
    except CodestreamError:
        return False
    return True


# --- RLE ----------------------------------------------------------------------------------


def test_rle_header_of_a_genuine_frame(streams: dict[str, bytes]) -> None:
    header = read_rle(streams["rle"], bytes_per_sample=2)
    assert (header.codec, header.segments, header.rows) == (Codec.RLE, 2, None)
    assert check_frame(RLELossless, streams["rle"], GREY16).segments == 2


@pytest.mark.parametrize("count, offsets, words", [
    (0, [], "declares 0 segments"),
    (16, [], "declares 16 segments"),
    (2, [80, 90], "first segment starts at 80"),
    (2, [64, 64], "do not increase"),
    (3, [64, 100, 90], "do not increase"),
    (2, [64, 0xFFFFFFF0], "outside the frame"),
])
def test_broken_rle_headers(streams: dict[str, bytes], count: int, offsets: list[int],
                            words: str) -> None:
    frame = hostile.with_rle_header(streams["rle"], count, offsets)
    assert words in str(_error(lambda: read_rle(frame)))


def test_rle_segment_count_must_fit_samples_and_bytes(streams: dict[str, bytes]) -> None:
    """A 16-bit grey frame has 2 segments; an 8-bit header around it is inconsistent."""
    error = _error(lambda: check_frame(RLELossless, streams["rle"], GREY8))
    assert not error.too_large and "2 segment(s), Samples per Pixel 1 x 1 byte(s) needs 1" \
        in str(error)
    assert "shorter than its 64-byte header" in str(_error(lambda: read_rle(bytes(63))))


# --- dispatch, fuzzing, real files ----------------------------------------------------------


def test_every_encapsulated_syntax_the_node_accepts_has_a_codestream_check() -> None:
    """A syntax without one would reach a decoder unchecked."""
    encapsulated = [u for u in accepted_transfer_syntaxes() if u not in NATIVE_TRANSFER_SYNTAXES]
    assert encapsulated and all(codec_for(u) is not None for u in encapsulated), encapsulated
    assert codec_for("1.2.840.10008.1.2.4.999") is None
    assert "no codestream check" in str(_error(lambda: check_frame("1.2.3", b"", GREY16)))


@FUZZ
@given(st.sampled_from(list(Codec)), st.binary(max_size=200))
def test_random_bytes_raise_only_codestream_errors(codec: Codec, data: bytes) -> None:
    try:
        header = read_header(codec, data)
    except CodestreamError:
        return
    assert isinstance(header, FrameHeader)


@FUZZ
@given(st.sampled_from(["j2k", "jpeg", "jls", "rle"]),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_headers_raise_only_codestream_errors(streams: dict[str, bytes], key: str,
                                                      flips: list[tuple[int, int]]) -> None:
    codec = {"j2k": Codec.JPEG2000, "jpeg": Codec.JPEG, "jls": Codec.JPEG_LS,
             "rle": Codec.RLE}[key]
    data = bytearray(streams[key][:300])
    for pos, value in flips:
        data[pos % len(data)] = value
    syntax = {Codec.JPEG2000: JPEG2000Lossless, Codec.JPEG: JPEGBaseline8Bit,
              Codec.JPEG_LS: JPEGLSLossless, Codec.RLE: RLELossless}[codec]
    try:
        header = check_frame(syntax, bytes(data), GREY8 if key == "jpeg" else GREY16)
    except CodestreamError:
        return
    assert header.codec is codec  # what passes agrees with the DICOM header
    assert header.rows in (None, D) and header.tiles <= MAX_TILES


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames")
                                                                   or 1)))


def _expected(ds: Dataset) -> Expected:
    return Expected(int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel),
                    int(ds.BitsAllocated), 4096, 4096)


@pytest.mark.filterwarnings("ignore")
def test_every_pydicom_test_file_pydicom_decodes_passes() -> None:
    """Whatever pydicom's own decoders read, colour and multi-frame included, agrees with its
    header: the check refuses nothing a decoder would have read correctly."""
    checked = 0
    for path in sorted(PYDICOM_FILES.rglob("*")):
        try:
            ds = dcmread(path)
            syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # not DICOM, or no file meta
            continue
        if codec_for(syntax) is None or "PixelData" not in ds:
            continue
        try:
            ds.pixel_array  # noqa: B018
        except Exception:  # corrupt on purpose (pydicom tests its own failures)
            continue
        for frame in _frames(ds):
            check_frame(syntax, frame, _expected(ds))
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("name", ["NM1_RLE", "NM1_JPLL", "NM1_JPLY", "NM1_JLSL", "NM1_JLSN",
                                  "NM1_J2KR", "NM1_J2KI"])
def test_every_real_ge_encoding_passes(name: str) -> None:
    if not REALDATA.is_dir():
        pytest.skip(f"real GE scan folder {REALDATA} is absent (../shared/realdata)")
    ds = dcmread(REALDATA / f"{name}.dcm")
    [frame] = _frames(ds)
    header = check_frame(str(ds.file_meta.TransferSyntaxUID), frame, _expected(ds))
    assert header.codec is Codec.RLE or (header.rows, header.columns) == (1024, 256)


# --- wiring: admission and every decode path -------------------------------------------------


def _received(case: hostile.HostileInput) -> Dataset:
    """What the SCP parses from the wire."""
    return dcmread(io.BytesIO(case.part10()))


def test_admission_answers_each_codestream_case_with_its_status(base: Dataset) -> None:
    """Bombs 0xC015, inconsistent or unreadable codestreams 0xC210, genuine ones stored; the
    reason names the frame and what it declares, never a value from the header."""
    cases = list(hostile._codestream_cases(base, 5))
    assert sum(c.status == Status.TOO_LARGE for c in cases) >= 7
    for case in cases:
        ds = _received(case)
        rejection = admission_rejection(ds, case.sop_class, case.sop_uid)
        got = None if rejection is None else rejection.status
        assert got == case.status, (case.name, rejection)
        if rejection is not None:
            assert check_dataset(ds, case.sop_class) == rejection  # header checks, no decoding
            assert decode_check(ds) == rejection
            assert "frame" in rejection.reason and str(ds.PatientID) not in rejection.reason


def test_decode_frames_and_gdcm_refuse_bombs_before_decoding(base: Dataset) -> None:
    for case in hostile.codestream_bombs(base, 5):
        ds = _received(case)
        with pytest.raises(DecodeError, match="frame"):
            decode_frames(ds)
        with pytest.raises(DecodeError, match="frame"):
            decode_with_gdcm(ds)


def test_gdcm_path_checks_frames_even_with_a_geometry_handed_in(base: Dataset,
                                                                streams: dict[str, bytes]
                                                                ) -> None:
    """decode_with_gdcm(ds, geometry) skips pixel_geometry; each frame is still checked before
    GDCM sees it (a geometry built from a clean header, then the data swapped)."""
    clean = hostile.codestream_input(base, 5, "clean", JPEG2000Lossless, [streams["j2k"]], None)
    ds = _received(clean)
    geometry = pixel_geometry(ds)
    assert not isinstance(geometry, Rejection)
    assert decode_with_gdcm(ds, geometry).shape == (1, D, D)
    bomb = hostile.with_siz(streams["j2k"], BIG, BIG)
    ds.PixelData = hostile.encapsulated(Dataset(), [bomb]).PixelData
    with pytest.raises(DecodeError, match="16384 x 16384"):
        decode_with_gdcm(ds, geometry)


def test_frame_count_must_match_the_header(base: Dataset, streams: dict[str, bytes]) -> None:
    """Fewer frames than Number of Frames, or more (a Basic Offset Table listing extras)."""
    case = hostile.codestream_input(base, 5, "three-of-two", JPEG2000Lossless,
                                    [streams["j2k"]] * 3, None)
    ds = _received(case)
    ds.NumberOfFrames = 2
    ds.PixelData = pydicom.encaps.encapsulate([streams["j2k"]] * 3, has_bot=True)
    rejection = pixel_geometry(ds)
    assert isinstance(rejection, Rejection) and rejection.status == Status.CANNOT_DECODE
    assert "more than the 2 frame(s)" in rejection.reason
    with pytest.raises(DecodeError, match="more than the 2 frame"):
        decode_with_gdcm(ds)


def test_pixel_data_that_cannot_be_split_into_frames(base: Dataset,
                                                     streams: dict[str, bytes]) -> None:
    case = hostile.codestream_input(base, 5, "unsplittable", JPEG2000Lossless,
                                    [streams["j2k"]], None)
    ds = _received(case)
    ds.PixelData = b"\xfe\xff\x00\xe0" + struct.pack("<I", 8) + bytes(4)  # BOT cut short
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rejection = pixel_geometry(ds)
    assert isinstance(rejection, Rejection) and rejection.status == Status.CANNOT_DECODE
    assert "cannot be split into frames" in rejection.reason
