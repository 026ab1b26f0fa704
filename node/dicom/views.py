"""Which view (anterior or posterior) each frame of a whole-body scan shows, from the header
only, and the decoded frames paired with their views.

Order of evidence: View Code Sequence of the frame's detector (NM), a top-level View Code
Sequence (single-frame objects), then whole words in text attributes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from node.dicom.codes import ANTERIOR_CODE, POSTERIOR_CODE, View
from node.dicom.pixels import MAX_FRAMES, decode_frames
from node.dicom.values import as_int, sequence_items, text_of, values_of

log = logging.getLogger(__name__)

# Text attributes searched for ANT/POST, most image-specific first. Study Description is left
# out on purpose: it describes the exam ("WB ANT/POST"), not the image in hand.
VIEW_TEXT_KEYWORDS: tuple[str, ...] = (
    "ImageID", "ImageComments", "DerivationDescription", "ViewPosition", "SeriesDescription",
    "ProtocolName", "AcquisitionDeviceProcessingDescription")
_ANTERIOR_WORDS = frozenset({"ANT", "ANTERIOR"})
_POSTERIOR_WORDS = frozenset({"POST", "POSTERIOR"})
# "POST" that means "after" (3H POST, POST INJECTION, POST OP) is not a view.
_TIME_BEFORE_POST = frozenset({"H", "HR", "HRS", "HOUR", "HOURS", "MIN", "MINS", "MINUTE",
                               "MINUTES", "D", "DAY", "DAYS", "WK", "WEEK", "WEEKS"})
_TIME_AFTER_POST = frozenset({"INJ", "INJECTION", "OP", "OPERATIVE", "SURGERY", "TX", "THERAPY",
                              "TREATMENT", "CONTRAST", "VOID", "VOIDING", "DOSE", "RT", "CHEMO",
                              "RADIOTHERAPY", "ABLATION"})
_SNOMED_SCHEMES = frozenset({"SCT", "SRT", "SNM3", ""})


@dataclass(frozen=True)
class ViewImage:
    """One frame's counts and the view it shows."""

    view: View
    frame_number: int | None  # None for single-frame objects; 1-based otherwise
    pixels: np.ndarray  # (rows, cols) float32


def frame_views(ds: Dataset) -> tuple[View, ...]:
    """The view of every frame, from the header only; UNKNOWN where the header does not say.

    Order of evidence: View Code Sequence of the frame's detector (NM), a top-level View Code
    Sequence (single-frame objects), then words in text attributes. Never raises.
    """
    n_frames = _frame_count_for_views(ds)
    try:
        return _frame_views(ds, n_frames)
    except Exception:  # malformed header of any kind: the view is simply unknown
        log.debug("view lookup failed on a malformed header", exc_info=True)
        return (View.UNKNOWN,) * n_frames


def _frame_count_for_views(ds: Dataset) -> int:
    """Number of frames clamped to 1..MAX_FRAMES so a bad header cannot build a huge tuple."""
    try:
        value = ds.get("NumberOfFrames")
    except Exception:
        return 1
    n = 1 if value in (None, "") else as_int(value)
    return min(max(n or 1, 1), MAX_FRAMES)


def _frame_views(ds: Dataset, n_frames: int) -> tuple[View, ...]:
    """Per-frame decision: coded views first, then a text decision where it is safe."""
    detectors = _detector_vector(ds, n_frames)
    coded = [_detector_view(ds, d) if d is not None else View.UNKNOWN for d in detectors]
    if n_frames == 1 and coded[0] is View.UNKNOWN:
        coded[0] = _top_level_view(ds)
    if all(v is not View.UNKNOWN for v in coded):
        return tuple(coded)
    text_view = _text_view(ds)
    if text_view is View.UNKNOWN or not _text_applies_to_all_frames(detectors):
        return tuple(coded)
    return tuple(text_view if v is View.UNKNOWN else v for v in coded)


def _text_applies_to_all_frames(detectors: list[int | None]) -> bool:
    """Object-level text may name a view for every frame only if all frames share a detector."""
    if len(detectors) == 1:
        return True
    return None not in detectors and len(set(detectors)) == 1


