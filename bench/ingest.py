"""Ingest benchmark: DCMTK storescu sends the same 1 MB two-frame NM files to the node, to
DCMTK storescp, to Orthanc and to a plain pynetdicom store SCP, with 1 and 4 associations, side
by side in one run.

Orthanc runs as Debian ships it (its own SQLite index, storage area synced), with Nagle off
like every DCMTK tool here. The plain pynetdicom SCP is what pynetdicom's documentation shows:
the node's PDU size, each dataset written with `encoded_dataset()` to a file, no fsync, no
checks, in its own process.

Reports files/s, receiver CPU ms per file, receiver peak RSS and the ratios to storescp and to
Orthanc. The
node's figures cover both its processes (classifier and receiver): CPU summed, peak RSS as the
sum of each process's peak, with the two peaks shown beside it.
`python -m bench.ingest [--files 200] [--json out.json]`. Needs dcmtk (`make test` installs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from bench.common import start_bench_node, tree_cpu_seconds
from model.phantom_dicom import DicomLayout, study_datasets
from model.phantoms import generate_study
from node.demo.pacs_standin import PacsStandIn
from node.dicom.admission import check_dataset, decode_check
from node.dicom.identity import patient_key
from node.dicom.status import Rejection
from node.dicom.views import frame_views
from node.receive import handlers as scp
from storage.db import Database
from storage.filestore import FileStore
from storage.intake import InstanceRecord, record_instance
from tests.support.interop import Orthanc
from tests.support.net import dcmtk_env, free_port, wait_port
from tests.support.nodeproc import export_model, rss_mib, tree_rss_mib, write_config
from tests.support.roles import RoleProc


@dataclass
class Row:
    """One receiver x association count."""

    receiver: str
    associations: int
    files: int
    seconds: float
    files_per_s: float
    cpu_ms_per_file: float
    peak_rss_mib: float
    peaks_by_process: str = ""  # two processes: classifier + receiver peaks, MiB
    cpu_by_process: str = ""  # two processes: classifier + receiver CPU ms per file


def make_files(out: Path, n: int, studies: int) -> list[Path]:
    """n two-frame NM objects (1 MiB of pixels each) spread over `studies` studies."""
    base = study_datasets(generate_study("normal", seed=1), DicomLayout.MULTIFRAME)[0]
    paths = []
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = {u: generate_uid() for u in study_uids}
    for i in range(n):
        ds = base.copy()
        ds.StudyInstanceUID = study_uids[i % studies]
        ds.SeriesInstanceUID = series_uids[ds.StudyInstanceUID]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"f{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def send(files: list[Path], port: int, associations: int, aet: str) -> float:
    """Run `associations` storescu processes in parallel; wall seconds."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aet, "-aet", "BENCH_CAM", "127.0.0.1",
                               str(port), *map(str, c)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


def measure(name: str, pid: int, port: int, aet: str, files: list[Path], assocs: int) -> Row:
    """CPU and wall time of one send, read from /proc of the receiver and its child processes
    (the node's receiver): CPU summed, peaks summed, each process shown where there are two."""
    cpu0 = tree_cpu_seconds(pid)
    secs = send(files, port, assocs, aet)
    cpu = [(b - a) / len(files) * 1000 for a, b in zip(cpu0, tree_cpu_seconds(pid), strict=False)]
    peaks = tree_rss_mib(pid, "VmHWM")
    split = len(peaks) > 1
    return Row(name, assocs, len(files), round(secs, 3), round(len(files) / secs, 1),
               round(sum(cpu), 2), round(sum(peaks), 1),
               " + ".join(f"{p:.0f}" for p in peaks) if split else "",
               " + ".join(f"{c:.1f}" for c in cpu) if split else "")


def run_storescp(work: Path, files: list[Path], assocs: int) -> Row:
    """DCMTK storescp writing to disk, the reference receiver."""
    port = free_port()
    out = work / f"storescp-{assocs}"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "--fork" if assocs > 1 else "--single-process",
                             "-aet", "STORESCP", "-od", str(out), str(port)]
                            if assocs > 1 else
                            ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        row = measure(STORESCP, proc.pid, port, "STORESCP", files, assocs)
        if assocs > 1:  # --fork: children did the work and are gone; the parent's peak only
            row.cpu_ms_per_file = float("nan")
            row.peak_rss_mib = round(rss_mib(proc.pid, "VmHWM"), 1)
            row.cpu_by_process = row.peaks_by_process = ""
        return row
    finally:
        proc.terminate()
        proc.wait()


