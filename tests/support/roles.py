"""Receivers and workers as separate processes on one queue (`python -m node receive` and
`python -m node worker`), for the multi-process tests and `bench.scale`: their config.toml,
start until ready, SIGKILL, stop; and phantom studies to send them."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from model.classes import CLASS_NAMES
from model.phantom_dicom import DicomLayout, write_study
from model.phantoms import generate_study
from tests.support.net import NODE_AE, echo_ok, free_port
from tests.support.nodeproc import REPO, START_TIMEOUT, terminate, write_config
from tests.support.wait import wait_for

WORKER_READY = "(worker) classifying with model"


def role_config(path: Path, *, root: Path, database: str, model: Path, pacs_port: int,
                port: int = 0, lease_seconds: float = 3.0, sweep_seconds: float = 0.2
                ) -> Path:
    """One role process's config.toml: every process shares root, database and model;
    a receiver has its own port. Receivers receive in threads (one process per role)."""
    return write_config(path, {
        "node": {"ae_title": NODE_AE, "port": port, "receiver_process": False,
                 "worker_threads": 1, "torch_threads": 1,
                 "claim_lease_seconds": lease_seconds, "classify_backoff_seconds": 0.5},
        "pacs": {"ae_title": "TEST_PACS", "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root), "database": database},
        "model": {"path": str(model)},
        "completion": {"quiet_seconds": 2.0, "sweep_seconds": sweep_seconds},
        "export": {"backoff_base_seconds": 0.2, "backoff_cap_seconds": 1.0},
    })


@dataclass
class RoleProc:
    """`python -m node receive|worker --config ...`; output appended to `log_path`."""

    role: str
    config: Path
    log_path: Path
    port: int = 0  # a receiver's listening port
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def make(cls, role: str, workdir: Path, name: str, *, database: str, model: Path,
             pacs_port: int, root: Path, lease_seconds: float = 3.0) -> RoleProc:
        """Config written under workdir/name; a receiver gets a free port."""
        port = free_port() if role == "receive" else 0
        cfg = role_config(workdir / f"{name}.toml", root=root, database=database, model=model,
                          pacs_port=pacs_port, port=port, lease_seconds=lease_seconds)
        return cls(role, cfg, workdir / f"{name}.log", port)

    def start(self, timeout: float = START_TIMEOUT) -> RoleProc:
        """Start; return once a receiver answers C-ECHO or a worker logged it is classifying.
        RuntimeError when the process exits first."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", self.role, "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout, f"the {self.role} process to be ready", interval=0.2)
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{self.role} exited with {code}; {self.log_path} ends:\n"
                               + "\n".join(tail))
        if self.role == "receive":
            return echo_ok(self.port, timeout=2.0)
        return WORKER_READY in self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        """The process id (a worker's claims carry ``worker<pid>``)."""
        if self.proc is None:
            raise RuntimeError(f"{self.role} not started")
        return self.proc.pid

    @property
    def claim_tag(self) -> str:
        """The part of `claimed_by` that names this worker process."""
        return f":{self.role}{self.pid}:"

    def kill(self) -> None:
        """SIGKILL: no chance to release its claims, as in a machine that dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM and wait (graceful); the exit code."""
        if self.proc is None:
            return None
        return terminate(self.proc)


def phantom_studies(out: Path, n: int, seed: int = 500) -> list[tuple[str, list[Path]]]:
    """n phantom studies (anterior and posterior as two instances), as (study UID, files)."""
    studies = []
    for i in range(n):
        st = generate_study(CLASS_NAMES[i % len(CLASS_NAMES)], seed=seed + i)
        paths = write_study(st, out / f"s{i}", DicomLayout.PER_VIEW)
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append((uid, paths))
    return studies
