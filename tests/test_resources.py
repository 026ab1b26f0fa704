"""Resources and operations: the free-disk watermark, retention housekeeping (with clocks in
the future, never deleting undelivered studies), PACS failure statuses retried or dead-lettered
by class, `python -m node status` / `resend` during an outage, and the health endpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.events import Event

from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.config import Config, StorageSection, load_config
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.housekeeping import housekeeping
from node.service.node import Node
from storage.db import Database, Instance, Purge, Study
from storage.exports import claim_export, export_failed, export_succeeded
from storage.filestore import FileStore
from storage.intake import InstanceRecord, mark_complete, record_instance
from storage.jobs import NewResult, claim_job, finish_job, store_result
from storage.reports import StudySummary, queue_depth, study_summaries
from tests.support.net import free_port
from tests.support.nodeproc import write_config
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[1]
CALLER = "TEST_CAMERA"


def _sections(root: Path, model: Path, pacs_port: int, **overrides: dict[str, object]
              ) -> dict[str, dict[str, object]]:
    """As tests/support/nodes.node_config, as TOML sections (the CLI reads the same file)."""
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0, "receiver_process": False},  # caplog sees the handlers (see there)
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root)}, "model": {"path": str(model)},
        "completion": {"quiet_seconds": 600.0, "sweep_seconds": 0.2},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 0.5,
                   "max_attempts": 50},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return sections


def _config(tmp: Path, model: Path, pacs_port: int, **overrides: dict[str, object]
            ) -> tuple[Config, Path]:
    path = write_config(tmp / "config.toml", _sections(tmp / "node", model, pacs_port,
                                                       **overrides))
    return load_config(path), path


def _cli(*args: str) -> str:
    """`python -m node ...` in its own process, wide enough that no column folds."""
    out = subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def _study_files(tmp: Path, i: int, layout: DicomLayout = DicomLayout.MULTIFRAME
                 ) -> tuple[str, list[Path]]:
    paths = write_study(generate_study(CLASS_NAMES[i % 4], seed=600 + i), tmp / f"s{i}", layout)
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID), paths


# --- free-disk watermark -------------------------------------------------------------------


def test_watermark_refuses_without_writing(tmp_path: Path, untrained_model: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    cfg, _ = _config(tmp_path, untrained_model, 104,
                     storage={"min_free_mb": free_mb + 1_000_000})
    _, paths = _study_files(tmp_path, 0)
    with Node(cfg) as n, caplog.at_level(logging.WARNING, logger="node"):
        assert send_paths(paths, Destination("DSCINT", "127.0.0.1", n.port), CALLER) == [0xA700]
        report = n.health()
        assert not study_summaries(n.db)
    root = cfg.storage_root
    assert not list((root / "studies").rglob("*")) and not list((root / "quarantine").iterdir())
    assert "free disk below the watermark ([storage].min_free_mb); nothing written" in \
        caplog.text
    assert report["status"] == "degraded"
    assert any("watermark" in p for p in report["problems"])


# --- housekeeping --------------------------------------------------------------------------


@dataclass
class Store:
    """A queue database and file store with studies in chosen states."""

    db: Database
    files: FileStore
    paths: dict[str, list[Path]] = field(default_factory=dict)


def _uid(*parts: object) -> str:
    return "1.2.826.0.1.3680043.10.9999." + ".".join(str(p) for p in parts)


def _add(store: Store, n: int, state: str) -> str:
    """One study (one instance) driven through the real queue API to `state`: receiving,
    failed, pending (SR export not yet acknowledged), dead or delivered."""
    study, series, sop = _uid(n, 1), _uid(n, 2), _uid(n, 3)
    path = store.files.write_instance(study, series, sop, b"DICM" + bytes(1000))
    record_instance(store.db, InstanceRecord(
        sop_uid=sop, study_uid=study, series_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(path), views=("anterior", "posterior"), n_frames=2, size_bytes=1004,
        calling_ae="CAM", patient_key=f"key{n}"))
    store.paths[study] = [path]
    if state == "receiving":
        return study
    assert mark_complete(store.db, study, "both_views")
    job = claim_job(store.db, "test:w0")
    assert job is not None and job.study_uid == study
    finish_job(store.db, job.job_id, ok=state != "failed")
    if state == "failed":
        return study
    sr = store.files.write_sr(study, _uid(n, 4), b"SR" + bytes(100))
    store.paths[study].append(sr)
    store_result(store.db, NewResult(study_uid=study, job_id=job.job_id, model_version="t",
                                     model_sha256="0" * 64, predicted_class="normal",
                                     probabilities={"normal": 1.0}, per_view={},
                                     sr_sop_uid=_uid(n, 4), sr_series_uid=_uid(n, 5),
                                     sr_path=str(sr)), "PACS@127.0.0.1:104")
    if state == "pending":
        return study
    export = claim_export(store.db, "test:x0")
    assert export is not None and export.study_uid == study
    if state == "dead":
        export_failed(store.db, export.export_id, "refused", 0xA900, None)
    else:
        export_succeeded(store.db, export.export_id, 0)
    return study


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.create_all()
    yield Store(db, FileStore(tmp_path / "store"))
    db.dispose()


def _rows(db: Database, study: str) -> int:
    with db.read_session() as s:
        return s.query(Instance).filter(Instance.study_uid == study).count()


def test_housekeeping_purges_only_delivered_studies_after_retention(store: Store) -> None:
    states = ["delivered", "dead", "failed", "receiving", "delivered", "pending"]  # pending last:
    # claim_export takes the oldest due export
    uids = {state + str(i): _add(store, i, state) for i, state in enumerate(states)}
    policy = StorageSection(retention_days=30.0)
    now = datetime.now(UTC)
    assert housekeeping(store.db, store.files, policy, now=now + timedelta(days=29)).studies == 0
    report = housekeeping(store.db, store.files, policy, now=now + timedelta(days=31))
    assert report.studies == 2 and report.files == 4
    for key, uid in uids.items():
        gone = key.startswith("delivered")
        assert all(p.exists() != gone for p in store.paths[uid]), key
        assert _rows(store.db, uid) == (0 if gone else 1), key
    with store.db.read_session() as s:
        assert {p.study_uid for p in s.query(Purge)} == {uids["delivered0"], uids["delivered4"]}
        assert s.query(Study).count() == len(states)  # what was reported stays on record
    assert not (store.files.studies / uids["delivered0"]).exists()  # empty folders go too
    again = housekeeping(store.db, store.files, policy, now=now + timedelta(days=400))
    assert again.studies == 0  # idempotent; undelivered ones still untouched
    assert all(p.exists() for key, uid in uids.items() if not key.startswith("delivered")
               for p in store.paths[uid])


def test_housekeeping_keeps_everything_when_retention_is_zero(store: Store) -> None:
    uid = _add(store, 1, "delivered")
    far = datetime.now(UTC) + timedelta(days=10_000)
    assert housekeeping(store.db, store.files, StorageSection(retention_days=0.0), now=far) \
        .studies == 0
    assert all(p.exists() for p in store.paths[uid])


def test_housekeeping_spares_a_resent_file_and_purges_late_arrivals_later(store: Store) -> None:
    uid = _add(store, 1, "delivered")
    now = datetime.now(UTC)
    instance = store.paths[uid][0]
    resent_at = (now + timedelta(days=2)).timestamp()  # re-sent after the cutoff below
    os.utime(instance, (resent_at, resent_at))
    policy = StorageSection(retention_days=30.0)
    assert housekeeping(store.db, store.files, policy, now=now + timedelta(days=31)).studies == 1
    assert instance.exists() and _rows(store.db, uid) == 1  # the fresh copy and its row stay
    assert not store.paths[uid][1].exists()  # the SR went
    assert housekeeping(store.db, store.files, policy, now=now + timedelta(days=31)).studies == 0
    late = _uid(1, 9)  # a late instance after the purge: purged in its own time
    path = store.files.write_instance(uid, _uid(1, 2), late, b"DICM")
    record_instance(store.db, InstanceRecord(
        sop_uid=late, study_uid=uid, series_uid=_uid(1, 2),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20", transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=str(path), views=("anterior",), n_frames=1, size_bytes=4, calling_ae="CAM",
        patient_key="key1"), now=now + timedelta(days=32))
    assert housekeeping(store.db, store.files, policy, now=now + timedelta(days=40)).studies == 0
    assert housekeeping(store.db, store.files, policy, now=now + timedelta(days=63)).studies == 1
    assert not path.exists() and not instance.exists() and _rows(store.db, uid) == 0


def test_housekeeping_purges_old_quarantine_and_temp_files(store: Store) -> None:
    """The quarantine's age limit is its own: it applies with retention off (0 = keep)."""
    old = store.files.quarantine(b"junk", "bad", "1.2.3")
    fresh = store.files.quarantine(b"junk", "bad", "1.2.4")
    temp = store.files.tmp / "leftover.partial"
    temp.write_bytes(b"half")
    long_ago = time.time() - 40 * 86400
    for p in [old, old.parent / f"{old.name[:-4]}.reason.txt", temp]:
        os.utime(p, (long_ago, long_ago))
    report = housekeeping(store.db, store.files,
                          StorageSection(retention_days=0.0, quarantine_days=30.0))
    assert report.quarantined == 2 and report.temp == 1
    assert not old.exists() and fresh.exists() and not temp.exists()


