"""Replay re-drives the current code on recorded answers and finds the first divergence."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    END,
    Engine,
    FlowDecision,
    LLMState,
    Machine,
    PythonState,
    ReplayReport,
    RunStatus,
    SQLiteStore,
    StepContext,
    guard,
    open_store,
    replay_run,
)
from statemachine_orch.llm._retry import NO_RETRY
from statemachine_orch.testing import FakeMessagesAPI, error


def router(*, positive_to: FlowDecision = FlowDecision.BRANCH_A, prompt: str = "Classify: {text}",
           support_next: str = END, calls: list[str] | None = None) -> Machine:
    @guard(FlowDecision.BRANCH_A, FlowDecision.BRANCH_B, FlowDecision.CONTINUE)
    def route(output: str, ctx: StepContext) -> FlowDecision:
        if "positive" in output:
            return positive_to
        return FlowDecision.BRANCH_B if "negative" in output else FlowDecision.CONTINUE

    def note(ctx: StepContext) -> dict[str, Any]:
        if calls is not None:
            calls.append("note")
        return {"chars": len(ctx.outputs["classify"])}

    from pydantic import BaseModel

    class Text(BaseModel):
        text: str

    return Machine("router", input_model=Text, source_file="router_machine.py", states=[
        LLMState("classify", prompt=prompt, guard=route,
                 on={FlowDecision.BRANCH_A: "upsell", FlowDecision.BRANCH_B: "support"}),
        LLMState("standard", prompt="standard {text}", on={FlowDecision.CONTINUE: END}),
        LLMState("upsell", prompt="upsell {text}", on={FlowDecision.CONTINUE: "note"}),
        LLMState("support", prompt="support {text}", on={FlowDecision.CONTINUE: support_next}),
        PythonState("note", run=note, needs=["classify"]),
    ])


def record(db_path: Path, machine: Machine, fake: FakeMessagesAPI, data: dict[str, Any]) -> str:
    fake.default = "auto"
    with Engine(open_store(db_path), model=fake.model()) as engine:
        return engine.run(machine, data).run_id


def replay(db_path: Path, run_id: str, machine: Machine) -> ReplayReport:
    async def go() -> ReplayReport:
        store = SQLiteStore(db_path)
        try:
            return await replay_run(store, run_id, machine)
        finally:
            await store.close()

    return asyncio.run(go())


def test_unchanged_machine_replays_without_calls_or_side_effects(db_path: Path,
                                                                 fake: FakeMessagesAPI) -> None:
    calls: list[str] = []
    fake.on("classify", "positive!")
    run_id = record(db_path, router(calls=calls), fake, {"text": "great"})
    requests_before, calls_before = len(fake.requests), list(calls)
    report = replay(db_path, run_id, router(calls=calls))
    assert report.matches and report.compared == report.recorded == 3
    assert len(fake.requests) == requests_before  # no model call
    assert calls == calls_before  # the Python state was not executed again


def test_changed_guard_reports_the_first_divergent_decision(db_path: Path,
                                                            fake: FakeMessagesAPI) -> None:
    fake.on("classify", "positive")
    run_id = record(db_path, router(), fake, {"text": "great"})
    report = replay(db_path, run_id, router(positive_to=FlowDecision.BRANCH_B))
    assert not report.matches and report.divergence is not None
    d = report.divergence
    assert (d.seq, d.state, d.kind, d.recorded, d.replayed) == (1, "classify", "decision", "branch_a",
                                                               "branch_b")
    assert report.compared == 0


def test_changed_transition_reports_the_target(db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.on("classify", "negative")
    run_id = record(db_path, router(), fake, {"text": "bad"})
    report = replay(db_path, run_id, router(support_next="note"))
    assert report.divergence is not None
    d = report.divergence
    assert (d.seq, d.state, d.kind, d.recorded, d.replayed) == (2, "support", "target", END, "note")
    assert report.compared == 1


def test_changed_prompt_reports_the_changed_line(db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.on("classify", "neutral")
    run_id = record(db_path, router(), fake, {"text": "ok"})
    report = replay(db_path, run_id, router(prompt="Classify the sentiment: {text}"))
    assert report.divergence is not None
    d = report.divergence
    assert (d.seq, d.state, d.kind) == (1, "classify", "request")
    assert d.recorded == 'prompt line 1 "Classify: ok"'
    assert d.replayed == 'prompt line 1 "Classify the sentiment: ok"'


def test_a_guard_that_now_raises_is_a_divergence(db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.on("classify", "neutral")
    run_id = record(db_path, router(), fake, {"text": "ok"})

    def broken(output: str, ctx: StepContext) -> FlowDecision:
        raise ValueError("new bug")

    machine = Machine("router", states=[LLMState("classify", prompt="Classify: {text}", guard=broken),
                                        LLMState("standard", prompt="standard {text}")],
                      input_vars={"text": lambda data: data["text"]})
    report = replay(db_path, run_id, machine)
    assert report.divergence is not None and report.divergence.kind == "error"
    assert "new bug" in report.divergence.replayed


def test_failed_and_resumed_runs_replay_cleanly(db_path: Path, fake: FakeMessagesAPI) -> None:
    fake.on("classify", "negative")
    fake.on("support", error(529, "overloaded"), "sorry")
    machine = router()
    fake.default = "auto"
    with Engine(open_store(db_path), model=fake.model(retry=NO_RETRY)) as engine:
        failed = engine.run(machine, {"text": "bad"})
        assert failed.status is RunStatus.FAILED
        partial = replay(db_path, failed.run_id, machine)
        assert partial.matches and (partial.compared, partial.recorded) == (1, 1)
        assert engine.resume(failed.run_id, machine).status is RunStatus.COMPLETED
    full = replay(db_path, failed.run_id, machine)
    assert full.matches and full.compared == 2


def test_replay_of_another_machine_is_refused(db_path: Path, fake: FakeMessagesAPI) -> None:
    run_id = record(db_path, router(), fake, {"text": "x"})
    other = Machine("other", [LLMState("classify", prompt="x")])
    report = replay(db_path, run_id, other)
    assert report.divergence is not None and report.divergence.kind == "machine"


@pytest.mark.parametrize("text", ["positive", "negative", "neutral"])
def test_every_branch_of_the_router_replays(db_path: Path, fake: FakeMessagesAPI, text: str) -> None:
    fake.on("classify", text)
    run_id = record(db_path, router(), fake, {"text": text})
    assert replay(db_path, run_id, router()).matches
