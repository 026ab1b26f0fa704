"""The node as deployed, in a process of its own (`python -m node serve --config ...`), for
tests and benchmarks: a config.toml written from sections, the process started until it
answers C-ECHO, killed or stopped, and its processes' memory read from /proc."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import echo_ok
from tests.support.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0


# --- config.toml ---------------------------------------------------------------------------


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


# --- /proc ---------------------------------------------------------------------------------


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


def tree_rss_mib(pid: int, key: str = "VmRSS") -> list[float]:
    """RSS (or peak RSS, VmHWM) of a process and each live descendant, MiB, parent first.
    The sum of peaks bounds the whole node's peak from above (they need not coincide)."""
    out = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            out.append(rss_mib(p, key))
    return out


def gone(pid: int) -> bool:
    """True when no process `pid` runs (a zombie counts as gone: it runs no code)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


# --- the node process ----------------------------------------------------------------------


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
        """Start and wait until it answers C-ECHO: RuntimeError when the node exits first,
        WaitTimeout (a TimeoutError) when it does not answer in time."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.starts += 1
        wait_for(self._answers, timeout, f"the node to answer C-ECHO on port {self.port}",
                 interval=0.2)

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"node exited with {code} during start-up; see {self.log_path}")
        return echo_ok(self.port, timeout=2.0)

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
        return terminate(self.proc)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM, wait for a graceful exit (SIGKILL after `timeout`); the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def export_model(path: Path) -> Path:
    """The untrained full-size test model, exported in a child process: the calling process
    itself never loads torch, so the node is the only process mapping libtorch, as deployed
    (pages shared with another process would count in both RSS figures and could not be
    released by the node)."""
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from tests.conftest import export_untrained; "
                    "export_untrained(Path(sys.argv[1]))", str(path)], cwd=REPO, check=True)
    return path
