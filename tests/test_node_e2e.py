"""The product path on real associations: modality -> node -> SQLite -> Dscint -> SR -> PACS."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from model.classes import CLASS_NAMES, DscintClass
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.classify.sr import read_result
from node.config import Config, load_config, with_overrides
from node.demo.modality import echo, send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.node import Node
from storage.db import Job
from storage.queue import queue_depth, study_summaries

CALLER = "TEST_CAMERA"


def node_config(root: Path, model: Path, pacs_port: int, **overrides: dict[str, object]
                ) -> Config:
    """A node on a port the OS picks, storing under root, sending to a local PACS. It receives
    in threads of the test's process, so caplog sees the handlers' log lines; the receiver
    process has its own tests (test_receiver_process.py) and the interop tests use it."""
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0, "receiver_process": False},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root)}, "model": {"path": str(model)},
        "completion": {"quiet_seconds": 1.0, "sweep_seconds": 0.2},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 1.0, "max_attempts": 3},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return with_overrides(load_config(None), **sections)


@pytest.fixture
def node(tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> Iterator[Node]:
    with Node(node_config(tmp_path / "node", untrained_model, pacs.port)) as n:
        yield n


def _dest(node: Node) -> Destination:
    return Destination(node.cfg.node.ae_title, "127.0.0.1", node.port)


def _sr_for(pacs: PacsStandIn, study_uid: str, timeout: float = 30.0) -> Dataset:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pacs.by_study().get(study_uid)
        if got:
            return got[0].dataset
        time.sleep(0.05)
    raise AssertionError(f"no SR for study {study_uid} within {timeout} s")


def _referenced_frames(sr: Dataset) -> set[tuple[str, int | None]]:
    """(SOP Instance UID, frame) pairs referenced anywhere in the SR content tree."""
    found: set[tuple[str, int | None]] = set()

    def walk(items: object) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            for ref in item.get("ReferencedSOPSequence", []):
                elem = ref.get("ReferencedFrameNumber")
                if elem is None:
                    found.add((str(ref.ReferencedSOPInstanceUID), None))
                    continue
                frames = elem if isinstance(elem, MultiValue | list) else [elem]
                for f in frames:
                    found.add((str(ref.ReferencedSOPInstanceUID), int(f)))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_echo(node: Node) -> None:
    assert echo(_dest(node), CALLER) == 0x0000


@pytest.mark.parametrize("layout", list(DicomLayout))
def test_phantom_study_round_trip(tmp_path: Path, node: Node, pacs: PacsStandIn,
                                  layout: DicomLayout) -> None:
    study = generate_study("bone_metastasis", seed=123)
    paths = write_study(study, tmp_path / "out", layout)
    assert send_paths(paths, _dest(node), CALLER) == [0] * len(paths)
    sources = [dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(sources[0].StudyInstanceUID)
    sr = _sr_for(pacs, study_uid)
    # same patient and study, own series
    assert sr.StudyInstanceUID == study_uid
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    Comprehensive3DSR.from_dataset(sr)  # highdicom parses it back
    predicted, probs = read_result(sr)
    assert predicted in CLASS_NAMES and set(probs) == set(CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
    refs = _referenced_frames(sr)
    if layout is DicomLayout.MULTIFRAME:
        assert {(str(sources[0].SOPInstanceUID), 1), (str(sources[0].SOPInstanceUID), 2)} <= refs
    else:
        assert {str(s.SOPInstanceUID) for s in sources} <= {uid for uid, _ in refs}
    # the finding code is the predicted class's SNOMED code
    assert DscintClass.by_name(predicted).value.code_value in sr.to_json()
    summary = {s.study_uid: s for s in study_summaries(node.db)}[study_uid]
    assert summary.state == "classified" and summary.export_state == "done"
    assert summary.completion_reason == "both_views"


def test_real_ge_files_accepted_and_classified(tmp_path: Path, untrained_model: Path,
                                               pacs: PacsStandIn, realdata: Path) -> None:
    files = sorted(realdata.glob("*.dcm")) + [
        Path(get_testdata_file(n)) for n in ("JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm")]
    assert len(files) == 11
    for i, f in enumerate(files):  # the files share one study: a fresh node (store) for each
        cfg = node_config(tmp_path / f"node{i}", untrained_model, pacs.port,
                          completion={"quiet_seconds": 0.3})
        with Node(cfg) as n:
            assert send_paths([f], _dest(n), CALLER) == [0], f.name
            ds = dcmread(f, stop_before_pixels=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                rows = {s.study_uid: s for s in study_summaries(n.db)}
                row = rows.get(str(ds.StudyInstanceUID))
                if row and row.export_state == "done":
                    break
                time.sleep(0.05)
            assert row is not None and row.state == "classified", f.name
            assert row.completion_reason == "quiet" and row.export_state == "done", f.name
    assert len(pacs.received) == 11


def test_restart_mid_study_loses_nothing(tmp_path: Path, untrained_model: Path,
                                         pacs: PacsStandIn) -> None:
    study = generate_study("arthritis", seed=5)
    ant, post = write_study(study, tmp_path / "out", DicomLayout.PER_VIEW)
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      completion={"quiet_seconds": 600.0})
    with Node(cfg) as n1:
        assert send_paths([ant], _dest(n1), CALLER) == [0]
    with Node(cfg) as n2:  # same storage, new process state
        rows = {s.study_uid: s for s in study_summaries(n2.db)}
        uid = str(dcmread(ant, stop_before_pixels=True).StudyInstanceUID)
        assert rows[uid].instance_count == 1 and rows[uid].state == "receiving"
        assert send_paths([post], _dest(n2), CALLER) == [0]
        sr = _sr_for(pacs, uid)
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (ant, post)} \
            <= {u for u, _ in _referenced_frames(sr)}


def test_late_instance_is_recorded_not_lost(tmp_path: Path, node: Node,
                                            pacs: PacsStandIn) -> None:
    study = generate_study("normal", seed=77)
    paths = write_study(study, tmp_path / "out", DicomLayout.PER_VIEW)
    assert send_paths(paths, _dest(node), CALLER) == [0, 0]
    uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    _sr_for(pacs, uid)
    extra = tmp_path / "extra.dcm"
    ds = dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 9
    ds.save_as(extra)
    assert send_paths([extra], _dest(node), CALLER) == [0]
    row = {s.study_uid: s for s in study_summaries(node.db)}[uid]
    assert row.late_instance_count == 1 and row.instance_count == 3
    assert len(pacs.by_study()[uid]) == 1  # no second SR for a late instance


def test_japanese_character_set_study_gets_its_sr(tmp_path: Path, node: Node,
                                                  pacs: PacsStandIn) -> None:
    """A camera writing Specific Character Set "\\ISO 2022 IR 87" (empty first value) and a
    name in Kanji: admitted, classified, and the SR carries the name (it used to fail the
    study in the SR builder)."""
    path = write_study(generate_study("normal", seed=78), tmp_path / "out",
                       DicomLayout.MULTIFRAME)[0]
    ds = dcmread(path)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.save_as(path)
    assert send_paths([path], _dest(node), CALLER) == [0]
    sr = _sr_for(pacs, str(ds.StudyInstanceUID))
    assert str(sr.PatientName) == "Yamada^Tarou=山田^太郎"
    assert list(sr.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def test_two_workers_never_classify_a_study_twice(tmp_path: Path, untrained_model: Path,
                                                  pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"worker_threads": 3})
    n_studies = 6
    with Node(cfg) as n:
        uids = []
        for i in range(n_studies):
            st = generate_study(CLASS_NAMES[i % 4], seed=300 + i)
            paths = write_study(st, tmp_path / f"s{i}", DicomLayout.MULTIFRAME)
            assert send_paths(paths, _dest(n), CALLER) == [0]
            uids.append(str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID))
        assert pacs.wait_for(n_studies, timeout=60)
        time.sleep(0.5)
        with n.db.session() as s:
            jobs = s.query(Job).all()
        assert len(jobs) == n_studies
        assert all(j.state == "done" and j.attempts == 1 for j in jobs)
    assert sorted(str(r.dataset.StudyInstanceUID) for r in pacs.received) == sorted(uids)


def test_pacs_down_then_back_delivers_exactly_once(tmp_path: Path, untrained_model: Path) -> None:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    port = pacs.start()
    pacs.stop()  # the port is known, nobody listens: PACS is down
    cfg = node_config(tmp_path / "node", untrained_model, port,
                      export={"max_attempts": 50, "backoff_base_seconds": 0.1,
                              "backoff_cap_seconds": 0.3})
    with Node(cfg) as n:
        st = generate_study("thyroid_carcinoma", seed=9)
        paths = write_study(st, tmp_path / "out", DicomLayout.MULTIFRAME)
        assert send_paths(paths, _dest(n), CALLER) == [0]
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            row = {s.study_uid: s for s in study_summaries(n.db)}.get(uid)
            if row and (row.export_attempts or 0) >= 2:
                break
            time.sleep(0.05)
        assert row is not None and row.export_state in {"pending", "sending"} and row.last_error
        back = PacsStandIn(ae_title="TEST_PACS", port=port)
        back.start()
        try:
            _sr_for(back, uid)
            time.sleep(1.0)
            assert len(back.received) == 1
        finally:
            back.stop()


def test_refusing_pacs_dead_letters_and_resend_delivers_once(tmp_path: Path,
                                                             untrained_model: Path) -> None:
    pacs = PacsStandIn(ae_title="TEST_PACS", refuse_status=0xA900)
    pacs.start()
    try:
        cfg = node_config(tmp_path / "node", untrained_model, pacs.port)
        with Node(cfg) as n:
            st = generate_study("normal", seed=11)
            paths = write_study(st, tmp_path / "out", DicomLayout.MULTIFRAME)
            assert send_paths(paths, _dest(n), CALLER) == [0]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and queue_depth(n.db).get("dead_exports", 0) < 1:
                time.sleep(0.05)
            row = study_summaries(n.db)[0]
            assert row.export_state == "dead" and "0xA900" in (row.last_error or "")
            pacs.refuse_status = None
            from storage.queue import requeue_dead_exports
            assert requeue_dead_exports(n.db) == 1
            n._export.set()
            assert pacs.wait_for(1, timeout=20)
            time.sleep(0.5)
            assert len(pacs.received) == 1
    finally:
        pacs.stop()


def test_broken_model_stops_start_up(tmp_path: Path) -> None:
    from model.export import ModelFileError
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"garbage")
    cfg = node_config(tmp_path / "node", bad, 104)
    with pytest.raises(ModelFileError):
        Node(cfg)


def _wait_state(n: Node, uid: str, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = {s.study_uid: s for s in study_summaries(n.db)}.get(uid)
        if row is not None and row.state == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"study {uid} never reached state {state}")


def test_worker_failure_marks_study_failed_and_keeps_going(tmp_path: Path,
                                                           untrained_model: Path,
                                                           pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      completion={"quiet_seconds": 600.0})
    with Node(cfg) as n:
        ant, post = write_study(generate_study("normal", seed=12), tmp_path / "a",
                                DicomLayout.PER_VIEW)
        assert send_paths([ant], _dest(n), CALLER) == [0]
        for f in (cfg.storage_root / "studies").rglob("*.dcm"):
            f.unlink()  # the stored file vanishes after it was acknowledged
        assert send_paths([post], _dest(n), CALLER) == [0]
        uid = str(dcmread(ant, stop_before_pixels=True).StudyInstanceUID)
        _wait_state(n, uid, "failed")
        good = write_study(generate_study("normal", seed=13), tmp_path / "b",
                           DicomLayout.MULTIFRAME)
        assert send_paths(good, _dest(n), CALLER) == [0]
        _wait_state(n, str(dcmread(good[0], stop_before_pixels=True).StudyInstanceUID),
                    "classified")


def test_allowlist_refuses_unknown_caller(tmp_path: Path, untrained_model: Path,
                                          pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"allowed_callers": ["GOOD_CAM@127.0.0.1"]})
    with Node(cfg) as n:
        assert echo(_dest(n), "GOOD_CAM") == 0
        assert echo(_dest(n), "EVIL_CAM") is None


def test_node_keeps_serving_during_concurrent_senders(tmp_path: Path, node: Node,
                                                      pacs: PacsStandIn) -> None:
    results: list[list[int | None]] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        st = generate_study(CLASS_NAMES[i % 4], seed=500 + i)
        paths = write_study(st, tmp_path / f"c{i}", DicomLayout.PER_VIEW)
        r = send_paths(paths, _dest(node), f"CAM{i}")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [0, 0] for r in results)
    assert pacs.wait_for(4, timeout=60)
