"""SIGTERM: the real `orch run` stops taking new steps, lets the step in progress finish within
ORCH_STOP_GRACE seconds (else abandons its call), commits, and exits 143 with the run
`interrupted`; `orch resume` then completes it with nothing lost and no committed step re-sent.

The signal's timing is made deterministic from outside: the fake Messages API holds a call
(or a Python state waits for a file) until the test has sent SIGTERM and the kernel has
delivered it to the process's handler (read from /proc/PID/status).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ..helpers import (
    LLM_STATES,
    Answers,
    EnvOrch,
    Figures,
    Matrix,
    pausing_machine,
    reliability_seed,
    scaled,
    stop_during_a_python_step,
    stop_past_the_grace,
    stop_within_the_grace,
    write_machine,
)

pytestmark = pytest.mark.slow


def test_sigterm_lets_the_call_in_flight_finish_commit_and_stop(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = figures["seed"] = reliability_seed()
    rng = random.Random(seed)
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    for number in range(1, scaled(2, 10) + 1):
        state = rng.choice(LLM_STATES[:-1])  # a step with one after it, which must not start
        stop_within_the_grace(matrix, reference, state, f"finish-{number}-{state}", figures)


def test_sigterm_abandons_a_call_that_outlasts_the_grace(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = figures["seed"] = reliability_seed()
    rng = random.Random(seed)
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    for number in range(1, scaled(2, 10) + 1):
        state = rng.choice(LLM_STATES)
        stop_past_the_grace(matrix, reference, state, f"abandon-{number}-{state}", figures)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sigterm_during_a_python_step_stops_before_the_next_step(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures, kind: str) -> None:
    machine = pausing_machine(tmp_path, kind)
    for number in range(1, scaled(1, 5) + 1):
        stop_during_a_python_step(orch, answers, tmp_path, machine, f"pause-{kind}-{number}", figures)
