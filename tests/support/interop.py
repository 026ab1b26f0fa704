"""Real DICOM software around the node in tests: DCMTK tools, storescp and Orthanc processes.

Every server runs on 127.0.0.1 on a port the OS hands out, in a temporary folder, and is
stopped by its own PID (terminate, wait, kill). Every DCMTK tool and Orthanc gets
``TCP_NODELAY=1``: DCMTK 3.6.7 leaves Nagle on otherwise and each C-STORE stalls ~45 ms
(field notes §5). Orthanc is driven through its REST API with urllib (no extra dependency).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.config import Config, load_config, with_overrides
from tests.support.net import dcmtk_env, free_port, free_ports
from tests.support.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
INSTALL_HINT = "run `bash .ci/system-deps.sh` (Debian packages dcmtk, orthanc, dicom3tools)"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SERVER_START_SECONDS = 15.0
STOP_SECONDS = 5.0


# --- tools ---------------------------------------------------------------------------------


@functools.cache
def find_tool(name: str) -> str | None:
    """Path of a system tool, never a Python namesake: pynetdicom installs apps called
    storescu, storescp and echoscu into the venv, with other options than DCMTK's. Debian
    puts Orthanc in /usr/sbin, which a user's PATH may lack."""
    for d in [*os.environ.get("PATH", "").split(os.pathsep), *SBIN_DIRS]:
        found = shutil.which(name, path=d) if d else None
        if found and not _is_python_script(Path(found)):
            return found
    return None


def _is_python_script(path: Path) -> bool:
    """True for a `#!...python` launcher (what pip writes), false for a native binary."""
    try:
        with path.open("rb") as fh:
            first = fh.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def require_tool(name: str) -> str:
    """The tool's path, or skip the test saying which tool is absent and how to get it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed; {INSTALL_HINT}")
    return path


def require_tools(*names: str) -> None:
    """Skip before any server starts when one of the tools a test drives is absent."""
    for name in names:
        require_tool(name)


def run_tool(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK/dicom3tools command to completion with Nagle off; output captured."""
    return subprocess.run(list(argv), env=dcmtk_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


# --- processes -----------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A server we started: output goes to a log file, stop() ends exactly this PID."""

    argv: list[str]
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        """Launch with Nagle off; output to the log so a failure can quote it."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=dcmtk_env(),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        """True while the process runs (a server that died at start-up fails fast)."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate, wait, kill if it will not go: never leave a process behind."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_SECONDS)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- DCMTK ---------------------------------------------------------------------------------


def echoscu(calling: str, called: str, port: int) -> subprocess.CompletedProcess[str]:
    """C-ECHO as a modality would (DCMTK echoscu)."""
    return run_tool([require_tool("echoscu"), "-aet", calling, "-aec", called,
                     "127.0.0.1", str(port)], timeout=30)


