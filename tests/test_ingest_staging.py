"""Staging a received file (issue 18): a second name for the bytes pynetdicom wrote as the
PDUs arrived, not a copy; a copy only where no link can be made; staging started beside
the checks never leaves a file behind, whatever the answer; and a native instance is
admitted from its header, its pixels never read."""

from __future__ import annotations

import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import Dataset

from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.dicom.admission import admission_rejection
from node.dicom.pixels import deferred_length, pixel_geometry
from node.dicom.status import Status
from node.receive.handlers import (
    DEFAULT_MAX_INSTANCE_BYTES,
    StoreContext,
    _discard_staged,
    _parse,
    _write_turn,
)
from storage.db import Database, DatabaseBusy
from storage.filestore import FileStore

UID = "1.2.826.0.1.3680043.8.498.1"


def _received(store: FileStore, data: bytes) -> Path:
    """A dataset as pynetdicom leaves it in the receiver's receiving/ folder (mode 0600)."""
    folder = store.receiving_dir("host-1")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tmpabc.dcm"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def test_a_received_file_is_staged_as_a_link_not_a_copy(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    received = _received(store, b"DICM" * 1000)
    staged = store.stage(received)
    assert staged.parent == store.tmp and staged.read_bytes() == b"DICM" * 1000
    assert staged.stat().st_ino == received.stat().st_ino  # the same bytes, not a copy
    assert stat.S_IMODE(staged.stat().st_mode) == 0o640  # as a copy would have been
    received.unlink()  # what pynetdicom does once the handler returns
    published = store.publish(staged, UID, UID + ".1", UID + ".2")
    assert published.read_bytes() == b"DICM" * 1000 and published.stat().st_nlink == 1


def test_a_file_on_another_filesystem_is_copied(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to copy from")
    store = FileStore(tmp_path / "store")
    source = shm / f"dscint-stage-{os.getpid()}.dcm"
    source.write_bytes(b"x" * 5000)
    try:
        staged = store.stage(source)
        assert staged.read_bytes() == b"x" * 5000
        assert staged.stat().st_ino != source.stat().st_ino
        assert stat.S_IMODE(staged.stat().st_mode) == 0o640
    finally:
        source.unlink()


def test_staging_beside_the_checks_leaves_nothing_when_refused_or_failed(tmp_path: Path
                                                                          ) -> None:
    """What _store does after a refusal (or an exception) with the staging it started: the
    staged file goes, the received name stays for pynetdicom; a staging that failed (the
    received file vanished) is logged, never raised."""
    store = FileStore(tmp_path / "store")
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    with ThreadPoolExecutor(max_workers=1) as stager:
        ctx = StoreContext(files=store, db=db, patient_secret=b"t", on_complete=print,
                           stager=stager)
        received = _received(store, b"refused")
        _discard_staged(ctx, stager.submit(store.stage, received))
        assert list(store.tmp.iterdir()) == [] and received.read_bytes() == b"refused"
        _discard_staged(ctx, stager.submit(store.stage, tmp_path / "gone.dcm"))
        assert list(store.tmp.iterdir()) == []
    db.dispose()


def test_a_write_turn_not_had_in_time_is_busy_like_a_locked_database(tmp_path: Path) -> None:
    """The receiver's threads take turns to write to SQLite: a turn not had within
    [node].store_db_wait_seconds is DatabaseBusy (0xA700 for the C-STORE, completion left to
    the quiet sweep), as SQLite's own lock wait running out is; a free turn is taken at once."""
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    ctx = StoreContext(files=FileStore(tmp_path / "store"), db=db, patient_secret=b"t",
                       on_complete=print, write_turn=threading.Lock(), db_wait_seconds=0.2)
    assert ctx.write_turn is not None
    with ctx.write_turn:
        started = time.monotonic()
        with pytest.raises(DatabaseBusy), _write_turn(ctx):
            pass
        assert 0.15 < time.monotonic() - started < 5
    with _write_turn(ctx):
        assert ctx.write_turn.locked()
    assert not ctx.write_turn.locked()
    db.dispose()


# --- header-only parse: a native instance's pixels stay on disk ----------------------------


def _native_instance(tmp_path: Path, pixel_bytes: int | None = None) -> tuple[Path, Dataset]:
    """A two-frame whole-body phantom written as pynetdicom leaves a received file;
    `pixel_bytes` truncates its Pixel Data (a native length error)."""
    ds = study_datasets(generate_study("normal", seed=3), DicomLayout.MULTIFRAME)[0]
    if pixel_bytes is not None:
        ds.PixelData = bytes(ds.PixelData)[:pixel_bytes]
    path = tmp_path / "received.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_a_native_instance_is_admitted_without_reading_its_pixels(tmp_path: Path) -> None:
    path, sent = _native_instance(tmp_path)
    ds = _parse(path, DEFAULT_MAX_INSTANCE_BYTES)
    assert isinstance(ds, Dataset)
    assert deferred_length(ds, "PixelData") == len(sent.PixelData)
    assert admission_rejection(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) is None
    assert pixel_geometry(ds).decoded_bytes > 0  # type: ignore[union-attr]
    # every check ran and the value was never read: still only its length, from the header
    assert deferred_length(ds, "PixelData") == len(sent.PixelData)
    assert bytes(ds.PixelData) == bytes(sent.PixelData)  # read on use, from the file


def test_a_short_native_pixel_data_is_refused_from_its_header(tmp_path: Path) -> None:
    path, _ = _native_instance(tmp_path, pixel_bytes=200_000)
    ds = _parse(path, DEFAULT_MAX_INSTANCE_BYTES)
    assert isinstance(ds, Dataset) and deferred_length(ds, "PixelData") == 200_000
    rejection = admission_rejection(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert rejection is not None and rejection.status == Status.BAD_PIXEL_MODULE
    assert "holds 200000 bytes" in rejection.reason


def test_bytes_received_in_memory_are_parsed_whole(tmp_path: Path) -> None:
    path, _ = _native_instance(tmp_path)
    ds = _parse(path.read_bytes(), DEFAULT_MAX_INSTANCE_BYTES)
    assert isinstance(ds, Dataset) and deferred_length(ds, "PixelData") is None
    assert admission_rejection(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID)) is None
