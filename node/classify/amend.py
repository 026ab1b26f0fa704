"""What an amended result is made of: the latest instance of each view, the version, and the
new UIDs of the result's other objects (storage.amend has the queue side).

Which instance of a view is the latest: the one acquired last, by the header's Acquisition
DateTime (else Acquisition Date and Time, else Content Date and Time), when every instance of
that view carries one; otherwise, or on a tie, the one received last. Acquisition time is
what the technologist means by "re-acquired" and survives a PACS re-sending old instances
(a re-send updates their arrival); arrival is the fallback for cameras that leave the times
empty. Superseded instances stay stored and listed, only not classified or referenced. Views
the headers do not name (unknown) are never superseded: each is classified, as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.valuerep import DA, TM

from node.classify.sr import Predecessor, versioned_uid
from node.dicom.codes import View
from storage.amend import ResultVersion
from storage.intake import InstanceInfo

log = logging.getLogger(__name__)

SUPERSEDABLE = frozenset({View.ANTERIOR.value, View.POSTERIOR.value})


def classified_instances(instances: Sequence[InstanceInfo]) -> list[InstanceInfo]:
    """The instances a classification reads: on time, or late but amending the result."""
    return [i for i in instances if not i.late or i.amends]


def latest_per_view(instances: Sequence[InstanceInfo]) -> dict[str, str]:
    """{view: SOP Instance UID of its latest instance} for anterior and posterior;
    `instances` in arrival order (as storage.intake.study_instances lists them)."""
    by_view: dict[str, list[int]] = {}
    for n, inst in enumerate(instances):
        for view in set(inst.views) & SUPERSEDABLE:
            by_view.setdefault(view, []).append(n)
    times: dict[int, datetime | None] = {}  # headers read once, only where views compete
    chosen: dict[str, str] = {}
    for view, candidates in by_view.items():
        best = candidates[-1]  # the latest arrival
        if len(candidates) > 1:
            for n in candidates:
                if n not in times:
                    times[n] = acquired_at(instances[n].path)
            stamped = [(t, n) for n in candidates if (t := times[n]) is not None]
            if len(stamped) == len(candidates):
                best = max(stamped)[1]  # the latest acquisition; a tie: the later arrival
        chosen[view] = instances[best].sop_uid
    return chosen


def acquired_at(path: str) -> datetime | None:
    """When the instance was acquired, from its header (None when it does not say)."""
    ds = dcmread(Path(path), stop_before_pixels=True)
    return header_time(ds)


def header_time(ds: Dataset) -> datetime | None:
    """Acquisition DateTime, else Acquisition Date + Time, else Content Date + Time (naive:
    one camera's clock is compared with itself); None when absent or not parseable."""
    for stamp in (_value(ds, "AcquisitionDateTime"),
                  _value(ds, "AcquisitionDate") + _value(ds, "AcquisitionTime"),
                  _value(ds, "ContentDate") + _value(ds, "ContentTime")):
        if len(stamp) < 10:  # a date without its time (or nothing): not comparable
            continue
        try:
            return datetime.combine(DA(stamp[:8]), TM(re.split(r"[+-]", stamp[8:])[0]))
        except (TypeError, ValueError, OverflowError):
            continue
    return None


def _value(ds: Dataset, keyword: str) -> str:
    """An element's value as text ("" when absent or empty)."""
    value = ds.get(keyword)
    return "" if value in (None, "") else str(value).strip()


def amendment(current: ResultVersion | None) -> Predecessor | None:
    """The predecessor an amended SR names, None for a study's first result."""
    if current is None:
        return None
    return Predecessor(version=current.version + 1, series_uid=current.sr_series_uid,
                       sop_uid=current.sr_sop_uid)


def restamp(ds: Dataset, version: int) -> Dataset:
    """Another object of an amended result (the result image, the PDF): a series and
    instance UID of its own for this version (deterministic, as the SR's); version 1 is
    left as built."""
    if version > 1:
        ds.SeriesInstanceUID = versioned_uid(str(ds.SeriesInstanceUID), version)
        ds.SOPInstanceUID = versioned_uid(str(ds.SOPInstanceUID), version)
        if "MediaStorageSOPInstanceUID" in getattr(ds, "file_meta", {}):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
