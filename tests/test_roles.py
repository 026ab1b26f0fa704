"""Roles on one queue: `python -m node receive` (the SCP, no model) and `python -m node worker`
(classify and export, no SCP), several of each; claims are leases a dead worker loses."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydicom import dcmread
from sqlalchemy import select, text

from node.config import ConfigError, load_config, with_overrides
from node.demo.modality import echo, send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.service.node import Node, Role
from storage.db import Database, Instance, Job
from storage.filestore import FileStore, receiver_name
from storage.notify import notify_work, supports_notify
from storage.reports import queue_depth
from tests.support.net import NODE_AE
from tests.support.nodes import CALLER, dest, node_config, wait_sr
from tests.support.pg import fresh_database
from tests.support.roles import RoleProc, phantom_studies
from tests.support.wait import wait_for


def test_claim_lease_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"\[node\]\.claim_lease_seconds"):
        with_overrides(load_config(None), node={"claim_lease_seconds": 0.0})


def test_receiver_needs_no_model_and_worker_no_port(tmp_path: Path, untrained_model: Path,
                                                    pacs: PacsStandIn) -> None:
    """In one process for speed, on one SQLite file and one store: a receiver whose model
    file does not exist starts (it never loads one), the worker classifies what it stored."""
    missing = tmp_path / "no-such-model.pt"
    rcfg = node_config(tmp_path / "node", missing, pacs.port)
    wcfg = node_config(tmp_path / "node", untrained_model, pacs.port)
    with Node(rcfg, role=Role.RECEIVE) as receiver, Node(wcfg, role=Role.WORKER) as worker:
        assert receiver.models is None and worker.port == 0
        with pytest.raises(RuntimeError, match="no model"):
            receiver.current_classifier()
        report = receiver.health()
        assert report["model"] is None
        assert ":worker" in worker.worker_prefix and ":worker" not in receiver.worker_prefix
        (uid, paths), = phantom_studies(tmp_path / "studies", 1)
        assert send_paths(paths, dest(receiver), CALLER) == [0, 0]
        assert wait_sr(pacs, uid, timeout=60).StudyInstanceUID == uid
        assert echo(Destination(NODE_AE, "127.0.0.1", receiver.port), CALLER) == 0


def test_the_receive_role_never_loads_torch(tmp_path: Path, pacs: PacsStandIn) -> None:
    """`python -m node receive` stores a study without mapping libtorch (nor the model: its
    file does not even exist); this test's process, which imported torch, maps it."""
    assert torch.__version__  # imported here, so the last assertion can hold
    rec = RoleProc.make("receive", tmp_path, "receive", database=f"sqlite:///{tmp_path}/q.db",
                        model=tmp_path / "no-such-model.pt", pacs_port=pacs.port,
                        root=tmp_path / "store")
    try:
        rec.start()
        (_, paths), = phantom_studies(tmp_path / "studies", 1)
        assert send_paths(paths, Destination(NODE_AE, "127.0.0.1", rec.port), CALLER) == [0, 0]
        maps = Path(f"/proc/{rec.pid}/maps").read_text()
        assert "_sqlite3" in maps  # the maps list the extension modules it loaded
        assert "libtorch" not in maps
    finally:
        rec.stop()
    assert "libtorch" in Path(f"/proc/{os.getpid()}/maps").read_text()  # the check can fail


