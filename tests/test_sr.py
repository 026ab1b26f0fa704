"""The result SR: content, references, determinism and dciodvfy conformance (datasets made here)."""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import warnings
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR, MeasurementReport, srread
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from model.classes import CLASS_NAMES, DscintClass
from node.classify.sr import (
    UTF8,
    Classification,
    DeviceInfo,
    ModelInfo,
    SourceFrame,
    build_sr,
    encode_sr,
    read_result,
    slim_highdicom_tables,
    sr_character_set,
    sr_uids,
)
from node.dicom.codes import ACCEPTED_SOP_CLASSES

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
NOW = datetime(2026, 11, 23, 14, 30, 5)
PROBS = {"normal": 0.05, "bone_metastasis": 0.8, "arthritis": 0.1, "thyroid_carcinoma": 0.05}
SHA = "ab" * 32


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["test_sr", *parts]))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _patient_study(ds: Dataset, name: str = "Doe^Jane") -> None:
    """Patient and study modules as a camera fills them."""
    ds.PatientName, ds.PatientID = name, "PID-12345"
    ds.PatientBirthDate, ds.PatientSex = "19580214", "F"
    ds.StudyInstanceUID = _uid("study")
    ds.StudyDate, ds.StudyTime = "20261123", "101500"
    ds.AccessionNumber, ds.StudyID = "ACC001", "ST1"
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.StudyDescription = "NM Whole Body Bone"


def _image(ds: Dataset) -> None:
    """Minimal image pixel description of a 1024 x 256 whole-body view (header only)."""
    ds.Rows, ds.Columns = 1024, 256
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [2.26, 2.26]


