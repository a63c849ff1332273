"""User code a run calls (guards, Python states, fallback functions), end to end through `orch`:
whatever it raises, however long it spins, a paid answer is never lost or paid again, and a
signal or a `timeout=` stops it with one line (issue 11, items 1, 4 and 19)."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from statemachine_orch import Engine, Machine, PythonState, RunResult, RunStatus, open_store
from statemachine_orch.testing import FakeMessagesAPI, error

from .helpers import (
    MODEL,
    EnvOrch,
    Orch,
    reply,
    stored_log,
    stored_status,
    wait_for_file,
    write,
)

MACHINES = f'''
import asyncio
import os
import sys
import time
from pathlib import Path

from statemachine_orch import FlowDecision, LLMState, Machine, PythonState, RetryPolicy, guard

SPIN_S = 60.0  # a spin nobody stops gives up after this, so a failing test cannot hang


class Custom(BaseException):
    """Not an Exception: what some framework's own control flow raises."""


def misbehave(where):
    """What MISBEHAVE=where:how asks of `where` ("guard", "python" or "fallback")."""
    asked, _, how = os.environ.get("MISBEHAVE", "").partition(":")
    if asked != where:
        return
    if how == "exit":
        sys.exit(0)
    if how == "keyboard":
        raise KeyboardInterrupt
    if how == "cancelled":
        raise asyncio.CancelledError
    if how == "custom":
        raise Custom("not an Exception")
    if how == "spin":
        spin()


def spin():
    Path(os.environ["SPIN_FILE"]).touch()
    deadline = time.monotonic() + SPIN_S
    while time.monotonic() < deadline:
        pass
    raise RuntimeError("nobody stopped the spin")


@guard(FlowDecision.CONTINUE)
def judge(output, ctx):
    misbehave("guard")
    return FlowDecision.CONTINUE


def count(ctx):
    misbehave("python")
    return len(ctx.outputs["ask"].split())


def stand_in(ctx):
    misbehave("fallback")
    return "the fallback's answer"


judged = Machine("judged", model={MODEL!r}, states=[
    LLMState("ask", prompt="Say something.", max_tokens=50, guard=judge),
    PythonState("count", run=count, needs=["ask"]),
])

fallen = Machine("fallen", model={MODEL!r}, retry_policy=RetryPolicy(max_attempts=1), states=[
    LLMState("ask", prompt="Say something.", max_tokens=50, fallback=stand_in),
])


nosy = Machine("nosy", model={MODEL!r}, states=[
    LLMState("ask", prompt="Say something.", max_tokens=50),
    PythonState("peek", run=lambda ctx: ctx.outputs["ask"]),
])
'''


TIMED = '''
import asyncio
import time

from statemachine_orch import FlowDecision, Machine, PythonState, guard

SPIN_S = 60.0


def slow_sync(ctx):
    deadline = time.monotonic() + SPIN_S
    while time.monotonic() < deadline:
        pass
    return "too late"


async def slow_async(ctx):
    await asyncio.sleep(SPIN_S)
    return "too late"


@guard(FlowDecision.CONTINUE)
def slow_guard(output, ctx):
    slow_sync(ctx)
    return FlowDecision.CONTINUE


timed_sync = Machine("timed_sync", states=[PythonState("slow", run=slow_sync, timeout=0.3)])
timed_async = Machine("timed_async", states=[PythonState("slow", run=slow_async, timeout=0.3)])
timed_guard = Machine("timed_guard", states=[
    PythonState("quick", run=lambda ctx: 1, guard=slow_guard, timeout=0.3),
])

