"""A real PostgreSQL on 127.0.0.1 for the collector's tests on both backends (Debian ``postgresql``).

Installs nothing (``.ci/run`` does); a missing PostgreSQL or psycopg skips here and fails under CI
(``conftest.skip_or_fail``). One server per test session (``initdb`` takes a few seconds): its data
directory, socket and log live in one temporary directory owned by the ``postgres`` user (the
server refuses to run as root), it listens on 127.0.0.1 on a free port with ``trust``
authentication, and it is stopped by its own pid at the end (SIGQUIT, PostgreSQL's immediate
shutdown, then SIGKILL). ``fsync`` is off: the tests check what the collector stores, not the disk.

Each test gets its own schema (``db_url``: a URL whose ``options`` set the ``search_path``), so the
tests share the server but not their tables or advisory locks. Use it as::

    from postgres import db_url, pg_server  # noqa: F401 (fixtures)

    def test_x(db_url):  # runs twice: an SQLite file, then a PostgreSQL schema
        store = Store(db_url)
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import free_port, skip_or_fail

BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql (15 on bookworm)
UP_TIMEOUT_S = 60.0  # initdb + start take ~3-5 s here; 60 on a loaded 2-core CI machine
STOP_GRACE_S = 15.0
USER = "straggler"
DATABASE = "straggler"


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl") or shutil.which("initdb")
    if found:
        return Path(found).parent
    if (BIN / "initdb").exists():
        return BIN
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) if Path("/usr/lib/postgresql").is_dir() else []
    return versions[-1].parent if versions else None


@dataclass
class PgServer:
    dir: Path
    port: int
    proc: subprocess.Popen
    _schemas = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def new_schema(self) -> str:
        """A fresh, empty schema; returns a URL whose connections work in it."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._schemas)}"
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.base_url}?options={quote(f'-csearch_path={name}')}"

    def log(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text()[-4000:]
        except OSError:
            return ""


def _run_as(user: pwd.struct_passwd, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, user=user.pw_uid, group=user.pw_gid, capture_output=True, text=True, timeout=UP_TIMEOUT_S, **kw
    )


@pytest.fixture(scope="session")
def pg_server():
    try:
        import psycopg  # the [test] extra installs it
    except ImportError:
        skip_or_fail("psycopg not installed (pip install -e '.[test]' installs it)")
    bindir = _bin_dir()
    if bindir is None:
        skip_or_fail("PostgreSQL not installed (.ci/run installs the postgresql package)")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            skip_or_fail("no postgres user to run PostgreSQL as (the postgresql package creates it)")
    else:
        owner = pwd.getpwuid(os.geteuid())
    d = Path(tempfile.mkdtemp(prefix="straggler-pg-"))
    os.chown(d, owner.pw_uid, owner.pw_gid)
    data = d / "data"
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    r = _run_as(
        owner,
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        env=env,
        cwd=d,
    )
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"initdb failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    port = free_port()
    log = open(d / "postgres.log", "wb")
    os.chown(d / "postgres.log", owner.pw_uid, owner.pw_gid)
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(d),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=400",
            "-c",
            "shared_buffers=64MB",
            "-c",
            "log_min_messages=warning",
        ],
        user=owner.pw_uid,
        group=owner.pw_gid,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d,
        env=env,
    )
    server = PgServer(d, port, proc)
    try:
        import psycopg

        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited with {proc.returncode}: {server.log()}")
            try:
                with psycopg.connect(
                    f"postgresql://{USER}@127.0.0.1:{port}/postgres", autocommit=True, connect_timeout=5
                ) as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"postgres did not accept connections within {UP_TIMEOUT_S:g} s: {server.log()}")
                time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGQUIT)  # immediate shutdown: no checkpoint of data nobody keeps
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


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
