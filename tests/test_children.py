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
    ParallelState,
    PythonState,
    RunStatus,
    StepContext,
    UsageError,
    open_store,
    replay_run,
)
from statemachine_orch.testing import CapturedRequest, FakeMessagesAPI, Reply, error

from .helpers import query, stored_rows


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
    assert {k["machine"] for k in kids} == {"workers__worker"}
    work = stored_rows(db_path, result.run_id)[1]
    assert work.source == "child"
    # the step carries its children's usage and cost, and so does the run's total
    kid_rows = [row for k in kids for row in stored_rows(db_path, k["run_id"])]
    assert work.usage.input_tokens == sum(r.usage.input_tokens for r in kid_rows) > 0
    assert work.cost_usd == pytest.approx(sum(r.cost_usd or 0.0 for r in kid_rows))
    assert result.cost_usd == pytest.approx(work.cost_usd)
    assert len(fake.requests) == 3


def test_a_failed_item_fails_the_step_and_a_resume_pays_only_for_the_unfinished_items(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake, fail=frozenset({"Style casual: write it casual"}))
    machine = workers(concurrency=3)
    failed = engine.run(machine)
    assert failed.status is RunStatus.FAILED
    assert "1 of 3 child run(s) did not finish; the first, item 1" in (failed.error or "")
    assert [k["status"] for k in children(db_path)] == ["completed", "failed", "completed"]
    failed_row = stored_rows(db_path, failed.run_id)[-1]
    assert (failed_row.from_state, failed_row.to_state, failed_row.cost_usd) == ("work", None, 0.0)
    paid = query(db_path, "SELECT sum(cost_usd) AS c FROM runs WHERE parent_run_id IS NOT NULL")[0]["c"]

    answer_by_prompt(fake)  # the API recovers
    fake.requests.clear()
    with Engine(open_store(db_path), model=fake.model()) as again:  # as a new process would
        result = again.resume(failed.run_id, machine)
    assert result.status is RunStatus.COMPLETED
    assert [r.body["messages"][0]["content"] for r in fake.requests] == ["Style casual: write it casual"]
    assert [k["status"] for k in children(db_path)] == ["completed"] * 3
    # every item's cost is counted once: the joined step carries all three children's
    work = stored_rows(db_path, result.run_id)[-2]
    assert work.cost_usd == pytest.approx(sum(k["cost_usd"] for k in children(db_path)))
    assert work.cost_usd > paid


def test_with_on_item_error_guard_the_guard_sees_the_failed_items(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake, fail=frozenset({"Style terse: write it terse"}))
    seen: list[Any] = []

    def judge(outputs: list[Any], ctx: StepContext) -> FlowDecision:
        seen.append(outputs)
        return FlowDecision.CONTINUE

    machine = Machine("lenient", [
        PythonState("orchestrate", run=plan),
        MapState("work", needs=["orchestrate"], items=lambda ctx: ctx.outputs["orchestrate"],
                 item_model=Subtask, each=LLMState("worker", prompt="Style {kind}: {description}"),
                 on_item_error="guard", guard=judge),
    ])
    result = engine.run(machine)
    assert result.status is RunStatus.COMPLETED
    (outputs,) = seen
    assert outputs[:2] == ["done: Style formal: write it formal", "done: Style casual: write it casual"]
    assert isinstance(outputs[2], ItemError)
    assert (outputs[2].item, outputs[2].status, outputs[2].run_id) == (2, "failed", f"{result.run_id}.1.1.2")
    # stored and read back as the same ItemError
    assert result.outputs["work"][2] == outputs[2]


def test_a_map_over_python_items_reduces_its_outputs(engine: Engine, db_path: Path) -> None:
    machine = Machine("squares", [
        MapState("square", items=lambda ctx: range(5), each=PythonState("one", run=lambda ctx: ctx.input["item"] ** 2),
                 reduce=sum),
    ])
    result = engine.run(machine)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["square"] == 30
    assert len(children(db_path)) == 5


