"""The PostgreSQL fixtures (tests/postgres.py): a real server on loopback, a fresh empty database
per test, and a clear skip (or failure, under ORCH_REQUIRE_PG) where there is no server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import postgres

THROWAWAY_SETTINGS = {  # what .ci/postgres.sh sets
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def one(dsn: str, query: str, *params: object) -> object:
    with postgres.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def settings(dsn: str, names: list[str]) -> dict[str, object]:
    return {name: one(dsn, "SELECT current_setting(%s, true)", name) for name in names}


def database_names(server_dsn: str) -> set[object]:
    with postgres.admin(server_dsn) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_a_query_runs_in_a_database_of_the_tests_own(pg_dsn: str) -> None:
    assert one(pg_dsn, "SELECT 1") == 1
    assert str(one(pg_dsn, "SELECT current_database()")).startswith("t_")


def test_the_server_is_a_throwaway_on_loopback_only(pg_dsn: str) -> None:
    found = settings(pg_dsn, ["orch.test_server", *THROWAWAY_SETTINGS])
    if found.pop("orch.test_server") != "on":  # not started by .ci/postgres.sh
        assert os.environ.get("ORCH_TEST_PG_DSN"), "the fixture's own cluster lacks .ci/postgres.sh's settings"
        pytest.skip("ORCH_TEST_PG_DSN names a server that .ci/postgres.sh did not start")
    assert found == THROWAWAY_SETTINGS


@pytest.mark.parametrize("turn", [1, 2])
def test_each_test_gets_an_empty_database(pg_dsn: str, turn: int) -> None:
    """Whichever turn runs second (in any worker) would see the first one's table if they shared."""
    with postgres.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE left_behind (turn int)")
        conn.execute("INSERT INTO left_behind VALUES (%s)", [turn])


def test_the_factory_makes_distinct_databases_and_drops_them(pg_server: str) -> None:
    with postgres.databases(pg_server) as new:
        first, second = new(), new()
        assert first != second
        names = {one(dsn, "SELECT current_database()") for dsn in (first, second)}
        assert len(names) == 2 and names <= database_names(pg_server)
        still_open = postgres.connect(first)  # dropped all the same (WITH (FORCE))
    still_open.close()
    assert not names & database_names(pg_server)


def test_a_dsn_names_the_database() -> None:
    postgres.require_psycopg()
    assert postgres.with_dbname("postgresql://postgres@127.0.0.1:5/postgres", "t_1") == \
        "postgresql://postgres@127.0.0.1:5/t_1"
    assert postgres.with_dbname("postgres://u@h/d?sslmode=disable", "t_1") == "postgres://u@h/t_1?sslmode=disable"
    assert "dbname=t_1" in postgres.with_dbname("host=127.0.0.1 port=5 dbname=postgres", "t_1")


def test_no_server_skips_the_test_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_TEST_PG_DSN", raising=False)
    monkeypatch.delenv("ORCH_REQUIRE_PG", raising=False)
    monkeypatch.setenv("ORCH_PG_BIN", "/nowhere")
    with pytest.raises(pytest.skip.Exception, match=postgres.NO_SERVER), postgres.server():
        pass


def test_no_server_fails_the_test_under_orch_require_pg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_TEST_PG_DSN", raising=False)
    monkeypatch.setenv("ORCH_REQUIRE_PG", "1")
    monkeypatch.setenv("ORCH_PG_BIN", "/nowhere")
    with pytest.raises(pytest.fail.Exception, match=postgres.NO_SERVER), postgres.server():
        pass


def test_a_throwaway_cluster_is_stopped_and_removed_on_exit() -> None:
    with postgres.throwaway_cluster() as cluster:
        assert settings(cluster.dsn, list(THROWAWAY_SETTINGS)) == THROWAWAY_SETTINGS
        assert cluster.directory.is_dir()
    assert not cluster.directory.exists()
    assert not reachable(cluster.dsn)


def test_a_throwaway_cluster_is_stopped_when_its_process_is_killed() -> None:
    """A killed pytest worker never reaches its session's end: the watchdog stops its server."""
    postgres.require_binaries()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom tests.postgres import throwaway_cluster\n"
         "with throwaway_cluster() as c:\n print(c.dsn, c.directory, flush=True)\n time.sleep(120)"],
        cwd=postgres.SCRIPT.parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        dsn, directory = owner.stdout.readline().split()
        assert reachable(dsn)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 60
    while Path(directory).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(directory).exists()
    assert not reachable(dsn)


def reachable(dsn: str) -> bool:
    try:
        postgres.connect(dsn).close()
    except Exception:
        return False
    return True
