"""Write phantom studies as the DICOM files a gamma camera would send.

Why: the node must be exercised with what cameras really produce: NM Image Storage with both views
in one multi-frame object (views identified by Detector Vector and View Code Sequence), one NM
object per view, or Secondary Capture with Modality NM and the view only in free text (as the real
GE file in shared/realdata). UIDs are derived from the study seed, so re-writing a study gives
byte-identical files and a resend is recognised as the same instances.

Every object says it is simulated (Patient Comments, Image Comments): nothing downstream may
present a phantom as a clinical study.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from model.phantoms import GENERATOR_VERSION, I131, PIXEL_MM, PhantomStudy

SIMULATED_MARKER = "SIMULATED PHANTOM - NOT A PATIENT"
MANUFACTURER = "DSCINT PHANTOM"
MODEL_NAME = "dscint-node phantom generator"
WHOLE_BODY_IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
# (code value, meaning) of the SCT view codes, anterior first (frame / detector 1).
VIEW_CODES = {"ANT": ("399321004", "Anterior projection"),
              "POST": ("399001007", "Posterior projection")}
_ENERGY_WINDOW_TAG = 0x00540010
_DETECTOR_VECTOR_TAG = 0x00540020


class DicomLayout(StrEnum):
    """How the camera packages the two views."""

    MULTIFRAME = "multiframe"  # one NM object, frame 1 anterior, frame 2 posterior
    PER_VIEW = "per_view"  # one single-frame NM object per view, same series
    SECONDARY_CAPTURE = "secondary_capture"  # SC objects (Modality NM), view only in text


def _uid(study: PhantomStudy, *parts: str) -> str:
    """Deterministic UID from the study identity (label, seed, difficulty) and `parts`."""
    key = [f"dscint-phantom-v{GENERATOR_VERSION}", study.label, str(study.seed),
           repr(study.details.get("difficulty")), *parts]
    return str(generate_uid(entropy_srcs=key))


def _default_accession(study: PhantomStudy) -> str:
    """A stable 10-character accession number (SH allows 16)."""
    h = hashlib.sha256(f"{study.label}/{study.seed}".encode()).hexdigest()
    return f"PA{int(h[:12], 16) % 10**8:08d}"


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    """One code sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    """Part 10 header for Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DSCINT_PHANTOM"
    return meta


def _patient_and_study(ds: Dataset, study: PhantomStudy, accession: str) -> None:
    """Patient, General Study and equipment attributes shared by every object of a study."""
    p, when = study.patient, study.study_datetime
    ds.PatientName = p.patient_name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age:03d}Y"
    ds.PatientSize = f"{p.height_cm / 100:.2f}"
    ds.PatientWeight = f"{p.weight_kg:.1f}"
    ds.PatientComments = SIMULATED_MARKER
    ds.StudyInstanceUID = _uid(study, "study")
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.StudyID = accession[-8:]
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    iodine = study.radiopharmaceutical == I131
    ds.StudyDescription = "I-131 WHOLE BODY" if iodine else "NM WHOLE BODY BONE"
    ds.Modality = "NM"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = f"generator v{GENERATOR_VERSION}"
    ds.StationName = "PHANTOM01"
    ds.InstitutionName = "DSCINT PHANTOM SITE"
    ds.BodyPartExamined = "WHOLEBODY"
    ds.ProtocolName = "I-131 WHOLE BODY" if iodine else "WHOLE BODY BONE"


def _acquisition(study: PhantomStudy) -> datetime:
    """Acquisition start: the scan begins a few minutes after the study is opened."""
    return study.study_datetime + timedelta(minutes=3)


def _series(ds: Dataset, study: PhantomStudy, layout: DicomLayout, number: int, description: str
            ) -> None:
    """General Series attributes; one series per layout (and per view for SC)."""
    ds.SeriesInstanceUID = _uid(study, layout.value, "series", str(number))
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    acq = _acquisition(study)
    ds.SeriesDate = acq.strftime("%Y%m%d")
    ds.SeriesTime = acq.strftime("%H%M%S")


def _image(ds: Dataset, study: PhantomStudy, sop_class: str, sop_uid: str, instance: int,
           frames: list[np.ndarray], comments: str) -> None:
    """General Image, SOP Common and Image Pixel attributes for 16-bit unsigned counts."""
    acq = _acquisition(study)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance
    ds.ImageType = WHOLE_BODY_IMAGE_TYPE
    ds.AcquisitionDate = ds.ContentDate = acq.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = acq.strftime("%H%M%S")
    ds.ImageComments = comments
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = frames[0].shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{PIXEL_MM:.2f}", f"{PIXEL_MM:.2f}"]
    pixels = np.stack([np.ascontiguousarray(f, dtype="<u2") for f in frames])
    ds.PixelData = pixels.tobytes()


def _radiopharmaceutical(study: PhantomStudy) -> Dataset:
    """Radiopharmaceutical Information Sequence item (nuclide, agent, dose, injection time)."""
    item = Dataset()
    if study.radiopharmaceutical == I131:
        item.Radiopharmaceutical = "Sodium iodide I-131"
        nuclide, agent = ("1368003", "^131^Iodine"), ("111160004", "Sodium iodide I^131^")
        dose, delay = 74.0 + 111.0 * (study.seed % 7) / 6, timedelta(hours=48)
    else:
        item.Radiopharmaceutical = "Tc-99m MDP"
        nuclide, agent = ("72454006", "^99m^Technetium"), ("96390006",
                                                           "Technetium Tc^99m^ medronate")
        dose, delay = 740.0 + 185.0 * (study.seed % 7) / 6, timedelta(hours=3)
    item.RadionuclideCodeSequence = Sequence([_code(*nuclide)])
    item.RadiopharmaceuticalCodeSequence = Sequence([_code(*agent)])
    item.RadionuclideTotalDose = f"{dose:.1f}"
    item.RadiopharmaceuticalStartTime = (_acquisition(study) - delay).strftime("%H%M%S")
    item.RadiopharmaceuticalRoute = "Intravenous route" if study.radiopharmaceutical != I131 \
        else "Oral route"
    return item


def _orientation(view: str) -> tuple[list[str], list[str]]:
    """Image Orientation and Position (Patient) of a whole-body view, patient supine head first.

    Rows run to the feet (-z); the anterior view has the patient's left (+x) on the image
    right, the posterior view (displayed mirrored) the patient's right. The vertex row is z = 0.
    """
    half = (256 - 1) / 2 * PIXEL_MM
    if view == "ANT":
        return ["1", "0", "0", "0", "0", "-1"], [f"{-half:.2f}", "0", "0"]
    return ["-1", "0", "0", "0", "0", "-1"], [f"{half:.2f}", "0", "0"]


def _nm_acquisition(ds: Dataset, study: PhantomStudy, views: list[str]) -> None:
    """NM Multi-frame, NM Image, Isotope and Detector modules for the given views."""
    iodine = study.radiopharmaceutical == I131
    n = len(views)
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = [_ENERGY_WINDOW_TAG, _DETECTOR_VECTOR_TAG]
    ds.EnergyWindowVector = [1] * n
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = list(range(1, n + 1))
    ds.NumberOfDetectors = n
    rng = Dataset()
    rng.EnergyWindowLowerLimit = "328" if iodine else "126"
    rng.EnergyWindowUpperLimit = "400" if iodine else "154"
    win = Dataset()
    win.EnergyWindowRangeSequence = Sequence([rng])
    win.EnergyWindowName = "I131" if iodine else "TC99M"
    ds.EnergyWindowInformationSequence = Sequence([win])
    ds.RadiopharmaceuticalInformationSequence = Sequence([_radiopharmaceutical(study)])
    items = []
    for view in views:
        det = Dataset()
        det.CollimatorGridName = "HEGP" if iodine else "LEHR"
        det.CollimatorType = "PARA"
        det.ZoomFactor = ["1", "1"]
        det.FocalDistance = None  # parallel-hole collimator
        det.ImageOrientationPatient, det.ImagePositionPatient = _orientation(view)
        det.ViewCodeSequence = Sequence([_code(*VIEW_CODES[view])])
        items.append(det)
    ds.DetectorInformationSequence = Sequence(items)
    orient = _code("102538003", "recumbent")
    orient.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "supine")])
    ds.PatientOrientationCodeSequence = Sequence([orient])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "headfirst")])
    ds.FrameOfReferenceUID = _uid(study, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    images = {"ANT": study.anterior, "POST": study.posterior}
    ds.CountsAccumulated = sum(int(images[v].sum()) for v in views)
    ds.WholeBodyTechnique = "1PS"
    ds.ScanLength = 2000
    ds.ScanVelocity = "2.5" if not iodine else "1.5"
    ds.ActualFrameDuration = 800000 if not iodine else 1330000
    ds.CorrectedImage = ["UNIF", "COR"]


def _new_dataset(sop_class: str, sop_uid: str) -> Dataset:
    """An empty dataset with its Part 10 header."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    return ds