def run_orthanc(work: Path, files: list[Path], assocs: int) -> Row:
    """Orthanc (tests/support/interop's configuration: local, no plugins, unknown AEs may
    store), a fresh index and storage area for each association count."""
    orthanc = Orthanc(work / f"orthanc-{assocs}", ae_title="ORTHANC").start()
    try:
        assert orthanc.server is not None and orthanc.server.proc is not None
        return measure(ORTHANC, orthanc.server.proc.pid, orthanc.dicom_port, "ORTHANC", files,
                       assocs)
    finally:
        orthanc.stop()


# pynetdicom's documented store SCP, with the node's PDU size; argv: port, output folder
_PLAIN_SCP = """
import sys
from pathlib import Path
from pynetdicom import AE, StoragePresentationContexts, evt
out = Path(sys.argv[2])
def store(event):
    with open(out / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as fh:
        fh.write(event.encoded_dataset())
    return 0x0000
ae = AE(ae_title="PLAIN")
ae.maximum_pdu_size = 1048576
ae.maximum_associations = 16
ae.supported_contexts = StoragePresentationContexts
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, store)])
"""


def run_plain_pynetdicom(work: Path, files: list[Path], assocs: int) -> Row:
    """A plain pynetdicom store SCP in its own process: what the node adds beyond it."""
    port = free_port()
    out = work / f"pynetdicom-{assocs}"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _PLAIN_SCP, str(port), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return measure(PLAIN, proc.pid, port, "PLAIN", files, assocs)
    finally:
        proc.terminate()
        proc.wait()


def run_node(work: Path, model: Path, files: list[Path], assocs: int, two_processes: bool
             ) -> Row:
    """The node as deployed (its own processes, classification running alongside): receiver
    and classifier processes (the default), or both in one process."""
    pacs = PacsStandIn(ae_title="BENCH_PACS")
    pacs.start()
    nwork = work / f"node-{assocs}-{int(two_processes)}"
    nwork.mkdir()
    node = start_bench_node(nwork, model, pacs.port, receiver_process=two_processes)
    try:
        return measure(NODE_2P if two_processes else NODE_1P, node.pid, node.port, "DSCINT",
                       files, assocs)
    finally:
        node.stop()
        pacs.stop()


def run_receive_role(work: Path, model: Path, files: list[Path], assocs: int) -> Row:
    """`python -m node receive`: the node's receiver alone (no classifier anywhere), the same
    SCP, checks and durability, on the same SQLite queue and store: what the receiving costs
    apart from the classification running beside it in the rows above."""
    pacs = PacsStandIn(ae_title="BENCH_PACS")
    pacs.start()
    rwork = work / f"receive-{assocs}"
    rwork.mkdir()
    port = free_port()
    cfg = write_config(rwork / "config.toml", {
        "node": {"ae_title": "DSCINT", "port": port},
        "pacs": {"ae_title": "BENCH_PACS", "host": "127.0.0.1", "port": pacs.port},
        "storage": {"root": str(rwork / "node")},
        "model": {"path": str(model)},
        "completion": {"quiet_seconds": 120.0, "sweep_seconds": 0.2},
        "logging": {"level": "WARNING"},
    })
    role = RoleProc("receive", cfg, rwork / "receive.log", port).start()
    try:
        return measure(RECEIVE_ROLE, role.pid, port, "DSCINT", files, assocs)
    finally:
        role.stop()
        pacs.stop()


NODE_2P, NODE_1P, RECEIVE_ROLE = "node 2 procs", "node 1 proc", "node receiver"
STORESCP, ORTHANC, PLAIN = "dcmtk storescp", "orthanc", "pynetdicom"
STAGES = ("parse", "header checks", "decode check", "views + patient key", "durable write",
          "durable queue row", "rename into place")


