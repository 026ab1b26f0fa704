"""The crash-safety trial (tests/test_crash_safety.py runs one; `python -m bench.soak` many):
several senders, a node in its own process killed with SIGKILL at seeded random moments and
restarted, hostile input on the side; then nothing may be lost.

A trial starts a fresh node (`python -m node serve --config <tmp config>`), a PACS stand-in in
this process, sender threads that C-STORE phantom studies (and resend whatever was not
acknowledged once the node is back, as a modality would) and one thread sending hostile inputs
(tests/support/hostile.py). A killer thread SIGKILLs the node `kills` times and restarts it.
When all is sent, it waits for the SRs, stops the node and checks:

- every instance that got Success is in the database and on disk, byte for byte its pixels;
- no temp or partial file is left where data lives, no row points at one, no file lies in the
  store without its row;
- every complete study got exactly one SR at PACS (one SR UID; a redelivery of that same UID
  after a kill between PACS's answer and our bookkeeping is counted, not an error: PACS keeps
  one object per UID);
- every hostile input was answered as tests/support/hostile.py expects, and the node never
  died on its own.

The plan (studies, layouts, kill moments, hostile inputs) is a function of the seed; thread
interleavings are not.
"""

from __future__ import annotations

import contextlib
import copy
import random
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE

from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.demo.pacs_standin import PacsStandIn
from node.dicom.status import is_specific_refusal
from node.export.scu import Destination
from storage.db import Database, Export, ExportState, Instance, Result
from tests.support import hostile
from tests.support.net import NODE_AE, free_port
from tests.support.nodeproc import NodeProc, write_config
from tests.support.wait import WaitTimeout, wait_for

PACS_AE = "SOAK_PACS"


# --- the node in its own process -----------------------------------------------------------


