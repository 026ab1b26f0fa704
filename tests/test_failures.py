"""Failures made visible and bounded, on real associations, files, SQLite and TorchScript:
classification retried then failed with its reason, /health degraded, `requeue`; a model that
does not load or dry-run falls back to the last good one; an unreadable stored SR is
dead-lettered; the worker holds one instance at a time; the health server drops idle and
half-sent requests."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select
from torch import nn

from model.calibration import decide, effective_threshold
from model.classifier import Classifier, StudyClassification
from model.export import ModelFileError, ModelMetadata, export_torchscript, load_torchscript
from model.phantom_dicom import DicomLayout, study_datasets, write_study
from model.phantoms import generate_study
from node.__main__ import main
from node.classify.sr import DeviceInfo
from node.classify.worker import WorkerContext, is_permanent, run_once
from node.config import load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.dicom.pixels import DecodeError
from node.dicom.views import extract_views
from node.export.scu import Destination, send_file
from node.runtime import trim_memory
from node.service.health import HealthServer, Report
from node.service.models import ModelHolder
from node.service.node import Node
from node.service.startup import prepare_classifier_process
from storage.db import CompletionReason, Database, Job, Result
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance
from storage.jobs import (
    NewResult,
    claim_job,
    failed_studies,
    finish_job,
    jobs_retrying,
    requeue_studies,
    retry_job,
    store_result,
)
from storage.registry import NewModel, promote, register_model
from tests.support.net import free_port
from tests.support.nodeproc import REPO, write_config
from tests.support.nodes import CALLER, dest, node_config, study_row, wait_sr, wait_study
from tests.support.wait import wait_for

RETRY: dict[str, object] = {"classify_max_attempts": 3, "classify_backoff_seconds": 0.2,
         "classify_backoff_cap_seconds": 0.5}


# --- helpers -------------------------------------------------------------------------------


def _study_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _stored(node: Node, study_uid: str) -> list[Path]:
    """The study's instance files in the node's store."""
    return sorted((node.cfg.storage_root / "studies" / study_uid).rglob("*.dcm"))


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        rsp = conn.getresponse()
        return rsp.status, rsp.read().decode()
    finally:
        conn.close()


def _job_rows(db: Database, study_uid: str) -> list[Job]:
    """The study's classify jobs (not the objects job that builds its image and PDF)."""
    with db.read_session() as s:
        return list(s.execute(select(Job).where(Job.study_uid == study_uid,
                                                Job.kind == "classify")
                              .order_by(Job.id)).scalars())


def _config_for(root: Path, tmp_path: Path) -> Path:
    """A config.toml for the CLI, naming the node's storage (and so its database)."""
    return write_config(tmp_path / "cli.toml", {"storage": {"root": str(root)}})


def _requeue(root: Path, tmp_path: Path, *args: str) -> int:
    """`python -m node requeue ...` against the node's database."""
    return main(["requeue", "--config", str(_config_for(root, tmp_path)), *args])


