"""An existing database is brought up to this version's schema at start-up: a node upgraded in
place keeps its studies, results and exports and accepts the new columns and states."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

import storage.registry  # noqa: F401  (its table is part of the schema)
from storage.db import Base, Database, StudyState
from storage.migrate import reconcile
from tests.support.pg import fresh_database

# The schema as the layout change found it (SQLite, written by create_all at commit 1b799b7).
OLD_SCHEMA = Path(__file__).parent / "support" / "schema_before_layout.sql"
OLD_STUDY = ("1.2.3", "classified", "2026-01-01 00:00:00.000000", "2026-01-01 00:00:00.000000",
             None, "both_views", 1, 1, 2, 0, "k" * 32, "CAM")


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    """A database file of the earlier schema holding one classified study."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA.read_text())
        conn.execute(f"INSERT INTO studies VALUES ({', '.join('?' * len(OLD_STUDY))})",
                     OLD_STUDY)
    return path


def _columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_old_database_upgraded_in_place(old_db: Path) -> None:
    db = Database(f"sqlite:///{old_db}")
    try:
        db.create_all()
        for table in Base.metadata.sorted_tables:
            assert {c.name for c in table.columns} <= _columns(old_db, table.name), table.name
        with sqlite3.connect(old_db) as conn:
            assert conn.execute("SELECT study_uid, state, patient_key FROM studies").fetchall() \
                == [("1.2.3", "classified", "k" * 32)]
            for state in StudyState:  # every state this version knows is accepted now
                conn.execute("UPDATE studies SET state = ?", (state.value,))
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute("UPDATE studies SET state = 'bogus'")  # the CHECK still holds
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert reconcile(db.engine, Base.metadata) == []  # idempotent
    finally:
        db.dispose()


def test_current_database_needs_nothing(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        db.create_all()
        assert reconcile(db.engine, Base.metadata) == []
    finally:
        db.dispose()


def _pg_old_schema(db: Database) -> None:
    """This version's schema on PostgreSQL, set back to the earlier one: without the newest
    columns, the studies CHECK without 'not_applicable', an index missing; one study in it."""
    with db.engine.begin() as c:
        c.execute(text("ALTER TABLE studies DROP COLUMN applicability_reason"))
        c.execute(text("ALTER TABLE instances DROP COLUMN applicable"))
        c.execute(text("ALTER TABLE instances DROP COLUMN applicability_reason"))
        c.execute(text("ALTER TABLE studies DROP CONSTRAINT ck_studies_state"))
        c.execute(text("ALTER TABLE studies ADD CONSTRAINT ck_studies_state CHECK (state IN "
                       "('receiving', 'complete', 'classifying', 'classified', 'failed'))"))
        c.execute(text("DROP INDEX ix_jobs_claim"))
        c.execute(text("INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at,"
                       " has_anterior, has_posterior, instance_count, late_instance_count, "
                       "calling_ae) VALUES ('1.2.3', 'classified', now(), now(), true, true, "
                       "2, 0, 'CAM')"))


def test_postgresql_database_upgraded_in_place() -> None:
    with fresh_database("migrate") as url:
        db = Database(url)
        try:
            db.create_all()
            _pg_old_schema(db)
            done = reconcile(db.engine, Base.metadata)
            assert sorted(done) == sorted([
                "studies.applicability_reason added", "instances.applicable added",
                "instances.applicability_reason added",
                "studies constraint ck_studies_state replaced", "index ix_jobs_claim created"])
            cols = {c["name"] for c in inspect(db.engine).get_columns("instances")}
            assert {"applicable", "applicability_reason"} <= cols
            with db.engine.begin() as c:
                assert c.execute(text("SELECT study_uid, state FROM studies")).all() \
                    == [("1.2.3", "classified")]
                for state in StudyState:
                    c.execute(text("UPDATE studies SET state = :s"), {"s": state.value})
            with pytest.raises(IntegrityError), db.engine.begin() as c:
                c.execute(text("UPDATE studies SET state = 'bogus'"))
            assert reconcile(db.engine, Base.metadata) == []  # idempotent, checks unchanged
        finally:
            db.dispose()


def test_postgresql_current_database_needs_nothing() -> None:
    """PostgreSQL words a CHECK its own way; a current schema is still left alone (no
    constraint dropped and re-added at every start of every node)."""
    with fresh_database("migrate") as url:
        db = Database(url)
        try:
            db.create_all()
            db.create_all()
            assert reconcile(db.engine, Base.metadata) == []
        finally:
            db.dispose()


def test_nodes_starting_at_once_make_the_schema_once() -> None:
    """Four processes' worth of create_all at the same moment on an empty PostgreSQL
    database: the advisory lock serialises them, none fails."""
    with fresh_database("migrate") as url:
        dbs = [Database(url) for _ in range(4)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(dbs))

        def start(db: Database) -> None:
            barrier.wait()
            try:
                db.create_all()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for db in dbs:
            db.dispose()
        assert errors == []
