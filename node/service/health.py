"""Health: what an admin, or a monitor, checks before users notice anything: queue depth, dead
letters, exports being retried, classification backlog, disk headroom and the model served.

`health_report` builds it (also printed by `python -m node status`); `HealthServer` serves it
over HTTP from one stdlib thread, on 127.0.0.1 unless configured otherwise:

- GET /health: JSON, 200 when "ok", 503 when "degraded" (a monitor's probe fires);
- GET /live: 200 while the process answers (for a supervisor: a PACS outage is no reason to
  restart the node);
- GET /metrics: the same numbers as Prometheus text (the report's gauges, written here with
  their historical `dscint_*` names), then the counters and histograms of `Metrics`
  (prometheus-client, one registry per node; the receiver process's C-STORE counts reach it
  over its stdout pipe, see node.receive.process).

A client that connects and sends nothing, or half a request, is dropped after a few seconds
(`REQUEST_TIMEOUT_SECONDS` per read, `REQUEST_DEADLINE_SECONDS` in all), and at most
`MAX_CONNECTIONS` are served at once (more are closed unanswered): a stuck or hostile client
cannot hold threads forever.

Nothing in it identifies a patient: counts, ages, sizes, model identity.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import shutil
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from node.config import Config
from node.dicom.codes import sop_class_keyword
from node.service.drift import DriftReport
from node.service.drift import as_data as drift_data
from node.service.drift import problem_line as drift_problem
from storage.db import Database
from storage.intake import ignored_totals
from storage.jobs import failed_studies, jobs_retrying
from storage.reports import queue_depth, work_backlog
from storage.shadow import active_shadow

log = logging.getLogger(__name__)

BACKLOG_SECONDS = 600.0  # a complete study waiting longer than this for a worker is trouble
LOW_DISK_FACTOR = 2  # warn while headroom is under twice the watermark, before refusals start
FAILED_SHOWN = 5  # failed studies listed by UID and reason in the report
REQUEST_TIMEOUT_SECONDS = 5.0  # one read of a request may wait this long
REQUEST_DEADLINE_SECONDS = 10.0  # a whole connection, however slowly it trickles
MAX_CONNECTIONS = 8  # served at once; probes are quick, a monitor needs one or two

ACKED_REMEMBERED = 1024  # studies whose acknowledgement latency was observed (no double count)
MAX_CALLER_LABELS = 64  # distinct calling AE labels; more are counted as "other"
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CLASSIFY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
ACK_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 6 * 3600, 86400)

Report = dict[str, Any]


class Metrics:
    """Counters and histograms of one node, in a registry of its own (no global state: two
    nodes in one test process keep their numbers apart). Observers never raise."""

    def __init__(self, max_callers: int = MAX_CALLER_LABELS) -> None:
        r = self.registry = CollectorRegistry()
        self.instances = Counter("dscint_instances", "C-STORE requests answered, by DIMSE "
                                 "status and calling AE", ["status", "calling_ae"], registry=r)
        self.studies = Counter("dscint_studies", "studies classified or failed, by outcome and "
                               "class", ["outcome", "predicted_class"], registry=r)
        self.objects = Counter("dscint_objects", "export attempts of result objects (SR, "
                               "result image) by outcome: delivered, failed (retried later) or "
                               "dead (dead-lettered)", ["outcome"], registry=r)
        self.retries = Counter("dscint_retries", "retries scheduled, by stage", ["stage"],
                               registry=r)
        self.export_failures = Counter("dscint_export_failures", "failed export attempts by "
                                       "what happened (connection_refused, "
                                       "association_rejected, no_presentation_context, "
                                       "failure_status, ...)", ["reason"], registry=r)
        self.store_seconds = Histogram("dscint_cstore_seconds", "C-STORE handling: request "
                                       "received to answer sent", buckets=STORE_BUCKETS,
                                       registry=r)
        self.classify_seconds = Histogram("dscint_classify_seconds", "one study's "
                                          "classification, SR included",
                                          buckets=CLASSIFY_BUCKETS, registry=r)
        self.ack_seconds = Histogram("dscint_last_instance_to_ack_seconds", "a study's last "
                                     "instance written to PACS acknowledging its first result "
                                     "object (the SR)", buckets=ACK_BUCKETS, registry=r)
        self._shadow_metrics(r)
        self._acked: OrderedDict[str, None] = OrderedDict()  # studies already timed
        self._callers: set[str] = set()
        self._max_callers = max_callers
        self._lock = threading.Lock()

    def _caller_label(self, calling_ae: str) -> str:
        """The AE title, or "other" once `max_callers` distinct ones were seen (a caller
        choosing titles must not grow the registry without bound)."""
        ae = "".join(c if c.isascii() and c.isprintable() else "?" for c in calling_ae)
        with self._lock:
            if ae in self._callers:
                return ae
            if len(self._callers) < self._max_callers:
                self._callers.add(ae)
                return ae
        return "other"

    def observe_store(self, status: int, calling_ae: str, seconds: float) -> None:
        """One C-STORE answered."""
        self.instances.labels(f"0x{status:04X}", self._caller_label(calling_ae)).inc()
        self.store_seconds.observe(max(seconds, 0.0))

    def observe_classified(self, predicted_class: str, seconds: float) -> None:
        """One study classified."""
        self.studies.labels("classified", predicted_class).inc()
        self.classify_seconds.observe(max(seconds, 0.0))

    def observe_failed(self) -> None:
        """One study failed classification."""
        self.studies.labels("failed", "").inc()

    def observe_export_failure(self, reason: str) -> None:
        """One export attempt failed, by kind (node.export.scu.failure_reason: a fixed set)."""
        self.export_failures.labels(reason).inc()

    def observe_retry(self, stage: str) -> None:
        """A retry scheduled: "classify" or "export"."""
        self.retries.labels(stage).inc()

    def observe_export(self, outcome: str, study_uid: str = "",
                       ack_seconds: float | None = None) -> None:
        """One export attempt: "delivered" (with the latency when known), "retry", "dead".
        The latency is observed once per study: its first object acknowledged (the SR goes
        first; a result image after it would count the same study twice)."""
        self.objects.labels("failed" if outcome == "retry" else outcome).inc()
        if outcome == "retry":
            self.observe_retry("export")
        if ack_seconds is None or ack_seconds < 0:
            return
        with self._lock:
            if study_uid in self._acked:
                return
            self._acked[study_uid] = None
            while len(self._acked) > ACKED_REMEMBERED:
                self._acked.popitem(last=False)
        self.ack_seconds.observe(ack_seconds)

    def _shadow_metrics(self, r: CollectorRegistry) -> None:
        """Shadow trials (node.classify.shadow): counted here as they run; agreement and
        accuracy against feedback over the whole trial set from the database
        (`set_shadow_summary`), for the version in shadow only."""
        self.shadow_studies = Counter("dscint_shadow_studies", "studies the shadow model "
                                      "classified, by version and outcome: agree, disagree "
                                      "(with the serving model) or failed",
                                      ["version", "outcome"], registry=r)
        self.shadow_confusion = Counter("dscint_shadow_confusion", "shadow studies by the "
                                        "serving model's class and the shadow model's",
                                        ["version", "serving_class", "shadow_class"],
                                        registry=r)
        self.shadow_skipped = Counter("dscint_shadow_skipped", "studies not shadowed: the "
                                      "shadow backlog was full", registry=r)
        self.shadow_seconds = Histogram("dscint_shadow_seconds", "one study's shadow "
                                        "classification", buckets=CLASSIFY_BUCKETS, registry=r)
        self.shadow_agreement = Gauge("dscint_shadow_agreement", "share of the trial's shadow "
                                      "studies where shadow and serving model agreed",
                                      ["version"], registry=r)
        self.shadow_trial_studies = Gauge("dscint_shadow_trial_studies", "shadow studies of "
                                          "the running trial (all processes)", ["version"],
                                          registry=r)
        self.shadow_accuracy = Gauge("dscint_shadow_accuracy", "accuracy against physician "
                                     "feedback on the trial's labelled studies, of the shadow "
                                     "and of the serving model", ["version", "model"],
                                     registry=r)

    def observe_shadow(self, version: str, serving_class: str, shadow_class: str | None,
                       seconds: float) -> None:
        """One study shadowed (`shadow_class` None: the shadow run failed)."""
        outcome = "failed" if shadow_class is None else \
            "agree" if shadow_class == serving_class else "disagree"
        self.shadow_studies.labels(version, outcome).inc()
        if shadow_class is not None:
            self.shadow_confusion.labels(version, serving_class, shadow_class).inc()
            self.shadow_seconds.observe(max(seconds, 0.0))

    def set_shadow_summary(self, version: str | None, studies: int, agreement: float | None,
                           shadow_accuracy: float | None, serving_accuracy: float | None
                           ) -> None:
        """The running trial's figures from the database; none when no trial runs."""
        for g in (self.shadow_agreement, self.shadow_trial_studies, self.shadow_accuracy):
            g.clear()
        if version is None:
            return
        self.shadow_trial_studies.labels(version).set(studies)
        if agreement is not None:
            self.shadow_agreement.labels(version).set(agreement)
        if shadow_accuracy is not None and serving_accuracy is not None:
            self.shadow_accuracy.labels(version, "shadow").set(shadow_accuracy)
            self.shadow_accuracy.labels(version, "serving").set(serving_accuracy)

    def text(self) -> str:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry).decode("utf-8")


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
    failed = [{"study_uid": f.study_uid, "reason": f.reason, "attempts": f.attempts}
              for f in failed_studies(db, FAILED_SHOWN)]
    return {"exports_retrying": work.exports_retrying,
            "oldest_pending_export_seconds": _age(work.oldest_pending_export_at, now),
            "oldest_pending_job_seconds": _age(work.oldest_pending_job_at, now),
            "failed_studies": work.failed_studies, "last_export_error": work.last_export_error,
            "classify_retrying": jobs_retrying(db), "failed": failed,
            # stored, never classified (no whole-body planar view): counted, not a problem
            "not_applicable_studies": work.not_applicable_studies,
            "failed_pictures": work.failed_pictures,
            "last_pictures_failure": None if work.last_pictures_failure is None else {
                "study_uid": work.last_pictures_failure[0],
                "reason": work.last_pictures_failure[1]},
            **ignored_report(db)}


