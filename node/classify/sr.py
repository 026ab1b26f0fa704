"""The node's result as a DICOM SR: TID 1500 Measurement Report in a Comprehensive 3D SR.

Layout (IHE AI Results; field notes §3)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      HAS CONCEPT MOD  Language, HAS OBS CONTEXT  device observer (TID 1001/1004)
      HAS CONCEPT MOD  Procedure reported = (42175-0, LN, "Radionuclide scan of whole body")
      CONTAINS CONTAINER Imaging Measurements
        CONTAINS CONTAINER Measurement Group                           TID 1501
          HAS OBS CONTEXT  Tracking Identifier / Tracking Unique Identifier (deterministic)
          CONTAINS CODE    Finding = predicted class (SCT)             TID 1501 row 3b
                           or SCT 280416009 "Indeterminate result" (CID 6063) below the
                           threshold; the four probabilities are listed either way
          HAS CONCEPT MOD  Algorithm Name / Version / Parameters       TID 4019
          CONTAINS NUM     Probability = p [UCUM "1"]   (one per class) TID 300
            HAS CONCEPT MOD CODE  Finding = that class (SCT)           TID 300 row 2
          CONTAINS TEXT    Comment = short warning (fits dsrdump's 30 characters)
          CONTAINS TEXT    Comment = model provenance and full warning TID 1501 row 12
          CONTAINS IMAGE   Source of Measurement (+ frame numbers)     one per source instance
          CONTAINS IMAGE   Best illustration of finding (DCM 121080) = the result image

How each probability names its class: TID 300 row 2, the generic concept modifier
(HAS CONCEPT MOD CODE $ModType = $ModValue) of the Probability NUM, with $ModType
(121071, DCM, "Finding") and $ModValue the class's SNOMED CT code, i.e. "Probability of the
finding <class>", post-coordinated. The alternatives highdicom offers are misuses: `qualifier`
is the Numeric Value Qualifier (CID 42: NaN, infinity, ...), `derivation` is CID 7464 (mean,
maximum, ...), `method` is CID 6147, `properties` is TID 310 (normality, significance),
`finding_sites` is anatomy. TID 300 is extensible and row 2 exists for exactly this.

Procedure reported: LOINC 42175-0 "Radionuclide scan of whole body", a code DICOM itself uses
(CID 646) and so verifiable offline. It covers Tc-99m bone scans and 131I whole-body scans alike;
the bone-specific SNOMED CT 41747008 ("Bone scan") could not be verified here and is not used.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import pydicom
from highdicom.enum import SpecificCharacterSetValues
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import DataElement, Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DT, TM

from model.calibration import INDETERMINATE, INDETERMINATE_CODE
from model.classes import CLASS_NAMES, DscintClass
from node.dicom.codes import NODE_MANUFACTURER, NODE_MODEL_NAME

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "Dscint AI result"
PROCEDURE_CODE = CodedConcept("42175-0", "LN", "Radionuclide scan of whole body")
TRACKING_IDENTIFIER = "Dscint study classification"
PHANTOM_WARNING = "Not for diagnosis (research)"  # <= 30 characters: dsrdump shows it whole
DEVICE_WARNING = "Not a medical device"
PHANTOM_NOTE = ("model trained on simulated phantoms: research use only, not for diagnosis; "
                "not verified by a physician")
DEVICE_NOTE = ("automated result of software that is not a certified medical device; "
               "not verified by a physician")
PROBABILITY_SUM_TOLERANCE = 0.01

# Patient and study attributes highdicom reads directly from the first evidence item (type 2).
_REQUIRED_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                            "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                            "ReferringPhysicianName")
# What the SR copies from the first source: patient and study identity, nothing else.
_COPIED_KEYWORDS = ("SpecificCharacterSet", *_REQUIRED_STUDY_KEYWORDS, "IssuerOfPatientID",
                    "StudyDescription")
_PATIENT_SEX_TERMS = frozenset({"M", "F", "O"})  # PS3.3 C.7.1.1 Patient's Sex
_SR_CHARSETS = frozenset(v.value for v in SpecificCharacterSetValues)  # what highdicom writes
_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149"})
UTF8 = "ISO_IR 192"
_DATE_TIME_TYPES: dict[str, type[DA] | type[TM] | type[DT]] = {"DA": DA, "TM": TM, "DT": DT}


@dataclass(frozen=True)
class SourceFrame:
    """One classified view: which instance (and frame of a multi-frame one) it came from."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # None for single-frame objects
    view: str  # "anterior" | "posterior" | "unknown"


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the model that made the result."""

    name: str
    version: str
    sha256: str
    training_data: str
    trained_on_phantoms: bool
    # sha256 of the whole model file as verified before loading (code and weights: `sha256`
    # covers the weights only); "" when the model was not loaded through the registry
    file_sha256: str = ""


@dataclass(frozen=True)
class Classification:
    """Study-level result plus the per-view probabilities it was averaged from."""

    predicted_class: str  # a class name, or INDETERMINATE below `threshold`
    probabilities: Mapping[str, float]
    per_view: Mapping[str, Mapping[str, float]]
    threshold: float | None = None  # the indeterminate threshold in force, when known


@dataclass(frozen=True)
class DeviceInfo:
    """The node as the SR's device observer and equipment (stable per node)."""

    ae_title: str
    software_version: str
    device_uid: str
    station_name: str | None = None
    manufacturer: str = NODE_MANUFACTURER  # how its objects routed back are recognised
    model_name: str = NODE_MODEL_NAME


