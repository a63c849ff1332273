"""Child runs: machine states (sub-machines) and map states (one child run per item), through
the real SDK (in-process transport) and real SQLite files: durable per item, resumed without
paying a finished item twice, replayed item by item, budgeted as one run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    Budget,
    DefinitionError,
    Engine,
    FlowDecision,
    ItemError,
    LLMState,
    Machine,
    MachineState,
    MapState,
    PythonState,
    RunStatus,
    StepContext,
    TransitionRecord,
    open_store,
    replay_run,
)
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, error

from .helpers import query


class Subtask(BaseModel):
    kind: str
    description: str


def plan(ctx: StepContext) -> list[dict[str, str]]:
    return [{"kind": k, "description": f"write it {k}"} for k in ("formal", "casual", "terse")]


def workers(**options: Any) -> Machine:
    """The orchestrator-workers shape: a plan, one worker call per subtask, a summary."""
    return Machine("workers", [
        PythonState("orchestrate", run=plan),
        MapState("work", needs=["orchestrate"], items=lambda ctx: ctx.outputs["orchestrate"],
                 item_model=Subtask, each=LLMState("worker", prompt="Style {kind}: {description}"), **options),
        PythonState("summary", needs=["work"], run=lambda ctx: " | ".join(ctx.outputs["work"])),
    ])


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    with Engine(open_store(db_path), model=fake.model()) as eng:
        yield eng


def answer_by_prompt(fake: FakeMessagesAPI, fail: frozenset[str] = frozenset()) -> None:
    """Answer every request with a text made from its prompt (failing those in `fail`)."""
    def respond(request: CapturedRequest) -> Any:
        prompt = request.body["messages"][0]["content"]
        if prompt in fail:
            return error(400, "deterministic failure")
        return f"done: {prompt}"

    fake.default = respond


def children(db_path: Path) -> list[dict[str, Any]]:
    return query(db_path, "SELECT run_id, machine, status, parent_run_id, parent_state, item, cost_usd "
                          "FROM runs WHERE parent_run_id IS NOT NULL ORDER BY item")


def log_of(db_path: Path, run_id: str) -> list[TransitionRecord]:
    async def read() -> list[TransitionRecord]:
        store = open_store(db_path)
        try:
            return await store.transitions(run_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_map_state_runs_one_child_per_item_and_joins_them_in_item_order(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake)
    result = engine.run(workers(concurrency=2))
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["work"] == ["done: Style formal: write it formal", "done: Style casual: write it casual",
                                      "done: Style terse: write it terse"]
    kids = children(db_path)
    assert [(k["run_id"], k["status"], k["parent_run_id"], k["parent_state"], k["item"]) for k in kids] == [
        (f"{result.run_id}.1.1.{i}", "completed", result.run_id, "work", i) for i in range(3)]
    assert {k["machine"] for k in kids} == {"workers__work"}
    work = log_of(db_path, result.run_id)[1]
    assert work.source == "child"
    # the step carries its children's usage and cost, and so does the run's total
    kid_rows = [row for k in kids for row in log_of(db_path, k["run_id"])]
    assert work.usage.input_tokens == sum(r.usage.input_tokens for r in kid_rows) > 0
    assert work.cost_usd == pytest.approx(sum(r.cost_usd or 0.0 for r in kid_rows))
    assert result.cost_usd == pytest.approx(work.cost_usd)
    assert len(fake.requests) == 3
