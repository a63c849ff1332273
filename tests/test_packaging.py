"""What an installed package carries: every subpackage, and the example machines with their
inputs and offline answers, so that `orch demo` works wherever the package is installed
(test_cli.py runs the demo from an empty directory on the development install)."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .helpers import MACHINES, ROOT

EXAMPLES = "statemachine_orch.examples"


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """pyproject.toml lists the packages (machines/ ships as statemachine_orch.examples), so a
    new subpackage must be added there or it is missing from every install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "statemachine_orch").rglob("__init__.py")}
    assert listed == on_disk | {EXAMPLES}


def test_the_example_machines_inputs_and_answers_are_package_data() -> None:
    examples = importlib.resources.files(EXAMPLES)
    shipped = {entry.name for entry in examples.iterdir() if not entry.name.startswith("__")}
    assert {"report.py", "report_input.json", "report.offline.json"} <= shipped
    assert shipped == {p.name for p in MACHINES.iterdir() if not p.name.startswith("__")}


@pytest.mark.slow
def test_demo_works_from_a_wheel_installed_in_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` (not editable) into a new virtual environment, then `orch demo` from an
    empty directory: the demo comes from the installed package, not from a checkout."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "-q", "install", *map(str, wheels.glob("*.whl"))],
                   check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    demo = subprocess.run([str(venv / "bin" / "orch"), "-q", "demo"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert str(venv) in demo.stdout  # the machine ran from the installed package
    assert "matches the recording" in demo.stdout and (elsewhere / "orch.db").is_file()
