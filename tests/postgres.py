"""A real PostgreSQL on 127.0.0.1 for the collector's tests on both backends (Debian ``postgresql``).

Installs nothing (``.ci/run`` does); a missing PostgreSQL or psycopg skips here and fails under CI
(``conftest.skip_or_fail``). One server per test session (``initdb`` takes a few seconds), started
by ``pgserver.running_postgres`` (no pytest there: benchmarks/collector_scale.py starts one the
same way): its data directory, socket and log live in one temporary directory owned by the
``postgres`` user (the server refuses to run as root), it listens on 127.0.0.1 on a free port with
``trust`` authentication, and it is stopped by its own pid at the end (SIGQUIT, PostgreSQL's
immediate shutdown, then SIGKILL). ``fsync`` is off: the tests check what the collector stores, not
the disk.

Each test gets its own schema (``db_url``: a URL whose ``options`` set the ``search_path``), so the
tests share the server but not their tables or advisory locks. Use it as::

    from postgres import db_url, pg_server  # noqa: F401 (fixtures)

    def test_x(db_url):  # runs twice: an SQLite file, then a PostgreSQL schema
        store = Store(db_url)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import free_port, skip_or_fail
from pgserver import PgServerError, PgUnavailable, running_postgres


@pytest.fixture(scope="session")
def pg_server():
    try:
        with running_postgres(free_port()) as server:
            yield server
    except PgUnavailable as e:
        skip_or_fail(str(e))
    except PgServerError as e:
        pytest.fail(str(e))


BACKENDS = ("sqlite", "postgresql")


def database(request, sqlite_path: Path) -> Path | str:
    """For a fixture parametrized over :data:`BACKENDS`: ``sqlite_path``, or a fresh PostgreSQL
    schema (a postgresql:// URL) on the session's server."""
    if request.param == "sqlite":
        return sqlite_path
    return request.getfixturevalue("pg_server").new_schema()


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """The collector's database for one test: an SQLite file (a Path), or a fresh PostgreSQL schema."""
    return database(request, tmp_path / "c.db")
