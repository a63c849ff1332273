"""A declared run result (issue 12, item 8): `Machine(result=...)` as `RunResult.output`, live,
resumed and read back from the log, and as "result" in `orch run --json` and `orch show`, on
real SQLite files (the CLI's model calls go through the real SDK to the fake Messages API)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from statemachine_orch import (
    DefinitionError,
    Engine,
    FlowDecision,
    LLMState,
    Machine,
    PythonState,
    RunResult,
    RunStatus,
    StepContext,
    guard,
    open_store,
)
from statemachine_orch.testing import FakeMessagesAPI

from .helpers import MODEL, EnvOrch, reply, write


class Score(BaseModel):
    value: int


def scored(result: Any = None, *, fail_polish: bool = False) -> Machine:
    """`draft` (text), `score` (a model, run twice: RETRY once), `polish` (Python, last)."""

    def polish(ctx: StepContext) -> str:
        if fail_polish:
            raise RuntimeError("polisher down")
        return "polished " + ctx.outputs["draft"]

    @guard(FlowDecision.RETRY, FlowDecision.CONTINUE)
    def again_once(output: Score, ctx: StepContext) -> FlowDecision:
        return FlowDecision.RETRY if ctx.attempt == 1 else FlowDecision.CONTINUE

    return Machine("scored", model=MODEL, result=result, states=[
        LLMState("draft", prompt="Draft."),
        LLMState("score", prompt="Score {draft}.", needs=["draft"], output=Score, guard=again_once),
        PythonState("polish", run=polish, needs=["draft"]),
    ])


@pytest.fixture
def engine(db_path: Path, fake: FakeMessagesAPI) -> Iterator[Engine]:
    fake.on("draft", reply("a draft")).on("score", reply(data={"value": 3}), reply(data={"value": 8}))
    with Engine(open_store(db_path), model=fake.model()) as started:
        yield started


def from_log(engine: Engine, run_id: str, result: Any) -> RunResult:
    record, log = asyncio.run(engine.store.load_run(run_id))
    return RunResult.from_log(record, log, result=result)


def test_a_result_named_by_state_is_its_latest_output(engine: Engine) -> None:
    run = engine.run(scored("score"))
    assert run.path == ["draft", "score", "score", "polish"]
    assert run.output == Score(value=8)  # the latest visit, as the run holds it
    assert run.to_json()["result"] == {"value": 8}
    assert from_log(engine, run.run_id, "score").output == {"value": 8}  # as stored


def test_a_result_function_gets_the_stored_outputs_so_it_answers_alike_live_and_from_the_log(
        engine: Engine) -> None:
    def answer(outputs: Any) -> dict[str, Any]:
        return {"text": outputs["polish"], "score": outputs["score"]["value"]}  # JSON data, models too

    run = engine.run(scored(answer))
    assert run.output == {"text": "polished a draft", "score": 8}
    assert from_log(engine, run.run_id, answer).output == run.output


def test_without_a_declared_result_the_output_is_that_of_the_state_committed_last(engine: Engine) -> None:
    run = engine.run(scored())
    assert run.output == "polished a draft"
    assert from_log(engine, run.run_id, None).output == "polished a draft"


def test_the_result_is_none_until_its_output_exists_and_appears_on_resume(
        engine: Engine, fake: FakeMessagesAPI) -> None:
    failed = engine.run(scored("polish", fail_polish=True))
    assert failed.status is RunStatus.FAILED and failed.output is None
    assert engine.run(scored(lambda outputs: outputs["polish"], fail_polish=True)).output is None  # a KeyError
    assert engine.run(scored(fail_polish=True)).output == Score(value=8)  # by default: the last committed
    resumed = engine.resume(failed.run_id, scored("polish"))
    assert (resumed.status, resumed.output) == (RunStatus.COMPLETED, "polished a draft")


def test_a_result_function_that_raises_is_a_definition_error_naming_it(engine: Engine) -> None:
    def broken(outputs: Any) -> Any:
        return outputs["score"]["value"] / 0

    with pytest.raises(DefinitionError) as raised:
        engine.run(scored(broken))
    assert str(raised.value) == ("the result function broken raised ZeroDivisionError: division by zero; fix: make "
                                 "it answer for these outputs (each state's latest, as JSON data)")


@pytest.mark.parametrize(("result", "problem"), [
    ("polished", "result names unknown state 'polished'; fix: use one of ['draft', 'score', 'polish']"),
    (42, "result is neither a state name nor a function; fix: pass result='state_name' or "
         "result=lambda outputs: ..."),
    (lambda: None, "result function does not take (outputs); fix: define it as def result(outputs) -> value"),
])
def test_the_result_is_checked_when_the_machine_is_defined(result: Any, problem: str) -> None:
    with pytest.raises(DefinitionError) as raised:
        scored(result)
    assert [p.split(": ", 1)[1] for p in raised.value.problems] == [f"machine 'scored': {problem}"]


# --------------------------------------------------------------------------- the CLI

CLI_MACHINES = '''
from statemachine_orch import LLMState, Machine, PythonState

def states():
    return [LLMState("answer", prompt="Answer {question}"),
            PythonState("audit", run=lambda ctx: {"checked": True})]

named = Machine("named", input_vars={"question": lambda data: data["q"]}, result="answer", states=states())
computed = Machine("computed", input_vars={"question": lambda data: data["q"]}, states=states(),
                   result=lambda outputs: {"answer": outputs["answer"], **outputs["audit"]})
'''


def test_orch_run_and_show_print_the_result(orch: EnvOrch, fake: FakeMessagesAPI, tmp_path: Path) -> None:
    machines = write(tmp_path / "answers.py", CLI_MACHINES)
    data = write(tmp_path / "question.json", '{"q": "why?"}')
    fake.on("answer", reply("because"))
    ran = orch.json("run", f"{machines}:named", "--input", data, "--run-id", "named-1")
    assert (ran["result"], ran["outputs"]["audit"]) == ("because", {"checked": True})  # the other keys stay
    shown = orch.json("show", "named-1")
    assert (shown["result"], shown["options"]["result"]) == ("because", "answer")
    assert "result:\n  because\n" in orch.ok("show", "named-1").stdout

    computed = orch.json("run", f"{machines}:computed", "--input", data, "--run-id", "computed-1")
    expected = {"answer": "because", "checked": True}
    assert computed["result"] == expected
    assert orch.json("show", "computed-1")["result"] == expected  # the machine is loaded to compute it

    machines.unlink()  # a function result cannot be computed without its machine: said, not fatal
    gone = orch("show", "computed-1", "--json")
    assert gone.code == 0 and json.loads(gone.stdout)["result"] is None
    assert gone.stderr.startswith("orch: warning: result not computed: ")
    assert orch.json("show", "named-1")["result"] == "because"  # a state name needs no machine
