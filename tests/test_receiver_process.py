"""The receiver in a process of its own ([node].receiver_process, the default): studies still go
through, the process is torch-free, restarted when it dies, ended with its node, and a port
already in use fails start-up with a reason."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from node.classify.worker import WORKER_NICENESS
from node.demo.modality import send_paths
from node.demo.pacs_standin import PacsStandIn
from node.export.scu import Destination
from node.receive.process import ReceiverProcess, ReceiverStartError
from node.service.health import Report, metrics_text
from node.service.node import Node
from tests.support.net import echo_ok, free_port
from tests.support.nodeproc import NodeProc, gone, process_tree, write_config
from tests.support.nodes import CALLER, node_config, wait_sr
from tests.support.wait import wait_for


def _process_config(root: Path, model: Path, pacs_port: int, port: int = 0) -> object:
    return node_config(root, model, pacs_port, node={"receiver_process": True, "port": port})


@pytest.fixture
def proc_node(tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> Iterator[Node]:
    cfg = _process_config(tmp_path / "node", untrained_model, pacs.port)
    with Node(cfg) as n:  # type: ignore[arg-type]
        yield n


def _wait_gone(pid: int, what: str = "process", timeout: float = 10.0) -> None:
    """Wait until no process `pid` runs (a zombie counts as gone)."""
    wait_for(lambda: gone(pid), timeout, f"{what} {pid} to end")


def _send_study(tmp: Path, port: int, seed: int) -> str:
    paths = write_study(generate_study("normal", seed=seed), tmp / f"study{seed}",
                        DicomLayout.MULTIFRAME)
    assert send_paths(paths, Destination("DSCINT", "127.0.0.1", port), CALLER) == [0]
    from pydicom import dcmread
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def test_a_study_goes_through_the_receiver_process(proc_node: Node, pacs: PacsStandIn,
                                                   tmp_path: Path) -> None:
    pid = proc_node.receiver_pid
    assert pid is not None and pid != os.getpid() and pid in process_tree(os.getpid())
    uid = _send_study(tmp_path, proc_node.port, seed=1)
    sr = wait_sr(pacs, uid)  # completion crossed the pipe, the worker here classified it
    assert str(sr.StudyInstanceUID) == uid
    stored = list((proc_node.cfg.storage_root / "studies" / uid).rglob("*.dcm"))
    assert len(stored) == 1


def test_the_receiver_process_never_loads_torch(proc_node: Node) -> None:
    pid = proc_node.receiver_pid
    assert pid is not None
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "libtorch" in Path(f"/proc/{os.getpid()}/maps").read_text()  # the check can fail


def test_a_killed_receiver_is_restarted_on_the_same_port(proc_node: Node, pacs: PacsStandIn,
                                                         tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    old = proc_node.receiver_pid
    assert old is not None
    port = proc_node.port
    os.kill(old, signal.SIGKILL)
    _wait_gone(old, "the killed receiver")

    def seen_down() -> Report | None:
        report = proc_node.health()
        return None if report["receiver"]["alive"] else report

    # it is restarted after a 1 s pause: look inside that pause
    down = wait_for(seen_down, 0.8, "health to report the receiver down", interval=0.02)
    assert down["receiver"] == {"alive": False, "restarts": 0}
    assert down["status"] == "degraded" and "receiver process not running" in down["problems"][0]
    wait_for(lambda: proc_node.receiver_pid not in (None, old) and echo_ok(port, timeout=2.0),
             30, "a new receiver answering C-ECHO on the same port", interval=0.1)
    assert "receiver process exited with code -9; restarting it on port" in caplog.text
    up = proc_node.health()
    assert up["receiver"] == {"alive": True, "restarts": 1} and up["status"] == "ok"
    assert "dscint_receiver_restarts_total 1" in metrics_text(up)
    uid = _send_study(tmp_path, port, seed=2)
    assert str(wait_sr(pacs, uid).StudyInstanceUID) == uid


def test_stop_ends_the_receiver_and_frees_its_port(tmp_path: Path, untrained_model: Path,
                                                   pacs: PacsStandIn) -> None:
    node = Node(_process_config(tmp_path / "node", untrained_model, pacs.port))  # type: ignore[arg-type]
    node.start()
    pid, port = node.receiver_pid, node.port
    assert pid is not None and echo_ok(port)
    node.stop()
    _wait_gone(pid, "the receiver")
    with socket.socket() as s:  # nothing listens there any more (TIME_WAIT aside, as servers)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_port_in_use_fails_start_up_with_the_reason(tmp_path: Path, untrained_model: Path,
                                                      pacs: PacsStandIn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = Node(_process_config(tmp_path / "node", untrained_model, pacs.port,  # type: ignore[arg-type]
                                    port=port))
        t0 = time.monotonic()
        with pytest.raises(ReceiverStartError, match="exited with code 2 before listening"):
            node.start()
        assert time.monotonic() - t0 < 30  # a few seconds' retry, then the reason
        assert not node._threads  # the worker and exporter it had started are stopped


def test_the_receiver_dies_with_its_node_and_a_restart_gets_the_port(
        tmp_path: Path, untrained_model: Path, pacs: PacsStandIn) -> None:
    """SIGKILL of `python -m node serve` (a power cut of the node): its receiver goes with it,
    so the node started again can listen on the same port."""
    port = free_port()
    cfg = write_config(tmp_path / "config.toml", {
        "node": {"ae_title": "DSCINT", "port": port},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs.port},
        "storage": {"root": str(tmp_path / "node")}, "model": {"path": str(untrained_model)},
        "logging": {"level": "INFO"}})
    node = NodeProc(cfg, port, tmp_path / "node.log")
    node.start()
    try:
        tree = process_tree(node.pid)
        assert len(tree) == 2, "serve runs a receiver process"
        node.kill()
        _wait_gone(tree[1], "the receiver (outliving its node?)")
        node.start()  # binds the same port
        assert echo_ok(port)
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    assert log.count("listening on 127.0.0.1") >= 2


def test_the_receiver_module_imports_without_torch_or_highdicom() -> None:
    """Import-level guard: what node.receive.process pulls in stays torch- and highdicom-free (they
    are 213 and 19 MiB the receiver process has no use for)."""
    import subprocess
    code = ("import sys, node.receive.process; "
            "print('torch' in sys.modules, 'highdicom' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False False"


def test_the_receiver_admits_every_character_set_the_sr_builder_knows_and_korean() -> None:
    """The receiver's list (spelled out, no highdicom import) covers highdicom's and the
    DICOM terms it lacks (ISO 2022 IR 149, Korean): those SRs are written in UTF-8."""
    from highdicom.enum import SpecificCharacterSetValues

    from node.dicom.admission import DEFINED_CHARSETS
    assert {v.value for v in SpecificCharacterSetValues} <= DEFINED_CHARSETS
    assert "ISO 2022 IR 149" in DEFINED_CHARSETS


def _nice(pid: int, tid: int) -> int:
    """Niceness of one thread, from /proc (field 19 of stat)."""
    return int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_classification_runs_below_the_receivers_priority(proc_node: Node, pacs: PacsStandIn,
                                                          tmp_path: Path) -> None:
    """Under CPU pressure a camera's C-STORE goes first: the worker thread, and the torch
    threads it starts for inference, run at nice +WORKER_NICENESS; the receiver at the
    node's own niceness."""
    uid = _send_study(tmp_path, proc_node.port, seed=3)
    wait_sr(pacs, uid)  # inference ran, so the worker's torch threads exist
    base = os.nice(0)
    worker_tid = next(t.native_id for t in threading.enumerate() if t.name == "worker-0")
    assert worker_tid is not None
    assert _nice(os.getpid(), worker_tid) == base + WORKER_NICENESS
    receiver = proc_node.receiver_pid
    assert receiver is not None
    tids = [int(t.name) for t in Path(f"/proc/{receiver}/task").iterdir()]
    assert {_nice(receiver, t) for t in tids} == {base}


