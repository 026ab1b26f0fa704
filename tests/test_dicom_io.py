"""node.dicom: admission rules, views from headers, decoding of every transfer syntax the real
GE whole-body scan comes in (from files and from received bytes)."""

from __future__ import annotations

import io
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from node.dicom.admission import check_dataset, decode_check
from node.dicom.codes import (
    ACCEPTED_SOP_CLASSES,
    NM_IMAGE_STORAGE,
    SC_IMAGE_STORAGE,
    View,
)
from node.dicom.identity import is_valid_uid, patient_key
from node.dicom.pixels import (
    DecodeError,
    PixelGeometry,
    _frame_from_bytes,
    decode_frames,
    decode_with_gdcm,
    transfer_syntax_decodable,
)
from node.dicom.status import Rejection, Status
from node.dicom.views import extract_views, frame_views, views_in_text
from tests.support.dicom import (
    ANT_CODE,
    POST_CODE,
    code_item,
    nm_dataset,
    pixel_counts,
    two_view_nm,
)
from tests.support.hostile import with_siz

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "wg04-nm1"
REAL_FILES = ("NM1_UNC", "NM1_RLE", "NM1_JPLL", "NM1_JPLY", "NM1_JLSL", "NM1_JLSN", "NM1_J2KR",
              "NM1_J2KI")
LOSSLESS = {"NM1_UNC", "NM1_RLE", "NM1_JPLL", "NM1_JLSL", "NM1_J2KR"}
PYDICOM_FILES = ("JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm")
ANT, POST, UNK = View.ANTERIOR, View.POSTERIOR, View.UNKNOWN
SECRET = b"test-secret"


def _real(name: str) -> Path:
    """A realdata file; the whole module's real-data tests skip where the folder is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real GE scan folder {REALDATA} is absent (../shared/realdata)")
    return REALDATA / f"{name}.dcm"


def _source(name: str) -> Path:
    """A realdata file name (NM1_*) or one of pydicom's own encodings of the same image."""
    if name.startswith("NM1_"):
        return _real(name)
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom test file {name} missing"
    return Path(path)


def _from_bytes(path: Path) -> Dataset:
    """What the SCP does with received bytes."""
    return dcmread(io.BytesIO(path.read_bytes()))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The uncompressed real scan, (1024, 256) counts."""
    return decode_frames(dcmread(_real("NM1_UNC")))[0]


# --------------------------------------------------------------------------------------------
# decoding the real scan


@pytest.mark.parametrize("name", REAL_FILES + PYDICOM_FILES)
@pytest.mark.parametrize("via", ["path", "bytes"])
def test_every_encoding_of_the_real_scan_decodes(name: str, via: str,
                                                 reference: np.ndarray) -> None:
    path = _source(name)
    ds = dcmread(path) if via == "path" else _from_bytes(path)
    assert check_dataset(ds, SC_IMAGE_STORAGE) is None
    frames = decode_frames(ds)
    assert frames.shape == (1, 1024, 256) and frames.dtype == np.float32
    diff = np.abs(frames[0] - reference)
    if name in LOSSLESS:
        assert diff.max() == 0
    else:  # lossy: a few counts on average, total activity within 6 %, same picture
        assert diff.mean() < 5.0
        assert abs(float(frames.sum()) / float(reference.sum()) - 1) < 0.06
        assert np.corrcoef(frames[0].ravel(), reference.ravel())[0, 1] > 0.9
    assert decode_check(ds) is None


def test_real_scan_values(reference: np.ndarray) -> None:
    """Signed 16-bit counts 0..278, median 1 (README of realdata)."""
    assert reference.min() == 0 and reference.max() == 278 and np.median(reference) == 1


@pytest.mark.parametrize("name", ["NM1_JPLY", "JPEG-lossy.dcm"])
def test_12bit_jpeg_extended_needs_and_gets_the_gdcm_fallback(name: str,
                                                              reference: np.ndarray) -> None:
    """pydicom's plugins all refuse these; direct GDCM decodes them from memory."""
    ds = _from_bytes(_source(name))
    with pytest.raises(Exception):  # noqa: B017 - documents pydicom's own failure
        ds.pixel_array  # noqa: B018
    frames = decode_with_gdcm(ds)
    assert frames.shape == (1, 1024, 256)
    assert np.abs(frames[0].astype(np.float32) - reference).mean() < 5.0


