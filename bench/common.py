"""Benchmark plumbing on top of tests/support (ports, the node in its own process, /proc
memory): CPU time from /proc, and a node configured and started as a benchmark runs it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from tests.support.net import NODE_AE, free_port
from tests.support.nodeproc import (
    REPO,
    START_TIMEOUT,
    NodeProc,
    export_model,
    process_tree,
    write_config,
)

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


_EXPORT_INT8 = """
import sys
from pathlib import Path
import torch
from model.dscint import Dscint, DscintProbabilities
from model.export import ModelMetadata, export_torchscript
torch.manual_seed(0)
meta = ModelMetadata(version="bench-int8", weights_sha256="",
                     training_data="untrained (random weights) bench model",
                     trained_on_phantoms=True)
export_torchscript(DscintProbabilities(Dscint()), Path(sys.argv[1]), meta, precision="int8")
"""


def export_bench_model(path: Path, precision: str = "fp32") -> Path:
    """The untrained full-size test model, exported in a child process (the bench itself never
    maps libtorch); `precision` "int8" records int8 serving when its held-out check passes,
    so the node serves FC1 in int8 after checking it again at load."""
    if precision == "fp32":
        return export_model(path)
    subprocess.run([sys.executable, "-c", _EXPORT_INT8, str(path)], cwd=REPO, check=True)
    return path


def start_bench_node(workdir: Path, model: Path, pacs_port: int, quiet_seconds: float = 120.0,
                     receiver_process: bool = True, start_timeout: float = START_TIMEOUT
                     ) -> NodeProc:
    """The node as deployed, for a benchmark: config.toml under workdir, a free port, started.
    `receiver_process=False` runs the one-process variant ([node].receiver_process); an int8
    model's load-time check (~5 s quiet) may need a longer `start_timeout` on a busy machine."""
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
    node.start(start_timeout)
    return node