def _multiframe(study: PhantomStudy, accession: str) -> list[Dataset]:
    """One NM object: frame 1 = detector 1 = anterior, frame 2 = detector 2 = posterior."""
    uid = _uid(study, DicomLayout.MULTIFRAME.value, "sop", "1")
    ds = _new_dataset(NuclearMedicineImageStorage, uid)
    _patient_and_study(ds, study, accession)
    _series(ds, study, DicomLayout.MULTIFRAME, 1, "WHOLE BODY")
    _image(ds, study, NuclearMedicineImageStorage, uid, 1, [study.anterior, study.posterior],
           SIMULATED_MARKER)
    ds.ImageID = "WB"
    _nm_acquisition(ds, study, ["ANT", "POST"])
    return [ds]


def _per_view(study: PhantomStudy, accession: str) -> list[Dataset]:
    """Two single-frame NM objects in one series, instance 1 anterior, instance 2 posterior."""
    out = []
    for n, (view, img) in enumerate((("ANT", study.anterior), ("POST", study.posterior)), 1):
        uid = _uid(study, DicomLayout.PER_VIEW.value, "sop", str(n))
        ds = _new_dataset(NuclearMedicineImageStorage, uid)
        _patient_and_study(ds, study, accession)
        _series(ds, study, DicomLayout.PER_VIEW, 2, "WHOLE BODY")
        _image(ds, study, NuclearMedicineImageStorage, uid, n, [img],
               f"{view} - {SIMULATED_MARKER}")
        ds.ImageID = view
        _nm_acquisition(ds, study, [view])
        out.append(ds)
    return out