def _dead_pid() -> int:
    """The id of a process of this machine that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _aged(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_receiver_folder_names_stay_inside_the_store(tmp_path: Path) -> None:
    files = FileStore(tmp_path)
    long = receiver_name("h" * 80 + "/..", 7)
    assert files.receiving_dir(long).parent == files.receiving and long.endswith("-7")
    for bad in ("..", "../x-1", "a/b-1", "-1", "host", ""):
        with pytest.raises(ValueError, match="not a receiver folder name"):
            files.receiving_dir(bad)


def test_a_starting_receiver_clears_only_what_dead_receivers_left(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> None:
    """Receivers sharing a store: each writes in flight to receiving/<host>-<pid>/. One that
    starts removes its own leftovers, the folders of this host's dead receivers and, on other
    machines' folders, files an hour old; a live receiver's transfer (here or elsewhere)
    stays. Then it receives into its own folder."""
    root = tmp_path / "store"
    receiving = root / "receiving"
    host = receiver_name().rsplit("-", 1)[0]
    dead = receiving / f"{host}-{_dead_pid()}"
    live_here = _aged(receiving / receiver_name() / "live.dcm", 0)  # this process is alive
    live_there = _aged(receiving / "otherhost-77" / "inflight.dcm", 0)
    stale_there = _aged(receiving / "otherhost-78" / "stale.dcm", 7200)
    legacy_new, legacy_old = _aged(receiving / "tmpnew.dcm", 0), _aged(receiving / "tmpold.dcm",
                                                                       7200)
    _aged(dead / "halfway.dcm", 0)
    cfg = node_config(root, untrained_model, pacs.port, node={"receiver_process": True})
    with Node(cfg, role=Role.RECEIVE) as receiver:
        pid = receiver.receiver_pid
        assert pid is not None
        assert not dead.exists() and not stale_there.exists() and not legacy_old.exists()
        assert live_here.exists() and live_there.exists() and legacy_new.exists()
        own = receiving / receiver_name(socket.gethostname(), pid)
        assert own.is_dir() and not list(own.iterdir())
        (_, paths), = phantom_studies(tmp_path / "studies", 1)
        assert send_paths(paths, dest(receiver), CALLER) == [0, 0]
        assert not list(own.iterdir())  # each dataset left its folder once stored
    assert len(list((root / "studies").rglob("*.dcm"))) == 2


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (skipped without the test server; failed under
    DSCINT_REQUIRE_POSTGRES=1)."""
    with fresh_database("roles") as url:
        yield url