def nm_multiframe() -> Dataset:
    """One NM Image Storage object: frame 1 anterior, frame 2 posterior."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = NM_STORAGE, _uid("nm", "instance")
    _patient_study(ds)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "NM", _uid("nm", "series"), 1
    ds.InstanceNumber, ds.Manufacturer = 1, "GE MEDICAL SYSTEMS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
    _image(ds)
    ds.NumberOfFrames = 2
    ds.FrameIncrementPointer = [Tag(0x0054, 0x0010), Tag(0x0054, 0x0020)]
    ds.NumberOfEnergyWindows, ds.EnergyWindowVector = 1, [1, 1]
    ds.NumberOfDetectors, ds.DetectorVector = 2, [1, 2]
    detectors = []
    for code in (_code("399321004", "SCT", "Anterior projection"),
                 _code("399001007", "SCT", "Posterior projection")):
        det = Dataset()
        det.ViewCodeSequence = DicomSequence([code])
        detectors.append(det)
    ds.DetectorInformationSequence = DicomSequence(detectors)
    return ds


def sc_pair() -> list[Dataset]:
    """Two Secondary Capture objects (Modality NM), one per view, as some GE cameras send."""
    out = []
    for number, view in enumerate(("ANT", "POST"), start=1):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SC_STORAGE, _uid("sc", view)
        _patient_study(ds)
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "NM", _uid("sc", "series"), 2
        ds.InstanceNumber, ds.ConversionType, ds.ImageComments = number, "WSD", view
        _image(ds)
        out.append(ds)
    return out


def nm_frames(ds: Dataset) -> list[SourceFrame]:
    return [SourceFrame(NM_STORAGE, str(ds.SOPInstanceUID), 1, "anterior"),
            SourceFrame(NM_STORAGE, str(ds.SOPInstanceUID), 2, "posterior")]


def sc_frames(pair: list[Dataset]) -> list[SourceFrame]:
    return [SourceFrame(SC_STORAGE, str(ds.SOPInstanceUID), None, view)
            for ds, view in zip(pair, ("anterior", "posterior"), strict=True)]


def result(predicted: str = "bone_metastasis", probs: dict[str, float] | None = None
           ) -> Classification:
    p = probs or PROBS
    return Classification(predicted, p, {"anterior": p, "posterior (mirrored from anterior)": p})


def model(sha: str = SHA, phantoms: bool = True) -> ModelInfo:
    return ModelInfo("Dscint", "2026.11.23-1", sha,
                     "simulated phantoms (dscint-node phantom generator, difficulty 0.5)", phantoms)


DEVICE = DeviceInfo(ae_title="DSCINT", software_version="0.1.0", device_uid=_uid("device"),
                    station_name="node-host")


def build(layout: str = "nm", **kw: object) -> tuple[Dataset, list[Dataset]]:
    """An SR for one of the two source layouts, plus its sources."""
    if layout == "nm":
        src = [nm_multiframe()]
        frames = nm_frames(src[0])
    else:
        src = sc_pair()
        frames = sc_frames(src)
    args: dict[str, object] = {"result": result(), "model": model(), "device": DEVICE,
                               "now": NOW, **kw}
    return build_sr(src, frames, **args), src  # type: ignore[arg-type]


def roundtrip(sr: Dataset) -> Dataset:
    return dcmread(BytesIO(encode_sr(sr)))


def probabilities(sr: Dataset) -> dict[str, float]:
    """Class name -> probability, read straight from the NUM items and their class modifiers."""
    by_code = {m.value.code_value: m.value.name for m in DscintClass}
    report = Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(report, MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    out = {}
    for m in group.get_measurements(name=codes.DCM.Probability):
        assert m.unit.value == "1" and m.unit.scheme_designator == "UCUM"
        (mod,) = [i for i in m[0].ContentSequence if i.RelationshipType == "HAS CONCEPT MOD"]
        assert mod.ConceptNameCodeSequence[0].CodeValue == "121071"  # Finding
        out[by_code[mod.ConceptCodeSequence[0].CodeValue]] = float(m.value)
    return out


def image_refs(sr: Dataset) -> dict[str, list[int] | None]:
    """SOP Instance UID -> referenced frames, over the whole content tree."""
    refs: dict[str, list[int] | None] = {}

    def walk(items: DicomSequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                frames = ref.get("ReferencedFrameNumber")
                if frames is not None and not isinstance(frames, MultiValue):
                    frames = [frames]
                refs[str(ref.ReferencedSOPInstanceUID)] = (
                    None if frames is None else [int(f) for f in frames])
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return refs


def texts(sr: Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: DicomSequence) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.parametrize("layout", ["nm", "sc"])
def test_sr_joins_study_and_round_trips(layout: str) -> None:
    sr, src = build(layout)
    data = encode_sr(sr)
    assert data[128:132] == b"DICM"
    back = dcmread(BytesIO(data))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR and back.Modality == "SR"
    assert isinstance(srread(BytesIO(data)), Comprehensive3DSR)
    assert back.StudyInstanceUID == src[0].StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
                    "StudyDescription"):
        assert back[keyword].value == src[0][keyword].value, keyword
    assert back.SeriesInstanceUID not in {s.SeriesInstanceUID for s in src}
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == sr_uids(src[0].StudyInstanceUID, SHA)
    assert back.SeriesNumber == 9901 and back.InstanceNumber == 1
    assert back.SeriesDescription.startswith("Dscint AI result")
    assert (back.Manufacturer, back.ManufacturerModelName) == ("dscint-node", "dscint-node")
    assert back.SoftwareVersions == "0.1.0" and back.StationName == "node-host"
    assert (back.CompletionFlag, back.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert back.ContentDate == "20261123" and back.ContentTime == "143005"
    # camera-only attributes stay out of the SR
    assert "PixelSpacing" not in back and "ImageComments" not in back


@pytest.mark.parametrize("layout", ["nm", "sc"])
def test_finding_and_probabilities(layout: str) -> None:
    back = roundtrip(build(layout)[0])
    report = Comprehensive3DSR.from_dataset(back).content
    assert isinstance(report, MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    metastasis = DscintClass.BONE_METASTASIS.value
    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator) == (
        metastasis.code_value, "SCT")
    assert group.tracking_uid is not None
    assert probabilities(back) == pytest.approx(PROBS, abs=1e-12)
    assert read_result(back) == ("bone_metastasis", pytest.approx(PROBS, abs=1e-12))
    assert list(read_result(back)[1]) == list(CLASS_NAMES)
    (algo_name,) = [i for i in group[0].ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
    assert algo_name.TextValue == "Dscint"
    params = [i.TextValue for i in group[0].ContentSequence
              if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert f"sha256={SHA}" in params


def test_device_observer_and_procedure() -> None:
    back = roundtrip(build()[0])
    report = Comprehensive3DSR.from_dataset(back).content
    assert isinstance(report, MeasurementReport)
    (device,) = report.get_observer_contexts(observer_type=codes.cid270.Device)
    uids = [i.UID for i in device if i.ConceptNameCodeSequence[0].CodeValue == "121012"]
    assert uids == [DEVICE.device_uid]
    names = [i.TextValue for i in device if i.ConceptNameCodeSequence[0].CodeValue == "121013"]
    assert names == ["DSCINT"]
    assert back.PerformedProcedureCodeSequence[0].CodeValue == "42175-0"
    procedure = [i for i in back.ContentSequence
                 if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "42175-0"


def test_multiframe_nm_references_both_frames() -> None:
    back, src = roundtrip(build("nm")[0]), nm_multiframe()
    assert image_refs(back) == {str(src.SOPInstanceUID): [1, 2]}
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [
        src.SOPInstanceUID]


def test_secondary_capture_pair_references_each_instance_without_frames() -> None:
    back, src = roundtrip(build("sc")[0]), sc_pair()
    assert image_refs(back) == {str(ds.SOPInstanceUID): None for ds in src}
    (series,) = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in src}


def test_provenance_and_warning_are_in_the_sr() -> None:
    found = texts(roundtrip(build()[0]))
    assert "Not for diagnosis (research)" in found
    (full,) = [t for t in found if t.startswith("Model provenance")]
    assert "Dscint 2026.11.23-1" in full and SHA in full
    assert "research use only, not for diagnosis" in full
    assert "posterior (mirrored from anterior)" in full


def test_model_not_trained_on_phantoms_still_says_not_a_medical_device() -> None:
    sr, _ = build(model=model(phantoms=False))
    found = texts(sr)
    assert "Not a medical device" in found
    assert not any("phantoms: research" in t for t in found)
    assert "not a medical device" in str(sr.SeriesDescription)


def test_uids_are_deterministic() -> None:
    study = nm_multiframe().StudyInstanceUID
    assert sr_uids(study, SHA) == sr_uids(study, SHA)
    other = sr_uids(study, "cd" * 32)
    assert other[0] != sr_uids(study, SHA)[0] and other[1] != sr_uids(study, SHA)[1]
    assert sr_uids(_uid("another study"), SHA)[1] != sr_uids(study, SHA)[1]
    first, second = build()[0], build()[0]
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert encode_sr(first) == encode_sr(second)  # same inputs and time: same bytes
    assert build(model=model(sha="cd" * 32))[0].SOPInstanceUID != first.SOPInstanceUID


def test_source_datasets_are_not_modified() -> None:
    src = [nm_multiframe()]
    before = copy.deepcopy(src[0])
    build_sr(src, nm_frames(src[0]), result(), model(), DEVICE, now=NOW)
    assert src[0] == before


def test_unicode_patient_name_keeps_its_character_set() -> None:
    src = nm_multiframe()
    src.SpecificCharacterSet = "ISO_IR 192"
    src.PatientName = "Müller^Jürgen"
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "Müller^Jürgen"


def test_code_extensions_with_an_empty_first_term_build_and_keep_the_name() -> None:
    """"\\ISO 2022 IR 87", as Japanese cameras send it: the empty first value is ISO 2022
    IR 6 by definition (PS3.3 C.12.1.1.2), written out so highdicom takes it."""
    src = nm_multiframe()
    src.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    src.PatientName = "Yamada^Tarou=山田^太郎"
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert list(back.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎"


@pytest.mark.parametrize(("source", "written"), [
    ("ISO_IR 100", "ISO_IR 100"),
    ("ISO_IR 192", "ISO_IR 192"),
    (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (["ISO 2022 IR 6", "ISO 2022 IR 100"], ["ISO 2022 IR 6", "ISO 2022 IR 100"]),
    ("ISO 2022 IR 100", UTF8),  # a lone code-extension term: highdicom refuses it
    (["", "ISO 2022 IR 149"], UTF8),  # Korean: not in highdicom's list
    (["ISO 2022 IR 87", "ISO 2022 IR 6"], UTF8),  # multi-byte first
    (["ISO_IR 100", "ISO 2022 IR 87"], UTF8),  # extension and non-extension mixed
])
def test_sr_character_set_is_the_sources_where_writable_else_utf8(
        source: object, written: object) -> None:
    assert sr_character_set(source) == written


def test_korean_source_gets_a_utf8_sr_with_the_name() -> None:
    src = nm_multiframe()
    src.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    src.PatientName = "Hong^Gildong=洪^吉洞=홍^길동"
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert back.SpecificCharacterSet == UTF8
    assert str(back.PatientName) == "Hong^Gildong=洪^吉洞=홍^길동"


def test_sparse_source_header_still_builds() -> None:
    src = nm_multiframe()
    for keyword in ("AccessionNumber", "ReferringPhysicianName", "StudyID", "PatientBirthDate",
                    "PatientSex", "StudyDescription"):
        delattr(src, keyword)
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert back.AccessionNumber == "" and back.StudyID == "" and "StudyDescription" not in back


@pytest.mark.parametrize(("keyword", "bad"), [
    ("PatientSex", "Q"), ("PatientSex", "DOE^JOHN"), ("PatientBirthDate", "DOE^JOHN"),
    ("PatientBirthDate", "20211345"), ("StudyDate", "2021-13-45"), ("StudyTime", "ab:cd")])
def test_invalid_copied_value_is_left_empty_and_the_sr_still_builds(
        keyword: str, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    """A camera's invalid type-2 value must not cost the study its result."""
    src = nm_multiframe()
    setattr(src, keyword, bad)
    with caplog.at_level(logging.WARNING, logger="node.classify.sr"):
        back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert back[keyword].value in ("", None)
    assert back.PatientID == src.PatientID and str(back.PatientName) == str(src.PatientName)
    assert any(keyword in r.getMessage() and "left empty" in r.getMessage()
               for r in caplog.records)
    ours = " ".join(r.getMessage() for r in caplog.records if r.name == "node.classify.sr")
    assert bad not in ours  # the value itself is never logged (pydicom's own setattr warns)


