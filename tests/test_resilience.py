"""Resilient, cost-aware LLM states through the real SDK, the in-process fake Messages API and
real SQLite files: retries and their delays, deterministic failures, re-asks, refusals and
truncation, fallbacks, the attempt log, cost, budgets, caching, timeouts, and replay of all
of it.

Backoff never waits: `fake.model()` records each delay in `fake.slept` (or a `VirtualTime`
records it and moves its clock), so every delay is asserted exactly and no test measures
wall time.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from statemachine_orch import (
    END,
    AnthropicModel,
    Branch,
    Budget,
    Decision,
    Engine,
    FlowDecision,
    InvalidOutput,
    LLMState,
    Machine,
    Price,
    PriceTable,
    ReplayReport,
    RetryPolicy,
    RunResult,
    RunStatus,
    SQLiteStore,
    StepContext,
    TransitionRecord,
    Usage,
    guard,
    open_store,
    replay_run,
)
from statemachine_orch.engine._llm_step import estimate_input_tokens
from statemachine_orch.llm._retry import next_delay, retry_after, should_retry
from statemachine_orch.testing import FakeMessagesAPI, Reply, disconnect, error, timeout
from statemachine_orch.types import total_cost

from .helpers import MODEL, PRICES, VirtualTime, cost_of, reply, usage_of

FALLBACK = "claude-haiku-4-5"


class Out(BaseModel):
    label: str
    score: int


def policy(attempts: int, **options: Any) -> RetryPolicy:
    """Backoff without jitter (1 s, 2 s, 4 s, ...), so delays without a server hint are exact."""
    return RetryPolicy(max_attempts=attempts, initial_delay_s=1.0, multiplier=2.0, jitter=0.0,
                       **options)


def worst_case_tokens(body: dict[str, Any]) -> int:
    """What the budget check reserves for a request: estimated input plus its max_tokens."""
    return estimate_input_tokens(body) + int(body["max_tokens"])


def one_state(**options: Any) -> Machine:
    """A machine of one LLM state, `ask`."""
    return Machine("solo", model=MODEL, states=[LLMState("ask", prompt="Rate this idea.", **options)])


def two_states(*, second_max_tokens: int = 200, **machine_options: Any) -> Machine:
    """`draft`, then `expand` which needs it."""
    return Machine("pair", model=MODEL, **machine_options, states=[
        LLMState("draft", prompt="Draft a note.", max_tokens=50),
        LLMState("expand", prompt="Expand: {draft}", needs=["draft"], max_tokens=second_max_tokens),
    ])


@dataclass
class GuardSpy:
    """A guard that records every output it is shown; `decide` picks the decision."""

    decide: Callable[[Any], Any] = lambda output: FlowDecision.CONTINUE
    seen: list[Any] = field(default_factory=list)

    def __call__(self, output: Any, ctx: StepContext) -> Any:
        self.seen.append(output)
        return self.decide(output)


def route_invalid(output: Any) -> Any:
    """Branch to `repair` on an InvalidOutput, carrying its kind and error into the reason."""
    if isinstance(output, InvalidOutput):
        return Branch("repair").because(f"{output.kind}: {output.error}")
    return FlowDecision.CONTINUE


@dataclass
class Harness:
    """An engine on a real SQLite file, talking through the real SDK to the in-process fake."""

    db: Path
    fake: FakeMessagesAPI
    engine: Engine

    def run(self, machine: Machine, data: dict[str, Any] | None = None, **options: Any) -> RunResult:
        return self.engine.run(machine, data, **options)

    def resume(self, run_id: str, machine: Machine, **options: Any) -> RunResult:
        return self.engine.resume(run_id, machine, **options)

    @property
    def store(self) -> SQLiteStore:
        assert isinstance(self.engine.store, SQLiteStore)
        return self.engine.store

    def rows(self, run_id: str) -> list[TransitionRecord]:
        return asyncio.run(self.store.transitions(run_id))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(query, params).fetchall()

    def attempt_log(self, run_id: str) -> list[tuple[Any, ...]]:
        """The stored attempts table: (seq, attempt, state, kind, status, request id, slept)."""
        return self.sql("SELECT seq, attempt, state, kind, status_code, request_id, delay_s "
                        "FROM attempts WHERE run_id = ? ORDER BY seq, attempt", run_id)

    def stored_run(self, run_id: str) -> tuple[str, str | None, dict[str, Any]]:
        ((status, error_text, options),) = self.sql(
            "SELECT status, error, options FROM runs WHERE run_id = ?", run_id)
        return status, error_text, json.loads(options)

    def replay(self, run_id: str, machine: Machine) -> ReplayReport:
        return asyncio.run(replay_run(self.store, run_id, machine))


@contextmanager
def harness_for(db: Path, fake: FakeMessagesAPI, *, prices: PriceTable | None = None,
                **model_options: Any) -> Iterator[Harness]:
    with Engine(open_store(db), model=fake.model(**model_options), prices=prices) as engine:
        yield Harness(db, fake, engine)


@pytest.fixture
def h(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Harness]:
    """The default harness: the model's own policy allows 4 attempts (unscripted states get 400)."""
    with harness_for(db_path, fake, retry=policy(4)) as harness:
        yield harness


def request_ids(*numbers: int | None) -> list[str | None]:
    """The fake's request id for the nth request it received (None: no response at all)."""
    return [None if n is None else f"req_fake_{n:06d}" for n in numbers]


# --------------------------------------------------------------------------- retry policy functions


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"Retry-After": "3"}, 3.0),
    ({"retry-after": "0.25"}, 0.25),
    ({"retry-after-ms": "40", "retry-after": "9"}, 0.04),  # the finer header wins
    ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
    ({"retry-after": "-5"}, 0.0),
    ({"retry-after": "whenever"}, None),
    ({}, None),
    (None, None),
])
def test_retry_after_reads_milliseconds_and_seconds(headers: dict[str, str] | None,
                                                    seconds: float | None) -> None:
    assert retry_after(headers) == seconds


def test_retry_after_reads_an_http_date_relative_to_now() -> None:
    now = 1_800_000_000.0
    headers = {"retry-after": email.utils.formatdate(now + 30, usegmt=True)}
    assert retry_after(headers, now=now) == 30.0
    assert retry_after(headers, now=now + 60) == 0.0  # a date in the past: retry at once


@pytest.mark.parametrize(("status", "headers", "retried"), [
    (429, None, True), (529, None, True), (500, None, True), (502, None, True), (503, None, True),
    (408, None, True), (None, None, True),  # None: no response (timeout, reset)
    (400, None, False), (401, None, False), (403, None, False), (404, None, False),
    (413, None, False), (422, None, False),
    (503, {"x-should-retry": "false"}, False), (400, {"X-Should-Retry": "true"}, True),
])
def test_should_retry_classifies_failures(status: int | None, headers: dict[str, str] | None,
                                          retried: bool) -> None:
    assert should_retry(status, headers) is retried


def test_backoff_is_exponential_and_capped() -> None:
    p = RetryPolicy(initial_delay_s=0.5, multiplier=3.0, max_delay_s=10.0, jitter=0.0)
    assert [p.backoff(n) for n in range(1, 6)] == [0.5, 1.5, 4.5, 10.0, 10.0]


