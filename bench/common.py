"""Shared benchmark plumbing: free ports, process CPU/RSS from /proc, a node in its own process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port the OS considers free right now (bind to 0, read, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@dataclass
class NodeProcess:
    """`python -m node serve` with a config written for the benchmark."""

    config: Path
    port: int
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, workdir: Path, model: Path, pacs_port: int, quiet_seconds: float = 120.0,
              extra: str = "") -> NodeProcess:
        """Write config.toml under workdir and start the node on a free port."""
        port = free_port()
        cfg = workdir / "config.toml"
        cfg.write_text(
            f'[node]\nae_title = "DSCINT"\nport = {port}\n{extra}\n'
            f'[pacs]\nae_title = "BENCH_PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
            f'[storage]\nroot = "{workdir / "node"}"\n[model]\npath = "{model}"\n'
            f'[completion]\nquiet_seconds = {quiet_seconds}\nsweep_seconds = 0.2\n'
            f'[export]\nbackoff_base_seconds = 0.5\nbackoff_cap_seconds = 2.0\n'
            f'[logging]\nlevel = "WARNING"\n')
        proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        return cls(cfg, port, proc)

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
