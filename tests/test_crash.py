"""Crashes and contention, end to end: SIGKILL the real `orch` mid-call, resume it, and race
two `orch resume` processes for one run. The fake Messages API's gates order the steps."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error

from .helpers import (
    REPORT,
    REPORT_INPUT,
    REPORT_STATES,
    Orch,
    answer,
    integrity,
    one_error_line,
    query,
    resume_hint,
    script,
    stored_log,
    stored_status,
)

WAIT_S = 30.0  # generous bound on waiting for a request to reach the fake


def run_until_killed(orch: Orch, fake: FakeMessagesAPI, state: str) -> int:
    """Start a report run, SIGKILL it while its `state` request is in flight: its pid."""
    proc = orch.start("run", REPORT, "--input", REPORT_INPUT)
    assert fake.wait_for(state, 1, timeout=WAIT_S), f"no {state} request arrived"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=WAIT_S) == -signal.SIGKILL
    proc.communicate()
    return proc.pid


@pytest.mark.slow  # in the default run: test_reliability_fast.py's in_flight kill
def test_sigkill_during_a_call_then_resume_resends_only_the_call_in_flight(
        orch: Orch, fake: FakeMessagesAPI) -> None:
    gate = threading.Event()
    replies = script(fake, REPORT_STATES, before={
        "risk_assessment": [Reply(text="answer the killed process never read", gate=gate)]})
    try:
        run_until_killed(orch, fake, "risk_assessment")
    finally:
        gate.set()
    (run,) = orch.json("runs")
    run_id = run["run_id"]
    assert (run["status"], run["steps"]) == ("running", 2)  # nobody recorded the crash
    assert [row["from_state"] for row in stored_log(orch.db, run_id)] == [
        "data_validation", "trend_analysis"]

    resumed = orch.json("resume", run_id)
    assert (resumed["status"], resumed["path"]) == ("completed", list(REPORT_STATES))
    assert resumed["outputs"] == {s: replies[s].text for s in REPORT_STATES}
    assert {s: fake.calls(s) for s in REPORT_STATES} == {
        "data_validation": 1, "trend_analysis": 1, "risk_assessment": 2, "recommendations": 1,
        "executive_summary": 1}
    assert integrity(orch.db) == "ok"
    log = orch.log(run_id)
    assert [(row["seq"], row["from_state"]) for row in log] == list(enumerate(REPORT_STATES, 1))
    assert all(row["to_state"] and row["error"] is None for row in log)
    assert stored_status(orch.db, run_id) == "completed"


@pytest.mark.slow  # in the default run: test_reliability_fast.py's kills, each resumed at once
def test_resume_right_after_kill_9_takes_over_from_the_dead_owner(
        orch: Orch, fake: FakeMessagesAPI) -> None:
    gate = threading.Event()
    script(fake, REPORT_STATES, before={"data_validation": [Reply(text="lost", gate=gate)]})
    try:
        pid = run_until_killed(orch, fake, "data_validation")
    finally:
        gate.set()
    (run,) = query(orch.db, "SELECT run_id, owner_info FROM runs")
    run_id = run["run_id"]
    assert f'"pid":{pid}' in run["owner_info"]  # the dead process still owns the run

    resumed = orch("resume", run_id, "--json")
    assert resumed.code == 0, resumed.stderr  # 3 would mean the dead owner looked alive
    assert fake.calls("data_validation") == 2
    assert stored_status(orch.db, run_id) == "completed"
    assert [row["from_state"] for row in stored_log(orch.db, run_id)] == list(REPORT_STATES)


def fail_first_try(fake: FakeMessagesAPI, state: str, gate: threading.Event | None = None) -> None:
    """Every run's first `state` request answers 400; its second waits for `gate`, if given."""

    def reply(request: CapturedRequest) -> Reply:
        key = (request.run_id, request.state)
        tries = sum(1 for r in fake.requests if (r.run_id, r.state) == key)
        if request.state == state and tries == 1:
            return error(400, f"{state} is misconfigured")
        scripted = answer(request.state or "")
        if request.state == state and gate is not None:
            scripted.gate = gate
        return scripted

    fake.default = reply


def failed_run(orch: Orch) -> str:
    failed = orch("run", REPORT, "--input", REPORT_INPUT)
    assert failed.code == 1, failed.stderr
    return resume_hint(failed.stdout)


def calls_per_state(fake: FakeMessagesAPI, run_id: str) -> dict[str, int]:
    counts = dict.fromkeys(REPORT_STATES, 0)
    for request in fake.requests:
        if request.run_id == run_id:
            counts[request.state or ""] += 1
    return counts


ONE_RETRY = dict(dict.fromkeys(REPORT_STATES, 1), trend_analysis=2)


def test_a_second_resume_of_a_busy_run_exits_3(orch: Orch, fake: FakeMessagesAPI) -> None:
    gate = threading.Event()
    fail_first_try(fake, "trend_analysis", gate)
    run_id = failed_run(orch)
    try:
        first = orch.start("resume", run_id, "--json")
        assert fake.wait_for("trend_analysis", 2, timeout=WAIT_S)
        second = Orch.finish(orch.start("resume", run_id), timeout=WAIT_S)
    finally:
        gate.set()
    assert second.code == 3, second.stderr
    line = one_error_line(second)
    assert "being driven by" in line and f"pid {first.pid}" in line
    done = Orch.finish(first)
    assert done.code == 0, done.stderr
    assert stored_status(orch.db, run_id) == "completed"
    assert calls_per_state(fake, run_id) == ONE_RETRY


@pytest.mark.parametrize("rounds", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_racing_resumes_let_exactly_one_drive_the_run(orch: Orch, fake: FakeMessagesAPI, rounds: int) -> None:
    fail_first_try(fake, "trend_analysis")
    for _ in range(rounds):
        run_id = failed_run(orch)
        racers = [orch.start("resume", run_id) for _ in range(2)]
        results = sorted((Orch.finish(proc) for proc in racers), key=lambda r: r.code)
        assert [r.code for r in results] in ([0, 2], [0, 3]), [(r.code, r.stderr) for r in results]
        loser = results[1]
        expected = "already completed" if loser.code == 2 else "being driven by"
        assert expected in one_error_line(loser)
        assert stored_status(orch.db, run_id) == "completed"
        assert calls_per_state(fake, run_id) == ONE_RETRY
        assert [r["from_state"] for r in stored_log(orch.db, run_id) if r["to_state"]] == list(
            REPORT_STATES)
    assert integrity(orch.db) == "ok"