@given(attempt=st.integers(1, 30), rand=st.floats(0, 1), jitter=st.floats(0, 1))
def test_jitter_only_shortens_a_delay_by_at_most_its_fraction(attempt: int, rand: float,
                                                              jitter: float) -> None:
    p = RetryPolicy(initial_delay_s=1.0, multiplier=2.0, max_delay_s=60.0, jitter=jitter)
    base = min(2.0 ** (attempt - 1), 60.0)
    assert base * (1 - jitter) - 1e-9 <= p.backoff(attempt, rand) <= base + 1e-9


def test_next_delay_ends_at_max_attempts_and_before_max_total() -> None:
    p = policy(3, max_total_s=10.0)
    assert next_delay(p, 1, 0.0, None) == (1.0, "retrying")
    assert next_delay(p, 2, 1.0, None) == (2.0, "retrying")
    assert next_delay(p, 3, 3.0, None) == (None, "max_attempts=3 reached")
    assert next_delay(p, 1, 9.5, None) == (
        None, "the next backoff is 1s, which would pass max_total_s=10 after 9.5s")
    assert next_delay(p, 1, 0.0, {"retry-after": "7"}) == (7.0, "retrying")
    assert next_delay(p, 1, 4.0, {"retry-after": "7"}) == (
        None, "the server asked to wait 7s, which would pass max_total_s=10 after 4.0s")


@pytest.mark.parametrize("options", [{"max_attempts": 0}, {"initial_delay_s": -1.0},
                                     {"multiplier": 0.5}, {"max_total_s": -1.0}])
def test_retry_policy_rejects_impossible_settings(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)


# --------------------------------------------------------------------------- transient failures


