"""Reliability suites: a reduced but real run in CI, the full counts with ORCH_RELIABILITY=full.

Every test here is marked `reliability` (below), so the default `pytest -q` deselects them
with the `slow` ones; `pytest -q -m "slow or reliability"` runs them (.ci/run does), and
tests/test_reliability_fast.py keeps one small case of each behaviour in the default run.
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

from ..helpers import FULL, EnvOrch, Figures, answer_every_state

_LOCK = threading.Lock()
_HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/reliability/ `reliability`."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)


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
def orch(orch: EnvOrch, fake: FakeMessagesAPI) -> EnvOrch:
    """tests/conftest.py's `orch`, its fake answering every state with `answer(state)`
    (`answers` adds holds to that). A suite may override it (test_api_faults.py does)."""
    answer_every_state(fake)
    return orch
