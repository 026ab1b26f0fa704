"""Health: what an admin, or a monitor, checks before users notice anything: queue depth, dead
letters, exports being retried, classification backlog, disk headroom and the model served.

`health_report` builds it (also printed by `python -m node status`); `HealthServer` serves it
over HTTP from one stdlib thread, on 127.0.0.1 unless configured otherwise:

- GET /health: JSON, 200 when "ok", 503 when "degraded" (a monitor's probe fires);
- GET /live: 200 while the process answers (for a supervisor: a PACS outage is no reason to
  restart the node);
- GET /metrics: the same numbers as Prometheus text.

Nothing in it identifies a patient: counts, ages, sizes, model identity.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from node.config import Config
from storage.db import Database
from storage.reports import queue_depth, work_backlog

log = logging.getLogger(__name__)

BACKLOG_SECONDS = 600.0  # a complete study waiting longer than this for a worker is trouble
LOW_DISK_FACTOR = 2  # warn while headroom is under twice the watermark, before refusals start

Report = dict[str, Any]


@dataclass(frozen=True)
class ModelSummary:
    """Identity of the model being served."""

    name: str
    version: str
    sha256: str


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor)."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return shutil.disk_usage(p).free


def _age(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else round(max((now - since).total_seconds(), 0.0), 1)


def backlog(db: Database, now: datetime) -> Report:
    """Exports waiting for a retry, the oldest pending work (as ages, so a monitor needs no
    clock of its own), failed studies, last export error."""
    work = work_backlog(db)
    return {"exports_retrying": work.exports_retrying,
            "oldest_pending_export_seconds": _age(work.oldest_pending_export_at, now),
            "oldest_pending_job_seconds": _age(work.oldest_pending_job_at, now),
            "failed_studies": work.failed_studies, "last_export_error": work.last_export_error}


def _problems(depth: dict[str, int], work: Report, free: int, watermark: int,
              model: ModelSummary | None, model_expected: bool) -> list[str]:
    """Everything that makes the node 'degraded', in words an admin can act on."""
    out = []
    if depth.get("dead_exports", 0):
        out.append(f"{depth['dead_exports']} SR export(s) dead-lettered: fix PACS, then run "
                   "`python -m node resend`")
    if work["exports_retrying"]:
        out.append(f"{work['exports_retrying']} SR export(s) being retried (PACS unreachable or "
                   f"refusing): {work['last_export_error'] or 'no error recorded'}")
    if watermark and free < watermark:
        out.append("free disk below the watermark: every C-STORE is refused (0xA700)")
    elif watermark and free < LOW_DISK_FACTOR * watermark:
        out.append("disk headroom low: C-STORE will be refused below the watermark")
    job_age = work["oldest_pending_job_seconds"]
    if job_age is not None and job_age > BACKLOG_SECONDS:
        out.append(f"classification backlog: the oldest complete study has waited {job_age:.0f} s")
    if model_expected and model is None:
        out.append("no model loaded")
    return out


def health_report(db: Database, cfg: Config, model: ModelSummary | None,
                  model_expected: bool = True, now: datetime | None = None) -> Report:
    """The node's health as JSON-ready data; 'degraded' lists why."""
    when = now or datetime.now(UTC)
    depth = queue_depth(db)
    work = backlog(db, when)
    free, watermark = disk_free(cfg.storage_root), cfg.min_free_bytes
    problems = _problems(depth, work, free, watermark, model, model_expected)
    return {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "time": when.isoformat(timespec="seconds"),
        "ae_title": cfg.node.ae_title,
        "queue": depth,
        "work": work,
        "disk": {"free_bytes": free, "watermark_bytes": watermark,
                 "headroom_bytes": free - watermark},
        "model": None if model is None else {"name": model.name, "version": model.version,
                                             "sha256": model.sha256},
    }


def add_receiver(report: Report, alive: bool, restarts: int) -> None:
    """The receiver process's state: down (being restarted) makes the node degraded, as no
    camera can store meanwhile; restarts so far are counted for the monitor."""
    report["receiver"] = {"alive": alive, "restarts": restarts}
    if not alive:
        report["problems"].append("receiver process not running (being restarted): C-STORE "
                                  "and C-ECHO are refused meanwhile")
        report["status"] = "degraded"


def metrics_text(report: Report) -> str:
    """The report's numbers in Prometheus exposition format."""
    lines = ["# TYPE dscint_degraded gauge",
             f"dscint_degraded {int(report.get('status') != 'ok')}",
             "# TYPE dscint_queue gauge"]
    lines += [f'dscint_queue{{kind="{k}"}} {v}' for k, v in report.get("queue", {}).items()]
    work = report.get("work", {})
    lines += ["# TYPE dscint_exports_retrying gauge",
              f"dscint_exports_retrying {work.get('exports_retrying', 0)}",
              "# TYPE dscint_failed_studies gauge",
              f"dscint_failed_studies {work.get('failed_studies', 0)}"]
    receiver = report.get("receiver")
    if receiver is not None:
        lines += ["# TYPE dscint_receiver_up gauge", f"dscint_receiver_up {int(receiver['alive'])}",
                  "# TYPE dscint_receiver_restarts_total counter",
                  f"dscint_receiver_restarts_total {receiver['restarts']}"]
    disk = report.get("disk", {})
    lines += ["# TYPE dscint_disk_free_bytes gauge",
              f"dscint_disk_free_bytes {disk.get('free_bytes', 0)}",
              "# TYPE dscint_disk_watermark_bytes gauge",
              f"dscint_disk_watermark_bytes {disk.get('watermark_bytes', 0)}"]
    return "\n".join(lines) + "\n"


def summary_line(report: Report) -> str:
    """One line for `python -m node status`."""
    disk = report["disk"]
    text = (f"health: {report['status']}; disk free {disk['free_bytes'] / 2**30:.1f} GiB "
            f"(watermark {disk['watermark_bytes'] / 2**20:.0f} MiB)")
    return text + "".join(f"\n  - {p}" for p in report["problems"])


class _HealthHTTPServer(ThreadingHTTPServer):
    """Carries the report function to the handler."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], report: Callable[[], Report]) -> None:
        self.report = report
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    """GET /health, /live, /metrics; anything else 404."""

    server: _HealthHTTPServer

    def do_GET(self) -> None:
        """Answer one probe; a failing report is itself 'degraded' (503), never a crash."""
        path = self.path.split("?", 1)[0]
        if path == "/live":
            self._send(200, "application/json", json.dumps({"status": "alive"}))
            return
        if path not in ("/health", "/metrics"):
            self._send(404, "application/json", json.dumps({"error": "not found"}))
            return
        try:
            report = self.server.report()
        except Exception as exc:  # database unavailable, say: that is the news
            log.exception("health check failed")
            report = {"status": "degraded", "problems": [f"health check failed: "
                                                         f"{type(exc).__name__}"]}
        if path == "/metrics":
            self._send(200, "text/plain; version=0.0.4", metrics_text(report))
        else:
            self._send(200 if report.get("status") == "ok" else 503, "application/json",
                       json.dumps(report))

    def _send(self, code: int, content_type: str, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood INFO: DEBUG only."""
        log.debug("health %s %s", self.address_string(), format % args)


class HealthServer:
    """The endpoint in a background thread; `port` is the bound one (0 asks the OS)."""

    def __init__(self, bind_address: str, port: int, report: Callable[[], Report]) -> None:
        """Bind now (an occupied port fails start-up, as the SCP's would)."""
        self._server = _HealthHTTPServer((bind_address, port), report)
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="health",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