# --- the parent's side when the child misbehaves ---------------------------------------------

_SILENT = "import time; time.sleep(60)"  # never listens
_DEAF = ("import sys, time; sys.stdin.readline(); print('listening 1', flush=True); "
         "time.sleep(60)")  # listens, then ignores the request to stop


def _receiver(tmp_path: Path, untrained_model: Path, entry: str) -> ReceiverProcess:
    cfg = _process_config(tmp_path / "node", untrained_model, 104)
    return ReceiverProcess(cfg, on_complete=lambda: None, entry=entry)  # type: ignore[arg-type]


def test_a_receiver_that_never_listens_fails_start_up(tmp_path: Path,
                                                      untrained_model: Path) -> None:
    receiver = _receiver(tmp_path, untrained_model, _SILENT)
    with pytest.raises(ReceiverStartError, match="did not listen within 1 s"):
        receiver.start(timeout=1.0)
    assert receiver.pid is not None
    _wait_gone(receiver.pid, "the silent receiver")  # not left behind


def test_a_receiver_that_ignores_stop_is_killed(tmp_path: Path, untrained_model: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    receiver = _receiver(tmp_path, untrained_model, _DEAF).start(timeout=30)
    assert receiver.alive() and receiver.port == 1
    receiver.stop(timeout=1.0)
    assert receiver.pid is not None
    _wait_gone(receiver.pid, "the deaf receiver")
    assert "receiver process did not stop within 1 s; killing it" in caplog.text


def test_unknown_lines_from_the_receiver_are_ignored(tmp_path: Path,
                                                     untrained_model: Path) -> None:
    completions: list[int] = []
    receiver = _receiver(tmp_path, untrained_model, _SILENT)
    receiver.on_complete = lambda: completions.append(1)
    for words in (["listening", "x"], ["hello"], [], ["listening"], ["complete", "1.2.3"]):
        receiver._on_line(words)
    assert completions == [1] and receiver.port == 0 and not receiver.alive()