@dataclass(frozen=True)
class Predecessor:
    """The result an amended SR replaces (its Predecessor Documents Sequence, PS3.3
    C.17.2): that SR's series and instance in the same study, and this SR's version."""

    version: int  # of the amended SR: 2 or more
    series_uid: str
    sop_uid: str
    sop_class_uid: str = Comprehensive3DSRStorage


def versioned_uid(uid: str, version: int) -> str:
    """An object's UID in a study's `version`-th result: version 1 keeps `uid`, later ones
    derive from it and the number, so a retried amendment makes the same UID again."""
    if version <= 1:
        return uid
    return str(generate_uid(entropy_srcs=["dscint-node", "version", uid, str(version)]))


def sr_uids(study_uid: str, model_sha256: str, version: int = 1) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs from study, model and version, so a resend never
    duplicates the SR; an amended version gets a series and instance of its own."""
    series = generate_uid(entropy_srcs=["dscint-node", "sr-series", study_uid, model_sha256])
    instance = generate_uid(entropy_srcs=["dscint-node", "sr-instance", study_uid, model_sha256])
    return versioned_uid(str(series), version), versioned_uid(str(instance), version)


def _tracking_uid(study_uid: str, model_sha256: str) -> str:
    """Deterministic too, so the same result tracks as the same finding across resends."""
    return str(generate_uid(entropy_srcs=["dscint-node", "tracking", study_uid, model_sha256]))


def build_sr(source: Sequence[Dataset], frames: Sequence[SourceFrame], result: Classification,
             model: ModelInfo, device: DeviceInfo, now: datetime | None = None,
             illustration: Dataset | None = None, amends: Predecessor | None = None
             ) -> Dataset:
    """The study's result as a Comprehensive 3D SR; ValueError on inconsistent input.
    `illustration`: the result image (same study), referenced as DCM 121080 "Best
    illustration of finding" (CID 7003) and listed in the evidence. `amends`: the result
    this one replaces (new series and instance, Predecessor Documents Sequence, a comment)."""
    _check_inputs(source, frames, result)
    predicted = result.predicted_class
    study_uid = str(source[0].StudyInstanceUID)
    version = 1 if amends is None else amends.version
    series_uid, sop_uid = sr_uids(study_uid, model.sha256, version)
    when = (now or datetime.now()).replace(microsecond=0)
    report = MeasurementReport(
        observation_context=_observation_context(device),
        procedure_reported=PROCEDURE_CODE,
        imaging_measurements=[_measurement_group(frames, result, model, predicted,
                                                 _tracking_uid(study_uid, model.sha256))],
    )
    evidence = _evidence(source)
    if illustration is not None:
        report[0].ContentSequence[-1].ContentSequence[0].ContentSequence.append(
            _illustration(illustration))
        evidence.append(_identifiers(illustration))
    if amends is not None:
        report[0].ContentSequence[-1].ContentSequence[0].ContentSequence.append(
            _amendment_text(amends))
    sr = Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer=device.manufacturer, is_complete=True, is_final=False, is_verified=False,
        performed_procedure_codes=[PROCEDURE_CODE], transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_series_description(model, version),
        manufacturer_model_name=device.model_name,
        previous_versions=None if amends is None else [_predecessor(study_uid, amends)],
        software_versions=device.software_version, content_date=when.date(),
        content_time=when.time(), series_date=when.date(), series_time=when.time(),
    )
    _finish_header(sr, source[0], device, when)
    log.debug("built SR %s: %s by %s %s", sop_uid, predicted, model.name, model.version)
    return sr


def slim_highdicom_tables(source_sop_classes: Iterable[str]) -> int:
    """Keep only the modules of the IODs the node reads and writes in highdicom's table of
    every DICOM module's attributes; returns how many modules were dropped.

    highdicom parses a large JSON table of every module on the first SR, to check the few
    IODs involved: called at start-up, before the model loads, the parse peaks while the
    process is small, and what stays resident is a fraction of it. The table is
    highdicom's cached (private) object; where that API differs, nothing is dropped.
    """
    try:
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )
        iods, modules, table = (get_sop_class_iod_map(), get_iod_module_map(),
                                get_module_attribute_map())
        keep = {m["key"] for uid in (Comprehensive3DSRStorage, *source_sop_classes)
                for m in modules[iods[uid]]}
    except (ImportError, AttributeError, KeyError, TypeError) as exc:
        log.info("highdicom's module table left whole (%s)", type(exc).__name__)
        return 0
    # the kept modules as fresh, compact copies, then the whole table let go: deleting entries
    # in place left the survivors scattered over memory the allocator could not hand back
    # (33 MiB resident instead of 9, issue 18)
    kept = json.loads(json.dumps({k: v for k, v in table.items() if k in keep}))
    dropped = len(table) - len(kept)
    table.clear()
    table.update(kept)
    log.debug("highdicom module table: kept %d modules, dropped %d", len(kept), dropped)
    return dropped


def encode_sr(ds: Dataset) -> bytes:
    """DICOM Part 10 bytes in Explicit VR Little Endian, as stored and sent by C-STORE."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        raise ValueError("SR must carry file meta with Explicit VR Little Endian")
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def read_result(ds: Dataset) -> tuple[str, dict[str, float]]:
    """Predicted class and per-class probabilities as an SR made by build_sr states them."""
    report = Comprehensive3DSR.from_dataset(ds).content
    if not isinstance(report, MeasurementReport):
        raise ValueError("not a Dscint result SR: no TID 1500 measurement report")
    groups = report.get_image_measurement_groups()
    if len(groups) != 1 or groups[0].finding_type is None:
        raise ValueError("not a Dscint result SR: expected one measurement group with a finding")
    by_code = {m.value.code_value: m.value.name for m in DscintClass}
    finding = groups[0].finding_type
    findings = {**by_code, INDETERMINATE_CODE[0]: INDETERMINATE}
    if finding.value not in findings:
        raise ValueError(f"finding {finding.value} is not a Dscint class or indeterminate")
    found: dict[str, float] = {}
    for m in groups[0].get_measurements(name=codes.DCM.Probability):
        cls = _modifier_class(m, by_code)
        if cls is not None:
            found[cls] = float(m.value)
    if set(found) != set(CLASS_NAMES):
        raise ValueError(f"probabilities for {sorted(found)}, expected {list(CLASS_NAMES)}")
    return findings[finding.value], {n: found[n] for n in CLASS_NAMES}


