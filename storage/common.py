"""Helpers shared by the query modules (intake, jobs, exports, reports, retention).

Every query function there is one short transaction and returns plain frozen dataclasses,
tuples or primitives, so callers never hold ORM objects (no lazy loads on a closed session,
nothing shared between threads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, CursorResult, or_
from sqlalchemy import Result as SAResult
from sqlalchemy.exc import IntegrityError

log = logging.getLogger(__name__)

T = TypeVar("T")
CLASSIFY = "classify"
ANTERIOR = "anterior"
POSTERIOR = "posterior"
INTEGRITY_RETRIES = 5
NO_SYNC = {"synchronize_session": False}  # bulk UPDATEs: no ORM objects to keep in step


def utc_now(now: datetime | None) -> datetime:
    """Aware UTC now, or the caller's aware clock (tests, one timestamp per operation)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime; pass an aware UTC time")
    return now


def rowcount(result: SAResult[Any]) -> int:
    """Rows touched by an UPDATE (Session.execute is typed as the generic Result)."""
    return cast(CursorResult[Any], result).rowcount


def retry_on_conflict(fn: Callable[[], T], what: str) -> T:
    """Run a transaction again when a concurrent insert won the race for a unique key.

    On SQLite writers are serialised by BEGIN IMMEDIATE so this never fires; on PostgreSQL
    two first instances of one study can both try to insert the study row.
    """
    for _ in range(INTEGRITY_RETRIES - 1):
        try:
            return fn()
        except IntegrityError:
            log.info("%s: concurrent insert of the same key, retrying", what)
    return fn()


def owned_by(column: Any, prefix: str) -> ColumnElement[bool]:
    """Claims of one node: ``prefix`` itself or ``prefix:<anything>`` (LIKE-escaped)."""
    return cast(ColumnElement[bool],
                or_(column == prefix, column.startswith(f"{prefix}:", autoescape=True)))


def join_views(views: Iterable[str]) -> str:
    """Views as stored: comma-joined, so a view name must not contain a comma."""
    views = tuple(views)
    if any("," in v for v in views):
        raise ValueError("view names must not contain commas")
    return ",".join(views)


def split_views(views: str) -> tuple[str, ...]:
    """The stored comma-joined views back as a tuple (empty names dropped)."""
    return tuple(v for v in views.split(",") if v)
