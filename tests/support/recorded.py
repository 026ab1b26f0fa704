"""A phantom study stored and queued as the receiver would leave it (file written, instance
row recorded, study complete), for tests of the worker that start after the receiver."""

from __future__ import annotations

from io import BytesIO

from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from storage.db import CompletionReason, Database
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance


def record_complete_study(db: Database, files: FileStore, seed: int,
                          label: str = "arthritis") -> str:
    """One phantom study (multi-frame NM, both views) written to `files`, recorded in `db`
    and marked complete (a classify job queued); returns its Study Instance UID."""
    (ds,) = study_datasets(generate_study(label, seed=seed), DicomLayout.MULTIFRAME)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
        str(ds.SOPInstanceUID)
    path = files.write_instance(study, series, sop, data)
    record_instance(db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=str(path),
        views=("anterior", "posterior"), n_frames=2, size_bytes=len(data), calling_ae="CAM",
        patient_key=None))
    assert mark_complete(db, study, CompletionReason.BOTH_VIEWS)
    return study