def ignored_report(db: Database) -> Report:
    """Instances answered Success and not kept (not inputs, the node's own objects routed
    back) and those refused by [admission].refuse_sop_classes: totals by kind, and by SOP
    class keyword (a bounded set: only standard storage classes are negotiated)."""
    totals: dict[str, int] = {}
    by_class: dict[str, dict[str, int]] = {}
    for t in ignored_totals(db):
        totals[t.kind] = totals.get(t.kind, 0) + t.count
        by_class.setdefault(sop_class_keyword(t.sop_class_uid), {})[t.kind] = t.count
    return {"ignored_instances": totals, "ignored_by_sop_class": by_class}


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
    if work["failed_studies"]:
        out.append(_failed_problem(work))
    if work.get("failed_pictures"):
        out.append(_pictures_problem(work))
    job_age = work["oldest_pending_job_seconds"]
    if job_age is not None and job_age > BACKLOG_SECONDS:
        out.append(f"classification backlog: the oldest complete study has waited {job_age:.0f} s")
    if model_expected and model is None:
        out.append("no model loaded")
    return out


def _pictures_problem(work: Report) -> str:
    """Result images / PDFs never built: their SRs were delivered and name an image PACS
    will not get (a viewer shows the reference as missing)."""
    latest = work.get("last_pictures_failure")
    which = "" if not latest else \
        f" (latest {latest['study_uid']}: {latest['reason'] or 'no reason recorded'})"
    return (f"the result image and PDF of {work['failed_pictures']} study(ies) could not be "
            f"built{which}; their SRs were delivered")