class Raises(nn.Module):
    """A module whose forward always raises RuntimeError."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.numel() >= 0):
            raise RuntimeError("forward refused by the test model")
        return x


def _raising_model(path: Path, version: str = "raises-1") -> Path:
    """A real TorchScript file with the node's metadata whose forward raises RuntimeError:
    it loads and verifies, and fails the dry run."""
    meta = ModelMetadata(version=version, weights_sha256="", training_data="none (raises)",
                         trained_on_phantoms=True)
    return export_torchscript(Raises(), path, meta)


def _truncated(src: Path, dest_path: Path) -> Path:
    data = src.read_bytes()
    dest_path.write_bytes(data[: len(data) // 2])
    return dest_path


def _register_and_promote(db: Database, root: Path, src: Path, version: str) -> None:
    try:
        sha = load_torchscript(src)[1].weights_sha256
    except ModelFileError:  # a truncated file: the registry takes it, loading will not
        sha = "0" * 64
    register_model(db, root, src, NewModel(version=version, weights_sha256=sha,
                                           data_description="test", metrics={}))
    promote(db, version)


# --- 1. retried, then failed with the reason; visible; re-queued ---------------------------


def test_unreadable_instance_is_retried_then_failed_visible_and_requeued(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn,
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """The default topology (receiver in its own process): the stored anterior file vanishes
    after its Success; the study is retried with backoff, then failed with the reason;
    /health, /metrics and `status` say so; `requeue --study` after the file is back classifies
    it."""
    caplog.set_level(logging.INFO)
    health_port = free_port()
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      node={"receiver_process": True, **RETRY},
                      completion={"quiet_seconds": 600.0}, health={"port": health_port})
    ant, post = write_study(generate_study("normal", seed=41), tmp_path / "s",
                            DicomLayout.PER_VIEW)
    uid = _study_uid(ant)
    with Node(cfg) as n:
        idle = socket.create_connection(("127.0.0.1", health_port))  # says nothing at all
        assert send_paths([ant], dest(n), CALLER) == [0]
        stored, = _stored(n, uid)
        aside = stored.with_suffix(".aside")
        stored.rename(aside)
        assert send_paths([post], dest(n), CALLER) == [0]
        wait_study(n.db, uid, "failed after its retries", state="failed", timeout=30)

        job, = _job_rows(n.db, uid)
        assert job.state == "failed" and job.attempts == 3
        assert job.error is not None and job.error.startswith("FileNotFoundError")
        assert str(stored) not in job.error  # redacted: quoted values blanked
        retries = [r.getMessage() for r in caplog.records
                   if "classification of study" in r.getMessage() and "retry in" in r.getMessage()]
        assert len(retries) == 2 and "attempt 1 of 3" in retries[0]
        failed, = failed_studies(n.db)
        assert failed.study_uid == uid and failed.attempts == 3

        code, body = _get(health_port, "/health")
        report = json.loads(body)
        assert code == 503 and report["status"] == "degraded"
        assert report["work"]["failed_studies"] == 1
        assert report["work"]["failed"][0]["study_uid"] == uid
        problem, = [p for p in report["problems"] if "failed classification" in p]
        assert problem.startswith("1 study(ies)") and uid in problem
        assert "FileNotFoundError" in problem and "requeue" in problem
        code, metrics = _get(health_port, "/metrics")
        assert code == 200 and "dscint_failed_studies 1\n" in metrics
        assert "dscint_classify_retrying 0\n" in metrics
        capsys.readouterr()
        assert main(["status", "--config", str(_config_for(n.cfg.storage_root, tmp_path))]) == 0
        status = " ".join(capsys.readouterr().out.split())  # rich wraps at spaces
        assert "health: degraded" in status and "1 study(ies) failed classification" in status
        assert "FileNotFoundError" in status

        aside.rename(stored)  # the cause is fixed
        assert _requeue(n.cfg.storage_root, tmp_path, "--study", uid) == 0
        row = wait_study(n.db, uid, "classified after requeue", state="classified")
        assert row.predicted_class is not None
        wait_sr(pacs, uid)
        jobs = _job_rows(n.db, uid)
        assert [j.state for j in jobs] == ["failed", "done"] and jobs[1].attempts == 1
        wait_for(lambda: _get(health_port, "/health")[0] == 200, 10, "/health ok again")
        # the silent client was dropped by the health server's socket timeout meanwhile
        idle.settimeout(10)
        assert idle.recv(1) == b""
        idle.close()


def test_study_that_cannot_improve_fails_at_once(tmp_path: Path, untrained_model: Path,
                                                 pacs: PacsStandIn) -> None:
    """A stored file that is garbage (not DICOM) fails the study on the first attempt, with
    the reason; `requeue --failed` re-queues it (and fails again while it is garbage)."""
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port, node=RETRY,
                      completion={"quiet_seconds": 600.0})
    ant, post = write_study(generate_study("normal", seed=42), tmp_path / "s",
                            DicomLayout.PER_VIEW)
    uid = _study_uid(ant)
    with Node(cfg) as n:
        assert send_paths([ant], dest(n), CALLER) == [0]
        stored, = _stored(n, uid)
        stored.write_bytes(b"garbage, not DICOM " * 20)
        assert send_paths([post], dest(n), CALLER) == [0]
        wait_study(n.db, uid, "failed", state="failed")
        job, = _job_rows(n.db, uid)
        assert job.attempts == 1 and (job.error or "").startswith("InvalidDicomError")
        assert _requeue(n.cfg.storage_root, tmp_path, "--failed") == 0
        wait_for(lambda: len(_job_rows(n.db, uid)) == 2
                 and _job_rows(n.db, uid)[1].state == "failed", 20, "the second job to fail")
        assert _requeue(n.cfg.storage_root, tmp_path, "--study", "1.2.3.4.5") == 1


def test_errors_that_may_pass_are_retried_and_data_errors_are_not() -> None:
    for transient in (FileNotFoundError(2, "gone"), IsADirectoryError(21, "dir"),
                      PermissionError(13, "no"), RuntimeError("torch"), MemoryError()):
        assert not is_permanent(transient), transient
    for permanent in (DecodeError("cannot decode"), ValueError("no views"),
                      UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")):
        assert is_permanent(permanent), permanent


# --- 3. model load errors: fall back to the last good model --------------------------------


def test_start_up_falls_back_from_a_registry_model_that_does_not_dry_run(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "node"
    cfg = node_config(root, untrained_model, pacs.port)
    db = Database(cfg.database_url)
    db.create_all()
    raising = _raising_model(tmp_path / "in" / "raises.pt")
    _register_and_promote(db, root, raising, "raises-1")
    with caplog.at_level(logging.ERROR, logger="node.service.models"):
        holder = ModelHolder(db, untrained_model, root)
    assert holder.version is None  # [model].path serves
    assert holder.current().metadata.version == "test-0"
    line, = [r.getMessage() for r in caplog.records if "raises-1" in r.getMessage()]
    assert "raises-1.pt" in line and "forward refused by the test model" in line
    assert "RuntimeError" in line and "serving [model].path" in line
    assert not holder.refresh()  # the failed version is not retried every check
    db.dispose()


def test_start_up_without_any_loadable_model_refuses(tmp_path: Path) -> None:
    """`python -m node serve` with a model whose dry run raises: exit code 2 and a message
    naming the file and the reason; a truncated file is refused the same way."""
    raising = _raising_model(tmp_path / "raises.pt")
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0, "receiver_process": False},
        "storage": {"root": str(tmp_path / "node")}, "model": {"path": str(raising)}}
    cfg = write_config(tmp_path / "config.toml", sections)
    done = subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot start: model" in done.stderr and "raises.pt" in done.stderr
    assert "forward refused by the test model" in done.stderr

    truncated = _truncated(raising, tmp_path / "truncated.pt")
    in_process = node_config(tmp_path / "node2", truncated, 104)
    with pytest.raises(ModelFileError, match=r"truncated\.pt"):
        Node(in_process)


def test_hot_swap_to_a_broken_model_keeps_the_last_good_one(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port)
    with Node(cfg, model_check_seconds=3600.0) as n:
        raising = _raising_model(tmp_path / "in" / "raises.pt", version="raises-2")
        _register_and_promote(n.db, cfg.storage_root, raising, "raises-2")
        truncated = _truncated(untrained_model, tmp_path / "in" / "cut.pt")
        with caplog.at_level(logging.ERROR, logger="node.service.models"):
            assert not n.refresh_model()
            _register_and_promote(n.db, cfg.storage_root, truncated, "cut-1")
            assert not n.refresh_model()
        lines = [r.getMessage() for r in caplog.records if "cannot serve model" in r.getMessage()]
        assert len(lines) == 2
        assert "raises-2.pt" in lines[0] and "forward refused by the test model" in lines[0]
        assert "cut-1.pt" in lines[1] and "keeping test-0" in lines[1]
        assert n.model_version is None and n.classifier.metadata.version == "test-0"
        paths = write_study(generate_study("normal", seed=43), tmp_path / "s",
                            DicomLayout.MULTIFRAME)
        assert send_paths(paths, dest(n), CALLER) == [0]
        wait_study(n.db, _study_uid(paths[0]), "classified by the last good model",
                   state="classified")


# --- 4. an unreadable stored SR is dead-lettered at once -----------------------------------


def test_unreadable_stored_sr_is_dead_lettered_with_the_reason(tmp_path: Path,
                                                               untrained_model: Path) -> None:
    down = PacsStandIn(ae_title="TEST_PACS")
    port = down.start()
    down.stop()  # PACS down: the export is retried, the SR file stays on disk meanwhile
    cfg = node_config(tmp_path / "node", untrained_model, port,
                      export={"max_attempts": 50, "backoff_base_seconds": 0.2,
                              "backoff_cap_seconds": 0.4})
    with Node(cfg) as n:
        paths = write_study(generate_study("normal", seed=44), tmp_path / "s",
                            DicomLayout.MULTIFRAME)
        assert send_paths(paths, dest(n), CALLER) == [0]
        uid = _study_uid(paths[0])
        wait_study(n.db, uid, "a failed export attempt", min_export_attempts=1)
        with n.db.read_session() as s:
            sr_path = Path(s.execute(select(Result.sr_path).where(Result.study_uid == uid))
                           .scalar_one())
        sr_path.write_bytes(b"\x00" * 100)  # the stored SR is garbage now
        back = PacsStandIn(ae_title="TEST_PACS", port=port)
        back.start()
        try:
            row = wait_study(n.db, uid, "the export dead-lettered", export_state="dead")
            assert row.last_error is not None
            assert row.last_error.startswith(f"cannot read stored SR {sr_path.name}")
            assert len(back.srs) == 0  # the result image and the PDF go on their own
        finally:
            back.stop()


@pytest.mark.parametrize("damage", ["missing", "directory", "truncated", "garbage"])
def test_send_file_answers_an_unreadable_sr_as_permanent(tmp_path: Path, pacs: PacsStandIn,
                                                         damage: str) -> None:
    sr = tmp_path / "sr.dcm"
    _tiny_sr().save_as(sr, enforce_file_format=True)
    if damage == "missing":
        sr.unlink()
    elif damage == "directory":
        sr.unlink()
        sr.mkdir()
    elif damage == "truncated":
        sr.write_bytes(sr.read_bytes()[:150])
    else:
        sr.write_bytes(b"\xff" * 300)
    outcome = send_file(sr, Destination("TEST_PACS", "127.0.0.1", pacs.port), "DSCINT", 5.0)
    assert not outcome.acknowledged and outcome.permanent
    assert outcome.error.startswith("cannot read stored SR sr.dcm")
    assert str(tmp_path) not in outcome.error
    assert pacs.received == []


def test_sr_gone_between_reading_and_sending_is_permanent(tmp_path: Path) -> None:
    """PACS removes the file while the association is being negotiated (its A-ASSOCIATE-RQ
    handler runs before it answers): the C-STORE is never sent, and that will not improve."""
    sr = tmp_path / "sr.dcm"
    _tiny_sr().save_as(sr, enforce_file_format=True)
    ae = AE(ae_title="TEST_PACS")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_REQUESTED, lambda _e: sr.unlink()),
                                           (evt.EVT_C_STORE, lambda _e: 0x0000)])
    assert server is not None
    try:
        answered: list[object] = []
        outcome = send_file(sr, Destination("TEST_PACS", "127.0.0.1",
                                            int(server.server_address[1])),
                            "DSCINT", 5.0, on_answer=answered.append)
    finally:
        server.shutdown()
    assert answered == [outcome]
    assert outcome.permanent and outcome.error.startswith("C-STORE not sent: FileNotFoundError")


def _tiny_sr() -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


# --- 5. the worker holds one instance at a time, with the same results ----------------------


def test_instance_by_instance_gives_classify_study_results(untrained_model: Path) -> None:
    clf = Classifier(untrained_model)
    rng = np.random.default_rng(7)

    def img() -> np.ndarray:
        return rng.poisson(4, (1024, 256)).astype(np.float32)

    cases = [
        [[("anterior", img())]],  # a lone view: its mirror stands in
        [[("posterior", img())], [("posterior", img())]],  # posterior only: anterior mirrored
        [[("unknown", img())]],
        [[("unknown", img())], [("unknown", img())]],  # no stand-in
        [[("anterior", img())], [("posterior", img())]],  # per-view instances
        [[("anterior", img()), ("posterior", img())], [("anterior", img()),
                                                       ("posterior", img())]],
    ]
    for instances in cases:
        study = StudyClassification(clf)
        for views in instances:
            study.add(views)
        got = study.result()
        want = clf.classify_study([v for views in instances for v in views])
        assert [(v.view, v.mirrored_from) for v in got.views] == \
            [(v.view, v.mirrored_from) for v in want.views]
        assert got.predicted_class == want.predicted_class
        for name, p in want.probabilities.items():
            assert got.probabilities[name] == pytest.approx(p, abs=1e-5)
    with pytest.raises(ValueError):
        StudyClassification(clf).result()


def test_node_results_equal_classify_study_on_all_views(tmp_path: Path, untrained_model: Path,
                                                        pacs: PacsStandIn) -> None:
    """Through a node: a two-instance study and an anterior-only one (mirrored stand-in)."""
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port)
    with Node(cfg) as n:
        both = write_study(generate_study("bone_metastasis", seed=45), tmp_path / "a",
                           DicomLayout.PER_VIEW)
        lone = write_study(generate_study("arthritis", seed=46), tmp_path / "b",
                           DicomLayout.PER_VIEW)[:1]
        for paths in (both, lone):
            assert send_paths(paths, dest(n), CALLER) == [0] * len(paths)
        for paths in (both, lone):
            uid = _study_uid(paths[0])
            wait_study(n.db, uid, "classified", state="classified")
            with n.db.read_session() as s:
                result = s.execute(select(Result).where(Result.study_uid == uid)).scalar_one()
            views = [(v.view.value, v.pixels) for p in paths for v in extract_views(dcmread(p))]
            want = n.classifier.classify_study(views)
            got = json.loads(result.probabilities)
            threshold = effective_threshold(n.classifier.metadata.indeterminate_below)
            assert result.predicted_class == decide(want.probabilities, threshold)
            assert set(json.loads(result.per_view)) == {v.label for v in want.views}
            for name, p in want.probabilities.items():
                assert got[name] == pytest.approx(p, abs=1e-5)


BIG_SIDE = 2048  # 4 frames of 2048 x 2048: 64 MiB decoded (float32) per instance
BIG_FRAMES = 4
MANY = 5


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> float:
    """Free what can be freed, reset VmHWM to the current RSS (Linux clear_refs 5); the RSS."""
    gc.collect()
    trim_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def _big_study(db: Database, files: FileStore, n_instances: int, seed: int) -> list[Path]:
    """A complete study of instances that each decode to four 2048 x 2048 frames, stored
    deflated (a few KiB each on disk), recorded as the receiver would."""
    base, = study_datasets(generate_study("normal", seed=seed), DicomLayout.MULTIFRAME)
    study_uid, series_uid = generate_uid(), generate_uid()
    pattern = (np.arange(BIG_FRAMES * BIG_SIDE * BIG_SIDE, dtype=np.uint32) % 251)
    pixels = pattern.astype(np.uint16).reshape(BIG_FRAMES, BIG_SIDE, BIG_SIDE).tobytes()
    del pattern
    paths = []
    for _ in range(n_instances):
        ds = base.copy()
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.Rows = ds.Columns = BIG_SIDE
        ds.NumberOfFrames = BIG_FRAMES
        ds.DetectorVector = [1, 2] * (BIG_FRAMES // 2)
        ds.EnergyWindowVector = [1] * BIG_FRAMES
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = pixels
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        path = files.write_instance(study_uid, series_uid, sop, data)
        record_instance(db, InstanceRecord(
            sop_uid=sop, study_uid=study_uid, series_uid=series_uid,
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=DeflatedExplicitVRLittleEndian,
            path=str(path), views=("anterior", "posterior"), n_frames=BIG_FRAMES,
            size_bytes=len(data), calling_ae="CAM", patient_key=None))
        paths.append(path)
    assert mark_complete(db, study_uid, CompletionReason.BOTH_VIEWS)
    return paths


def measure_worker_peaks(root: Path, model: Path) -> dict[str, float]:
    """Run in a subprocess of its own: the worker's peak memory growth (MiB) on a one-instance
    study and on a MANY-instance one, and, for contrast, decoding all of the latter's views
    at once as the worker did before."""
    prepare_classifier_process(load_config(None))  # as `python -m node serve` does
    db = Database(f"sqlite:///{root / 'db.sqlite'}")
    db.create_all()
    files = FileStore(root / "store")
    _big_study(db, files, 1, seed=1)  # warm-up: torch's first big input plans its buffers
    _big_study(db, files, 1, seed=2)
    many = _big_study(db, files, MANY, seed=3)
    clf = Classifier(model)
    ctx = WorkerContext(db=db, files=files, classifier=lambda: clf,
                        device=DeviceInfo("DSCINT", "0", generate_uid()),
                        destination="PACS@127.0.0.1:104", on_result=lambda: None)
    peaks = {"decoded_instance_mib": BIG_FRAMES * BIG_SIDE * BIG_SIDE * 4 / 2**20}
    for name in ("warm_up", "one", "many"):
        rss = _reset_peak()
        assert run_once(ctx, "probe:w0")
        peaks[name] = _vm("VmHWM") - rss
    rss = _reset_peak()
    views = [(v.view.value, v.pixels) for p in many for v in extract_views(dcmread(p))]
    clf.classify_study(views)
    peaks["all_at_once"] = _vm("VmHWM") - rss
    with db.read_session() as s:
        peaks["classified"] = len(s.execute(select(Result.id)).all())
    db.dispose()
    return peaks


def test_worker_memory_is_bounded_by_one_instance(tmp_path: Path, untrained_model: Path) -> None:
    script = ("import json, sys; from pathlib import Path; "
              "from tests.test_failures import measure_worker_peaks; "
              "print(json.dumps(measure_worker_peaks(Path(sys.argv[1]), Path(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(untrained_model)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    print(peaks)
    instance = peaks["decoded_instance_mib"]
    assert peaks["classified"] == 3
    assert peaks["one"] > instance / 2  # the measure sees an instance being decoded
    assert peaks["many"] < peaks["one"] + instance / 2  # five instances: still one's worth
    assert peaks["all_at_once"] > peaks["many"] + 2 * instance  # what the worker held before


# --- 6. the health server drops idle and half-sent requests ---------------------------------


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    def report() -> Report:
        return {"status": "ok", "problems": []}

    server = HealthServer("127.0.0.1", 0, report, timeout=1.0, deadline=2.5,
                          max_connections=2).start()
    yield server
    server.stop()


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closed `sock` (recv gives end of input), at most `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(1024):
        pass
    return time.monotonic() - start


def test_idle_and_half_sent_requests_time_out(health_server: HealthServer) -> None:
    port = health_server.port
    with socket.create_connection(("127.0.0.1", port)) as idle, \
            socket.create_connection(("127.0.0.1", port)) as half:
        half.sendall(b"GET /hea")
        assert 0.5 < _closed_after(idle, 5.0) < 2.0
        assert _closed_after(half, 5.0) < 2.0
    assert _get(port, "/live")[0] == 200


def test_trickling_request_is_cut_at_the_deadline(health_server: HealthServer) -> None:
    """One byte every 0.3 s never trips the 1 s read timeout; the 2.5 s deadline ends it."""
    start = time.monotonic()
    closed = None
    with socket.create_connection(("127.0.0.1", health_server.port)) as slow:
        for byte in b"GET /health HTTP/1.0\r\nX-Slow: " + b"a" * 40:
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # reset: the server closed it
                closed = time.monotonic() - start
                break
            time.sleep(0.3)
        if closed is None:
            closed = time.monotonic() - start + _closed_after(slow, 5.0)
    assert 2.0 < closed < 4.5


def test_connections_beyond_the_bound_are_closed_unanswered(
        health_server: HealthServer) -> None:
    port = health_server.port
    threads_before = len(_threads())
    with socket.create_connection(("127.0.0.1", port)) as a, \
            socket.create_connection(("127.0.0.1", port)) as b:
        wait_for(lambda: len(_threads()) == threads_before + 2, 5, "two handler threads")
        with socket.create_connection(("127.0.0.1", port)) as extra:
            assert _closed_after(extra, 5.0) < 0.5  # closed at once, not at the timeout
        assert len(_threads()) == threads_before + 2
        _closed_after(a, 5.0)
        _closed_after(b, 5.0)
    assert _get(port, "/health")[0] == 200


def _threads() -> list[str]:
    """The health server's connection threads now."""
    return [t.name for t in threading.enumerate() if "process_request_thread" in t.name]