def test_running_node_purges_a_delivered_study(tmp_path: Path, untrained_model: Path) -> None:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs.start()
    try:
        cfg, _ = _config(tmp_path, untrained_model, pacs.port,
                         storage={"retention_days": 2e-5, "housekeeping_seconds": 0.3})
        uid, paths = _study_files(tmp_path, 1)
        with Node(cfg) as n:
            assert send_paths(paths, Destination("DSCINT", "127.0.0.1", n.port), CALLER) == [0]
            assert pacs.wait_for(1, timeout=30)
            wait_for(lambda: not (cfg.storage_root / "studies" / uid).exists(), 20,
                     "the delivered study's files to be purged")
            row = {s.study_uid: s for s in study_summaries(n.db)}[uid]
            assert row.state == "classified" and row.export_state == "done"
    finally:
        pacs.stop()


# --- PACS failure statuses, status and resend commands ------------------------------------


@dataclass
class PickyPacs(PacsStandIn):
    """A PACS answering each study with the status set for it (warnings store the object)."""

    refusals: dict[str, int] = field(default_factory=dict)

    def _on_store(self, event: Event) -> int:
        status = self.refusals.get(str(event.dataset.StudyInstanceUID))
        if status is None:
            return super()._on_store(event)
        if status >> 12 == 0xB:
            super()._on_store(event)
        return status


