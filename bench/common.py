"""Benchmark plumbing on top of tests/support (ports, the node in its own process, /proc
memory): CPU time from /proc, and a node configured and started as a benchmark runs it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.support.net import NODE_AE, free_port
from tests.support.nodeproc import NodeProc, process_tree, write_config

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> list[float]:
    """CPU seconds of a process and each live descendant (a node's two processes), parent
    first."""
    out = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(cpu_seconds(p))
    return out


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