def _modifier_class(m: Measurement, by_code: Mapping[str, str]) -> str | None:
    """The class a Probability NUM refers to, from its TID 300 row 2 concept modifier."""
    for item in m[0].get("ContentSequence", []):
        if (item.ValueType == "CODE" and item.RelationshipType == "HAS CONCEPT MOD"
                and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value):
            return by_code.get(str(item.ConceptCodeSequence[0].CodeValue))
    return None


def _check_inputs(source: Sequence[Dataset], frames: Sequence[SourceFrame],
                  result: Classification) -> None:
    """Refuse a result that would make a misleading SR, before anything is built."""
    if result.predicted_class != INDETERMINATE:
        DscintClass.by_name(result.predicted_class)  # ValueError naming the valid classes
    if set(result.probabilities) != set(CLASS_NAMES):
        raise ValueError(f"probabilities for {sorted(result.probabilities)}, "
                         f"expected one per class: {list(CLASS_NAMES)}")
    values = [float(v) for v in result.probabilities.values()]
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise ValueError("probabilities must be finite and within [0, 1]")
    if abs(sum(values) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"probabilities sum to {sum(values):.4f}, not 1")
    if not source:
        raise ValueError("no source instances")
    if len({str(ds.StudyInstanceUID) for ds in source}) != 1:
        raise ValueError("source instances belong to more than one study")
    if not frames:
        raise ValueError("no source frames")
    known = {str(ds.SOPInstanceUID) for ds in source}
    unknown = {f.sop_instance_uid for f in frames} - known
    if unknown:
        raise ValueError(f"frames reference instances not in source: {sorted(unknown)}")


