"""A real PostgreSQL server for the tests, and a fresh empty database per test.

The server (the `pg_server` fixture of tests/conftest.py) is, in this order:
- the one ORCH_TEST_PG_DSN names (.ci/run starts one with .ci/postgres.sh and sets it);
- else a throwaway cluster that this process starts with `.ci/postgres.sh start` and stops when
  it ends: each pytest-xdist worker that needs one starts its own (under a second), so there is
  nothing shared to lock or to count down;
- else none: the tests that need one are skipped, or fail where ORCH_REQUIRE_PG is set (CI).
ORCH_PG_BIN=DIR makes the script look for the binaries in DIR only (ORCH_PG_BIN=/nowhere: none).

psycopg is imported only once a test asks for a database, so this module imports without it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:
    import psycopg

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"
NO_SERVER = "no PostgreSQL server: set ORCH_TEST_PG_DSN or install postgresql"


def required() -> bool:
    return os.environ.get("ORCH_REQUIRE_PG", "") not in ("", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it where ORCH_REQUIRE_PG says PostgreSQL tests must run (CI)."""
    if required():
        pytest.fail(f"{reason} (ORCH_REQUIRE_PG is set)", pytrace=False)
    pytest.skip(reason)


def script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def require_binaries() -> None:
    """Tests never install anything: without binaries there is no server to start."""
    if script("bin").returncode != 0:
        unavailable(NO_SERVER)


def require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed: pip install -e '.[test]'")


class Cluster(NamedTuple):
    dsn: str
    directory: Path


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A cluster of `.ci/postgres.sh start`, stopped and removed on exit, or when this process
    dies without exiting (a killed xdist worker never reaches the end of its session): a watchdog
    process waits for the end of its stdin, a pipe that only this process holds open, then runs
    `.ci/postgres.sh stop`. Every stop goes through it, the one after a failed start included,
    unless a forked child outlives the block with the pipe: then the stop is made here."""
    require_binaries()  # else the script would install them
    # The system's temporary directory, not pytest's: that one is private to its user, and as
    # root the server runs as the postgres user.
    directory = Path(tempfile.mkdtemp(prefix="orch-pg-"))
    watchdog = subprocess.Popen(["bash", "-c", 'cat >/dev/null; exec bash "$0" stop "$1"', SCRIPT, directory],
                                stdin=subprocess.PIPE, start_new_session=True)  # Ctrl-C is for pytest
    assert watchdog.stdin is not None
    try:
        started = script("start", str(directory), timeout=120)
        if started.returncode != 0:
            pytest.fail(f".ci/postgres.sh start failed:\n{started.stderr}", pytrace=False)
        yield Cluster(started.stdout.strip(), directory)
    finally:
        watchdog.stdin.close()
        try:
            watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a forked child of ours still holds the pipe: stop it here
            os.killpg(watchdog.pid, signal.SIGKILL)
            watchdog.wait()
            script("stop", str(directory))


@contextmanager
def server() -> Iterator[str]:
    """The DSN of the session's server: ORCH_TEST_PG_DSN's, else a throwaway cluster's."""
    given = os.environ.get("ORCH_TEST_PG_DSN")
    if given:
        yield given
        return
    with throwaway_cluster() as cluster:
        yield cluster.dsn


def with_dbname(dsn: str, dbname: str) -> str:
    """`dsn` pointing at database `dbname`; a URL stays a URL (a store may tell its DSN by the scheme)."""
    parts = urlsplit(dsn)
    if parts.scheme in ("postgres", "postgresql"):
        return urlunsplit(parts._replace(path=f"/{dbname}"))
    from psycopg.conninfo import make_conninfo

    return make_conninfo(dsn, dbname=dbname)


def admin(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection: CREATE and DROP DATABASE cannot run in a transaction."""
    require_psycopg()
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    require_psycopg()
    import psycopg

    return psycopg.connect(dsn, connect_timeout=10)


@contextmanager
def databases(server_dsn: str) -> Iterator[Callable[[], str]]:
    """`new()` creates an empty database on the server and returns its DSN; on exit every one
    made is dropped, connections still open to it or not."""
    require_psycopg()
    from psycopg import sql

    made: list[str] = []

    def new() -> str:
        name = f"t_{secrets.token_hex(6)}"
        with admin(server_dsn) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return with_dbname(server_dsn, name)

    try:
        yield new
    finally:
        if made:
            with admin(server_dsn) as conn:
                for name in made:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
