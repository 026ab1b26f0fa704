"""Queue database: engine set-up for durability and concurrency, and the ORM models.

SQLite (default) runs in WAL mode with ``synchronous=FULL`` so a committed instance row
survives a power cut before C-STORE Success is answered, and every write transaction starts
with ``BEGIN IMMEDIATE`` so two writers never deadlock upgrading a read lock. PostgreSQL
is used unchanged; the queries (``storage.intake``, ``jobs``, ``exports``, ``reports``,
``retention``, ``registry``) are portable to both.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from storage.migrate import reconcile

log = logging.getLogger(__name__)

UID = 64  # DICOM UIDs are at most 64 characters
AE = 64  # calling AE titles (16 chars in DICOM; headroom for odd peers)
DESTINATION = 255  # "AE@host:port"
SQLITE_BUSY_TIMEOUT_MS = 30000
SQLITE_POOL_SIZE = 10
SQLITE_POOL_OVERFLOW = 40
READ_ONLY_OPTION = "dscint_read_only"
LOCK_WAIT_OPTION = "dscint_lock_wait_ms"  # a session's own bound on waiting for the write lock
SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: the lock wait ran out
SCHEMA_LOCK_KEY = 0x64736369  # PostgreSQL advisory lock held while the schema is made


class StudyState(StrEnum):
    """Life of a study: receiving -> complete -> classifying -> classified | failed; or
    receiving -> not_applicable when no instance is a whole-body planar view (never
    classified; see storage.intake.mark_complete)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    CLASSIFYING = "classifying"
    CLASSIFIED = "classified"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"


class CompletionReason(StrEnum):
    """Why a study was declared complete."""

    BOTH_VIEWS = "both_views"
    QUIET = "quiet"
    MANUAL = "manual"


class JobState(StrEnum):
    """Classify job: pending -> claimed -> done | failed (claimed -> pending after a crash)."""

    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class ExportState(StrEnum):
    """SR export: pending -> sending -> done | pending (retry) | dead (re-queueable)."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend.

    SQLite has no time zones: values are stored as naive UTC (fixed-width text, so
    comparisons in SQL still order correctly) and come back aware. PostgreSQL gets
    ``timestamptz``. Naive input is refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC; naive for SQLite."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect
                             ) -> datetime | None:
        """Always hand back aware UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _in(column: str, enum: type[StrEnum]) -> str:
    """CHECK expression that keeps a state column within its enum."""
    return f"{column} IN ({', '.join(repr(m.value) for m in enum)})"


class Base(DeclarativeBase):
    """Declarative base with constraint names that are stable across backends."""

    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Study(Base):
    """One study as received; ``patient_key`` is an opaque hash, never a PatientID."""

    __tablename__ = "studies"
    __table_args__ = (
        CheckConstraint(_in("state", StudyState), name="state"),
        Index("ix_studies_state_last", "state", "last_instance_at"),
        Index("ix_studies_amend", "amend_pending", "last_instance_at"),
    )

    study_uid: Mapped[str] = mapped_column(String(UID), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING.value)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_instance_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    completion_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    has_anterior: Mapped[bool] = mapped_column(Boolean, default=False)
    has_posterior: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    late_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    patient_key: Mapped[str | None] = mapped_column(Text, default=None)
    calling_ae: Mapped[str] = mapped_column(String(AE), default="")
    # not_applicable: why; a classified study: which instances were left out (None: none)
    applicability_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # a new whole-body view arrived after classification began, within the amendment window:
    # classified again once quiet (storage.amend); cleared when a job claims the study
    amend_pending: Mapped[bool] = mapped_column(Boolean, default=False,
                                                server_default=false())  # older writers