def node_sections(root: Path, model: Path, port: int, pacs_port: int,
                  **overrides: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """A node storing under root, waiting for both views, retrying exports briskly."""
    sections: dict[str, dict[str, object]] = {
        "node": {"ae_title": NODE_AE, "port": port, "max_associations": 32},
        "pacs": {"ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root)},
        "model": {"path": str(model)},
        "completion": {"quiet_seconds": 3600.0, "sweep_seconds": 0.5},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 1.0,
                   "max_attempts": 1000},
        "logging": {"level": "INFO"},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return sections


# --- studies and senders -------------------------------------------------------------------


@dataclass(frozen=True)
class SentStudy:
    """One study's files, with the SOP UID of each."""

    study_uid: str
    files: tuple[tuple[str, Path], ...]  # (SOP Instance UID, path)


def phantom_pool(n: int, seed: int) -> list[list[Dataset]]:
    """`n` phantom studies (all classes, all layouts) to re-identify per trial (generating
    phantoms is the slow part, so the pool is made once)."""
    layouts = list(DicomLayout)
    return [study_datasets(generate_study(CLASS_NAMES[i % len(CLASS_NAMES)], seed=seed + i),
                           layouts[i % len(layouts)]) for i in range(n)]


def reidentify(datasets: list[Dataset], key: str) -> list[Dataset]:
    """Copies with fresh study, series and SOP UIDs derived from `key` (patient unchanged)."""
    out = []
    series: dict[str, str] = {}
    for i, src in enumerate(datasets):
        ds = copy.deepcopy(src)  # Dataset.copy() shares elements with the pool
        ds.StudyInstanceUID = hostile.uid_for(key, "study")
        old = str(src.SeriesInstanceUID)
        ds.SeriesInstanceUID = series.setdefault(old, hostile.uid_for(key, "series", old))
        ds.SOPInstanceUID = hostile.uid_for(key, "sop", i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def write_studies(pool: list[list[Dataset]], out: Path, count: int, key: str,
                  rng: random.Random) -> list[SentStudy]:
    """`count` studies drawn from the pool, re-identified, written as Part-10 files."""
    studies = []
    for j in range(count):
        datasets = reidentify(rng.choice(pool), f"{key}/{j}")
        files = []
        for ds in datasets:
            path = out / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append((str(ds.SOPInstanceUID), path))
        studies.append(SentStudy(str(datasets[0].StudyInstanceUID), tuple(files)))
    return studies


@dataclass
class Ledger:
    """What the senders saw, shared between threads."""

    acked: dict[str, Path] = field(default_factory=dict)  # SOP UID -> source file
    refused_valid: list[str] = field(default_factory=list)  # a good instance refused
    attempts: int = 0
    unreachable: int = 0  # no association: the node was down
    interrupted: int = 0  # an association that died before every file was answered
    lock: threading.Lock = field(default_factory=threading.Lock)


def _send_batch(files: list[tuple[str, Path]], port: int, calling_ae: str
                ) -> tuple[bool, list[tuple[str, Path, int | None]]]:
    """One association; stops at the first failure (the node may have just died). Whether
    the association was established, and (SOP, file, status) for each file tried."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30.0
    ae.maximum_pdu_size = 1_048_576
    contexts = set()
    for _, path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        contexts.add((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    out: list[tuple[str, Path, int | None]] = []
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False, out
    try:
        for sop, path in files:
            if not assoc.is_established:
                break
            try:
                rsp = assoc.send_c_store(path)
            except Exception:  # the association died under us
                break
            status = getattr(rsp, "Status", None)
            out.append((sop, path, int(status) if status is not None else None))
            if status is None:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return True, out


def run_sender(studies: list[SentStudy], port: int, calling_ae: str, ledger: Ledger,
               deadline: float, rng: random.Random, pause: float = 1.5) -> None:
    """Send every study, pausing up to `pause` s between studies (a camera finishing its
    next scan), so kills land mid-transfer; resend what was not acknowledged until it is."""
    for study in studies:
        time.sleep(rng.uniform(0, pause))  # pacing, the point: kills land between studies too
        pending = list(study.files)
        while pending and time.monotonic() < deadline:
            established, results = _send_batch(pending, port, calling_ae)
            answered = [r for r in results if r[2] is not None]
            with ledger.lock:
                ledger.attempts += 1
                ledger.unreachable += not established
                ledger.interrupted += established and len(answered) < len(pending)
                for sop, path, status in results:
                    if status == 0:
                        ledger.acked[sop] = path
                    elif status is not None:
                        ledger.refused_valid.append(f"{sop}: 0x{status:04X}")
            done = {sop for sop, _, status in results if status is not None}
            pending = [(s, p) for s, p in pending if s not in done]
            if pending:  # a modality's retry pause (the node may be restarting)
                time.sleep(0.2 + rng.random() * 0.3)


@dataclass
class HostileTally:
    """Hostile inputs sent during a trial and how they were answered."""

    tried: int = 0
    answered: int = 0
    unexpected: list[str] = field(default_factory=list)
    accepted: dict[str, Path] = field(default_factory=dict)  # SOP UID -> source file


def run_hostile(cases: list[hostile.HostileInput], port: int, workdir: Path,
                tally: HostileTally, deadline: float) -> None:
    """Each input until answered (the node may be down for a restart), checked against what
    tests/support/hostile.py expects."""
    dest = Destination(NODE_AE, "127.0.0.1", port)
    for case in cases:
        if case.expect is hostile.Expect.NOT_NEGOTIATED:
            continue
        tally.tried += 1
        status = None
        while status is None and time.monotonic() < deadline:
            status = hostile.send_input(case, dest, "SOAK_HOSTILE", workdir)
            if status is None:  # the node is down for a restart: retry after a pause
                time.sleep(0.3)
        if status is None:
            tally.unexpected.append(f"{case.name}: never answered")
            continue
        tally.answered += 1
        if not expected_answer(case.expect, status):
            tally.unexpected.append(f"{case.name}: 0x{status:04X}, expected {case.expect}")
        if status == 0 and case.expect is not hostile.Expect.IGNORE:  # ignored: not kept
            path = workdir / "accepted" / f"{case.sop_uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(case.part10())
            tally.accepted[case.sop_uid] = path


FLOOD_ADDRESS = "127.0.0.2"  # its own per-address budget: the cameras keep theirs
FLOOD_IDLE = 20  # silent sockets held open (the node drops them after first_pdu_timeout)


def run_flooder(port: int, report: TrialReport, stop: threading.Event,
                interval: float = 0.1) -> None:
    """What a port scan or a broken client does while cameras send: connections that close at
    once and sockets that never speak, from one other address, until `stop`."""
    idle: list[socket.socket] = []
    try:
        while not stop.wait(interval):
            for keep in (False, True):
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=1.0,
                                                    source_address=(FLOOD_ADDRESS, 0))
                except OSError:  # refused while the node restarts, or over its limits
                    continue
                report.flood_connections += 1
                if keep and len(idle) < FLOOD_IDLE:
                    idle.append(sock)
                else:
                    sock.close()
            idle = [s for s in idle if _still_open(s)]
    finally:
        for sock in idle:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    """False (and closed) once the node has dropped it."""
    try:
        sock.setblocking(False)
        if sock.recv(1, socket.MSG_PEEK) == b"":
            sock.close()
            return False
    except BlockingIOError:
        return True
    except OSError:
        sock.close()
        return False
    return True


def expected_answer(expect: hostile.Expect, status: int) -> bool:
    """Does a status fit the expectation? (NOT_NEGOTIATED inputs are never sent.)"""
    if expect in (hostile.Expect.ACCEPT, hostile.Expect.IGNORE):
        return status == 0
    if expect is hostile.Expect.REFUSE:
        return is_specific_refusal(status)
    return status == 0 or is_specific_refusal(status)


# --- checks --------------------------------------------------------------------------------


def _pixels(path: Path) -> bytes:
    ds = dcmread(path)
    return bytes(ds.PixelData)


def check_instances(root: Path, db: Database, acked: Mapping[str, Path],
                    v: TrialReport) -> None:
    """Every acknowledged instance in the database, on disk, pixels identical."""
    with db.read_session() as s:
        rows = {sop: path for sop, path in s.query(Instance.sop_uid, Instance.path)}
    for sop, source in acked.items():
        stored = rows.get(sop)
        if stored is None:
            v.lost.append(f"{sop}: no database row")
            continue
        path = Path(stored)
        if not path.is_file() or not path.resolve().is_relative_to((root / "studies").resolve()):
            v.lost.append(f"{sop}: row points at {path}, no such file in the store")
            continue
        try:
            same = _pixels(path) == _pixels(source)
        except Exception as exc:  # an unreadable stored file is a lost instance too
            v.lost.append(f"{sop}: stored file unreadable ({type(exc).__name__})")
            continue
        if not same:
            v.lost.append(f"{sop}: stored pixels differ from what was sent")
    stored_files = {str(p.resolve()) for p in (root / "studies").rglob("*") if p.is_file()}
    known = {str(Path(p).resolve()) for p in rows.values()}
    v.orphan_files += sorted(stored_files - known)
    v.partial_files += sorted(str(p) for p in root.rglob("*.partial"))


def check_srs(db: Database, pacs: PacsStandIn, study_uids: list[str],
               v: TrialReport) -> None:
    """Exactly one SR UID per study at PACS, the one the database recorded."""
    by_study = pacs.by_study()
    with db.read_session() as s:
        recorded = {(u, sr) for u, sr in s.query(Result.study_uid, Result.sr_sop_uid)}
    for uid in study_uids:
        got = by_study.get(uid, [])
        distinct = {str(r.dataset.SOPInstanceUID) for r in got}
        if not distinct:
            v.missing_srs.append(uid)
        elif len(distinct) > 1 or not all((uid, sr) in recorded for sr in distinct):
            v.duplicate_srs.append(f"{uid}: {sorted(distinct)}")
        v.sr_redeliveries += len(got) - len(distinct)


def wait_for_srs(pacs: PacsStandIn, study_uids: list[str], timeout: float) -> None:
    """Wait until every study has an SR at PACS, or the timeout (the checks then report
    which are missing)."""
    with contextlib.suppress(WaitTimeout):
        wait_for(lambda: set(study_uids) <= set(pacs.by_study()), timeout,
                 "an SR at PACS for every study", interval=0.2)


def exports_settled(root: Path, study_uids: list[str]) -> bool:
    """Every study's SR export is recorded as done in the node's database: nothing more will
    be sent (a kill between PACS's answer and our bookkeeping leaves an export `sending`; the
    restarted node re-queues and redelivers it, and only then marks it done)."""
    db = Database(f"sqlite:///{root / 'dscint.db'}")
    try:
        with db.read_session() as s:
            rows = list(s.query(Export.study_uid, Export.state))
    finally:
        db.dispose()
    done = {uid for uid, state in rows if state == ExportState.DONE.value}
    open_ = {uid for uid, state in rows if state != ExportState.DONE.value}
    return set(study_uids) <= done and not open_ & set(study_uids)


def wait_exports_settled(root: Path, study_uids: list[str], timeout: float) -> None:
    """Wait until exports_settled, or the timeout (check_srs then judges what PACS got)."""
    with contextlib.suppress(WaitTimeout):
        wait_for(lambda: exports_settled(root, study_uids), timeout,
                 "every SR export recorded as done", interval=0.2)


_RECOVERED = re.compile(r"recovered after restart: (\d+) temp file\(s\) removed, (\d+) job\(s\) "
                        r"and (\d+) export\(s\) re-queued")


def recoveries(log_path: Path) -> tuple[int, int, int]:
    """Temp files swept, jobs and exports re-queued by the restarts (evidence that kills
    landed mid-write and mid-work), from the node's log."""
    totals = [0, 0, 0]
    if log_path.exists():
        for m in _RECOVERED.finditer(log_path.read_text(errors="replace")):
            totals = [t + int(g) for t, g in zip(totals, m.groups(), strict=True)]
    return totals[0], totals[1], totals[2]


def logged_errors(log_path: Path) -> list[str]:
    """Lines in the node's output that mean something went wrong unexpectedly."""
    if not log_path.exists():
        return []
    bad = ("Traceback", "failed unexpectedly", "CRITICAL")
    return [line for line in log_path.read_text(errors="replace").splitlines()
            if any(b in line for b in bad)]


# --- one trial -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial does that the seed decides."""

    seed: int
    senders: int = 3
    studies_per_sender: int = 5
    kills: int = 4
    hostile: int = 30
    kill_after: tuple[float, float] = (0.1, 2.0)  # seconds between a node's start and its kill
    pause: float = 0.5  # longest pause of a sender between two studies, seconds


@dataclass
class TrialReport:
    """A trial's numbers; `ok` when nothing was lost and nothing crashed."""

    trial: int
    seed: int
    studies: int = 0
    instances_sent: int = 0
    instances_acked: int = 0
    send_attempts: int = 0
    interrupted_attempts: int = 0  # associations cut by a kill mid-transfer
    unreachable_attempts: int = 0  # connection refused while the node restarted
    kills: int = 0
    node_starts: int = 0
    crashes: int = 0
    hostile_tried: int = 0
    hostile_unexpected: list[str] = field(default_factory=list)
    refused_valid: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    missing_srs: list[str] = field(default_factory=list)
    duplicate_srs: list[str] = field(default_factory=list)
    sr_redeliveries: int = 0
    temp_files_swept: int = 0
    jobs_requeued: int = 0
    exports_requeued: int = 0
    errors_logged: list[str] = field(default_factory=list)
    flood_connections: int = 0  # connect+close and idle sockets from another address
    peak_rss_mib: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing half-written, one SR each, no crash, no surprise."""
        return not (self.lost or self.partial_files or self.orphan_files or self.missing_srs
                    or self.duplicate_srs or self.crashes or self.hostile_unexpected
                    or self.refused_valid or self.errors_logged)


def _killer(node: NodeProc, plan: TrialPlan, rng: random.Random, report: TrialReport,
            stop: threading.Event) -> None:
    """SIGKILL the node `plan.kills` times at seeded moments; restart it each time."""
    for _ in range(plan.kills):
        if stop.wait(rng.uniform(*plan.kill_after)):
            return
        if not node.alive():
            report.crashes += 1
        node.kill()
        report.kills += 1
        _restart(node, report)


def _restart(node: NodeProc, report: TrialReport, tries: int = 3) -> None:
    """Start again; a start that fails is a crash (and is tried again)."""
    for _ in range(tries):
        try:
            node.start()
            return
        except (RuntimeError, TimeoutError) as exc:
            report.crashes += 1
            report.errors_logged.append(f"restart failed: {exc}")
            node.kill()


def run_trial(trial: int, plan: TrialPlan, pool: list[list[Dataset]], model: Path,
              workdir: Path, hostile_base: Dataset, time_limit: float = 600.0,
              corpus: bool = True) -> TrialReport:
    """One trial in `workdir`; see the module docstring for what is checked. `corpus` adds
    tests/support/hostile.py's fixed catalogue to the seeded random hostile inputs."""
    t0 = time.monotonic()
    rng = random.Random(plan.seed)
    report = TrialReport(trial=trial, seed=plan.seed)
    files_dir = workdir / "sent"
    files_dir.mkdir(parents=True, exist_ok=True)
    per_sender = [write_studies(pool, files_dir, plan.studies_per_sender,
                                f"soak/{plan.seed}/{trial}/{s}", rng)
                  for s in range(plan.senders)]
    studies = [st for group in per_sender for st in group]
    report.studies = len(studies)
    report.instances_sent = sum(len(st.files) for st in studies)
    cases = ((hostile.corpus(hostile_base, plan.seed) if corpus else [])
             + hostile.random_inputs(hostile_base, plan.seed, plan.hostile))
    pacs = PacsStandIn(ae_title=PACS_AE)
    pacs.start()
    port = free_port()
    config = write_config(workdir / "config.toml",
                          node_sections(workdir / "node", model, port, pacs.port))
    node = NodeProc(config, port, workdir / "node.log")
    ledger, tally = Ledger(), HostileTally()
    try:
        node.start()
        deadline = time.monotonic() + time_limit
        stop = threading.Event()
        threads = [threading.Thread(target=run_sender, name=f"sender-{i}",
                                    args=(group, port, f"SOAK_CAM{i}", ledger, deadline,
                                          random.Random(plan.seed * 31 + i), plan.pause))
                   for i, group in enumerate(per_sender)]
        threads.append(threading.Thread(target=run_hostile, name="hostile",
                                        args=(cases, port, workdir / "hostile", tally,
                                              deadline)))
        flood_stop = threading.Event()
        flooder = threading.Thread(target=run_flooder, name="flooder",
                                   args=(port, report, flood_stop))
        killer = threading.Thread(target=_killer, name="killer",
                                  args=(node, plan, random.Random(plan.seed * 7919), report,
                                        stop))
        with hostile.raw_sending():
            for t in [*threads, killer, flooder]:
                t.start()
            for t in threads:
                t.join()
            flood_stop.set()
            flooder.join()
            killer.join()
        study_uids = [st.study_uid for st in studies]
        wait_for_srs(pacs, study_uids, timeout=max(30.0, deadline - time.monotonic()))
        # a redelivery (an SR sent again after a kill) has happened once the database says
        # every export is done: only then is what PACS holds final
        wait_exports_settled(workdir / "node", study_uids, timeout=30.0)
        if not node.alive():
            report.crashes += 1
    finally:
        node.stop()
        pacs.stop()
    _fill(report, node, ledger, tally, workdir, pacs, [st.study_uid for st in studies])
    report.seconds = round(time.monotonic() - t0, 1)
    return report


def _fill(report: TrialReport, node: NodeProc, ledger: Ledger, tally: HostileTally,
          workdir: Path, pacs: PacsStandIn, study_uids: list[str]) -> None:
    """Run the checks and copy every number into the report."""
    root = workdir / "node"
    db = Database(f"sqlite:///{root / 'dscint.db'}")
    try:  # the checks write what they find (lost, partial, orphan, SRs) into the report
        check_instances(root, db, {**ledger.acked, **tally.accepted}, report)
        check_srs(db, pacs, study_uids, report)
    finally:
        db.dispose()
    report.instances_acked = len(ledger.acked)
    report.send_attempts, report.interrupted_attempts = ledger.attempts, ledger.interrupted
    report.unreachable_attempts = ledger.unreachable
    report.refused_valid = ledger.refused_valid
    report.node_starts, report.peak_rss_mib = node.starts, round(node.peak_rss_mib, 1)
    report.hostile_tried, report.hostile_unexpected = tally.tried, tally.unexpected
    report.errors_logged += logged_errors(node.log_path)[:20]
    report.temp_files_swept, report.jobs_requeued, report.exports_requeued = \
        recoveries(node.log_path)
