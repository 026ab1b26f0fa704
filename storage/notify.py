"""Waking workers on other machines at once: PostgreSQL's LISTEN/NOTIFY.

A process that queues work (a study became complete, a dead worker's claim went back) sends a
NOTIFY on `CHANNEL`; every worker process keeps one connection LISTENing there and wakes its
workers when one arrives. NOTIFY is best effort (a listener reconnecting misses what was sent
meanwhile), so it only shortens the wait: the workers' one-second poll stays, and no study
depends on a notification. SQLite has neither (one machine: the receiver wakes its workers in
process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from storage.db import Database

log = logging.getLogger(__name__)

CHANNEL = "dscint_work"
LISTEN_SLICE_SECONDS = 0.5  # how often the listener checks whether it should stop
RECONNECT_SECONDS = (1.0, 30.0)  # first and largest wait before listening again


def supports_notify(db: Database) -> bool:
    """LISTEN/NOTIFY exists on PostgreSQL only."""
    return db.engine.dialect.name == "postgresql"


def notify_work(db: Database) -> bool:
    """Tell every listening worker that work is queued; False when not sent (not PostgreSQL,
    or the database unreachable: logged, never raised; the workers' poll finds it anyway)."""
    if not supports_notify(db):
        return False
    try:
        with db.engine.connect() as c:
            c.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
            c.commit()
    except SQLAlchemyError as exc:
        log.warning("could not notify workers (%s); they find the work at their next poll",
                    type(exc).__name__)
        return False
    return True


class WorkListener:
    """A thread holding one connection of its own that LISTENs on `CHANNEL` and calls
    `on_wake` for every notification; it reconnects with a growing delay when the
    connection drops. Only for PostgreSQL (`supports_notify`)."""

    def __init__(self, db: Database, on_wake: Callable[[], None]) -> None:
        self._conninfo = db.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._on_wake = on_wake
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while LISTEN is in force (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="work-listener", daemon=True)

    def start(self) -> WorkListener:
        """Listen from now on (in the background)."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and close the connection."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = RECONNECT_SECONDS[0]
        while not self._stop.is_set():
            try:
                self._listen()
                delay = RECONNECT_SECONDS[0]
            except Exception as exc:  # psycopg.Error, OSError: the thread must go on
                self.listening.clear()
                log.warning("work listener lost its connection (%s); listening again in "
                            "%.0f s (workers poll meanwhile)", type(exc).__name__, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, RECONNECT_SECONDS[1])

    def _listen(self) -> None:
        """One connection's life: LISTEN, wake on each notification, until stopped."""
        import psycopg  # the optional PostgreSQL driver; this class runs only with it
        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=LISTEN_SLICE_SECONDS):
                    self._on_wake()
        self.listening.clear()