def _observation_context(device: DeviceInfo) -> ObservationContext:
    """The node, not a person, is the observer: the SR stays unverified."""
    attrs = DeviceObserverIdentifyingAttributes(
        uid=device.device_uid, name=device.ae_title, manufacturer_name=device.manufacturer,
        model_name=device.model_name)
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=attrs))


def _measurement_group(frames: Sequence[SourceFrame], result: Classification, model: ModelInfo,
                       predicted: str, tracking_uid: str
                       ) -> MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: finding, algorithm, a probability per class, provenance, sources."""
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=TRACKING_IDENTIFIER),
        finding_type=_class_code(predicted),
        algorithm_id=AlgorithmIdentification(
            name=model.name, version=model.version, manufacturer="dscint-node",
            parameters=[f"sha256={model.sha256}", f"training_data={model.training_data}",
                        f"trained_on_phantoms={str(model.trained_on_phantoms).lower()}",
                        *([f"file_sha256={model.file_sha256}"] if model.file_sha256 else [])]),
        measurements=[_probability(name, float(result.probabilities[name]))
                      for name in CLASS_NAMES],
    )
    content = group[0].ContentSequence
    warning = PHANTOM_WARNING if model.trained_on_phantoms else DEVICE_WARNING
    for text in (warning, _provenance_text(model, result)):
        content.append(TextContentItem(  # TID 1501 row 12: a qualitative evaluation as text
            name=codes.DCM.Comment, value=text,
            relationship_type=RelationshipTypeValues.CONTAINS))
    content.extend(_source_images(frames))
    return group


def _illustration(image: Dataset) -> ImageContentItem:
    """CONTAINS IMAGE: the result image, the finding's best illustration."""
    return ImageContentItem(
        name=codes.DCM.BestIllustrationOfFinding,
        referenced_sop_class_uid=str(image.SOPClassUID),
        referenced_sop_instance_uid=str(image.SOPInstanceUID),
        relationship_type=RelationshipTypeValues.CONTAINS)


def _class_code(name: str) -> CodedConcept:
    """A class's SNOMED CT code, from the one table the model also uses; "indeterminate" is
    SCT 280416009 "Indeterminate result" (DICOM CID 6063)."""
    if name == INDETERMINATE:
        return CodedConcept(*INDETERMINATE_CODE)
    c = DscintClass.by_name(name).value
    return CodedConcept(c.code_value, c.scheme, c.code_meaning)


def _probability(name: str, value: float) -> Measurement:
    """Probability NUM for one class, the class named by a TID 300 row 2 concept modifier."""
    m = Measurement(name=codes.DCM.Probability, value=value, unit=codes.UCUM.NoUnits)
    modifier = CodeContentItem(name=codes.DCM.Finding, value=_class_code(name),
                               relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD)
    m[0].ContentSequence = ContentSequence([modifier])
    return m