class Draft(BaseModel):
    topic: str


def test_a_machine_state_runs_a_sub_machine_as_a_child_run(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake)
    writer = Machine("writer", [
        LLMState("draft", prompt="Draft about {topic}"),
        LLMState("polish", prompt="Polish: {draft}", needs=["draft"]),
    ], input_model=Draft)
    parent = Machine("editor", [
        PythonState("pick", run=lambda ctx: "owls"),
        MachineState("write", needs=["pick"], machine=writer, input=lambda ctx: {"topic": ctx.outputs["pick"]}),
    ])
    result = engine.run(parent)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["write"] == "done: Polish: done: Draft about owls"
    (kid,) = children(db_path)
    assert (kid["run_id"], kid["machine"], kid["parent_state"]) == (f"{result.run_id}.1.1.0", "writer", "write")
    assert [r.from_state for r in stored_rows(db_path, kid["run_id"])] == ["draft", "polish"]
    assert stored_rows(db_path, result.run_id)[1].usage.input_tokens == sum(
        r.usage.input_tokens for r in stored_rows(db_path, kid["run_id"]))


def test_a_run_with_children_replays_item_by_item_with_zero_calls(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake)
    result = engine.run(workers())
    fake.requests.clear()

    async def replay(machine: Machine) -> Any:
        store = open_store(db_path)
        try:
            return await replay_run(store, result.run_id, machine)
        finally:
            await store.close()

    report = asyncio.run(replay(workers()))
    assert report.matches and report.compared == 3
    assert fake.requests == []
    changed = Machine("workers", [
        PythonState("orchestrate", run=plan),
        MapState("work", needs=["orchestrate"], items=lambda ctx: ctx.outputs["orchestrate"],
                 item_model=Subtask, each=LLMState("worker", prompt="Tone {kind}: {description}")),
        PythonState("summary", needs=["work"], run=lambda ctx: " | ".join(ctx.outputs["work"])),
    ])
    report = asyncio.run(replay(changed))
    assert report.divergence is not None and report.divergence.state == "work"
    assert f"item 0 (run {result.run_id}.1.1.0)" in report.divergence.describe()
    assert "Tone formal" in report.divergence.describe()
    assert fake.requests == []


def eight_at_once() -> Machine:
    return Machine("many", [
        MapState("work", items=lambda ctx: range(8), concurrency=8,
                 each=LLMState("worker", prompt="Item {item}", max_tokens=900)),
    ])