'''

ANSWER = reply("three short words", input_tokens=40, output_tokens=3)

RAISED = {"exit": "SystemExit: 0", "keyboard": "KeyboardInterrupt", "cancelled": "CancelledError",
          "custom": "Custom: not an Exception"}
SLOW = pytest.mark.slow  # the same path as a case in the default run


@pytest.fixture
def machines(tmp_path: Path) -> Path:
    return write(tmp_path / "user_code.py", MACHINES)


@pytest.fixture
def timed(tmp_path: Path) -> Path:
    return write(tmp_path / "timed.py", TIMED)


def failure(orch: EnvOrch, machine: str, misbehave: str = "") -> str:
    """`orch run MACHINE --run-id r`, MISBEHAVE set: it must fail (exit 1, run `failed`) with one
    `error:` line and nothing on stderr; that line."""
    failed = orch.with_env(MISBEHAVE=misbehave)("-q", "run", machine, "--run-id", "r")
    assert failed.code == 1, (failed.code, failed.stdout, failed.stderr)
    assert failed.stderr == ""
    (line,) = [line for line in failed.stdout.splitlines() if line.startswith("error: ")]
    assert stored_status(orch.db, "r") == "failed"
    return line


def sources(orch: Orch, run_id: str) -> list[tuple[int, str, str | None]]:
    return [(row["seq"], row["source"], row["to_state"]) for row in orch.log(run_id)]


@pytest.mark.parametrize("how", ["exit", "custom", pytest.param("keyboard", marks=SLOW),
                                 pytest.param("cancelled", marks=SLOW)])
def test_a_guard_raising_a_base_exception_fails_the_step_keeping_the_paid_answer(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path, how: str) -> None:
    fake.on("ask", ANSWER)
    assert failure(orch, f"{machines}:judged", f"guard:{how}") == f"error: GuardError: guard judge raised {RAISED[how]}"
    (row,) = stored_log(orch.db, "r")
    assert (row["to_state"], json.loads(row["output"])) == (None, ANSWER.text)  # the paid answer, kept

    resumed = orch.json("resume", "r")
    assert (resumed["status"], resumed["path"]) == ("completed", ["ask", "count"])
    assert fake.calls("ask") == 1  # judged again on the recorded answer, never asked again
    assert sources(orch, "r") == [(1, "llm", None), (2, "recorded", "count"), (3, "python", "__end__")]


@pytest.mark.parametrize("how", ["exit", pytest.param("custom", marks=SLOW)])
def test_a_python_state_raising_a_base_exception_is_a_failed_step(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path, how: str) -> None:
    fake.on("ask", ANSWER)
    assert failure(orch, f"{machines}:judged", f"python:{how}") == f"error: StepError: {RAISED[how]}"
    assert orch.json("resume", "r")["status"] == "completed"
    assert fake.calls("ask") == 1


def test_a_fallback_function_raising_a_base_exception_fails_the_step(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    fake.on("ask", error(529, "overloaded"), ANSWER)
    line = failure(orch, f"{machines}:fallen", "fallback:exit")
    assert line.startswith("error: LLMError: Messages API returned 529") and line.endswith(
        "fallback stand_in failed too: SystemExit: 0"), line
    (row,) = orch.log("r")
    assert (row["to_state"], row["calls"]) == (None, 1)  # the failed call is logged
    assert orch.json("resume", "r")["outputs"] == {"ask": ANSWER.text}


@pytest.mark.parametrize(("where", "sig", "code"), [
    ("guard", signal.SIGTERM, 143), ("python", signal.SIGINT, 130),
    pytest.param("python", signal.SIGTERM, 143, marks=SLOW), pytest.param("guard", signal.SIGINT, 130, marks=SLOW),
])
def test_a_signal_stops_spinning_user_code_and_resume_pays_nothing_again(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path, tmp_path: Path, where: str,
        sig: signal.Signals, code: int) -> None:
    fake.on("ask", ANSWER)
    spinning = tmp_path / "spinning"
    spinner = orch.with_env(MISBEHAVE=f"{where}:spin", SPIN_FILE=str(spinning), ORCH_STOP_GRACE="0.2")
    proc = spinner.start("-q", "run", f"{machines}:judged", "--run-id", "r", "--json")
    wait_for_file(spinning, proc)
    proc.send_signal(sig)
    stopped = Orch.finish(proc, timeout=30)  # the spin gives up only after 60 s
    assert stopped.code == code, (stopped.code, stopped.stdout, stopped.stderr)
    assert "Traceback" not in stopped.stderr
    assert stored_status(orch.db, "r") == "interrupted"
    committed = [row["from_state"] for row in stored_log(orch.db, "r")]
    assert committed == ([] if where == "guard" else ["ask"])  # nothing judged is committed

    resumed = orch.json("resume", "r")
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"ask": ANSWER.text, "count": 3})
    assert fake.calls("ask") == 1  # the answer paid before the stop is the one committed
    assert sources(orch, "r") == [(1, "llm", "count"), (2, "python", "__end__")]
    assert orch.log("r")[0]["input_tokens"] == ANSWER.input_tokens  # its usage counted once


@pytest.mark.parametrize(("machine", "line"), [
    ("timed_sync", "error: StepError: state 'slow' did not finish within its timeout=0.3s"),
    ("timed_async", "error: StepError: state 'slow' did not finish within its timeout=0.3s"),
    ("timed_guard", "error: GuardError: guard slow_guard of state 'quick' did not finish within its "
                    "timeout=0.3s"),
])
def test_a_state_timeout_bounds_its_python_code(orch: EnvOrch, timed: Path, machine: str, line: str) -> None:
    assert failure(orch, f"{timed}:{machine}") == line


def test_reading_an_output_not_in_needs_names_the_state_and_the_fix(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    fake.on("ask", ANSWER)
    assert failure(orch, f"{machines}:nosy") == (
        "error: StepError: state 'peek' read ctx.outputs['ask'], which is not in its needs; add 'ask' to "
        "needs=[...] (or needs_if_ran=[...]) of state 'peek'")


def test_off_the_main_thread_a_python_state_is_judged_by_its_timeout_when_it_returns(db_path: Path) -> None:
    """Only the main thread can be interrupted (signals); elsewhere a late state still fails."""
    machine = Machine("late", states=[PythonState("nap", run=lambda ctx: time.sleep(0.3), timeout=0.05)])

    def drive() -> RunResult:
        with Engine(open_store(db_path)) as engine:
            return engine.run(machine, run_id="r")

    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(drive).result(timeout=30)
    assert (result.status, result.error) == (
        RunStatus.FAILED, "StepError: state 'nap' did not finish within its timeout=0.05s")