def test_multi_frame_12bit_jpeg_goes_through_gdcm_frame_by_frame(reference: np.ndarray) -> None:
    """Both views in one encapsulated object, decodable only by the GDCM fallback."""
    jply = _from_bytes(_real("NM1_JPLY"))
    frame = next(generate_frames(jply.PixelData, number_of_frames=1))
    ds = two_view_nm([2, 1])
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = encapsulate([frame, frame], has_bot=True)
    ds["PixelData"].VR = "OB"
    assert check_dataset(ds, NM_IMAGE_STORAGE) is None and decode_check(ds) is None
    images = extract_views(ds)
    assert [(i.view, i.frame_number) for i in images] == [(POST, 1), (ANT, 2)]
    for image in images:
        assert np.abs(image.pixels - reference).mean() < 5.0


def test_gdcm_bytes_are_sign_extended_when_stored_bits_are_fewer() -> None:
    """A signed 12-bit sample handed back in 16 bits without its sign becomes negative."""
    geometry = PixelGeometry(1, 3, 1, 16, 12, 1, str(JPEGExtended12Bit))
    raw = np.array([0x0FFB, 0x0005, -7], "<i2").tobytes()  # -5 unextended, 5, -7 extended
    assert _frame_from_bytes(raw, geometry, 0).tolist() == [[-5, 5, -7]]


@pytest.mark.parametrize("name", ["NM1_RLE", "NM1_JPLL", "NM1_JLSL", "NM1_J2KR"])
def test_gdcm_fallback_is_lossless_on_lossless_syntaxes(name: str,
                                                        reference: np.ndarray) -> None:
    """The fallback is general, not a 12-bit special case."""
    frames = decode_with_gdcm(_from_bytes(_real(name)))
    assert np.array_equal(frames[0].astype(np.float32), reference)


def test_real_ge_header_names_no_view() -> None:
    """SC from a GE MILLENNIUM MG: Detector Vector [1] but no Detector Information Sequence,
    no View Code Sequence, ImageID 'WHOLE BODY_E', no Series Description: view unknown."""
    for name in REAL_FILES:
        ds = dcmread(_real(name), stop_before_pixels=True)
        assert frame_views(ds) == (UNK,), name
    ds = dcmread(_real("NM1_UNC"), stop_before_pixels=True)
    assert ds.SOPClassUID == SC_IMAGE_STORAGE and ds.Modality == "NM"
    assert "DetectorInformationSequence" not in ds and "ViewCodeSequence" not in ds
    assert ds.ImageID == "WHOLE BODY_E" and "SeriesDescription" not in ds


def test_real_scan_against_the_wrong_sop_class() -> None:
    ds = dcmread(_real("NM1_UNC"))
    rejection = check_dataset(ds, NM_IMAGE_STORAGE)
    assert rejection is not None and rejection.status == Status.DATASET_MISMATCH


def test_decode_timing_is_small(reference: np.ndarray) -> None:
    """Every encoding decodes well under the C-STORE time budget (generous bound: noisy CI)."""
    for name in REAL_FILES:
        ds = _from_bytes(_real(name))
        start = time.perf_counter()
        decode_frames(ds)
        assert time.perf_counter() - start < 2.0, name


# --------------------------------------------------------------------------------------------
# views


def test_two_detector_object_gives_anterior_then_posterior() -> None:
    assert frame_views(two_view_nm()) == (ANT, POST)


def test_swapped_detector_vector_swaps_views() -> None:
    assert frame_views(two_view_nm([2, 1])) == (POST, ANT)


def test_extract_views_returns_both_frames_with_their_pixels() -> None:
    ds = two_view_nm([2, 1])
    expected = pixel_counts(2, 1024, 256).astype(np.float32)
    images = extract_views(ds)
    assert [(i.view, i.frame_number) for i in images] == [(POST, 1), (ANT, 2)]
    for image, want in zip(images, expected, strict=True):
        assert image.pixels.shape == (1024, 256) and image.pixels.dtype == np.float32
        assert np.array_equal(image.pixels, want)


def test_extract_views_single_frame_has_no_frame_number() -> None:
    ds = nm_dataset(1, ImageID="ANT")
    (image,) = extract_views(ds)
    assert image.view is ANT and image.frame_number is None and image.pixels.shape == (1024, 256)


def test_code_meaning_from_another_scheme_counts() -> None:
    ds = nm_dataset(2, [1, 2], [code_item("X1", "Anterior", "99LOCAL"),
                                code_item("X2", "posterior projection", "99LOCAL")])
    assert frame_views(ds) == (ANT, POST)