def storescu(paths: Sequence[Path], calling: str, called: str, port: int,
             flags: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """C-STORE files as a camera would; `flags` pick the proposed transfer syntaxes."""
    argv = [require_tool("storescu"), "-aet", calling, "-aec", called, *flags,
            "127.0.0.1", str(port), *(str(p) for p in paths)]
    return run_tool(argv, timeout=60)


@dataclass
class StoreSCP:
    """DCMTK storescp as a test PACS, writing each object bit-preserving into `out_dir`."""

    workdir: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    server: ServerProcess | None = field(default=None, init=False)

    @property
    def out_dir(self) -> Path:
        """Where received objects land (one file per SOP instance)."""
        return self.workdir / "received"

    def start(self) -> StoreSCP:
        """Start and wait until it answers C-ECHO."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        argv = [require_tool("storescp"), "-aet", self.ae_title, "-od", str(self.out_dir),
                "+B", str(self.port)]
        self.server = ServerProcess(argv, self.workdir / "storescp.log", self.workdir)
        self.server.start()
        wait_for(self._answers, SERVER_START_SECONDS, f"storescp on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.server is None or not self.server.alive():
            raise AssertionError(f"storescp exited: {self.server and self.server.log_tail()}")
        return echoscu("PROBE", self.ae_title, self.port).returncode == 0

    def received(self) -> list[Path]:
        """Files storescp wrote so far."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        """Stop by PID."""
        if self.server is not None:
            self.server.stop()


# --- Orthanc -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrthancInstance:
    """One instance as Orthanc lists it in a study."""

    orthanc_id: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str


@dataclass
class Orthanc:
    """The Debian Orthanc binary as PACS, configured by a JSON file in `workdir`.

    `modalities` maps a name to (AE title, host, port); with `allow_unknown` false Orthanc
    rejects associations from any AE not listed there (DicomAlwaysAllowEcho/Store false).
    Ports and folders stay the same across restart(), as for a PACS that is fixed in place.
    """

    workdir: Path
    ae_title: str = "ORTHANC"
    modalities: Mapping[str, tuple[str, str, int]] = field(default_factory=dict)
    allow_unknown: bool = True
    dicom_port: int = 0  # 0: a free port, chosen once
    http_port: int = 0
    server: ServerProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        """Pick both ports together so they differ; restart() keeps them."""
        if not self.dicom_port or not self.http_port:
            self.dicom_port, self.http_port = free_ports(2)

    @property
    def config_path(self) -> Path:
        """The JSON configuration Orthanc is started with."""
        return self.workdir / "orthanc.json"

    def config(self) -> dict[str, Any]:
        """Local only, no authentication, no plugins; unknown AEs per `allow_unknown`."""
        return {
            "Name": "dscint-interop", "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": self.allow_unknown,
            "DicomAlwaysAllowStore": self.allow_unknown,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
        }

    def start(self) -> Orthanc:
        """Write the config, start Orthanc, wait until its REST API answers /system."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        argv = [require_tool("Orthanc"), str(self.config_path)]
        self.server = ServerProcess(argv, self.workdir / "orthanc.log", self.workdir)
        self.server.start()
        wait_for(self._answers, SERVER_START_SECONDS, f"Orthanc REST on port {self.http_port}")
        return self

    def _answers(self) -> bool:
        if self.server is None or not self.server.alive():
            raise AssertionError(f"Orthanc exited: {self.server and self.server.log_tail()}")
        try:
            return bool(self.get("/system").get("DicomAet") == self.ae_title)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        """Stop by PID (Orthanc flushes its index on SIGTERM)."""
        if self.server is not None:
            self.server.stop()

    def restart(self, **changes: Any) -> Orthanc:
        """Stop, change settings (e.g. modalities), start again on the same ports and folders."""
        self.stop()
        for name, value in changes.items():
            setattr(self, name, value)
        return self.start()

    def log_tail(self) -> str:
        """Orthanc's recent log, for assertion messages."""
        return self.server.log_tail() if self.server is not None else ""

    def _request(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method)
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read().decode() or "null")

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        return self._request("GET", path)

    def post(self, path: str, body: object) -> Any:
        """POST a JSON body, JSON answer."""
        return self._request("POST", path, body)

    def put(self, path: str, body: object) -> Any:
        """PUT a JSON body, JSON answer."""
        return self._request("PUT", path, body)

    def add_modality(self, name: str, ae_title: str, port: int) -> None:
        """Declare a DICOM peer on 127.0.0.1 at run time (REST PUT /modalities/{name})."""
        self.put(f"/modalities/{name}", {"AET": ae_title, "Host": "127.0.0.1", "Port": port})

    def route(self, modality: str, resources: Sequence[str]) -> dict[str, Any]:
        """C-STORE the resources (studies, series, instances) to a declared peer with
        Orthanc's own SCU, synchronously, as a routing rule would; the job's answer. A failed
        C-STORE makes Orthanc answer an HTTP error: raised (urllib.error.HTTPError)."""
        answer = self.post(f"/modalities/{modality}/store",
                           {"Resources": list(resources), "Synchronous": True})
        return dict(answer or {})

    def clear(self) -> None:
        """Delete every patient, so tests sharing one Orthanc start from an empty PACS."""
        for pid in self.get("/patients"):
            self._request("DELETE", f"/patients/{pid}")

    def study_ids(self, study_uid: str) -> list[str]:
        """Orthanc IDs of the studies with this Study Instance UID (one, when all went well)."""
        found = self.post("/tools/find", {"Level": "Study",
                                          "Query": {"StudyInstanceUID": study_uid}})
        return [str(x) for x in found]

    def study_instances(self, study_uid: str) -> list[OrthancInstance]:
        """Every instance of the study, with its series' modality and its SOP class."""
        out: list[OrthancInstance] = []
        for sid in self.study_ids(study_uid):
            for series in self.get(f"/studies/{sid}/series"):
                tags = series.get("MainDicomTags", {})
                for iid in series.get("Instances", []):
                    simple = self.get(f"/instances/{iid}/simplified-tags")
                    out.append(OrthancInstance(
                        orthanc_id=str(iid), sop_instance_uid=str(simple["SOPInstanceUID"]),
                        sop_class_uid=str(simple["SOPClassUID"]),
                        series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
                        modality=str(tags.get("Modality", ""))))
        return out

    def sr_instances(self, study_uid: str) -> list[OrthancInstance]:
        """The study's Comprehensive 3D SR instances."""
        return [i for i in self.study_instances(study_uid)
                if i.sop_class_uid == COMPREHENSIVE_3D_SR]


