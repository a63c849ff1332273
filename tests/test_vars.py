"""Prompt variables computed from the step's context (issue 12, item 7): `LLMState(vars=...)`
through the real SDK, the in-process fake Messages API and real SQLite files. A var fills its
placeholder like any value; one that raises or runs out of time fails the step naming the state
and the var; validation knows what vars provide."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statemachine_orch import (
    DefinitionError,
    Engine,
    LLMState,
    Machine,
    PythonState,
    RunStatus,
    StepContext,
    open_store,
    replay_run,
    xml_tags,
)
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import MODEL, reply

PLAN = "<tasks>\n- draft\n- review\n</tasks>"


def tasks(ctx: StepContext) -> str:
    return ctx.outputs["plan"]["tasks"]


def orchestrated(**work: Any) -> Machine:
    """`plan` answers with tagged tasks; `work`'s templates take them (and more) through vars."""
    options = {"prompt": "Do these tasks for {topic}:\n{tasks}", "needs": ["plan"],
               "vars": {"tasks": tasks}, **work}
    return Machine("orchestrated", model=MODEL, input_vars={"topic": lambda data: data["topic"]}, states=[
        LLMState("plan", prompt="Plan {topic}.", parse=xml_tags("tasks")),
        LLMState("work", **options),
    ])


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    fake.on("plan", reply(PLAN)).on("work", reply("done"))
    with Engine(open_store(db_path), model=fake.model()) as started:
        yield started


def test_vars_fill_the_prompt_and_the_system_prompt_from_the_context(engine: Engine, fake: FakeMessagesAPI) -> None:
    async def audience(ctx: StepContext) -> dict[str, Any]:  # async, and not text: inserted as JSON
        return {"run": ctx.state, "attempt": ctx.attempt}

    result = engine.run(orchestrated(system="Write for {audience}.", vars={"tasks": tasks, "audience": audience}),
                        {"topic": "kites"})
    assert result.status is RunStatus.COMPLETED
    work = fake.requests[-1].body
    assert work["messages"][0]["content"] == "Do these tasks for kites:\n- draft\n- review"
    assert work["system"] == 'Write for {"run": "work", "attempt": 1}.'


def test_each_step_computes_its_vars_again(engine: Engine, fake: FakeMessagesAPI) -> None:
    fake.on("plan", reply("<tasks>- sew</tasks>"))  # after the fixture's PLAN
    machine = orchestrated(prompt="{tasks}")  # only a var: its body is never shared by the runs of the machine
    for topic in ("kites", "sails"):
        engine.run(machine, {"topic": topic})
    assert [r.prompt for r in fake.requests if r.state == "work"] == ["- draft\n- review", "- sew"]


def test_a_var_that_raises_fails_the_step_naming_the_state_and_the_var(engine: Engine, fake: FakeMessagesAPI) -> None:
    result = engine.run(orchestrated(vars={"tasks": lambda ctx: ctx.outputs["plan"]["steps"]}), {"topic": "kites"})
    assert result.status is RunStatus.FAILED
    assert result.error == ("StepError: vars['tasks'] of state 'work' raised KeyError: 'steps'; "
                            "fix the function and resume")
    assert fake.calls("work") == 0  # nothing was sent


def test_a_var_reading_an_output_it_does_not_need_says_which_need_to_add(engine: Engine) -> None:
    result = engine.run(orchestrated(needs=[]), {"topic": "kites"})
    assert result.error == ("StepError: state 'work' read ctx.outputs['plan'], which is not in its needs; "
                            "add 'plan' to needs=[...] (or needs_if_ran=[...]) of state 'work'")


def test_a_var_that_returns_what_no_prompt_can_hold_fails_the_step(engine: Engine) -> None:
    result = engine.run(orchestrated(vars={"tasks": lambda ctx: object()}), {"topic": "kites"})
    assert result.status is RunStatus.FAILED
    assert (result.error or "").startswith(
        "StepError: vars['tasks'] of state 'work' returned a value that cannot be put in a prompt: ")


def test_a_var_is_stopped_by_its_state_timeout(engine: Engine) -> None:
    def forever(ctx: StepContext) -> str:
        while True:
            pass

    result = engine.run(orchestrated(vars={"tasks": forever}, timeout=0.05), {"topic": "kites"})
    assert result.error == ("StepError: vars['tasks'] of state 'work' did not finish within its timeout=0.05s; "
                            "fix the function and resume")


def test_a_run_with_vars_replays_with_no_calls_and_a_changed_var_diverges(engine: Engine,
                                                                          fake: FakeMessagesAPI) -> None:
    result = engine.run(orchestrated(), {"topic": "kites"})
    calls = fake.calls()
    report = asyncio.run(replay_run(engine.store, result.run_id, orchestrated()))
    assert (report.matches, report.compared, fake.calls()) == (True, 2, calls)
    changed = orchestrated(vars={"tasks": lambda ctx: tasks(ctx).upper()})
    diverged = asyncio.run(replay_run(engine.store, result.run_id, changed))
    assert diverged.divergence is not None
    assert (diverged.divergence.state, diverged.divergence.kind) == ("work", "request")


# --------------------------------------------------------------------------- validation


def problems(**work: Any) -> list[str]:
    with pytest.raises(DefinitionError) as raised:
        Machine("m", model=MODEL, input_vars={"topic": str}, states=[
            PythonState("plan", run=lambda ctx: {}),
            LLMState("work", needs=["plan"], **work),
        ])
    return [p.split(": ", 1)[1] for p in raised.value.problems]


def test_vars_are_checked_when_the_machine_is_defined() -> None:
    assert problems(prompt="{a} {b} {c} {topic} {plan}", vars={
        "a": "not a function", "b": lambda: "no context", "c": lambda ctx: "fine", "topic": lambda ctx: 1,
        "plan": lambda ctx: 2, "spare": lambda ctx: 3, "not-a-name": lambda ctx: 4}) == [
        "state 'work': vars['a'] is not a function of one argument (the step's context); "
        "fix: pass vars={'a': lambda ctx: ...}",
        "state 'work': vars['b'] is not a function of one argument (the step's context); "
        "fix: pass vars={'b': lambda ctx: ...}",
        "state 'work': vars key 'topic' shadows the input field of that name; fix: rename it",
        "state 'work': vars key 'plan' shadows the state of that name; fix: rename it",
        "state 'work': vars key 'not-a-name' is not an identifier; fix: use letters, digits and _",
        "state 'work': vars key 'spare' is used by neither prompt nor system; "
        "fix: use {spare} in a template or remove the entry",
    ]
    assert problems(prompt="Go.", vars=["tasks"]) == [
        "state 'work': vars is not a mapping; fix: pass vars={'name': lambda ctx: ...}"]


def test_a_placeholder_a_var_provides_needs_no_input_field() -> None:
    machine = Machine("m", model=MODEL, states=[LLMState("a", prompt="{x}", system="{y}",
                                                         vars={"x": str, "y": lambda ctx: 1})])
    assert machine.templates["a"][0].names == ("x",)
