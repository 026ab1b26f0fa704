"""PostgreSQL for the tests: a fresh database per test on the server `.ci/postgres.sh` starts.

DSCINT_TEST_POSTGRES_URL names a server whose role may create databases; without it the
PostgreSQL variants skip with the reason, unless DSCINT_REQUIRE_POSTGRES=1 (set by
`make test`), which turns that skip into a failure so CI never passes without them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

URL_ENV = "DSCINT_TEST_POSTGRES_URL"
REQUIRE_ENV = "DSCINT_REQUIRE_POSTGRES"


def server_url() -> str:
    """The server's URL; skip (or fail, where PostgreSQL is required) without one."""
    url = os.environ.get(URL_ENV, "")
    if url:
        return url
    why = f"{URL_ENV} is not set (run .ci/postgres.sh to start a server)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({REQUIRE_ENV}=1) but {why}")
    pytest.skip(why)


@contextmanager
def fresh_database(prefix: str = "t") -> Iterator[str]:
    """A new, empty database on the server; dropped (connections and all) afterwards."""
    admin_url = make_url(server_url())
    name = f"dscint_{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