TRANSIENT = {
    "429": (error(429, "rate limited"), "transient", 429),
    "529": (error(529, "overloaded"), "transient", 529),
    "500": (error(500, "internal"), "transient", 500),
    "502": (error(502, "bad gateway"), "transient", 502),
    "503": (error(503, "unavailable"), "transient", 503),
    "timeout": (timeout(), "timeout", None),
    "reset": (disconnect(), "connection", None),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_each_transient_failure_is_retried_with_backoff_and_logged(h: Harness, case: str) -> None:
    failure, kind, status = TRANSIENT[case]
    p = policy(3)
    h.fake.on("ask", failure, failure, reply("third time"))
    result = h.run(one_state(retry_policy=p))
    assert (result.status, result.outputs["ask"]) == (RunStatus.COMPLETED, "third time")
    assert h.fake.calls("ask") == 3
    assert h.fake.slept == [p.backoff(1), p.backoff(2)] == [1.0, 2.0]
    ids = request_ids(1, 2) if status is not None else [None, None]
    assert h.attempt_log(result.run_id) == [
        (1, 1, "ask", kind, status, ids[0], 1.0), (1, 2, "ask", kind, status, ids[1], 2.0)]
    (row,) = h.rows(result.run_id)
    assert (row.source, row.request_id) == ("llm", request_ids(3)[0])
    assert row.usage == usage_of(reply())  # failed attempts got no usage


def test_retry_after_headers_override_the_backoff(h: Harness) -> None:
    p = policy(4)
    h.fake.on("ask", error(429, headers={"retry-after": "3"}),
              error(529, headers={"retry-after-ms": "1500"}), error(500), reply())
    result = h.run(one_state(retry_policy=p))
    assert result.status is RunStatus.COMPLETED
    assert h.fake.slept == [3.0, 1.5, p.backoff(3)]
    assert [row[-1] for row in h.attempt_log(result.run_id)] == h.fake.slept


def test_exhausted_retries_fail_the_run_with_one_line_and_resume_continues(h: Harness) -> None:
    machine = one_state(retry_policy=policy(3))
    h.fake.on("ask", error(503, "unavailable"))
    failed = h.run(machine)
    expected = ("LLMError: Messages API returned 503: api_error: unavailable (gave up after 3 "
                "attempts: max_attempts=3 reached)")
    assert (failed.status, failed.error) == (RunStatus.FAILED, expected)
    assert h.fake.calls("ask") == 3 and h.fake.slept == [1.0, 2.0]
    assert h.attempt_log(failed.run_id) == [
        (1, 1, "ask", "transient", 503, "req_fake_000001", 1.0),
        (1, 2, "ask", "transient", 503, "req_fake_000002", 2.0),
        (1, 3, "ask", "transient", 503, "req_fake_000003", None)]  # the last one is not slept on
    assert h.stored_run(failed.run_id)[:2] == ("failed", expected)

    h.fake.on("ask", reply("back"))  # the outage is over
    resumed = h.resume(failed.run_id, machine)
    assert (resumed.status, resumed.outputs) == (RunStatus.COMPLETED, {"ask": "back"})
    assert h.fake.calls("ask") == 4
    assert [(r.seq, r.to_state, r.attempt, len(r.attempts)) for r in h.rows(failed.run_id)] == [
        (1, None, 1, 3), (2, END, 2, 0)]


@pytest.mark.parametrize(("failure", "slept", "gave_up"), [
    (error(503), [1.0, 2.0],  # waits 1 and 2; the next wait, 4 s, would end past 5 s
     "gave up after 3 attempts: the next backoff is 4s, which would pass max_total_s=5 after 3.0s"),
    (error(429, headers={"retry-after": "30"}), [],  # the server's wait alone is too long
     "gave up after 1 attempt: the server asked to wait 30s, which would pass max_total_s=5 after 0.0s"),
])
def test_retries_stop_before_a_wait_would_pass_max_total(db_path: Path, fake: FakeMessagesAPI,
                                                         failure: Reply, slept: list[float],
                                                         gave_up: str) -> None:
    time = VirtualTime()
    fake.on("ask", failure)
    with harness_for(db_path, fake, sleep=time.sleep, clock=time.clock) as h:
        result = h.run(one_state(retry_policy=policy(10, max_total_s=5.0)))
    assert result.status is RunStatus.FAILED
    assert (fake.calls("ask"), time.slept) == (len(slept) + 1, slept)
    assert (result.error or "").endswith(f"({gave_up})")


@pytest.mark.parametrize(("machine_attempts", "state_attempts", "calls"), [
    (None, None, 2),  # the model client's own policy
    (3, None, 3),  # the machine's policy replaces it
    (3, 5, 5),  # a state's policy replaces the machine's, larger ...
    (3, 1, 1),  # ... or smaller
])
def test_retry_policy_per_state_then_machine_then_model(db_path: Path, fake: FakeMessagesAPI,
                                                        machine_attempts: int | None,
                                                        state_attempts: int | None,
                                                        calls: int) -> None:
    fake.on("ask", error(529))
    machine = Machine("policies", model=MODEL,
                      retry_policy=policy(machine_attempts) if machine_attempts else None,
                      states=[LLMState("ask", prompt="Rate this idea.",
                                       retry_policy=policy(state_attempts) if state_attempts else None)])
    with harness_for(db_path, fake, retry=policy(2)) as h:
        result = h.run(machine)
        assert len(h.attempt_log(result.run_id)) == calls
    assert result.status is RunStatus.FAILED
    assert fake.calls("ask") == calls


def test_the_sdk_never_retries_behind_our_back(db_path: Path, fake: FakeMessagesAPI) -> None:
    eager = anthropic.AsyncAnthropic(api_key="fake-key-not-secret", base_url="http://fake.invalid",
                                     max_retries=5, http_client=httpx2.AsyncClient(transport=fake.transport()))
    time = VirtualTime()
    model = AnthropicModel(eager, retry=policy(2), sleep=time.sleep, clock=time.clock)
    assert model.client.max_retries == 0
    assert AnthropicModel().client.max_retries == 0  # the client it builds from the environment
    fake.on("ask", error(529), error(529), reply())
    with Engine(open_store(db_path), model=model) as engine:
        result = engine.run(one_state())
    assert result.status is RunStatus.FAILED
    assert fake.calls("ask") == 2 and time.slept == [1.0]


@pytest.mark.parametrize(("failure", "kinds", "status", "calls"), [
    (error(503, headers={"x-should-retry": "false"}), ["deterministic"], RunStatus.FAILED, 1),
    (error(400, headers={"x-should-retry": "true"}), ["transient"], RunStatus.COMPLETED, 2),
])
def test_x_should_retry_overrides_the_status_code(h: Harness, failure: Reply, kinds: list[str],
                                                  status: RunStatus, calls: int) -> None:
    h.fake.on("ask", failure, reply())
    result = h.run(one_state())
    assert result.status is status
    assert [row[3] for row in h.attempt_log(result.run_id)] == kinds
    assert h.fake.calls("ask") == calls


def test_attempt_numbers_run_on_across_the_reasks_and_retries_of_one_step(h: Harness) -> None:
    h.fake.on("ask", reply(data={"label": "x"}), error(529), reply(data={"label": "y", "score": 1}))
    result = h.run(one_state(output=Out, retry_policy=policy(3)))
    assert result.status is RunStatus.COMPLETED
    assert h.attempt_log(result.run_id) == [
        (1, 1, "ask", "invalid_output", None, "req_fake_000001", None),
        (1, 2, "ask", "transient", 529, "req_fake_000002", 1.0)]
    assert h.fake.calls("ask") == 3 and h.fake.slept == [1.0]


# --------------------------------------------------------------------------- deterministic failures


DETERMINISTIC = {  # a failure retrying cannot fix -> the kind it is logged as
    "prompt too long": (error(400, "prompt is too long: 250123 tokens > 200000 maximum"),
                        "deterministic"),
    "bad key": (error(401, "invalid x-api-key"), "deterministic"),
    "forbidden": (error(403, "your key cannot use this model"), "deterministic"),
    "unknown model": (error(404, "model: claude-nope"), "deterministic"),
    "payment required": (error(402, "spend limit reached"), "spend_limit"),
    "spend limit 429": (error(429, "spend limit reached", error_code="enforced_spend_limit_reached"),
                        "spend_limit"),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_errors_fail_fast_with_one_line_and_stay_resumable(h: Harness,
                                                                         case: str) -> None:
    failure, kind = DETERMINISTIC[case]
    status = failure.status
    machine = one_state(retry_policy=policy(5))
    h.fake.on("ask", failure, reply("after the fix"))
    failed = h.run(machine)
    expected = f"LLMError: Messages API returned {status}: {failure.error_type}: {failure.message}"
    assert (failed.status, failed.error) == (RunStatus.FAILED, expected)
    assert h.fake.calls("ask") == 1 and h.fake.slept == []
    assert h.attempt_log(failed.run_id) == [(1, 1, "ask", kind, status, "req_fake_000001", None)]
    assert h.stored_run(failed.run_id)[:2] == ("failed", expected)

    resumed = h.resume(failed.run_id, machine)
    assert (resumed.status, resumed.outputs) == (RunStatus.COMPLETED, {"ask": "after the fix"})
    assert h.fake.calls("ask") == 2


def test_an_unknown_model_is_resumed_once_the_machine_names_a_real_one(h: Harness) -> None:
    h.fake.on("ask@claude-nope", error(404, "model: claude-nope"))
    h.fake.on("ask", reply("from a real model"))
    broken = Machine("solo", model="claude-nope", states=[LLMState("ask", prompt="Rate this idea.")])
    failed = h.run(broken)
    assert failed.status is RunStatus.FAILED and "404" in (failed.error or "")
    resumed = h.resume(failed.run_id, one_state())
    assert resumed.status is RunStatus.COMPLETED
    assert [r.body["model"] for r in h.fake.requests] == ["claude-nope", MODEL]


# --------------------------------------------------------------------------- invalid, refused, truncated


@pytest.mark.parametrize(("garbage", "complaint", "tool_result"), [
    (reply(data={"label": "x"}, input_tokens=50, output_tokens=5),
     "answer does not match Out: score: Field required", True),
    (reply('{"label": "x", "score": ', input_tokens=50, output_tokens=5),
     "the model did not call the submit_ask tool", False),
], ids=["schema", "garbage-json"])
def test_an_invalid_answer_is_repaired_by_a_reask_with_the_validation_error(
        h: Harness, garbage: Reply, complaint: str, tool_result: bool) -> None:
    good = reply(data={"label": "fixed", "score": 7}, input_tokens=80, output_tokens=6)
    h.fake.on("ask", garbage, good)
    spy = GuardSpy()
    result = h.run(one_state(output=Out, guard=spy))
    assert result.status is RunStatus.COMPLETED
    assert spy.seen == [Out(label="fixed", score=7)]  # a typed object, never the garbage
    assert h.fake.calls("ask") == 2

    (row,) = h.rows(result.run_id)
    (invalid,) = row.attempts
    assert (invalid.number, invalid.kind, invalid.error) == (1, "invalid_output", complaint)
    assert invalid.request_id == "req_fake_000001" and invalid.response is not None
    first, second = (r.body for r in h.fake.requests)
    assert invalid.request == first and row.request == second
    assert second["messages"][0] == first["messages"][0]
    assert second["messages"][1] == {"role": "assistant", "content": invalid.response["content"]}
    correction = second["messages"][2]
    assert correction["role"] == "user" and complaint in json.dumps(correction["content"])
    if tool_result:
        (block,) = correction["content"]
        assert (block["type"], block["is_error"]) == ("tool_result", True)
        assert block["tool_use_id"] == invalid.response["content"][0]["id"]

    assert row.output == {"label": "fixed", "score": 7}
    assert invalid.usage == usage_of(garbage)
    assert invalid.cost_usd == pytest.approx(cost_of(garbage))
    assert row.usage == usage_of(garbage, good)  # both calls were paid
    assert row.cost_usd == pytest.approx(cost_of(garbage, good))
    assert result.cost_usd == pytest.approx(cost_of(garbage, good))


@pytest.mark.parametrize("repairs", [0, 2])
def test_reasks_are_bounded_then_the_step_fails(h: Harness, repairs: int) -> None:
    h.fake.on("ask", reply(data={"label": "x"}))
    result = h.run(one_state(output=Out, repairs=repairs))
    assert result.status is RunStatus.FAILED
    assert result.error == "LLMError: answer does not match Out: score: Field required"
    assert h.fake.calls("ask") == repairs + 1
    (row,) = h.rows(result.run_id)
    assert [a.kind for a in row.attempts] == ["invalid_output"] * repairs
    assert (row.output, row.request_id) == (None, request_ids(repairs + 1)[0])
    assert row.response is not None  # the last answer is kept for the audit


def test_output_still_invalid_reaches_the_guard_which_branches_to_a_repair_state(h: Harness) -> None:
    h.fake.on("ask", reply(data={"label": "x"}))
    h.fake.on("repair", reply("repaired by hand"))
    spy = GuardSpy(route_invalid)
    machine = Machine("repairing", model=MODEL, states=[
        LLMState("ask", prompt="Rate this idea.", output=Out, repairs=1, on_invalid="guard",
                 guard=spy, on={Branch("repair"): "repair", FlowDecision.CONTINUE: END}),
        LLMState("repair", prompt="Fix this answer: {ask}", needs=["ask"]),
    ])
    result = h.run(machine)
    assert (result.status, result.path) == (RunStatus.COMPLETED, ["ask", "repair"])
    complaint = "answer does not match Out: score: Field required"
    assert spy.seen == [InvalidOutput("invalid_output", complaint, "", {"label": "x"})]
    assert h.fake.calls("ask") == 2  # one re-ask before giving the guard the invalid outcome
    ask, _ = h.rows(result.run_id)
    assert (ask.decision, ask.to_state, ask.reason) == ("branch:repair", "repair",
                                                       f"invalid_output: {complaint}")
    assert ask.output == spy.seen[0].to_json()
    assert complaint in h.fake.requests[-1].prompt  # the repair state saw what was wrong


UNUSABLE = {
    "refusal": ("refusal", "the model refused to answer (stop_reason=refusal)"),
    "max_tokens": ("truncated", ("the answer was cut off at max_tokens=64; raise max_tokens for "
                                 "state 'ask' and resume")),
}


@pytest.mark.parametrize("stop_reason", list(UNUSABLE))
@pytest.mark.parametrize("structured", [True, False], ids=["tool", "text"])
@pytest.mark.parametrize("on_invalid", ["fail", "guard"])
def test_refusal_and_truncation_are_never_taken_as_answers(h: Harness, stop_reason: str,
                                                           structured: bool, on_invalid: str) -> None:
    kind, message = UNUSABLE[stop_reason]
    data = {"label": "looks", "score": 1}  # valid-looking input must not pass either
    h.fake.on("ask", reply(data=data, stop_reason=stop_reason) if structured
              else reply("Half an ans", stop_reason=stop_reason))
    h.fake.on("repair", reply("handled"))
    spy = GuardSpy(route_invalid)
    machine = Machine("unusable", model=MODEL, states=[
        LLMState("ask", prompt="Rate this idea.", max_tokens=64, output=Out if structured else None,
                 on_invalid=on_invalid, guard=spy,  # type: ignore[arg-type]
                 on={Branch("repair"): "repair", FlowDecision.CONTINUE: END}),
        LLMState("repair", prompt="Handle it."),
    ])
    result = h.run(machine)
    assert h.fake.calls("ask") == 1  # never re-asked: asking again will not help
    (row, *_) = h.rows(result.run_id)
    assert row.response is not None and row.response["stop_reason"] == stop_reason
    if on_invalid == "fail":
        assert (result.status, result.error) == (RunStatus.FAILED, f"LLMError: {message}")
        assert spy.seen == [] and row.output is None
    else:
        assert (result.status, result.path) == (RunStatus.COMPLETED, ["ask", "repair"])
        assert spy.seen == [InvalidOutput(kind, message, "" if structured else "Half an ans",
                                          data if structured else None)]
        assert row.decision == "branch:repair"


def test_structured_output_reaches_guards_and_later_prompts_typed_also_after_resume(
        h: Harness) -> None:
    h.fake.on("classify", reply(data={"label": "bold", "score": 9}))
    h.fake.on("explain", error(400, "try again later"), reply("because"))
    spy = GuardSpy()
    machine = Machine("typed", model=MODEL, states=[
        LLMState("classify", prompt="Classify the idea.", output=Out, guard=spy),
        LLMState("explain", prompt="Explain {classify}", needs=["classify"]),
    ])
    failed = h.run(machine)
    assert failed.status is RunStatus.FAILED
    resumed = h.resume(failed.run_id, machine)
    assert resumed.status is RunStatus.COMPLETED
    assert spy.seen == [Out(label="bold", score=9)]
    assert resumed.outputs["classify"] == Out(label="bold", score=9)
    first, second = (r.body for r in h.fake.requests if r.state == "explain")
    assert first == second  # the stored JSON was turned back into the same typed object
    assert first["messages"][0]["content"] == "Explain " + Out(label="bold", score=9).model_dump_json()
    classify = h.fake.requests[0].body
    assert classify["tool_choice"] == {"type": "tool", "name": "submit_classify"}
    assert classify["tools"][0]["input_schema"] == Out.model_json_schema()


# --------------------------------------------------------------------------- fallback


def test_a_fallback_model_answers_when_retries_are_exhausted(h: Harness) -> None:
    h.fake.on("ask", error(529, "overloaded"))
    backup = reply("from the backup", input_tokens=90, output_tokens=30)
    h.fake.on(f"ask@{FALLBACK}", backup)
    result = h.run(one_state(retry_policy=policy(2), fallback=FALLBACK))
    assert (result.status, result.outputs) == (RunStatus.COMPLETED, {"ask": "from the backup"})
    assert [r.body["model"] for r in h.fake.requests] == [MODEL, MODEL, FALLBACK]
    assert h.fake.slept == [1.0]
    (row,) = h.rows(result.run_id)
    assert row.source == "fallback"
    assert row.reason == (f"no guard: continue [answered by fallback {FALLBACK} after: Messages API "
                          "returned 529: overloaded_error: overloaded (gave up after 2 attempts: "
                          "max_attempts=2 reached)]")
    assert [(a.kind, a.status_code) for a in row.attempts] == [("transient", 529)] * 2
    assert (row.request or {})["model"] == FALLBACK and row.request_id == "req_fake_000003"
    assert row.usage == usage_of(backup)
    assert row.cost_usd == pytest.approx(cost_of(backup, model=FALLBACK))
    assert cost_of(backup, model=FALLBACK) != pytest.approx(cost_of(backup))  # priced as haiku


def test_a_fallback_also_answers_when_retries_run_out_during_a_reask(h: Harness) -> None:
    h.fake.on("ask", reply(data={"label": "x"}), error(529))
    h.fake.on(f"ask@{FALLBACK}", reply(data={"label": "backup", "score": 2}))
    result = h.run(one_state(output=Out, retry_policy=policy(2), fallback=FALLBACK))
    assert (result.status, result.error) == (RunStatus.COMPLETED, None)
    assert result.outputs["ask"] == Out(label="backup", score=2)
    (row,) = h.rows(result.run_id)
    assert row.source == "fallback"
    assert [a.kind for a in row.attempts] == ["invalid_output", "transient", "transient"]


def test_a_fallback_function_answers_with_a_validated_typed_object(h: Harness) -> None:
    asked: list[StepContext] = []

    def cached_opinion(ctx: StepContext) -> dict[str, Any]:
        asked.append(ctx)
        return {"label": "from cache", "score": 3}

    h.fake.on("ask", disconnect())
    spy = GuardSpy()
    result = h.run(one_state(output=Out, guard=spy, retry_policy=policy(3), fallback=cached_opinion))
    assert result.status is RunStatus.COMPLETED
    assert spy.seen == [Out(label="from cache", score=3)]
    assert [ctx.state for ctx in asked] == ["ask"]
    assert h.fake.calls("ask") == 3
    (row,) = h.rows(result.run_id)
    assert row.source == "fallback" and "answered by fallback cached_opinion after:" in (row.reason or "")
    assert [a.kind for a in row.attempts] == ["connection"] * 3
    assert row.output == {"label": "from cache", "score": 3}


def test_a_fallback_function_that_raises_fails_the_run_and_keeps_the_attempts(h: Harness) -> None:
    def broken(ctx: StepContext) -> str:
        raise RuntimeError("backup service down")

    h.fake.on("ask", error(529))
    result = h.run(one_state(retry_policy=policy(2), fallback=broken))
    assert result.status is RunStatus.FAILED
    assert "backup service down" in (result.error or "")
    assert h.stored_run(result.run_id)[0] == "failed"
    assert [row[3] for row in h.attempt_log(result.run_id)] == ["transient", "transient"]


def test_a_fallback_is_not_used_for_a_deterministic_error(h: Harness) -> None:
    used: list[StepContext] = []

    def backup(ctx: StepContext) -> str:
        used.append(ctx)
        return "from the backup"

    h.fake.on("ask", error(400, "prompt is too long"))
    result = h.run(one_state(fallback=backup))
    assert result.status is RunStatus.FAILED and "prompt is too long" in (result.error or "")
    assert used == [] and h.fake.calls() == 1


def test_a_failing_fallback_model_fails_the_step_naming_both_failures(h: Harness) -> None:
    h.fake.on("ask", error(503, "primary down"))
    h.fake.on(f"ask@{FALLBACK}", error(529, "backup overloaded"))
    result = h.run(one_state(retry_policy=policy(2), fallback=FALLBACK))
    assert result.status is RunStatus.FAILED
    assert result.error == (
        "LLMError: Messages API returned 503: api_error: primary down (gave up after 2 attempts: "
        f"max_attempts=2 reached); fallback {FALLBACK} failed too: Messages API returned 529: "
        "overloaded_error: backup overloaded (gave up after 2 attempts: max_attempts=2 reached)")
    assert h.attempt_log(result.run_id) == [
        (1, 1, "ask", "transient", 503, "req_fake_000001", 1.0),
        (1, 2, "ask", "transient", 503, "req_fake_000002", None),
        (1, 3, "ask", "transient", 529, "req_fake_000003", 1.0),
        (1, 4, "ask", "transient", 529, "req_fake_000004", None)]


# --------------------------------------------------------------------------- tokens and cost


def test_cost_is_usage_times_the_price_table_per_step_run_and_machine(db_path: Path,
                                                                      fake: FakeMessagesAPI) -> None:
    prices = PRICES.merged({MODEL: Price(input=2.0, output=10.0, cache_write=2.5, cache_read=0.2)})
    replies = {
        "draft": reply("d", input_tokens=1200, output_tokens=300, cache_write_tokens=2000),
        "expand": reply("e", input_tokens=700, output_tokens=150, cache_read_tokens=2000),
    }
    for state, answer in replies.items():
        fake.on(state, answer)
    with harness_for(db_path, fake, prices=prices) as h:
        results = [h.run(two_states()) for _ in range(2)]
        step_cost = {s: cost_of(r, prices=prices) for s, r in replies.items()}
        run_cost = sum(step_cost.values())
        assert step_cost != {s: cost_of(r) for s, r in replies.items()}  # the override applies
        for result in results:
            rows = h.rows(result.run_id)
            assert {r.from_state: r.usage for r in rows} == {s: usage_of(r) for s, r in replies.items()}
            assert {r.from_state: r.cost_usd for r in rows} == pytest.approx(step_cost)
            assert result.cost_usd == pytest.approx(run_cost)
            assert result.usage == usage_of(*replies.values())
            ((viewed, cache_read, cache_write),) = h.sql(
                "SELECT cost_usd, cache_read_tokens, cache_write_tokens FROM run_totals "
                "WHERE run_id = ?", result.run_id)
            assert (viewed, cache_read, cache_write) == (pytest.approx(run_cost), 2000, 2000)
        assert [s.cost_usd for s in asyncio.run(h.store.list_runs())] == pytest.approx([run_cost, run_cost])
        (totals,) = asyncio.run(h.store.machine_totals(["pair"]))
        assert (totals.runs, totals.steps, totals.cache_hits) == (2, 4, 0)
        assert totals.cost_usd == pytest.approx(2 * run_cost)
        assert totals.input_tokens == 2 * (1200 + 700) and totals.output_tokens == 2 * (300 + 150)


def test_price_table_matches_exact_ids_before_families_and_loads_overrides(tmp_path: Path) -> None:
    table = PriceTable({"sonnet": Price(3.0, 15.0), "claude-sonnet-4-5": Price(4.0, 16.0),
                        "claude-sonnet": Price(5.0, 17.0)})
    assert table.price_for("claude-sonnet-4-5") == Price(4.0, 16.0)
    assert table.price_for("claude-sonnet-9") == Price(5.0, 17.0)  # the longest family key
    assert table.price_for("my-sonnet-finetune") == Price(3.0, 15.0)
    assert table.price_for("gpt-5") is None and table.cost("gpt-5", Usage(input_tokens=1)) is None
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_tokens=1_000_000,
                  cache_write_tokens=1_000_000)
    assert Price(2.0, 10.0).cost(usage) == pytest.approx(2.0 + 10.0 + 2.0 * 0.1 + 2.0 * 1.25)
    assert Price(2.0, 10.0, cache_write=3.0, cache_read=0.5).cost(usage) == pytest.approx(15.5)

    path = tmp_path / "prices.json"
    path.write_text(json.dumps({MODEL: {"input": 1, "output": 2, "cache_read": 0.05}}))
    loaded = PriceTable.load(path)
    assert loaded.price_for(MODEL) == Price(1.0, 2.0, None, 0.05)
    assert loaded.price_for(FALLBACK) == PRICES.price_for(FALLBACK)  # defaults stay
    path.write_text(json.dumps({MODEL: {"input": 1}}))
    with pytest.raises(ValueError, match="needs at least \"input\" and \"output\""):
        PriceTable.load(path)


def test_a_model_without_a_price_makes_every_total_unknown(h: Harness) -> None:
    h.fake.on("draft", reply("d"))
    h.fake.on("expand", reply("e"))
    machine = Machine("mixed", model=MODEL, states=[
        LLMState("draft", prompt="Draft."),
        LLMState("expand", prompt="Expand.", model="house-model-7"),
    ])
    result = h.run(machine)
    assert result.status is RunStatus.COMPLETED
    draft, expand = h.rows(result.run_id)
    assert draft.cost_usd == pytest.approx(cost_of(reply()))
    assert expand.cost_usd is None and expand.usage == usage_of(reply())
    # a total that silently leaves out the unpriced call would understate the spend
    (listed,), (machine_totals,) = asyncio.run(h.store.list_runs()), asyncio.run(h.store.machine_totals(["mixed"]))
    totals = {"log (orch log/show)": total_cost(h.rows(result.run_id)), "run result": result.cost_usd,
              "orch runs": listed.cost_usd, "machine totals": machine_totals.cost_usd}
    assert totals == dict.fromkeys(totals)


# --------------------------------------------------------------------------- budgets


BUDGET_STOP = re.compile(
    r"BudgetExceededError: budget exceeded before calling expand: cost: spent \$(\d+\.\d{4}) \+ "
    r"worst case \$(\d+\.\d{4}) > max_cost_usd \$0\.0500; raise the limit and resume")


def test_max_cost_stops_before_a_call_that_could_pass_it_and_resume_continues(h: Harness) -> None:
    draft = reply("short draft", input_tokens=400, output_tokens=50)
    h.fake.on("draft", draft)
    h.fake.on("expand", reply("long text"))
    machine = two_states(second_max_tokens=20_000)  # worst case alone > $0.05 at sonnet prices
    stopped = h.run(machine, budget=Budget(max_cost_usd=0.05))
    assert (stopped.status, stopped.path) == (RunStatus.BUDGET_EXCEEDED, ["draft"])
    assert h.fake.calls("expand") == 0  # checked before the call, not after paying for it
    found = BUDGET_STOP.fullmatch(stopped.error or "")
    assert found, stopped.error
    assert found[1] == f"{cost_of(draft):.4f}"
    output_worst = PRICES.cost(MODEL, Usage(output_tokens=20_000)) or 0.0
    assert float(found[2]) >= round(output_worst, 4) and float(found[1]) + float(found[2]) > 0.05
    assert h.stored_run(stopped.run_id) == ("budget_exceeded", stopped.error,
                                           {"budget": {"max_cost_usd": 0.05}})

    resumed = h.resume(stopped.run_id, machine, budget=Budget(max_cost_usd=1.0))
    assert (resumed.status, resumed.path) == (RunStatus.COMPLETED, ["draft", "expand"])
    assert (h.fake.calls("draft"), h.fake.calls("expand")) == (1, 1)
    assert h.stored_run(stopped.run_id)[2] == {"budget": {"max_cost_usd": 1.0}}


def test_a_machine_budget_applies_unless_the_run_overrides_it(h: Harness) -> None:
    h.fake.on("draft", reply("d"))
    h.fake.on("expand", reply("e"))
    machine = two_states(second_max_tokens=20_000, budget=Budget(max_cost_usd=0.05))
    assert h.run(machine).status is RunStatus.BUDGET_EXCEEDED
    assert h.run(machine, budget=Budget(max_cost_usd=1.0)).status is RunStatus.COMPLETED
    assert h.fake.calls("expand") == 1


def test_a_token_budget_stops_before_a_reask_and_keeps_what_was_paid(
        h: Harness, tmp_path: Path) -> None:
    invalid = reply(data={"label": "x"}, input_tokens=40, output_tokens=10)
    good = reply(data={"label": "y", "score": 2})
    machine = one_state(output=Out, max_tokens=100)
    probe = FakeMessagesAPI(default=None).on("ask", invalid, good)  # learn both requests' worst cases
    with harness_for(tmp_path / "probe.db", probe) as unlimited:
        assert unlimited.run(machine).status is RunStatus.COMPLETED
    first, reask = (worst_case_tokens(r.body) for r in probe.requests)
    paid = usage_of(invalid).input_tokens + usage_of(invalid).output_tokens
    limit = paid + reask - 1  # enough for the first call, one token short for the re-ask
    assert first <= limit

    h.fake.on("ask", invalid, good)
    stopped = h.run(machine, budget=Budget(max_tokens=limit))
    assert stopped.status is RunStatus.BUDGET_EXCEEDED
    reask_input = reask - 100
    assert stopped.error == (
        f"BudgetExceededError: budget exceeded before calling ask: tokens: spent {paid} + worst "
        f"case {reask} (about {reask_input} in, 100 out) > max_tokens {limit}; raise the limit and "
        "resume")
    assert h.fake.calls("ask") == 1
    (row,) = h.rows(stopped.run_id)
    assert row.to_state is None and [a.kind for a in row.attempts] == ["invalid_output"]
    assert row.usage == usage_of(invalid)  # the paid call counts although the step stopped
    assert row.cost_usd == pytest.approx(cost_of(invalid))
    assert stopped.usage == usage_of(invalid)


def test_a_token_budget_counts_cache_tokens_as_paid(h: Harness) -> None:
    draft = reply("d", input_tokens=10, output_tokens=10, cache_write_tokens=5000)
    h.fake.on("draft", draft)
    h.fake.on("expand", reply("e"))
    stopped = h.run(two_states(), budget=Budget(max_tokens=1000))
    assert (stopped.status, stopped.path) == (RunStatus.BUDGET_EXCEEDED, ["draft"])
    assert "tokens: spent 5020 + worst case" in (stopped.error or "")
    assert h.fake.calls("expand") == 0


def test_a_budget_without_a_price_for_the_model_stops_with_the_fix(h: Harness) -> None:
    machine = Machine("unpriced", model="house-model-7", states=[LLMState("ask", prompt="Hi.")])
    result = h.run(machine, budget=Budget(max_cost_usd=10.0))
    assert result.status is RunStatus.BUDGET_EXCEEDED
    assert result.error == (
        "BudgetExceededError: budget exceeded before calling ask: cost: no price known for model "
        "'house-model-7', so max_cost_usd cannot be checked; add the model's price (--prices FILE or "
        "PriceTable) and resume")
    assert h.fake.calls() == 0


def budget_routed(guard_fn: Any = None) -> Machine:
    """`big` routes to `cheap` when the budget cannot cover it."""
    on: dict[Decision, str] = {Branch("cheap"): "cheap", FlowDecision.CONTINUE: END}
    return Machine("routed", model=MODEL, states=[
        LLMState("draft", prompt="Draft a note.", max_tokens=50),
        LLMState("big", prompt="Expand: {draft}", needs=["draft"], max_tokens=20_000,
                 on_budget=Branch("cheap"), guard=guard_fn, on=on),
        LLMState("cheap", prompt="Summarise: {draft}", needs=["draft"], max_tokens=50),
    ])


def test_on_budget_routes_to_the_declared_branch_without_calling(h: Harness) -> None:
    for state in ("draft", "big", "cheap"):
        h.fake.on(state, reply(state))
    result = h.run(budget_routed(GuardSpy()), budget=Budget(max_cost_usd=0.05))
    assert (result.status, result.path) == (RunStatus.COMPLETED, ["draft", "big", "cheap"])
    assert [r.state for r in h.fake.requests] == ["draft", "cheap"]
    big = h.rows(result.run_id)[1]
    assert (big.source, big.decision, big.to_state, big.output) == ("budget", "branch:cheap", "cheap",
                                                                   None)
    assert (big.reason or "").startswith("budget exhausted before calling big (cost: spent $")
    assert (big.reason or "").endswith("> max_cost_usd $0.0500); routed to branch:cheap")
    assert (big.usage, big.cost_usd) == (Usage(), 0.0)


@pytest.mark.parametrize("guard_fn", [None, guard(FlowDecision.CONTINUE)(lambda o, c: FlowDecision.CONTINUE)],
                         ids=["no-guard", "guard-without-the-budget-branch"])
def test_on_budget_is_itself_a_way_to_take_its_branch(guard_fn: Any) -> None:
    """The budget branch needs no guard to return it: on_budget chooses it."""
    machine = budget_routed(guard_fn)
    assert machine.edges("big")["branch:cheap"] == "cheap"


def test_max_seconds_stops_a_state_in_flight_and_counts_across_resumes(h: Harness) -> None:
    gate = threading.Event()  # the slow answer waits for it (real waiting: 50 ms)
    h.fake.on("slow", Reply(text="late", gate=gate))
    h.fake.on("after", reply("a"))
    machine = Machine("clocked", model=MODEL, states=[
        LLMState("slow", prompt="Take your time."), LLMState("after", prompt="Then this.")])
    stopped = h.run(machine, budget=Budget(max_seconds=0.05))
    assert (stopped.status, stopped.path) == (RunStatus.BUDGET_EXCEEDED, [])
    assert stopped.error == ("BudgetExceededError: state 'slow' was stopped when the run reached "
                             "max_seconds=0.05; raise it and resume")
    gate.set()
    again = h.resume(stopped.run_id, machine, budget=Budget(max_seconds=0.04))
    assert again.status is RunStatus.BUDGET_EXCEEDED  # the 0.05 s already spent count
    assert re.fullmatch(r"BudgetExceededError: the run has been active \d+\.\ds, its max_seconds is "
                        r"0\.04; raise it and resume", again.error or ""), again.error
    assert h.fake.calls("slow") == 1
    done = h.resume(stopped.run_id, machine, budget=Budget(max_seconds=60))
    assert (done.status, done.outputs["slow"]) == (RunStatus.COMPLETED, "late")
    assert (h.fake.calls("slow"), h.fake.calls("after")) == (2, 1)


def test_attempts_made_before_max_seconds_stopped_the_step_are_logged(h: Harness) -> None:
    gate = threading.Event()  # never set: the retry hangs until the run's clock runs out
    h.fake.on("ask", error(503, "unavailable"), Reply(text="late", gate=gate))
    stopped = h.run(one_state(retry_policy=policy(3)), budget=Budget(max_seconds=0.05))
    gate.set()
    assert stopped.status is RunStatus.BUDGET_EXCEEDED
    assert h.fake.calls("ask") == 2 and h.fake.slept == [1.0]
    assert h.attempt_log(stopped.run_id)[:1] == [
        (1, 1, "ask", "transient", 503, "req_fake_000001", 1.0)]


# --------------------------------------------------------------------------- caching


def cached(**options: Any) -> Machine:
    return Machine("cached", model=MODEL, input_vars={"topic": lambda data: data["topic"]}, states=[
        LLMState("ask", prompt="Rate {topic}.", output=Out, cache=True, **options)])


def test_the_step_cache_serves_an_identical_request_without_any_http_call(h: Harness) -> None:
    paid = reply(data={"label": "good", "score": 8}, input_tokens=300, output_tokens=40)
    h.fake.on("ask", paid)
    spy = GuardSpy()
    first = h.run(cached(guard=spy), {"topic": "kites"})
    second = h.run(cached(guard=spy), {"topic": "kites"})
    assert h.fake.calls() == 1  # the second run made no request at all
    assert spy.seen == [Out(label="good", score=8)] * 2
    assert second.outputs == first.outputs
    (miss,), (hit,) = h.rows(first.run_id), h.rows(second.run_id)
    assert (miss.source, hit.source) == ("llm", "cache")
    assert hit.request_hash == miss.request_hash is not None
    assert hit.response == miss.response and hit.request_id == miss.request_id == "req_fake_000001"
    assert (hit.reason or "").endswith(f"[cache hit: same request as run {first.run_id} seq 1]")
    assert (hit.usage, hit.cost_usd, second.cost_usd) == (Usage(), 0.0, 0.0)
    assert miss.cost_usd == pytest.approx(cost_of(paid))
    ((hits,),) = h.sql("SELECT cache_hits FROM run_totals WHERE run_id = ?", second.run_id)
    assert hits == 1
    (totals,) = asyncio.run(h.store.machine_totals(["cached"]))
    assert (totals.runs, totals.cache_hits) == (2, 1)
    assert totals.cost_usd == pytest.approx(cost_of(paid))

    h.run(cached(), {"topic": "boats"})  # a different request is a miss
    assert h.fake.calls() == 2


def test_without_cache_true_an_identical_request_is_sent_again(h: Harness) -> None:
    h.fake.on("ask", reply("same"))
    runs = [h.run(one_state()) for _ in range(2)]
    assert h.fake.calls() == 2
    assert [h.rows(r.run_id)[0].request_hash for r in runs] == [None, None]


def test_the_step_cache_never_serves_an_answer_that_did_not_commit(h: Harness) -> None:
    h.fake.on("ask", reply(data={"label": "x"}), reply(data={"label": "x"}),
              reply(data={"label": "ok", "score": 1}))
    failed = h.run(cached(repairs=1), {"topic": "kites"})  # invalid twice: the step failed
    assert failed.status is RunStatus.FAILED
    fresh = h.run(cached(repairs=1), {"topic": "kites"})
    assert fresh.status is RunStatus.COMPLETED
    assert h.fake.calls() == 3 and h.rows(fresh.run_id)[0].source == "llm"


def test_a_fallback_answer_is_never_served_for_the_primary_request(h: Harness) -> None:
    h.fake.on("ask", error(529), error(529), reply(data={"label": "primary", "score": 9}))
    h.fake.on(f"ask@{FALLBACK}", reply(data={"label": "backup", "score": 1}))
    machine = cached(retry_policy=policy(2), fallback=FALLBACK)
    first = h.run(machine, {"topic": "kites"})
    assert first.outputs["ask"] == Out(label="backup", score=1)
    second = h.run(machine, {"topic": "kites"})  # the primary model is back
    assert second.outputs["ask"] == Out(label="primary", score=9)
    assert [r.body["model"] for r in h.fake.requests] == [MODEL, MODEL, FALLBACK, MODEL]
    third = h.run(machine, {"topic": "kites"})  # now the primary's own answer is cached
    assert third.outputs["ask"] == Out(label="primary", score=9)
    assert h.fake.calls() == 4 and h.rows(third.run_id)[0].source == "cache"


@pytest.mark.parametrize("prompt_cache", [True, False])
def test_prompt_caching_marks_the_system_prompt_and_records_cache_tokens(
        h: Harness, prompt_cache: bool) -> None:
    writes = reply("w", input_tokens=20, output_tokens=5, cache_write_tokens=1500)
    reads = reply("r", input_tokens=20, output_tokens=5, cache_read_tokens=1500)
    h.fake.on("ask", writes, reads)
    machine = Machine("cached_prompt", model=MODEL, states=[
        LLMState("ask", prompt="Question.", system="You are a careful reviewer.",
                 prompt_cache=prompt_cache)])
    results = [h.run(machine) for _ in range(2)]
    system = h.fake.requests[0].body["system"]
    if prompt_cache:
        assert system == [{"type": "text", "text": "You are a careful reviewer.",
                           "cache_control": {"type": "ephemeral"}}]
    else:
        assert system == "You are a careful reviewer."
    for result, answer in zip(results, (writes, reads), strict=True):
        (row,) = h.rows(result.run_id)
        assert row.usage == usage_of(answer)
        assert row.cost_usd == pytest.approx(cost_of(answer))
    assert cost_of(reads) < cost_of(writes)  # cache reads are cheaper than cache writes


# --------------------------------------------------------------------------- timeouts


class TimeoutCapture(httpx2.AsyncBaseTransport):
    """Passes requests to the fake and keeps the timeout the SDK set on each."""

    def __init__(self, fake: FakeMessagesAPI) -> None:
        self.inner = fake.transport()
        self.timeouts: list[dict[str, float]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.timeouts.append(request.extensions["timeout"])
        return await self.inner.handle_async_request(request)


def test_a_state_timeout_reaches_the_sdk_and_a_timed_out_call_is_retried(db_path: Path,
                                                                         fake: FakeMessagesAPI) -> None:
    capture = TimeoutCapture(fake)
    client = anthropic.AsyncAnthropic(api_key="fake-key-not-secret", base_url="http://fake.invalid",
                                      max_retries=0, http_client=httpx2.AsyncClient(transport=capture))
    time = VirtualTime()
    fake.on("quick", timeout(), reply("made it"))
    fake.on("patient", reply("no rush"))
    machine = Machine("timed", model=MODEL, states=[
        LLMState("quick", prompt="Fast.", timeout=0.5, retry_policy=policy(2)),
        LLMState("patient", prompt="Slow."),
    ])
    with Engine(open_store(db_path), model=AnthropicModel(client, sleep=time.sleep, clock=time.clock)) as engine:
        result = engine.run(machine)
        assert isinstance(engine.store, SQLiteStore)
        (quick, _) = asyncio.run(engine.store.transitions(result.run_id))
    assert result.status is RunStatus.COMPLETED
    per_request = {"connect": 0.5, "read": 0.5, "write": 0.5, "pool": 0.5}
    assert capture.timeouts[:2] == [per_request, per_request]
    assert capture.timeouts[2]["read"] != 0.5  # other states keep the client's timeout
    assert [(a.kind, a.status_code, a.delay_s) for a in quick.attempts] == [("timeout", None, 1.0)]


def test_timeouts_that_exhaust_the_retries_fail_with_a_clear_error(h: Harness) -> None:
    h.fake.on("ask", timeout())
    result = h.run(one_state(timeout=0.5, retry_policy=policy(2)))
    assert result.status is RunStatus.FAILED
    assert h.fake.calls("ask") == 2
    message = result.error or ""
    assert "\n" not in message and "timed out" in message and "gave up after 2 attempts" in message
    assert "0.5" in message, f"the error should name the state's timeout (0.5 s): {message!r}"


# --------------------------------------------------------------------------- replay


Scenario = Callable[[Harness], tuple[Machine, str]]


def retried(h: Harness) -> tuple[Machine, str]:
    h.fake.on("draft", error(503), error(429, headers={"retry-after-ms": "10"}), timeout(), reply("d"))
    h.fake.on("expand", disconnect(), reply("e"))
    machine = two_states()
    return machine, h.run(machine).run_id


def reasked(h: Harness) -> tuple[Machine, str]:
    h.fake.on("ask", reply(data={"label": "x"}), reply("no tool"), reply(data={"label": "y", "score": 1}))
    machine = one_state(output=Out, repairs=2, guard=GuardSpy())
    return machine, h.run(machine).run_id


def routed_invalid(h: Harness) -> tuple[Machine, str]:
    h.fake.on("ask", reply("I'd rather not", stop_reason="refusal"))
    h.fake.on("repair", reply("handled"))
    machine = Machine("routed_invalid", model=MODEL, states=[
        LLMState("ask", prompt="Rate this idea.", output=Out, on_invalid="guard",
                 guard=GuardSpy(route_invalid), on={Branch("repair"): "repair"}),
        LLMState("repair", prompt="Handle {ask}", needs=["ask"]),
    ])
    return machine, h.run(machine).run_id


def fallback_model(h: Harness) -> tuple[Machine, str]:
    h.fake.on("ask", error(529))
    h.fake.on(f"ask@{FALLBACK}", reply("backup"))
    machine = one_state(retry_policy=policy(3), fallback=FALLBACK)
    return machine, h.run(machine).run_id


def fallback_function(h: Harness) -> tuple[Machine, str]:
    h.fake.on("ask", error(503))
    machine = one_state(output=Out, retry_policy=policy(2),
                        fallback=lambda ctx: {"label": "local", "score": 0})
    return machine, h.run(machine).run_id


def cache_hit(h: Harness) -> tuple[Machine, str]:
    h.fake.on("ask", reply(data={"label": "good", "score": 8}))
    machine = cached()
    h.run(machine, {"topic": "kites"})
    return machine, h.run(machine, {"topic": "kites"}).run_id


def failed_then_resumed(h: Harness) -> tuple[Machine, str]:
    h.fake.on("draft", reply("d"))
    h.fake.on("expand", error(400, "bad request"), error(503), reply("e"))
    machine = two_states()
    run_id = h.run(machine).run_id
    h.resume(run_id, machine)
    return machine, run_id


SCENARIOS: list[Scenario] = [retried, reasked, routed_invalid, fallback_model, fallback_function,
                             cache_hit, failed_then_resumed]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
def test_resilient_runs_replay_as_matching_without_calls(h: Harness, scenario: Scenario) -> None:
    machine, run_id = scenario(h)
    assert h.stored_run(run_id)[0] == "completed"
    committed = [r for r in h.rows(run_id) if r.to_state is not None]
    calls = h.fake.calls()
    report = h.replay(run_id, machine)
    assert report.divergence is None, report.divergence.describe()
    assert report.compared == report.recorded == len(committed)
    assert h.fake.calls() == calls


def test_a_budget_routed_run_replays_as_matching(h: Harness) -> None:
    for state in ("draft", "big", "cheap"):
        h.fake.on(state, reply(state))
    machine = budget_routed(GuardSpy())
    result = h.run(machine, budget=Budget(max_cost_usd=0.05))
    assert result.path == ["draft", "big", "cheap"]
    report = h.replay(result.run_id, machine)
    assert report.divergence is None, report.divergence.describe()
    assert report.compared == 3


def test_replay_serves_the_recorded_invalid_answer_so_fewer_repairs_diverge(h: Harness) -> None:
    _, run_id = reasked(h)
    report = h.replay(run_id, one_state(output=Out, repairs=1, guard=GuardSpy()))
    assert report.divergence is not None
    assert (report.divergence.seq, report.divergence.kind) == (1, "error")
    assert "did not call the submit_ask tool" in report.divergence.replayed


def test_replay_notices_a_changed_fallback_model(h: Harness) -> None:
    _, run_id = fallback_model(h)
    report = h.replay(run_id, one_state(retry_policy=policy(3), fallback="claude-opus-4-1"))
    assert report.divergence is not None
    assert report.divergence.kind == "request"
    assert (report.divergence.recorded, report.divergence.replayed) == (
        f'model="{FALLBACK}"', 'model="claude-opus-4-1"')
