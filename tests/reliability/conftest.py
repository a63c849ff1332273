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
from typing import Any

import pytest

FULL = os.environ.get("ORCH_RELIABILITY") == "full"
_LOCK = threading.Lock()


def scaled(ci: int, full: int) -> int:
    """A trial count: `ci` in the default (CI) run, `full` with ORCH_RELIABILITY=full."""
    return full if FULL else ci


class Figures:
    """Numbers a suite measured, kept under the suite's name."""

    def __init__(self, suite: str) -> None:
        self.suite = suite
        self.values: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def add(self, key: str, amount: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount


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
