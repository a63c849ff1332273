"""Shared fixtures: every test runs offline, against real SQLite files and the real SDK."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine_orch.store.sqlite._schema import APPLICATION_ID
from statemachine_orch.testing import FakeMessagesAPI

ROOT = Path(__file__).resolve().parent.parent
MACHINES = ROOT / "machines"
CANARY_KEY = "sk-ant-api03-CANARY-" + "x" * 40  # must never appear in logs or the database
SCHEMA_V1 = Path(__file__).parent / "data" / "schema_v1.sql"  # as version 1 shipped; never regenerate


def create_v1_schema(conn: sqlite3.Connection) -> None:
    """An empty database of schema version 1, for the upgrade tests."""
    conn.executescript(SCHEMA_V1.read_text())
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")


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


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "statemachine_orch.cli"]


def run_orch(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
             input: str | None = None, timeout: float = 60) -> CLIResult:
    """Run the real `orch` console script in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(orch_command() + list(args), cwd=cwd, env=full_env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def machines_dir(tmp_path: Path) -> Iterator[Path]:
    """A private copy of machines/ that a test may edit."""
    target = tmp_path / "machines"
    shutil.copytree(MACHINES, target)
    yield target