TRANSIENT = (0xA700, 0xA7FE, 0x0110)  # out of resources, processing failure: retried
PERMANENT = (0xA900, 0xC000, 0xC211, 0x0122, 0x0124)  # dead-lettered at the first answer
OBJECTS = 3  # per result: the SR, the result image, the PDF report ([results] defaults)


def test_pacs_status_classes_status_table_and_resend(tmp_path: Path,
                                                     untrained_model: Path) -> None:
    statuses = [*TRANSIENT, *PERMANENT, 0xB000]
    studies = [_study_files(tmp_path, i) for i in range(len(statuses))]
    by_status = {status: uid for status, (uid, _) in zip(statuses, studies, strict=True)}
    pacs = PickyPacs(ae_title="TEST_PACS", refusals={u: s for s, u in by_status.items()})
    pacs.start()
    try:
        cfg, path = _config(tmp_path, untrained_model, pacs.port)
        with Node(cfg) as n:
            dest = Destination("DSCINT", "127.0.0.1", n.port)
            for _, paths in studies:
                assert send_paths(paths, dest, CALLER) == [0]

            def rows() -> dict[str, StudySummary]:
                return {s.study_uid: s for s in study_summaries(n.db)}

            def settled() -> bool:
                r = rows()
                dead = [r.get(by_status[s]) for s in PERMANENT]
                retried = [r.get(by_status[s]) for s in TRANSIENT]
                warned = r.get(by_status[0xB000])
                return all(x is not None and x.export_state == "dead" for x in dead) and \
                    all(x is not None and (x.export_attempts or 0) >= 2 for x in retried) and \
                    warned is not None and warned.export_state == "done" and \
                    queue_depth(n.db)["dead_exports"] == OBJECTS * len(PERMANENT)

            wait_for(settled, 60, "each PACS status to be retried, dead-lettered or stored")
            r = rows()
            for s in PERMANENT:
                row = r[by_status[s]]
                assert row.export_attempts == 1 and f"0x{s:04X}" in (row.last_error or "")
            for s in TRANSIENT:
                row = r[by_status[s]]
                assert row.export_state in ("pending", "sending") and row.next_attempt_at
            assert r[by_status[0xB000]].export_state == "done"
            table = _cli("status", "--config", str(path))
            assert "health: degraded" in table and "dead-lettered" in table
            assert "being retried" in table
            line = next(x for x in table.splitlines() if by_status[0xA700][-18:] in x)
            assert "pending" in line or "sending" in line
            assert "0xA700" in line and "failed (transient)" in line
            pacs.refusals.clear()  # PACS fixed
            # `resend` re-queues every dead object: SR, result image and PDF of each study
            assert f"re-queued {OBJECTS * len(PERMANENT)} dead-lettered" in _cli(
                "resend", "--config", str(path))
            wait_for(lambda: len(pacs.by_study()) == len(statuses), 60,
                     "an SR of every study at PACS")
            # exactly once: nothing more is sent once every export is recorded as done
            wait_for(lambda: all(x.export_state == "done" for x in rows().values()), 30,
                     "every export recorded as done")
            wait_for(lambda: sum(queue_depth(n.db)[k] for k in ("pending_exports",
                                                                "sending_exports",
                                                                "dead_exports")) == 0,
                     30, "the result images and PDF reports delivered too")
        assert all(len(v) == 1 for v in pacs.by_study().values())  # exactly once each
        assert "health: ok" in _cli("status", "--config", str(path))
    finally:
        pacs.stop()


