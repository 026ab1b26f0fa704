"""Alerts: a JSON POST to each configured webhook when something needs a person — an SR export
dead-lettered, a study failed classification, the node turned degraded, or (if configured) a
study classified as one of the configured findings.

Alerts are posted from one background thread, so the worker, exporter or health check that
raised one never waits on a slow webhook; each POST is retried with a doubling delay up to
`[alerts].max_attempts`, then given up with a log line. A full queue drops the new alert
(logged): a flood of failures must not grow memory without bound.

The payload names the event, the node (AE title), the time, a one-line summary and details:
study UIDs, counts, redacted reasons and health problems; never patient names or IDs (storage
keeps none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from node.config import AlertsSection

log = logging.getLogger(__name__)

QUEUE_SIZE = 256  # alerts waiting to be posted; more are dropped (logged)
STOP_WAIT_SECONDS = 5.0  # on stop, the poster gets this long to finish the alert in hand
REARM_OK_CHECKS = 3  # consecutive "ok" health checks before a new "degraded" alerts again

Payload = dict[str, Any]


class Alerter:
    """Posts alerts in a background thread; `raise_alert` never blocks and never raises."""

    def __init__(self, section: AlertsSection, ae_title: str) -> None:
        self.section = section
        self.ae_title = ae_title
        self.sent = 0  # alerts delivered to every URL
        self.given_up = 0  # alerts that some URL never took
        self._queue: queue.Queue[Payload | None] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._degraded = False
        self._ok_checks = REARM_OK_CHECKS  # armed: the first degraded report alerts
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when at least one webhook URL is configured."""
        return bool(self.section.urls)

    def wants(self, event: str) -> bool:
        """True when `event` is configured and there is somewhere to send it."""
        return self.enabled and event in self.section.events

    def start(self) -> Alerter:
        """Start the poster thread (nothing when no URL is configured)."""
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the alert in hand; alerts still queued are dropped (logged)."""
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # the poster sees the stop flag between alerts
                self._queue.put_nowait(None)
            self._thread.join(STOP_WAIT_SECONDS)
            self._thread = None
        left = 0
        while not self._queue.empty():  # what the poster did not take (not the stop marker)
            left += self._queue.get_nowait() is not None
        if left:
            log.warning("%d alert(s) not posted: node stopping", left)

    def raise_alert(self, event: str, summary: str, **details: Any) -> bool:
        """Queue one alert when its event is configured; True when queued."""
        if not self.wants(event):
            return False
        payload: Payload = {"event": event, "node": self.ae_title,
                            "time": datetime.now(UTC).isoformat(timespec="seconds"),
                            "summary": summary, "details": details}
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            log.error("alert queue full: %s alert dropped", event)
            return False
        return True

    # --- what the node's observers call ------------------------------------------------------

    def dead_letter(self, study_uid: str, sr_sop_uid: str, attempts: int,
                    error: str | None) -> None:
        """An SR export was dead-lettered."""
        self.raise_alert("dead_letter", f"SR of study {study_uid} dead-lettered after "
                         f"{attempts} attempt(s)", study_uid=study_uid, sr_sop_uid=sr_sop_uid,
                         attempts=attempts, error=error)

    def failed_study(self, study_uid: str, reason: str) -> None:
        """A study failed classification (the reason is already redacted)."""
        self.raise_alert("failed_study", f"study {study_uid} failed classification",
                         study_uid=study_uid, reason=reason)

    def classified(self, study_uid: str, predicted_class: str,
                   probabilities: Mapping[str, float]) -> None:
        """A study classified: an alert when its class is a configured finding."""
        if predicted_class in self.section.findings:
            self.raise_alert("finding", f"study {study_uid} classified {predicted_class}",
                             study_uid=study_uid, predicted_class=predicted_class,
                             probabilities=dict(probabilities))

    def health(self, report: Mapping[str, Any]) -> None:
        """A health report: an alert when it turns degraded; once, until it has been ok for
        `REARM_OK_CHECKS` checks in a row (an export between two attempts makes health
        flap for a moment: that is one incident, not two)."""
        degraded = report.get("status") != "ok"
        with self._lock:
            self._ok_checks = 0 if degraded else self._ok_checks + 1
            turned = degraded and not self._degraded
            if degraded:
                self._degraded = True
            elif self._ok_checks >= REARM_OK_CHECKS:
                self._degraded = False
        if turned:
            problems = list(report.get("problems") or [])
            self.raise_alert("degraded", f"node degraded: {len(problems)} problem(s)",
                             problems=problems)

    # --- the poster ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = self._queue.get()
            if payload is None:
                return
            ok = all([self._post_with_retries(url, payload) for url in self.section.urls])
            with self._lock:
                if ok:
                    self.sent += 1
                else:
                    self.given_up += 1

    def _post_with_retries(self, url: str, payload: Payload) -> bool:
        """POST until a 2xx answer or the attempts are spent; False when given up."""
        delay = self.section.backoff_seconds
        for attempt in range(1, self.section.max_attempts + 1):
            error = post_json(url, payload, self.section.timeout_seconds)
            if error is None:
                return True
            if attempt == self.section.max_attempts:
                log.error("alert %s to %s given up after %d attempt(s): %s", payload["event"],
                          url, attempt, error)
                return False
            log.warning("alert %s to %s failed (attempt %d): %s; retry in %.3g s",
                        payload["event"], url, attempt, error, delay)
            if self._stop.wait(delay):
                return False
            delay *= 2
        return False


def post_json(url: str, payload: Payload, timeout: float) -> str | None:
    """One POST; None on a 2xx answer, else what went wrong (in words)."""
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "dscint-node"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            code = int(answer.status)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    return None if 200 <= code < 300 else f"HTTP {code}"
