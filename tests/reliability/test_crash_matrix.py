"""Crash matrix: SIGKILL the real `orch run` at every kill point, then `orch resume` it.

Each trial picks a kill point and a step at random (seeded: the seed is printed and recorded
in the figures; set ORCH_RELIABILITY_SEED to replay one), runs a 5-state machine against one
fake Messages API served on loopback, kills the process there, resumes the run and measures
what the issue asks: runs completed, runs missing, `PRAGMA integrity_check`, committed steps
lost or called again (requests counted per run and state at the server), calls flagged in
doubt against calls re-sent, and the final log against an uninterrupted run's log. All
trials share one database, several at a time, so each also shows other runs are unaffected.

Kill points, in the order a step reaches them (statemachine_orch/faults.py): `run_created`,
`before_request`, `in_flight` (from outside: the fake holds the request, the test kills the
process), `after_response`, `mid_commit` (inside the step's transaction), `after_commit`.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ..helpers import (
    IN_FLIGHT_POINTS,
    LLM_STATES,
    POINTS,
    STATES,
    Answers,
    EnvOrch,
    Figures,
    Kill,
    Matrix,
    integrity,
    log_difference,
    reliability_seed,
    scaled,
    shown_in_doubt,
    write_machine,
)

pytestmark = pytest.mark.slow

WORKERS = 3  # trials run at once against the one database


# --------------------------------------------------------------------------- the matrix


def plan(rng: random.Random, trials: int) -> list[Kill]:
    """Points spread evenly over the trials (shuffled), each at a random step."""
    points = [POINTS[i % len(POINTS)] for i in range(trials)]
    rng.shuffle(points)
    kills = []
    for point in points:
        steps = (1 if point == "run_created"
                 else len(LLM_STATES) if point in ("before_request", "in_flight") else len(STATES))
        kills.append(Kill(point, rng.randint(1, steps)))
    return kills


def test_sigkill_at_every_kill_point_then_resume(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = reliability_seed()
    rng = random.Random(seed)
    kills = plan(rng, scaled(30, 240))
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        trials = list(pool.map(matrix.trial, range(1, len(kills) + 1), kills))

    listed = {r["run_id"]: r["status"] for r in orch.json("runs", "--limit", str(len(trials) + 10))}
    audit = orch("audit", "verify")
    figures["seed"] = seed
    figures["trials"] = len(trials)
    for point in POINTS:
        figures[f"kills_{point}"] = sum(t.kill.point == point for t in trials)
    figures["kills_at_in_flight_points"] = sum(t.kill.point in IN_FLIGHT_POINTS for t in trials)
    figures["runs_completed_after_resume"] = sum(t.completed for t in trials)
    figures["runs_missing"] = sum(t.run_id not in listed for t in trials)
    figures["integrity_checks"] = 2 * len(trials)
    figures["integrity_failures"] = sum(t.integrity_failures for t in trials)
    figures["committed_steps_lost"] = sum(t.lost for t in trials)
    figures["committed_steps_recalled"] = sum(t.recalled for t in trials)
    figures["calls_flagged_in_doubt"] = sum(len(t.flagged) for t in trials)
    figures["repaid_calls"] = sum(t.repaid for t in trials)
    figures["requests_at_the_fake"] = sum(sum(t.calls_after.values()) for t in trials)
    figures["calls_in_the_logs"] = sum(t.calls_recorded for t in trials)
    figures["final_logs_differing"] = sum(log_difference(t.after, reference) is not None
                                          for t in trials)
    figures["audit_verify_exit"] = audit.code

    problems = [line for t in trials for line in t.problems(reference)]
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    assert set(POINTS) == {t.kill.point for t in trials}
    assert listed == dict.fromkeys([t.run_id for t in trials] + ["reference"], "completed")
    assert figures.values["calls_flagged_in_doubt"] <= figures.values["kills_at_in_flight_points"]
    assert figures.values["calls_flagged_in_doubt"] == figures.values["repaid_calls"] == sum(
        t.kill.repaid for t in trials)
    assert audit.code == 0, audit.stdout + audit.stderr
    assert f"{len(trials) + 1} run(s) checked, 0 with a broken log" in audit.stdout
    assert integrity(orch.db) == "ok"
    shown_in_doubt(orch, next(t for t in trials if t.flagged))


