"""SIGTERM: the real `orch run` stops taking new steps, lets the step in progress finish within
ORCH_STOP_GRACE seconds (else abandons its call), commits, and exits 143 with the run
`interrupted`; `orch resume` then completes it with nothing lost and no committed step re-sent.

The signal's timing is made deterministic from outside: the fake Messages API holds a call
(or a Python state waits for a file) until the test has sent SIGTERM and the kernel has
delivered it to the process's handler (read from /proc/PID/status).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..helpers import (
    LLM_STATES,
    STATES,
    WAIT_S,
    Answers,
    CLIResult,
    EnvOrch,
    Figures,
    Matrix,
    Orch,
    flagged_seqs,
    log_difference,
    reliability_seed,
    rows,
    scaled,
    stored_status,
    wait_for_arrival,
    write,
    write_machine,
)

pytestmark = pytest.mark.slow

LONG_GRACE = "60"  # longer than any step here takes once released
SHORT_GRACE = "0.2"  # shorter than the held call, which is held until the process has exited
STOP_WAIT_S = 20.0  # the short grace must end the process well within this (not the default 30 s)
STOPPED = "stopped on request; resume to continue"

PAUSING_MACHINES = '''
import asyncio
import time
from pathlib import Path

from statemachine_orch import LLMState, Machine, PythonState

WAIT_S = 60.0


def arrive(ctx):
    """Count this run of the step, say it has started, and return the file that lets it go on."""
    folder = Path(ctx.input["folder"])
    with open(folder / "pause.runs", "a", encoding="utf-8") as runs:
        runs.write(ctx.run_id + "\\n")
    (folder / "pause.reached").touch()
    return folder / "pause.go"


def pause_sync(ctx):
    go, deadline = arrive(ctx), time.monotonic() + WAIT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody let the pause go on")
        time.sleep(0.01)
    return "went on"


async def pause_async(ctx):
    go, deadline = arrive(ctx), time.monotonic() + WAIT_S
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("nobody let the pause go on")
        await asyncio.sleep(0.01)
    return "went on"


def pausing(name, pause):
    return Machine(name, states=[
        LLMState("before", prompt="Say something first.", max_tokens=50),
        PythonState("pause", run=pause),
        LLMState("after", prompt="Now say it {pause}.", needs=["pause"], max_tokens=50),
    ])


paused_sync = pausing("paused_sync", pause_sync)
paused_async = pausing("paused_async", pause_async)
'''
PAUSING_STATES = ("before", "pause", "after")


def wait_until_delivered(proc: subprocess.Popen[str], sig: int) -> None:
    """Until `sig` is no longer pending for the process: its handler has received it, so
    the stop is requested before anything the test releases after this point can be read."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + WAIT_S
    while True:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line)
        assert int(status["SigCgt"], 16) & bit, f"orch does not handle signal {sig}"
        if not (int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)) & bit:
            return
        assert time.monotonic() < deadline, f"signal {sig} still pending after {WAIT_S}s"
        time.sleep(0.01)


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, f"orch exited {proc.returncode} before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {WAIT_S}s"
        time.sleep(0.01)


@dataclass
class Stopped:
    """One SIGTERMed run: what the stopped process left, and what `orch resume` made of it."""

    stopped: CLIResult
    before: list[dict[str, Any]]
    calls_before: Counter[str]
    status_before: str
    resumed: CLIResult
    after: list[dict[str, Any]]
    calls_after: Counter[str]
    status_after: str

    @property
    def result(self) -> dict[str, Any]:
        return dict(json.loads(self.stopped.stdout))

    @property
    def committed(self) -> list[str]:
        return [row["from_state"] for row in self.before if row["to_state"]]

    @property
    def resent(self) -> int:
        """Requests the resume sent for steps the stopped process had committed."""
        return sum(self.calls_after[s] - self.calls_before[s] for s in self.committed)

    def assert_stopped(self, committed: list[str]) -> None:
        """Exit 143, run `interrupted` with exactly `committed` stored, resumable."""
        assert self.stopped.code == 143, (self.stopped.code, self.stopped.stderr)
        assert (self.result["status"], self.result["error"]) == ("interrupted", STOPPED)
        assert self.result["path"] == committed
        assert self.status_before == "interrupted"
        assert [row["from_state"] for row in self.before] == committed  # no failed row either
        assert self.resumed.code == 0, self.resumed.stderr
        assert self.status_after == "completed"
        assert self.resent == 0
        assert self.after[:len(self.before)] == self.before  # nothing committed was lost


def stop_and_resume(orch: Orch, answers: Answers, run_id: str, proc: subprocess.Popen[str], *,
                    timeout: float = WAIT_S) -> Stopped:
    """Wait for the signalled process to exit, then resume its run; both observed."""
    stopped = Orch.finish(proc, timeout=timeout)
    before, calls_before = rows(orch.db, run_id), answers.calls(run_id)
    status_before = stored_status(orch.db, run_id)
    resumed = orch("-q", "resume", run_id, "--json")
    return Stopped(stopped, before, calls_before, status_before, resumed, rows(orch.db, run_id),
                   answers.calls(run_id), stored_status(orch.db, run_id))