def _failed_problem(work: Report) -> str:
    """Failed studies in words: how many, the latest and its reason, what to do."""
    latest = work["failed"][0] if work["failed"] else None
    which = "" if latest is None else \
        f" (latest {latest['study_uid']}: {latest['reason'] or 'no reason recorded'})"
    return (f"{work['failed_studies']} study(ies) failed classification{which}: fix the cause, "
            "then run `python -m node requeue --failed`")


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
        "shadow_trial": active_shadow(db),  # the version run in shadow (never sent), or None
    }


def add_receiver(report: Report, alive: bool, restarts: int) -> None:
    """The receiver process's state: down (being restarted) makes the node degraded, as no
    camera can store meanwhile; restarts so far are counted for the monitor."""
    report["receiver"] = {"alive": alive, "restarts": restarts}
    if not alive:
        report["problems"].append("receiver process not running (being restarted): C-STORE "
                                  "and C-ECHO are refused meanwhile")
        report["status"] = "degraded"


def add_drift(report: Report, drift: DriftReport | None) -> None:
    """The latest drift verdict (node.service.drift, computed periodically, not per
    request): drift makes the node degraded, with the characteristics and their shift."""
    if drift is None:
        return
    report["drift"] = {k: v for k, v in drift_data(drift).items() if k != "characteristics"}
    line = drift_problem(drift)
    if line is not None:
        report["problems"].append(line)
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
              f"dscint_failed_studies {work.get('failed_studies', 0)}",
              "# TYPE dscint_classify_retrying gauge",
              f"dscint_classify_retrying {work.get('classify_retrying', 0)}",
              "# TYPE dscint_not_applicable_studies gauge",
              f"dscint_not_applicable_studies {work.get('not_applicable_studies', 0)}",
              "# TYPE dscint_ignored_instances gauge"]
    lines += [f'dscint_ignored_instances{{kind="{kind}",sop_class="{keyword}"}} {n}'
              for keyword, kinds in sorted(work.get("ignored_by_sop_class", {}).items())
              for kind, n in sorted(kinds.items())]
    receiver = report.get("receiver")
    if receiver is not None:
        lines += ["# TYPE dscint_receiver_up gauge", f"dscint_receiver_up {int(receiver['alive'])}",
                  "# TYPE dscint_receiver_restarts_total counter",
                  f"dscint_receiver_restarts_total {receiver['restarts']}"]
    drift = report.get("drift")
    if drift is not None:
        lines += ["# TYPE dscint_drift gauge",
                  f"dscint_drift {int(drift.get('verdict') == 'drift')}"]
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
    not_applicable = report.get("work", {}).get("not_applicable_studies", 0)
    if not_applicable:
        text += (f"; {not_applicable} study(ies) not applicable (no whole-body planar view: "
                 "stored, not classified)")
    ignored = report.get("work", {}).get("ignored_instances", {})
    if ignored:
        text += (f"; ignored {ignored.get('not_input', 0)} instance(s) that are not inputs and "
                 f"{ignored.get('own_object', 0)} of the node's own objects routed back")
        if ignored.get("refused_by_site"):
            text += (f", refused {ignored['refused_by_site']} by "
                     "[admission].refuse_sop_classes")
    return text + "".join(f"\n  - {p}" for p in report["problems"])


