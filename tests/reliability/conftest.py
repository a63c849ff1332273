"""Reliability suites: a reduced but real run in CI, the full counts with ORCH_RELIABILITY=full.

Each suite records its figures (trials, kills, faults, re-paid calls...) with the `figures`
fixture; with ORCH_FIGURES=path they are merged into that JSON file, which
docs/reliability.md is written from:

    ORCH_RELIABILITY=full ORCH_FIGURES=reliability-figures.json \\
        .venv/bin/python -m pytest -q tests/reliability
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from statemachine_orch.testing import FakeMessagesAPI

from ..helpers import FULL, Answers, EnvOrch, Figures, answer_every_state, orch_against

_LOCK = threading.Lock()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    found = Figures(request.node.name)
    yield found
    target = os.environ.get("ORCH_FIGURES")
    if not target or not found.values:
        return
    with _LOCK:
        path = Path(target)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[found.suite] = {"mode": "full" if FULL else "ci", **found.values}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def orch(fake: FakeMessagesAPI, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EnvOrch]:
    """`EnvOrch` on `db_path`, talking to the fake served on loopback, which answers every state
    (`answers` adds holds to that). A suite may override it (test_api_faults.py does)."""
    for name in ("ORCH_KILL_AT", "ORCH_STOP_GRACE", "ORCH_BUSY_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # only the processes that are meant to get them
    with orch_against(answer_every_state(fake), db_path) as cli:
        yield EnvOrch(cli.db, cli.base_url, started=cli.started)


@pytest.fixture
def answers(fake: FakeMessagesAPI, orch: EnvOrch) -> Iterator[Answers]:
    """The fake's answers with holds (see `Answers`); set up after `orch`, whose answers it replaces."""
    served = Answers(fake)
    try:
        yield served
    finally:
        served.release_all()
