"""The result as a picture a physician can open in any viewer: a colour Secondary Capture.

Many PACS viewers do not render a Comprehensive 3D SR; every viewer shows an RGB image. One
image per result, in the study, in a series of its own::

    [ banner: not for diagnosis / not a medical device                                ]
    [ ANT | ANT + evidence | POST | POST + evidence ]   NM greyscale, inverted, windowed
    [ finding, four probability bars, threshold, evidence legend, model name/version ]

The plain views stay beside the overlaid ones (an SC overlay cannot be switched off). No
patient identifier is drawn (Burned In Annotation NO); the patient and study modules are
copied as the SR copies them; UIDs derive from study and model, so a resend never duplicates.

Drawn with Pillow and numpy only: the colour map is a 256-entry table interpolated from 17
points of matplotlib's "inferno" (within 7 of 255 per channel), so the classifier process
never imports matplotlib (~40 MiB resident, issue 18), and the overlay is blended in uint8 /
float32 (a few MiB per panel, not float64 RGBA copies).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from model.calibration import INDETERMINATE
from model.classes import CLASS_NAMES
from model.explain import EVIDENCE_METHOD, EVIDENCE_NAME
from node.classify.sr import (
    Classification,
    DerivedSeries,
    DeviceInfo,
    ModelInfo,
    derived_object_header,
    patient_study_copy,
    versioned_uid,
)

log = logging.getLogger(__name__)

IMAGE_SERIES_NUMBER = 9902
IMAGE_SERIES_DESCRIPTION = "Dscint AI result image"
IMAGE_SERIES = DerivedSeries(str(SecondaryCaptureImageStorage), "OT", IMAGE_SERIES_NUMBER,
                             IMAGE_SERIES_DESCRIPTION)
PANEL_ROWS, PANEL_COLS = 1024, 256
BANNER_ROWS, FOOTER_ROWS = 48, 232
WINDOW_PERCENTILE = 99.5  # upper window edge: the bladder and injection site saturate
EVIDENCE_FLOOR = 0.2  # map values below this are not drawn (the plain grey shows through)
EVIDENCE_ALPHA = 0.55
COLORMAP = "inferno"  # the name of the map INFERNO_POINTS samples
# matplotlib's inferno at 0, 1/16, ..., 1 (RGB 0-255); linear in between
INFERNO_POINTS = ((0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110),
                  (113, 25, 110), (138, 34, 106), (163, 44, 97), (188, 55, 84), (208, 69, 69),
                  (227, 89, 51), (241, 113, 31), (249, 140, 10), (252, 170, 15), (249, 201, 50),
                  (242, 232, 101), (252, 255, 164))
_BAR_COLOURS = {True: (200, 40, 40), False: (90, 110, 160)}


@dataclass(frozen=True)
class ShownView:
    """One view as drawn: its label, raw counts, and the evidence map (or None)."""

    label: str  # e.g. "ANT", "POST (mirrored from ANT)"
    pixels: np.ndarray  # 2-D counts
    evidence: np.ndarray | None  # same shape, [0, 1]


def image_uids(study_uid: str, model_sha256: str) -> tuple[str, str]:
    """(Series, SOP Instance) UIDs of the result image: deterministic, as the SR's."""
    series = generate_uid(entropy_srcs=["dscint-node", "image-series", study_uid, model_sha256])
    inst = generate_uid(entropy_srcs=["dscint-node", "image-instance", study_uid, model_sha256])
    return str(series), str(inst)


def image_reference(study_uid: str, model_sha256: str, version: int = 1) -> Dataset:
    """What the SR names of the result image (study, series, class, instance) before the image
    exists: its UIDs derive from study and model (`image_uids`), an amended result's
    (`version` > 1) as node.classify.amend.restamp derives them, so the SR goes out first
    and the image built after it is the one it references."""
    series_uid, sop_uid = image_uids(study_uid, model_sha256)
    ref = Dataset()
    ref.StudyInstanceUID = study_uid
    ref.SeriesInstanceUID = versioned_uid(series_uid, version)
    ref.SOPClassUID = IMAGE_SERIES.sop_class_uid
    ref.SOPInstanceUID = versioned_uid(sop_uid, version)
    return ref


