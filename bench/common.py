"""Shared benchmark plumbing: free ports, process CPU/RSS from /proc, a node in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[1]
NODE_AE = "DSCINT"
VERIFICATION = "1.2.840.10008.1.1"
START_TIMEOUT = 120.0


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports the OS considers free now (all bound to port 0 at once, so
    the OS cannot hand the same port out twice, then closed for the server to take)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free TCP port (see free_ports)."""
    return free_ports(1)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants now (the node and its receiver process), from /proc."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in task.read_text().split()]
        i += 1
    return pids


def tree_cpu_seconds(pid: int) -> list[float]:
    """CPU seconds of a process and each live descendant (a node's two processes), parent
    first."""
    out = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(cpu_seconds(p))
    return out


def tree_rss_mib(pid: int, key: str = "VmRSS") -> list[float]:
    """RSS (or peak RSS, VmHWM) of a process and each live descendant, MiB, parent first.
    The sum of peaks bounds the whole node's peak from above (they need not coincide)."""
    out = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            out.append(rss_mib(p, key))
    return out


def wait_port(port: int, timeout: float = 60.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle on unless TCP_NODELAY=1 is set: ~45 ms per C-STORE otherwise."""
    return {**os.environ, "TCP_NODELAY": "1"}


def toml_value(value: object) -> str:
    """One TOML value (str, bool, int, float, list of str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """A config.toml from {section: {key: value}}, values quoted as TOML needs."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def echo_ok(port: int, timeout: float = 5.0) -> bool:
    """True when the node answers C-ECHO on 127.0.0.1:port."""
    ae = AE(ae_title="SOAK_PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return getattr(rsp, "Status", None) == 0
    finally:
        assoc.release()


@dataclass
class NodeProc:
    """`python -m node serve --config ...`, restartable; output appended to `log_path`."""

    config: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_mib: float = 0.0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until it answers C-ECHO; a node that exits first is an error."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode} during start-up; "
                                   f"see {self.log_path}")
            if echo_ok(self.port, timeout=2.0):
                return
            time.sleep(0.2)
        raise TimeoutError(f"node did not answer C-ECHO within {timeout} s")

    @property
    def pid(self) -> int:
        """The running node's process id (for /proc readings)."""
        if self.proc is None:
            raise RuntimeError("node not started")
        return self.proc.pid

    def alive(self) -> bool:
        """Still running (not exited on its own)."""
        return self.proc is not None and self.proc.poll() is None

    def sample_rss(self) -> float:
        """Record the node's peak RSS so far, MiB: the sum of its processes' peaks (VmHWM)."""
        if self.alive() and self.proc is not None:
            self.peak_rss_mib = max(self.peak_rss_mib, sum(tree_rss_mib(self.proc.pid, "VmHWM")))
        return self.peak_rss_mib

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a power cut of the process."""
        if self.proc is not None:
            self.sample_rss()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM and wait (graceful); the exit code."""
        if self.proc is None:
            return None
        self.sample_rss()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def export_model(path: Path) -> Path:
    """The untrained full-size test model, exported in a child process: the benchmark process
    itself never loads torch, so the node is the only process mapping libtorch, as deployed
    (pages shared with another process would count in both RSS figures and could not be
    released by the node)."""
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from tests.conftest import export_untrained; "
                    "export_untrained(Path(sys.argv[1]))", str(path)], cwd=REPO, check=True)
    return path


def start_bench_node(workdir: Path, model: Path, pacs_port: int, quiet_seconds: float = 120.0,
                     receiver_process: bool = True) -> NodeProc:
    """The node as deployed, for a benchmark: config.toml under workdir, a free port, started.
    `receiver_process=False` runs the one-process variant ([node].receiver_process)."""
    port = free_port()
    cfg = write_config(workdir / "config.toml", {
        "node": {"ae_title": NODE_AE, "port": port, "receiver_process": receiver_process},
        "pacs": {"ae_title": "BENCH_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(workdir / "node")},
        "model": {"path": str(model)},
        "completion": {"quiet_seconds": quiet_seconds, "sweep_seconds": 0.2},
        "export": {"backoff_base_seconds": 0.5, "backoff_cap_seconds": 2.0},
        "logging": {"level": "WARNING"},
    })
    node = NodeProc(cfg, port, workdir / "node.log")
    node.start()
    return node