# --- SR checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DciodvfyReport:
    """dciodvfy's verdict on one file: errors must be empty; warnings are reported."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def dciodvfy(path: Path) -> DciodvfyReport:
    """Run dicom3tools' dciodvfy (IOD and module checks) and split its messages."""
    done = run_tool([require_tool("dciodvfy"), str(path)], timeout=60)
    output = done.stdout + done.stderr
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = tuple(ln for ln in lines if ln.startswith("Error"))
    warnings = tuple(ln for ln in lines if ln.startswith("Warning"))
    return DciodvfyReport(errors, warnings, output)


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK's SR renderer: a viewer-side check that the content tree reads back."""
    return run_tool([require_tool("dsrdump"), str(path)], timeout=60)


def dataset_bytes(path: Path) -> bytes:
    """A Part-10 file's bytes after preamble and file meta group (what travelled by C-STORE).

    Both pydicom and DCMTK write (0002,0000) File Meta Information Group Length first, so
    the dataset starts at 132 + 12 + that length.
    """
    raw = path.read_bytes()
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path}: no Part-10 header with a group length")
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length:]


# --- the node ------------------------------------------------------------------------------


def interop_node_config(root: Path, model: Path, pacs_ae: str, pacs_port: int,
                        **overrides: dict[str, object]) -> Config:
    """A node on an OS-picked port, storing under `root`, sending SRs to the given PACS.

    A short quiet time completes single-object studies (the GE files carry one view).
    """
    sections: dict[str, dict[str, object]] = {
        "node": {"port": 0},
        "pacs": {"ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port},
        "storage": {"root": str(root)}, "model": {"path": str(model)},
        "completion": {"quiet_seconds": 0.5, "sweep_seconds": 0.1},
        "export": {"max_attempts": 3, "backoff_base_seconds": 0.2, "backoff_cap_seconds": 0.5},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return with_overrides(load_config(None), **sections)


def config_toml(cfg: Config) -> str:
    """The TOML a hospital would write for `cfg` (sections the CLI's resend reads)."""
    def q(value: object) -> str:  # a JSON string is a valid TOML basic string
        return json.dumps(str(value))
    return "\n".join([
        "[node]", f"ae_title = {q(cfg.node.ae_title)}", "",
        "[pacs]", f"ae_title = {q(cfg.pacs.ae_title)}", f"host = {q(cfg.pacs.host)}",
        f"port = {cfg.pacs.port}", "",
        "[storage]", f"root = {q(cfg.storage_root)}", "",
        "[model]", f"path = {q(cfg.model_path)}", "",
    ])