def test_requeue_needs_a_target(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["requeue", "--config", str(tmp_path / "none.toml")])
    root = tmp_path / "empty"
    assert _requeue(root, tmp_path, "--failed") == 0


# --- 1. the queue: retry time honoured, re-queue, the reasons -------------------------------


T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _complete_study(db: Database, n: int) -> str:
    uid = f"1.2.826.0.1.{n}"
    record_instance(db, InstanceRecord(
        sop_uid=f"{uid}.1", study_uid=uid, series_uid=f"{uid}.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/nowhere/{uid}.dcm", views=("anterior", "posterior"), n_frames=2,
        size_bytes=1, calling_ae="CAM", patient_key=None), now=T0)
    assert mark_complete(db, uid, CompletionReason.BOTH_VIEWS, now=T0)
    return uid


def test_retry_time_is_honoured_and_requeue_makes_it_due(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.create_all()
    first, second = _complete_study(db, 1), _complete_study(db, 2)
    job = claim_job(db, "w0", now=T0)
    assert job is not None and job.study_uid == first
    retry_job(db, job.job_id, "OSError: not now", T0 + timedelta(seconds=60), now=T0)
    assert jobs_retrying(db) == 1
    assert study_row(db, first).state == "complete"  # type: ignore[union-attr]
    other = claim_job(db, "w0", now=T0 + timedelta(seconds=1))  # the waiting one is skipped
    assert other is not None and other.study_uid == second
    assert claim_job(db, "w0", now=T0 + timedelta(seconds=59)) is None
    assert requeue_studies(db, first, now=T0 + timedelta(seconds=10)) == [first]  # due now
    again = claim_job(db, "w0", now=T0 + timedelta(seconds=10))
    assert again is not None and again.job_id == job.job_id and again.attempts == 2
    with pytest.raises(LookupError):
        retry_job(db, 999, "x", T0)
    finish_job(db, again.job_id, ok=False, error="OSError: still not", now=T0)
    failed, = failed_studies(db)
    assert (failed.study_uid, failed.reason, failed.attempts) == (first, "OSError: still not", 2)
    assert requeue_studies(db, "1.2.3.404") == []
    assert requeue_studies(db) == [first]
    assert requeue_studies(db) == []  # it has its pending job already
    fresh = claim_job(db, "w0")
    assert fresh is not None and fresh.study_uid == first and fresh.attempts == 1
    store_result(db, NewResult(study_uid=first, job_id=fresh.job_id, model_version="t",
                               model_sha256="0" * 64, predicted_class="normal",
                               probabilities={"normal": 1.0}, per_view={},
                               sr_sop_uid="1.2.826.0.9", sr_series_uid="1.2.826.0.8",
                               sr_path="/nowhere/sr.dcm"), "PACS@127.0.0.1:104")
    assert study_row(db, first).state == "classified"  # type: ignore[union-attr]
    assert failed_studies(db) == []
    db.dispose()
