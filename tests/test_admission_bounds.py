"""The C-STORE path bounded and honest, through real associations to a node in its own process
(the default two-process node): an oversize instance is refused before it is parsed, a deflate
bomb is inflated with a bound, per-study caps hold, the identity rules refuse (never move or
overwrite), and a locked database answers 0xA700 within the configured wait with nothing left
behind. Each refusal: its status, its log line, a quarantined copy, nothing stored, and the
node still answers C-ECHO and stores a valid instance afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from sqlalchemy import text

from node.config import ConfigError, config_from_dict
from node.receive.handlers import (
    StoreContext,
    complete_if_both_views,
    inflated_size,
)
from storage.db import Database, DatabaseBusy, Instance, Study, StudyState
from storage.filestore import FileStore, QuarantineLimits
from storage.intake import InstanceRecord, record_instance
from tests.support import hostile
from tests.support.dicom import ANT_CODE, nm_dataset
from tests.support.net import echo_ok, free_port
from tests.support.nodeproc import NodeProc, export_model, process_tree, rss_mib, write_config
from tests.support.soak import node_sections
from tests.support.wait import wait_for

CALLER = "BOUNDS_CAM"
MIB = 1024 * 1024
CAPS = {"max_instance_mb": 4, "max_study_instances": 3, "max_study_decoded_mb": 6}
DB_WAIT = 2.0  # [node].store_db_wait_seconds of the node under test
BOMB_INFLATED = 512 * MIB  # a ~0.5 MB deflated body
OVERSIZE_FRAMES = 96  # 1024 x 256 x 2 bytes each: 48 MiB encoded
RSS_GROWTH_LIMIT_MIB = 600.0  # both node processes together, 10 hostile associations


@dataclass
class Served:
    """The node process, its storage root and a work folder for the files sent."""

    node: NodeProc
    root: Path
    work: Path
    bomb_body: bytes  # deflated: a header, then Pixel Data of BOMB_INFLATED zero bytes

    @property
    def port(self) -> int:
        return self.node.port

    def log_lines(self, needle: str) -> list[str]:
        """The node's log lines (both processes) containing `needle`."""
        return [line for line in self.node.log_path.read_text(errors="replace").splitlines()
                if needle in line]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One node for the module with small caps and a short database wait; the test process
    stays torch-free (its model is exported by a child process)."""
    tmp = tmp_path_factory.mktemp("bounds")
    model = export_model(tmp / "dscint.pt")
    port = free_port()
    config = write_config(tmp / "config.toml", node_sections(
        tmp / "node", model, port, free_port(), admission=CAPS,
        node={"store_db_wait_seconds": DB_WAIT}))
    node = NodeProc(config, port, tmp / "node.log")
    node.start()
    wait_for(lambda: "listening on" in node.log_path.read_text(errors="replace"), 30,
             "the node to log that it is listening")
    assert len(process_tree(node.pid)) == 2, "the node receives in a process of its own"
    work = tmp / "work"
    work.mkdir()
    try:
        with hostile.raw_sending():  # files are sent as stored: a bomb stays a bomb
            yield Served(node, tmp / "node", work, _bomb_body())
    finally:
        node.stop()


# --- building and sending ------------------------------------------------------------------


def _nm(study: str | None = None, frames: int = 1, patient: bool = True,
        view: Dataset = ANT_CODE) -> Dataset:
    """A whole-body NM instance of one view (1024 x 256, 16-bit: 0.5 MiB a frame)."""
    ds = nm_dataset(frames, [1] * frames, [view], rows=1024, cols=256)
    if study is not None:
        ds.StudyInstanceUID = study
    if not patient:
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            delattr(ds, keyword)
    return ds


def _write(s: Served, ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    path = s.work / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _bomb_body() -> bytes:
    """An NM header, then Pixel Data of BOMB_INFLATED zero bytes, deflated (streamed: the
    inflated body never exists in memory)."""
    header = nm_dataset(1, [1], [ANT_CODE], rows=1024, cols=256)
    del header.PixelData
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, header)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(fp.getvalue()),
             packer.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, BOMB_INFLATED))]
    zeros = bytes(MIB)
    parts += [packer.compress(zeros) for _ in range(BOMB_INFLATED // MIB)]
    return b"".join(parts) + packer.flush()


def _deflated_file(s: Served, body: bytes, name: str) -> tuple[Path, str]:
    """A Part 10 file of its own SOP UID around a deflated body; (path, SOP UID)."""
    meta = nm_dataset(1, rows=8, cols=8).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    path = s.work / f"{name}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + body)
    return path, str(meta.MediaStorageSOPInstanceUID)


def _send(s: Served, path: Path, timeout: float = 120.0) -> int | None:
    """One association, one C-STORE of the file's bytes as stored; the status."""
    meta = read_file_meta_info(path)  # only: a bomb must not go off in the sender
    ae = AE(ae_title=CALLER)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", s.port, ae_title="DSCINT")
    if not assoc.is_established:
        return None
    try:
        status = getattr(assoc.send_c_store(path), "Status", None)
    finally:
        assoc.release()
    return int(status) if status is not None else None


