"""The result as a one-page PDF report, wrapped as Encapsulated PDF Storage in the study.

A RIS or a viewer's document pane shows a PDF where neither an SR nor an image is looked at.
The page holds what the result image shows (scaled to the page width), a short table (finding,
the four calibrated probabilities, threshold, model name, version and weights hash, training
data) and the warning that fits the model. It carries no patient identifier: the page is drawn
from the rendered image (which draws none) and the result only; the patient and study modules
are in the DICOM header, copied as the SR copies them. UIDs derive from study and model, so a
resend never duplicates the report.

Written directly (PDF 1.4, one page, about 150 lines here) rather than through matplotlib's PDF
backend, whose import and font machinery cost the classifier process ~40 MiB resident and
~0.5 s per page (issue 18): the text is real text in the PDF standard fonts (Helvetica,
Helvetica-Bold, Courier: every reader has them, nothing embedded), the image one
Flate-compressed RGB XObject at its own resolution (PNG "up" predictor). Pure and repeatable:
no creation date, no global state, so pages are drawn by several workers at once. Memory: the
image's compressed and uncompressed bytes (~4 MiB) while a page is drawn.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
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
PAGE_POINTS = (595.28, 841.89)  # A4 portrait, 1/72 inch
MAX_IMAGE_PIXELS = 1400 * 1100  # the result image is ~1304 x 1024; a larger one is refused
REGULAR, BOLD, MONO = "F1", "F2", "F3"
VALUE_LINES = 3  # a table value (the training data, say) wraps to at most this many lines
_FONTS = {REGULAR: "Helvetica", BOLD: "Helvetica-Bold", MONO: "Courier"}
# advance widths (1/1000 of the size) of characters 32-126, from the fonts' Adobe metrics
# (AFM), for line wrapping; any other character counts as the widest digit-sized glyph
_WIDTHS = {
    REGULAR: (278, 278, 355, 556, 556, 889, 667, 222, 333, 333, 389, 584, 278, 333, 278, 278,
              556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556,
              1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778,
              667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556,
              222, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556,
              556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584),
    BOLD: (278, 333, 474, 556, 556, 889, 722, 278, 333, 333, 389, 584, 278, 333, 278, 278, 556,
           556, 556, 556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611, 975, 722,
           722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778, 667, 778, 722,
           667, 611, 722, 667, 944, 667, 667, 611, 333, 278, 333, 584, 556, 278, 556, 611, 556,
           611, 556, 333, 611, 611, 278, 278, 556, 278, 889, 611, 611, 611, 611, 389, 556, 333,
           611, 556, 778, 556, 556, 500, 389, 280, 389, 584),
    MONO: (600,) * 95,
}
_OTHER_WIDTH = 1000
_BLACK, _GREY = (0.0, 0.0, 0.0), (0.33, 0.33, 0.33)
_WARNING_COLOURS = {True: (0.667, 0.0, 0.0), False: (0.47, 0.353, 0.0)}


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
    page = Page()
    width, height = PAGE_POINTS
    left = 0.06 * width
    y = page.paragraph(left, 0.965 * height - 11, DOCUMENT_TITLE, 15, BOLD,
                       width - 2 * left)
    y = page.paragraph(left, y - 17, warning, 7.5, BOLD, width - 2 * left,
                       _WARNING_COLOURS[phantoms])
    box_top, box_height = min(y - 10, 0.915 * height), 0.56 * height
    scale = min(box_height / image.shape[0], 0.88 * width / image.shape[1])
    img_w, img_h = image.shape[1] * scale, image.shape[0] * scale
    page.image((width - img_w) / 2, box_top - img_h, img_w, img_h)
    _table(page, rows, box_top - img_h - 0.02 * height - 9)
    page.paragraph(left, 0.03 * height, "Automated result, not verified by a physician. The "
                   "image above is the result image sent to PACS in the same study.", 7,
                   REGULAR, width - 2 * left, _GREY)
    return page.pdf(image)


def _table(page: Page, rows: Sequence[tuple[str, str]], top: float) -> None:
    """The (label, value) pairs as two columns of text; a long value wraps to at most
    VALUE_LINES lines (cut with "..."), so the table stays above the footer."""
    width = PAGE_POINTS[0]
    step = min(0.022 * PAGE_POINTS[1], (top - 0.06 * PAGE_POINTS[1]) / max(len(rows), 1))
    y = top
    for label, value in rows:
        page.text(0.08 * width, y, label, 9, BOLD)
        font = MONO if label == "Weights sha256" else REGULAR
        size = 8 if len(value) > 60 else 9
        y = page.paragraph(0.30 * width, y, value, size, font, 0.64 * width,
                           max_lines=VALUE_LINES) - step


@dataclass
class Page:
    """One PDF page being drawn: its content-stream operators (PDF coordinates: points, origin
    at the bottom left) and where its image goes. `pdf` writes the file."""

    ops: list[str] = field(default_factory=list)

    def text(self, x: float, y: float, s: str, size: float, font: str = REGULAR,
             colour: tuple[float, float, float] = _BLACK) -> None:
        """One line of text, its baseline at (x, y)."""
        r, g, b = colour
        self.ops.append(f"BT /{font} {size:g} Tf {r:.3f} {g:.3f} {b:.3f} rg "
                        f"{x:.2f} {y:.2f} Td ({pdf_string(s)}) Tj ET")

    def paragraph(self, x: float, y: float, s: str, size: float, font: str, width: float,
                  colour: tuple[float, float, float] = _BLACK, max_lines: int = 0) -> float:
        """Text wrapped at spaces to `width` points (at most `max_lines` lines when > 0, the
        last ending in "..."), first baseline at y; returns the last baseline."""
        lines = wrap(s, width / size * 1000, font)
        if 0 < max_lines < len(lines):
            lines = [*lines[:max_lines - 1], lines[max_lines - 1][:-3] + "..."]
        for i, line in enumerate(lines):
            self.text(x, y - i * size * 1.25, line, size, font, colour)
        return y - (len(lines) - 1) * size * 1.25

    def image(self, x: float, y: float, w: float, h: float) -> None:
        """The page's image (/Im1), its lower left corner at (x, y), w x h points."""
        self.ops.append(f"q {w:.2f} 0 0 {h:.2f} {x:.2f} {y:.2f} cm /Im1 Do Q")

    def pdf(self, image: np.ndarray) -> bytes:
        """The whole file: catalog, page tree, page, content, image, fonts, info, xref."""
        content = zlib.compress("\n".join(self.ops).encode("latin-1"))
        rows, cols = image.shape[:2]
        fonts = " ".join(f"/{k} {6 + i} 0 R" for i, k in enumerate(_FONTS))
        objects = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {PAGE_POINTS[0]} {PAGE_POINTS[1]}] "
             f"/Resources << /Font << {fonts} >> /XObject << /Im1 5 0 R >> >> "
             "/Contents 4 0 R >>").encode(),
            _stream(b"", content),
            _stream(f"/Type /XObject /Subtype /Image /Width {cols} /Height {rows} "
                    "/ColorSpace /DeviceRGB /BitsPerComponent 8 /DecodeParms << /Predictor 12 "
                    f"/Colors 3 /BitsPerComponent 8 /Columns {cols} >> ".encode(),
                    png_up_compressed(image)),
            *[f"<< /Type /Font /Subtype /Type1 /BaseFont /{name} /Encoding /WinAnsiEncoding >>"
              .encode() for name in _FONTS.values()],
            f"<< /Title ({pdf_string(DOCUMENT_TITLE)}) /Creator (dscint-node) >>".encode(),
        ]
        return _file(objects, root=1, info=len(objects))


