"""An existing database is brought up to this version's schema at start-up: a node upgraded in
place keeps its studies, results and exports and accepts the new columns and states."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import storage.registry  # noqa: F401  (its table is part of the schema)
from storage.db import Base, Database, StudyState
from storage.migrate import reconcile

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
