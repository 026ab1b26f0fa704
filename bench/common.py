"""Benchmark plumbing on top of tests/support (ports, the node in its own process, /proc
memory): CPU time from /proc, and a node configured and started as a benchmark runs it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
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


def rss_pss_mib(pid: int) -> tuple[float, float, float]:
    """(RSS, PSS, anonymous) of a process in MiB from /proc/<pid>/smaps_rollup. RSS counts
    every resident page the process maps, so two processes sharing a library page both count
    it; PSS splits each shared page among its sharers (any process on the machine), so PSS sums
    to what the processes really hold; anonymous is what the process allocated itself (heap,
    weights, Python objects), whoever else maps its libraries."""
    values = {"Rss:": float("nan"), "Pss:": float("nan"), "Anonymous:": float("nan")}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in values:
            values[key] = int(line.split()[1]) / 1024
    return values["Rss:"], values["Pss:"], values["Anonymous:"]


def tree_memory_mib(pid: int) -> list[tuple[float, float, float]]:
    """(RSS, PSS, anonymous) of a process and each live descendant, parent first (the node:
    classifier process, then receiver process)."""
    out = []
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            out.append(rss_pss_mib(p))
    return out


@dataclass
class MemorySampler:
    """Samples a process tree's RSS and PSS every `interval` seconds in a thread while a
    benchmark runs: the peak of each process and the peak of the sum (sampled, so a spike
    shorter than the interval may be missed; VmHWM catches it, for RSS only)."""

    pid: int
    interval: float = 0.2
    peak_rss: list[float] = field(default_factory=list)
    peak_pss: list[float] = field(default_factory=list)
    peak_anon: list[float] = field(default_factory=list)
    peak_rss_sum: float = 0.0
    peak_pss_sum: float = 0.0
    peak_anon_sum: float = 0.0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def sample(self) -> None:
        """One reading, folded into the peaks."""
        mem = tree_memory_mib(self.pid)
        if not mem:
            return
        rss, pss, anon = ([m[i] for m in mem] for i in range(3))
        self.peak_rss = [max(a, b) for a, b in zip(rss, self.peak_rss or rss, strict=False)]
        self.peak_pss = [max(a, b) for a, b in zip(pss, self.peak_pss or pss, strict=False)]
        self.peak_anon = [max(a, b) for a, b in zip(anon, self.peak_anon or anon, strict=False)]
        self.peak_rss_sum = max(self.peak_rss_sum, sum(rss))
        self.peak_pss_sum = max(self.peak_pss_sum, sum(pss))
        self.peak_anon_sum = max(self.peak_anon_sum, sum(anon))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


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
    try:
        node.start(start_timeout)
    except BaseException:  # a node too slow to answer would outlive the benchmark
        if node.alive():
            node.stop()
        raise
    return node