class Instance(Base):
    """One stored SOP instance and where its bytes are."""

    __tablename__ = "instances"

    sop_uid: Mapped[str] = mapped_column(String(UID), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"),
                                           index=True)
    series_uid: Mapped[str] = mapped_column(String(UID))
    sop_class_uid: Mapped[str] = mapped_column(String(UID))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID))
    path: Mapped[str] = mapped_column(Text)
    views: Mapped[str] = mapped_column(String(256), default="")
    n_frames: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_ae: Mapped[str] = mapped_column(String(AE), default="")
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # rows x columns x frames x 4 (float32 decoded): the per-study cap sums it
    decoded_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # the applicability gate's verdict (node.dicom.applicability): only whole-body planar
    # views are classified; the reason carries no patient data
    applicable: Mapped[bool] = mapped_column(Boolean, default=True)
    applicability_reason: Mapped[str] = mapped_column(Text, default="")
    # late, but within [completion].amend_window_days: the amended result is classified with
    # it (storage.amend); a late instance without it is kept and never classified
    amends: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Job(Base):
    """A unit of work for a worker; at most one active classify job per study."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("state", JobState), name="state"),
        Index("ix_jobs_claim", "state", "kind", "id"),
        Index("uq_jobs_one_active", "study_uid", "kind", unique=True,
              sqlite_where=text("state IN ('pending', 'claimed')"),
              postgresql_where=text("state IN ('pending', 'claimed')")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"))
    kind: Mapped[str] = mapped_column(String(32), default="classify")
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(Text, default=None)  # host:AE:worker
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)  # why it failed for good
    # a retried job is not claimed before this time (None: at once); last_error says why the
    # previous attempt failed (redacted, no PHI)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # the claim's lease: the claimer's heartbeat renews it while it works; a claim whose
    # heartbeat is older than [node].claim_lease_seconds goes back to the queue
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class Result(Base):
    """A classification and the SR that reports it; probabilities are JSON text.

    A study's results are versions: 1, then each amendment (storage.amend) n + 1 naming its
    predecessor; the highest is current. Two results of one version above 1 are refused by
    the database; version 1 is kept unique by the one job per study and its lease rules
    (a unique index over it would refuse to be made on a database from before versions
    where a takeover had stored a second one).
    """

    __tablename__ = "results"
    __table_args__ = (
        Index("uq_results_study_version", "study_uid", "version", unique=True,
              sqlite_where=text("version > 1"), postgresql_where=text("version > 1")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"),
                                           index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    model_version: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(Text)
    predicted_class: Mapped[str] = mapped_column(Text)
    probabilities: Mapped[str] = mapped_column(Text)
    per_view: Mapped[str] = mapped_column(Text)
    sr_sop_uid: Mapped[str] = mapped_column(String(UID))
    sr_series_uid: Mapped[str] = mapped_column(String(UID))
    sr_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    note: Mapped[str | None] = mapped_column(Text, default=None)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), default=None)


class Export(Base):
    """Delivery of one SR to one destination; unique per (SR, destination)."""

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("sr_sop_uid", "destination", name="uq_exports_sr_destination"),
        CheckConstraint(_in("state", ExportState), name="state"),
        Index("ix_exports_claim", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"))
    sr_sop_uid: Mapped[str] = mapped_column(String(UID))
    destination: Mapped[str] = mapped_column(String(DESTINATION))
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_by: Mapped[str | None] = mapped_column(Text, default=None)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)  # lease
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # another object of the result (the result image): its file; None = the result's SR
    # (sr_sop_uid then holds that object's SOP Instance UID)
    object_path: Mapped[str | None] = mapped_column(Text, default=None)
    # what the destination acknowledged: the SR as stored, or re-encoded in another SR class
    # the PACS accepts (node.export.scu), which has its own SOP Instance UID; None before then
    delivered_sop_class_uid: Mapped[str | None] = mapped_column(String(UID), default=None)
    delivered_sop_uid: Mapped[str | None] = mapped_column(String(UID), default=None)


class IgnoredCount(Base):
    """Instances answered Success but not kept (not an input, or the node's own object routed
    back), or refused by [admission].refuse_sop_classes: a count per SOP class and kind,
    nothing else about them, so the table stays as small as the list of SOP classes."""

    __tablename__ = "ignored_instances"

    sop_class_uid: Mapped[str] = mapped_column(String(UID), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_calling_ae: Mapped[str] = mapped_column(String(AE), default="")


class Purge(Base):
    """A delivered study whose files housekeeping deleted after the retention period.

    The study, its results and exports stay (what was reported, and when); the instance rows
    go with their files. A later purge of the same study (late instances) updates the row.
    """

    __tablename__ = "purges"

    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"),
                                           primary_key=True)
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime())
    files: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)


class Feedback(Base):
    """The physician's conclusion for a study (storage.feedback): one label per study, a
    later one replaces it. Nothing about who entered it. No foreign key: feedback may come
    before the study (or after housekeeping) and is kept either way."""

    __tablename__ = "feedback"

    study_uid: Mapped[str] = mapped_column(String(UID), primary_key=True)
    label: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StudyProfile(Base):
    """What went into the served model for a study and what came out (storage.drift): the
    inputs' characteristics, written with the result; a study classified again replaces it.
    Device attributes and sums of counts only, nothing about the patient."""

    __tablename__ = "study_profiles"

    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"),
                                           primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    model_version: Mapped[str] = mapped_column(Text, default="")
    predicted_class: Mapped[str] = mapped_column(String(64), default="")
    manufacturer: Mapped[str] = mapped_column(String(64), default="")
    matrix: Mapped[str] = mapped_column(String(32), default="")  # rows x columns
    pixel_spacing: Mapped[str] = mapped_column(String(32), default="")  # mm, row x column
    views: Mapped[int] = mapped_column(Integer, default=0)
    counts_anterior: Mapped[float | None] = mapped_column(Float, default=None)  # mean per view
    counts_posterior: Mapped[float | None] = mapped_column(Float, default=None)


class ModelState(StrEnum):
    """candidate -> serving -> retired (retired -> serving again on promote or rollback)."""

    CANDIDATE = "candidate"
    SERVING = "serving"
    RETIRED = "retired"


class ModelVersion(Base):
    """One registered model file and what is known about it (storage.registry: candidate
    -> serving -> retired; at most one serving, a partial unique index keeps it so)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint("state IN ('candidate', 'serving', 'retired')", name="state"),
        Index("uq_model_versions_one_serving", "state", unique=True,
              sqlite_where=text("state = 'serving'"),
              postgresql_where=text("state = 'serving'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="Dscint")
    arch: Mapped[str] = mapped_column(String(64), default="dscint")
    weights_sha256: Mapped[str] = mapped_column(String(64))
    file_sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    data_description: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[str] = mapped_column(String(16), default=ModelState.CANDIDATE.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    note: Mapped[str | None] = mapped_column(Text, default=None)


class ShadowTrial(Base):
    """A registered version run in shadow beside the serving one (storage.shadow): at most
    one runs at a time (a partial unique index, as for the serving model)."""

    __tablename__ = "shadow_trials"
    __table_args__ = (
        CheckConstraint("state IN ('running', 'stopped')", name="state"),
        Index("uq_shadow_trials_one_running", "state", unique=True,
              sqlite_where=text("state = 'running'"),
              postgresql_where=text("state = 'running'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class ShadowResult(Base):
    """What a shadow version said about a study, beside what the serving model said: stored,
    never exported. `error` instead of a class when the shadow run failed."""

    __tablename__ = "shadow_results"
    __table_args__ = (
        UniqueConstraint("study_uid", "version", name="uq_shadow_results_study_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(UID), ForeignKey("studies.study_uid"),
                                           index=True)
    version: Mapped[str] = mapped_column(String(64), index=True)
    serving_version: Mapped[str] = mapped_column(Text)
    serving_class: Mapped[str] = mapped_column(String(64))
    predicted_class: Mapped[str | None] = mapped_column(String(64), default=None)
    probabilities: Mapped[str] = mapped_column(Text, default="{}")
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection pragmas; the driver's own BEGIN handling is switched off."""
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _sqlite_begin(conn: Any) -> None:
    """Take the write lock up front (no lock upgrade, no SQLITE_BUSY deadlock).

    Read-only sessions (``Database.read_session``) use a deferred BEGIN: in WAL mode
    they read a snapshot and never wait for writers. A session with a lock wait of its own
    (``Database.with_lock_wait``) sets the connection's busy timeout first: the pooled
    connection remembers its value, so the pragma runs only when it changes.
    """
    options = conn.get_execution_options()
    wait_ms = int(options.get(LOCK_WAIT_OPTION, SQLITE_BUSY_TIMEOUT_MS))
    info = conn.connection.info
    if info.get(LOCK_WAIT_OPTION, SQLITE_BUSY_TIMEOUT_MS) != wait_ms:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
        info[LOCK_WAIT_OPTION] = wait_ms
    deferred = options.get(READ_ONLY_OPTION, False)
    conn.exec_driver_sql("BEGIN DEFERRED" if deferred else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Engine tuned for the queue: durable, immediate-lock SQLite, or pre-pinged others."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:" and \
            not parsed.query.get("uri"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # a session may wait up to busy_timeout for the write lock while holding a pooled
    # connection: a roomy pool keeps many associations from timing out on the pool instead
    engine = create_engine(url, pool_size=SQLITE_POOL_SIZE, max_overflow=SQLITE_POOL_OVERFLOW,
                           connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                         "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


class DatabaseBusy(Exception):
    """The write lock was not had within the session's lock wait (another writer holds it)."""


def is_lock_timeout(exc: BaseException) -> bool:
    """True when a driver error means the lock wait ran out (SQLite busy or locked)."""
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in SQLITE_BUSY  # extended codes included


@contextmanager
def lock_wait_as_busy(what: str) -> Iterator[None]:
    """Turn a lock wait that ran out into DatabaseBusy, so callers outside storage (which
    never import sqlalchemy) can answer "busy, try later"; other errors pass unchanged."""
    try:
        yield
    except OperationalError as exc:
        if is_lock_timeout(exc):
            raise DatabaseBusy(f"{what}: database write lock not had in time") from exc
        raise


class Database:
    """Engine plus session factories; create one per process, share it between threads."""

    def __init__(self, url: str) -> None:
        """Build the engine (connects lazily: nothing touches the database yet)."""
        self.url = url
        self.engine = make_engine(url)
        self._writes: Engine = self.engine  # write transactions' bind (with_lock_wait's)
        self._sessions = sessionmaker(bind=self._writes, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            bind=self.engine.execution_options(**{READ_ONLY_OPTION: True}),
            expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """Backend name: ``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def session(self) -> Session:
        """A session for writes; use as ``with db.session() as s, s.begin(): ...``."""
        return self._sessions()

    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction on a bare connection, committed when the block ends: for the
        receiver's per-instance statements, where a Session's bookkeeping costs more Python
        than the SQL (same BEGIN IMMEDIATE and lock wait as `session`)."""
        return self._writes.begin()

    def read_session(self) -> Session:
        """A session for reads only; on SQLite it does not take the write lock."""
        return self._read_sessions()

    def with_lock_wait(self, seconds: float) -> Database:
        """This database (same engine and pool) whose write sessions wait at most `seconds`
        for SQLite's write lock, where the default waits SQLITE_BUSY_TIMEOUT_MS: the receiver
        must answer a camera well within its DIMSE timeout. Other backends: unchanged."""
        view = copy.copy(self)
        view._writes = self.engine.execution_options(**{LOCK_WAIT_OPTION: round(seconds * 1000)})
        view._sessions = sessionmaker(bind=view._writes, expire_on_commit=False)
        return view

    def create_all(self) -> None:
        """Create missing tables, and bring existing ones up to this version's columns,
        states and indexes (storage.migrate; idempotent). On PostgreSQL several nodes may
        start at once: an advisory lock lets one at a time do it (concurrent CREATE TABLEs
        of one name collide in PostgreSQL's catalogue)."""
        if self.dialect != "postgresql":
            Base.metadata.create_all(self.engine)
            reconcile(self.engine, Base.metadata)
            return
        with self.engine.connect() as lock:
            lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            lock.commit()
            try:
                Base.metadata.create_all(self.engine)
                reconcile(self.engine, Base.metadata)
            finally:
                lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCHEMA_LOCK_KEY})
                lock.commit()

    def dispose(self) -> None:
        """Close pooled connections (at shutdown, or in a child process after fork)."""
        self.engine.dispose()