def _secondary_capture(study: PhantomStudy, accession: str) -> list[Dataset]:
    """SC objects with Modality NM, one per view and series, view named only in text."""
    out = []
    for n, (view, img) in enumerate((("ANT", study.anterior), ("POST", study.posterior)), 1):
        uid = _uid(study, DicomLayout.SECONDARY_CAPTURE.value, "sop", str(n))
        ds = _new_dataset(SecondaryCaptureImageStorage, uid)
        _patient_and_study(ds, study, accession)
        _series(ds, study, DicomLayout.SECONDARY_CAPTURE, 10 + n, f"WHOLE BODY {view}")
        _image(ds, study, SecondaryCaptureImageStorage, uid, 1, [img],
               f"{view} - {SIMULATED_MARKER}")
        ds.ImageID = view
        ds.ConversionType = "WSD"
        out.append(ds)
    return out


def study_datasets(study: PhantomStudy, layout: DicomLayout = DicomLayout.MULTIFRAME,
                   accession: str | None = None) -> list[pydicom.Dataset]:
    """The DICOM objects of one study in `layout` (deterministic for a given study)."""
    acc = accession if accession is not None else _default_accession(study)
    layout = DicomLayout(layout)
    if layout is DicomLayout.MULTIFRAME:
        return _multiframe(study, acc)
    if layout is DicomLayout.PER_VIEW:
        return _per_view(study, acc)
    return _secondary_capture(study, acc)


def write_study(study: PhantomStudy, out_dir: Path,
                layout: DicomLayout = DicomLayout.MULTIFRAME) -> list[Path]:
    """Write the study's objects as Part 10 files named after their SOP Instance UIDs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in study_datasets(study, layout):
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
