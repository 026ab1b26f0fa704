"""Shared benchmark plumbing: free ports, process CPU/RSS from /proc, a node in its own process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
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


@dataclass
class NodeProcess:
    """`python -m node serve` with a config written for the benchmark."""

    config: Path
    port: int
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, workdir: Path, model: Path, pacs_port: int, quiet_seconds: float = 120.0
              ) -> NodeProcess:
        """Write config.toml under workdir and start the node on a free port."""
        port = free_port()
        cfg = write_config(workdir / "config.toml", {
            "node": {"ae_title": "DSCINT", "port": port},
            "pacs": {"ae_title": "BENCH_PACS", "host": "127.0.0.1", "port": pacs_port},
            "storage": {"root": str(workdir / "node")},
            "model": {"path": str(model)},
            "completion": {"quiet_seconds": quiet_seconds, "sweep_seconds": 0.2},
            "export": {"backoff_base_seconds": 0.5, "backoff_cap_seconds": 2.0},
            "logging": {"level": "WARNING"},
        })
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
