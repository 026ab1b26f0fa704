"""The result as a one-page PDF report, wrapped as Encapsulated PDF Storage in the study.

A RIS or a viewer's document pane shows a PDF where neither an SR nor an image is looked at.
The page holds what the result image shows (scaled to the page width), a short table (finding,
the four calibrated probabilities, threshold, model name, version and weights hash, training
data) and the warning that fits the model. It carries no patient identifier: the page is drawn
from the rendered image (which draws none) and the result only; the patient and study modules
are in the DICOM header, copied as the SR copies them. UIDs derive from study and model, so a
resend never duplicates the report.

matplotlib's PDF backend draws it (vector text, the image Flate-compressed) through the
object-oriented Figure, never pyplot: no global figure registry, one figure per call, freed
when the call returns. Memory: the page's bytes (~1 MiB) beside the result image's pixels.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from io import BytesIO

import numpy as np
from matplotlib.backends.backend_pdf import FigureCanvasPdf
from matplotlib.figure import Figure
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from model.calibration import INDETERMINATE
from model.classes import CLASS_NAMES
from node.classify.sr import (
    DEVICE_NOTE,
    PHANTOM_NOTE,
    Classification,
    DerivedSeries,
    DeviceInfo,
    ModelInfo,
    derived_object_header,
    patient_study_copy,
)

log = logging.getLogger(__name__)

PDF_SERIES_NUMBER = 9903
PDF_SERIES_DESCRIPTION = "Dscint AI report (PDF)"
DOCUMENT_TITLE = "Dscint AI result report"
PDF_SERIES = DerivedSeries(str(EncapsulatedPDFStorage), "DOC", PDF_SERIES_NUMBER,
                           PDF_SERIES_DESCRIPTION)
PAGE_INCHES = (8.27, 11.69)  # A4 portrait
MAX_IMAGE_PIXELS = 1400 * 1100  # the result image is ~1304 x 1024; a larger one is refused
# matplotlib is not thread-safe (its font cache, its text layout): with several worker threads
# one page is drawn at a time (~0.5 s; the classification itself runs in parallel)
_DRAWING = threading.Lock()


def pdf_uids(study_uid: str, model_sha256: str) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the PDF report: deterministic, as the SR's."""
    series = generate_uid(entropy_srcs=["dscint-node", "pdf-series", study_uid, model_sha256])
    inst = generate_uid(entropy_srcs=["dscint-node", "pdf-instance", study_uid, model_sha256])
    return str(series), str(inst)


def warning_text(model: ModelInfo) -> str:
    """The page's banner: the phantom warning or the device note."""
    if model.trained_on_phantoms:
        return "NOT FOR DIAGNOSIS - " + PHANTOM_NOTE
    return "Not a certified medical device - " + DEVICE_NOTE


def table_rows(result: Classification, model: ModelInfo) -> list[tuple[str, str]]:
    """The report's table as (label, value) pairs: the result and the model, nothing about
    the patient (the page is built from these and the image only)."""
    finding = result.predicted_class.replace("_", " ")
    rows = [("Finding", finding.upper() if result.predicted_class == INDETERMINATE else finding)]
    rows += [(f"P({name.replace('_', ' ')})", f"{float(result.probabilities[name]):.3f}")
             for name in CLASS_NAMES]
    rows.append(("Threshold", "-" if result.threshold is None else
                 f"{result.threshold:.2f} (below it the finding is indeterminate)"))
    rows += [("Model", f"{model.name} {model.version}"),
             ("Weights sha256", model.sha256),
             ("Training data", model.training_data),
             ("Views", ", ".join(result.per_view) or "-")]
    return rows


def render_pdf(image: np.ndarray, rows: Sequence[tuple[str, str]], warning: str,
               phantoms: bool) -> bytes:
    """One A4 page: title and warning, the result image, the table. `image` is the result
    image's RGB pixels (rows, cols, 3). Repeatable: no creation date in the file."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] * image.shape[1] \
            > MAX_IMAGE_PIXELS:
        raise ValueError(f"result image of shape {image.shape} cannot go on the report")
    with _DRAWING:
        return _draw(image, rows, warning, phantoms)


def _draw(image: np.ndarray, rows: Sequence[tuple[str, str]], warning: str,
          phantoms: bool) -> bytes:
    """The page's bytes (the caller holds the drawing lock)."""
    fig = Figure(figsize=PAGE_INCHES)
    FigureCanvasPdf(fig)
    fig.text(0.06, 0.965, DOCUMENT_TITLE, fontsize=15, weight="bold", va="top")
    fig.text(0.06, 0.94, warning, fontsize=7.5, va="top", wrap=True,
             color="#aa0000" if phantoms else "#785a00", weight="bold")
    top, height = 0.915, 0.56
    aspect = image.shape[1] / image.shape[0]
    width = min(0.88, height * aspect * PAGE_INCHES[1] / PAGE_INCHES[0])
    ax = fig.add_axes((0.5 - width / 2, top - height, width, height))
    ax.imshow(image, interpolation="none")
    ax.set_axis_off()
    _table(fig, rows, top - height - 0.02)
    fig.text(0.06, 0.03, "Automated result, not verified by a physician. The image above is "
             "the result image sent to PACS in the same study.", fontsize=7, color="#555555")
    buf = BytesIO()
    fig.savefig(buf, format="pdf", metadata={"CreationDate": None, "Producer": None,
                                             "Creator": "dscint-node",
                                             "Title": DOCUMENT_TITLE})
    fig.clear()
    return buf.getvalue()


def _table(fig: Figure, rows: Sequence[tuple[str, str]], top: float) -> None:
    """The (label, value) pairs as two columns of text, one line each."""
    step = min(0.022, (top - 0.06) / max(len(rows), 1))
    for i, (label, value) in enumerate(rows):
        y = top - i * step
        fig.text(0.08, y, label, fontsize=9, weight="bold", va="top")
        fig.text(0.30, y, value, fontsize=8 if len(value) > 60 else 9, va="top",
                 family="monospace" if label == "Weights sha256" else "sans-serif")


def build_pdf_report(source: Dataset, image: Dataset, result: Classification,
                     model: ModelInfo, device: DeviceInfo, now: datetime | None = None
                     ) -> Dataset:
    """The Encapsulated PDF dataset (file meta included) of one study's result. `image` is
    the result image (its pixels go on the page); `source` gives the patient and study
    modules."""
    pixels = np.frombuffer(image.PixelData, dtype=np.uint8).reshape(
        int(image.Rows), int(image.Columns), 3)
    document = render_pdf(pixels, table_rows(result, model), warning_text(model),
                          model.trained_on_phantoms)
    study_uid = str(source.StudyInstanceUID)
    series_uid, sop_uid = pdf_uids(study_uid, model.sha256)
    when = (now or datetime.now()).replace(microsecond=0)
    ds = patient_study_copy(source)
    _pdf_header(ds, series_uid, sop_uid, model, device, when)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\0" if len(document) % 2 else b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    log.debug("built PDF report %s (%d bytes)", sop_uid, len(document))
    return ds


def _pdf_header(ds: Dataset, series_uid: str, sop_uid: str, model: ModelInfo,
                device: DeviceInfo, when: datetime) -> None:
    """Encapsulated Document Series, General Equipment, SC Equipment, Encapsulated Document
    and SOP Common attributes."""
    derived_object_header(ds, PDF_SERIES, series_uid, sop_uid, model, device, when)
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.ManufacturerModelName = device.model_name
    ds.SoftwareVersions = device.software_version
    ds.BurnedInAnnotation = "NO"  # the page names no patient
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.RecognizableVisualFeatures = "NO"
