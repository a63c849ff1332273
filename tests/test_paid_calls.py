"""Every paid call is recorded as it arrives and counted once, end to end: SIGKILL the real
`orch` during a re-ask, after an answer arrived, or while a call is in flight, resume it, and
count the requests at the loopback fake (issue 11, items 3 and 27)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import Usage
from statemachine_orch.engine._llm_step import estimate_input_tokens
from statemachine_orch.testing import FakeMessagesAPI, Reply

from .helpers import (
    MODEL,
    PRICES,
    EnvOrch,
    Orch,
    cost_of,
    kill_9,
    reply,
    requests_for,
    stored_log,
    write,
)

WAIT_S = 30.0

MACHINES = f'''
from pydantic import BaseModel

from statemachine_orch import LLMState, Machine


class Rating(BaseModel):
    label: str
    score: int


rated = Machine("rated", model={MODEL!r}, states=[
    LLMState("rate", prompt="Rate this idea.", output=Rating, repairs=1, max_tokens=100),
])

plain = Machine("plain", model={MODEL!r}, states=[
    LLMState("say", prompt="Say it.", max_tokens=300),
])
'''

INVALID = reply(data={"label": "good"}, input_tokens=70, output_tokens=9)  # no score: re-asked
VALID = reply(data={"label": "good", "score": 7}, input_tokens=120, output_tokens=11)
ANSWER = reply("said", input_tokens=30, output_tokens=2)


@pytest.fixture
def machines(tmp_path: Path) -> Path:
    return write(tmp_path / "paid.py", MACHINES)


def attempts(orch: Orch, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in orch.ok("log", run_id, "--attempts", "--json").stdout.splitlines()]


def killed_in_flight(orch: Orch, fake: FakeMessagesAPI, machine: str, state: str, arrivals: int) -> None:
    """`orch run MACHINE --run-id r`, SIGKILLed while its `arrivals`-th `state` request is held
    at the fake (the request scripted with a gate answers nothing once released)."""
    proc = orch.start("-q", "run", machine, "--run-id", "r")
    assert fake.wait_for(state, arrivals, timeout=WAIT_S), f"no request {arrivals} for {state}"
    kill_9(proc)
    proc.communicate()


def test_a_kill_during_a_reask_resumes_from_the_paid_answer(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    held = threading.Event()
    fake.on("rate", INVALID, Reply(gate=held, fault="disconnect"), VALID)
    try:
        killed_in_flight(orch, fake, f"{machines}:rated", "rate", 2)
    finally:
        held.set()

    resumed = orch.json("resume", "r")
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"rate": {"label": "good", "score": 7}})
    first, reask, again = requests_for(fake, "rate")  # never the first request again
    assert len(first.body["messages"]) == 1
    assert again.body["messages"] == reask.body["messages"]  # the re-ask, rebuilt from the paid answer
    assert [a["kind"] for a in attempts(orch, "r")] == ["invalid_output", "in_doubt"]
    (row,) = orch.log("r")
    assert (row["calls"], row["in_doubt"]) == (3, True)  # every request the fake received
    assert (row["input_tokens"], row["output_tokens"]) == (190, 20)  # both answers that arrived
    assert "matches the recording" in orch.ok("replay", "r").stdout  # a call in doubt is no recorded answer


def test_an_answer_that_arrived_before_a_kill_is_committed_on_resume_without_a_call(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    fake.on("say", ANSWER)
    killed = orch.with_env(ORCH_KILL_AT="after_response")("-q", "run", f"{machines}:plain", "--run-id", "r")
    assert killed.code == -9, killed.stderr
    assert stored_log(orch.db, "r") == []

    resumed = orch.json("resume", "r")
    assert (resumed["status"], resumed["outputs"]) == ("completed", {"say": ANSWER.text})
    assert fake.calls("say") == 1
    (row,) = orch.log("r")
    assert (row["source"], row["calls"], row["in_doubt"]) == ("llm", 1, False)
    assert (row["input_tokens"], row["cost_usd"]) == (ANSWER.input_tokens, pytest.approx(cost_of(ANSWER)))


def test_a_call_in_flight_at_a_kill_counts_at_its_worst_case_labelled_in_doubt(
        orch: EnvOrch, fake: FakeMessagesAPI, machines: Path) -> None:
    held = threading.Event()
    fake.on("say", Reply(gate=held, fault="disconnect"), ANSWER)
    try:
        killed_in_flight(orch, fake, f"{machines}:plain", "say", 1)
    finally:
        held.set()
    orch.json("resume", "r")
    assert fake.calls("say") == 2

    (stored,) = stored_log(orch.db, "r")
    request = json.loads(stored["request"])
    worst = PRICES.cost(MODEL, Usage(input_tokens=estimate_input_tokens(request), output_tokens=300))
    assert worst is not None and worst > cost_of(ANSWER)
    total = cost_of(ANSWER) + worst

    assert "matches the recording" in orch.ok("replay", "r").stdout
    (doubt,) = attempts(orch, "r")
    assert (doubt["kind"], doubt["cost_usd"]) == ("in_doubt", pytest.approx(worst))
    (row,) = orch.log("r")
    assert (row["calls"], row["in_doubt"], row["cost_usd"]) == (2, True, pytest.approx(total))
    totals = orch.json("show", "r")["totals"]
    assert (totals["calls"], totals["in_doubt_calls"]) == (2, 1)
    assert (totals["cost_usd"], totals["in_doubt_usd"]) == (pytest.approx(total), pytest.approx(worst))
    assert orch.ok("log", "r").stdout.splitlines()[-2] == (
        f"total: 1 step(s), {ANSWER.input_tokens} in / {ANSWER.output_tokens} out tokens (0 cache read, "
        f"0 cache write), ${total:.4f} (up to ${worst:.4f} of it in doubt), 2 call(s) (1 in doubt), "
        "0 cache hit(s)")
    (listed,) = orch.json("runs")
    assert (listed["cost_usd"], listed["in_doubt_usd"]) == (pytest.approx(total), pytest.approx(worst))
    runs = orch.ok("runs").stdout.splitlines()
    assert f"${total:.4f} (up to ${worst:.4f} in doubt)" in runs[1]
    assert runs[-1].startswith(f"machine plain: 1 run(s), 1 step(s), {ANSWER.input_tokens + ANSWER.output_tokens} "
                               f"tokens, ${total:.4f} (up to ${worst:.4f} of it in doubt)")