# --- health endpoint -----------------------------------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_endpoint_ok_then_degraded_while_pacs_is_down(tmp_path: Path,
                                                             untrained_model: Path) -> None:
    pacs = PacsStandIn(ae_title="TEST_PACS")
    pacs_port = pacs.start()
    pacs.stop()  # PACS is down for this test
    health_port = free_port()
    cfg, _ = _config(tmp_path, untrained_model, pacs_port, health={"port": health_port})
    uid, paths = _study_files(tmp_path, 2)
    base = f"http://127.0.0.1:{health_port}"
    with Node(cfg) as n:
        code, body = _get(base + "/health")
        report = json.loads(body)
        assert code == 200 and report["status"] == "ok" and report["problems"] == []
        meta = n.classifier.metadata
        assert report["model"] == {"name": meta.name, "version": meta.version,
                                   "sha256": meta.weights_sha256}
        assert report["disk"]["headroom_bytes"] > 0 and report["queue"]["dead_exports"] == 0
        assert _get(base + "/live")[0] == 200 and _get(base + "/nope")[0] == 404
        assert send_paths(paths, Destination("DSCINT", "127.0.0.1", n.port), CALLER) == [0]
        wait_for(lambda: _get(base + "/health")[0] == 503, 30, "/health to answer 503")
        report = json.loads(_get(base + "/health")[1])
        assert report["status"] == "degraded" and report["work"]["exports_retrying"] == 1
        assert any("being retried" in p and "cannot associate" in p for p in report["problems"])
        code, metrics = _get(base + "/metrics")
        assert code == 200 and "dscint_degraded 1" in metrics
        assert 'dscint_queue{kind="pending_exports"}' in metrics or \
            'dscint_queue{kind="sending_exports"}' in metrics
        assert uid not in json.dumps(report)  # counts, not studies
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "/live", timeout=2)  # stopped with the node
