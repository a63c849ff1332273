"""Races on one database: real `orch` processes, the real SDK over loopback to the served fake,
and one SQLite file shared by every writer.

- Two `orch resume` of the same run, launched a random delay apart: exactly one advances it.
- Owners that lost the run write nothing (the fence), checked on the store directly.
- 8 `orch run` processes plus 100 runs inside one process, all on one file: nothing is
  lost and no "database is locked" reaches anyone.
- A call held far longer than the busy timeout never lets a second process take the run.

Resumable runs are prepared in process on a fake of their own (`seed_runs`), or by real
`orch run` processes killed at a kill point, so the served fake sees only what the racers send.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from statemachine_orch.testing import FakeMessagesAPI

from ..helpers import (
    FULL,
    OPERATIONS,
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    WAIT_S,
    CLIResult,
    Figures,
    Orch,
    answer,
    committed_states,
    in_flight_ahead,
    integrity,
    interleaved_writers_example,
    many_writers_trial,
    new_database_trial,
    one_error_line,
    query,
    requested_states,
    run_orch,
    run_row,
    scaled,
    seed_runs,
    stale_owner_trial,
    tally,
)

# --------------------------------------------------------------------------- two resumes, one run


KILL_POINTS = ("before_request", "after_response", "mid_commit", "after_commit")


@dataclass
class Trial:
    run_id: str
    how: str  # how the run was left resumable: "failed at STATE" or "killed at POINT:N"
    delay_s: float  # between launching the first and the second `orch resume`
    remaining: list[str]  # states the run still has to go through
    requested: list[str] = field(default_factory=list)  # those it must call for (not a kept answer)
    racers: list[tuple[int, CLIResult]] | None = None  # (pid, result) of both resumes


def plan_trials(rng: random.Random, count: int) -> list[Trial]:
    """Random resumable runs and random launch delays: half within 50 ms (both reach the claim
    together), half up to 1.5 s (the second may start while the first calls, or after it ended)."""
    trials = []
    for n in range(count):
        if rng.random() < 0.25:
            how = f"killed at {rng.choice(KILL_POINTS)}:{rng.randint(1, 4)}"
        else:
            how = f"failed at {rng.choice(REPORT_STATES)}"
        delay = rng.uniform(0, 0.05) if rng.random() < 0.5 else rng.uniform(0.05, 1.5)
        trials.append(Trial(f"race-{n:04d}", how, delay, []))
    return trials


def make_resumable(orch: Orch, trials: Sequence[Trial]) -> None:
    """Leave every trial's run resumable: failed runs in process, killed runs by real `orch run`
    processes SIGKILLed at their kill point (several at a time)."""
    seed_runs(orch.db, {t.run_id: t.how.removeprefix("failed at ") for t in trials
                        if t.how.startswith("failed at ")})

    def kill(trial: Trial) -> CLIResult:
        env = {**orch.env(), "ORCH_KILL_AT": trial.how.removeprefix("killed at ")}
        return run_orch(*orch.argv(["-q", "run", REPORT, "--input", REPORT_INPUT, "--run-id",
                                    trial.run_id]), env=env, timeout=WAIT_S)

    killed = [t for t in trials if t.how.startswith("killed at ")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for trial, result in zip(killed, pool.map(kill, killed), strict=True):
            assert result.code == -9, f"{trial.how} did not kill: {result.code} {result.stderr}"
    for trial in trials:
        trial.remaining = list(REPORT_STATES[len(committed_states(orch.db, trial.run_id)):])
        assert trial.remaining, f"{trial.run_id} ({trial.how}) has nothing left to resume"
        mark = in_flight_ahead(orch.db, trial.run_id)
        kept = mark is not None and mark.get("answered")  # paid before the kill: committed, not asked again
        trial.requested = trial.remaining[1:] if kept else trial.remaining


def race(orch: Orch, trial: Trial) -> Trial:
    first = orch.start("resume", trial.run_id)
    time.sleep(trial.delay_s)
    second = orch.start("resume", trial.run_id)
    trial.racers = [(proc.pid, Orch.finish(proc, timeout=WAIT_S)) for proc in (first, second)]
    return trial


def outcome(trial: Trial) -> str:
    """What one race came to: "busy" (the loser exited 3: the winner was driving the run),
    "already_completed" (the loser exited 2: the winner had finished), or what went wrong."""
    assert trial.racers is not None
    codes = sorted(r.code for _, r in trial.racers)
    if codes not in ([0, 2], [0, 3]):
        return f"exit codes {codes}: " + " | ".join(r.stderr[-300:] for _, r in trial.racers)
    (winner_pid, winner), (_, loser) = sorted(trial.racers, key=lambda racer: racer[1].code)
    lines = loser.stderr.splitlines()
    if "locked" in winner.stderr + loser.stderr or f"run {trial.run_id} completed" not in winner.stdout:
        return f"winner: {winner.stdout[-200:]} {winner.stderr[-300:]} loser: {loser.stderr[-300:]}"
    if loser.code == 3:
        expected = f"orch: error: run {trial.run_id} is being driven by pid {winner_pid} "
        kind = "busy"
    else:
        expected = f"orch: error: run {trial.run_id} is already completed; nothing to resume"
        kind = "already_completed"
    if len(lines) != 1 or not lines[0].startswith(expected):
        return f"loser exit {loser.code} said {lines}, not one line starting {expected!r}"
    return kind


def test_two_resumes_of_one_run_let_exactly_one_advance_it(orch: Orch, fake: FakeMessagesAPI,
                                                         figures: Figures) -> None:
    seed = random.randrange(2**32)
    print(f"race seed {seed}")  # shown when the test fails
    rng = random.Random(seed)
    trials = plan_trials(rng, scaled(20, 1000))
    make_resumable(orch, trials)
    before = len(fake.requests)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two trials at once: four racers
        done = list(pool.map(lambda t: race(orch, t), trials))

    during = fake.requests[before:]
    outcomes = {t.run_id: outcome(t) for t in done}
    kinds = Counter(outcomes.values())
    wrong_calls = {t.run_id: requested_states(during, t.run_id) for t in done
                   if requested_states(during, t.run_id) != tally(t.requested)}
    unfinished = {t.run_id: committed_states(orch.db, t.run_id) for t in done
                  if committed_states(orch.db, t.run_id) != list(REPORT_STATES)}
    audit = orch("audit", "verify")
    figures["trials"] = len(trials)
    figures["seed"] = seed
    figures["parallel_trials"] = 2
    figures["runs_failed_at_a_state"] = sum(t.how.startswith("failed") for t in trials)
    figures["runs_killed"] = sum(t.how.startswith("killed") for t in trials)
    figures["delay_s_max"] = round(max(t.delay_s for t in trials), 3)
    figures["loser_busy_exit_3"] = kinds["busy"]
    figures["loser_after_completion_exit_2"] = kinds["already_completed"]
    figures["other_outcomes"] = len(trials) - kinds["busy"] - kinds["already_completed"]
    figures["runs_with_a_state_called_twice_or_never"] = len(wrong_calls)
    figures["runs_not_completed"] = len(unfinished)
    figures["chains_broken"] = audit.stdout.count(": TAMPERED")

    assert {run_id: o for run_id, o in outcomes.items()
            if o not in ("busy", "already_completed")} == {}, f"seed {seed}"
    assert wrong_calls == {}, f"seed {seed}: calls differ from one per remaining state"
    assert unfinished == {}, f"seed {seed}"
    statuses = Counter(r["status"] for r in query(orch.db, "SELECT status FROM runs"))
    assert statuses == {"completed": len(trials)}
    assert audit.code == 0, audit.stdout[-2000:]
    assert audit.stdout.splitlines()[-1] == f"{len(trials)} run(s) checked, 0 with a broken log"
    assert integrity(orch.db) == "ok"


# --------------------------------------------------------------------------- the fence


def test_an_owner_that_lost_its_run_writes_nothing(tmp_path: Path) -> None:
    stale_owner_trial(tmp_path)


@settings(max_examples=scaled(40, 400), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
def test_interleaved_writers_only_land_the_current_owners_writes(tmp_path: Path,
                                                                 operations: list[tuple[str, str]]
                                                                 ) -> None:
    interleaved_writers_example(tmp_path, operations)


# --------------------------------------------------------------------------- many writers


def test_eight_processes_and_a_hundred_runs_in_one_process_share_one_file(
        orch: Orch, fake: FakeMessagesAPI, figures: Figures) -> None:
    many_writers_trial(orch, fake, figures, rounds=scaled(1, 5))


def test_processes_creating_one_new_database_at_once_all_open_it(tmp_path: Path,
                                                                 figures: Figures) -> None:
    new_database_trial(tmp_path, figures, trials=scaled(100, 2000))


# --------------------------------------------------------------------------- a slow call


BUSY_TIMEOUT_S = 1.0
HOLD_S = 30.0 if FULL else 3.0  # the call is held at least this long: several busy timeouts
MIN_TAKEOVER_TRIES = 3


def test_a_slow_call_never_lets_a_second_process_take_the_run(orch: Orch, fake: FakeMessagesAPI,
                                                               figures: Figures) -> None:
    gate = threading.Event()
    held = answer(REPORT_STATES[0])
    held.gate = gate
    fake.on(REPORT_STATES[0], held)
    tries: list[CLIResult] = []
    driver = orch.start("run", REPORT, "--input", REPORT_INPUT, "--run-id", "slow")
    try:
        assert fake.wait_for(REPORT_STATES[0], 1, timeout=WAIT_S)
        held_since = time.monotonic()
        while len(tries) < MIN_TAKEOVER_TRIES or time.monotonic() - held_since < HOLD_S:
            tries.append(run_orch(*orch.argv(["resume", "slow"]), env={
                **orch.env(), "ORCH_BUSY_TIMEOUT": str(BUSY_TIMEOUT_S)}, timeout=WAIT_S))
            owner = run_row(orch.db, "slow")
            assert owner["status"] == "running" and f'"pid":{driver.pid},' in owner["owner_info"]
        held_for = time.monotonic() - held_since
    finally:
        gate.set()
    done = Orch.finish(driver, timeout=WAIT_S)
    refused = [attempt for attempt in tries if attempt.code == 3
               and f"run slow is being driven by pid {driver.pid} " in one_error_line(attempt)]
    figures["takeover_attempts"] = len(tries)
    figures["takeover_attempts_refused"] = len(refused)
    figures["busy_timeout_s"] = BUSY_TIMEOUT_S
    figures["call_held_s"] = round(held_for, 1)

    assert len(refused) == len(tries), [(t.code, t.stderr) for t in tries]
    assert done.code == 0, done.stderr
    assert "run slow completed after 5 step(s)" in done.stdout
    assert committed_states(orch.db, "slow") == list(REPORT_STATES)
    assert requested_states(fake.requests, "slow") == tally(REPORT_STATES)
    assert query(orch.db, "SELECT seq FROM transitions WHERE in_doubt = 1") == []
