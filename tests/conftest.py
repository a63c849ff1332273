"""Shared fixtures: every test runs offline, against real SQLite files and the real SDK.
The helpers they use (and that tests use) are in helpers.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI

from .helpers import CANARY_KEY, MACHINES, Orch, orch_against


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real API: point the SDK at a closed loopback port by default."""
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ANTHROPIC_API_KEY", CANARY_KEY)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_DB", raising=False)
    monkeypatch.delenv("ORCH_SYNC", raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "orch.db"


@pytest.fixture
def fake() -> FakeMessagesAPI:
    return FakeMessagesAPI(default=None)


@pytest.fixture
def orch(fake: FakeMessagesAPI, db_path: Path) -> Iterator[Orch]:
    """The `fake` fixture (unscripted states answer 400; a module may override `fake`) served
    to `orch` on `db_path`. tests/reliability/conftest.py has an `orch` of its own."""
    with orch_against(fake, db_path) as cli:
        yield cli


@pytest.fixture
def machines_dir(tmp_path: Path) -> Iterator[Path]:
    """A private copy of machines/ that a test may edit."""
    target = tmp_path / "machines"
    shutil.copytree(MACHINES, target)
    yield target