def stage_profile(work: Path, files: list[Path]) -> dict[str, float]:
    """Median ms of each step the C-STORE handler takes, run in-process one file at a time
    on the node's own code and the same disk: where one instance's time goes, without the
    network. The two durable steps are fsync-bound (file + directory, SQLite WAL commit)."""
    files_store = FileStore(work / "stages")
    db = Database(f"sqlite:///{work / 'stages.db'}")
    db.create_all()
    clock = _StepClock()
    for path in files:
        raw = path.read_bytes()
        received = files_store.receiving_dir("bench-1") / path.name  # as pynetdicom leaves it
        received.parent.mkdir(parents=True, exist_ok=True)
        received.write_bytes(raw)
        with clock("parse"):  # from the received file, as the receiver does: header only
            ds = scp._parse(received, scp.DEFAULT_MAX_INSTANCE_BYTES)
        assert not isinstance(ds, Rejection)
        with clock("header checks"):
            check_dataset(ds, str(ds.SOPClassUID))
        with clock("decode check"):
            decode_check(ds)
        with clock("views + patient key"):
            views = tuple(v.value for v in frame_views(ds))
            key = patient_key(ds, b"bench")
        study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), \
            str(ds.SOPInstanceUID)
        with clock("durable write"):
            staged = files_store.stage(received)  # a link to the received file, fsynced
        received.unlink()
        with clock("durable queue row"):
            record_instance(db, InstanceRecord(
                sop_uid=sop, study_uid=study, series_uid=series,
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=str(files_store.instance_path(study, series, sop)),
                views=views, n_frames=len(views), size_bytes=len(raw), calling_ae="BENCH",
                patient_key=key))
        with clock("rename into place"):
            files_store.publish(staged, study, series, sop)
    db.dispose()
    return {k: round(statistics.median(clock.times[k]) * 1000, 2) for k in STAGES}


class _StepClock:
    """`with clock(name):` adds the block's wall time to times[name]."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in STAGES}
        self._name = ""
        self._t0 = 0.0

    def __call__(self, name: str) -> _StepClock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.times[self._name].append(time.perf_counter() - self._t0)


def main() -> None:
    """Side-by-side table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("dcmtk is not installed (make test installs it)")
    with tempfile.TemporaryDirectory(prefix="dscint-ingest-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        files = make_files(work / "files", args.files, args.studies)
        model = export_model(work / "model.pt")
        rows: list[Row] = []
        for assocs in (1, 4):
            rows.append(run_storescp(work, files, assocs))
            rows.append(run_orthanc(work, files, assocs))
            rows.append(run_plain_pynetdicom(work, files, assocs))
            rows.append(run_node(work, model, files, assocs, two_processes=True))
            rows.append(run_node(work, model, files, assocs, two_processes=False))
            rows.append(run_receive_role(work, model, files, assocs))
        stages = stage_profile(work, files[: min(len(files), 100)])
    print(f"{args.files} files of {files and 1.0:.1f} MiB pixel data, {args.studies} studies; "
          "receivers on 127.0.0.1; TCP_NODELAY=1 for DCMTK")
    print(f"{'receiver':<16}{'assocs':>7}{'files/s':>9}{'cpu ms/file':>13}{'peak RSS MiB':>14}"
          f"{'/storescp':>11}{'/orthanc':>10}  by process (classifier + receiver): "
          "cpu ms/file; peak MiB")
    print(f"({NODE_2P}: receiver and classifier processes, the default; {NODE_1P}: "
          f"[node].receiver_process = false; {RECEIVE_ROLE}: `python -m node receive`, "
          "nothing classified)")
    ref = {r.associations: r.files_per_s for r in rows if r.receiver == STORESCP}
    orthanc = {r.associations: r.files_per_s for r in rows if r.receiver == ORTHANC}
    for r in rows:
        ratio = _ratio(r, STORESCP, ref)
        to_orthanc = _ratio(r, ORTHANC, orthanc)
        print(f"{r.receiver:<16}{r.associations:>7}{r.files_per_s:>9}{r.cpu_ms_per_file:>13}"
              f"{r.peak_rss_mib:>14}{ratio:>11}{to_orthanc:>10}  "
              + (f"{r.cpu_by_process}; {r.peaks_by_process}" if r.cpu_by_process else ""))
    print_stages(stages, ref.get(1, 0.0))
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "stages_ms": stages},
                                        indent=2))


def _ratio(row: Row, reference: str, by_assocs: dict[int, float]) -> str:
    """row's files/s over the reference receiver's at the same association count."""
    if row.receiver == reference or not by_assocs.get(row.associations):
        return ""
    return f"{row.files_per_s / by_assocs[row.associations]:.2f}"


def print_stages(stages: dict[str, float], storescp_files_per_s: float) -> None:
    """Where one instance's time goes in the handler, and what durability alone allows."""
    print("\nC-STORE handler steps, in-process, one file at a time (median ms per file):")
    for name, ms in stages.items():
        print(f"  {name:<22}{ms:>8.2f}")
    total = sum(stages.values())
    durable = stages["durable write"] + stages["durable queue row"]
    print(f"  {'total':<22}{total:>8.2f}   -> at most {1000 / total:.0f} files/s on one "
          "association before any network or pynetdicom cost")
    print(f"  durable steps alone {durable:.2f} ms -> at most {1000 / durable:.0f} files/s "
          f"with Success after fsync; storescp (no fsync) did {storescp_files_per_s} files/s")


if __name__ == "__main__":
    main()
