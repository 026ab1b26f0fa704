"""What a stored result object is (SR, result image, PDF report), read from its file's meta
header: the export queue records a SOP Instance UID and a file, the SOP class is in the file."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from node.dicom.codes import RESULT_OBJECT_KINDS

log = logging.getLogger(__name__)

UNKNOWN_KIND = "object"  # a file gone (retention) or unreadable, not the SR


def object_kind(path: str | Path, is_sr: bool = False) -> str:
    """'SR', 'image' or 'PDF' from the file's Media Storage SOP Class (only the meta group is
    read); the SR is known without its file; anything else unreadable is 'object'."""
    if is_sr:
        return "SR"
    try:
        meta = read_file_meta_info(path)
        return RESULT_OBJECT_KINDS.get(str(meta.get("MediaStorageSOPClassUID", "")),
                                       UNKNOWN_KIND)
    except Exception as exc:  # gone, a directory, not DICOM: say so, never fail a report
        log.debug("result object %s unreadable: %s", Path(path).name, type(exc).__name__)
        return UNKNOWN_KIND