@pytest.mark.parametrize(("sent", "written"), [("m", "M"), ("F ", "F"), (" o", "O")])
def test_padded_or_lower_case_patient_sex_is_written_as_the_defined_term(sent: str,
                                                                        written: str) -> None:
    src = nm_multiframe()
    src.PatientSex = sent
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert back.PatientSex == written


def test_valid_copied_values_are_kept() -> None:
    src = nm_multiframe()
    src.PatientSex, src.PatientBirthDate, src.StudyTime = "O", "19580214", "101500.25"
    back = roundtrip(build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW))
    assert (back.PatientSex, back.PatientBirthDate, back.StudyTime) == \
        ("O", "19580214", "101500.25")


def test_no_phi_in_logs_or_warnings(caplog: pytest.LogCaptureFixture) -> None:
    src = nm_multiframe()
    src.PatientName = "Singlename"  # no caret: highdicom would warn quoting the name
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_sr([src], nm_frames(src), result(), model(), DEVICE, now=NOW)
    emitted = caplog.text + " ".join(str(w.message) for w in caught)
    assert "Singlename" not in emitted and "PID-12345" not in emitted
    assert str(sr.PatientName) == "Singlename"


def _other_study() -> Dataset:
    ds = sc_pair()[0]
    ds.StudyInstanceUID = _uid("other study")
    return ds


