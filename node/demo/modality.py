"""A modality-like C-STORE sender (demo, tests, benchmarks): files of one study, one association."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from node.dicom.codes import VERIFICATION
from node.export.scu import Destination

log = logging.getLogger(__name__)


def send_paths(paths: Sequence[Path], dest: Destination, calling_ae: str = "MODALITY",
               max_pdu: int = 0) -> list[int | None]:
    """C-STORE each file as stored; returns one status per file (None: no response)."""
    contexts = set()
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = max_pdu
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return [None] * len(paths)
    statuses: list[int | None] = []
    try:
        for p in paths:
            rsp = assoc.send_c_store(p)
            status = getattr(rsp, "Status", None)
            statuses.append(int(status) if status is not None else None)
    finally:
        assoc.release()
    return statuses


def echo(dest: Destination, calling_ae: str = "MODALITY") -> int | None:
    """C-ECHO; the status or None when no association."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        status = getattr(rsp, "Status", None)
        return int(status) if status is not None else None
    finally:
        assoc.release()