def test_oblique_meaning_does_not_count() -> None:
    ds = nm_dataset(1, [1], [code_item("X", "Left anterior oblique", "99LOCAL")])
    assert frame_views(ds) == (UNK,)


def test_top_level_view_code_for_single_frame() -> None:
    ds = nm_dataset(1, sop_class=SC_IMAGE_STORAGE)
    ds.ViewCodeSequence = Sequence([POST_CODE])
    assert frame_views(ds) == (POST,)


def test_single_detector_item_without_vector() -> None:
    assert frame_views(nm_dataset(1, None, [POST_CODE])) == (POST,)


@pytest.mark.parametrize("text, expected", [
    ({"ImageID": "ANT"}, ANT),
    ({"SeriesDescription": "WB POST"}, POST),
    ({"ImageComments": "whole body anterior"}, ANT),
    ({"ImageID": "WB_Post"}, POST),
    ({"ImageID": "WBAnt"}, ANT),
    ({"SeriesDescription": "WB ANT POST"}, UNK),  # both named: no decision
    ({"ImageID": "ANT/POST", "SeriesDescription": "WB POST"}, POST),  # both skipped, next field
    ({"ImageID": "ANT", "SeriesDescription": "WB ANT POST"}, ANT),  # image-level text first
    ({"SeriesDescription": "POSTOP WHOLE BODY"}, UNK),
    ({"SeriesDescription": "WB 3H POST INJECTION"}, UNK),
    ({"SeriesDescription": "WB 3HR POST"}, UNK),
    ({"ProtocolName": "Whole Body Bone"}, UNK),
    ({"StudyDescription": "WB ANT"}, UNK),  # exam-level text does not label an image
    ({"ImageID": "WHOLE BODY_E"}, UNK),
    ({}, UNK),
])
def test_text_fallback_single_frame(text: dict[str, str], expected: View) -> None:
    ds = nm_dataset(1)
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    assert frame_views(ds) == (expected,)


def test_two_frames_without_codes_or_text_are_unknown() -> None:
    assert frame_views(nm_dataset(2, [1, 2])) == (UNK, UNK)
    assert frame_views(nm_dataset(2)) == (UNK, UNK)


def test_object_level_text_does_not_label_frames_of_two_detectors() -> None:
    assert frame_views(nm_dataset(2, [1, 2], SeriesDescription="WB ANT")) == (UNK, UNK)


def test_object_level_text_labels_frames_of_one_detector() -> None:
    assert frame_views(nm_dataset(2, [1, 1], SeriesDescription="WB POST")) == (POST, POST)


def test_partly_coded_object_keeps_the_unknown_frame_unknown() -> None:
    assert frame_views(nm_dataset(2, [1, 2], [ANT_CODE, None])) == (ANT, UNK)


def test_codes_win_over_text() -> None:
    ds = nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], SeriesDescription="WB POST")
    assert frame_views(ds) == (ANT, POST)


def _malformed_cases() -> list[Callable[[Dataset], None]]:
    def vector_out_of_range(ds: Dataset) -> None:
        ds.DetectorVector = [0, 7]

    def vector_wrong_length(ds: Dataset) -> None:
        ds.DetectorVector = [1, 2, 1]

    def empty_view_code(ds: Dataset) -> None:
        ds.DetectorInformationSequence[0].ViewCodeSequence = Sequence([])

    def code_without_value(ds: Dataset) -> None:
        del ds.DetectorInformationSequence[0].ViewCodeSequence[0].CodeValue
        del ds.DetectorInformationSequence[0].ViewCodeSequence[0].CodeMeaning

    def detector_info_not_a_sequence(ds: Dataset) -> None:
        ds["DetectorInformationSequence"] = DataElement(0x00540022, "LO", "garbage")

    def vector_text(ds: Dataset) -> None:
        ds["DetectorVector"] = DataElement(0x00540020, "LO", "one\\two")

    def frames_text(ds: Dataset) -> None:
        ds["NumberOfFrames"] = DataElement(0x00280008, "LO", "many")

    def frames_huge(ds: Dataset) -> None:
        ds.NumberOfFrames = 2**31 - 1

    def empty_detector_items(ds: Dataset) -> None:
        ds.DetectorInformationSequence = Sequence([])

    return [vector_out_of_range, vector_wrong_length, empty_view_code, code_without_value,
            detector_info_not_a_sequence, vector_text, frames_text, frames_huge,
            empty_detector_items]