def _with(**changes: object) -> Callable[[], None]:
    """build_sr with one argument spoiled."""
    def call() -> None:
        src = [nm_multiframe()]
        args: dict[str, object] = {"source": src, "frames": nm_frames(src[0]),
                                   "result": result(), "model": model(), "device": DEVICE}
        args.update(changes)
        build_sr(**args)  # type: ignore[arg-type]
    return call


@pytest.mark.parametrize("call", [
    _with(result=result(predicted="osteoporosis")),
    _with(result=result(predicted="Bone Metastasis")),
    _with(result=result(probs={"normal": 0.5, "bone_metastasis": 0.5})),
    _with(result=result(probs={**PROBS, "normal": 0.5})),  # sums to 1.45
    _with(result=result(probs={**PROBS, "normal": float("nan")})),
    _with(frames=[SourceFrame(NM_STORAGE, _uid("not in source"), 1, "anterior")]),
    _with(frames=[]),
    _with(source=[]),
    _with(source=[nm_multiframe(), _other_study()]),
], ids=["unknown-class", "display-name", "missing-classes", "bad-sum", "nan", "unknown-frame",
        "no-frames", "no-source", "two-studies"])
def test_inconsistent_input_raises_value_error(call: Callable[[], None]) -> None:
    with pytest.raises(ValueError):
        call()