def test_heartbeat_failure_is_logged_not_raised(tmp_path: Path, untrained_model: Path,
                                                pacs: PacsStandIn, pg_url: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The database gone under a running worker: the heartbeat logs and the scheduler goes
    on (a missed beat is survivable: the lease is three beats long)."""
    cfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                      storage={"database": pg_url})
    with Node(cfg, role=Role.WORKER) as worker:
        assert worker.heartbeat() == 0  # nothing claimed yet, and no error
        with Database(pg_url.rsplit("/", 1)[0] + "/postgres").engine.connect() as admin:
            admin.execution_options(isolation_level="AUTOCOMMIT").execute(
                text(f'DROP DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        with caplog.at_level(logging.ERROR, logger="node.service.node"):
            assert worker.heartbeat() == 0
        assert "claim heartbeat failed" in caplog.text


def test_a_receiver_wakes_workers_elsewhere_at_once(tmp_path: Path, untrained_model: Path,
                                                    pacs: PacsStandIn, pg_url: str) -> None:
    """LISTEN/NOTIFY on PostgreSQL: the worker polls only every 120 s here, yet classifies a
    study seconds after the receiver (another node, as on another machine) completed it: the
    receiver's NOTIFY woke it. Without the notification it would wait out the 120 s."""
    rcfg = node_config(tmp_path / "node", tmp_path / "no-such-model.pt", pacs.port,
                       storage={"database": pg_url})
    wcfg = node_config(tmp_path / "node", untrained_model, pacs.port,
                       storage={"database": pg_url})
    with Node(wcfg, role=Role.WORKER, worker_idle_seconds=120.0) as worker, \
            Node(rcfg, role=Role.RECEIVE) as receiver:
        assert worker._listener is not None and receiver._listener is None
        wait_for(lambda: worker._listener is not None and worker._listener.listening.is_set(),
                 30, "the worker to LISTEN")
        time.sleep(1.0)  # the worker found the queue empty and began its 120 s wait
        (uid, paths), = phantom_studies(tmp_path / "studies", 1)
        sent = time.monotonic()
        assert send_paths(paths, dest(receiver), CALLER) == [0, 0]
        assert wait_sr(pacs, uid, timeout=60).StudyInstanceUID == uid
        assert time.monotonic() - sent < 60


def test_notify_is_postgres_only_and_never_raises(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/q.db")
    try:
        assert not supports_notify(db) and notify_work(db) is False
    finally:
        db.dispose()
    unreachable = Database("postgresql+psycopg://nobody:x@127.0.0.1:1/none")
    try:
        assert supports_notify(unreachable) and notify_work(unreachable) is False
    finally:
        unreachable.dispose()


def _claimed_by(db: Database, tag: str) -> Job | None:
    with db.session() as s:
        return s.execute(select(Job).where(Job.state == "claimed",
                                           Job.claimed_by.contains(tag))).scalars().first()


def _send_all(batches: list[tuple[str, list[Path], Destination]]) -> list[int | None]:
    """Each batch from its own sender (its own thread and calling AE), all at once."""
    statuses: list[int | None] = []
    lock = threading.Lock()

    def send(ae: str, paths: list[Path], to: Destination) -> None:
        got = send_paths(paths, to, ae)
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=send, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return statuses


@pytest.mark.slow
def test_two_receivers_three_workers_one_killed_mid_job(tmp_path: Path, untrained_model: Path,
                                                        pacs: PacsStandIn, pg_url: str) -> None:
    """2 receivers and 3 workers on one PostgreSQL queue and one file store, 9 studies from 3
    senders; the first worker SIGKILLed while it classifies: its lease runs out, another
    worker takes the study. Every study gets exactly one SR; every acknowledged instance is
    in the queue."""
    root = tmp_path / "shared"

    def make(role: str, name: str) -> RoleProc:
        return RoleProc.make(role, tmp_path, name, database=pg_url, model=untrained_model,
                             pacs_port=pacs.port, root=root, lease_seconds=3.0)

    receivers = [make("receive", f"receive{i}") for i in range(2)]
    workers = [make("worker", f"worker{i}") for i in range(3)]
    studies = phantom_studies(tmp_path / "studies", 9)
    to = [Destination(NODE_AE, "127.0.0.1", r.port) for r in receivers]
    db = Database(pg_url)
    try:
        for r in receivers:
            r.start()
        victim = workers[0].start()
        # the first study while the victim is the only worker: it is the one mid-job
        _, first_paths = studies[0]
        assert send_paths(first_paths, to[0], "SENDER1") == [0, 0]
        job = wait_for(lambda: _claimed_by(db, victim.claim_tag), 60,
                       "the first worker to claim the first study", interval=0.02)
        victim.kill()
        killed = _claimed_by(db, victim.claim_tag)
        assert killed is not None and killed.id == job.id, "the kill landed after the job"
        for w in workers[1:]:
            w.start()
        rest = studies[1:]
        batches = [(f"SENDER{k + 1}", [p for _, ps in rest[k::3] for p in ps], to[k % 2])
                   for k in range(3)]
        assert _send_all(batches) == [0] * sum(len(ps) for _, ps in rest)

        uids = {uid for uid, _ in studies}
        wait_for(lambda: uids <= set(pacs.by_study()), 300, "an SR for every study")
        wait_for(lambda: all(v == 0 for k, v in queue_depth(db).items()
                             if k in ("pending_jobs", "claimed_jobs", "pending_exports",
                                      "sending_exports")) or None,
                 60, "the queue to drain")
        assert {uid: len(v) for uid, v in pacs.by_study().items()} == dict.fromkeys(uids, 1)
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for _, ps in studies for p in ps}
        with db.session() as s:
            stored = set(s.execute(select(Instance.sop_uid)).scalars())
            taken_over = s.get(Job, job.id)
            jobs = s.execute(select(Job).where(Job.kind == "classify")).scalars().all()
        assert stored == sent  # every acknowledged instance is there
        assert taken_over is not None and taken_over.state == "done"
        assert taken_over.attempts == 2 and victim.claim_tag not in (taken_over.claimed_by or "")
        assert len(jobs) == len(studies) and all(j.state == "done" for j in jobs)
        finishers = {(j.claimed_by or "").rsplit(":", 1)[0] for j in jobs}
        assert len(finishers) >= 2  # the surviving workers shared the work
    finally:
        for p in [*workers, *receivers]:
            p.stop()
        db.dispose()