def _stream(extra: bytes, data: bytes) -> bytes:
    return b"<< " + extra + b"/Filter /FlateDecode /Length " + str(len(data)).encode() \
        + b" >>\nstream\n" + data + b"\nendstream"


def _file(objects: Sequence[bytes], root: int, info: int) -> bytes:
    """Objects numbered from 1, the cross-reference table and the trailer."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root {root} 0 R /Info {info} 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def png_up_compressed(image: np.ndarray) -> bytes:
    """RGB rows PNG-"up"-filtered (each row minus the one above, a leading filter byte 2) and
    deflated: the form /Predictor 12 decodes; about a third smaller than the raw rows
    deflated for these images (views repeat row to row)."""
    rows = np.ascontiguousarray(image, dtype=np.uint8).reshape(image.shape[0], -1)
    filtered = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    return zlib.compress(filtered.tobytes(), 6)


def pdf_string(s: str) -> str:
    """A literal string's inside: WinAnsi characters (others as '?'), no control characters,
    backslash and parentheses escaped."""
    text = "".join(c if c >= " " else " " for c in s)
    text = text.encode("cp1252", errors="replace").decode("latin-1")
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def text_width(s: str, font: str) -> int:
    """Advance width of `s` in 1/1000 of the font size."""
    widths = _WIDTHS[font]
    return sum(widths[ord(c) - 32] if " " <= c <= "~" else _OTHER_WIDTH for c in s)


def wrap(s: str, width: float, font: str) -> list[str]:
    """Lines no wider than `width` (1/1000 of the size), broken at spaces; a word wider than
    a line is cut."""
    lines: list[str] = []
    line = ""
    for word in s.split():
        while text_width(word, font) > width and len(word) > 1:
            cut = max(1, max(i for i in range(1, len(word) + 1)
                             if text_width(word[:i], font) <= width or i == 1))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        joined = f"{line} {word}" if line else word
        if line and text_width(joined, font) > width:
            lines.append(line)
            line = word
        else:
            line = joined
    return [*lines, line] if line or not lines else lines


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