@dataclass(frozen=True)
class Extras:
    """What the endpoint serves beside /health and /live: the counters after the gauges on
    /metrics, the web page at / (built from the report), and the token / requires."""

    metrics: Metrics | None = None
    page: Callable[[Report], str] | None = None
    token: str = ""


def token_ok(token: str, query: str, authorization: str | None) -> bool:
    """True when no token is configured, or `?token=` or a Bearer header carries it."""
    if not token:
        return True
    given = parse_qs(query).get("token", [""])[0]
    if authorization and authorization.startswith("Bearer "):
        given = given or authorization[len("Bearer "):].strip()
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


class _HealthHTTPServer(ThreadingHTTPServer):
    """Carries the report function and the timeouts to the handler; one thread per connection,
    at most `max_connections` at once (one more is closed unanswered: a probe retries)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], report: Callable[[], Report],
                 timeout: float, deadline: float, max_connections: int,
                 extras: Extras) -> None:
        self.report = report
        self.extras = extras
        self.request_timeout, self.deadline = timeout, deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve in a thread while a slot is free; otherwise close the connection now."""
        if not self._slots.acquire(blocking=False):
            log.warning("health endpoint busy: connection from %s closed unanswered",
                        client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread; its slot is released however it ends."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-answer (or was cut at its deadline) is routine: DEBUG,
        not a traceback on stderr."""
        log.debug("health connection from %s ended with an error", client_address[0],
                  exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """GET /health, /live, /metrics; anything else 404. Each read waits at most the server's
    request timeout (a socket timeout: BaseHTTPRequestHandler then drops the connection), and
    the connection is shut down at the deadline however slowly it trickles."""

    server: _HealthHTTPServer
    _deadline: threading.Timer | None = None

    def setup(self) -> None:
        """Socket timeout per read, and a timer that ends the connection at the deadline."""
        super().setup()
        self.connection.settimeout(self.server.request_timeout)
        self._deadline = threading.Timer(self.server.deadline, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        """Past the deadline: unblock the reader (it sees end of input) and close."""
        log.info("health request from %s past its %.0f s deadline: closed",
                 self.client_address[0], self.server.deadline)
        with contextlib.suppress(OSError):  # already closed
            self.connection.shutdown(socket.SHUT_RDWR)

    def _stop_deadline(self) -> None:
        """The request is in (or the connection is over): no deadline any more."""
        if self._deadline is not None:
            self._deadline.cancel()

    def finish(self) -> None:
        """Stop the deadline timer, then flush and close as usual."""
        self._stop_deadline()
        with contextlib.suppress(OSError):  # the client went away (or met its deadline)
            super().finish()

    def do_GET(self) -> None:
        """Answer one probe; a failing report is itself 'degraded' (503), never a crash."""
        self._stop_deadline()  # the request is in: a slow report (busy database) is answered
        path, _, query = self.path.partition("?")
        extras = self.server.extras
        if path == "/live":
            self._send(200, "application/json", json.dumps({"status": "alive"}))
            return
        if path == "/" and extras.page is not None:
            self._page(extras, query)
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
            counters = extras.metrics.text() if extras.metrics is not None else ""
            self._send(200, "text/plain; version=0.0.4", metrics_text(report) + counters)
        else:
            self._send(200 if report.get("status") == "ok" else 503, "application/json",
                       json.dumps(report))

    def _page(self, extras: Extras, query: str) -> None:
        """The dashboard; 401 without the configured token; a failure is a 500 page."""
        assert extras.page is not None
        if not token_ok(extras.token, query, self.headers.get("Authorization")):
            log.warning("dashboard request from %s without a valid token: 401",
                        self.client_address[0])
            self._send(401, "text/plain; charset=utf-8", "token required\n",
                       {"WWW-Authenticate": "Bearer"})
            return
        try:
            body = extras.page(self.server.report())
        except Exception as exc:  # database unavailable, say: a page that says so
            log.exception("dashboard failed")
            self._send(500, "text/plain; charset=utf-8",
                       f"dashboard failed: {type(exc).__name__}\n")
            return
        self._send(200, "text/html; charset=utf-8", body, {
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "img-src data:; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    def _send(self, code: int, content_type: str, body: str,
              headers: dict[str, str] | None = None) -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood INFO: DEBUG only."""
        log.debug("health %s %s", self.address_string(), format % args)


class HealthServer:
    """The endpoint in a background thread; `port` is the bound one (0 asks the OS)."""

    def __init__(self, bind_address: str, port: int, report: Callable[[], Report],
                 timeout: float = REQUEST_TIMEOUT_SECONDS,
                 deadline: float = REQUEST_DEADLINE_SECONDS,
                 max_connections: int = MAX_CONNECTIONS, extras: Extras | None = None
                 ) -> None:
        """Bind now (an occupied port fails start-up, as the SCP's would)."""
        self._server = _HealthHTTPServer((bind_address, port), report, timeout, deadline,
                                         max_connections, extras or Extras())
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