def test_wrong_class_message_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="bone_metastasis"):
        _with(result=result(predicted="osteoporosis"))()


def _write(tmp_path: Path, layout: str) -> Path:
    path = tmp_path / f"sr-{layout}.dcm"
    path.write_bytes(encode_sr(build(layout)[0]))
    return path


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (apt-get install dicom3tools)")
@pytest.mark.parametrize("layout", ["nm", "sc"])
def test_dciodvfy_reports_no_errors(tmp_path: Path, layout: str) -> None:
    out = subprocess.run(["dciodvfy", str(_write(tmp_path, layout))], capture_output=True,
                         text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "Comprehensive3DSR" in report  # it recognised the IOD
    assert not [line for line in report.splitlines() if "Error" in line], report


@pytest.mark.skipif(shutil.which("dsrdump") is None,
                    reason="dsrdump not installed (apt-get install dcmtk)")
def test_dsrdump_shows_the_warning(tmp_path: Path) -> None:
    out = subprocess.run(["dsrdump", str(_write(tmp_path, "nm"))], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert '"Not for diagnosis (research)"' in out
    assert "research use only, not for diagnosis" in out  # the series line
    assert "(94222008,SCT,\"Secondary malignant neoplasm of bone\")" in out


def test_srs_still_build_and_read_back_with_highdicom_tables_slimmed() -> None:
    """The node drops the modules of IODs it never touches from highdicom's table at start-up
    (memory): SRs for both source layouts must still build, encode and read back."""
    slim_highdicom_tables(ACCEPTED_SOP_CLASSES)  # idempotent; may already have run in a Node
    from highdicom._standard_utils import get_module_attribute_map
    assert 0 < len(get_module_attribute_map()) < 100  # of 436: only the node's IODs are left
    for layout in ("nm", "sc"):
        sr, _ = build(layout)
        predicted, probs = read_result(roundtrip(sr))
        assert predicted == "bone_metastasis" and probs == pytest.approx(PROBS)


WEAK = {"normal": 0.31, "bone_metastasis": 0.29, "arthritis": 0.22, "thyroid_carcinoma": 0.18}


def _indeterminate() -> Classification:
    return Classification("indeterminate", WEAK, {"anterior": WEAK}, threshold=0.7)


def test_indeterminate_finding_keeps_the_four_probabilities() -> None:
    back = roundtrip(build(result=_indeterminate())[0])
    report = Comprehensive3DSR.from_dataset(back).content
    assert isinstance(report, MeasurementReport)
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator,
            group.finding_type.meaning) == ("280416009", "SCT", "Indeterminate result")
    assert read_result(back) == ("indeterminate", pytest.approx(WEAK, abs=1e-12))
    assert any("Indeterminate: the highest calibrated probability 0.31 is below the "
               "threshold 0.70" in t for t in texts(back))


def test_a_definite_finding_states_the_threshold_in_force() -> None:
    back = roundtrip(build(result=Classification("bone_metastasis", PROBS, {"anterior": PROBS},
                                                 threshold=0.6))[0])
    assert any("a finding below 0.60 would be reported as indeterminate" in t
               for t in texts(back))


def test_unknown_finding_in_an_sr_is_refused() -> None:
    back = roundtrip(build()[0])
    group = back.ContentSequence[-1].ContentSequence[0]
    (finding,) = [i for i in group.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    finding.ConceptCodeSequence[0].CodeValue = "1234567"
    with pytest.raises(ValueError, match="not a Dscint class or indeterminate"):
        read_result(back)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_indeterminate_sr_passes_dciodvfy(tmp_path: Path) -> None:
    path = tmp_path / "sr-indeterminate.dcm"
    path.write_bytes(encode_sr(build(result=_indeterminate())[0]))
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "Comprehensive3DSR" in report
    assert not [line for line in report.splitlines() if "Error" in line], report
