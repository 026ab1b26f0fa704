"""The product path on real associations: modality -> node -> queue (SQLite and PostgreSQL)
-> Dscint -> SR -> PACS.

The `node` fixture runs the default two-process topology (the receiver in a process of its
own); tests that start many nodes, or a node per file, receive in threads for speed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from highdicom.sr import Comprehensive3DSR
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from model.calibration import INDETERMINATE, INDETERMINATE_CODE
from model.classes import CLASS_NAMES, DscintClass
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.classify.sr import read_result
from node.demo.modality import echo, send_paths
from node.demo.pacs_standin import PacsStandIn
from node.service.node import Node
from storage.db import Job
from storage.exports import requeue_dead_exports
from storage.reports import queue_depth, study_summaries
from tests.support.nodes import CALLER, dest, node_config, wait_sr, wait_study
from tests.support.wait import wait_for


@pytest.fixture
def node(tmp_path: Path, untrained_model: Path, pacs: PacsStandIn, database_url: str
         ) -> Iterator[Node]:
    """The node as deployed: it receives in a process of its own (the default
    `receiver_process = true`), classifies and exports here; its queue is SQLite or
    PostgreSQL (conftest `database_url`: every test using this fixture runs on both)."""
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"receiver_process": True}, storage={"database": database_url})
    with Node(cfg) as n:
        assert n.receiver_pid is not None
        yield n


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
    assert echo(dest(node), CALLER) == 0x0000


@pytest.mark.parametrize("layout", list(DicomLayout))
def test_phantom_study_round_trip(tmp_path: Path, node: Node, pacs: PacsStandIn,
                                  layout: DicomLayout) -> None:
    study = generate_study("bone_metastasis", seed=123)
    paths = write_study(study, tmp_path / "out", layout)
    assert send_paths(paths, dest(node), CALLER) == [0] * len(paths)
    sources = [dcmread(p, stop_before_pixels=True) for p in paths]
    study_uid = str(sources[0].StudyInstanceUID)
    sr = wait_sr(pacs, study_uid)
    # same patient and study, own series
    assert sr.StudyInstanceUID == study_uid
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    Comprehensive3DSR.from_dataset(sr)  # highdicom parses it back
    predicted, probs = read_result(sr)
    assert predicted in (*CLASS_NAMES, INDETERMINATE) and set(probs) == set(CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
    refs = _referenced_frames(sr)
    if layout is DicomLayout.MULTIFRAME:
        assert {(str(sources[0].SOPInstanceUID), 1), (str(sources[0].SOPInstanceUID), 2)} <= refs
    else:
        assert {str(s.SOPInstanceUID) for s in sources} <= {uid for uid, _ in refs}
    # the finding code is the predicted class's SNOMED code, or "Indeterminate result" (an
    # untrained model is never sure enough for a class)
    code = INDETERMINATE_CODE[0] if predicted == INDETERMINATE else \
        DscintClass.by_name(predicted).value.code_value
    assert code in sr.to_json()
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
            assert send_paths([f], dest(n), CALLER) == [0], f.name
            ds = dcmread(f, stop_before_pixels=True)
            row = wait_study(n.db, str(ds.StudyInstanceUID), f"{f.name} exported",
                             export_state="done")
            assert row.state == "classified", f.name
            assert row.completion_reason == "quiet" and row.export_state == "done", f.name
    assert len(pacs.srs) == 11  # one SR per file (the image and PDF are counted apart)


def test_restart_mid_study_loses_nothing(tmp_path: Path, untrained_model: Path,
                                         pacs: PacsStandIn) -> None:
    study = generate_study("arthritis", seed=5)
    ant, post = write_study(study, tmp_path / "out", DicomLayout.PER_VIEW)
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      completion={"quiet_seconds": 600.0})
    with Node(cfg) as n1:
        assert send_paths([ant], dest(n1), CALLER) == [0]
    with Node(cfg) as n2:  # same storage, new process state
        rows = {s.study_uid: s for s in study_summaries(n2.db)}
        uid = str(dcmread(ant, stop_before_pixels=True).StudyInstanceUID)
        assert rows[uid].instance_count == 1 and rows[uid].state == "receiving"
        assert send_paths([post], dest(n2), CALLER) == [0]
        sr = wait_sr(pacs, uid)
        assert {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (ant, post)} \
            <= {u for u, _ in _referenced_frames(sr)}


def test_late_instance_is_recorded_not_lost(tmp_path: Path, node: Node,
                                            pacs: PacsStandIn) -> None:
    study = generate_study("normal", seed=77)
    paths = write_study(study, tmp_path / "out", DicomLayout.PER_VIEW)
    assert send_paths(paths, dest(node), CALLER) == [0, 0]
    uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    wait_sr(pacs, uid)
    extra = tmp_path / "extra.dcm"
    ds = dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 9
    ds.save_as(extra)
    assert send_paths([extra], dest(node), CALLER) == [0]
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
    assert send_paths([path], dest(node), CALLER) == [0]
    sr = wait_sr(pacs, str(ds.StudyInstanceUID))
    assert str(sr.PatientName) == "Yamada^Tarou=山田^太郎"
    assert list(sr.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def test_two_workers_never_classify_a_study_twice(tmp_path: Path, untrained_model: Path,
                                                  pacs: PacsStandIn, database_url: str) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"worker_threads": 3}, storage={"database": database_url})
    n_studies = 6
    with Node(cfg) as n:
        uids = []
        for i in range(n_studies):
            st = generate_study(CLASS_NAMES[i % 4], seed=300 + i)
            paths = write_study(st, tmp_path / f"s{i}", DicomLayout.MULTIFRAME)
            assert send_paths(paths, dest(n), CALLER) == [0]
            uids.append(str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID))
        assert pacs.wait_for(n_studies, timeout=60)

        def finished_jobs() -> list[Job] | None:
            with n.db.session() as s:
                jobs = s.query(Job).filter(Job.kind == "classify").all()  # not the objects jobs
            return jobs if all(j.state in ("done", "failed") for j in jobs) else None

        jobs = wait_for(finished_jobs, 30, "every classify job to finish")
        assert len(jobs) == n_studies
        assert all(j.state == "done" and j.attempts == 1 for j in jobs)
    assert sorted(str(r.dataset.StudyInstanceUID) for r in pacs.srs) == sorted(uids)


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
        assert send_paths(paths, dest(n), CALLER) == [0]
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        row = wait_study(n.db, uid, "two failed export attempts", timeout=20,
                         min_export_attempts=2)
        assert row.export_state in {"pending", "sending"} and row.last_error
        back = PacsStandIn(ae_title="TEST_PACS", port=port)
        back.start()
        try:
            wait_sr(back, uid)
            wait_study(n.db, uid, "export recorded as done", export_state="done")
            assert len(back.srs) == 1  # and nothing more will be sent: the export is done
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
            assert send_paths(paths, dest(n), CALLER) == [0]
            wait_for(lambda: queue_depth(n.db).get("dead_exports", 0) >= 3, 20,
                     "the refused exports (SR, image, PDF) to be dead-lettered")
            row = study_summaries(n.db)[0]
            assert row.export_state == "dead" and "0xA900" in (row.last_error or "")
            pacs.refuse_status = None
            assert requeue_dead_exports(n.db) == 3
            n._export.set()
            assert pacs.wait_for(3, timeout=20, sop_classes=None)
            wait_study(n.db, row.study_uid, "export recorded as done", export_state="done")
            assert len(pacs.srs) == 1 and len(pacs.received) == 3  # each object once
    finally:
        pacs.stop()


def test_broken_model_stops_start_up(tmp_path: Path) -> None:
    from model.export import ModelFileError
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"garbage")
    cfg = node_config(tmp_path / "node", bad, 104)
    with pytest.raises(ModelFileError):
        Node(cfg)


def test_worker_failure_marks_study_failed_and_keeps_going(tmp_path: Path,
                                                           untrained_model: Path,
                                                           pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      completion={"quiet_seconds": 600.0},
                      node={"classify_max_attempts": 2, "classify_backoff_seconds": 0.1})
    with Node(cfg) as n:
        ant, post = write_study(generate_study("normal", seed=12), tmp_path / "a",
                                DicomLayout.PER_VIEW)
        assert send_paths([ant], dest(n), CALLER) == [0]
        for f in (cfg.storage_root / "studies").rglob("*.dcm"):
            f.unlink()  # the stored file vanishes after it was acknowledged
        assert send_paths([post], dest(n), CALLER) == [0]
        uid = str(dcmread(ant, stop_before_pixels=True).StudyInstanceUID)
        wait_study(n.db, uid, "failed", state="failed")
        with n.db.session() as s:
            job = s.query(Job).filter(Job.study_uid == uid).one()
        assert job.attempts == 2 and (job.error or "").startswith("FileNotFoundError")
        good = write_study(generate_study("normal", seed=13), tmp_path / "b",
                           DicomLayout.MULTIFRAME)
        assert send_paths(good, dest(n), CALLER) == [0]
        wait_study(n.db, str(dcmread(good[0], stop_before_pixels=True).StudyInstanceUID),
                   "classified", state="classified")


def test_allowlist_refuses_unknown_caller(tmp_path: Path, untrained_model: Path,
                                          pacs: PacsStandIn) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"allowed_callers": ["GOOD_CAM@127.0.0.1"]})
    with Node(cfg) as n:
        assert echo(dest(n), "GOOD_CAM") == 0
        assert echo(dest(n), "EVIL_CAM") is None


def test_node_keeps_serving_during_concurrent_senders(tmp_path: Path, node: Node,
                                                      pacs: PacsStandIn) -> None:
    results: list[list[int | None]] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        st = generate_study(CLASS_NAMES[i % 4], seed=500 + i)
        paths = write_study(st, tmp_path / f"c{i}", DicomLayout.PER_VIEW)
        r = send_paths(paths, dest(node), f"CAM{i}")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [0, 0] for r in results)
    assert pacs.wait_for(4, timeout=60)