def _provenance_text(model: ModelInfo, result: Classification) -> str:
    """Human-readable provenance and an honest warning, shown by any SR viewer."""
    note = PHANTOM_NOTE if model.trained_on_phantoms else DEVICE_NOTE
    views = ", ".join(result.per_view) or "none recorded"
    file = f", file sha256 {model.file_sha256}" if model.file_sha256 else ""
    return (f"Model provenance: {model.name} {model.version}, weights sha256 {model.sha256}"
            f"{file}, trained on {model.training_data}. Views classified: {views}. "
            f"{_calibration_text(result)}{note[0].upper()}{note[1:]}.")


def _calibration_text(result: Classification) -> str:
    """Why the finding is what it is: calibrated probabilities and the threshold in force."""
    if result.threshold is None:
        return ""
    top = max(float(v) for v in result.probabilities.values())
    if result.predicted_class == INDETERMINATE:
        return (f"Indeterminate: the highest calibrated probability {top:.2f} is below the "
                f"threshold {result.threshold:.2f}; the probabilities are listed for "
                "information only. ")
    return (f"Calibrated probabilities; a finding below {result.threshold:.2f} would be "
            "reported as indeterminate. ")


def _series_description(model: ModelInfo, version: int = 1) -> str:
    """Series Description (LO, 64 chars) carries the warning for PACS study browsers, and an
    amended result's version (" v2")."""
    hint = "research use only, not for diagnosis" if model.trained_on_phantoms \
        else "not a medical device"
    return f"{SERIES_DESCRIPTION} - {hint}{f' v{version}' if version > 1 else ''}"


def _amendment_text(amends: Predecessor) -> TextContentItem:
    """What a reader of the amended SR sees: which version, what it replaces, and why."""
    return TextContentItem(
        name=codes.DCM.Comment, relationship_type=RelationshipTypeValues.CONTAINS,
        value=(f"Amended result, version {amends.version}: replaces SR {amends.sop_uid}. "
               "Classified again with the latest instance of each view received since."))