@pytest.mark.parametrize("breaker", _malformed_cases(), ids=lambda f: f.__name__)
def test_malformed_view_headers_do_not_crash(breaker: Callable[[Dataset], None]) -> None:
    ds = two_view_nm()
    breaker(ds)
    views = frame_views(ds)
    assert 1 <= len(views) <= 64 and all(isinstance(v, View) for v in views)
    assert isinstance(check_dataset(ds, NM_IMAGE_STORAGE), Rejection | None)


def test_views_in_text_word_boundaries() -> None:
    assert views_in_text("ANT") == {ANT}
    assert views_in_text("Posterior") == {POST}
    assert views_in_text("POSTOP ANTECUBITAL POSITION") == set()
    assert views_in_text("WB ANT + POST") == {ANT, POST}
    assert views_in_text("24H POST TX") == set()


# --------------------------------------------------------------------------------------------
# admission


def _wrong_modality(ds: Dataset) -> None:
    ds.Modality = "CT"


def _no_sop_uid(ds: Dataset) -> None:
    del ds.SOPInstanceUID


def _invalid_study_uid(ds: Dataset) -> None:
    ds.StudyInstanceUID = "not..a.uid/../../etc"


def _long_series_uid(ds: Dataset) -> None:
    ds.SeriesInstanceUID = "1." + "2" * 70


def _no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _rows_mismatch(ds: Dataset) -> None:
    ds.Rows = 2048


def _frames_mismatch(ds: Dataset) -> None:
    ds.NumberOfFrames = 3


def _colour(ds: Dataset) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0


def _float_pixels(ds: Dataset) -> None:
    del ds.PixelData
    ds.FloatPixelData = np.zeros(2 * 1024 * 256, np.float32).tobytes()


def _bits_32(ds: Dataset) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = ds.PixelData * 2


def _bits_1(ds: Dataset) -> None:
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0


def _memory_bomb(ds: Dataset) -> None:
    ds.Rows = 60000
    ds.Columns = 60000


def _too_many_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 1000


