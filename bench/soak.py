"""Crash-safety soak: several senders, a node in its own process killed with SIGKILL at random
moments and restarted, hostile input on the side; then nothing may be lost.

Each trial starts a fresh node (`python -m node serve --config <tmp config>`), a PACS stand-in
in this process, `--senders` sender threads that C-STORE `--studies` phantom studies each (and
resend whatever was not acknowledged once the node is back, as a modality would) and one thread
sending hostile inputs (node/hostile.py). A killer thread SIGKILLs the node `--kills` times at
seeded random moments and restarts it. When all is sent, it waits for the SRs, stops the node
and checks:

- every instance that got Success is in the database and on disk, byte for byte its pixels;
- no temp or partial file is left where data lives, no row points at one, no file lies in the
  store without its row;
- every complete study got exactly one SR at PACS (one SR UID; a redelivery of that same UID
  after a kill between PACS's answer and our bookkeeping is counted, not an error: PACS keeps
  one object per UID);
- every hostile input was answered as node/hostile.py expects, and the node never died on
  its own.

`python -m bench.soak --trials 20 --seed 1` (about 40 s a trial on 2 cores). The plan (studies,
layouts, kill moments, hostile inputs) is a function of the seed; thread interleavings are not.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE

from bench.common import NODE_AE, NodeProc, export_model, free_port, write_config
from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.demo.pacs_standin import PacsStandIn
from node.dicom.status import is_specific_refusal
from node.export.scu import Destination
from storage.db import Database, Instance, Result
from tests.support import hostile

log = logging.getLogger(__name__)

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
        time.sleep(rng.uniform(0, pause))
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
            if pending:
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
    node/hostile.py expects."""
    dest = Destination(NODE_AE, "127.0.0.1", port)
    for case in cases:
        if case.expect is hostile.Expect.NOT_NEGOTIATED:
            continue
        tally.tried += 1
        status = None
        while status is None and time.monotonic() < deadline:
            status = hostile.send_input(case, dest, "SOAK_HOSTILE", workdir)
            if status is None:
                time.sleep(0.3)
        if status is None:
            tally.unexpected.append(f"{case.name}: never answered")
            continue
        tally.answered += 1
        if not expected_answer(case.expect, status):
            tally.unexpected.append(f"{case.name}: 0x{status:04X}, expected {case.expect}")
        if status == 0:
            path = workdir / "accepted" / f"{case.sop_uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(case.part10())
            tally.accepted[case.sop_uid] = path


def expected_answer(expect: hostile.Expect, status: int) -> bool:
    """Does a status fit the expectation? (NOT_NEGOTIATED inputs are never sent.)"""
    if expect is hostile.Expect.ACCEPT:
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
    """Poll until every study has an SR at PACS (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = pacs.by_study()
        if all(uid in have for uid in study_uids):
            return
        time.sleep(0.2)


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
    node/hostile.py's fixed catalogue to the seeded random hostile inputs."""
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
        killer = threading.Thread(target=_killer, name="killer",
                                  args=(node, plan, random.Random(plan.seed * 7919), report,
                                        stop))
        with hostile.raw_sending():
            for t in [*threads, killer]:
                t.start()
            for t in threads:
                t.join()
            killer.join()
        study_uids = [st.study_uid for st in studies]
        wait_for_srs(pacs, study_uids, timeout=max(30.0, deadline - time.monotonic()))
        time.sleep(1.0)  # a redelivery would show up now
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


# --- the command ---------------------------------------------------------------------------


def trials(args: argparse.Namespace, workdir: Path) -> Iterator[TrialReport]:
    """Run the trials one after another."""
    model = Path(args.model) if args.model else export_model(workdir / "dscint.pt")
    pool = phantom_pool(args.pool, args.seed)
    base = hostile.base_dataset(args.seed)
    started = time.monotonic()
    for i in range(args.trials):
        if args.budget and time.monotonic() - started > args.budget:
            print(f"time budget of {args.budget:.0f} s used: stopping after {i} trial(s)")
            return
        plan = TrialPlan(seed=args.seed * 1000 + i, senders=args.senders,
                         studies_per_sender=args.studies, kills=args.kills,
                         hostile=args.hostile)
        yield run_trial(i, plan, pool, model, workdir / f"trial{i:03d}", base)