def _store(s: Served, ds: Dataset) -> int | None:
    return _send(s, _write(s, ds))


# --- what the node kept --------------------------------------------------------------------


def _rows(s: Served, table: type[Instance] | type[Study], key: str) -> bool:
    db = Database(f"sqlite:///{s.root / 'dscint.db'}")
    try:
        with db.read_session() as session:
            return session.get(table, key) is not None
    finally:
        db.dispose()


def _files(s: Served, sop: str) -> list[Path]:
    return list((s.root / "studies").rglob(f"{sop}.dcm"))


def _quarantined(s: Served, sop: str) -> list[Path]:
    return sorted((s.root / "quarantine").glob(f"*_{sop}_*"))


def _partials(s: Served) -> list[Path]:
    """Staged copies and received datasets still lying about (none once a C-STORE is
    answered)."""
    return [*(s.root / "tmp").glob("*.partial"), *(s.root / "receiving").glob("*/*")]


def _assert_refused(s: Served, sop: str, status: int | None, expected: int, *words: str
                    ) -> str:
    """The status, one log line with the reason, a quarantined copy, nothing kept; the node
    still serves. The log line."""
    assert status == expected, f"0x{status or 0:04X} instead of 0x{expected:04X}"
    lines = s.log_lines(f"refused SOP {sop} from AE {CALLER} with status 0x{expected:04X}")
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    kinds = sorted(p.name.rsplit("_", 1)[1].split(".", 1)[1] for p in _quarantined(s, sop))
    assert kinds == ["dcm", "reason.txt"]
    assert not _rows(s, Instance, sop) and not _files(s, sop) and not _partials(s)
    _assert_still_serving(s)
    return lines[0]


def _assert_still_serving(s: Served) -> None:
    assert s.node.alive() and echo_ok(s.port)
    assert _store(s, _nm()) == 0


# --- encoded size and deflate ----------------------------------------------------------------


def test_an_oversize_instance_is_refused_before_it_is_parsed(served: Served) -> None:
    ds = _nm(frames=20)  # 10 MiB, the cap is 4
    sop = str(ds.SOPInstanceUID)
    line = _assert_refused(served, sop, _store(served, ds), 0xC015,
                           "[admission].max_instance_mb (4 MiB); not parsed")
    size = re.search(r"encoded size (\d+) bytes is over", line)
    assert size is not None and int(size[1]) > 20 * 1024 * 256 * 2  # pixels and header
    copy = next(p for p in _quarantined(served, sop) if p.suffix == ".dcm")
    kept = QuarantineLimits().max_copy_bytes  # the node's default: only this much was read
    assert copy.stat().st_size == kept and copy.name.endswith("-truncated.dcm")
    assert f"the first {kept} of {size[1]} bytes received are kept" in \
        copy.with_name(copy.name.replace(".dcm", ".reason.txt")).read_text()


def test_a_deflate_bomb_is_refused_with_a_bounded_inflate(served: Served) -> None:
    assert len(served.bomb_body) < MIB  # 0.5 MB inflating to 512 MiB
    path, sop = _deflated_file(served, served.bomb_body, "bomb")
    _assert_refused(served, sop, _send(served, path), 0xC015,
                    f"deflated body inflates to more than {4 * MIB} bytes")


def test_a_truncated_deflated_body_cannot_be_understood(served: Served) -> None:
    path, sop = _deflated_file(served, served.bomb_body[:4096], "cut-bomb")
    _assert_refused(served, sop, _send(served, path), 0xC000, "deflated body is truncated")