def _detector_vector(ds: Dataset, n_frames: int) -> list[int | None]:
    """Detector number (1-based) of each frame; None where the header does not tell.

    Detector Vector has one value per frame (PS3.3 C.8.4.9); Frame Increment Pointer naming it
    confirms this but a vector of the right length is used even without it.
    """
    vector = [as_int(v) for v in values_of(ds.get("DetectorVector"))]
    if len(vector) == n_frames:
        return vector
    if n_frames == 1:  # one frame and one detector item: that detector took it
        items = sequence_items(ds, "DetectorInformationSequence")
        return [1 if len(items) == 1 else None]
    if vector:
        log.debug("Detector Vector has %d values for %d frames: ignored", len(vector), n_frames)
    return [None] * n_frames



def _detector_view(ds: Dataset, detector: int) -> View:
    """View Code Sequence of the detector's item (1-based) in Detector Information Sequence."""
    items = sequence_items(ds, "DetectorInformationSequence")
    if not 1 <= detector <= len(items):
        return View.UNKNOWN
    return _coded_view(sequence_items(items[detector - 1], "ViewCodeSequence"))


def _top_level_view(ds: Dataset) -> View:
    """A View Code Sequence at the top level (SC and other single-frame objects)."""
    return _coded_view(sequence_items(ds, "ViewCodeSequence"))


def _coded_view(items: list[Dataset]) -> View:
    """The view named by the first code item: SCT code value, else its meaning."""
    if not items:
        return View.UNKNOWN
    item = items[0]
    value = text_of(item.get("CodeValue")).strip()
    scheme = text_of(item.get("CodingSchemeDesignator")).strip().upper()
    if scheme in _SNOMED_SCHEMES:
        if value == ANTERIOR_CODE:
            return View.ANTERIOR
        if value == POSTERIOR_CODE:
            return View.POSTERIOR
    return _meaning_view(text_of(item.get("CodeMeaning")))


def _meaning_view(meaning: str) -> View:
    """'Anterior projection' / 'Posterior projection' from any scheme; obliques do not count."""
    words = set(_words(meaning))
    if words & {"OBLIQUE", "LATERAL"}:
        return View.UNKNOWN
    named = {view for word, view in (("ANTERIOR", View.ANTERIOR), ("POSTERIOR", View.POSTERIOR))
             if word in words}
    return _decide(named)


def _words(text: str) -> list[str]:
    """Upper-case words of a free text: split at non-letters, digits and camelCase humps."""
    return [w.upper() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", text)]


def views_in_text(text: str) -> set[View]:
    """Views a free text names as whole words (ANT, ANTERIOR, POST, POSTERIOR).

    Word boundaries keep POSTOP, ANTECUBITAL and POSITION out; a POST that means "after"
    (3H POST, POST INJECTION) is ignored.
    """
    words = _words(text)
    found: set[View] = set()
    for i, word in enumerate(words):
        if word in _ANTERIOR_WORDS:
            found.add(View.ANTERIOR)
        elif word in _POSTERIOR_WORDS and not _temporal_post(words, i):
            found.add(View.POSTERIOR)
    return found


def _temporal_post(words: list[str], i: int) -> bool:
    """True when words[i] is a POST that means 'after' rather than 'posterior'."""
    if words[i] != "POST":
        return False
    before = words[i - 1] if i > 0 else ""
    after = words[i + 1] if i + 1 < len(words) else ""
    return before in _TIME_BEFORE_POST or after in _TIME_AFTER_POST


def _decide(views: set[View]) -> View:
    """Exactly one view named decides; none or both do not."""
    return next(iter(views)) if len(views) == 1 else View.UNKNOWN


def _text_view(ds: Dataset) -> View:
    """The first text attribute naming exactly one view decides; one naming both is skipped."""
    for keyword in VIEW_TEXT_KEYWORDS:
        try:
            text = text_of(ds.get(keyword))
        except Exception:  # one unreadable attribute must not hide the others
            continue
        view = _decide(views_in_text(text))
        if view is not View.UNKNOWN:
            return view
    return View.UNKNOWN



def extract_views(ds: Dataset) -> list[ViewImage]:
    """Every frame with its view; frame_number is None for single-frame objects.

    Raises DecodeError when the pixels cannot be decoded.
    """
    pixels = decode_frames(ds)
    views = frame_views(ds)
    if len(views) != pixels.shape[0]:  # cannot happen after pixel_geometry; keep it explicit
        views = (View.UNKNOWN,) * pixels.shape[0]
    if pixels.shape[0] == 1:
        return [ViewImage(views[0], None, pixels[0])]
    return [ViewImage(view, i + 1, pixels[i]) for i, view in enumerate(views)]

