"""API faults through the fake Messages API served on loopback, driving the real `orch` process.

Each case scripts one failure sequence for the first state, runs the machine once, and
asserts the exact number of requests the server saw, the attempt log, and how the run
ended. The machine retries after 10 ms and at most 4 times, so nothing waits long; waits the
server asks for stay at or under 20 ms except the "large retry-after" case, which must
refuse to wait.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from statemachine_orch import RetryPolicy
from statemachine_orch.testing import FakeMessagesAPI, Reply, disconnect, error, timeout

from ..helpers import (
    Figures,
    Orch,
    orch_against,
    write,
)

QUICK = RetryPolicy(max_attempts=4, initial_delay_s=0.01, multiplier=1.0, jitter=0.0, max_total_s=30)
STATE_TIMEOUT_S = 0.3

MACHINE = f'''
from statemachine_orch import LLMState, Machine, RetryPolicy

faulty = Machine("faulty", model="claude-sonnet-5-5", retry_policy={QUICK!r}, states=[
    LLMState("ask", prompt="Answer briefly.", max_tokens=50, timeout={STATE_TIMEOUT_S!r}),
    LLMState("then", prompt="And then?", max_tokens=50),
])
'''
OK = Reply(text="fine")


@dataclass(frozen=True)
class Case:
    script: tuple[Reply, ...]
    requests: int  # how many requests for "ask" reach the server
    kinds: tuple[str, ...]  # the attempt log of step 1
    status: str


CASES: dict[str, Case] = {
    "429 retry-after small": Case((error(429, headers={"retry-after-ms": "20"}), OK), 2,
                                  ("transient",), "completed"),
    "429 retry-after large": Case((error(429, headers={"retry-after": "3600"}), OK), 1,
                                  ("transient",), "failed"),
    "529 overloaded": Case((error(529), error(529), OK), 3, ("transient", "transient"), "completed"),
    "500 server error": Case((error(500), OK), 2, ("transient",), "completed"),
    "408 request timeout": Case((error(408), OK), 2, ("transient",), "completed"),
    "connection reset": Case((disconnect(), OK), 2, ("connection",), "completed"),
    "x-should-retry false": Case((error(503, headers={"x-should-retry": "false"}), OK), 1,
                                 ("deterministic",), "failed"),
    "429 spend limit": Case((error(429, "spend limit reached", error_code="enforced_spend_limit_reached"), OK),
                            1, ("spend_limit",), "failed"),
    "retries exhausted": Case((error(529),) * 4 + (OK,), 4, ("transient",) * 4, "failed"),
    # the server gets the request and is slow to answer: the client times out and asks again,
    # so the server saw the request twice; the first is logged as a "timeout" attempt
    "read timeout after the server processed it": Case((timeout(hold_s=1.0), OK), 2, ("timeout",),
                                                       "completed"),
}


@pytest.fixture
def orch(fake: FakeMessagesAPI, db_path: Path) -> Iterator[Orch]:
    fake.default = "auto"
    with orch_against(fake, db_path) as cli:
        yield cli


@pytest.mark.parametrize("name", list(CASES))
def test_each_api_fault_gets_its_exact_handling(orch: Orch, fake: FakeMessagesAPI, tmp_path: Path,
                                                name: str, figures: Figures) -> None:
    case = CASES[name]
    fake.on("ask", *case.script)
    machine = write(tmp_path / "faulty.py", MACHINE)
    result = orch("-q", "run", f"{machine}:faulty", "--run-id", "fault", "--json")
    attempts = [json.loads(line) for line in orch.ok("log", "fault", "--attempts", "--json").stdout.splitlines()]
    assert fake.calls("ask") == case.requests
    assert tuple(a["kind"] for a in attempts) == case.kinds
    assert json.loads(result.stdout)["status"] == case.status
    assert result.code == (0 if case.status == "completed" else 1), result.stderr
    log = [json.loads(line) for line in orch.ok("log", "fault", "--json").stdout.splitlines()]
    assert log[0]["calls"] == case.requests  # every request the server saw is counted on the step
    figures["requests_at_server"] = fake.calls("ask")
    figures["attempts_logged"] = len(attempts)
    figures["outcome"] = case.status
