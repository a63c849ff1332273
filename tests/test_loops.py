"""Loops with memory (`needs_if_ran`, `ctx.history`, `ctx.visit`) and graceful loop exits
(`on_exhausted`), through the real SDK (in-process transport) and real SQLite files."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    END,
    Branch,
    DefinitionError,
    Engine,
    FlowDecision,
    LLMState,
    Machine,
    PythonState,
    RunStatus,
    StepContext,
    guard,
    open_store,
    replay_run,
)
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import stored_rows

IMPROVE = Branch("improve")
seen: list[tuple[int, list[Any], Any]] = []  # (visit, history of generate, ctx.outputs.get("evaluate"))
broken: dict[str, int | None] = {"at_visit": None}  # the visit at which the evaluator's guard raises


@guard(FlowDecision.CONTINUE, IMPROVE, FlowDecision.TERMINATE)
def verdict(output: str, ctx: StepContext) -> Any:
    seen.append((ctx.visit, ctx.history("generate"), ctx.outputs.get("evaluate")))
    if ctx.visit == broken["at_visit"]:
        raise RuntimeError("the evaluator's guard broke")
    if output.startswith("PASS"):
        return FlowDecision.CONTINUE
    return FlowDecision.TERMINATE if output.startswith("FAIL") else IMPROVE


def optimizer(*, on_exhausted: Any = None, max_visits: int = 3) -> Machine:
    """The evaluator-optimizer pattern as a cycle: generate reads its own last attempt and the
    evaluator's feedback when they exist."""
    return Machine("optimizer", [
        LLMState("generate", prompt="Task: {task}\nLast attempt: {generate}\nFeedback: {evaluate}",
                 needs_if_ran=["generate", "evaluate"], max_visits=max_visits),
        LLMState("evaluate", prompt="Evaluate: {generate}", needs=["generate"], needs_if_ran=["evaluate"],
                 guard=verdict,
                 on={IMPROVE: "generate", FlowDecision.CONTINUE: END}, on_exhausted=on_exhausted),
    ], input_vars={"task": lambda data: data["task"]})


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    seen.clear()
    broken["at_visit"] = None
    with Engine(open_store(db_path), model=fake.model()) as eng:
        yield eng


def prompts(fake: FakeMessagesAPI, state: str) -> list[str]:
    return [r.body["messages"][0]["content"] for r in fake.requests if r.state == state]