def _unknown_syntax(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4")


def _no_syntax(ds: Dataset) -> None:
    del ds.file_meta.TransferSyntaxUID


def _missing_rows(ds: Dataset) -> None:
    del ds.Rows


def _palette(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"


def _bad_slope(ds: Dataset) -> None:
    ds.RescaleSlope = "nan"


def _compressed_but_native(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


REJECTIONS: list[tuple[Callable[[Dataset], None], set[int]]] = [
    (_wrong_modality, {Status.DATASET_MISMATCH}),
    (_no_sop_uid, {Status.BAD_UID}),
    (_invalid_study_uid, {Status.BAD_UID}),
    (_long_series_uid, {Status.BAD_UID}),
    (_no_pixels, {Status.NO_PIXEL_DATA}),
    (_short_pixels, {Status.BAD_PIXEL_MODULE}),
    (_rows_mismatch, {Status.BAD_PIXEL_MODULE}),
    (_frames_mismatch, {Status.BAD_PIXEL_MODULE}),
    (_colour, {Status.UNSUPPORTED_PIXELS}),
    (_float_pixels, {Status.UNSUPPORTED_PIXELS}),
    (_bits_32, {Status.UNSUPPORTED_PIXELS}),
    (_bits_1, {Status.UNSUPPORTED_PIXELS}),
    (_memory_bomb, {Status.TOO_LARGE}),
    (_too_many_frames, {Status.TOO_LARGE}),
    (_unknown_syntax, {Status.CANNOT_DECODE}),
    (_no_syntax, {Status.CANNOT_DECODE}),
    (_missing_rows, {Status.BAD_PIXEL_MODULE}),
    (_palette, {Status.UNSUPPORTED_PIXELS}),
    (_bad_slope, {Status.BAD_PIXEL_MODULE}),
    (_compressed_but_native, {Status.BAD_PIXEL_MODULE}),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize("breaker, statuses", REJECTIONS, ids=[b.__name__ for b, _ in REJECTIONS])
def test_each_rejection_path_has_its_status(breaker: Callable[[Dataset], None],
                                            statuses: set[int]) -> None:
    ds = two_view_nm()
    assert check_dataset(ds, NM_IMAGE_STORAGE) is None
    breaker(ds)
    rejection = check_dataset(ds, NM_IMAGE_STORAGE)
    assert rejection is not None and rejection.status in statuses, rejection
    assert rejection.reason
    assert "Doe" not in rejection.reason and "PID-1" not in rejection.reason
    if rejection.status not in (Status.DATASET_MISMATCH, Status.BAD_UID):  # pixel problems
        # also stop decoding, whoever calls it
        assert decode_check(ds) is not None
        with pytest.raises(DecodeError):
            decode_frames(ds)


def test_sc_with_modality_ot_does_not_match() -> None:
    ds = nm_dataset(1, sop_class=SC_IMAGE_STORAGE, modality="OT")
    rejection = check_dataset(ds, SC_IMAGE_STORAGE)
    assert rejection is not None and rejection.status == Status.DATASET_MISMATCH
    assert "OT" in rejection.reason


def test_sop_class_of_dataset_must_match_the_request() -> None:
    ds = nm_dataset(1, sop_class=SC_IMAGE_STORAGE)
    rejection = check_dataset(ds, NM_IMAGE_STORAGE)
    assert rejection is not None and rejection.status == Status.DATASET_MISMATCH


def test_unsupported_sop_class() -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ds = nm_dataset(1, sop_class=ct, modality="CT")
    rejection = check_dataset(ds, ct)
    assert rejection is not None and rejection.status == Status.UNSUPPORTED_SOP_CLASS
    assert ct not in ACCEPTED_SOP_CLASSES


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uid_is_not_echoed() -> None:
    ds = two_view_nm()
    ds.StudyInstanceUID = "Doe^John"
    rejection = check_dataset(ds)
    assert rejection is not None and rejection.status == Status.BAD_UID
    assert "Doe" not in rejection.reason


def test_memory_bomb_is_refused_without_allocating() -> None:
    ds = two_view_nm()
    _memory_bomb(ds)
    tracemalloc.start()
    try:
        rejection = check_dataset(ds, NM_IMAGE_STORAGE)
        with pytest.raises(DecodeError):
            decode_frames(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rejection is not None and rejection.status == Status.TOO_LARGE
    assert peak < 5 * 2**20


@pytest.mark.parametrize("make", [
    lambda: two_view_nm(),
    lambda: nm_dataset(1, ImageID="ANT"),
    lambda: nm_dataset(1, sop_class=SC_IMAGE_STORAGE),
])
def test_valid_objects_pass(make: Callable[[], Dataset]) -> None:
    ds = make()
    assert check_dataset(ds, str(ds.SOPClassUID)) is None
    assert check_dataset(ds) is None
    assert decode_check(ds) is None


def test_padding_byte_and_8_bit_and_signed_are_accepted() -> None:
    ds = nm_dataset(1, rows=3, cols=5)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(range(15)) + b"\x00"  # odd length padded to even
    assert check_dataset(ds) is None
    assert np.array_equal(decode_frames(ds)[0], np.arange(15, dtype=np.float32).reshape(3, 5))
    signed = nm_dataset(1, rows=1, cols=4)
    signed.PixelRepresentation = 1
    signed.PixelData = np.array([-2, -1, 0, 7], "<i2").tobytes()
    assert np.array_equal(decode_frames(signed)[0, 0], [-2, -1, 0, 7])


def test_rescale_is_applied() -> None:
    ds = nm_dataset(1, rows=1, cols=3)
    ds.PixelData = np.array([0, 1, 2], "<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = "2.5", "-1"
    assert np.allclose(decode_frames(ds)[0, 0], [-1.0, 1.5, 4.0])


def test_undecodable_compressed_data_answers_cannot_decode() -> None:
    """A codestream header that agrees with the DICOM header, garbage after it: only decoding
    finds out."""
    ds = nm_dataset(1)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    soc_siz = with_siz(b"\xff\x4f\xff\x51\x00\x02", 1024, 256)
    ds.PixelData = encapsulate([soc_siz + b"\xff\x52" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    assert check_dataset(ds) is None  # both headers look fine
    rejection = decode_check(ds)
    assert rejection is not None and rejection.status == Status.CANNOT_DECODE
    with pytest.raises(DecodeError):
        extract_views(ds)


def test_unreadable_codestream_header_is_refused_without_decoding() -> None:
    ds = nm_dataset(1)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    rejection = check_dataset(ds)
    assert rejection is not None and rejection.status == Status.CANNOT_DECODE
    assert rejection.reason.startswith("frame 1: SIZ length 0")
    assert decode_check(ds) == rejection


def test_decodable_transfer_syntaxes() -> None:
    for uid in (ExplicitVRLittleEndian, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
                JPEGLSLossless, JPEG2000Lossless, RLELossless):
        assert transfer_syntax_decodable(uid), uid
    assert not transfer_syntax_decodable("1.2.3.4")
    assert not transfer_syntax_decodable("")


def test_uid_syntax() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.20")
    assert is_valid_uid("1.2.840.113619.2.55.3.0604")  # leading zero: real devices do this
    for bad in ("", "1..2", ".1", "1.", "1.2a", "1" * 65, None, 5):
        assert not is_valid_uid(bad), bad


# --------------------------------------------------------------------------------------------
# patient key


def test_patient_key_is_stable_and_separates_patients() -> None:
    a = nm_dataset(1, rows=1, cols=1)
    b = nm_dataset(1, rows=1, cols=1)
    b.PatientName = "DOE^JOHN^^^ "
    key = patient_key(a, SECRET)
    assert key is not None and key == patient_key(b, SECRET)
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    b.PatientID = "PID-2"
    assert patient_key(b, SECRET) != key
    assert patient_key(a, b"other-secret") != key


def test_patient_key_none_without_identity_and_refuses_empty_secret() -> None:
    ds = Dataset()
    assert patient_key(ds, SECRET) is None
    with pytest.raises(ValueError):
        patient_key(nm_dataset(1, rows=1, cols=1), b"")


# --------------------------------------------------------------------------------------------
# properties: no header mutation makes the admission functions raise

MUTABLE = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "SamplesPerPixel",
           "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation", "SOPClassUID",
           "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
           "DetectorVector", "FrameIncrementPointer", "DetectorInformationSequence",
           "ViewCodeSequence", "ImageID", "SeriesDescription", "RescaleSlope", "PixelData",
           "PatientName", "PatientID", "FloatPixelData")
VRS = ("US", "SS", "UL", "IS", "DS", "CS", "LO", "UI", "OB", "AT", "SQ", "PN", "FD")

values = st.one_of(
    st.none(), st.integers(-(2**31), 2**31 - 1), st.integers(0, 70000),
    st.floats(allow_nan=True), st.text(max_size=80), st.binary(max_size=64),
    st.lists(st.integers(-5, 70000), max_size=5), st.sampled_from(["", "0", "1.2.3", "NM", "ANT"]))


def _mutate(ds: Dataset, keyword: str, action: str, value: Any) -> None:
    """Delete an element or replace it with an arbitrary (possibly ill-typed) one; action is
    "delete", "keep-vr" (the dictionary VR) or a VR."""
    tag = Tag(keyword)
    if action == "delete":
        if tag in ds:
            del ds[tag]
        return
    vr = dictionary_VR(keyword) if action == "keep-vr" else action
    if vr == "SQ":
        value = Sequence([Dataset()]) if value else Sequence([])
    ds[tag] = DataElement(tag, vr, value)


def _assert_admission_never_raises(ds: Dataset) -> None:
    result = check_dataset(ds, NM_IMAGE_STORAGE)
    assert result is None or isinstance(result, Rejection)
    views = frame_views(ds)
    assert 1 <= len(views) <= 64 and all(isinstance(v, View) for v in views)
    decoded = decode_check(ds)
    assert decoded is None or isinstance(decoded, Rejection)
    patient_key(ds, SECRET)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(MUTABLE),
                          st.sampled_from(("delete", "keep-vr", *VRS)), values),
                min_size=1, max_size=4))
def test_header_mutations_never_raise(mutations: list[tuple[str, str, Any]]) -> None:
    ds = nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], rows=16, cols=8)
    for keyword, action, value in mutations:
        try:
            _mutate(ds, keyword, action, value)
        except Exception:  # pydicom refused to build that element: not a case to test
            assume(False)
    _assert_admission_never_raises(ds)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                max_size=8))
def test_corrupted_bytes_never_make_admission_raise(flips: list[tuple[int, int]]) -> None:
    """What an SCP really gets: bytes, parsed lazily; corrupt the header part."""
    buffer = io.BytesIO()
    nm_dataset(2, [1, 2], [ANT_CODE, POST_CODE], rows=16, cols=8,
               ImageID="ANT").save_as(buffer, enforce_file_format=True)
    raw = bytearray(buffer.getvalue())
    header_end = len(raw) - 16 * 8 * 2 * 2
    for position, byte in flips:
        raw[132 + position % (header_end - 132)] = byte
    try:
        ds = dcmread(io.BytesIO(bytes(raw)))
    except Exception:  # the SCP refuses unparsable bytes before calling these functions
        assume(False)
    _assert_admission_never_raises(ds)
