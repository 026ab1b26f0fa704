"""Synthetic NM and Secondary Capture objects built in memory (pydicom datasets), for tests
of the admission rules and view detection that need no file and no running node."""

from __future__ import annotations

import copy

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node.dicom.codes import ANTERIOR_CODE, NM_IMAGE_STORAGE, POSTERIOR_CODE


def code_item(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    """A code sequence item (value, scheme, meaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def detector_item(view_code: Dataset | None) -> Dataset:
    """A Detector Information Sequence item, with a View Code Sequence when given."""
    item = Dataset()
    if view_code is not None:  # a copy: a test that edits its dataset leaves ANT_CODE alone
        item.ViewCodeSequence = Sequence([copy.deepcopy(view_code)])
    return item


ANT_CODE = code_item(ANTERIOR_CODE, "Anterior projection")
POST_CODE = code_item(POSTERIOR_CODE, "Posterior projection")


def pixel_counts(frames: int, rows: int, cols: int) -> np.ndarray:
    """Distinct, recognisable counts per frame."""
    base = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols) % 300
    return np.stack([(base + 1000 * f).astype(np.uint16) for f in range(frames)])


def nm_dataset(frames: int = 2, detector_vector: list[int] | None = None,
               detectors: list[Dataset | None] | None = None, rows: int = 1024,
               cols: int = 256, sop_class: str = NM_IMAGE_STORAGE, modality: str = "NM",
               **text: str) -> Dataset:
    """A valid NM (or SC) whole-body object: Explicit VR Little Endian, 16-bit unsigned."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^John"
    ds.PatientID = "PID-1"
    ds.PatientBirthDate = "19500101"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = frames
    if detector_vector is not None:
        ds.FrameIncrementPointer = [Tag("EnergyWindowVector"), Tag("DetectorVector")]
        ds.EnergyWindowVector = [1] * frames
        ds.DetectorVector = detector_vector
    if detectors is not None:
        ds.DetectorInformationSequence = Sequence([detector_item(c) for c in detectors])
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixel_counts(frames, rows, cols).tobytes()
    return ds


def two_view_nm(detector_vector: list[int] | None = None) -> Dataset:
    """Both views in one object: detector 1 anterior, detector 2 posterior."""
    return nm_dataset(2, detector_vector or [1, 2], [ANT_CODE, POST_CODE])