def window(pixels: np.ndarray) -> np.ndarray:
    """8-bit greyscale as a nuclear-medicine workstation shows a bone scan: counts 0 to the
    99.5th percentile of the body, inverted (hot spots dark)."""
    counts = pixels.astype(np.float64)
    body = counts[counts > 0]
    top = float(np.percentile(body, WINDOW_PERCENTILE)) if body.size else 1.0
    scaled = np.clip(counts / max(top, 1e-9), 0.0, 1.0)
    return (255.0 * (1.0 - scaled)).astype(np.uint8)


def _fit(img: np.ndarray) -> np.ndarray:
    """A view resampled to the panel size (nearest), so odd camera matrices still fit."""
    if img.shape == (PANEL_ROWS, PANEL_COLS):
        return img
    rows = (np.arange(PANEL_ROWS) * img.shape[0] / PANEL_ROWS).astype(int)
    cols = (np.arange(PANEL_COLS) * img.shape[1] / PANEL_COLS).astype(int)
    return img[rows][:, cols]


def colour_table() -> np.ndarray:
    """(256, 3) uint8: the evidence colour map, entry i for map value i / 255."""
    points = np.asarray(INFERNO_POINTS, dtype=np.float32)
    where = np.linspace(0.0, 1.0, len(points))
    ramp = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(ramp, where, points[:, c]) for c in range(3)], axis=1) \
        .round().astype(np.uint8)