def test_concurrent_items_cannot_overspend_the_budget_together(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    """Eight items at once, each call able to cost about 1,000 tokens, under a 3,500-token
    budget: the calls in flight reserve their worst case, so three go out, and once they
    have spent 3,000 tokens no fourth fits. Without reservations all eight would be sent."""
    fake.default = lambda request: Reply(text="long answer", input_tokens=100, output_tokens=900)
    machine = eight_at_once()
    result = engine.run(machine, budget=Budget(max_tokens=3_500))
    assert result.status is RunStatus.BUDGET_EXCEEDED
    assert len(fake.requests) == 3
    spent = query(db_path, "SELECT sum(input_tokens + output_tokens) AS t FROM runs WHERE parent_run_id = ?",
                  result.run_id)[0]["t"]
    assert spent == 3_000
    assert "budget exceeded before calling worker" in (result.error or "")


def test_calls_in_flight_wait_for_each_other_rather_than_fail_when_they_may_fit(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    """The same budget with answers far below their worst case: every item gets its call."""
    fake.default = lambda request: Reply(text="short", input_tokens=10, output_tokens=5)
    machine = eight_at_once()
    result = engine.run(machine, budget=Budget(max_tokens=3_500))
    assert result.status is RunStatus.COMPLETED
    assert len(fake.requests) == 8


def test_map_and_machine_states_are_validated() -> None:
    def problems(*states: Any) -> list[str]:
        with pytest.raises(DefinitionError) as raised:
            Machine("m", list(states))
        return [p.split(": ", 1)[1] for p in raised.value.problems]

    assert problems(MapState("m", items=lambda ctx: [], each=LLMState("w", prompt="{nothing}"), concurrency=0)) == [
        "state 'm': its each= state 'w': prompt uses {nothing}, which no input field, needed state or vars= entry "
        "provides; fix: add the field to input_model or input_vars, compute it with vars={'nothing': lambda ctx: "
        "...}, or fix the spelling",
        "state 'm': concurrency=0 is not a positive integer; fix: set concurrency=4 (items run at once)",
    ]
    assert problems(MapState("m", items=lambda: [], each="worker")) == [  # type: ignore[arg-type]
        "state 'm': each='worker' is not an LLMState, a PythonState or a Machine; fix: pass one of them",
        "state 'm': items= is not a function of one argument; fix: define it as def items(ctx) -> list",
    ]
    assert problems(PythonState("a", run=lambda ctx: 1),
                    MapState("m", needs=["a"], items=lambda ctx: [], on_item_error="guard",
                             each=LLMState("w", prompt="{a}", needs=["a"]))) == [
        "state 'm': on_item_error='guard' needs a guard to judge the failed items; fix: add guard= that checks "
        "for ItemError in the outputs",
        "state 'm': its each= state 'w' has needs, but an item reads only its item; fix: put what each item "
        "needs into the items (items=lambda ctx: [...])",
    ]


def report(**options: Any) -> Machine:
    """The seed's report with its two analyses of the validated data run at once."""
    return Machine("report", input_vars={"raw_data": lambda data: str(data)}, states=[
        LLMState("data_validation", prompt="Validate: {raw_data}"),
        ParallelState("analyses", needs=["data_validation"], branches=[
            LLMState("trend_analysis", prompt="Trends in {raw_data} given {data_validation}",
                     needs=["data_validation"]),
            LLMState("anomaly_scan", prompt="Anomalies in {raw_data}"),
        ], **options),
        LLMState("executive_summary", prompt="Summary of {trend_analysis} and {anomaly_scan}",
                 needs=["trend_analysis", "anomaly_scan"]),
    ])


def test_a_parallel_state_runs_its_branches_at_once_and_later_states_read_each_by_name(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake)
    result = engine.run(report(), {"sales": [1, 2]})
    assert result.status is RunStatus.COMPLETED
    assert result.path == ["data_validation", "analyses", "executive_summary"]
    trends = "done: Trends in {'sales': [1, 2]} given done: Validate: {'sales': [1, 2]}"
    anomalies = "done: Anomalies in {'sales': [1, 2]}"
    assert result.outputs["analyses"] == {"trend_analysis": trends, "anomaly_scan": anomalies}
    assert fake.requests[-1].body["messages"][0]["content"] == f"Summary of {trends} and {anomalies}"
    assert [(k["machine"], k["item"]) for k in children(db_path)] == [
        ("report__trend_analysis", 0), ("report__anomaly_scan", 1)]


def test_a_failed_branch_is_the_only_one_run_again(engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    answer_by_prompt(fake, fail=frozenset({"Anomalies in {'sales': [1, 2]}"}))
    failed = engine.run(report(), {"sales": [1, 2]})
    assert failed.status is RunStatus.FAILED
    answer_by_prompt(fake)
    fake.requests.clear()
    with Engine(open_store(db_path), model=fake.model()) as again:
        result = again.resume(failed.run_id, report())
    assert result.status is RunStatus.COMPLETED
    assert [r.body["messages"][0]["content"][:9] for r in fake.requests] == ["Anomalies", "Summary o"]

    async def replay() -> Any:
        store = open_store(db_path)
        try:
            return await replay_run(store, result.run_id, report())
        finally:
            await store.close()

    fake.requests.clear()
    assert asyncio.run(replay()).matches and fake.requests == []


def test_parallel_branches_are_validated() -> None:
    with pytest.raises(DefinitionError) as raised:
        Machine("m", [
            PythonState("a", run=lambda ctx: 1),
            ParallelState("p", branches=[LLMState("a", prompt="x"), LLMState("b", prompt="{a}", needs=["a"])]),
        ])
    assert [p.split(": ", 1)[1] for p in raised.value.problems] == [
        "state 'p': branch name 'a' is taken (by a state or another branch); fix: give each branch a name no "
        "state or branch has",
    ]
    with pytest.raises(DefinitionError) as raised:
        Machine("m", [
            PythonState("a", run=lambda ctx: 1),
            ParallelState("p", branches=[LLMState("b", prompt="{a}", needs=["a"])]),
        ])
    assert [p.split(": ", 1)[1] for p in raised.value.problems] == [
        "state 'p': its branch 'b' needs ['a'], which the state does not; fix: add ['a'] to needs=[...] of "
        "state 'p' too",
    ]


def test_a_stop_reaches_the_children_and_leaves_unstarted_items_for_the_resume(
        engine: Engine, db_path: Path) -> None:
    """SIGTERM's `request_stop` while items run: the running item finishes its step, no new
    item starts, the run is left interrupted, and a resume runs only the items left."""
    ran: list[int] = []
    parent: list[Any] = []

    def work(ctx: StepContext) -> int:
        ran.append(ctx.input["item"])
        if ctx.input["item"] == 2 and len(parent) == 1:
            parent.pop().request_stop(grace_s=5.0)
        return int(ctx.input["item"]) * 10

    machine = Machine("stoppable", [
        MapState("work", items=lambda ctx: range(6), concurrency=1, each=PythonState("one", run=work)),
    ])

    async def start_and_stop() -> Any:
        run = await engine.start(machine)
        parent.append(run)
        return await run.run_to_end()

    stopped = asyncio.run(start_and_stop())
    assert stopped.status is RunStatus.INTERRUPTED
    assert ran == [0, 1, 2]
    assert [k["status"] for k in children(db_path)] == ["completed"] * 3  # 3, 4, 5 never started
    with Engine(open_store(db_path)) as again:
        result = again.resume(stopped.run_id, machine)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["work"] == [0, 10, 20, 30, 40, 50]
    assert ran == [0, 1, 2, 3, 4, 5]


def test_a_python_state_starts_child_runs_through_its_context(
        engine: Engine, fake: FakeMessagesAPI, db_path: Path) -> None:
    """No global engine: `await ctx.run_child(machine, input)`. A resume runs the state again;
    the child it had finished is read back, not paid again."""
    answer_by_prompt(fake, fail=frozenset({"Draft about bats"}))
    writer = Machine("writer", [LLMState("draft", prompt="Draft about {topic}")], input_model=Draft)

    async def both(ctx: StepContext) -> list[Any]:
        return [await ctx.run_child(writer, {"topic": topic}) for topic in ("owls", "bats")]

    machine = Machine("tool_user", [PythonState("write_both", run=both)])
    failed = engine.run(machine)
    assert failed.status is RunStatus.FAILED
    assert f"child run {failed.run_id}.0.1.1 is failed" in (failed.error or "")
    answer_by_prompt(fake)
    fake.requests.clear()
    with Engine(open_store(db_path), model=fake.model()) as again:
        result = again.resume(failed.run_id, machine)
    assert result.status is RunStatus.COMPLETED
    assert result.outputs["write_both"] == ["done: Draft about owls", "done: Draft about bats"]
    assert [r.prompt for r in fake.requests] == ["Draft about bats"]  # owls was read back
    kids = children(db_path)
    step = stored_rows(db_path, result.run_id)[-1]
    assert step.source == "python" and step.cost_usd == pytest.approx(sum(k["cost_usd"] for k in kids))
    assert result.cost_usd == pytest.approx(step.cost_usd)


def test_run_child_outside_a_python_state_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="only a Python state's step can start child runs"):
        asyncio.run(StepContext("r", "s", 1, {}, {}).run_child(Machine("m", [PythonState("a", run=lambda c: 1)])))