def _predecessor(study_uid: str, amends: Predecessor) -> Dataset:
    """The identifiers highdicom's `previous_versions` reads of a replaced SR."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, amends.series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = amends.sop_class_uid, amends.sop_uid
    return ds


def _source_images(frames: Sequence[SourceFrame]) -> list[SourceImageForMeasurementGroup]:
    """One reference per source instance, naming the frames used of a multi-frame one."""
    by_instance: dict[str, tuple[str, set[int | None]]] = {}
    for f in frames:
        _, numbers = by_instance.setdefault(f.sop_instance_uid, (f.sop_class_uid, set()))
        numbers.add(f.frame_number)
    refs = []
    for uid, (sop_class, numbers) in by_instance.items():
        whole = None in numbers  # a single-frame object, or the instance as a whole
        refs.append(SourceImageForMeasurementGroup(
            referenced_sop_class_uid=sop_class, referenced_sop_instance_uid=uid,
            referenced_frame_numbers=None if whole else sorted(n for n in numbers if n)))
    return refs


def _evidence(source: Sequence[Dataset]) -> list[Dataset]:
    """Small copies for highdicom: the caller's datasets stay untouched, pixels never read.

    The first carries the patient and study attributes the SR copies; only those listed, so
    odd values elsewhere in a camera's header (zero weights, retired tags) stay out of the SR.
    """
    evidence = [_identifiers(ds) for ds in source]
    first = evidence[0]
    for keyword in _COPIED_KEYWORDS:
        if keyword not in source[0]:
            if keyword in _REQUIRED_STUDY_KEYWORDS:
                setattr(first, keyword, None)
            continue
        elem = _copyable(copy.deepcopy(source[0][keyword]))
        if elem is None:
            log.warning("study %s: the source's %s is not a valid %s value; left empty in the "
                        "SR", first.StudyInstanceUID, keyword, source[0][keyword].VR)
            setattr(first, keyword, None)
        else:
            first[keyword] = elem
    # highdicom warns with the patient's name when it looks odd; never let PHI reach a log.
    first.PatientName = ""
    return evidence


def patient_study_copy(source: Dataset) -> Dataset:
    """The patient and study attributes another result object (the result image) copies, by
    the same rules as the SR: only those listed, invalid values left empty."""
    out = Dataset()
    out.StudyInstanceUID = source.StudyInstanceUID
    for keyword in _COPIED_KEYWORDS:
        elem = _copyable(copy.deepcopy(source[keyword])) if keyword in source else None
        if elem is not None:
            out[keyword] = elem
        elif keyword in _REQUIRED_STUDY_KEYWORDS:
            setattr(out, keyword, None)
    return out


@dataclass(frozen=True)
class DerivedSeries:
    """Where a result object other than the SR goes: its class, modality and series."""

    sop_class_uid: str
    modality: str
    series_number: int
    description: str


def derived_object_header(ds: Dataset, kind: DerivedSeries, series_uid: str, sop_uid: str,
                          model: ModelInfo, device: DeviceInfo, when: datetime) -> None:
    """The series, equipment and SC Equipment attributes the result image and the PDF share
    (one home: both say the same about who made them and that they are not for diagnosis)."""
    ds.SOPClassUID, ds.SOPInstanceUID = kind.sop_class_uid, sop_uid
    ds.Modality, ds.ConversionType = kind.modality, "WSD"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = \
        series_uid, kind.series_number, 1
    hint = "research use only, not for diagnosis" if model.trained_on_phantoms \
        else "not a medical device"
    ds.SeriesDescription = f"{kind.description} - {hint}"[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.Manufacturer = device.manufacturer
    ds.SecondaryCaptureDeviceManufacturer = device.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = device.model_name
    ds.SecondaryCaptureDeviceSoftwareVersions = device.software_version
    if device.station_name:
        ds.StationName = device.station_name[:16]


def _copyable(elem: DataElement) -> DataElement | None:
    """The element as the SR may carry it, or None when its value is invalid. A camera's
    invalid Patient's Sex or date must not cost the study its result: it is left empty
    instead; a Patient's Sex only padded or in lower case is written as the defined term."""
    value = elem.value
    if value in (None, "", b""):
        return elem
    if elem.keyword == "PatientSex":
        term = str(value).strip().upper()
        if term not in _PATIENT_SEX_TERMS:
            return None
        elem.value = term
        return elem
    if elem.keyword == "SpecificCharacterSet":
        elem.value = sr_character_set(value)
        return elem
    parse = _DATE_TIME_TYPES.get(str(elem.VR))
    try:
        if parse is not None:
            parse(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        return None
    return elem


def sr_character_set(value: object) -> str | list[str]:
    """The Specific Character Set the SR is written in: the source's where highdicom can write
    it, else UTF-8 (ISO_IR 192), which carries any name pydicom decoded from the source.

    "\\ISO 2022 IR 87" (an empty first value, as Japanese cameras write it) means ISO 2022 IR 6
    first (PS3.3 C.12.1.1.2) and is written so. highdicom refuses a lone code-extension term, a
    multi-byte first term, mixed terms and ISO 2022 IR 149 (Korean, missing from its list):
    each of those used to fail the study after the instances had been accepted.
    """
    terms = [str(value)] if isinstance(value, str | bytes) else [str(t) for t in value]  # type: ignore[attr-defined]
    terms = [t.strip() for t in terms]
    if len(terms) > 1 and not terms[0]:
        terms[0] = "ISO 2022 IR 6"
    extensions = [t.startswith("ISO 2022") for t in terms]
    if len(terms) == 1:
        writable = terms[0] in _SR_CHARSETS and not extensions[0]
    else:
        writable = all(t in _SR_CHARSETS for t in terms) and all(extensions) \
            and terms[0] not in _MULTI_BYTE_EXTENSIONS
    if not writable:
        return UTF8
    return terms[0] if len(terms) == 1 else terms


def _identifiers(ds: Dataset) -> Dataset:
    """What Current Requested Procedure Evidence needs of an instance."""
    out = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(out, keyword, ds[keyword].value)
    return out


def _finish_header(sr: Dataset, first: Dataset, device: DeviceInfo, when: datetime) -> None:
    """Restore the real patient name; stamp the caller's time everywhere (repeatable output)."""
    if "PatientName" in first:
        sr.PatientName = first.PatientName
    sr.InstanceCreationDate = when.strftime("%Y%m%d")
    sr.InstanceCreationTime = when.strftime("%H%M%S")
    for item in sr.get("ContributingEquipmentSequence", []):  # highdicom stamps wall-clock time
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    if device.station_name:
        sr.StationName = device.station_name[:16]
