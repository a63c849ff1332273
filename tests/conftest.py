"""Shared fixtures: every test runs offline, against real SQLite files and the real SDK.
The helpers they use (and that tests use) are in helpers.py; the PostgreSQL ones in postgres.py.

pyproject.toml's addopts deselect the `slow` and `reliability` tests; `-m "slow or reliability"`
runs them, `-m ""` runs everything."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI

from . import postgres
from .helpers import CANARY_KEY, FULL, MACHINES, Answers, EnvOrch, orch_against

DEFAULT_SELECTION = "not slow and not reliability"  # the -m of pyproject.toml's addopts


def pytest_configure(config: pytest.Config) -> None:
    """ORCH_RELIABILITY=full asks for the reliability suites at their full counts, and the
    command for the figures (docs/reliability.md: `ORCH_RELIABILITY=full ... pytest -q
    tests/reliability`) gives no -m: lift the default deselection for it. A -m of its own wins.

    A suite launched in the background (`cmd &`, nohup) inherits SIGINT ignored, and so would
    every `orch` it starts (an ignored signal stays ignored across exec, and `orch` rightly
    keeps it so): the tests that send Ctrl-C would wait for a stop that never comes. Handled
    here, SIGINT reaches the children at its default again."""
    if FULL and config.option.markexpr == DEFAULT_SELECTION:
        config.option.markexpr = ""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real API: point the SDK at a closed loopback port by default."""
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ANTHROPIC_API_KEY", CANARY_KEY)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_DB", raising=False)
    monkeypatch.delenv("ORCH_SYNC", raising=False)
    monkeypatch.delenv("ORCH_AUDIT_KEY", raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "orch.db"


@pytest.fixture
def fake() -> FakeMessagesAPI:
    return FakeMessagesAPI(default=None)


@pytest.fixture
def orch(fake: FakeMessagesAPI, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EnvOrch]:
    """The `fake` fixture (unscripted states answer 400; a module may override `fake`) served
    to `orch` on `db_path`. Its processes get ORCH_KILL_AT, ORCH_STOP_GRACE or ORCH_BUSY_TIMEOUT
    only through `orch.with_env(...)`. tests/reliability/conftest.py makes the fake answer
    every state."""
    for name in ("ORCH_KILL_AT", "ORCH_STOP_GRACE", "ORCH_BUSY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # only the processes that are meant to get them
    with orch_against(fake, db_path) as cli:
        yield EnvOrch(cli.db, cli.base_url, started=cli.started)


@pytest.fixture
def answers(fake: FakeMessagesAPI, orch: EnvOrch) -> Iterator[Answers]:
    """`answer(state)` for every request, with holds (see `Answers`); set up after `orch`, so
    it replaces whatever answers `orch` gave the fake."""
    served = Answers(fake)
    try:
        yield served
    finally:
        served.release_all()


@pytest.fixture
def machines_dir(tmp_path: Path) -> Iterator[Path]:
    """A private copy of machines/ that a test may edit."""
    target = tmp_path / "machines"
    shutil.copytree(MACHINES, target)
    yield target


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server's DSN: ORCH_TEST_PG_DSN's, else a throwaway cluster of this process
    (stopped at session end), else the test is skipped, or fails under ORCH_REQUIRE_PG
    (postgres.py). Tests want a database of their own: `pg_dsn`."""
    with postgres.server() as dsn:
        yield dsn


@pytest.fixture
def pg_dsn_factory(pg_server: str) -> Iterator[Callable[[], str]]:
    """`pg_dsn_factory()` creates another empty database and returns its DSN, for a test that
    needs several; all are dropped after the test."""
    with postgres.databases(pg_server) as new:
        yield new


@pytest.fixture
def pg_dsn(pg_dsn_factory: Callable[[], str]) -> str:
    """The DSN of a fresh, empty database of this test's own, dropped after it."""
    return pg_dsn_factory()
