"""Hostile and broken input through real associations to a node in its own process: every input
gets an answer (a specific failure status with its reason logged and a quarantined copy, or a
sensible accept; the exact status where the corpus names one), the node keeps answering C-ECHO,
its memory stays bounded, its quarantine within its bounds (no copy over the header cap, the
folder under its quota) and its log (at DEBUG) never quotes the patient. Inputs come from
tests/support/hostile.py: the fixed catalogue (codestream and size bombs included) plus
hypothesis-driven truncations, garbling, header mutations, VR swaps and wrong geometries. A
second node takes the codestream bombs from 10 associations at once, for its peak memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread

from node.demo.pacs_standin import PacsStandIn
from node.dicom.identity import is_valid_uid
from node.dicom.status import Status
from node.export.scu import Destination
from storage.db import Database, Instance
from storage.filestore import FileStore
from tests.support import hostile
from tests.support.net import echo_ok, free_port
from tests.support.nodeproc import NodeProc, process_tree, tree_rss_mib, write_config
from tests.support.soak import expected_answer, node_sections
from tests.support.wait import wait_for

CALLER = "HOSTILE_CAM"
EXAMPLES = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RSS_GROWTH_LIMIT_MIB = 300.0  # peak over the idle node: 2 decoded copies of the largest input
BOMB_RSS_GROWTH_LIMIT_MIB = 600.0  # 10 associations of codestream bombs at once
BOMB_SENDERS, BOMB_ROUNDS = 10, 3
# the quarantine's bounds in the served node: the default copy cap, a quota the catalogue passes
COPY_CAP_KIB, QUOTA_MB = 64, 1


@dataclass
class Served:
    """The node process and what the tests need to watch it."""

    node: NodeProc
    root: Path
    base: Dataset
    workdir: Path
    baseline_rss_mib: float  # the node's processes, summed
    receiver_pid: int  # a hostile input that crashed the receiver would show as a new pid
    tried: list[str] = field(default_factory=list)
    log_offset: int = 0

    @property
    def dest(self) -> Destination:
        return Destination("DSCINT", "127.0.0.1", self.node.port)

    def new_log(self) -> str:
        """Log text written since the last call."""
        with self.node.log_path.open("rb") as fh:
            fh.seek(self.log_offset)
            data = fh.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, untrained_model: Path
           ) -> Iterator[Served]:
    """One node process for the module, logging at DEBUG, waiting for both views forever."""
    tmp = tmp_path_factory.mktemp("hostile")
    pacs = PacsStandIn(ae_title="SOAK_PACS")
    pacs.start()
    port = free_port()
    config = write_config(tmp / "config.toml", node_sections(
        tmp / "node", untrained_model, port, pacs.port, logging={"level": "DEBUG"},
        storage={"quarantine_max_copy_kib": COPY_CAP_KIB, "quarantine_quota_mb": QUOTA_MB,
                 "housekeeping_seconds": 1.0}))
    node = NodeProc(config, port, tmp / "node.log")
    node.start()
    # the baseline is read once start-up is over (C-ECHO is answered a little before)
    wait_for(lambda: "listening on" in node.log_path.read_text(errors="replace"), 30,
             "the node to log that it is listening")
    assert node.proc is not None
    tree = process_tree(node.proc.pid)
    assert len(tree) == 2, "the node receives in a process of its own"
    s = Served(node, tmp / "node", hostile.base_dataset(7), tmp / "work",
               sum(tree_rss_mib(node.proc.pid)), tree[1])
    try:
        with hostile.raw_sending():
            yield s
    finally:
        node.stop()
        pacs.stop()


def _stored_in(s: Served, sop_uid: str) -> str | None:
    """The study the node holds this SOP under, None when it holds none."""
    db = Database(f"sqlite:///{s.root / 'dscint.db'}")
    try:
        with db.read_session() as session:
            row = session.get(Instance, sop_uid)
            return None if row is None else row.study_uid
    finally:
        db.dispose()


def _study_of(case: hostile.HostileInput) -> str:
    return str(dcmread(BytesIO(case.part10())).StudyInstanceUID)


def _stored(s: Served, sop_uid: str) -> bool:
    return _stored_in(s, sop_uid) is not None


def _check(s: Served, case: hostile.HostileInput) -> int | None:
    """Send one input and check the node's answer, log line and quarantine."""
    status = hostile.send_input(case, s.dest, CALLER, s.workdir)
    s.tried.append(case.name)
    text = s.new_log()
    assert s.node.alive(), f"{case.name}: node died"
    if case.expect is hostile.Expect.NOT_NEGOTIATED:
        assert status is None, f"{case.name}: 0x{status:04X}"
        assert "refused presentation context" in text, case.name
        return status
    assert status is not None, f"{case.name}: no answer"
    assert expected_answer(case.expect, status), f"{case.name}: 0x{status:04X}"
    if case.status is not None:
        assert status == case.status, f"{case.name}: 0x{status:04X}, not 0x{case.status:04X}"
    if case.expect is hostile.Expect.IGNORE:  # Success, and nothing kept
        assert not _stored(s, case.sop_uid), f"{case.name}: ignored yet stored"
        assert not list((s.root / "quarantine").glob(f"*_{case.sop_uid}_*")), case.name
        return status
    if status == 0:
        assert _stored(s, case.sop_uid), case.name
        return status
    valid = is_valid_uid(case.sop_uid)
    shown = case.sop_uid if valid else "(invalid UID"
    assert f"refused SOP {shown}" in text and f"0x{status:04X}" in text, case.name
    hint = case.sop_uid if valid else "invalid"
    copies = list((s.root / "quarantine").glob(f"*_{hint}_*.dcm"))
    assert copies, f"{case.name}: no copy"
    assert all(c.stat().st_size <= COPY_CAP_KIB * 1024 for c in copies), case.name
    assert list((s.root / "quarantine").glob(f"*_{hint}_*.reason.txt")), case.name
    if status == Status.SOP_IN_OTHER_STUDY:  # the SOP is stored, under its first study only
        assert _stored_in(s, case.sop_uid) not in (None, _study_of(case)), case.name
    else:
        assert not _stored(s, case.sop_uid), f"{case.name}: refused yet stored"
    return status


