"""A throwaway PostgreSQL on 127.0.0.1 (Debian ``postgresql``), without pytest: the test session's
``pg_server`` fixture (tests/postgres.py) and ``benchmarks/collector_scale.py`` start it the same way.

``running_postgres(port)`` is a context manager: ``initdb`` in a temporary directory owned by the
``postgres`` user (the server refuses to run as root; as another user, that user), the server on
127.0.0.1:``port`` with ``trust`` authentication and its socket and log in that directory, a
database ``straggler``; at the end it is stopped by its own pid (SIGQUIT, PostgreSQL's immediate
shutdown, then SIGKILL) and the directory removed. By default ``fsync``, ``synchronous_commit`` and
``full_page_writes`` are off (tests check what the collector stores, not the disk); ``durable=True``
keeps PostgreSQL's defaults for them and for ``shared_buffers`` (a benchmark's disk and WAL figures).

A machine without PostgreSQL or psycopg raises :class:`PgUnavailable`; a server that does not come
up raises :class:`PgServerError` (its log's tail in the message).
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql (15 on bookworm)
UP_TIMEOUT_S = 60.0  # initdb + start take ~3-5 s here; 60 on a loaded 2-core CI machine
STOP_GRACE_S = 15.0
USER = "straggler"
DATABASE = "straggler"
# what the tests do not need: durability (and the WAL's full-page images); a small buffer pool
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "shared_buffers": "64MB"}


class PgUnavailable(RuntimeError):
    """PostgreSQL or psycopg is not installed here (or no user to run the server as)."""


class PgServerError(RuntimeError):
    """The server did not come up."""


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl") or shutil.which("initdb")
    if found:
        return Path(found).parent
    if (BIN / "initdb").exists():
        return BIN
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) if Path("/usr/lib/postgresql").is_dir() else []
    return versions[-1].parent if versions else None


def new_schema(base_url: str, name: str) -> str:
    """Create the empty schema ``name`` in ``base_url``'s database; returns a URL whose connections
    work in it (``options=-csearch_path=NAME``)."""
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{base_url}{'&' if '?' in base_url else '?'}options={quote(f'-csearch_path={name}')}"


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
        return new_schema(self.base_url, f"t{os.getpid()}_{next(self._schemas)}")

    def log(self) -> str:
        try:
            return (self.dir / "postgres.log").read_text()[-4000:]
        except OSError:
            return ""


def _run_as(user: pwd.struct_passwd, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, user=user.pw_uid, group=user.pw_gid, capture_output=True, text=True, timeout=UP_TIMEOUT_S, **kw
    )


def _owner() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PgUnavailable("no postgres user to run PostgreSQL as (the postgresql package creates it)") from None


@contextmanager
def running_postgres(port: int, durable: bool = False) -> Iterator[PgServer]:
    """A PostgreSQL on 127.0.0.1:``port`` for the ``with`` block (see the module's docstring)."""
    try:
        import psycopg  # the [test] extra installs it
    except ImportError:
        raise PgUnavailable("psycopg not installed (pip install -e '.[test]' installs it)") from None
    bindir = _bin_dir()
    if bindir is None:
        raise PgUnavailable("PostgreSQL not installed (.ci/run installs the postgresql package)")
    owner = _owner()
    d = Path(tempfile.mkdtemp(prefix="straggler-pg-"))
    os.chown(d, owner.pw_uid, owner.pw_gid)
    data = d / "data"
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8"]
    r = _run_as(owner, initdb + ["--no-sync", "--no-instructions"], env=env, cwd=d)
    if r.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        raise PgServerError(f"initdb failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    settings = {} if durable else dict(FAST)
    settings.update(max_connections="400", log_min_messages="warning")
    log = open(d / "postgres.log", "wb")
    os.chown(d / "postgres.log", owner.pw_uid, owner.pw_gid)
    cmd = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(d)]
    proc = subprocess.Popen(
        cmd + [a for k, v in settings.items() for a in ("-c", f"{k}={v}")],
        user=owner.pw_uid,
        group=owner.pw_gid,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d,
        env=env,
    )
    server = PgServer(d, port, proc)
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise PgServerError(f"postgres exited with {proc.returncode}: {server.log()}")
            try:
                with psycopg.connect(
                    f"postgresql://{USER}@127.0.0.1:{port}/postgres", autocommit=True, connect_timeout=5
                ) as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PgServerError(
                        f"postgres did not accept connections within {UP_TIMEOUT_S:g} s: {server.log()}"
                    ) from None
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
