"""Bring an existing database up to the schema this version declares, at start-up.

`create_all` makes missing tables but never changes a table that exists, so a node upgraded in
place would fail on its first query of a new column or refuse a new state in a CHECK
constraint. The node's schema only ever grows (new tables, new columns with a default or
NULL, new states), so reconciling is enough, no versioned migration scripts:

- a missing column is added (ALTER TABLE ... ADD COLUMN, with its scalar default so existing
  rows stay valid under NOT NULL);
- a CHECK constraint whose meaning changed (another set of allowed values: compared as
  column and values, since PostgreSQL reflects them in its own words) is replaced:
  PostgreSQL drops and adds it by name;
  SQLite cannot alter a constraint, so the table is rebuilt the way SQLite documents it
  (new table, copy, drop, rename, indexes again; foreign keys off meanwhile, checked after).

Each step is logged; a step that would lose data (a column gone from the model) is never taken.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Engine, MetaData, Table, inspect, text
from sqlalchemy.schema import CheckConstraint, CreateTable

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")
_LITERAL = re.compile(r"'((?:[^']|'')*)'")
_LEADING_NAME = re.compile(r'[(\s]*"?([A-Za-z_][A-Za-z0-9_]*)')


@dataclass(frozen=True)
class TablePlan:
    """What one existing table lacks."""

    table: Table
    missing: tuple[Column[object], ...]
    changed_checks: tuple[CheckConstraint, ...]

    @property
    def empty(self) -> bool:
        """Nothing to do for this table."""
        return not self.missing and not self.changed_checks


def reconcile(engine: Engine, metadata: MetaData) -> list[str]:
    """Add missing columns and replace changed CHECK constraints of existing tables; returns
    one line per change made (empty when the database was already current)."""
    plans = [p for p in _plans(engine, metadata) if not p.empty]
    done: list[str] = []
    for plan in plans:
        if engine.dialect.name == "sqlite" and plan.changed_checks:
            done.append(_rebuild_sqlite(engine, plan))
        else:
            done.extend(_alter(engine, plan))
    done.extend(_missing_indexes(engine, metadata))
    for line in done:
        log.warning("database schema upgraded: %s", line)
    return done


def _missing_indexes(engine: Engine, metadata: MetaData) -> list[str]:
    """Indexes declared on tables that existed before (create_all adds only whole tables)."""
    done = []
    with engine.begin() as conn:
        insp = inspect(conn)
        for table in metadata.sorted_tables:
            if not insp.has_table(table.name):
                continue
            present = {ix["name"] for ix in insp.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn)
                    done.append(f"index {index.name} created")
    return done


def _plans(engine: Engine, metadata: MetaData) -> list[TablePlan]:
    insp = inspect(engine)
    plans = []
    for table in metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue  # create_all makes it whole
        present = {c["name"] for c in insp.get_columns(table.name)}
        stored = {ck.get("name"): _check_key(ck.get("sqltext", ""))
                  for ck in insp.get_check_constraints(table.name)}
        missing = tuple(c for c in table.columns if c.name not in present)
        changed = tuple(ck for ck in _checks(table)
                        if stored.get(str(ck.name)) != _check_key(str(ck.sqltext)))
        plans.append(TablePlan(table, missing, changed))
    return plans


def _checks(table: Table) -> list[CheckConstraint]:
    return [c for c in table.constraints if isinstance(c, CheckConstraint)]


def _check_key(sql: str) -> str | tuple[str, frozenset[str]]:
    """What a CHECK means, comparable across backends: an allowed-values check is its column
    and its set of literals (PostgreSQL reflects ``state IN ('a', 'b')`` as
    ``state::text = ANY (ARRAY['a'::character varying, ...])``, SQLite as written); any
    other check is its text without whitespace."""
    literals = _LITERAL.findall(sql)
    column = _LEADING_NAME.match(sql)
    if literals and column is not None:
        return column.group(1), frozenset(literals)
    return _normal(sql)


def _normal(sql: str) -> str:
    """CHECK text compared without whitespace and outer parentheses (reflection differs)."""
    out = _SPACE.sub("", sql)
    while out.startswith("(") and out.endswith(")"):
        out = out[1:-1]
    return out


def _default_sql(column: Column[object], conn: Connection) -> str:
    """The column's scalar default as an SQL literal, or '' when it has none."""
    default = column.default
    arg = getattr(default, "arg", None)
    if default is None or callable(arg):
        return ""
    literal = column.type.literal_processor(conn.dialect)
    value = literal(arg) if literal is not None else repr(arg)
    return f" DEFAULT {value}"


def _column_sql(column: Column[object], conn: Connection) -> str:
    type_sql = column.type.compile(dialect=conn.dialect)
    default = _default_sql(column, conn)
    not_null = " NOT NULL" if not column.nullable and default else ""
    return f'"{column.name}" {type_sql}{default}{not_null}'


def _alter(engine: Engine, plan: TablePlan) -> list[str]:
    """ALTER TABLE for each missing column and (PostgreSQL) each changed CHECK."""
    done = []
    name = plan.table.name
    with engine.begin() as conn:
        for column in plan.missing:
            conn.execute(text(f'ALTER TABLE "{name}" ADD COLUMN {_column_sql(column, conn)}'))
            done.append(f"{name}.{column.name} added")
        for ck in plan.changed_checks:
            conn.execute(text(f'ALTER TABLE "{name}" DROP CONSTRAINT IF EXISTS "{ck.name}"'))
            conn.execute(text(f'ALTER TABLE "{name}" ADD CONSTRAINT "{ck.name}" '
                              f"CHECK ({ck.sqltext})"))
            done.append(f"{name} constraint {ck.name} replaced")
    return done


def _copy_lists(table: Table, present: set[str], conn: Connection) -> tuple[str, str]:
    """Columns to fill in the rebuilt table and what fills them: the old values, or a new
    column's default."""
    targets, sources = [], []
    for column in table.columns:
        if column.name in present:
            targets.append(f'"{column.name}"')
            sources.append(f'"{column.name}"')
        elif default := _default_sql(column, conn):
            targets.append(f'"{column.name}"')
            sources.append(default.removeprefix(" DEFAULT "))
    return ", ".join(targets), ", ".join(sources)


def _rebuild_sqlite(engine: Engine, plan: TablePlan) -> str:
    """SQLite's documented table rebuild (https://sqlite.org/lang_altertable.html, section 7),
    with this version's definition: every row copied, new columns filled by their defaults."""
    table, tmp = plan.table, f"{plan.table.name}__rebuild"
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside a transaction, as required
        conn.commit()
        try:
            with conn.begin():
                present = {c["name"] for c in inspect(conn).get_columns(table.name)}
                create = str(CreateTable(table).compile(dialect=conn.dialect))
                conn.exec_driver_sql(create.replace(f"TABLE {table.name} ", f'TABLE "{tmp}" ', 1))
                targets, sources = _copy_lists(table, present, conn)
                conn.exec_driver_sql(f'INSERT INTO "{tmp}" ({targets}) SELECT {sources} '
                                     f'FROM "{table.name}"')
                conn.exec_driver_sql(f'DROP TABLE "{table.name}"')
                conn.exec_driver_sql(f'ALTER TABLE "{tmp}" RENAME TO "{table.name}"')
                for index in table.indexes:
                    index.create(conn)
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"rebuilding {table.name} broke {len(broken)} "
                                       "foreign key(s); nothing changed")
        finally:
            conn.rollback()
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()
    added = ", ".join(c.name for c in plan.missing) or "none"
    return f"{table.name} rebuilt for its constraints (columns added: {added})"