def test_a_genuine_deflated_instance_is_inflated_and_stored(served: Served) -> None:
    ds = _nm(frames=2)
    sop = str(ds.SOPInstanceUID)
    path = _write(served, ds, DeflatedExplicitVRLittleEndian)
    assert path.stat().st_size < MIB // 4  # counts compress well
    assert _send(served, path) == 0
    [stored] = _files(served, sop)
    kept = dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian  # as received
    assert kept.PixelData == ds.PixelData and _rows(served, Instance, sop)


def test_inflated_size_counts_in_pieces_up_to_the_limit() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(bytes(5 * MIB + 3)) + packer.flush()
    assert inflated_size(BytesIO(body), 5 * MIB + 3) == 5 * MIB + 3
    assert inflated_size(BytesIO(body), 5 * MIB + 2) is None
    with pytest.raises(zlib.error, match="truncated"):
        inflated_size(BytesIO(body[: len(body) // 2]), 10 * MIB)
    with pytest.raises(zlib.error):
        inflated_size(BytesIO(b"\xff" * 64), 10 * MIB)  # not a deflate stream


@pytest.mark.parametrize("doc, key", [
    ({"admission": {"max_instance_mb": 0}}, "[admission].max_instance_mb"),
    ({"admission": {"max_study_instances": -1}}, "[admission].max_study_instances"),
    ({"admission": {"max_study_decoded_mb": -1}}, "max_study_decoded_mb"),
    ({"node": {"store_db_wait_seconds": 0}}, "[node].store_db_wait_seconds"),
    ({"node": {"store_db_wait_seconds": 60.0}}, "below [node].dimse_timeout"),
])
def test_bounds_that_cannot_work_stop_start_up(doc: dict[str, dict[str, object]], key: str
                                              ) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(doc)


# --- per-study caps --------------------------------------------------------------------------


def test_a_study_holds_at_most_its_instance_cap(served: Served) -> None:
    study = generate_uid()
    first, *others = [_nm(study) for _ in range(3)]
    assert [_store(served, ds) for ds in (first, *others)] == [0, 0, 0]
    fourth = _nm(study)
    _assert_refused(served, str(fourth.SOPInstanceUID), _store(served, fourth), 0xC017,
                    f"study {study} already holds 3 other instance(s)",
                    "[admission].max_study_instances is 3")
    assert _store(served, first) == 0  # a re-send replaces its own place


def test_a_study_decodes_to_at_most_its_decoded_cap(served: Served) -> None:
    study = generate_uid()
    assert _store(served, _nm(study, frames=4)) == 0  # 4 MiB decoded of 6
    over = _nm(study, frames=4)
    _assert_refused(served, str(over.SOPInstanceUID), _store(served, over), 0xC017,
                    f"study {study} would decode to {8 * MIB} bytes",
                    "[admission].max_study_decoded_mb (6 MiB)")
    assert _store(served, _nm(study, frames=2)) == 0  # 6 MiB: at the cap, not over it


# --- identity --------------------------------------------------------------------------------


def test_no_patient_attributes_never_join_a_patients_study(served: Served) -> None:
    study = generate_uid()
    first = _nm(study)
    assert _store(served, first) == 0
    anonymous = _nm(study, patient=False)
    _assert_refused(served, str(anonymous.SOPInstanceUID), _store(served, anonymous), 0xC002,
                    "no patient attributes", f"study {study} already has a patient")
    assert _rows(served, Study, study) and len(_files(served, str(first.SOPInstanceUID))) == 1


def test_no_patient_attributes_never_overwrite_a_stored_sop(served: Served) -> None:
    first = _nm()
    sop = str(first.SOPInstanceUID)
    assert _store(served, first) == 0
    [stored] = _files(served, sop)
    before = stored.read_bytes()
    again = _nm(str(first.StudyInstanceUID), patient=False)
    again.SeriesInstanceUID, again.SOPInstanceUID = first.SeriesInstanceUID, sop
    again.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    again.PixelData = bytes(len(first.PixelData))
    assert _store(served, again) == 0xC002
    assert len(served.log_lines(f"refused SOP {sop} from AE {CALLER} with status 0xC002")) == 1
    assert stored.read_bytes() == before and _rows(served, Instance, sop)
    assert len(_quarantined(served, sop)) == 2 and not _partials(served)
    _assert_still_serving(served)


def test_an_anonymous_study_takes_anonymous_instances(served: Served) -> None:
    study = generate_uid()
    assert [_store(served, _nm(study, patient=False)) for _ in range(2)] == [0, 0]


def test_a_sop_stored_under_another_study_is_refused_not_moved(served: Served) -> None:
    first = _nm()
    sop, study = str(first.SOPInstanceUID), str(first.StudyInstanceUID)
    assert _store(served, first) == 0
    [stored] = _files(served, sop)
    before = stored.read_bytes()
    moved = _nm()  # another study and series, the same SOP Instance UID
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    other = str(moved.StudyInstanceUID)
    status = _store(served, moved)
    assert status == 0xC003
    line, = served.log_lines(f"refused SOP {sop} from AE {CALLER} with status 0xC003")
    assert f"already stored under study {study}; not moved to study {other}" in line
    assert _files(served, sop) == [stored] and stored.read_bytes() == before
    assert not _rows(served, Study, other)  # its row, inserted first, rolled back
    assert not (served.root / "studies" / other).exists()
    assert len(_quarantined(served, sop)) == 2 and not _partials(served)
    _assert_still_serving(served)


# --- a locked database -----------------------------------------------------------------------


@contextlib.contextmanager
def _write_locked(db_file: Path) -> Iterator[None]:
    """Another process's view: a connection holding SQLite's write lock (BEGIN EXCLUSIVE)."""
    con = sqlite3.connect(db_file, isolation_level=None, timeout=60)
    try:
        con.execute("BEGIN EXCLUSIVE")
        yield
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_a_locked_database_answers_out_of_resources_within_the_wait(served: Served) -> None:
    resent = _nm()
    sop_resent = str(resent.SOPInstanceUID)
    assert _store(served, resent) == 0
    [stored] = _files(served, sop_resent)
    before = stored.read_bytes()
    resent.PixelData = bytes(len(resent.PixelData))
    new = _nm()
    sop_new = str(new.SOPInstanceUID)
    with _write_locked(served.root / "dscint.db"):
        t0 = time.monotonic()
        assert _store(served, new) == 0xA700
        waited = time.monotonic() - t0
        assert _store(served, resent) == 0xA700
        assert not _files(served, sop_new) and stored.read_bytes() == before
        assert not _partials(served)
    assert DB_WAIT * 0.9 <= waited < DB_WAIT + 10, waited  # waited, and not 30 s
    for sop in (sop_new, sop_resent):
        line, = served.log_lines(f"refused SOP {sop} from AE {CALLER} with status 0xA700")
        assert "the queue database stayed locked" in line and "nothing kept" in line
        assert not _quarantined(served, sop)  # transient: the camera retries, nothing is wrong
    assert not _rows(served, Instance, sop_new)
    assert _store(served, new) == 0 and len(_files(served, sop_new)) == 1  # the retry
    assert _store(served, resent) == 0 and stored.read_bytes() != before
    _assert_still_serving(served)


def test_record_instance_waits_its_own_lock_wait_and_leaves_the_default(tmp_path: Path
                                                                        ) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.create_all()
    short = db.with_lock_wait(0.3)
    rec = InstanceRecord(sop_uid="1.2.3", study_uid="1.2", series_uid="1.2.4",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                         transfer_syntax_uid=ExplicitVRLittleEndian, path="/x.dcm",
                         views=("anterior",), n_frames=1, size_bytes=1, calling_ae="CAM",
                         patient_key="pk")
    try:
        with _write_locked(tmp_path / "q.db"):
            t0 = time.monotonic()
            with pytest.raises(DatabaseBusy):
                record_instance(short, rec)
            assert 0.25 < time.monotonic() - t0 < 5
        assert record_instance(short, rec).refusal is None
        # one pooled connection serves both: each session sets its own wait
        for database, expected in ((db, 30000), (short, 300), (db, 30000)):
            with database.session() as s, s.begin():
                assert s.execute(text("PRAGMA busy_timeout")).scalar() == expected
    finally:
        db.dispose()


def test_completion_is_left_to_the_sweep_while_the_database_stays_locked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The instance is already stored: a locked database must not turn its Success into a
    failure, nor stall the C-STORE past its wait."""
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.create_all()
    completed: list[str] = []
    ctx = StoreContext(files=FileStore(tmp_path / "store"), db=db.with_lock_wait(0.3),
                       patient_secret=b"test", on_complete=completed.append)
    outcomes = [record_instance(ctx.db, InstanceRecord(
        sop_uid=f"1.2.{i}", study_uid="1.2", series_uid="1.2.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid=ExplicitVRLittleEndian,
        path=f"/{i}.dcm", views=(view,), n_frames=1, size_bytes=1, calling_ae="CAM",
        patient_key="pk")) for i, view in enumerate(("anterior", "posterior"))]
    try:
        with caplog.at_level(logging.WARNING, logger="node.receive.handlers"), \
                _write_locked(tmp_path / "q.db"):
            complete_if_both_views(ctx, "1.2", outcomes[1])
        assert completed == []
        assert any("the quiet sweep completes it" in r.getMessage() for r in caplog.records)
        with db.read_session() as s:
            row = s.get(Study, "1.2")
            assert row is not None and row.state == StudyState.RECEIVING
        complete_if_both_views(ctx, "1.2", outcomes[1])  # unlocked: completes at once
        assert completed == ["1.2"]
    finally:
        db.dispose()


# --- interrupted transfers and leftovers ------------------------------------------------------


SENDER = """
import sys
from pynetdicom import AE, _config
_config.STORE_SEND_CHUNKED_DATASET = True
ae = AE("CUT_CAM")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.1.2.1")
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DSCINT")
assoc.send_c_store(sys.argv[2])
"""


def test_a_transfer_cut_off_midway_leaves_no_file(served: Served) -> None:
    """The sender dies in the middle of a C-STORE: the dataset pynetdicom was writing goes."""
    path = _write(served, _nm(frames=OVERSIZE_FRAMES))
    receiving = served.root / "receiving"
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(served.port), str(path)])
    try:
        partial = wait_for(lambda: next(iter(receiving.glob("*/*")), None), 60,
                           "the receiver to start writing the dataset", interval=0.002)
        sender.send_signal(signal.SIGSTOP)  # mid-transfer: 48 MiB take a while
        assert partial.stat().st_size < path.stat().st_size
    finally:
        sender.kill()
        sender.wait()
    wait_for(lambda: not list(receiving.glob("*/*")), 30, "the partial dataset to be removed")
    assert served.log_lines("association with AE CUT_CAM closed during a C-STORE; its partial "
                            "dataset (")
    _assert_still_serving(served)


def test_leftover_datasets_are_swept(tmp_path: Path) -> None:
    """What a killed receiver left: cleared when a receiver of the same name starts (its
    folder), swept by housekeeping (by age). tests/test_roles.py: receivers sharing a store."""
    files = FileStore(tmp_path)
    mine = files.receiving_dir("host-1")
    old, new = mine / "tmpold.dcm", mine / "tmpnew.dcm"
    for p in (old, new):
        p.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    keep = files.studies / "kept.dcm"
    keep.write_bytes(b"kept")
    assert files.sweep_temp(older_than_seconds=3600) == 1
    assert not old.exists() and new.exists()
    assert files.clear_receiving("host-1") == 1
    assert not list(mine.iterdir()) and keep.read_bytes() == b"kept"


# --- memory under hostile load -----------------------------------------------------------------


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def test_ten_hostile_associations_keep_both_processes_bounded(served: Served) -> None:
    """5 deflate bombs (0.5 MB inflating to 512 MiB) and 5 oversize instances (48 MiB) at once:
    the peak resident memory of the node's two processes together grows by at most
    RSS_GROWTH_LIMIT_MIB."""
    oversize = _write(served, _nm(frames=OVERSIZE_FRAMES))
    bombs = [_deflated_file(served, served.bomb_body, f"bomb-{i}")[0] for i in range(5)]
    pids = process_tree(served.node.pid)
    for pid in pids:
        _reset_peak(pid)
    base = sum(rss_mib(pid) for pid in pids)
    statuses: list[int | None] = []
    lock = threading.Lock()

    def send(path: Path) -> None:
        status = _send(served, path)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(p,)) for p in [*bombs, *[oversize] * 5]]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - t0
    peaks = [rss_mib(pid, "VmHWM") for pid in pids]
    growth = sum(peaks) - base
    print(f"\n10 hostile associations in {elapsed:.1f} s: node processes {pids} peak "
          f"{[round(p) for p in peaks]} MiB, baseline {base:.0f} MiB, growth {growth:.0f} MiB")
    assert statuses == [0xC015] * 10
    assert growth <= RSS_GROWTH_LIMIT_MIB
    assert not _partials(served)
    _assert_still_serving(served)