def test_a_loop_reads_its_last_attempt_and_the_feedback_once_they_exist(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("generate", "draft 1", "draft 2")
    fake.on("evaluate", "NEEDS_IMPROVEMENT: shorter", "PASS")
    result = engine.run(optimizer(), {"task": "a haiku"})
    assert result.status is RunStatus.COMPLETED
    assert result.path == ["generate", "evaluate", "generate", "evaluate"]
    assert prompts(fake, "generate") == [
        "Task: a haiku\nLast attempt: \nFeedback: ",  # nothing ran before: empty, not an error
        "Task: a haiku\nLast attempt: draft 1\nFeedback: NEEDS_IMPROVEMENT: shorter"]
    # the guard sees the visit number, the committed history and the feedback of the last visit
    assert seen == [(1, ["draft 1"], None), (2, ["draft 1", "draft 2"], "NEEDS_IMPROVEMENT: shorter")]


def test_a_resumed_loop_rebuilds_its_history_from_the_log_and_pays_nothing_twice(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("generate", "draft 1", "draft 2", "draft 3")
    fake.on("evaluate", "NEEDS_IMPROVEMENT: a", "NEEDS_IMPROVEMENT: b", "PASS")
    machine = optimizer()
    broken["at_visit"] = 2  # the second evaluation's guard fails: its paid answer is kept
    failed = engine.run(machine, {"task": "t"})
    assert failed.status is RunStatus.FAILED and "the evaluator's guard broke" in (failed.error or "")
    assert failed.path == ["generate", "evaluate", "generate"]
    assert len(fake.requests) == 4
    broken["at_visit"] = None
    seen.clear()
    with Engine(open_store(db_path), model=fake.model()) as again:  # as a new process: history from the log
        result = again.resume(failed.run_id, machine)
    assert result.status is RunStatus.COMPLETED
    assert seen == [(2, ["draft 1", "draft 2"], "NEEDS_IMPROVEMENT: a"),
                    (3, ["draft 1", "draft 2", "draft 3"], "NEEDS_IMPROVEMENT: b")]
    assert [r.state for r in fake.requests[4:]] == ["generate", "evaluate"]  # the failed one judged again
    assert prompts(fake, "generate")[-1] == "Task: t\nLast attempt: draft 2\nFeedback: NEEDS_IMPROVEMENT: b"


def test_a_loop_replays_with_zero_calls(engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("generate", "draft 1", "draft 2")
    fake.on("evaluate", "NEEDS_IMPROVEMENT: shorter", "PASS")
    machine = optimizer()
    result = engine.run(machine, {"task": "a haiku"})
    fake.requests.clear()

    async def replay() -> Any:
        store = open_store(db_path)
        try:
            return await replay_run(store, result.run_id, machine)
        finally:
            await store.close()

    report = asyncio.run(replay())
    assert report.matches and report.compared == 4
    assert fake.requests == []


# --------------------------------------------------------------------------- on_exhausted


def test_max_visits_reached_takes_on_exhausted_and_the_log_says_why(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    fake.on("generate", "draft 1", "draft 2")
    fake.on("evaluate", "NEEDS_IMPROVEMENT: a", "NEEDS_IMPROVEMENT: b")
    result = engine.run(optimizer(on_exhausted=FlowDecision.CONTINUE, max_visits=2), {"task": "t"})
    assert result.status is RunStatus.COMPLETED
    assert result.path == ["generate", "evaluate", "generate", "evaluate"]
    last = stored_rows(db_path, result.run_id)[-1]
    assert (last.decision, last.to_state) == ("continue", END)
    assert last.reason is not None and last.reason.startswith(
        "branch:improve blocked ('generate' reached max_visits=2): on_exhausted -> continue; ")


def test_without_on_exhausted_max_visits_still_fails_the_run(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("generate", "draft 1", "draft 2")
    fake.on("evaluate", "NEEDS_IMPROVEMENT: a", "NEEDS_IMPROVEMENT: b")
    result = engine.run(optimizer(max_visits=2), {"task": "t"})
    assert result.status is RunStatus.FAILED
    assert "VisitLimitError: state 'generate' reached max_visits=2" in (result.error or "")


def test_retry_limit_reached_takes_on_exhausted(engine: Engine, db_path: Path) -> None:
    tries: list[int] = []

    def poll(ctx: StepContext) -> str:
        tries.append(ctx.attempt)
        return "not yet"

    machine = Machine("poller", [
        PythonState("poll", run=poll, guard=lambda output, ctx: FlowDecision.RETRY, retry_limit=3,
                    on_exhausted=Branch("give_up"), on={Branch("give_up"): "report"}),
        PythonState("report", run=lambda ctx: "gave up"),
    ])
    result = engine.run(machine)
    assert result.status is RunStatus.COMPLETED
    assert tries == [1, 2, 3]
    assert result.path == ["poll", "poll", "poll", "report"]
    third = stored_rows(db_path, result.run_id)[2]
    assert third.decision == "branch:give_up"
    assert third.reason is not None and "retry blocked (retry_limit=3 reached): on_exhausted -> branch:give_up" in (
        third.reason)


# --------------------------------------------------------------------------- validation and misuse


def problems(*states: Any, **options: Any) -> list[str]:
    with pytest.raises(DefinitionError) as raised:
        Machine("m", list(states), **options)
    return [p.split(": ", 1)[1] for p in raised.value.problems]


def test_definitions_of_loop_memory_are_checked() -> None:
    assert problems(LLMState("a", prompt="x", needs_if_ran=["ghost"])) == [
        "state 'a': needs_if_ran names unknown state 'ghost'; fix: use one of ['a']"]
    assert problems(LLMState("a", prompt="x"), LLMState("b", prompt="{a}", needs=["a"], needs_if_ran=["a"])) == [
        "state 'b': names 'a' in both needs and needs_if_ran; fix: keep it in needs if it always runs first, "
        "else in needs_if_ran"]
    # b always runs after a, never before: a's needs_if_ran of b could never be read
    assert problems(LLMState("a", prompt="{b}", needs_if_ran=["b"]), LLMState("b", prompt="x")) == [
        "state 'a': reads 'b' (needs_if_ran), which no path runs before it; fix: route a path through 'b' to "
        "'a', or drop it from needs_if_ran"]
    # a template name that neither needs nor needs_if_ran provides is still caught
    assert problems(LLMState("a", prompt="x"), LLMState("b", prompt="{a} {c}", needs_if_ran=["a"])) == [
        "state 'b': prompt uses {c}, which no input field, needed state or vars= entry provides; fix: add the "
        "field to input_model or input_vars, compute it with vars={'c': lambda ctx: ...}, or fix the spelling"]


def test_on_exhausted_must_have_a_transition_out_of_the_loop() -> None:
    assert problems(LLMState("a", prompt="x", on_exhausted=Branch("nowhere"))) == [
        "state 'a': on_exhausted=Branch('nowhere') has no transition; fix: use a decision with an on= entry, "
        "e.g. on_exhausted=Branch('give_up') with on={Branch('give_up'): '<target state>'}"]
    assert problems(LLMState("a", prompt="x", on_exhausted=FlowDecision.RETRY)) == [
        "state 'a': on_exhausted leads back to the state itself, which its retry_limit blocks; fix: route "
        "on_exhausted out of the loop, e.g. on_exhausted=FlowDecision.CONTINUE"]


def test_history_of_a_name_that_is_no_state_fails_the_step_with_the_fix(engine: Engine) -> None:
    machine = Machine("nosy", [PythonState("peek", run=lambda ctx: ctx.history("gnerate"))])
    result = engine.run(machine)
    assert result.status is RunStatus.FAILED
    assert "ctx.history('gnerate') names no state of this machine" in (result.error or "")
    assert "use one of ['peek']" in (result.error or "")