def _quarantine_within_bounds(root: Path) -> None:
    """No copy over the header cap, the folder under its quota (housekeeping's pass applies the
    configured one within a second or so)."""
    folder = root / "quarantine"
    assert max(p.stat().st_size for p in folder.iterdir()) <= COPY_CAP_KIB * 1024
    files = FileStore(root)
    wait_for(lambda: files.quarantine_usage().size_bytes <= QUOTA_MB * 2**20, 15,
             "the quarantine to be trimmed under its quota")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= QUOTA_MB * 2**20


def test_catalogue(served: Served) -> None:
    cases = hostile.corpus(served.base, seed=7)
    assert {c.status for c in cases} >= {Status.TOO_LARGE, Status.CANNOT_DECODE}
    for case in cases:
        _check(served, case)
        if case.name.startswith("size:"):  # the big ones keep their header, named so
            [copy] = (served.root / "quarantine").glob(f"*_{case.sop_uid}_*.dcm")
            assert copy.name.endswith("-truncated.dcm"), case.name
    assert echo_ok(served.node.port)
    _quarantine_within_bounds(served.root)
    wait_for(lambda: "quarantine over its quota" in served.node.log_path.read_text(
        errors="replace"), 15, "the catalogue to pass the quarantine's quota and be trimmed")


@EXAMPLES
@given(st.data())
def test_truncated(served: Served, data: st.DataObject) -> None:
    size = len(hostile.encode(served.base))
    _check(served, hostile.truncated(served.base, 11, data.draw(st.integers(0, size - 1))))


@EXAMPLES
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                max_size=8))
def test_garbled(served: Served, flips: list[tuple[int, int]]) -> None:
    _check(served, hostile.garbled(served.base, 12, flips))


@EXAMPLES
@given(st.sampled_from(hostile.PIXEL_FIELDS),
       st.one_of(st.integers(-(2**31), 2**32), st.sampled_from(hostile.MUTATION_VALUES),
                 st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
                         max_size=16)))
def test_header_mutation(served: Served, keyword: str, value: int | str) -> None:
    _check(served, hostile.header_mutation(served.base, 13, keyword, value))


@EXAMPLES
@given(st.sampled_from(hostile.SWAP_KEYWORDS), st.sampled_from(hostile.SWAP_VRS))
def test_vr_swap(served: Served, keyword: str, vr: str) -> None:
    _check(served, hostile.vr_swap(served.base, 14, keyword, vr))


@EXAMPLES
@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**31 - 1))
def test_wrong_or_absurd_dimensions(served: Served, rows: int, cols: int, frames: int) -> None:
    _check(served, hostile.dimensions(served.base, 15, rows, cols, frames))


@EXAMPLES
@given(st.integers(0, 40_000))
def test_wrong_pixel_length(served: Served, n_bytes: int) -> None:
    _check(served, hostile.pixel_length(served.base, 16, n_bytes))