def record(figures: Figures, trial: Stopped) -> None:
    """Add one trial's numbers (before its assertions, so a failure still shows them)."""
    figures.add("trials")
    figures.add("exit_143", trial.stopped.code == 143)
    figures.add("runs_interrupted", trial.status_before == "interrupted")
    figures.add("runs_completed_after_resume", trial.resumed.code == 0 and trial.status_after == "completed")
    figures.add("committed_steps_resent", trial.resent)
    figures.add("calls_flagged_in_doubt", len(flagged_seqs(trial.after)))
    figures.add("repaid_calls", sum(n - 1 for n in trial.calls_after.values() if n > 1))


def test_sigterm_lets_the_call_in_flight_finish_commit_and_stop(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = figures["seed"] = reliability_seed()
    rng = random.Random(seed)
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    patient = orch.with_env(ORCH_STOP_GRACE=LONG_GRACE)
    for number in range(1, scaled(2, 10) + 1):
        state = rng.choice(LLM_STATES[:-1])  # a step with one after it, which must not start
        run_id = f"finish-{number}-{state}"
        hold = answers.hold(run_id, state, answered=True)
        proc = matrix.start(run_id, patient)
        try:
            wait_for_arrival(hold, proc)
            proc.send_signal(signal.SIGTERM)
            wait_until_delivered(proc, signal.SIGTERM)
        finally:
            answers.release(run_id)  # the answer arrives after the stop was requested
        trial = stop_and_resume(orch, answers, run_id, proc)
        record(figures, trial)
        figures.add("steps_finished_within_grace", state in trial.committed)

        done = list(STATES[:STATES.index(state) + 1])  # the held step finished and committed
        trial.assert_stopped(done)
        assert trial.calls_before == Counter(s for s in done if s in LLM_STATES), (
            f"seed {seed}: a step was started after SIGTERM")
        assert trial.calls_after == Counter(LLM_STATES)
        assert flagged_seqs(trial.after) == []  # the call was answered and committed: no doubt
        assert (difference := log_difference(trial.after, reference)) is None, difference


def test_sigterm_abandons_a_call_that_outlasts_the_grace(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures) -> None:
    seed = figures["seed"] = reliability_seed()
    rng = random.Random(seed)
    matrix = Matrix(orch, answers, *write_machine(tmp_path))
    reference = matrix.reference()
    hasty = orch.with_env(ORCH_STOP_GRACE=SHORT_GRACE)
    for number in range(1, scaled(2, 10) + 1):
        state = rng.choice(LLM_STATES)
        run_id = f"abandon-{number}-{state}"
        hold = answers.hold(run_id, state)
        proc = matrix.start(run_id, hasty)
        try:
            wait_for_arrival(hold, proc)
            proc.send_signal(signal.SIGTERM)
            trial = stop_and_resume(orch, answers, run_id, proc, timeout=STOP_WAIT_S)
        finally:
            answers.release(run_id)  # only now: the call was still held when orch gave up on it
        record(figures, trial)
        figures.add("calls_abandoned", state not in trial.committed)

        seq = STATES.index(state) + 1
        done = list(STATES[:seq - 1])  # nothing committed for the abandoned step
        trial.assert_stopped(done)
        assert trial.calls_before == Counter(s for s in STATES[:seq] if s in LLM_STATES)
        assert trial.calls_after == Counter(LLM_STATES) + Counter([state])  # re-sent once
        assert flagged_seqs(trial.after) == [seq], f"seed {seed}: the re-sent call is not in doubt"
        assert (difference := log_difference(trial.after, reference)) is None, difference


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sigterm_during_a_python_step_stops_before_the_next_step(
        orch: EnvOrch, answers: Answers, tmp_path: Path, figures: Figures, kind: str) -> None:
    machine = f"{write(tmp_path / 'pausing.py', PAUSING_MACHINES)}:paused_{kind}"
    patient = orch.with_env(ORCH_STOP_GRACE=LONG_GRACE)
    for number in range(1, scaled(1, 5) + 1):
        run_id = f"pause-{kind}-{number}"
        folder = tmp_path / run_id
        folder.mkdir()
        data = write(tmp_path / f"{run_id}.json", json.dumps({"folder": str(folder)}))
        proc = patient.start("-q", "run", machine, "--input", data, "--run-id", run_id, "--json")
        wait_for_file(folder / "pause.reached", proc)
        proc.send_signal(signal.SIGTERM)
        wait_until_delivered(proc, signal.SIGTERM)
        (folder / "pause.go").touch()
        trial = stop_and_resume(orch, answers, run_id, proc)
        record(figures, trial)
        figures.add("steps_started_after_sigterm", trial.calls_before["after"])

        trial.assert_stopped(["before", "pause"])
        assert trial.calls_before == Counter(["before"]), "a step was started after SIGTERM"
        assert trial.calls_after == Counter(["before", "after"])
        assert (folder / "pause.runs").read_text().split() == [run_id]  # not run again
        assert [r["from_state"] for r in trial.after] == list(PAUSING_STATES)
        assert flagged_seqs(trial.after) == []