def colours_of(values: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) of map values in [0, 1] (clipped)."""
    index = (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.intp)
    return colour_table()[index]


def overlay(grey: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """RGB: the colour map blended over the grey view where the evidence is strong."""
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    shown = evidence >= EVIDENCE_FLOOR
    blended = rgb[shown].astype(np.float32) * (1 - EVIDENCE_ALPHA) \
        + colours_of(evidence[shown]).astype(np.float32) * EVIDENCE_ALPHA
    rgb[shown] = blended.astype(np.uint8)
    return rgb


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(views: Sequence[ShownView], result: Classification, model: ModelInfo
           ) -> np.ndarray:
    """The result image as (rows, cols, 3) uint8."""
    panels: list[tuple[str, np.ndarray]] = []
    for v in views:
        grey = _fit(window(v.pixels))
        panels.append((v.label, np.repeat(grey[:, :, None], 3, axis=2)))
        if v.evidence is not None:
            panels.append((f"{v.label} + evidence", overlay(grey, _fit(v.evidence))))
    width = max(4, len(panels)) * PANEL_COLS
    canvas = Image.new("RGB", (width, BANNER_ROWS + PANEL_ROWS + FOOTER_ROWS), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    _banner(draw, width, model)
    for i, (label, rgb) in enumerate(panels):
        canvas.paste(Image.fromarray(rgb, "RGB"), (i * PANEL_COLS, BANNER_ROWS))
        draw.rectangle((i * PANEL_COLS, BANNER_ROWS, i * PANEL_COLS + PANEL_COLS - 1,
                        BANNER_ROWS + 22), fill=(0, 0, 0))
        draw.text((i * PANEL_COLS + 6, BANNER_ROWS + 3), label, fill=(255, 255, 255),
                  font=_font(15))
    _footer(draw, canvas, BANNER_ROWS + PANEL_ROWS, width, result, model)
    return np.asarray(canvas, dtype=np.uint8)


def _banner(draw: ImageDraw.ImageDraw, width: int, model: ModelInfo) -> None:
    text = ("NOT FOR DIAGNOSIS - model trained on simulated phantoms (research use only)"
            if model.trained_on_phantoms else
            "Not a certified medical device - automated result, not verified by a physician")
    draw.rectangle((0, 0, width, BANNER_ROWS - 1),
                   fill=(170, 0, 0) if model.trained_on_phantoms else (120, 90, 0))
    draw.text((10, 12), text, fill=(255, 255, 255), font=_font(22))


def _footer(draw: ImageDraw.ImageDraw, canvas: Image.Image, top: int, width: int,
            result: Classification, model: ModelInfo) -> None:
    finding = result.predicted_class.replace("_", " ")
    head = f"Finding: {finding.upper() if result.predicted_class == INDETERMINATE else finding}"
    draw.text((10, top + 8), head, fill=(255, 255, 255), font=_font(26))
    argmax = max(result.probabilities, key=lambda k: result.probabilities[k])
    bar_left, bar_width = 190, 300
    for i, name in enumerate(CLASS_NAMES):
        y = top + 50 + i * 28
        p = float(result.probabilities[name])
        draw.text((10, y), name.replace("_", " "), fill=(230, 230, 230), font=_font(16))
        draw.rectangle((bar_left, y + 2, bar_left + bar_width, y + 20), outline=(120, 120, 120))
        draw.rectangle((bar_left, y + 2, bar_left + round(p * bar_width), y + 20),
                       fill=_BAR_COLOURS[name == argmax])
        draw.text((bar_left + bar_width + 8, y), f"{p:.2f}", fill=(230, 230, 230), font=_font(16))
    if result.threshold is not None:
        x = bar_left + round(result.threshold * bar_width)
        draw.line((x, top + 48, x, top + 50 + 4 * 28), fill=(255, 200, 0), width=2)
        draw.text((10, top + 50 + 4 * 28), f"calibrated probabilities; yellow line: threshold "
                  f"{result.threshold:.2f} (below it: indeterminate)", fill=(255, 200, 0),
                  font=_font(14))
    _legend(draw, canvas, top, width, argmax)
    draw.text((10, top + FOOTER_ROWS - 26), f"Model: {model.name} {model.version}  "
              f"(sha256 {model.sha256[:12]})", fill=(200, 200, 200), font=_font(15))


def _legend(draw: ImageDraw.ImageDraw, canvas: Image.Image, top: int, width: int,
            argmax: str) -> None:
    """Colour bar of the evidence map and what it means."""
    left, bar_w = width - 400, 360
    strip = np.repeat(colours_of(np.linspace(EVIDENCE_FLOOR, 1.0, bar_w))[None, :, :], 18,
                      axis=0)
    canvas.paste(Image.fromarray(strip, "RGB"), (left, top + 60))
    draw.text((left, top + 34), f"Evidence map ({EVIDENCE_NAME})", fill=(230, 230, 230),
              font=_font(16))
    draw.text((left, top + 82), "weak", fill=(200, 200, 200), font=_font(14))
    draw.text((left + bar_w - 40, top + 82), "strong", fill=(200, 200, 200), font=_font(14))
    draw.text((left, top + 104), f"where the model saw {argmax.replace('_', ' ')}",
              fill=(200, 200, 200), font=_font(14))
    draw.text((left, top + 124), "uncoloured: below 20 % of the map's peak",
              fill=(200, 200, 200), font=_font(14))


def build_result_image(source: Dataset, views: Sequence[ShownView], result: Classification,
                       model: ModelInfo, device: DeviceInfo, now: datetime | None = None
                       ) -> Dataset:
    """The Secondary Capture dataset (file meta included) of one study's result."""
    if not views:
        raise ValueError("a result image needs at least one view")
    pixels = render(views, result, model)
    study_uid = str(source.StudyInstanceUID)
    series_uid, sop_uid = image_uids(study_uid, model.sha256)
    when = (now or datetime.now()).replace(microsecond=0)
    ds = patient_study_copy(source)
    _sc_header(ds, series_uid, sop_uid, model, device, when)
    ds.Rows, ds.Columns = pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    log.debug("built result image %s (%d x %d)", sop_uid, ds.Rows, ds.Columns)
    return ds


def _sc_header(ds: Dataset, series_uid: str, sop_uid: str, model: ModelInfo,
               device: DeviceInfo, when: datetime) -> None:
    """General Series, SC Equipment, General Image, SC Image and SOP Common attributes."""
    derived_object_header(ds, IMAGE_SERIES, series_uid, sop_uid, model, device, when)
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = ds.ContentDate, ds.ContentTime
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = (f"Dscint result: NM views with {model.name} {model.version} "
                                f"evidence map ({EVIDENCE_METHOD}), finding and "
                                "probabilities")[:1024]
    ds.BurnedInAnnotation = "NO"  # text is burned in, but nothing that identifies the patient
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ""
    ds.Laterality = ""  # type 2C (paired body part); a whole body is not one: empty


def encode_image(ds: Dataset) -> bytes:
    """Part 10 bytes, Explicit VR Little Endian, as stored and sent."""
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