def _line(r: TrialReport) -> str:
    return (f"trial {r.trial:3d} seed {r.seed}: {'OK ' if r.ok else 'FAIL'} "
            f"{r.instances_acked}/{r.instances_sent} acked ({r.interrupted_attempts} "
            f"associations cut mid-transfer), {r.kills} kills (swept {r.temp_files_swept} "
            f"temp files, re-queued {r.jobs_requeued} jobs, {r.exports_requeued} exports), "
            f"{r.crashes} crashes, lost {len(r.lost)}, SRs missing {len(r.missing_srs)} "
            f"dup {len(r.duplicate_srs)} redelivered {r.sr_redeliveries}, hostile "
            f"{r.hostile_tried} ({len(r.hostile_unexpected)} unexpected), peak RSS "
            f"{r.peak_rss_mib:.0f} MiB, {r.seconds:.0f} s")


def summarise(reports: list[TrialReport]) -> dict[str, object]:
    """Totals over all trials."""
    return {
        "trials": len(reports), "failed_trials": sum(not r.ok for r in reports),
        "studies": sum(r.studies for r in reports),
        "instances_sent": sum(r.instances_sent for r in reports),
        "instances_acked": sum(r.instances_acked for r in reports),
        "instances_lost": sum(len(r.lost) for r in reports),
        "kills": sum(r.kills for r in reports), "crashes": sum(r.crashes for r in reports),
        "hostile_tried": sum(r.hostile_tried for r in reports),
        "hostile_unexpected": sum(len(r.hostile_unexpected) for r in reports),
        "missing_srs": sum(len(r.missing_srs) for r in reports),
        "duplicate_srs": sum(len(r.duplicate_srs) for r in reports),
        "sr_redeliveries": sum(r.sr_redeliveries for r in reports),
        "associations_cut_mid_transfer": sum(r.interrupted_attempts for r in reports),
        "sends_while_node_down": sum(r.unreachable_attempts for r in reports),
        "temp_files_swept": sum(r.temp_files_swept for r in reports),
        "jobs_requeued": sum(r.jobs_requeued for r in reports),
        "exports_requeued": sum(r.exports_requeued for r in reports),
        "partial_or_orphan_files": sum(len(r.partial_files) + len(r.orphan_files)
                                       for r in reports),
        "peak_rss_mib": max((r.peak_rss_mib for r in reports), default=0.0),
        "seconds": round(sum(r.seconds for r in reports), 1),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.soak --trials 20 --seed 1`; exit 1 when any trial failed."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--studies", type=int, default=5, help="studies per sender")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs per trial")
    ap.add_argument("--hostile", type=int, default=30, help="hostile inputs per trial")
    ap.add_argument("--pool", type=int, default=12, help="distinct phantom studies")
    ap.add_argument("--model", default="", help="TorchScript model (default: export one)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="stop starting trials after this many seconds (0 = no limit)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    ap.add_argument("--json", type=Path, default=None, help="write all reports here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused connects by design
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # reading back odd hostile inputs
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    with tempfile.TemporaryDirectory(prefix="dscint-soak-") as tmp:
        workdir = args.workdir or Path(tmp)
        reports = []
        for report in trials(args, workdir):
            reports.append(report)
            print(_line(report), flush=True)
            for problem in (report.lost + report.partial_files + report.orphan_files
                            + report.missing_srs + report.duplicate_srs
                            + report.hostile_unexpected + report.refused_valid
                            + report.errors_logged)[:10]:
                print(f"    {problem}")
    total = summarise(reports)
    print(json.dumps(total, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"total": total,
                                         "trials": [asdict(r) for r in reports]}, indent=2))
    return 0 if total["failed_trials"] == 0 and reports else 1


if __name__ == "__main__":
    sys.exit(main())