@pytest.mark.filterwarnings("ignore::UserWarning")  # our own sender, warned about its UIDs
def test_zz_still_serving_memory_bounded_no_phi(served: Served) -> None:
    """Runs last in this module: after every input above."""
    patient = (str(served.base.PatientName), str(served.base.PatientID))
    for case in hostile.phi_bearing(served.base, 17, *patient):
        _check(served, case)
    assert echo_ok(served.node.port)
    assert served.node.proc is not None
    assert process_tree(served.node.proc.pid)[1:] == [served.receiver_pid], \
        "the receiver process was restarted: an input crashed it"
    peak = sum(tree_rss_mib(served.node.proc.pid, "VmHWM"))
    growth = peak - served.baseline_rss_mib
    log_text = served.node.log_path.read_text(errors="replace")
    print(f"\n{len(served.tried)} hostile inputs tried; node RSS {served.baseline_rss_mib:.0f} "
          f"MiB idle, peak {peak:.0f} MiB (+{growth:.0f})")
    assert growth < RSS_GROWTH_LIMIT_MIB
    assert len(served.tried) >= 150
    _quarantine_within_bounds(served.root)
    for value in patient:
        assert value not in log_text, "patient data in the node's log"
    assert "Traceback" not in log_text and "failed unexpectedly" not in log_text


# --- codestream bombs from 10 associations at once ------------------------------------------


def test_codestream_bombs_from_10_associations_keep_memory_bounded(
        tmp_path: Path, untrained_model: Path) -> None:
    """A node of its own (a clean peak): 10 senders at once, each sending every codestream bomb
    (J2K bare and in a JP2 box, 4096 tiles, JPEG baseline and lossless, JPEG-LS, RLE) a few
    times on fresh associations. Every one gets its status; the peak RSS of both processes
    stays within BOMB_RSS_GROWTH_LIMIT_MIB of the idle node (without the codestream check one
    JPEG-LS bomb alone costs a decoder about 1.5 GiB)."""
    pacs = PacsStandIn(ae_title="SOAK_PACS")
    pacs.start()
    port = free_port()
    # every sender calls from 127.0.0.1: the listener's per-address limits would drop some
    config = write_config(tmp_path / "config.toml", node_sections(
        tmp_path / "node", untrained_model, port, pacs.port,
        node={"max_connections_per_address": 32, "max_connection_rate_per_address": 0.0}))
    node = NodeProc(config, port, tmp_path / "node.log")
    try:
        node.start()
        wait_for(lambda: "listening on" in node.log_path.read_text(errors="replace"), 30,
                 "the node to log that it is listening")
        assert node.proc is not None and len(process_tree(node.proc.pid)) == 2
        idle = sum(tree_rss_mib(node.proc.pid))
        bombs = hostile.codestream_bombs(hostile.base_dataset(7), 7)
        answers = _send_from_threads(bombs, node.port, tmp_path / "work")
        peaks = tree_rss_mib(node.proc.pid, "VmHWM")
        assert node.alive() and echo_ok(node.port)
    finally:
        node.stop()
        pacs.stop()
    growth = sum(peaks) - idle
    print(f"\n{len(answers)} codestream bombs from {BOMB_SENDERS} associations at once: node "
          f"RSS {idle:.0f} MiB idle, peak {sum(peaks):.0f} MiB (classifier {peaks[0]:.0f}, "
          f"receiver {peaks[1]:.0f}): +{growth:.0f} MiB")
    wrong = [(c.name, s) for c, s in answers if s != c.status]
    assert not wrong, wrong
    assert len(answers) == BOMB_SENDERS * BOMB_ROUNDS * len(bombs)
    assert growth <= BOMB_RSS_GROWTH_LIMIT_MIB


def _send_from_threads(cases: list[hostile.HostileInput], port: int, workdir: Path
                       ) -> list[tuple[hostile.HostileInput, int | None]]:
    """BOMB_SENDERS threads, each sending every case BOMB_ROUNDS times, one association per
    C-STORE (so up to BOMB_SENDERS at once); (case, status) of every send."""
    dest = Destination("DSCINT", "127.0.0.1", port)
    answers: list[tuple[hostile.HostileInput, int | None]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def sender(n: int) -> None:
        try:
            for _ in range(BOMB_ROUNDS):
                for case in cases:
                    status = hostile.send_input(case, dest, f"BOMBER{n}", workdir / str(n))
                    with lock:
                        answers.append((case, status))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(BOMB_SENDERS)]
    with hostile.raw_sending():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    return answers
